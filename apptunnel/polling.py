"""Storage read again every few seconds: the one loop behind every watcher of shared state.

Locks, users, access-request grants and app resources live in storage that the admin CLI,
the API and other proxies change. Each watcher keeps its own view in memory and calls
``refresh()`` to read storage again; this module runs that refresh now and then every
``interval`` seconds of the clock it is given, one at a time, and logs (never raises)
when a refresh fails, so the next tick simply tries again.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from apptunnel.backend.base import StorageUnavailable


class Poll:
    """Calls ``refresh()`` now and then every ``interval`` seconds until `stop`."""

    _log = Logger()

    def __init__(self, refresh: Callable[[], Awaitable[object]], clock: IReactorTime,
                 interval: float, what: str) -> None:
        self._refresh = refresh
        self._clock = clock
        self._interval = interval
        self._what = what
        self._loop: LoopingCall | None = None
        self._down = False   # the last refresh found storage unreachable

    def start(self) -> None:
        if self._loop is not None:
            return
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self._clock
        self._loop.start(self._interval, now=True).addErrback(
            lambda f: self._log.failure("{what} loop stopped", f, what=self._what))

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def _tick(self) -> Deferred:
        return Deferred.fromCoroutine(self._run())

    async def _run(self) -> None:
        try:
            await self._refresh()
        except StorageUnavailable as err:
            # An outage is one line when it starts and one when it ends, not a traceback
            # every interval: the view in memory stays as last read meanwhile.
            if not self._down:
                self._down = True
                self._log.warn("{what}: storage unavailable, keeping the last view and "
                               "trying again every {interval}s: {error}", what=self._what,
                               interval=self._interval, error=err.one_line())
            return
        except Exception:  # noqa: BLE001 - one bad read must not end the watcher
            self._log.failure("{what}: refresh failed; trying again in {interval}s",
                              what=self._what, interval=self._interval)
            return
        if self._down:
            self._down = False
            self._log.info("{what}: storage answers again", what=self._what)
