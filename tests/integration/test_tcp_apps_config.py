"""The agent's dialer reaching a declared port of a multi-port TCP app on a real loopback
socket. (Config, hello, registry and port policy: tests/unit/test_tcp_apps_config.py.)"""

from __future__ import annotations

import pytest_twisted
from twisted.internet import defer, protocol, reactor

from apptunnel.agent.upstream import UpstreamDialer
from tests.support.tcp_apps import multi


@pytest_twisted.ensureDeferred
async def test_dialer_dials_the_requested_declared_port():
    """A declared port is dialed on the app's host."""
    server = reactor.listenTCP(0, protocol.Factory.forProtocol(protocol.Protocol),
                               interface="127.0.0.1")
    try:
        port = server.getHost().port
        dialer = UpstreamDialer(reactor, (multi(ports=((port, port),)),))
        d = dialer.stream_requested(None, {"app": "multi", "port": port})
        side = await d.addTimeout(5, reactor)
        assert side.peer.transport.getPeer().port == port
        side.peer.transport.abortConnection()
    finally:
        await defer.maybeDeferred(server.stopListening)
