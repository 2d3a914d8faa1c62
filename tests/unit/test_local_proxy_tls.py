"""`proxy app`'s TLS to the proxy (apptunnel/local_proxy.py on apptunnel/tls): what each
trust mode of a login accepts, the one line a refused certificate gives, and the
multiplexed connection's batched writes; on a memory reactor and the bounded pump, no
network, no clock."""

from __future__ import annotations

import socket
import ssl as stdlib_ssl

import pytest
from cryptography.x509.oid import NameOID
from twisted.internet import tcp
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from apptunnel.cli.profile import Profile
from apptunnel.local_proxy import (TRUST_INSECURE, TRUST_PINNED, TRUST_SYSTEM, LocalProxy,
                                   LocalProxyError, check, proxy_tls)
from apptunnel.tls.contexts import ServerTls, server_context
from apptunnel.tls.layer import TlsServerFactory
from apptunnel.tunnel.frames import FrameDecoder, Open
from tests.support.pump import Pump
from tests.support.tls_ends import App, Pki

DRY_RUN_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nApptunnel-Mux: 1\r\n\r\ntcp\n"
SWITCHED = (b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
            b"Upgrade: apptunnel-mux\r\n\r\n")


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def system_store(pki, tmp_path, monkeypatch):
    """The system's trust store is the other CA alone (SSL_CERT_FILE, an empty
    SSL_CERT_DIR): a proxy with a certificate of it stands for a publicly trusted one."""
    store = tmp_path / "system.pem"
    store.write_bytes(pki.other.cert_pem)
    (tmp_path / "certs").mkdir()
    monkeypatch.setenv("SSL_CERT_FILE", str(store))
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path / "certs"))


def login(pki, trust: str, ca_pem: bytes | None = None, host: str = "localhost") -> Profile:
    cert, key = pki.client
    return Profile(proxy=f"{host}:3024", trust=trust, cert_pem=cert, key_pem=key, ca_pem=ca_pem)


def web_port(pki, which: str) -> stdlib_ssl.SSLContext:
    """The proxy's web port (TLS 1.2+, client certificates of the cluster CA asked for),
    with a certificate of the cluster CA, one of it naming no address, or one of the other."""
    cert, key = {"cluster": (pki.cert, pki.key), "dns-only": pki.dns_only,
                 "other": pki.foreign}[which]
    chain = pki.other.cert_pem if which == "other" else pki.ca.cert_pem
    return server_context(ServerTls(cert, key, chain=(chain,), client_cas=(pki.ca.cert_pem,)))


def answered_by(reactor: MemoryReactorClock, ctx: stdlib_ssl.SSLContext, app: Protocol) -> Pump:
    """The last connection the reactor was asked to dial, joined to a TLS server."""
    host, port, factory = reactor.tcpClients[-1][:3]
    client = factory.buildProtocol(IPv4Address("TCP", host, port))
    server = TlsServerFactory(lambda: ctx, Factory.forProtocol(lambda: app)).buildProtocol(None)
    pump = Pump(client, server, chunk=16 * 1024)
    pump.flush()
    return pump


class DryRunAnswer(App):
    """The proxy's side of a dry run: yes, and close; records the client's certificate."""

    shown = None

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        if b"\r\n\r\n" in self.data and self.shown is None:
            self.shown = self.transport.getPeerCertificate()
            self.transport.write(DRY_RUN_ANSWER)
            self.transport.loseConnection()


def dry_run(pki, profile: Profile, server: str) -> tuple[str, DryRunAnswer]:
    """``check`` against the web port: the app's kind, or the one line it raised."""
    reactor = MemoryReactorClock()
    proxy = LocalProxy(reactor, lambda: profile, "db", None, [].append)
    outcome = []
    Deferred.fromCoroutine(check(proxy)).addBoth(outcome.append)
    app = DryRunAnswer()
    if reactor.tcpClients:
        answered_by(reactor, web_port(pki, server), app)
    (result,) = outcome
    if isinstance(result, Failure):
        result.trap(LocalProxyError)
        return result.value.message, app
    return result, app


# -- the trust modes ----------------------------------------------------------------------

def test_each_trust_mode_is_one_client_record(pki):
    """pinned: every CA of ca.crt and nothing else; insecure: no check and no CA; any other
    (system): the system's store. Each presents the login's certificate, TLS 1.2+, no ALPN."""
    pinned = proxy_tls(login(pki, TRUST_PINNED, pki.ca.cert_pem + pki.other.cert_pem))
    assert len(pinned.trusted_cas) == 2 and pinned.verify and not pinned.system_cas
    insecure = proxy_tls(login(pki, TRUST_INSECURE))
    assert insecure.trusted_cas == () and not insecure.verify and not insecure.system_cas
    system = proxy_tls(login(pki, TRUST_SYSTEM))
    assert system.trusted_cas == () and system.verify and system.system_cas
    for tls in (pinned, insecure, system):
        assert (tls.cert_pem, tls.key_pem) == pki.client
        assert tls.minimum_version == stdlib_ssl.TLSVersion.TLSv1_2 and tls.alpn == ()


REFUSED = "the proxy's certificate was refused: "


