"""Locks in force, kept in memory so every session lookup can check them for free.

A lock is written to the backend by `apptunnel lock` (possibly on another machine); each
proxy's LockWatcher polls the backend on its clock and keeps the current set. When a lock
it has not seen before appears, the watcher ends the matching stored sessions and tells
its listeners once, so the proxy can cut live connections. Because SessionManager asks
`locked()` on every lookup, a lock wins over any session cache as soon as it is polled.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from twisted.internet.defer import DeferredLock
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from apptunnel.backend.base import Backend
from apptunnel.backend.records import Lock
from apptunnel.polling import Poll

LockListener = Callable[[Lock], object]


def lock_matches(lock: Lock, user: str, app: str | None = None) -> bool:
    """User-only locks cover that user everywhere; app-only locks cover everyone on that
    app; a lock naming both covers that user on that app only."""
    if lock.user is not None and lock.user != user:
        return False
    if lock.app is not None and lock.app != app:
        return False
    return lock.user is not None or lock.app is not None


def lock_message(lock: Lock) -> str:
    """The public text a refused user sees."""
    return f"your access is locked: {lock.message}" if lock.message else "your access is locked"


class LockWatcher:
    """Polls ``backend.list_locks`` every ``interval`` seconds of ``clock``."""

    _log = Logger()

    def __init__(self, backend: Backend, clock: IReactorTime, interval: float = 2.0) -> None:
        self._backend = backend
        self._clock = clock
        self._locks: dict[str, Lock] = {}
        self._announced: set[str] = set()   # ids whose listeners have run
        self._ended: set[str] = set()       # ids whose stored sessions are gone
        self._listeners: list[LockListener] = []
        self._mutex = DeferredLock()        # one poll at a time, so a lock is new only once
        self._poll = Poll(self.refresh, clock, interval, "lock watcher")

    # -- lifecycle --------------------------------------------------------------

    def start(self) -> None:
        """Poll now and then every ``interval`` seconds until `stop`."""
        self._poll.start()

    def stop(self) -> None:
        self._poll.stop()

    # -- queries ----------------------------------------------------------------

    @property
    def locks(self) -> list[Lock]:
        """The locks in force now, oldest first."""
        now = self._clock.seconds()
        return [lock for lock in self._locks.values()
                if lock.expires is None or lock.expires > now]

    def locked(self, user: str, app: str | None = None) -> Lock | None:
        """The lock that refuses ``user`` (on ``app``, when given), or None."""
        if not self._locks:
            return None
        for lock in self.locks:
            if lock_matches(lock, user, app):
                return lock
        return None

    def add_listener(self, fn: LockListener) -> None:
        """Call ``fn(lock)`` once for each lock that appears from now on (and at start)."""
        self._listeners.append(fn)

    def remove_listener(self, fn: LockListener) -> None:
        if fn in self._listeners:
            self._listeners.remove(fn)

    # -- polling ----------------------------------------------------------------

    async def refresh(self) -> None:
        """Poll the backend now; never raises (failures are logged and retried later)."""
        async with self._mutex:
            try:
                current = await self._backend.list_locks(self._clock.seconds())
            except Exception as err:
                self._log.warn("cannot read locks (will retry): {error}", error=str(err))
                return
            self._locks = {lock.id: lock for lock in current}
            self._announced &= self._locks.keys()
            self._ended &= self._locks.keys()
            for lock in current:
                if lock.id not in self._announced:
                    self._announced.add(lock.id)
                    self._log.info("lock {id} in force (user {user}, app {app})",
                                   id=lock.id, user=lock.user, app=lock.app)
                    self._notify(lock)
                if lock.id not in self._ended:
                    await self._end_sessions(lock)

    def _notify(self, lock: Lock) -> None:
        for fn in list(self._listeners):
            try:
                fn(lock)
            except Exception:
                self._log.failure("lock listener {fn!r} failed for lock {id}", fn=fn, id=lock.id)

    async def _end_sessions(self, lock: Lock) -> None:
        """End the stored sessions the lock covers; retried on the next poll if it fails."""
        if lock.user is None and lock.app is None:
            self._ended.add(lock.id)   # an agent lock: its tunnels are cut by the listener
            return
        try:
            if lock.app is None:
                ended = await self._backend.delete_user_sessions(lock.user)
            else:
                ended = await self._backend.delete_app_sessions(lock.app, lock.user)
        except Exception as err:
            self._log.warn("cannot end sessions for lock {id} (will retry): {error}",
                           id=lock.id, error=str(err))
            return
        self._ended.add(lock.id)
        if ended:
            self._log.info("lock {id} ended {count} app sessions", id=lock.id, count=len(ended))


LOCK_AUDIT_INTERVAL = 10.0   # one lock.enforced per (user, app) per this many seconds
MAX_LOCK_AUDIT_KEYS = 10_000


class LockAudit:
    """``lock.enforced`` for refused requests, at most once per (user, app) per interval.

    A locked user's client retrying in a loop must not flood the audit log. One instance
    is shared by every place that refuses a locked user (sessions, the access policy), so
    the throttle is one whichever path refused them.
    """

    def __init__(self, audit, clock: IReactorTime, interval: float = LOCK_AUDIT_INTERVAL,
                 limit: int = MAX_LOCK_AUDIT_KEYS) -> None:
        self._audit = audit
        self._clock = clock
        self._interval = interval
        self._limit = limit
        self._last: OrderedDict[tuple[str, str], float] = OrderedDict()

    def enforced(self, lock: Lock, user: str, app: str | None, where: str) -> None:
        if self._audit is None:
            return
        now = self._clock.seconds()
        key = (user, app or "")
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            return
        self._last[key] = now
        self._last.move_to_end(key)
        while len(self._last) > self._limit:
            self._last.popitem(last=False)
        self._audit.emit("lock.enforced", actor=user, target=app or "", outcome="failure",
                         lock=lock.id, where=where)
