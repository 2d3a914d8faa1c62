"""The TLS layer on ssl.SSLObject (apptunnel/tls/layer.py) against Twisted's own TLS client
(pyOpenSSL), over the bounded memory pump: no network, no clock."""

from __future__ import annotations

import os
import ssl as stdlib_ssl

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from twisted.internet import ssl
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IPushProducer, ISSLTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.test import iosim
from zope.interface import implementer

from apptunnel.auth.callers import peer_certificate
from apptunnel.proxy.limits import ConnectionTracker, LimitedFactory
from apptunnel.proxy.tls_switch import SwitchableTls
from apptunnel.config import LimitsConfig
from apptunnel.tls import contexts, layer
from apptunnel.tls.contexts import ServerTls, server_context
from apptunnel.tls.layer import TlsServerFactory, TlsProtocol
from apptunnel.tunnel.endpoints import bulk_buffers, no_delay
from tests.support.pump import Pump
from tests.support.tls_ends import App, Pki, tls_messages


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def web_ctx(pki) -> stdlib_ssl.SSLContext:
    """As the web port: client certificates requested, ALPN http/1.1, TLS 1.2+."""
    return server_context(pki.tls(alpn=("http/1.1",)))


@pytest.fixture
def logged():
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


# -- the two ends ----------------------------------------------------------------------------

def server_end(ctx: stdlib_ssl.SSLContext, app: Protocol | None = None) -> TlsProtocol:
    app = app or App()
    server = TlsServerFactory(lambda: ctx, Factory.forProtocol(lambda: app)).buildProtocol(None)
    server.app = app   # wrappedProtocol is let go at connectionLost
    return server


def client_end(pki: Pki, cert: tuple[bytes, bytes] | None = None, *, alpn=None,
               options=None, app: Protocol | None = None) -> TLSMemoryBIOProtocol:
    """Twisted's own TLS client (pyOpenSSL), without its timer-driven write batching."""
    if options is None:
        client_cert = ssl.PrivateCertificate.loadPEM(cert[0] + cert[1]) if cert else None
        options = ssl.optionsForClientTLS("localhost", trustRoot=ssl.Certificate.loadPEM(pki.ca.cert_pem),
                                          clientCertificate=client_cert, acceptableProtocols=alpn)
    app = app or App()
    factory = TLSMemoryBIOFactory(options, True, Factory.forProtocol(lambda: app), clock=Clock())
    factory.protocol = TLSMemoryBIOProtocol
    client = factory.buildProtocol(None)
    client.app = app
    return client


def connected(pki, ctx, cert=None, **kw) -> tuple[TlsProtocol, TLSMemoryBIOProtocol, Pump]:
    server, client = server_end(ctx), client_end(pki, cert, **kw)
    pump = Pump(client, server, chunk=16 * 1024)
    pump.flush()
    return server, client, pump


# -- handshake and data ----------------------------------------------------------------------

def test_handshake_with_twisted_client_and_data_both_ways(pki, web_ctx):
    """Twisted's pyOpenSSL client completes a handshake; bytes flow both ways unchanged."""
    server, client, pump = connected(pki, web_ctx)
    app, peer = server.app, client.app
    assert app.made == 1 and app.handshakes == 1
    client.write(b"GET / HTTP/1.1\r\n\r\n")
    pump.flush()
    assert app.data == b"GET / HTTP/1.1\r\n\r\n"
    server.write(b"HTTP/1.1 200 OK\r\n")
    server.writeSequence([b"Content-Length: 2\r\n\r\n", b"ok"])
    pump.flush()
    assert peer.data == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    assert ISSLTransport.providedBy(server)
    assert server.getPeer().port == 40001 and server.getHost().port == 3024


def test_large_writes_both_ways_arrive_whole(pki, web_ctx):
    """A 1 MiB write each way arrives byte for byte, over 16 KiB steps of the pump."""
    server, client, pump = connected(pki, web_ctx)
    up, down = os.urandom(1 << 20), os.urandom(1 << 20)
    client.write(up)
    server.write(down)
    pump.flush()
    assert server.app.data == up
    assert client.app.data == down