@pytest.mark.parametrize("trust, ca_crt, server, host, outcome", [
    (TRUST_PINNED, "cluster", "cluster", "localhost", "tcp"),
    (TRUST_PINNED, "both", "other", "localhost", "tcp"),            # a host-CA rotation
    (TRUST_PINNED, "cluster", "other", "localhost", REFUSED + "self-signed certificate in"),
    (TRUST_PINNED, "cluster", "cluster", "127.0.0.2", REFUSED + "ip address mismatch"),
    (TRUST_PINNED, "cluster", "dns-only", "localhost", "tcp"),   # the name, not 127.0.0.1
    (TRUST_SYSTEM, None, "other", "localhost", "tcp"),
    (TRUST_SYSTEM, None, "cluster", "localhost", REFUSED + "self-signed certificate in"),
    (TRUST_SYSTEM, None, "other", "127.0.0.2", REFUSED + "ip address mismatch"),
    (TRUST_INSECURE, None, "other", "127.0.0.2", "tcp"),
    (TRUST_INSECURE, None, "cluster", "localhost", "tcp"),
])
def test_what_each_trust_mode_accepts(pki, system_store, trust, ca_crt, server, host, outcome):
    """A verified mode takes a proxy whose certificate chains to its CAs and names the host
    dialled, else the dry run's one line says the certificate was refused and why; insecure
    takes any. The login's certificate is shown in every mode."""
    ca_pem = {"cluster": pki.ca.cert_pem, "both": pki.ca.cert_pem + pki.other.cert_pem,
              None: None}[ca_crt]
    said, app = dry_run(pki, login(pki, trust, ca_pem, host), server)
    assert said.startswith(outcome), said
    if outcome == "tcp":
        assert app.shown.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "host-1"
    else:
        assert app.data == b""   # nothing was sent to a proxy we do not trust


def test_without_the_system_store_the_system_mode_refuses(pki, tmp_path, monkeypatch):
    """The system mode trusts what SSL_CERT_FILE names, nothing of its own: with the cluster
    CA there, the cluster's proxy is taken; with an empty store, refused."""
    store = tmp_path / "system.pem"
    store.write_bytes(pki.ca.cert_pem)
    monkeypatch.setenv("SSL_CERT_FILE", str(store))
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path))
    assert dry_run(pki, login(pki, TRUST_SYSTEM), "cluster")[0] == "tcp"
    store.write_bytes(b"")
    said = dry_run(pki, login(pki, TRUST_SYSTEM), "cluster")[0]
    assert said.startswith(REFUSED), said


def test_a_ca_crt_that_cannot_be_read_is_one_line(pki):
    """A pinned login whose ca.crt holds no certificate: the saved login cannot be used."""
    said, _ = dry_run(pki, login(pki, TRUST_PINNED, b"not a certificate\n"), "cluster")
    assert said.startswith("cannot use the saved login: "), said


# -- the multiplexed connection -------------------------------------------------------------

class MuxEnd(App):
    """The proxy's side of the mux upgrade: 101, then the tunnel frames that arrive."""

    def __init__(self) -> None:
        super().__init__()
        self.frames: list = []
        self._decoder: FrameDecoder | None = None

    def dataReceived(self, data: bytes) -> None:
        if self._decoder is not None:
            self.frames += self._decoder.feed(data)
            return
        super().dataReceived(data)
        head, sep, rest = self.data.partition(b"\r\n\r\n")
        if sep:
            self.transport.write(SWITCHED)
            self._decoder = FrameDecoder()
            self.frames += self._decoder.feed(rest)


def test_the_multiplexed_connection_sends_a_turns_frames_in_one_write(pki):
    """The run's one connection carries a frame per stream: five local connections that
    arrived in one turn are opened in one TLS write at the turn's end (as the agent's
    tunnel), not one write each."""
    reactor = MemoryReactorClock()
    login_ = login(pki, TRUST_PINNED, pki.ca.cert_pem)
    proxy = LocalProxy(reactor, lambda: login_, "db", None, [].append)
    profile = proxy.profile()
    for _ in range(5):
        proxy.open_stream(profile, Factory.forProtocol(Protocol))
    end = MuxEnd()
    pump = answered_by(reactor, web_port(pki, "cluster"), end)
    writes = []
    tcp_write = pump.client_transport.write
    pump.client_transport.write = lambda data: (writes.append(len(data)), tcp_write(data))
    pump.flush()
    assert end.data.startswith(b"GET /v1/tcp/db HTTP/1.1\r\n")
    assert end.frames == [] and writes == []   # the opens wait for the turn's end
    reactor.advance(0)
    pump.flush()
    assert len(writes) == 1
    assert [type(frame) for frame in end.frames].count(Open) == 5


def test_the_other_connections_send_at_once(pki):
    """The dry run and an older proxy's connection per local connection carry one
    client's bytes: a write leaves at once, with no reactor turn to wait for."""
    reactor = MemoryReactorClock()
    profile = login(pki, TRUST_PINNED, pki.ca.cert_pem)
    proxy = LocalProxy(reactor, lambda: profile, "db", None, [].append)
    client = App()
    proxy.endpoint(profile).connect(Factory.forProtocol(lambda: client))
    server = App()
    pump = answered_by(reactor, web_port(pki, "cluster"), server)
    client.transport.write(b"right away")
    pump.flush()
    assert server.data == b"right away"


def test_a_local_connection_sends_at_once_and_without_nagle():
    """The local client's socket is write-through (no epoll_ctl and reactor pass per relayed
    chunk) with TCP_NODELAY, as the agent's sockets to its apps are."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = socket.create_connection(listener.getsockname())
    ours, _ = listener.accept()
    listener.close()
    reactor = MemoryReactorClock()
    proxy = LocalProxy(reactor, lambda: None, "db", None, [].append, kind="http")
    conn = tcp.Connection(ours, proxy.buildProtocol(None), reactor)
    conn.connected = 1
    conn.protocol.makeConnection(conn)   # no login: the 401 answer is the first write
    try:
        assert ours.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        # The memory reactor never calls doWrite: what arrived was sent by write() itself.
        client.settimeout(5)
        assert client.recv(4096).startswith(b"HTTP/1.1 401 ")
    finally:
        client.close()
        ours.close()
