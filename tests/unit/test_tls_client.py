"""The TLS layer in client mode (apptunnel/tls/layer.py, ``server_side=False``), as the
agent's tunnel dials: against our own server end and against Twisted's pyOpenSSL server,
over the bounded memory pump: no network, no clock."""

from __future__ import annotations

import os
import ssl as stdlib_ssl

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from twisted.internet import ssl
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.interfaces import IPushProducer, ISSLTransport
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from zope.interface import implementer

from apptunnel.agent.join import AgentIdentity
from apptunnel.agent.service import _TunnelContexts
from apptunnel.tls.contexts import ClientTls, ServerTls, client_context, server_context
from apptunnel.tls.layer import (TlsClientEndpoint, TlsClientFactory, TlsProtocol, TlsServerFactory,
                                 client_failure)
from apptunnel.tunnel.protocol import TunnelProtocol
from tests.support.pump import Pump
from tests.support.tls_ends import App, Pki, tls_messages

TLS13 = stdlib_ssl.TLSVersion.TLSv1_3


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tunnel_ctx(pki) -> stdlib_ssl.SSLContext:
    """As the proxy's tunnel port: TLS 1.3, client certificates requested and verified."""
    return server_context(pki.tls(minimum_version=TLS13))


@pytest.fixture
def logged():
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def agent_tls(pki, cert=None, trusted=None) -> ClientTls:
    """What the agent's tunnel presents and trusts (AgentIdentity.tunnel_tls)."""
    cert, key = cert or pki.client
    return ClientTls(trusted_cas=trusted or (pki.ca.cert_pem,), cert_pem=cert, key_pem=key,
                     minimum_version=TLS13)


def our_client(tls: ClientTls, host: str = "localhost", app=None,
               clock: Clock | None = None) -> TlsProtocol:
    app = app or App()
    client = TlsClientFactory(client_context(tls), host, Factory.forProtocol(lambda: app),
                              batch_clock=clock).buildProtocol(None)
    client.app = app   # wrappedProtocol is let go at connectionLost
    return client


def our_server(ctx: stdlib_ssl.SSLContext, app=None) -> TlsProtocol:
    app = app or App()
    server = TlsServerFactory(lambda: ctx, Factory.forProtocol(lambda: app)).buildProtocol(None)
    server.app = app
    return server


def twisted_server(pki, cert=None, app=None) -> TLSMemoryBIOProtocol:
    """Twisted's pyOpenSSL server requiring a client certificate of the cluster CA, TLS 1.3
    (it sends session tickets after the handshake, which our client must read past)."""
    cert, key = cert or (pki.cert, pki.key)
    options = ssl.CertificateOptions(
        privateKey=ssl.PrivateCertificate.loadPEM(cert + key).privateKey.original,
        certificate=ssl.Certificate.loadPEM(cert).original, verify=True,
        requireCertificate=True, caCerts=[ssl.Certificate.loadPEM(pki.ca.cert_pem).original],
        raiseMinimumTo=ssl.TLSVersion.TLSv1_3)
    app = app or App()
    factory = TLSMemoryBIOFactory(options, False, Factory.forProtocol(lambda: app), clock=Clock())
    factory.protocol = TLSMemoryBIOProtocol   # no timer-driven write batching
    server = factory.buildProtocol(None)
    server.app = app
    return server


def joined(client, server) -> Pump:
    pump = Pump(client, server, chunk=16 * 1024)
    pump.flush()
    return pump


def subject_cn(cert: x509.Certificate) -> str:
    return cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


# -- handshake and data, against both servers -----------------------------------------------

