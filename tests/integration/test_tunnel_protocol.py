"""TunnelProtocol over a real loopback socket and real TLS, and a pull producer driven by
the reactor's cooperator. (Memory pumps and a Clock: tests/unit/test_tunnel_protocol.py.)"""

import socket

import pytest_twisted
from twisted.internet.defer import Deferred, fail, gatherResults, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from zope.interface import implementer

from apptunnel.tunnel.errors import StreamRefused
from apptunnel.tunnel.frames import ErrorCode
from apptunnel.tunnel.endpoints import BULK_BUFFER, LOCAL_RECEIVE_BUFFER
from apptunnel.tunnel.protocol import RESUME_BATCH, TunnelProtocol
from tests.support.tunnel_pairs import Echo, Handler, Recorder, connect, make_pair


@implementer(IHalfCloseableProtocol)
class Sink(Protocol):
    """Server side of the bulk stream: counts bytes, reports the count on FIN."""

    def __init__(self):
        self.count = 0

    def dataReceived(self, data):
        self.count += len(data)

    def readConnectionLost(self):
        self.transport.write(b"%d" % self.count)
        self.transport.loseConnection()

    def writeConnectionLost(self):
        pass



@implementer(IPushProducer)
class BlobProducer:
    """Writes ``total`` bytes into a stream as fast as backpressure allows, then FINs."""

    def __init__(self, clock, stream, total, chunk=64 * 1024):
        self.clock, self.stream, self.left = clock, stream, total
        self.block = b"\xab" * chunk
        self.paused = False
        self.scheduled = False
        stream.registerProducer(self, True)
        self._schedule()

    def _schedule(self):
        if not self.scheduled:
            self.scheduled = True
            self.clock.callLater(0, self._produce)

    def _produce(self):
        self.scheduled = False
        while not self.paused and self.left > 0:
            n = min(self.left, len(self.block))
            self.left -= n
            self.stream.write(self.block[:n])
        if self.left == 0:
            self.stream.unregisterProducer()
            self.stream.loseWriteConnection()

    def pauseProducing(self):
        self.paused = True

    def resumeProducing(self):
        self.paused = False
        self._schedule()

    def stopProducing(self):
        self.left = 0


class Waiter(Recorder):
    def __init__(self):
        super().__init__()
        self.done = Deferred()
        self.arrived = None

    def dataReceived(self, data):
        super().dataReceived(data)
        if self.arrived is not None and not self.arrived.called:
            self.arrived.callback(None)

    def connectionLost(self, reason):
        super().connectionLost(reason)
        self.done.callback(None)


@pytest_twisted.inlineCallbacks
def test_real_tcp_bulk_stream_leaves_other_streams_responsive():
    """20 MiB through one stream over loopback TCP while an echo stream keeps answering."""
    from twisted.internet import reactor

    total = 20 * 1024 * 1024
    server_handler = Handler(lambda target: succeed(Sink() if target["app"] == "sink" else Echo()))
    servers = []

    def build():
        proto = TunnelProtocol(server_handler, reactor, initiator=False)
        servers.append(proto)
        return proto

    port = reactor.listenTCP(0, Factory.forProtocol(build), interface="127.0.0.1")
    client = TunnelProtocol(Handler(), reactor, initiator=True)
    try:
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        yield connectProtocol(endpoint, client).addTimeout(10, reactor)
        bulk = yield client.connect_stream({"app": "sink"}, Factory.forProtocol(Waiter)
                                           ).addTimeout(10, reactor)
        echo = yield client.connect_stream({"app": "echo"}, Factory.forProtocol(Waiter)
                                           ).addTimeout(10, reactor)
        start = reactor.seconds()
        BlobProducer(reactor, bulk.transport, total)
        worst = 0.0
        rounds = 0
        while not bulk.done.called:
            echo.arrived = Deferred()
            sent = reactor.seconds()
            echo.transport.write(b"ping")
            yield echo.arrived.addTimeout(5, reactor)
            worst = max(worst, reactor.seconds() - sent)
            rounds += 1
        yield bulk.done.addTimeout(60, reactor)
        elapsed = reactor.seconds() - start
        assert bulk.data == b"%d" % total
        assert bulk.lost.check(ConnectionDone)
        assert echo.data == b"ping" * rounds and rounds >= 2
        assert worst < 1.0, worst
        assert elapsed < 30, elapsed
    finally:
        client.transport.loseConnection()
        yield port.stopListening()
        for _ in range(100):
            if all(s._lost for s in servers) and client._lost:
                break
            d = Deferred()
            reactor.callLater(0.01, d.callback, None)
            yield d