def test_one_write_is_encrypted_and_sent_in_one_transport_write(pki, web_ctx):
    """A write becomes one write to the TCP transport (no timer, no 16 KiB slicing)."""
    server, client, pump = connected(pki, web_ctx)
    writes = []
    tcp_write = server.transport.write
    server.transport.write = lambda data: (writes.append(len(data)), tcp_write(data))
    server.write(b"x" * 65536)
    server.writeSequence([b"a" * 100, b"b" * 100])
    assert len(writes) == 2 and writes[0] > 65536
    pump.flush()
    assert client.app.data == b"x" * 65536 + b"a" * 100 + b"b" * 100


def batching_server(pki, ctx) -> tuple[TlsProtocol, TLSMemoryBIOProtocol, Pump, Clock]:
    """A server end as the tunnel ports make it: a turn's writes leave together."""
    clock, app = Clock(), App()
    server = TlsServerFactory(lambda: ctx, Factory.forProtocol(lambda: app),
                              batch_clock=clock).buildProtocol(None)
    server.app = app
    client = client_end(pki)
    pump = Pump(client, server, chunk=16 * 1024)
    pump.flush()
    return server, client, pump, clock


def test_with_a_batch_clock_a_turns_writes_leave_together_at_its_end(pki, web_ctx):
    """Tunnel ports: many small writes in one reactor turn are one TCP write when the turn
    ends, in order; nothing is sent before."""
    server, client, pump, clock = batching_server(pki, web_ctx)
    writes = []
    tcp_write = server.transport.write
    server.transport.write = lambda data: (writes.append(len(data)), tcp_write(data))
    for i in range(20):
        server.write(b"frame %02d;" % i)
    server.writeSequence([b"a", b"b"])
    assert writes == []
    clock.advance(0)
    assert len(writes) == 1
    clock.advance(0)
    assert len(writes) == 1   # one timer per batch, not per write
    pump.flush()
    assert client.app.data == b"".join(b"frame %02d;" % i for i in range(20)) + b"ab"


def test_a_batch_of_batch_limit_leaves_at_once_and_the_rest_at_the_turns_end(pki, web_ctx):
    """A turn that writes BATCH_LIMIT or more sends it without waiting (the TCP transport's
    backpressure then applies), and what follows waits for the turn's end."""
    server, client, pump, clock = batching_server(pki, web_ctx)
    writes = []
    tcp_write = server.transport.write
    server.transport.write = lambda data: (writes.append(len(data)), tcp_write(data))
    server.write(b"x" * (layer.BATCH_LIMIT - 10))
    assert writes == []
    server.write(b"y" * 10)
    assert len(writes) == 1 and writes[0] > layer.BATCH_LIMIT
    server.write(b"z")
    assert len(writes) == 1
    clock.advance(0)
    assert len(writes) == 2
    pump.flush()
    assert client.app.data == b"x" * (layer.BATCH_LIMIT - 10) + b"y" * 10 + b"z"


def test_a_batch_goes_before_the_close_notify_and_an_abort_drops_it(pki, web_ctx):
    """loseConnection sends the waiting batch, then close_notify; abortConnection drops
    it and cancels its timer."""
    server, client, pump, clock = batching_server(pki, web_ctx)
    server.write(b"last words")
    server.loseConnection()
    pump.flush()
    assert client.app.data == b"last words"
    assert client.app.lost.check(ConnectionDone)
    assert clock.getDelayedCalls() == []

    server, client, pump, clock = batching_server(pki, web_ctx)
    server.write(b"never sent")
    server.abortConnection()
    assert clock.getDelayedCalls() == []
    pump.flush()
    assert client.app.data == b""


def test_reads_take_every_record_of_one_delivery(pki, web_ctx):
    """Several records in one TCP read all reach the wrapped protocol in that dataReceived."""
    server, client, pump = connected(pki, web_ctx)
    for i in range(5):
        client.write(b"%d" % i * 40000)   # 3 records each
    data = pump.client_transport.take(1 << 22)
    server.dataReceived(data)
    assert server.app.data == b"".join(b"%d" % i * 40000 for i in range(5))


