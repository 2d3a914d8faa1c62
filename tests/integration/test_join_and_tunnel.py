"""Join and tunnel over real loopback TLS: the proxy's tunnel listener with a real SQLite
backend, CA, registry and audit log, and a real agent service dialing real TCP apps."""

from __future__ import annotations

import os
import stat

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor, task
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import ssl
from twisted.internet.endpoints import SSL4ClientEndpoint
from twisted.internet.interfaces import IHalfCloseableProtocol
from zope.interface import implementer
from twisted.internet import reactor as wall_clock

from apptunnel.agent.join import AgentIdentity, JoinError, join
from apptunnel.agent.service import AgentService
from apptunnel.auth.ca import ClusterCA
from apptunnel.config import AppConfig
from apptunnel.tls.layer import TlsProtocol
from apptunnel.tunnel.errors import StreamRefused
from apptunnel.tunnel.frames import ErrorCode
from apptunnel.tunnel.protocol import TunnelProtocol
from tests.support.tunnel_env import agent_config, echo_port, proxy  # noqa: F401 - fixtures
from tests.support.tunnel_pairs import Echo
from tests.support.waiting import until, wait


@implementer(IHalfCloseableProtocol)
class Collect(protocol.Protocol):
    """Proxy-side stream client: keeps what it receives; `done` fires on close."""

    def __init__(self):
        self.data = b""
        self.done = defer.Deferred()
        self.fin = False

    def dataReceived(self, data):
        self.data += data

    def readConnectionLost(self):
        self.fin = True
        self.transport.loseConnection()

    def writeConnectionLost(self):
        pass

    def connectionLost(self, reason):
        if not self.done.called:
            self.done.callback(reason.value)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


async def open_collect(tunnel, target) -> Collect:
    factory = protocol.Factory.forProtocol(Collect)
    return await wait(tunnel.connect_stream(target, factory))


@pytest_twisted.ensureDeferred
async def test_join_tunnel_and_relay(tmp_path, proxy, echo_port):
    """Token + pin join saves 0600 files, hello registers apps, a proxy stream reaches the app."""
    apps = (AppConfig("echo", f"http://127.0.0.1:{echo_port}", {"env": "test"}, None),)
    config = agent_config(tmp_path, proxy, token=await proxy.token(), pin=proxy.ca.pin, apps=apps)
    agent = AgentService(config, reactor)
    agent.startService()
    try:
        info = await until(lambda: proxy.registry.app("echo"), "the app to register")
        identity = AgentIdentity.load(config.data_dir)
        assert identity is not None
        assert mode(tmp_path / "agent" / "agent.key") == 0o600
        assert info.agent_id == identity.host_id
        assert info.public_addr == "echo.apptunnel.localhost:3080"
        assert info.labels == {"env": "test"}
        # The agent's end of the tunnel is apptunnel.tls in client mode, batching per turn,
        # having checked the proxy's certificate for the host it dialled.
        (handler,) = agent.handlers
        tls = handler.tunnel.transport
        assert isinstance(tls, TlsProtocol) and tls.batching
        assert tls.getHandle().server_side is False
        assert tls.getHandle().server_hostname == "localhost"
        assert tls.getHandle().version() == "TLSv1.3"
        assert handler.tunnel.peer_certificate.public_bytes(serialization.Encoding.PEM) == proxy.cert

        tunnel = proxy.registry.pick("echo")
        client = await open_collect(tunnel, {"app": "echo", "user": "alice", "client": "1.2.3.4:5"})
        client.transport.write(b"ping " * 1000)
        await until(lambda: client.data == b"ping " * 1000, "the echo")
        client.transport.loseWriteConnection()
        await wait(client.done)

        events = await proxy.joins()
        assert [(e.code, e.actor) for e in events] == [("T3100I", identity.host_id)]
    finally:
        await wait(agent.stopService())
    await until(lambda: not proxy.registry.is_online("echo"), "the app to go offline")


@pytest_twisted.ensureDeferred
async def test_wrong_pin_never_sends_token(tmp_path, proxy):
    """A wrong pin fails the join with a clear error and the proxy never sees a join."""
    config = agent_config(tmp_path, proxy, token=await proxy.token(), pin="sha256:" + "ab" * 32)
    with pytest.raises(JoinError, match="ca_pin") as info:
        await wait(defer.ensureDeferred(join(reactor, config)))
    assert "token was not sent" in str(info.value)
    assert not info.value.retry
    assert await proxy.joins() == []
    assert AgentIdentity.load(config.data_dir) is None


