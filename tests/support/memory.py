"""Storage and password hashing for unit tests: no thread, no file, no wall clock.

`MemoryBackend` answers every call before it returns, and `inline_hashes` runs argon2 on
the calling thread, so whatever a test drives through memory transports and a Clock is
finished when the drive returns.
"""

from __future__ import annotations

from twisted.internet.defer import maybeDeferred

from apptunnel.auth.passwords import HashQueue
from apptunnel.backend.memory import MemoryBackend

__all__ = ["MemoryBackend", "inline_hashes"]


def inline_hashes() -> HashQueue:
    """A HashQueue whose checks run synchronously instead of in Twisted's thread pool."""
    return HashQueue(run_in_thread=lambda f, *args: maybeDeferred(f, *args))