def test_the_records_of_one_read_are_handed_over_in_one_call(pki, web_ctx):
    """Four records of one TCP read are one dataReceived (one pass through the relay above,
    not four), and what arrives in a later read is another."""
    server, client, pump = connected(pki, web_ctx)
    server.app.received.clear()
    client.write(b"a" * 60000)   # 4 records
    server.dataReceived(pump.client_transport.take(1 << 22))
    client.write(b"b" * 100)
    server.dataReceived(pump.client_transport.take(1 << 22))
    assert server.app.received == [b"a" * 60000, b"b" * 100]


def test_one_call_hands_over_at_most_max_delivery(pki, web_ctx):
    """A read holding more than MAX_DELIVERY of plaintext comes up in pieces of at most that."""
    server, client, pump = connected(pki, web_ctx)
    server.app.received.clear()
    total = 2 * layer.MAX_DELIVERY + 5000
    client.write(b"z" * total)
    server.dataReceived(pump.client_transport.take(1 << 23))
    sizes = [len(chunk) for chunk in server.app.received]
    assert sum(sizes) == total and len(sizes) == 3
    assert max(sizes) <= layer.MAX_DELIVERY + layer.MAX_RECORD


def test_data_before_a_close_notify_in_the_same_read_arrives_first(pki, web_ctx):
    server, client, pump = connected(pki, web_ctx)
    server.app.received.clear()
    client.write(b"q" * 40000)
    client.loseConnection()
    server.dataReceived(pump.client_transport.take(1 << 22))
    assert server.app.received == [b"q" * 40000]
    pump.flush()
    assert server.app.lost.check(ConnectionDone)


def test_good_records_before_a_corrupt_one_in_the_same_read_arrive_then_it_fails(pki, web_ctx, logged):
    server, client, pump = connected(pki, web_ctx)
    server.app.received.clear()
    client.write(b"good" * 100)
    good = pump.client_transport.take(1 << 20)
    client.write(b"x" * 100)
    bad = bytearray(pump.client_transport.take(1 << 20))
    bad[-5] ^= 0xFF
    server.dataReceived(good + bytes(bad))
    pump.flush()
    assert server.app.data == b"good" * 100
    assert server.app.lost.check(stdlib_ssl.SSLError)
    assert len(tls_messages(logged)) == 1


def test_a_protocol_that_aborts_on_data_gets_nothing_more_of_that_read(pki, web_ctx):
    """The wrapped protocol aborts in dataReceived: the rest of the read is not handed up."""
    class Aborting(App):
        def dataReceived(self, data):
            super().dataReceived(data)
            self.transport.abortConnection()

    app = Aborting()
    server, client = server_end(web_ctx, app), client_end(pki)
    pump = Pump(client, server, chunk=16 * 1024)
    pump.flush()
    client.write(b"1" * (layer.MAX_DELIVERY + 20000))
    server.dataReceived(pump.client_transport.take(1 << 23))
    assert len(app.received) == 1


def test_a_record_split_byte_by_byte_is_delivered_once_complete(pki, web_ctx):
    """Ciphertext fed a byte at a time yields the plaintext once, when its record is whole."""
    server, client, pump = connected(pki, web_ctx)
    client.write(b"hello")
    data = pump.client_transport.take(1 << 20)
    for i in range(len(data) - 1):
        server.dataReceived(data[i:i + 1])
    assert server.app.data == b""
    server.dataReceived(data[-1:])
    assert server.app.data == b"hello"


def test_writes_before_the_handshake_are_held_then_sent(pki, web_ctx):
    """What the wrapped protocol writes at connectionMade leaves after the handshake,
    before what it writes once told the handshake is done."""
    class Greeter(App):
        def connectionMade(self):
            self.transport.write(b"hello before handshake")

        def handshakeCompleted(self):
            self.transport.write(b", and after")

    server = server_end(web_ctx, Greeter())
    client = client_end(pki)
    pump = Pump(client, server)
    pump.flush()
    assert client.app.data == b"hello before handshake, and after"


# -- closing ---------------------------------------------------------------------------------

