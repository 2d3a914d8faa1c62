"""The proxy's tunnel handler over memory pumps: join, hello, and everything it refuses."""

from __future__ import annotations

import ssl

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from OpenSSL import SSL, crypto
from twisted.internet import reactor
from twisted.internet import reactor as wall_clock

from apptunnel.auth.ca import ClusterCA
from apptunnel.proxy.service import _web_tls_options
from apptunnel.tls.contexts import ServerTls, server_context
from apptunnel.proxy.tunnel_server import (
    FIRST_MESSAGE_TIMEOUT,
    tunnel_tls_options,
)
from apptunnel.tunnel.errors import StreamRefused
from apptunnel.tunnel.frames import ErrorCode
from tests.support.tunnel_server_world import (  # noqa: F401 - world is a fixture
    AgentSide, csr_pem, enrolled, hello, settle, world,
)

WAIT = 5.0


class Refused(Exception):
    """Either side of a memory handshake refused it."""


def handshake(server_tls: ServerTls, client_ctx: SSL.Context) -> ssl.SSLObject:
    """A TLS handshake between the proxy's server context (the standard library's, as
    apptunnel/tls builds it) and a pyOpenSSL client on memory BIOs; Refused if either side
    refuses. Returns the server end."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    server = server_context(server_tls).wrap_bio(incoming, outgoing, server_side=True)
    client = SSL.Connection(client_ctx, None)
    client.set_connect_state()
    server_done = client_done = False
    for _ in range(20):
        try:
            client.do_handshake()
            client_done = True
        except SSL.WantReadError:
            pass
        except SSL.Error as err:
            raise Refused(f"client: {err}") from None
        try:
            incoming.write(client.bio_read(65536))
        except SSL.WantReadError:
            pass
        if not server_done:
            try:
                server.do_handshake()
                server_done = True
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as err:
                raise Refused(f"server: {err}") from None
        if outgoing.pending:
            client.bio_write(outgoing.read())
        if server_done and client_done:
            return server
    raise AssertionError("handshake did not finish")


def peer_cn(server: ssl.SSLObject) -> str | None:
    der = server.getpeercert(binary_form=True)
    if der is None:
        return None
    cert = x509.load_der_x509_certificate(der)
    return cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value


def client_context(max_version=None, cert_and_key=None) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_METHOD)
    if max_version is not None:
        ctx.set_max_proto_version(max_version)
    if cert_and_key is not None:
        ctx.use_certificate(crypto.load_certificate(crypto.FILETYPE_PEM, cert_and_key[0]))
        ctx.use_privatekey(crypto.load_privatekey(crypto.FILETYPE_PEM, cert_and_key[1]))
    return ctx


@pytest.fixture
def tls_server(tmp_path):
    ca = ClusterCA.load_or_create(str(tmp_path / "tls"), "unit", wall_clock)
    cert, key = ca.issue_server_cert(["localhost"], ["127.0.0.1"])
    return ca, tunnel_tls_options(ca.cert_pem, cert, key)


def agent_pair(ca) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = ca.sign_agent_csr(csr_pem(key)[1], "host-1", 3600)
    return cert, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption())


def test_tls_accepts_client_without_certificate(tls_server):
    """A joining agent without a certificate completes the TLS 1.3 handshake."""
    _, ctx = tls_server
    server = handshake(ctx, client_context())
    assert server.version() == "TLSv1.3"
    assert peer_cn(server) is None


def test_tls_verifies_cluster_client_certificate(tls_server):
    """An agent certificate of the cluster is accepted and visible to the proxy."""
    ca, ctx = tls_server
    server = handshake(ctx, client_context(cert_and_key=agent_pair(ca)))
    assert peer_cn(server) == "host-1"


def test_tls_rejects_foreign_client_certificate(tls_server, tmp_path):
    """A client certificate from another CA fails the handshake."""
    _, ctx = tls_server
    other = ClusterCA.load_or_create(str(tmp_path / "other"), "unit", wall_clock)
    with pytest.raises(Refused):
        handshake(ctx, client_context(cert_and_key=agent_pair(other)))


def test_tls_trusts_the_other_ca_of_a_rotation_and_no_one_else(tmp_path):
    """During a CA rotation both CAs' agent certificates pass; a third CA's still fail."""
    old = ClusterCA.load_or_create(str(tmp_path / "old"), "unit", wall_clock)
    new = ClusterCA.load_or_create(str(tmp_path / "new"), "unit", wall_clock)
    stranger = ClusterCA.load_or_create(str(tmp_path / "stranger"), "unit", wall_clock)
    cert, key = old.issue_server_cert(["localhost"], ["127.0.0.1"])
    options = tunnel_tls_options(old.cert_pem, cert, key, also_trusted=[new.cert_pem])
    for ca in (old, new):
        server = handshake(options, client_context(cert_and_key=agent_pair(ca)))
        assert peer_cn(server) == "host-1"
    with pytest.raises(Refused):
        handshake(options, client_context(cert_and_key=agent_pair(stranger)))


def test_tls_rejects_tls12(tls_server):
    """Clients limited to TLS 1.2 cannot connect."""
    _, ctx = tls_server
    with pytest.raises(Refused):
        handshake(ctx, client_context(max_version=SSL.TLS1_2_VERSION))


@pytest_twisted.ensureDeferred
async def test_join_signs_csr_audits_and_closes(world):
    """A valid token gets join_ok with a cert for the CSR's key, T3100I, and a closed tunnel."""
    await world.add_token("secret-1")
    key, csr = csr_pem()
    agent = AgentSide({"type": "join", "token": "secret-1", "csr": csr, "host_id": "host-9"})
    pump = world.connect(agent)
    await settle(pump, lambda: agent.lost is not None, "the tunnel to close")
    [answer] = agent.controls
    assert answer["type"] == "join_ok" and answer["ca"] == world.ca.cert_pem.decode()
    cert = x509.load_pem_x509_certificate(answer["cert"].encode())
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    assert world.ca.verify_peer(cert) == ("agent", "host-9")
    [event] = await world.events()
    assert (event.code, event.actor) == ("T3100I", "host-9")
    assert "secret-1" not in repr(event)


