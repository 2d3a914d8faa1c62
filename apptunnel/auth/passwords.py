"""Password hashing with argon2id.

Both functions are CPU-heavy on purpose: callers on the reactor run them in a thread.
verify_password costs the same for unknown users (it checks a dummy hash), so response
time does not reveal which usernames exist.
"""

from __future__ import annotations

import threading

from argon2 import PasswordHasher, Type

MAX_PASSWORD_LENGTH = 1024

_hasher = PasswordHasher(type=Type.ID)
_dummy_hash: str | None = None
_dummy_lock = threading.Lock()


def hash_password(pw: str) -> str:
    """Return an argon2id PHC string; ValueError for an over-long password."""
    if len(pw) > MAX_PASSWORD_LENGTH:
        raise ValueError(f"password longer than {MAX_PASSWORD_LENGTH} characters")
    return _hasher.hash(pw)


def _dummy() -> str:
    global _dummy_hash
    with _dummy_lock:
        if _dummy_hash is None:
            _dummy_hash = _hasher.hash("apptunnel dummy password")
        return _dummy_hash


def verify_password(stored: str | None, pw: str) -> bool:
    """True only when pw matches stored; never raises, and None still costs one check."""
    try:
        candidate = pw if isinstance(pw, str) and len(pw) <= MAX_PASSWORD_LENGTH else ""
        ok = _hasher.verify(stored if stored is not None else _dummy(), candidate)
        return bool(ok) and stored is not None and candidate == pw
    except Exception:
        return False