@pytest.mark.parametrize("server_kind", ["ours", "twisted"])
def test_handshake_data_both_ways_and_the_client_certificate(pki, tunnel_ctx, server_kind):
    """Our client completes a handshake (the ClientHello sent at makeConnection), presents
    its certificate, which the server sees, and sees the server's; bytes flow both ways."""
    client = our_client(agent_tls(pki))
    server = our_server(tunnel_ctx) if server_kind == "ours" else twisted_server(pki)
    pump = Pump(client, server, chunk=16 * 1024)
    assert pump.client_transport.buffered   # the ClientHello, before anything was received
    pump.flush()
    assert client.app.made == 1 and client.app.handshakes == 1
    assert ISSLTransport.providedBy(client)
    client.write(b"hello from the agent")
    pump.flush()
    assert server.app.data == b"hello from the agent"
    server.write(b"hello from the proxy")
    pump.flush()
    assert client.app.data == b"hello from the proxy"
    seen = server.getPeerCertificate()
    seen = seen.to_cryptography() if hasattr(seen, "to_cryptography") else seen
    assert subject_cn(seen) == "host-1"
    shown = client.getPeerCertificate()
    assert isinstance(shown, x509.Certificate)
    assert shown.public_bytes(serialization.Encoding.PEM) == pki.cert
    assert client.getHandle().version() == "TLSv1.3"


def test_large_writes_both_ways_arrive_whole(pki, tunnel_ctx):
    """A 1 MiB write each way between our two ends arrives byte for byte."""
    client, server = our_client(agent_tls(pki)), our_server(tunnel_ctx)
    pump = joined(client, server)
    up, down = os.urandom(1 << 20), os.urandom(1 << 20)
    client.write(up)
    server.write(down)
    pump.flush()
    assert server.app.data == up and client.app.data == down


def test_writes_before_the_handshake_are_held_and_the_producer_paused(pki, tunnel_ctx):
    """As the agent's tunnel: a producer registered and a hello written at connectionMade;
    held (producer paused) until the server is verified, then sent and resumed once."""
    @implementer(IPushProducer)
    class Producer:
        def __init__(self):
            self.events = []

        def pauseProducing(self):
            self.events.append("pause")

        def resumeProducing(self):
            self.events.append("resume")

        def stopProducing(self):
            self.events.append("stop")

    producer = Producer()

    class Hello(App):
        def connectionMade(self):
            self.transport.registerProducer(producer, True)
            self.transport.write(b"hello")

    client, server = our_client(agent_tls(pki), app=Hello()), our_server(tunnel_ctx)
    pump = Pump(client, server)
    assert producer.events == ["pause"]
    pump.flush()
    assert producer.events == ["pause", "resume"]
    assert server.app.data == b"hello"


def test_the_agents_tunnel_protocol_over_our_client_and_server(pki, tunnel_ctx):
    """TunnelProtocol (initiator) over our client end: its hello, sent in tunnel_ready before
    the handshake, arrives; the proxy side's answer comes back; each side reads the other's
    certificate through peer_certificate (a cryptography x509.Certificate)."""
    class Handler:
        def __init__(self, hello=None):
            self.hello, self.controls, self.lost = hello, [], []

        def tunnel_ready(self, tunnel):
            if self.hello is not None:
                tunnel.send_control(self.hello)

        def control_received(self, tunnel, message):
            self.controls.append(message)
            if message.get("type") == "hello":
                tunnel.send_control({"type": "hello_ok"})

        def stream_requested(self, tunnel, target):
            raise AssertionError("no streams here")

        def tunnel_lost(self, tunnel, reason):
            self.lost.append(reason)

    clock = Clock()
    agent, proxy = Handler({"type": "hello", "host_id": "host-1"}), Handler()
    agent_tunnel = TunnelProtocol(agent, clock, initiator=True)
    proxy_tunnel = TunnelProtocol(proxy, clock, initiator=False)
    client = TlsClientFactory(client_context(agent_tls(pki)), "localhost",
                              Factory.forProtocol(lambda: agent_tunnel),
                              batch_clock=clock).buildProtocol(None)
    server = TlsServerFactory(lambda: tunnel_ctx, Factory.forProtocol(lambda: proxy_tunnel),
                              batch_clock=clock).buildProtocol(None)
    pump = Pump(client, server)
    for _ in range(5):
        pump.flush()
        clock.advance(0)
    assert proxy.controls == [{"type": "hello", "host_id": "host-1"}]
    assert agent.controls == [{"type": "hello_ok"}]
    assert subject_cn(proxy_tunnel.peer_certificate) == "host-1"
    assert agent_tunnel.peer_certificate.public_bytes(serialization.Encoding.PEM) == pki.cert
    assert agent.lost == [] and proxy.lost == []


# -- refusals --------------------------------------------------------------------------------