@pytest_twisted.ensureDeferred
async def test_token_reusable_until_expiry(world):
    """A token without a use limit (as made before limits) joins several agents until it
    expires, then it is refused as expired."""
    await world.add_token("multi", ttl=60)
    for expected, host in (("join_ok", "h1"), ("join_ok", "h2")):
        agent = AgentSide({"type": "join", "token": "multi", "csr": csr_pem()[1], "host_id": host})
        await settle(world.connect(agent), lambda: agent.lost is not None, "close")
        assert agent.controls[0]["type"] == expected
    world.clock.advance(61)
    agent = AgentSide({"type": "join", "token": "multi", "csr": csr_pem()[1], "host_id": "h"})
    await settle(world.connect(agent), lambda: agent.lost is not None, "close")
    assert agent.controls == [{"type": "join_error", "message": "invalid or expired join token"}]
    reasons = [e.fields.get("reason") for e in await world.events()]
    assert reasons.count("expired token") == 1


@pytest.mark.parametrize("message, reason", [
    ({"type": "join", "token": "nope", "csr": "x", "host_id": "h"}, "unknown token"),
    ({"type": "join", "token": 5, "csr": "x", "host_id": "h"}, "malformed join message"),
    ({"type": "join", "token": "good", "csr": "not a csr", "host_id": "h"}, "invalid CSR"),
    ({"type": "join", "token": "good", "csr": "x", "host_id": "bad id!"}, "invalid host_id"),
])
@pytest_twisted.ensureDeferred
async def test_bad_joins_refused_and_audited(world, message, reason):
    """Unknown tokens, malformed messages and bad CSRs get join_error and T3100W."""
    await world.add_token("good")
    agent = AgentSide(message)
    await settle(world.connect(agent), lambda: agent.lost is not None, "close")
    assert [m["type"] for m in agent.controls] == ["join_error"]
    [event] = await world.events()
    assert event.code == "T3100W" and event.fields["reason"] == reason