def test_lose_connection_sends_queued_data_then_close_notify(pki, web_ctx):
    """loseConnection after a large write: the client reads all of it, then a clean close
    (close_notify) on both ends; writes after it are dropped."""
    server, client, pump = connected(pki, web_ctx)
    body = os.urandom(300_000)
    server.write(body)
    server.loseConnection()
    server.write(b"dropped")
    pump.flush()
    assert client.app.data == body
    assert client.app.lost.check(ConnectionDone)
    assert server.app.lost.check(ConnectionDone)


def test_lose_connection_waits_for_the_producer_to_unregister(pki, web_ctx):
    """With a producer registered, loseConnection waits; writes go on until it unregisters."""
    server, client, pump = connected(pki, web_ctx)
    producer = Producer()
    server.registerProducer(producer, True)
    server.loseConnection()
    server.write(b"still streaming")
    pump.flush()
    assert client.app.data == b"still streaming"
    assert client.app.lost is None
    server.unregisterProducer()
    pump.flush()
    assert client.app.lost.check(ConnectionDone)


def test_close_waits_for_the_peers_close_notify_and_still_reads(pki, web_ctx):
    """After our close_notify the connection stays until the peer answers; what the peer
    sends meanwhile is still delivered (Twisted's layer did the same)."""
    server = server_end(web_ctx)
    client = client_end(pki)
    client_tcp, server_tcp = iosim.makeFakeClient(client), iosim.makeFakeServer(server)
    pump = iosim.connect(server, server_tcp, client, client_tcp, greet=False)
    pump.flush()
    client.write(b"early")
    pump.flush()
    # The client's close_notify answer is what ends it: Twisted's client answers at once.
    server.loseConnection()
    assert not server_tcp.disconnecting   # close_notify sent, the answer not yet read
    pump.flush()
    assert server.app.data == b"early"
    assert server.app.lost.check(ConnectionDone)


def test_peer_close_notify_is_a_clean_end(pki, web_ctx):
    """The peer's close_notify: data before it delivered, then ConnectionDone."""
    server, client, pump = connected(pki, web_ctx)
    client.write(b"last words")
    client.loseConnection()
    pump.flush()
    assert server.app.data == b"last words"
    assert server.app.lost.check(ConnectionDone)


def test_peer_closing_tcp_without_close_notify_is_connection_lost(pki, web_ctx):
    """A half-open end: TCP closed under TLS (no close_notify): what came before is
    delivered, then ConnectionLost, as Twisted's layer reports a truncated stream."""
    server, client, pump = connected(pki, web_ctx)
    client.write(b"cut off")
    pump.client_transport.loseConnection()   # a bare FIN under the client's TLS
    pump.flush()
    assert server.app.data == b"cut off"
    assert server.app.lost.check(ConnectionLost)


def test_abort_drops_everything_and_reports_aborted(pki, web_ctx):
    """abortConnection: the TCP transport is aborted, nothing more is read or written."""
    server, client, pump = connected(pki, web_ctx)
    client.write(b"in flight")
    server.abortConnection()
    server.write(b"never sent")
    server.dataReceived(pump.client_transport.take(1 << 20))
    assert pump.server_transport.aborted
    pump.flush()
    assert server.app.data == b""
    assert server.app.lost.check(ConnectionAborted)
    assert client.app.data == b""


def test_closing_is_the_layers_own_state_not_the_tcp_transports(pki, web_ctx):
    """``disconnecting`` is answered by the layer, not forwarded to the TCP transport."""
    server = server_end(web_ctx)
    client = client_end(pki)
    pump = Pump(client, server)
    assert server.disconnecting is False
    pump.server_transport.disconnecting = True
    assert server.disconnecting is False
    pump.server_transport.disconnecting = False
    pump.flush()
    client.write(b"hello")
    pump.flush()
    assert server.app.data == b"hello"


def test_lose_connection_before_the_handshake_aborts(pki, web_ctx):
    """Nothing can be said before a handshake that may never come: abort at once."""
    server = server_end(web_ctx)
    pump = Pump(App(), server)
    server.loseConnection()
    assert pump.server_transport.aborted


# -- refusals --------------------------------------------------------------------------------