def refused(pki, client, server, logged, text: str) -> None:
    """The client refused the server: closed, nothing delivered either way (what the client
    wrote was held and is dropped), and no log line of the client's own (its peer is
    127.0.0.1:3024; our server logs the alert it got): its owner says it, from the reason
    it gets, which ``client_failure`` turns into the one line naming why."""
    client.write(b"never sent")
    pump = joined(client, server)
    assert pump.closed
    assert [line for line in tls_messages(logged) if "127.0.0.1:3024" in line] == []
    assert client.app.handshakes == 0
    assert client.app.lost.check(stdlib_ssl.SSLCertVerificationError)
    line = client_failure(client.app.lost.value, "the proxy")
    assert line.startswith("the proxy's certificate was refused: ") and text in line, line
    assert server.app.data == b"" and client.app.data == b""


@pytest.mark.parametrize("server_kind", ["ours", "twisted"])
def test_a_server_certificate_of_another_ca_is_refused(pki, logged, server_kind):
    """The proxy's certificate must chain to the agent's trusted CA(s), not just any CA."""
    foreign_cert, foreign_key = pki.foreign
    if server_kind == "ours":
        server = our_server(server_context(ServerTls(
            foreign_cert, foreign_key, client_cas=(pki.ca.cert_pem,), minimum_version=TLS13)))
    else:
        server = twisted_server(pki, pki.foreign)
    refused(pki, our_client(agent_tls(pki)), server, logged, "unable to get local issuer")


def test_a_server_trusted_only_by_another_ca_set_is_refused(pki, tunnel_ctx, logged):
    """A client trusting only the other CA refuses our cluster's proxy (whose chain ends in
    the cluster CA: a self-signed root the client does not trust)."""
    client = our_client(agent_tls(pki, trusted=(pki.other.cert_pem,)))
    refused(pki, client, our_server(tunnel_ctx), logged, "self-signed certificate in certificate chain")


@pytest.mark.parametrize("server_kind", ["ours", "twisted"])
def test_a_certificate_not_naming_the_host_is_refused(pki, tunnel_ctx, logged, server_kind):
    """A valid certificate of the right CA, for another name, is refused (hostname check)."""
    server = our_server(tunnel_ctx) if server_kind == "ours" else twisted_server(pki)
    refused(pki, our_client(agent_tls(pki), host="proxy.example.com"), server, logged,
            "hostname mismatch")


def test_an_ip_host_is_checked_against_the_ip_sans(pki, tunnel_ctx, logged):
    """Dialled by address: the certificate's IP SAN must hold it (127.0.0.1 is in it,
    127.0.0.2 is not, and a certificate with only DNS names does not name any address)."""
    client = our_client(agent_tls(pki), host="127.0.0.1")
    pump = joined(client, our_server(tunnel_ctx))
    client.write(b"by address")
    pump.flush()
    assert client.app.handshakes == 1
    refused(pki, our_client(agent_tls(pki), host="127.0.0.2"), our_server(tunnel_ctx),
            logged, "ip address mismatch")
    del logged[:]
    dns_cert, dns_key = pki.dns_only
    dns_only = server_context(ServerTls(dns_cert, dns_key, client_cas=(pki.ca.cert_pem,),
                                        minimum_version=TLS13))
    refused(pki, our_client(agent_tls(pki), host="127.0.0.1"), our_server(dns_only), logged,
            "ip address mismatch")


def test_sni_names_the_host_and_is_not_sent_for_an_address(pki):
    """By name the server is told the name dialled (SNI); by address no SNI is sent."""
    names = []
    ctx = server_context(pki.tls(minimum_version=TLS13))
    ctx.sni_callback = lambda tls, name, context: names.append(name)
    joined(our_client(agent_tls(pki), host="localhost"), our_server(ctx))
    joined(our_client(agent_tls(pki), host="127.0.0.1"), our_server(ctx))
    assert names == ["localhost", None]


