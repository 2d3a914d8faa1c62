"""Storage and password hashing for unit tests: no thread, no file, no wall clock.

`MemoryBackend` answers every call before it returns, and `inline_hashes` runs argon2 on
the calling thread, so whatever a test drives through memory transports and a Clock is
finished when the drive returns. `cheap_hash` stores a user's password as argon2id at a
test's cost: sign-in verifies with the parameters in the stored hash, so a login takes
milliseconds instead of a 64 MiB check.
"""

from __future__ import annotations

import functools

import argon2
from twisted.internet.defer import maybeDeferred

from apptunnel.auth.passwords import HashQueue
from apptunnel.backend.memory import MemoryBackend

__all__ = ["MemoryBackend", "cheap_hash", "inline_hashes"]

_CHEAP_HASHER = argon2.PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1,
                                      type=argon2.Type.ID)


def inline_hashes() -> HashQueue:
    """A HashQueue whose checks run synchronously instead of in Twisted's thread pool."""
    return HashQueue(run_in_thread=lambda f, *args: maybeDeferred(f, *args))


@functools.cache
def cheap_hash(password: str) -> str:
    """An argon2id hash of ``password`` at a low cost, made once per run."""
    return _CHEAP_HASHER.hash(password)
