"""The proxy's control socket: lets the admin CLI on this machine make a change hold now.

Admin verbs write the backend directly; a proxy would see the change at its next poll
(about 2 s). So the proxy listens on ``data_dir/control.sock`` (0600, in the 0700 data
directory: only the account that runs the proxy, or root, can connect) for one line:

    refresh\\n   ->  the proxy re-reads locks, users and roles, then answers  ok\\n

The CLI waits for that answer before it returns, so a lock holds on this proxy before
`apptunnel lock` exits. Anything else gets ``error\\n``; every connection is closed after
one answer, and a silent one after ``IDLE_TIMEOUT``.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from twisted.internet import defer
from twisted.internet.endpoints import UNIXClientEndpoint, UNIXServerEndpoint, connectProtocol
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver

SOCKET_NAME = "control.sock"
IDLE_TIMEOUT = 10.0
MAX_PATH = 100   # AF_UNIX paths are limited to 107 bytes on Linux

Refresh = Callable[[], defer.Deferred]


def control_path(data_dir: str, name: str = SOCKET_NAME) -> str:
    """``name``: worker I of several listens on its own (proxy/workers.py)."""
    return os.path.join(data_dir, name)


def control_endpoint(reactor, data_dir: str, name: str = SOCKET_NAME) -> UNIXServerEndpoint | None:
    """The listening endpoint; ``wantPID`` lets a restart remove a crashed proxy's socket.
    None when the data directory's path is too long for a Unix socket."""
    path = control_path(data_dir, name)
    if len(os.fsencode(path)) > MAX_PATH:
        return None
    return UNIXServerEndpoint(reactor, path, mode=0o600, wantPID=True)


class ControlProtocol(LineOnlyReceiver):
    delimiter = b"\n"
    MAX_LENGTH = 64

    _log = Logger()

    def __init__(self, refresh: Refresh, clock: IReactorTime) -> None:
        self._refresh = refresh
        self._clock = clock
        self._timer = None
        self._answered = False

    def connectionMade(self) -> None:
        self._timer = self._clock.callLater(IDLE_TIMEOUT, self.transport.abortConnection)

    def lineReceived(self, line: bytes) -> None:
        if self._answered:
            return
        self._answered = True
        if line.strip() != b"refresh":
            self._answer(b"error\n")
            return
        d = defer.maybeDeferred(self._refresh)
        d.addCallbacks(lambda _: self._answer(b"ok\n"), self._failed)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._answered = True
        self._answer(b"error\n")

    def _failed(self, failure) -> None:
        self._log.failure("control refresh failed", failure)
        self._answer(b"error\n")

    def _answer(self, data: bytes) -> None:
        if self.transport is not None and self.transport.connected:
            self.transport.write(data)
            self.transport.loseConnection()

    def connectionLost(self, reason) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


class ControlFactory(Factory):
    """One ControlProtocol per CLI connection; ``refresh`` does the re-reading."""

    noisy = False

    def __init__(self, refresh: Refresh, clock: IReactorTime) -> None:
        self._refresh = refresh
        self._clock = clock

    def buildProtocol(self, addr) -> ControlProtocol:
        proto = ControlProtocol(self._refresh, self._clock)
        proto.factory = self
        return proto


class _Ask(LineOnlyReceiver):
    """Worker 0's side of a worker's control socket: ``refresh``, then the answer line."""

    delimiter = b"\n"
    MAX_LENGTH = 64

    def __init__(self) -> None:
        self.answer: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        self.sendLine(b"refresh")

    def lineReceived(self, line: bytes) -> None:
        if not self.answer.called:
            self.answer.callback(line.strip())
        self.transport.loseConnection()

    def connectionLost(self, reason) -> None:
        if not self.answer.called:
            self.answer.callback(b"")


async def ask_refresh(reactor, path: str, wait: float) -> None:
    """Have the proxy listening on ``path`` refresh; raises when it does not answer ``ok``
    within ``wait`` seconds. (The CLI's twin is cli/control.py, which cannot import us.)"""
    ask = _Ask()
    await connectProtocol(UNIXClientEndpoint(reactor, path, timeout=wait), ask) \
        .addTimeout(wait, reactor)
    try:
        answer = await ask.answer.addTimeout(wait, reactor)
    except defer.TimeoutError:
        ask.transport.abortConnection()
        raise
    if answer != b"ok":
        raise RuntimeError(f"answered {answer!r}")
