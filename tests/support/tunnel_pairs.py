"""Two TunnelProtocols joined by an in-memory Pump (tests/support/pump.py), with handlers
that accept streams, for unit tests of the tunnel, the pool and stream retries and the
integration tests that run the same protocol over real sockets.

`make_pair` gives a client and a server with recording `Handler`s (the app "echo" is an
`Echo`, any other a `Recorder`); `connect` opens a stream and pumps it open. `tunnel_pair`
gives a proxy side and an agent side whose `Side` handler accepts every stream, for `APP`.
No sockets: unit tests use these."""

from __future__ import annotations

from twisted.internet.defer import succeed
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock

from apptunnel.catalog import AppInfo
from apptunnel.tunnel.protocol import TunnelProtocol
from tests.support.pump import Pump


class Echo(Protocol):
    def dataReceived(self, data):
        self.transport.write(data)


class Recorder(Protocol):
    """Keeps what arrives; optionally starts paused."""

    def __init__(self, paused=False):
        self.chunks, self.lost, self.paused = [], None, paused

    def connectionMade(self):
        if self.paused:
            self.transport.pauseProducing()

    def dataReceived(self, data):
        self.chunks.append(data)

    def connectionLost(self, reason):
        self.lost = reason

    @property
    def data(self):
        return b"".join(self.chunks)


class Handler:
    """A TunnelHandler that records everything and answers opens via ``respond``."""

    def __init__(self, respond=None):
        self.ready, self.controls, self.requests, self.lost = [], [], [], []
        self.protocols = []
        self.respond = respond or self._default

    def _default(self, target):
        proto = Echo() if target.get("app") == "echo" else Recorder()
        self.protocols.append(proto)
        return succeed(proto)

    def tunnel_ready(self, tunnel):
        self.ready.append(tunnel)

    def control_received(self, tunnel, message):
        self.controls.append(message)

    def stream_requested(self, tunnel, target):
        self.requests.append(target)
        return self.respond(target)

    def tunnel_lost(self, tunnel, reason):
        self.lost.append(reason)


def make_pair(clock=None, server_handler=None, **kw):
    clock = clock or Clock()
    ch, sh = Handler(), server_handler or Handler()
    client = TunnelProtocol(ch, clock, initiator=True, **kw)
    server = TunnelProtocol(sh, clock, initiator=False, **kw)
    return client, server, ch, sh, Pump(client, server), clock


def result_of(d):
    out = []
    d.addBoth(out.append)
    assert out, "Deferred has not fired"
    return out[0]


def connect(pump, client, target, proto=None):
    d = client.connect_stream(target, Factory.forProtocol(lambda: proto or Recorder()))
    pump.flush()
    return result_of(d)


APP = AppInfo(name="echo", uri="http://127.0.0.1:9", public_addr="echo.apptunnel.localhost")


class Side:
    """A tunnel handler that accepts every stream and remembers its target."""

    def __init__(self):
        self.opened = []

    def tunnel_ready(self, tunnel):
        pass

    def control_received(self, tunnel, message):
        pass

    def stream_requested(self, tunnel, target):
        self.opened.append(target)
        return succeed(Protocol())

    def tunnel_lost(self, tunnel, reason):
        pass


def tunnel_pair(clock):
    agent_handler = Side()
    agent = TunnelProtocol(agent_handler, clock, initiator=True)
    proxy = TunnelProtocol(Side(), clock, initiator=False)
    return proxy, agent, agent_handler, Pump(agent, proxy)


def outcome(d):
    box = []
    d.addBoth(box.append)
    return box
