"""The agent's upstream dialer: app lookup, refusals, and the byte relay to a real socket."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor, task
from twisted.internet.error import ConnectionLost
from twisted.python.failure import Failure
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.testing import StringTransport
from zope.interface import implementer
from twisted.internet import reactor as wall_clock

from apptunnel.agent.upstream import UpstreamDialer
from apptunnel.tunnel.relay import RelayEnd
from apptunnel.config import AppConfig
from apptunnel.tunnel.errors import StreamRefused
from apptunnel.tunnel.frames import ErrorCode
from tests.support.tunnel_pairs import Echo

WAIT = 5.0


def app(name: str, uri: str) -> AppConfig:
    return AppConfig(name=name, uri=uri, labels={}, public_addr=None)


@implementer(IHalfCloseableProtocol)
class ReplyOnFin(protocol.Protocol):
    """Collects what it gets; on FIN answers with the byte count and closes."""

    def connectionMade(self):
        self.got = b""

    def dataReceived(self, data):
        self.got += data

    def readConnectionLost(self):
        self.transport.write(b"got %d" % len(self.got))
        self.transport.loseConnection()

    def writeConnectionLost(self):
        pass


class FakeStream(StringTransport):
    """A memory stand-in for the tunnel stream side (records half close)."""

    def __init__(self):
        super().__init__()
        self.write_closed = False
        self.aborted = False

    def loseWriteConnection(self):
        self.write_closed = True

    def abortConnection(self):
        self.aborted = True
        self.disconnecting = True


@pytest.fixture
def listen():
    ports = []

    def start(proto_class) -> int:
        port = reactor.listenTCP(0, protocol.Factory.forProtocol(proto_class), interface="127.0.0.1")
        ports.append(port)
        return port.getHost().port

    yield start
    for port in ports:
        port.stopListening()


async def until(predicate, what: str) -> None:
    """Poll the real reactor until `predicate()` is true, failing after WAIT seconds."""
    deadline = reactor.seconds() + WAIT
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await task.deferLater(reactor, 0.01)


async def refused(d) -> StreamRefused:
    d.addTimeout(WAIT, reactor)
    with pytest.raises(StreamRefused) as info:
        await d
    return info.value


@pytest_twisted.ensureDeferred
async def test_unknown_app_refused():
    """A target naming no configured app is refused with UNKNOWN_TARGET."""
    dialer = UpstreamDialer(reactor, (app("web", "http://127.0.0.1:1"),))
    for target in ({"app": "other"}, {}, {"app": 7}, "web"):
        err = await refused(dialer.stream_requested(None, target))
        assert err.code == ErrorCode.UNKNOWN_TARGET


@pytest_twisted.ensureDeferred
async def test_app_down_connect_failed():
    """A port nobody listens on is refused with CONNECT_FAILED naming the socket error."""
    port = reactor.listenTCP(0, protocol.Factory.forProtocol(Echo), interface="127.0.0.1")
    number = port.getHost().port
    await port.stopListening()
    dialer = UpstreamDialer(reactor, (app("web", f"http://127.0.0.1:{number}"),))
    err = await refused(dialer.stream_requested(None, {"app": "web"}))
    assert err.code == ErrorCode.CONNECT_FAILED
    assert err.reason == "connection refused"


@pytest_twisted.ensureDeferred
async def test_connect_timeout_is_connect_failed():
    """A dial that never completes (blackholed address) is refused after the timeout."""
    dialer = UpstreamDialer(reactor, (app("web", "http://192.0.2.1:80"),), connect_timeout=0.2)
    err = await refused(dialer.stream_requested(None, {"app": "web"}))
    assert err.code == ErrorCode.CONNECT_FAILED
    assert err.reason == "connection timed out"


@pytest_twisted.ensureDeferred
async def test_cancel_passes_through():
    """Cancelling the dial (tunnel gave up) is a plain cancellation, not a refusal."""
    dialer = UpstreamDialer(reactor, (app("web", "http://192.0.2.1:80"),), connect_timeout=5)
    d = dialer.stream_requested(None, {"app": "web"})
    d.cancel()
    with pytest.raises(defer.CancelledError):
        await d


@pytest_twisted.ensureDeferred
async def test_relay_both_ways_with_producers(listen):
    """Bytes flow stream->app->stream, and each side is the other's push producer."""
    port = listen(Echo)
    dialer = UpstreamDialer(reactor, (app("web", f"http://localhost:{port}"),))
    d = dialer.stream_requested(None, {"app": "web", "user": "alice"})
    side = await d.addTimeout(WAIT, reactor)
    assert isinstance(side, RelayEnd)
    stream = FakeStream()
    side.makeConnection(stream)
    upstream = side.peer
    assert stream.producer is upstream.transport and stream.streaming
    assert upstream.transport.producer is stream
    side.dataReceived(b"hello ")
    side.dataReceived(b"world")
    await until(lambda: stream.value() == b"hello world", "echo")
    side.connectionLost(protocol.connectionDone)
    await until(lambda: upstream.transport is None or not upstream.transport.connected,
                "upstream close")


