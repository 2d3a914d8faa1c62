"""Changes at once on every proxy: PostgreSQL LISTEN/NOTIFY.

Triggers on the tables whose changes must act at once (backend/pg_schema.py
NOTIFY_TABLES) call ``pg_notify('apptunnel_changes', table)``, so a change made by any
writer (another proxy, the admin CLI, psql) is announced to every listening proxy.

Each proxy listens on a connection of its own, in a thread of its own: psycopg's
``notifies()`` blocks, and the reactor never does. Each notification is handed to the
reactor thread (``callFromThread``), where ``Debounced`` coalesces a burst into one
refresh (ProxyService.refresh_now, the control socket's ``refresh``). A lost connection
is retried with backoff; when it is back, one full refresh catches up with whatever was
announced meanwhile. Polling (apptunnel/polling.py) keeps running behind this: a missed
notification costs at most one poll interval.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from typing import Any

import psycopg
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from apptunnel.backend.postgres import CONNECT_TIMEOUT, safe_dsn

__all__ = ["CHANNEL", "ChangeListener", "Debounced"]

CHANNEL = "apptunnel_changes"
WAIT = 1.0                 # seconds one notifies() wait lasts (how soon stop() is seen)
RETRY_MIN, RETRY_MAX = 0.25, 2.0
DEBOUNCE = 0.05

log = Logger()


class Debounced:
    """Runs ``action`` once for a burst of ``poke()`` calls, ``delay`` seconds after the
    first; a poke during a run schedules exactly one more run after it."""

    def __init__(self, action: Callable[[], Any], clock: IReactorTime,
                 delay: float = DEBOUNCE) -> None:
        self._action = action
        self._clock = clock
        self._delay = delay
        self._call = None
        self._running = False
        self._again = False

    def poke(self) -> None:
        if self._running:
            self._again = True
        elif self._call is None:
            self._call = self._clock.callLater(self._delay, self._run)

    def cancel(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _run(self) -> None:
        self._call = None
        self._running = True
        d = defer.maybeDeferred(self._action)
        d.addErrback(lambda f: log.warn("refresh after a change notice failed: {error}",
                                        error=f.getErrorMessage()))
        d.addBoth(self._done)

    def _done(self, _: object) -> None:
        self._running = False
        if self._again:
            self._again = False
            self.poke()


def retry_delay(attempt: int) -> float:
    """Backoff with jitter between reconnects of the listening connection."""
    return min(RETRY_MAX, RETRY_MIN * 2 ** min(attempt, 10)) * (0.5 + random.random() / 2)


class ChangeListener:
    """LISTEN on CHANNEL in a thread of its own; ``on_change()`` runs in the reactor
    thread for each notification and once after every reconnect."""

    def __init__(self, dsn: str, password: str | None, reactor,
                 on_change: Callable[[], None]) -> None:
        self._dsn = dsn
        self._password = password
        self._reactor = reactor
        self._on_change = on_change
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="apptunnel-listen",
                                            daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Ends the thread within about WAIT seconds (it is a daemon: never holds exit)."""
        self._stopping.set()

    # -- the listening thread ----------------------------------------------------------

    def _run(self) -> None:
        attempt, connected_before = 0, False
        while not self._stopping.is_set():
            try:
                conn = self._connect()
            except psycopg.Error as err:
                if attempt == 0:
                    self._log_from_thread("cannot LISTEN for changes on {dsn}: {error}; "
                                          "retrying (polling continues)", err)
                self._stopping.wait(retry_delay(attempt))
                attempt += 1
                continue
            if connected_before or attempt:
                self._reactor.callFromThread(log.info, "listening for changes again on {dsn}",
                                             dsn=safe_dsn(self._dsn))
                self._changed()   # one full refresh for what was announced meanwhile
            attempt, connected_before = 0, True
            try:
                self._listen(conn)
            except psycopg.Error as err:
                self._log_from_thread("lost the LISTEN connection to {dsn}: {error}; "
                                      "reconnecting", err)
            finally:
                conn.close()

    def _connect(self) -> psycopg.Connection:
        extra: dict[str, Any] = {"autocommit": True, "connect_timeout": CONNECT_TIMEOUT,
                                 "keepalives": 1, "keepalives_idle": 5,
                                 "keepalives_interval": 2, "keepalives_count": 2}
        if self._password is not None:
            extra["password"] = self._password
        conn = psycopg.connect(self._dsn, **extra)
        conn.execute(f"LISTEN {CHANNEL}")
        return conn

    def _listen(self, conn: psycopg.Connection) -> None:
        while not self._stopping.is_set():
            for _ in conn.notifies(timeout=WAIT):
                self._changed()
            # A quiet wait ends here; a dead server raises from notifies() or from this.
            conn.execute("SELECT 1")

    def _changed(self) -> None:
        if not self._stopping.is_set():
            self._reactor.callFromThread(self._on_change)

    def _log_from_thread(self, text: str, err: BaseException) -> None:
        error = " ".join(str(err).split()) or type(err).__name__
        self._reactor.callFromThread(log.warn, text, dsn=safe_dsn(self._dsn), error=error)