@pytest_twisted.inlineCallbacks
def test_many_busy_streams_over_real_tcp_all_finish():
    """More busy streams than RESUME_BATCH over a real socket: the batches resumed turn by
    turn by the real reactor carry every stream to its end (none is left paused), the
    tunnel's socket reads and buffers BULK_BUFFER bytes, not Twisted's 64 KiB, and over
    loopback its kernel receive buffer is LOCAL_RECEIVE_BUFFER, not autotuned."""
    from twisted.internet import reactor

    count, total = 4 * RESUME_BATCH, 256 * 1024
    server_handler = Handler(lambda target: succeed(Sink()))
    servers = []

    def build():
        proto = TunnelProtocol(server_handler, reactor, initiator=False)
        servers.append(proto)
        return proto

    port = reactor.listenTCP(0, Factory.forProtocol(build), interface="127.0.0.1")
    client = TunnelProtocol(Handler(), reactor, initiator=True)
    try:
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        yield connectProtocol(endpoint, client).addTimeout(10, reactor)
        assert client.transport.bufferSize == BULK_BUFFER
        streams = yield gatherResults([
            client.connect_stream({"app": str(i)}, Factory.forProtocol(Waiter))
            for i in range(count)]).addTimeout(10, reactor)
        # Both ends are on this host: the kernel receive buffers are bounded (Linux doubles
        # SO_RCVBUF), not autotuned.
        for end in (client, servers[0]):
            assert end.transport.socket.getsockopt(
                socket.SOL_SOCKET, socket.SO_RCVBUF) == 2 * LOCAL_RECEIVE_BUFFER
        for proto in streams:
            BlobProducer(reactor, proto.transport, total)
        yield gatherResults([proto.done for proto in streams]).addTimeout(30, reactor)
        assert [proto.data for proto in streams] == [b"%d" % total] * count
    finally:
        client.transport.loseConnection()
        yield port.stopListening()
        for _ in range(100):
            if all(s._lost for s in servers) and client._lost:
                break
            d = Deferred()
            reactor.callLater(0.01, d.callback, None)
            yield d


@pytest_twisted.inlineCallbacks
def test_pull_producer_feeds_a_stream():
    """A non-streaming producer (FileSender) can write a file into a stream."""
    import io

    from twisted.internet import reactor
    from twisted.internet.task import deferLater
    from twisted.protocols.basic import FileSender

    client, server, _, sh, pump, _ = make_pair()
    proto = connect(pump, client, {"app": "x"})
    blob = bytes(range(256)) * 4000
    done = FileSender().beginFileTransfer(io.BytesIO(blob), proto.transport)
    for _ in range(2000):
        pump.flush()
        if done.called:
            break
        yield deferLater(reactor, 0.001, lambda: None)
    yield done.addTimeout(5, reactor)
    pump.flush()
    assert sh.protocols[0].data == blob


@pytest_twisted.ensureDeferred
async def test_go_away_and_close_finish_over_real_tls(tmp_path):
    """Over TLS, go_away and close end the connection (the tunnel lets go of the producer)."""
    from twisted.internet import reactor, ssl
    from twisted.internet.endpoints import SSL4ClientEndpoint, SSL4ServerEndpoint
    from twisted.internet.protocol import Factory

    from apptunnel.auth.ca import ClusterCA

    from twisted.internet import reactor as wall_clock
    ca = ClusterCA.load_or_create(str(tmp_path), "tls-test", wall_clock)
    cert, key = ca.issue_server_cert(["localhost"], ["127.0.0.1"], 3600)
    server_options = ssl.PrivateCertificate.loadPEM(cert + key).options()

    class Handler:
        def __init__(self):
            self.lost = Deferred()

        def tunnel_ready(self, tunnel):
            pass

        def control_received(self, tunnel, message):
            pass

        def stream_requested(self, tunnel, target):
            return fail(StreamRefused(ErrorCode.REFUSED, "no"))

        def tunnel_lost(self, tunnel, reason):
            self.lost.callback(None)

    for how in ("go_away", "close"):
        server, client = Handler(), Handler()
        port = await SSL4ServerEndpoint(reactor, 0, server_options, interface="127.0.0.1").listen(
            Factory.forProtocol(lambda: TunnelProtocol(server, reactor, initiator=False)))
        try:
            tunnel = await SSL4ClientEndpoint(
                reactor, "127.0.0.1", port.getHost().port, ssl.CertificateOptions()
            ).connect(Factory.forProtocol(lambda: TunnelProtocol(client, reactor, initiator=True)))
            if how == "go_away":
                tunnel.go_away("done")
            else:
                tunnel.close()
            both = gatherResults([server.lost, client.lost])
            await both.addTimeout(5, reactor)
        finally:
            await port.stopListening()

