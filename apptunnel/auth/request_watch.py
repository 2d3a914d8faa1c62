"""Approved access requests kept in memory, so an elevation ends by itself, on time.

Every decision asks `granted` (auth/access.py) without touching storage. The watcher
polls storage like the user directory does (another proxy's approvals arrive within one
interval), is told at once of changes made on this proxy (`note`), and wakes up when the
first elevation ends: listeners (auth/access.py LiveRecheck) then re-check that user's
live connections, and the request is marked expired in storage. The mark is a
compare-and-set, so with several proxies exactly one audits the expiry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from apptunnel.auth.access_requests import (
    APPROVED,
    PENDING,
    current_state,
    expired,
    granted_roles,
)
from apptunnel.backend.base import Backend
from apptunnel.backend.records import AccessRequest
from apptunnel.polling import Poll

RequestListener = Callable[[str], object]     # called with the user whose grants changed


class RequestWatcher:
    """Polls ``backend`` every ``interval`` seconds; ``on_expired(request)`` hears each
    expiry this process recorded (the audit and the webhook)."""

    _log = Logger()

    def __init__(self, backend: Backend, clock: IReactorTime, interval: float = 2.0,
                 on_expired: Callable[[AccessRequest], object] | None = None) -> None:
        self._backend = backend
        self._clock = clock
        self._on_expired = on_expired
        self._approved: dict[str, AccessRequest] = {}
        self._revision = 0
        self._listeners: list[RequestListener] = []
        self._mutex = DeferredLock()
        self._reads = 0                     # polls started so far
        self._noted: dict[str, int] = {}    # id -> self._reads when note() saw it
        self._poll = Poll(self.refresh, clock, interval, "access request watcher")
        self._wake: IDelayedCall | None = None

    # -- lifecycle --------------------------------------------------------------

    def start(self) -> None:
        """Poll now and then every ``interval`` seconds until `stop`."""
        self._poll.start()

    def stop(self) -> None:
        self._poll.stop()
        if self._wake is not None and self._wake.active():
            self._wake.cancel()
        self._wake = None

    # -- queries ----------------------------------------------------------------

    @property
    def revision(self) -> int:
        """Changes whenever any grant may have changed (cached decisions are stale)."""
        return self._revision

    def granted(self, user: str, ids: Iterable[str], app: str | None,
                now: float) -> tuple[tuple[str, ...], float | None]:
        """The roles ``ids`` grant ``user`` on ``app`` now, and when that ends."""
        return granted_roles(self._approved, user, ids, app, now)

    def add_listener(self, fn: RequestListener) -> None:
        self._listeners.append(fn)

    def remove_listener(self, fn: RequestListener) -> None:
        if fn in self._listeners:
            self._listeners.remove(fn)

    # -- changes ----------------------------------------------------------------

    def note(self, request: AccessRequest) -> None:
        """A request changed on this proxy (approved, assumed): act on it now."""
        if request.state == APPROVED:
            self._approved[request.id] = request
        else:
            self._approved.pop(request.id, None)
        self._noted[request.id] = self._reads
        self._changed({request.user})
        self._schedule()

    async def refresh(self) -> None:
        """Poll storage now; never raises. Lapsed requests are marked expired."""
        async with self._mutex:
            self._reads += 1
            started = self._reads
            try:
                found = await self._backend.list_access_requests(states=(PENDING, APPROVED))
            except Exception as err:
                self._log.warn("cannot read access requests (will retry): {error}",
                               error=str(err))
                return
            now = self._clock.seconds()
            approved = {r.id: r for r in found if current_state(r, now) == APPROVED}
            old = self._approved
            for request_id, request in old.items():
                # Noted while this poll was reading: newer than what it read.
                if (request_id not in approved and self._noted.get(request_id, 0) >= started
                        and current_state(request, now) == APPROVED):
                    approved[request_id] = request
            self._noted = {i: n for i, n in self._noted.items() if n >= started}
            users = {r.user for i, r in approved.items() if old.get(i) != r}
            users |= {r.user for i, r in old.items() if i not in approved}
            self._approved = approved
            if users:
                self._changed(users)
            self._schedule()
            for request in found:
                lapsed = expired(request, now)
                if lapsed is not None:
                    await self._record_expiry(request, lapsed)

    # -- helpers ----------------------------------------------------------------

    async def _record_expiry(self, before: AccessRequest, after: AccessRequest) -> None:
        try:
            won = await self._backend.update_access_request(after, before.state,
                                                            len(before.reviews))
        except Exception as err:
            self._log.warn("cannot mark access request {id} expired: {error}",
                           id=before.id, error=str(err))
            return
        if won and self._on_expired is not None:
            self._on_expired(after)

    def _schedule(self) -> None:
        """Wake up when the first elevation ends."""
        if self._wake is not None and self._wake.active():
            self._wake.cancel()
        self._wake = None
        if not self._approved:
            return
        first = min(r.expires for r in self._approved.values())
        self._wake = self._clock.callLater(max(0.0, first - self._clock.seconds()),
                                           self._lapse)

    def _lapse(self) -> None:
        """Elevations ended: `granted` already refuses them; tell listeners now, then
        record the expiry in storage."""
        self._wake = None
        now = self._clock.seconds()
        ended = [r for r in self._approved.values() if now >= r.expires]
        for request in ended:
            del self._approved[request.id]
        if ended:
            self._changed({r.user for r in ended})
        self._schedule()
        d = Deferred.fromCoroutine(self.refresh())
        d.addErrback(lambda f: self._log.failure("access request expiry failed", f))

    def _changed(self, users: set[str]) -> None:
        self._revision += 1
        for user in sorted(users):
            for fn in list(self._listeners):
                try:
                    fn(user)
                except Exception:
                    self._log.failure("access request listener {fn!r} failed for {user}",
                                      fn=fn, user=user)