@pytest_twisted.ensureDeferred
async def test_half_close_both_ways(listen):
    """The stream's FIN half-closes the app socket; the app's answer and FIN come back."""
    port = listen(ReplyOnFin)
    dialer = UpstreamDialer(reactor, (app("web", f"http://127.0.0.1:{port}"),))
    side = await dialer.stream_requested(None, {"app": "web"}).addTimeout(WAIT, reactor)
    stream = FakeStream()
    side.makeConnection(stream)
    side.dataReceived(b"x" * 1000)
    side.readConnectionLost()
    await until(lambda: stream.disconnecting or stream.write_closed, "app's FIN")
    assert stream.value() == b"got 1000"
    assert not stream.aborted


@pytest_twisted.ensureDeferred
async def test_stream_reset_aborts_upstream(listen):
    """A stream that ends with an error aborts the app connection."""
    port = listen(Echo)
    dialer = UpstreamDialer(reactor, (app("web", f"http://127.0.0.1:{port}"),))
    side = await dialer.stream_requested(None, {"app": "web"}).addTimeout(WAIT, reactor)
    stream = FakeStream()
    side.makeConnection(stream)
    upstream = side.peer
    side.connectionLost(Failure(ConnectionLost("reset")))
    await until(lambda: not upstream.transport.connected, "abort")


@pytest_twisted.ensureDeferred
async def test_upstream_close_finishes_stream(listen):
    """When the app closes, its FIN half-closes the stream (no reset); the stream's end closes it."""

    class CloseAfterHi(protocol.Protocol):
        def connectionMade(self):
            self.transport.write(b"hi")
            self.transport.loseConnection()

    port = listen(CloseAfterHi)
    dialer = UpstreamDialer(reactor, (app("web", f"http://127.0.0.1:{port}"),))
    side = await dialer.stream_requested(None, {"app": "web"}).addTimeout(WAIT, reactor)
    stream = FakeStream()
    side.makeConnection(stream)
    upstream = side.peer
    await until(lambda: stream.write_closed, "stream half close")
    assert stream.value() == b"hi"
    assert not stream.aborted and not stream.disconnecting
    side.connectionLost(Failure(protocol.connectionDone.value))
    await until(lambda: not upstream.transport.connected, "app socket closed")


@pytest.fixture
def tls_listen(tmp_path):
    """An https echo app on loopback with a certificate from a private CA."""
    from twisted.internet import ssl

    from apptunnel.auth.ca import ClusterCA

    ca = ClusterCA.load_or_create(str(tmp_path / "appca"), "apps", wall_clock)
    cert, key = ca.issue_server_cert(["localhost"], ["127.0.0.1"], 3600)
    options = ssl.PrivateCertificate.loadPEM(cert + key).options()
    port = reactor.listenSSL(0, protocol.Factory.forProtocol(Echo), options, interface="127.0.0.1")
    yield port.getHost().port
    port.stopListening()


@pytest_twisted.ensureDeferred
async def test_https_app_unverified_is_connect_failed(tls_listen):
    """An https app whose certificate is not trusted is refused with the TLS reason."""
    dialer = UpstreamDialer(reactor, (app("web", f"https://localhost:{tls_listen}"),))
    err = await refused(dialer.stream_requested(None, {"app": "web"}))
    assert err.code == ErrorCode.CONNECT_FAILED
    assert "certificate" in err.reason.lower() or "tls" in err.reason.lower()


@pytest_twisted.ensureDeferred
async def test_https_app_insecure_skip_verify_relays(tls_listen):
    """With insecure_skip_verify an https app with a private certificate is relayed."""
    config = AppConfig(name="web", uri=f"https://localhost:{tls_listen}", labels={},
                       public_addr=None, insecure_skip_verify=True)
    dialer = UpstreamDialer(reactor, (config,))
    side = await dialer.stream_requested(None, {"app": "web"}).addTimeout(WAIT, reactor)
    stream = FakeStream()
    side.makeConnection(stream)
    side.dataReceived(b"over tls")
    await until(lambda: stream.value() == b"over tls", "the TLS echo")
    side.connectionLost(Failure(protocol.connectionDone.value))


@implementer(IHalfCloseableProtocol)
class RecordEnd(protocol.Protocol):
    """An app that records how the agent's side ended: a FIN, or a reset."""

    endings: list = []

    def readConnectionLost(self):
        RecordEnd.endings.append("fin")
        self.transport.loseConnection()

    def writeConnectionLost(self):
        pass

    def connectionLost(self, reason):
        if not RecordEnd.endings or RecordEnd.endings[-1] != "fin":
            RecordEnd.endings.append(type(reason.value).__name__)


@pytest.mark.parametrize("reason, ending", [
    (Failure(protocol.connectionDone.value), "fin"),
    (Failure(ConnectionLost("stream reset by peer (CANCEL)")), "ConnectionLost"),
])
@pytest_twisted.ensureDeferred
async def test_a_clean_stream_end_is_a_fin_to_the_app_and_a_reset_is_a_reset(listen, reason, ending):
    """The app's real socket sees a FIN when the stream ended cleanly, a reset only on a reset."""
    RecordEnd.endings = []
    port = listen(RecordEnd)
    dialer = UpstreamDialer(reactor, (app("web", f"http://127.0.0.1:{port}"),))
    side = await dialer.stream_requested(None, {"app": "web"}).addTimeout(WAIT, reactor)
    stream = FakeStream()
    side.makeConnection(stream)
    side.dataReceived(b"GET / HTTP/1.1\r\n\r\n")
    side.connectionLost(reason)
    await until(lambda: RecordEnd.endings, "the app to see the end")
    assert RecordEnd.endings == [ending]  # ConnectionLost: ECONNRESET, no FIN before it