def test_garbage_before_the_handshake_is_one_log_line_and_a_close(pki, web_ctx, logged):
    """Plain HTTP on the TLS port: logged once with the reason, closed, no exception."""
    server = server_end(web_ctx)
    peer = App()
    pump = Pump(peer, server)
    server.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    server.dataReceived(b"more garbage")   # ignored
    pump.flush()
    assert pump.closed
    lines = tls_messages(logged)
    assert len(lines) == 1 and "handshake failed" in lines[0] and "127.0.0.1:40001" in lines[0]
    assert "http request" in lines[0]
    assert server.app.lost.check(stdlib_ssl.SSLError)
    assert server.app.data == b""


def test_garbage_after_the_handshake_is_one_log_line_and_a_close(pki, web_ctx, logged):
    """A corrupted record after the handshake: logged once, closed with the TLS error."""
    server, client, pump = connected(pki, web_ctx)
    client.write(b"x" * 100)
    record = bytearray(pump.client_transport.take(1 << 20))
    record[-5] ^= 0xFF
    server.dataReceived(bytes(record) + b"\x17\x03\x03\x00\x10" + b"\0" * 16)
    pump.flush()
    assert pump.closed
    lines = tls_messages(logged)
    assert len(lines) == 1 and "TLS connection failed" in lines[0]
    assert server.app.lost.check(stdlib_ssl.SSLError)
    assert server.app.data == b""


def test_a_required_client_certificate_that_is_missing_fails_the_handshake(pki, logged):
    """require_client_cert: a client without a certificate never reaches the app."""
    ctx = server_context(pki.tls(require_client_cert=True, minimum_version=stdlib_ssl.TLSVersion.TLSv1_3))
    server, client, pump = connected(pki, ctx)
    client.write(b"hello")
    pump.flush()
    assert server.app.data == b"" and server.app.handshakes == 0
    assert server.app.lost is not None
    assert len(tls_messages(logged)) == 1


def test_an_optional_client_certificate_may_be_missing(pki, web_ctx):
    """The web port requests but does not require a certificate: browsers get in."""
    server, client, pump = connected(pki, web_ctx)
    client.write(b"hello")
    pump.flush()
    assert server.app.data == b"hello"
    assert server.getPeerCertificate() is None


def test_a_client_certificate_of_another_ca_fails_the_handshake(pki, web_ctx, logged):
    """A certificate offered must chain to a trusted CA, even where it is optional."""
    server, client, pump = connected(pki, web_ctx, pki.stranger)
    client.write(b"hello")
    pump.flush()
    assert server.app.data == b"" and server.app.handshakes == 0
    lines = tls_messages(logged)
    assert len(lines) == 1 and "certificate" in lines[0]


def test_tls_12_is_refused_where_13_is_the_minimum_and_taken_on_the_web_port(pki, web_ctx):
    """The tunnel's minimum (1.3) holds; the web port takes 1.2."""
    tls12 = ssl.CertificateOptions(lowerMaximumSecurityTo=ssl.TLSVersion.TLSv1_2)
    tunnel = server_context(pki.tls(minimum_version=stdlib_ssl.TLSVersion.TLSv1_3))
    server, client, pump = connected(pki, tunnel, options=tls12)
    assert server.app.handshakes == 0 and pump.closed
    server, client, pump = connected(pki, web_ctx, options=tls12)
    client.write(b"hello")
    pump.flush()
    assert server.app.data == b"hello"
    assert server.getHandle().version() == "TLSv1.2"


# -- what the wrapped protocol asks ----------------------------------------------------------

def test_peer_certificate_is_returned_and_read_once(pki, web_ctx, monkeypatch):
    """getPeerCertificate gives the verified x509.Certificate, parsed once per connection;
    the proxy's callers read it as they did pyOpenSSL's."""
    server, client, pump = connected(pki, web_ctx, pki.client)
    loads = []
    real = x509.load_der_x509_certificate
    monkeypatch.setattr(x509, "load_der_x509_certificate",
                        lambda der: (loads.append(1), real(der))[1])
    cert = server.getPeerCertificate()
    assert isinstance(cert, x509.Certificate)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "host-1"
    assert server.getPeerCertificate() is cert
    assert peer_certificate(server) is cert
    assert len(loads) == 1