def test_a_client_certificate_the_server_refuses_closes_the_client(pki, logged):
    """Our server requires a cluster certificate; a stranger's is refused there (one line,
    the server's), the client hears the alert and closes; nothing reaches the server's app."""
    ctx = server_context(pki.tls(require_client_cert=True, minimum_version=TLS13))
    client, server = our_client(agent_tls(pki, cert=pki.stranger)), our_server(ctx)
    client.write(b"hello")
    pump = joined(client, server)
    assert pump.closed and server.app.data == b""
    assert client.app.lost is not None and client.app.lost.check(stdlib_ssl.SSLError)
    assert [line for line in tls_messages(logged) if "127.0.0.1:3024" in line] == []
    assert client_failure(client.app.lost.value, "the proxy").startswith("TLS with the proxy failed: ")


def test_garbage_from_the_server_is_a_close_with_openssls_reason(pki, logged):
    """Plain text where a ServerHello should be: closed, no exception into the reactor, no
    line of the client's own; the reason its owner gets names OpenSSL's verdict."""
    client = our_client(agent_tls(pki))
    peer = App()
    pump = Pump(client, peer)
    client.dataReceived(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    client.dataReceived(b"more garbage")   # ignored
    pump.flush()
    assert pump.closed
    assert tls_messages(logged) == []
    assert client.app.lost.check(stdlib_ssl.SSLError) and client.app.data == b""
    assert client_failure(client.app.lost.value, "the proxy") == \
        "TLS with the proxy failed: wrong version number"


def test_garbage_after_the_handshake_is_a_close_with_the_tls_error(pki, tunnel_ctx, logged):
    """A corrupted record from the server after the handshake: closed, the owner told why."""
    client, server = our_client(agent_tls(pki)), our_server(tunnel_ctx)
    pump = joined(client, server)
    server.write(b"x" * 100)
    record = bytearray(pump.server_transport.take(1 << 20))
    record[-5] ^= 0xFF
    client.dataReceived(bytes(record))
    pump.flush()
    assert pump.closed
    assert [line for line in tls_messages(logged) if "127.0.0.1:3024" in line] == []
    assert client.app.lost.check(stdlib_ssl.SSLError) and client.app.data == b""
    assert client_failure(client.app.lost.value, "the proxy").startswith("TLS with the proxy failed: ")


# -- closing ---------------------------------------------------------------------------------

@pytest.mark.parametrize("server_kind", ["ours", "twisted"])
def test_lose_connection_sends_what_was_written_then_close_notify(pki, tunnel_ctx, server_kind):
    """The client's loseConnection: its data, then close_notify; a clean end on both sides."""
    client = our_client(agent_tls(pki))
    server = our_server(tunnel_ctx) if server_kind == "ours" else twisted_server(pki)
    pump = joined(client, server)
    body = os.urandom(200_000)
    client.write(body)
    client.loseConnection()
    client.write(b"dropped")
    pump.flush()
    assert server.app.data == body
    assert server.app.lost.check(ConnectionDone)
    assert client.app.lost.check(ConnectionDone)


def test_the_servers_close_notify_is_a_clean_end_for_the_client(pki, tunnel_ctx):
    """The server closes: the client reads what came before, answers, ConnectionDone."""
    client, server = our_client(agent_tls(pki)), our_server(tunnel_ctx)
    pump = joined(client, server)
    server.write(b"go away")
    server.loseConnection()
    pump.flush()
    assert client.app.data == b"go away"
    assert client.app.lost.check(ConnectionDone)
    assert server.app.lost.check(ConnectionDone)


def test_abort_drops_everything(pki, tunnel_ctx):
    """abortConnection: the TCP transport is aborted, nothing written is sent."""
    client, server = our_client(agent_tls(pki)), our_server(tunnel_ctx)
    pump = joined(client, server)
    client.write(b"never sent")
    client.abortConnection()
    assert pump.client_transport.aborted
    pump.flush()
    assert server.app.data == b""
    assert client.app.lost.check(ConnectionAborted)


def test_an_abort_at_connection_made_sends_no_client_hello(pki):
    """A protocol that aborts in connectionMade (the agent's stand-in during shutdown):
    no handshake is started."""
    class Closed(App):
        def connectionMade(self):
            self.transport.abortConnection()

    client = our_client(agent_tls(pki), app=Closed())
    pump = Pump(client, App())
    assert pump.client_transport.aborted and pump.client_transport.written == 0


# -- batching ----------------------------------------------------------------------------------

def test_with_a_batch_clock_the_clients_writes_leave_together_at_the_turns_end(pki, tunnel_ctx):
    """The agent's tunnel: a turn's frames are one TCP write when the turn ends, in order."""
    clock = Clock()
    client, server = our_client(agent_tls(pki), clock=clock), our_server(tunnel_ctx)
    pump = joined(client, server)
    writes = []
    tcp_write = client.transport.write
    client.transport.write = lambda data: (writes.append(len(data)), tcp_write(data))
    for i in range(20):
        client.write(b"frame %02d;" % i)
    assert writes == []
    clock.advance(0)
    assert len(writes) == 1
    pump.flush()
    assert server.app.data == b"".join(b"frame %02d;" % i for i in range(20))
    client.write(b"last")
    client.loseConnection()   # the batch goes before the close_notify
    pump.flush()
    assert server.app.data.endswith(b"last") and server.app.lost.check(ConnectionDone)
    assert clock.getDelayedCalls() == []


# -- the endpoint -------------------------------------------------------------------------------

class FakeEndpoint:
    """A client endpoint whose connections are memory transports the test pumps."""

    def __init__(self, server_factory) -> None:
        self._server_factory = server_factory
        self.pumps: list[Pump] = []

    def connect(self, factory) -> Deferred:
        protocol = factory.buildProtocol(None)
        self.pumps.append(Pump(protocol, self._server_factory(), chunk=16 * 1024))
        return succeed(protocol)


def test_the_endpoint_asks_for_the_context_at_each_connect(pki, tunnel_ctx):
    """TlsClientEndpoint: a context per connect (a renewed certificate shows on the next
    connection), the Deferred gives the wrapped protocol."""
    shown = [agent_tls(pki), agent_tls(pki, cert=pki.stranger)]
    asked = []

    def contexts():
        asked.append(1)
        return client_context(shown[len(asked) - 1])

    seen = []

    def server():
        app = App()
        seen.append(app)
        return TlsServerFactory(lambda: tunnel_ctx, Factory.forProtocol(lambda: app)).buildProtocol(None)

    below = FakeEndpoint(server)
    endpoint = TlsClientEndpoint(below, contexts, "localhost")
    results = []
    endpoint.connect(Factory.forProtocol(App)).addCallback(results.append)
    below.pumps[0].flush()
    assert len(asked) == 1 and isinstance(results[0], App) and results[0].handshakes == 1
    endpoint.connect(Factory.forProtocol(App)).addCallback(results.append)
    below.pumps[1].flush()
    assert len(asked) == 2
    first = below.pumps[0].server.getPeerCertificate()
    assert first.public_bytes(serialization.Encoding.PEM) == pki.client[0]
    assert results[1].lost is not None   # the stranger's certificate was refused


def test_a_context_that_cannot_be_made_is_an_errback(pki):
    """An endpoint never raises: a bad certificate fails the connect's Deferred."""
    def contexts():
        return client_context(ClientTls(trusted_cas=(pki.ca.cert_pem,), cert_pem=pki.cert,
                                        key_pem=pki.key2))   # the key does not fit

    failures = []
    TlsClientEndpoint(FakeEndpoint(App), contexts, "localhost").connect(
        Factory.forProtocol(App)).addErrback(failures.append)
    assert failures and failures[0].check(stdlib_ssl.SSLError)


def test_cancelling_the_connect_cancels_the_dial_below(pki):
    """cancel() reaches the endpoint below (HostnameEndpoint's attempt)."""
    cancelled = []

    class Pending:
        def connect(self, factory):
            return Deferred(lambda d: cancelled.append(1))

    d = TlsClientEndpoint(Pending(), lambda: client_context(agent_tls(pki)), "localhost").connect(
        Factory.forProtocol(App))
    d.addErrback(lambda f: None)
    d.cancel()
    assert cancelled == [1]


# -- contexts ----------------------------------------------------------------------------------

def test_client_context_verifies_the_server_with_the_trusted_cas_only(pki):
    """CERT_REQUIRED, hostname checked, only the given CAs (no system store), the version
    floor, no tickets; the record's repr has no key."""
    ctx = client_context(agent_tls(pki, trusted=(pki.ca.cert_pem, pki.other.cert_pem)))
    assert ctx.verify_mode == stdlib_ssl.CERT_REQUIRED and ctx.check_hostname
    assert ctx.minimum_version == TLS13
    assert ctx.options & stdlib_ssl.OP_NO_TICKET
    assert len(ctx.get_ca_certs()) == 2
    assert "BEGIN" not in repr(agent_tls(pki))
    with pytest.raises(ValueError):
        client_context(ClientTls(trusted_cas=()))
    with pytest.raises(ValueError):
        client_context(ClientTls(trusted_cas=(pki.ca.cert_pem,), cert_pem=pki.cert))


def test_the_agents_tunnel_context_follows_its_identity(pki):
    """_TunnelContexts: the same context while the identity is unchanged, a new one after
    a renewal or a new trust set; TLS 1.3 and the identity's trusted CAs."""
    cert, key = pki.client
    me = AgentIdentity("host-1", key, cert, pki.ca.cert_pem)

    class Service:
        identity = me

    contexts = _TunnelContexts(Service)
    first = contexts()
    assert contexts() is first
    assert first.minimum_version == TLS13 and len(first.get_ca_certs()) == 1
    Service.identity = AgentIdentity("host-1", key, cert, pki.ca.cert_pem,
                                     trusted=(pki.ca.cert_pem, pki.other.cert_pem))
    second = contexts()
    assert second is not first and len(second.get_ca_certs()) == 2


def test_a_client_that_does_not_verify_trusts_no_ca(pki):
    """verify=False with CAs (given or the system's) is refused: a record must not seem to
    pin what it does not check. The record's repr says which trust it has."""
    with pytest.raises(ValueError):
        client_context(ClientTls(trusted_cas=(pki.ca.cert_pem,), verify=False))
    with pytest.raises(ValueError):
        client_context(ClientTls(trusted_cas=(), system_cas=True, verify=False))
    shown = repr(ClientTls(trusted_cas=(), system_cas=True))
    assert "system_cas=True" in shown and "verify=True" in shown


# -- trust beyond given CAs (proxy app's logins) ------------------------------------------------

def test_a_client_that_does_not_verify_takes_any_server_and_shows_its_certificate(pki, logged):
    """verify=False (a login made with --insecure): a certificate of another CA, naming
    another host, is taken, over TLS 1.2 or later; the client certificate is still shown."""
    cert, key = pki.client
    tls = ClientTls(trusted_cas=(), cert_pem=cert, key_pem=key, verify=False)
    ctx = client_context(tls)
    assert ctx.verify_mode == stdlib_ssl.CERT_NONE and not ctx.check_hostname
    assert ctx.minimum_version == stdlib_ssl.TLSVersion.TLSv1_2
    foreign_cert, foreign_key = pki.foreign
    server = our_server(server_context(ServerTls(foreign_cert, foreign_key,
                                                 client_cas=(pki.ca.cert_pem,))))
    client = our_client(tls, host="proxy.example.com")
    pump = joined(client, server)
    client.write(b"hello")
    pump.flush()
    assert client.app.handshakes == 1 and server.app.data == b"hello"
    assert subject_cn(server.getPeerCertificate()) == "host-1"
    assert tls_messages(logged) == []


def test_system_cas_trust_the_systems_store(pki, tmp_path, monkeypatch, logged):
    """system_cas loads the system's store (load_default_certs; SSL_CERT_FILE relocates
    it): a server of a CA found only there is taken with it, refused without it."""
    store = tmp_path / "system.pem"
    store.write_bytes(pki.other.cert_pem)
    monkeypatch.setenv("SSL_CERT_FILE", str(store))
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path / "no-such-dir"))
    system = ClientTls(trusted_cas=(), system_cas=True)
    assert client_context(system).cert_store_stats()["x509_ca"] == 1
    foreign_cert, foreign_key = pki.foreign

    def foreign_server() -> TlsProtocol:
        return our_server(server_context(ServerTls(foreign_cert, foreign_key,
                                                   chain=(pki.other.cert_pem,))))

    client = our_client(system)
    joined(client, foreign_server())
    assert client.app.handshakes == 1
    refused(pki, our_client(ClientTls(trusted_cas=(pki.ca.cert_pem,))), foreign_server(),
            logged, "self-signed certificate in certificate chain")