@pytest_twisted.ensureDeferred
async def test_bad_and_expired_tokens_refused_and_audited(tmp_path, proxy):
    """Unknown and expired tokens get the proxy's message and a T3100W audit event each."""
    expired = await proxy.token(ttl=-1.0)
    for token in ("not-a-token", expired):
        config = agent_config(tmp_path, proxy, token=token, pin=proxy.ca.pin)
        with pytest.raises(JoinError, match="refused the join: invalid or expired join token"):
            await wait(defer.ensureDeferred(join(reactor, config)))
    events = await proxy.joins()
    assert sorted(e.fields["reason"] for e in events) == ["expired token", "unknown token"]
    assert {e.code for e in events} == {"T3100W"}
    assert all(expired not in str(e.fields) for e in events)


@pytest_twisted.ensureDeferred
async def test_proxy_unreachable_is_retryable_join_error(tmp_path, proxy):
    """Joining a closed port says the proxy is unreachable, and may be retried."""
    await proxy.port.stopListening()
    proxy.port = None
    config = agent_config(tmp_path, proxy, token="t", pin=proxy.ca.pin)
    with pytest.raises(JoinError, match="cannot reach the proxy .*connection refused") as info:
        await wait(defer.ensureDeferred(join(reactor, config)))
    assert info.value.retry


@pytest_twisted.ensureDeferred
async def test_unknown_app_and_app_down(tmp_path, proxy, echo_port):
    """Streams to an app the agent lacks are UNKNOWN_TARGET; to a down app CONNECT_FAILED."""
    dead = reactor.listenTCP(0, protocol.Factory.forProtocol(Echo), interface="127.0.0.1")
    dead_port = dead.getHost().port
    await dead.stopListening()
    apps = (AppConfig("down", f"http://127.0.0.1:{dead_port}", {}, None),)
    config = agent_config(tmp_path, proxy, token=await proxy.token(), pin=proxy.ca.pin, apps=apps)
    agent = AgentService(config, reactor)
    agent.startService()
    try:
        await until(lambda: proxy.registry.app("down"), "the app to register")
        tunnel = proxy.registry.pick("down")
        with pytest.raises(StreamRefused) as info:
            await wait(tunnel.open_stream({"app": "grafana"}))
        assert info.value.code == ErrorCode.UNKNOWN_TARGET
        with pytest.raises(StreamRefused) as info:
            await wait(tunnel.open_stream({"app": "down"}))
        assert info.value.code == ErrorCode.CONNECT_FAILED
        assert info.value.reason == "connection refused"
    finally:
        await wait(agent.stopService())


@pytest_twisted.ensureDeferred
async def test_agent_reconnects_and_restarts_without_token(tmp_path, proxy, echo_port):
    """The agent comes back after the listener restarts, and a new start reuses its cert."""
    apps = (AppConfig("echo", f"http://127.0.0.1:{echo_port}", {}, None),)
    config = agent_config(tmp_path, proxy, token=await proxy.token(), pin=proxy.ca.pin, apps=apps)
    agent = AgentService(config, reactor)
    agent.startService()
    try:
        await until(lambda: proxy.registry.is_online("echo"), "the first registration")
        await proxy.port.stopListening()
        proxy.registry.pick("echo").transport.abortConnection()
        await until(lambda: not proxy.registry.is_online("echo"), "the app to go offline")
        await proxy.listen()
        await until(lambda: proxy.registry.is_online("echo"), "the agent to reconnect", timeout=15)
        client = await open_collect(proxy.registry.pick("echo"), {"app": "echo"})
        client.transport.write(b"after reconnect")
        await until(lambda: client.data == b"after reconnect", "the echo")
        client.transport.loseConnection()
    finally:
        await wait(agent.stopService())
    await until(lambda: not proxy.registry.is_online("echo"), "the app to go offline")

    again = AgentService(agent_config(tmp_path, proxy, apps=apps), reactor)
    again.startService()
    try:
        await until(lambda: proxy.registry.is_online("echo"), "the restarted agent")
    finally:
        await wait(again.stopService())
    assert [e.code for e in await proxy.joins()] == ["T3100I"]


@pytest_twisted.ensureDeferred
async def test_stop_drains_open_streams_without_reconnecting(tmp_path, proxy, echo_port):
    """Stopping the agent lets an open stream finish, then closes without a new tunnel."""
    apps = (AppConfig("echo", f"http://127.0.0.1:{echo_port}", {}, None),)
    config = agent_config(tmp_path, proxy, token=await proxy.token(), pin=proxy.ca.pin, apps=apps)
    agent = AgentService(config, reactor)
    agent.startService()
    await until(lambda: proxy.registry.app("echo"), "the app to register")
    client = await open_collect(proxy.registry.pick("echo"), {"app": "echo"})
    stopping = agent.stopService()
    await task.deferLater(reactor, 2.0)  # longer than the first reconnect delay
    assert not stopping.called
    client.transport.write(b"still here")
    await until(lambda: client.data == b"still here", "the echo while draining")
    client.transport.loseConnection()
    await wait(stopping)
    await until(lambda: not proxy.registry.is_online("echo"), "the app to go offline")
    await task.deferLater(reactor, 1.0)
    assert not proxy.registry.is_online("echo")