def test_alpn_picks_http11_when_the_client_also_offers_h2(pki, web_ctx):
    """A client offering h2 and http/1.1 (curl, browsers) gets http/1.1 and a handshake."""
    server, client, pump = connected(pki, web_ctx, alpn=[b"h2", b"http/1.1"])
    assert server.negotiatedProtocol == b"http/1.1"
    assert client.negotiatedProtocol == b"http/1.1"
    server2, _, _ = connected(pki, web_ctx)
    assert server2.negotiatedProtocol is None   # no ALPN offered: none chosen


def test_helpers_reach_the_tcp_transport_through_the_layer(pki, web_ctx):
    """no_delay (attribute forwarding) and the walkers of ``.transport`` reach TCP."""
    server = server_end(web_ctx)
    client = client_end(pki)
    server_tcp = iosim.makeFakeServer(server)
    iosim.connect(server, server_tcp, client, iosim.makeFakeClient(client))
    assert server.transport is server_tcp
    calls = []
    server_tcp.setTcpNoDelay = calls.append
    no_delay(server)
    assert calls == [True]
    bulk_buffers(server)   # no socket below: left alone, nothing raised


# -- flow control ----------------------------------------------------------------------------

@implementer(IPushProducer)
class Producer:
    def __init__(self) -> None:
        self.events: list[str] = []

    def pauseProducing(self) -> None:
        self.events.append("pause")

    def resumeProducing(self) -> None:
        self.events.append("resume")

    def stopProducing(self) -> None:
        self.events.append("stop")


def test_producer_is_paused_when_tcp_is_full_and_resumed_when_it_drains(pki, web_ctx):
    """The app's streaming producer follows the TCP transport's buffer."""
    server, client, pump = connected(pki, web_ctx)
    producer = Producer()
    server.registerProducer(producer, True)
    server.write(b"z" * 300_000)   # over the pump's 256 KiB high water
    assert producer.events == ["pause"]
    pump.flush()
    assert producer.events == ["pause", "resume"]
    assert client.app.data == b"z" * 300_000
    server.unregisterProducer()
    assert pump.server_transport.producer is None


def test_producer_is_held_until_the_handshake_and_tcp_pauses_do_not_undo_it(pki, web_ctx):
    """Writes held before the handshake pause the producer; a TCP pause/resume in between
    does not resume it early; the handshake does, once."""
    server = server_end(web_ctx)
    client = client_end(pki)
    pump = Pump(client, server)
    producer = Producer()
    server.registerProducer(producer, True)
    server.write(b"early")
    assert producer.events == ["pause"]
    gate = pump.server_transport.producer
    gate.pauseProducing()
    gate.resumeProducing()
    assert producer.events == ["pause"]
    pump.flush()
    assert producer.events == ["pause", "resume"]
    assert client.app.data == b"early"


def test_pausing_the_tls_transport_pauses_reading_from_tcp(pki, web_ctx):
    """The wrapped protocol pausing its transport stops reads on the TCP connection."""
    server, client, pump = connected(pki, web_ctx)
    server.pauseProducing()
    assert pump.server_transport.reading_paused
    client.write(b"waits")
    pump.flush()
    assert server.app.data == b""
    server.resumeProducing()
    pump.flush()
    assert server.app.data == b"waits"


def test_a_pull_producer_is_served_by_the_tcp_transport(pki, web_ctx):
    """A non-streaming producer is asked for data by the TCP transport as before."""
    server = server_end(web_ctx)
    client = client_end(pki)
    server_tcp = iosim.makeFakeServer(server)
    pump = iosim.connect(server, server_tcp, client, iosim.makeFakeClient(client))
    pump.flush()

    class Pull:
        def __init__(self):
            self.asked = 0

        def resumeProducing(self):
            self.asked += 1
            server.write(b"chunk%d " % self.asked)
            if self.asked == 3:
                server.unregisterProducer()
                server.loseConnection()

        def stopProducing(self):
            pass

    pull = Pull()
    server.registerProducer(pull, False)
    assert pull.asked == 1 and server_tcp.producer is pull
    pump.flush()
    assert client.app.data == b"chunk1 chunk2 chunk3 "
    assert client.app.lost.check(ConnectionDone)