@pytest_twisted.ensureDeferred
async def test_other_token_kind_cannot_join(world):
    """A token of another kind is refused (deny by default)."""
    await world.add_token("user-tok", kind="user")
    agent = AgentSide({"type": "join", "token": "user-tok", "csr": csr_pem()[1], "host_id": "h"})
    await settle(world.connect(agent), lambda: agent.lost is not None, "close")
    assert agent.controls[0]["type"] == "join_error"


@pytest_twisted.ensureDeferred
async def test_hello_without_certificate_closes(world):
    """A hello on a connection without a client certificate is refused and closes."""
    agent = AgentSide(hello())
    await settle(world.connect(agent), lambda: agent.lost is not None, "close")
    assert agent.controls == [] and world.registry.apps() == []


@pytest_twisted.ensureDeferred
async def test_join_on_certificate_connection_closes(world):
    """An agent that already has a certificate cannot send join on it."""
    await world.add_token("t")
    agent = AgentSide({"type": "join", "token": "t", "csr": csr_pem()[1], "host_id": "h"})
    pump = world.connect(agent, await enrolled(world))
    await settle(pump, lambda: agent.lost is not None, "close")
    assert agent.controls == [] and await world.events() == []


@pytest_twisted.ensureDeferred
async def test_hello_registers_apps_and_loss_removes_them(world):
    """hello registers AppInfos with defaulted public_addr; losing the tunnel removes them."""
    agent = AgentSide(hello())
    pump = world.connect(agent, await enrolled(world))
    await settle(pump, lambda: agent.controls, "hello_ok")
    assert agent.controls == [{"type": "hello_ok", "proxy_id": "p-1"}]
    info = world.registry.app("grafana")
    assert info.public_addr == "grafana.apptunnel.localhost:3080"
    assert info.agent_id == "host-1" and info.labels == {"env": "dev"}
    assert info.rewrite_headers == (("X-Team", "sre"),) and info.jwt_claims == ("sub", "roles")
    assert world.registry.pick("grafana") is pump.server
    pump.client_transport.loseConnection()
    pump.flush()
    assert world.registry.apps() == []


@pytest_twisted.ensureDeferred
async def test_default_public_addr_omits_443(world):
    """On port 443 the default public address has no port."""
    world.factory.public_port = 443
    agent = AgentSide(hello())
    await settle(world.connect(agent, await enrolled(world)), lambda: agent.controls, "hello_ok")
    assert world.registry.app("grafana").public_addr == "grafana.apptunnel.localhost"


@pytest.mark.parametrize("message", [
    hello(host_id="someone-else"),
    hello(apps="grafana"),
    hello(apps=[{"name": "Bad_Name", "uri": "http://x"}]),
    hello(apps=[{"name": "a", "uri": "ftp://x"}]),
    hello(apps=[{"name": "a", "uri": "http://x", "labels": {"k": 1}}]),
    hello(apps=[{"name": "a", "uri": "http://x", "public_addr": "apptunnel.localhost"}]),
    hello(apps=[{"name": "a", "uri": "http://x", "rewrite_headers": [["Bad Name", "v"]]}]),
    hello(apps=[{"name": "a", "uri": "http://x", "jwt_claims": ["password"]}]),
    hello(apps=[{"name": "a", "uri": "http://x"}, {"name": "a", "uri": "http://y"}]),
    {"type": "ping"},
])
@pytest_twisted.ensureDeferred
async def test_bad_hello_closes_without_registering(world, message):
    """A malformed hello (or other first message) closes the tunnel and registers nothing;
    a hello is answered with one hello_error line saying why."""
    agent = AgentSide(message)
    await settle(world.connect(agent, await enrolled(world)), lambda: agent.lost is not None, "close")
    assert world.registry.apps() == []
    if message["type"] == "hello":
        [answer] = agent.controls
        assert answer["type"] == "hello_error" and answer["message"].startswith("bad hello: ")
    else:
        assert agent.controls == []


