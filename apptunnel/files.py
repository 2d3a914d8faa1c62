"""Writing our small secret-bearing files: whole or not at all, private from the first byte.

Keys, certificates and profiles are replaced atomically (a temp file, fsync, rename), so a
crash never leaves half a key, and a file meant to be 0600 is created 0600 through
``os.open``: there is no moment where others could read it. Used by the CA, the agent's
identity and the CLI profile; it imports nothing of ours.
"""

from __future__ import annotations

import os

import base64
import binascii

__all__ = ["ENCRYPTION_KEY_BYTES", "read_encryption_key", "write_file"]

ENCRYPTION_KEY_BYTES = 32


def write_file(path: str, data: bytes, mode: int) -> None:
    """Atomically replace `path` with `data`, created with `mode` from the first byte."""
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # an old temp file may have had other bits
        with os.fdopen(fd, "wb") as f:
            fd = -1
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if fd >= 0:
            os.close(fd)
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_encryption_key(path: str) -> bytes:
    """backend.encryption_key_file: 32 bytes, raw or base64 (surrounding whitespace
    ignored), mode 0600 or stricter. ValueError says what is wrong, never the key."""
    try:
        if os.stat(path).st_mode & 0o077:
            raise ValueError(f"{path} is readable by group or others (chmod 600 it)")
        with open(path, "rb") as f:
            data = f.read(4 * ENCRYPTION_KEY_BYTES)
    except OSError as err:
        raise ValueError(f"cannot read {path}: {err.strerror}") from None
    if len(data) == ENCRYPTION_KEY_BYTES:
        return data
    try:
        decoded = base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError):
        decoded = b""
    if len(decoded) != ENCRYPTION_KEY_BYTES:
        raise ValueError(f"{path} must hold {ENCRYPTION_KEY_BYTES} random bytes, raw or "
                         f"base64 (head -c 32 /dev/urandom > FILE; chmod 600 FILE)")
    return decoded