# -- contexts per accept ---------------------------------------------------------------------

def test_context_switched_between_two_accepts(pki):
    """SwitchableTls: the next accept shows the new certificate, an open connection keeps
    the old context and still works; a bad replacement fails at replace()."""
    switch = SwitchableTls(pki.tls())
    factory = TlsServerFactory(switch.context, Factory.forProtocol(App))
    first_server = factory.buildProtocol(None)
    first_client = client_end(pki)
    first = Pump(first_client, first_server)
    first.flush()
    switch.replace(ServerTls(pki.cert2, pki.key2, (pki.ca.cert_pem,), (pki.ca.cert_pem,)))
    second_server = factory.buildProtocol(None)
    second_client = client_end(pki)
    Pump(second_client, second_server).flush()

    def shown(client) -> bytes:
        return client.getPeerCertificate().to_cryptography().public_bytes(serialization.Encoding.PEM)

    assert shown(first_client) == pki.cert
    assert shown(second_client) == pki.cert2
    first_client.write(b"old context")
    first.flush()
    assert first_server.wrappedProtocol.data == b"old context"
    with pytest.raises(stdlib_ssl.SSLError):
        switch.replace(ServerTls(pki.cert, pki.key2))   # the key does not fit
    third = factory.buildProtocol(None)
    third_client = client_end(pki)
    Pump(third_client, third).flush()
    assert shown(third_client) == pki.cert2


def test_limits_sit_inside_the_layer_and_hear_the_handshake(pki, web_ctx):
    """LimitedFactory inside the TLS factory: idle until the handshake, then busy; its
    handshake deadline is cancelled by the layer's handshakeCompleted."""
    clock = Clock()
    tracker = ConnectionTracker(LimitsConfig(), clock)
    factory = TlsServerFactory(lambda: web_ctx, LimitedFactory(Factory.forProtocol(App), tracker))
    from twisted.internet.address import IPv4Address
    server = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40001))
    client = client_end(pki)
    pump = Pump(client, server)
    limited = server.wrappedProtocol
    assert limited.is_idle() and clock.getDelayedCalls()
    pump.flush()
    assert not limited.is_idle() and not clock.getDelayedCalls()
    assert peer_certificate(limited) is None and ISSLTransport.providedBy(limited)


# -- contexts ----------------------------------------------------------------------------------

def test_server_context_matches_the_record(pki):
    """Verification, ALPN, version floor and no session tickets, as the record says."""
    ctx = server_context(pki.tls(alpn=("http/1.1",), require_client_cert=True,
                                 minimum_version=stdlib_ssl.TLSVersion.TLSv1_3))
    assert ctx.verify_mode == stdlib_ssl.CERT_REQUIRED
    assert ctx.minimum_version == stdlib_ssl.TLSVersion.TLSv1_3
    assert ctx.options & stdlib_ssl.OP_NO_TICKET and ctx.num_tickets == 0
    assert server_context(ServerTls(pki.cert, pki.key)).verify_mode == stdlib_ssl.CERT_NONE
    assert "BEGIN" not in repr(pki.tls())


def test_key_files_are_private_and_removed_without_memfd(pki, monkeypatch, tmp_path):
    """Where memfd_create is missing, the PEMs go through 0600 files in a private folder
    that is gone afterwards."""
    monkeypatch.delattr(os, "memfd_create", raising=False)
    monkeypatch.setattr(contexts.tempfile, "tempdir", str(tmp_path))
    seen = []
    real = stdlib_ssl.SSLContext.load_cert_chain

    def spy(self, certfile, keyfile=None, password=None):
        seen.append((os.stat(certfile).st_mode & 0o777, os.stat(os.path.dirname(keyfile)).st_mode & 0o777))
        return real(self, certfile, keyfile, password)

    monkeypatch.setattr(stdlib_ssl.SSLContext, "load_cert_chain", spy)
    server_context(pki.tls())
    assert seen == [(0o600, 0o700)]
    assert os.listdir(tmp_path) == []
    with pytest.raises(stdlib_ssl.SSLError):
        server_context(ServerTls(pki.cert, pki.key2))
    assert os.listdir(tmp_path) == []