@pytest_twisted.ensureDeferred
async def test_second_message_after_hello_closes(world):
    """After registration, an unexpected control message closes the tunnel and unregisters."""
    agent = AgentSide(hello())
    pump = world.connect(agent, await enrolled(world))
    await settle(pump, lambda: agent.controls, "hello_ok")
    pump.client.send_control({"type": "join"})
    await settle(pump, lambda: agent.lost is not None, "close")
    assert world.registry.apps() == []


@pytest_twisted.ensureDeferred
async def test_silent_connection_closed_after_timeout(world):
    """A connection that sends nothing is closed after the first-message timeout."""
    agent = AgentSide()
    pump = world.connect(agent)
    for _ in range(int(FIRST_MESSAGE_TIMEOUT) - 1):
        pump.flush()
        world.clock.advance(1)
    pump.flush()
    assert agent.lost is None
    world.clock.advance(1.5)
    pump.flush()
    assert agent.lost is not None


@pytest_twisted.ensureDeferred
async def test_agent_opened_streams_refused(world):
    """The proxy refuses any stream the agent tries to open, with REFUSED."""
    agent = AgentSide(hello())
    pump = world.connect(agent, await enrolled(world))
    await settle(pump, lambda: agent.controls, "hello_ok")
    d = pump.client.open_stream({"app": "anything"})
    pump.flush()
    with pytest.raises(StreamRefused) as info:
        await d.addTimeout(WAIT, reactor)
    assert info.value.code == ErrorCode.REFUSED


@pytest_twisted.ensureDeferred
async def test_certificate_of_expired_agent_cannot_hello(world):
    """An agent certificate past its validity cannot register."""
    cert = await enrolled(world)
    world.clock.advance(2 * 86400)
    agent = AgentSide(hello())
    await settle(world.connect(agent, cert), lambda: agent.lost is not None, "close")
    assert world.registry.apps() == []


def test_web_tls_trusts_the_other_ca_of_a_rotation_and_no_one_else(tmp_path):
    """The web port's client-certificate check: both CAs of a rotation pass, others fail."""
    old = ClusterCA.load_or_create(str(tmp_path / "old"), "unit", wall_clock)
    new = ClusterCA.load_or_create(str(tmp_path / "new"), "unit", wall_clock)
    stranger = ClusterCA.load_or_create(str(tmp_path / "stranger"), "unit", wall_clock)
    cert, key = old.issue_server_cert(["localhost"], ["127.0.0.1"])
    options = _web_tls_options(cert, key, [old.cert_pem], old.cert_pem,
                               also_trusted=(new.cert_pem,))
    for ca in (old, new):
        server = handshake(options, client_context(cert_and_key=agent_pair(ca)))
        assert peer_cn(server) == "host-1"
    with pytest.raises(Refused):
        handshake(options, client_context(cert_and_key=agent_pair(stranger)))
@pytest_twisted.ensureDeferred
async def test_join_and_hello_while_storage_is_down_are_refused_in_one_line(world):
    """Storage down (issue 13 item 3): a join and a hello each get a refusal saying the
    storage is unavailable (the agent retries with backoff), one warning line, no
    traceback (the refusal is audited like any other); nothing is registered."""
    from twisted.logger import globalLogPublisher

    await world.add_token("secret-1")
    cert_pem = await enrolled(world)
    world.backend.unreachable = True
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        joining = AgentSide({"type": "join", "token": "secret-1", "csr": csr_pem()[1],
                             "host_id": "host-9"})
        pump = world.connect(joining)
        await settle(pump, lambda: joining.lost is not None, "the join to be refused")
        greeting = AgentSide(hello())
        pump = world.connect(greeting, cert_pem)
        await settle(pump, lambda: greeting.controls, "the hello to be refused")
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert [c["type"] for c in joining.controls + greeting.controls] == ["join_error",
                                                                         "hello_error"]
    assert all("storage is unavailable" in c["message"]
               for c in joining.controls + greeting.controls)
    assert world.registry.apps() == []
    from twisted.logger import formatEvent

    assert [e for e in events if "log_failure" in e] == []
    lines = [formatEvent(e) for e in events if e.get("log_namespace", "").startswith(
        "apptunnel.proxy.tunnel_server")]
    assert len([line for line in lines if "storage" in line and "unavailable" in line]) == 2
