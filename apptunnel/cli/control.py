"""Ask the proxy on this machine to re-read what an admin verb just wrote.

The proxy listens on ``data_dir/control.sock`` (see ``proxy/control.py``): one line
``refresh``, one answer ``ok`` once its locks, users and roles are re-read. A proxy that
is not running (no socket, or a stale file) is nothing to wait for; other proxies see the
change at their next poll.
"""

from __future__ import annotations

import os

from twisted.internet import defer
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.protocols.basic import LineOnlyReceiver

SOCKET_NAME = "control.sock"   # the same name as proxy/control.py
WAIT = 2.0


class _Ask(LineOnlyReceiver):
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


async def refresh_proxy(reactor, data_dir: str, wait: float = WAIT) -> bool | None:
    """True when the local proxy confirmed, None when none listens, False when it did not
    answer ``ok`` within ``wait`` seconds."""
    path = os.path.join(data_dir, SOCKET_NAME)
    if not os.path.exists(path):
        return None
    ask = _Ask()
    try:
        await connectProtocol(UNIXClientEndpoint(reactor, path, timeout=wait), ask) \
            .addTimeout(wait, reactor)
    except Exception:  # noqa: BLE001 - refused / stale socket: no proxy is listening
        return None
    try:
        answer = await ask.answer.addTimeout(wait, reactor)
    except defer.TimeoutError:
        if ask.transport is not None:
            ask.transport.abortConnection()
        return False
    return answer == b"ok"
