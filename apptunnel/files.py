"""Writing our small secret-bearing files: whole or not at all, private from the first byte.

Keys, certificates and profiles are replaced atomically (a temp file, fsync, rename), so a
crash never leaves half a key, and a file meant to be 0600 is created 0600 through
``os.open``: there is no moment where others could read it. Used by the CA, the agent's
identity and the CLI profile; it imports nothing of ours.
"""

from __future__ import annotations

import os

__all__ = ["write_file"]


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