class HelloOnReady:
    """A would-be agent: sends hello as soon as it can, records how it ends."""

    def __init__(self, message):
        self.message = message
        self.controls = []
        self.lost = defer.Deferred()

    def tunnel_ready(self, tunnel):
        tunnel.send_control(self.message)

    def control_received(self, tunnel, message):
        self.controls.append(message)

    def stream_requested(self, tunnel, target):
        return defer.fail(StreamRefused(ErrorCode.REFUSED, "no"))

    def tunnel_lost(self, tunnel, reason):
        self.lost.callback(None)


@pytest_twisted.ensureDeferred
async def test_foreign_client_certificate_is_refused(tmp_path, proxy):
    """A client certificate from another cluster's CA cannot say hello: TLS refuses it."""
    other = ClusterCA.load_or_create(str(tmp_path / "other"), "itest", wall_clock)
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
           .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    cert = other.sign_agent_csr(csr, "rogue", 3600)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    options = ssl.optionsForClientTLS(
        "localhost", trustRoot=ssl.Certificate.loadPEM(proxy.ca.cert_pem),
        clientCertificate=ssl.PrivateCertificate.loadPEM(cert + key_pem))
    handler = HelloOnReady({"type": "hello", "host_id": "rogue", "version": "x",
                            "apps": [{"name": "rogue", "uri": "http://127.0.0.1:1"}]})
    endpoint = SSL4ClientEndpoint(reactor, "127.0.0.1", proxy.port_number, options)
    await wait(endpoint.connect(protocol.Factory.forProtocol(
        lambda: TunnelProtocol(handler, reactor, initiator=True))))
    await wait(handler.lost)
    assert handler.controls == []
    assert proxy.registry.apps() == []


@pytest_twisted.ensureDeferred
async def test_tunnel_listener_refuses_tls12(proxy):
    """The tunnel listener speaks TLS 1.3 only."""
    options = ssl.CertificateOptions(lowerMaximumSecurityTo=ssl.TLSVersion.TLSv1_2)

    class Nothing(protocol.Protocol):
        def __init__(self):
            self.lost = defer.Deferred()

        def connectionLost(self, reason):
            self.lost.callback(reason.value)

    endpoint = SSL4ClientEndpoint(reactor, "127.0.0.1", proxy.port_number, options)
    client = await wait(endpoint.connect(protocol.Factory.forProtocol(Nothing)))
    client.transport.write(b"x")
    reason = await wait(client.lost)
    assert "alert" in str(reason).lower() or "version" in str(reason).lower()


@pytest_twisted.ensureDeferred
async def test_malformed_joins_are_refused_one_line_and_spend_no_token(tmp_path, proxy):
    """Joins with a token of the wrong type, a CSR that is not a string or a host id list,
    over real TLS without a certificate: one join_error each, the connection closed, the
    single-use token untouched, so the real agent joins with it afterwards."""
    from apptunnel.auth.tokens import new_secret, secret_hash
    from apptunnel.backend.records import JoinToken

    secret = new_secret()
    now = reactor.seconds()
    await wait(defer.ensureDeferred(proxy.backend.add_token(
        JoinToken(secret_hash(secret), "app", now + 3600, now, uses_left=1))))
    options = ssl.optionsForClientTLS(
        "localhost", trustRoot=ssl.Certificate.loadPEM(proxy.ca.cert_pem))
    for message in ({"type": "join", "token": [secret], "csr": "x", "host_id": "h"},
                    {"type": "join", "token": secret, "csr": {"pem": 1}, "host_id": "h"},
                    {"type": "join", "token": secret, "csr": "x", "host_id": ["h"]},
                    {"type": "join", "token": "t" * 600, "csr": "x", "host_id": "h"}):
        handler = HelloOnReady(message)
        endpoint = SSL4ClientEndpoint(reactor, "127.0.0.1", proxy.port_number, options)
        await wait(endpoint.connect(protocol.Factory.forProtocol(
            lambda: TunnelProtocol(handler, reactor, initiator=True))))
        await wait(handler.lost)
        assert handler.controls == [{"type": "join_error",
                                     "message": "join message needs token, csr and host_id "
                                                "strings"}]
    reasons = [e.fields.get("reason") for e in await wait(defer.ensureDeferred(proxy.joins()))]
    assert reasons == ["malformed join message"] * 4
    config = agent_config(tmp_path, proxy, token=secret, pin=proxy.ca.pin)
    identity = await wait(defer.ensureDeferred(join(reactor, config)))
    assert identity.cert_host_id == identity.host_id
