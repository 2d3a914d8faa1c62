"""TCP access on real loopback sockets: the edge over TLS with the cluster CA, TcpAccess,
a real tunnel (TunnelProtocol pair + the agent's UpstreamDialer) to real TCP servers, real
SQLite/RoleCache/AuditLog/LockWatcher, and the CLI's LocalProxy as the client."""

from __future__ import annotations

import attrs
import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import defer, protocol, reactor, ssl
from twisted.internet.endpoints import SSL4ClientEndpoint, TCP4ClientEndpoint
from twisted.web import resource, server
from twisted.internet import reactor as wall_clock

from apptunnel.agent.upstream import UpstreamDialer
from apptunnel.audit import AuditLog
from apptunnel.auth.ca import ClusterCA, load_server_tls
from apptunnel.auth.directory import UserDirectory
from apptunnel.auth.locks import LockWatcher
from apptunnel.auth.policy import RoleCache
from apptunnel.backend.records import Lock, Resource, User
from apptunnel.backend.sqlite import SqliteBackend
from apptunnel.cli.profile import Profile
from apptunnel.cli.proxy_app import LocalProxy, parse_port_spec
from apptunnel.cli.context import UsageError
from apptunnel.config import AppConfig, ProxyConfig
from apptunnel.proxy.edge import EdgeFactory
from apptunnel.proxy.forward import AppForwarder
from apptunnel.proxy.pool import tunnel_connector
from apptunnel.catalog import AppInfo
from apptunnel.proxy.registry import AgentRegistry
from apptunnel.proxy.service import _web_tls_options
from apptunnel.proxy.tcp_access import TcpAccess
from apptunnel.messages import MessageError, _tcp_ports
from apptunnel.tunnel.protocol import TunnelProtocol
from tests.support.keys import key_pair
from tests.support.tls_listener import tls_endpoint
from tests.support.tunnel_pairs import Echo
from tests.support.waiting import until, wait

PUBLIC_HOST = "apptunnel.localhost"


class Banner(protocol.Protocol):
    def connectionMade(self):
        self.transport.write(b"banner")
        self.transport.loseConnection()


class Collect(protocol.Protocol):
    def __init__(self):
        self.data = b""
        self.done = defer.Deferred()

    def dataReceived(self, data):
        self.data += data

    def connectionLost(self, reason):
        self.done.callback(None)


class AgentHandler:
    """The agent's end of an in-test tunnel: the real UpstreamDialer answers streams."""

    def __init__(self, dialer):
        self.dialer = dialer

    def tunnel_ready(self, tunnel):
        pass

    def control_received(self, tunnel, message):
        pass

    def stream_requested(self, tunnel, target):
        return self.dialer.stream_requested(tunnel, target)

    def tunnel_lost(self, tunnel, reason):
        pass


class ProxyHandler(AgentHandler):
    def __init__(self):
        self.ready = defer.Deferred()

    def tunnel_ready(self, tunnel):
        self.ready.callback(tunnel)


class Env:
    """Everything running; `profile(user)` makes a login for that user."""

    listening: list

    def profile(self, user: str, roles=("dev",), ttl: float = 3600.0, ca=None) -> Profile:
        pub, priv = key_pair()
        cert = (ca or self.ca).issue_user_cert(pub, user, roles, {}, ttl)
        return Profile(proxy=f"{PUBLIC_HOST}:{self.edge_port}", trust="pinned",
                       cert_pem=cert, key_pem=priv, ca_pem=self.ca.cert_pem)

    async def local(self, profile: Profile, app: str, remote_port=None, now=None):
        """A LocalProxy for `profile` on a free port; returns (port, said lines).

        In a multiplexed env (``indirect`` param True) its connections ride one
        ``apptunnel-mux`` connection, as after a dry run that offered it."""
        said: list[str] = []
        kwargs = {"now": now} if now else {}
        factory = LocalProxy(reactor, lambda: profile, app, remote_port, said.append, **kwargs)
        factory.multiplexed = self.mux
        self.local_proxies.append(factory)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.listening.append(port)
        return port.getHost().port, said

    async def exchange(self, local_port: int, payload: bytes, close_after: bytes | None = None):
        """Connect to a local proxy, send, collect until the far side closes (or we got enough)."""
        client = await wait(TCP4ClientEndpoint(reactor, "127.0.0.1", local_port).connect(
            protocol.Factory.forProtocol(Collect)))
        client.transport.write(payload)
        if close_after is not None:
            await until(lambda: len(client.data) >= len(close_after), "the relayed bytes")
            client.transport.loseConnection()
        await wait(client.done)
        return client.data

    async def events(self, type: str):
        await self.audit.flush()
        return await self.backend.search_audit(type=type)


BOTH_MODES = pytest.mark.parametrize("env", [False, True], indirect=True,
                                     ids=["per-connection", "multiplexed"])


class CountingEdge(EdgeFactory):
    """The edge, counting the TLS connections it accepted (one per mux run); ``on_build``
    sees each connection's protocol."""

    accepted = 0
    on_build = None

    def buildProtocol(self, addr):
        self.accepted += 1
        proto = super().buildProtocol(addr)
        if self.on_build is not None:
            self.on_build(proto)
        return proto


@pytest_twisted.async_yield_fixture
async def env(tmp_path, request):
    e = Env()
    e.mux = getattr(request, "param", False)
    e.local_proxies = []
    e.listening = []
    data = str(tmp_path / "proxy")
    e.ca = ClusterCA.load_or_create(data, "utest", wall_clock)
    cert, key = load_server_tls(data, e.ca, [PUBLIC_HOST, "*." + PUBLIC_HOST], ["127.0.0.1"])
    e.backend = SqliteBackend(str(tmp_path / "apptunnel.db"), reactor)
    for name, labels in [("dev", {"env": "dev"}), ("ops", {"env": "prod"})]:
        doc = {"kind": "role", "metadata": {"name": name}, "spec": {"allow": {"app_labels": labels}}}
        await wait(e.backend.put_resource(Resource("role", name, doc)))
    e.audit = AuditLog(e.backend, reactor)
    e.audit.start()
    e.locks = LockWatcher(e.backend, reactor, interval=0.1)
    e.locks.start()
    for name, held in (("alice", ("dev",)), ("bob", ("dev", "ops"))):
        await wait(e.backend.create_user(User(name, None, held, {}, 0.0)))
    e.users = UserDirectory(e.backend, reactor, interval=0.1)
    e.users.start()
    roles = RoleCache(e.backend, reactor)

    # Real TCP apps and a real tunnel to a real dialer.
    for name, proto in [("echo", Echo), ("echo2", Echo), ("banner", Banner)]:
        port = reactor.listenTCP(0, protocol.Factory.forProtocol(proto), interface="127.0.0.1")
        e.listening.append(port)
        setattr(e, f"{name}_port", port.getHost().port)
    closed = reactor.listenTCP(0, protocol.Factory(), interface="127.0.0.1")
    closed_port = closed.getHost().port
    await closed.stopListening()
    apps = (
        AppConfig("db", f"tcp://127.0.0.1:{e.echo_port}", {"env": "dev"}, None),
        AppConfig("multi", "tcp://127.0.0.1", {"env": "dev"}, None,
                  tcp_ports=((e.echo2_port, e.echo2_port), (e.banner_port, e.banner_port))),
        AppConfig("prod-db", f"tcp://127.0.0.1:{e.echo_port}", {"env": "prod"}, None),
        AppConfig("down", f"tcp://127.0.0.1:{closed_port}", {"env": "dev"}, None),
        AppConfig("web", f"http://127.0.0.1:{e.echo_port}", {"env": "dev"}, None),
    )
    dialer = UpstreamDialer(reactor, apps)
    proxy_side = ProxyHandler()
    tunnel_listener = reactor.listenTCP(0, protocol.Factory.forProtocol(
        lambda: TunnelProtocol(proxy_side, reactor, initiator=False)), interface="127.0.0.1")
    e.listening.append(tunnel_listener)
    agent_tunnel = await wait(TCP4ClientEndpoint(
        reactor, "127.0.0.1", tunnel_listener.getHost().port).connect(protocol.Factory.forProtocol(
            lambda: TunnelProtocol(AgentHandler(dialer), reactor, initiator=True))))
    proxy_tunnel = await wait(proxy_side.ready)
    e.registry = AgentRegistry()
    e.registry.add(proxy_tunnel, "agent-1", [
        AppInfo(name=a.name, uri=a.uri, labels=a.labels, public_addr=f"{a.name}.{PUBLIC_HOST}",
                tcp_ports=a.tcp_ports, agent_id="agent-1") for a in apps])
    gone_tunnel = object()
    e.registry.add(gone_tunnel, "agent-2", [AppInfo(name="gone", uri="tcp://127.0.0.1:1",
                                                  labels={"env": "dev"},
                                                  public_addr=f"gone.{PUBLIC_HOST}")])
    e.registry.remove(gone_tunnel)  # known, but no agent serves it now

    config = ProxyConfig(
        path="p.yaml", cluster_name="utest", data_dir=data, public_addr=PUBLIC_HOST,
        web_listen_addr="127.0.0.1:0", tunnel_listen_addr="127.0.0.1:0", backend_type="sqlite",
        backend_path="db", tls_cert_file=None, tls_key_file=None,
    )
    forwarder = AppForwarder(config=config, registry=e.registry, sessions=None, roles=roles,
                             signer=None, audit=e.audit, clock=reactor,
                             connect_app=tunnel_connector(e.registry))
    e.access = TcpAccess(ca=e.ca, registry=e.registry, roles=roles, audit=e.audit,
                         clock=reactor, connect_app=tunnel_connector(e.registry), locks=e.locks,
                         users=e.users)
    web = resource.Resource()
    edge = e.edge = CountingEdge(PUBLIC_HOST, server.Site(web), forwarder, tcp_access=e.access)
    listener = await wait(tls_endpoint(
        _web_tls_options(cert, key, [e.ca.cert_pem], e.ca.cert_pem)).listen(edge))
    e.listening.append(listener)
    e.edge_port = listener.getHost().port
    yield e
    for factory in e.local_proxies:
        factory.stop()
    for port in e.listening:
        await port.stopListening()
    agent_tunnel.transport.loseConnection()
    e.locks.stop()
    e.users.stop()
    await wait(e.audit.stop())
    await wait(e.backend.close())


async def raw(env, request: bytes, client_cert: bytes | None = None) -> bytes:
    """Send `request` over TLS to the edge (with or without a certificate) and read to close."""
    cert = ssl.PrivateCertificate.loadPEM(client_cert) if client_cert else None
    options = ssl.optionsForClientTLS(PUBLIC_HOST, trustRoot=ssl.Certificate.loadPEM(env.ca.cert_pem),
                                      clientCertificate=cert)
    client = await wait(SSL4ClientEndpoint(reactor, "127.0.0.1", env.edge_port, options).connect(
        protocol.Factory.forProtocol(Collect)))
    client.transport.write(request)
    await wait(client.done)
    return client.data


UPGRADE = (b"GET /v1/tcp/db HTTP/1.1\r\nHost: apptunnel.localhost\r\nConnection: Upgrade\r\n"
           b"Upgrade: apptunnel-tcp\r\n\r\n")


@BOTH_MODES
@pytest_twisted.ensureDeferred
async def test_relays_bytes_both_ways_and_audits_the_session(env):
    """An allowed user gets 101 and a byte pipe; start and end are audited with byte counts."""
    port, said = await env.local(env.profile("alice"), "db")
    payload = b"x" * 300_000
    got = await env.exchange(port, payload, close_after=payload)
    assert got == payload and said == []
    await until(lambda: not env.access.sessions, "the session to end")
    start = await env.events("tcp.session.start")
    end = await env.events("tcp.session.end")
    assert [(e.code, e.actor, e.target) for e in start] == [("T2300I", "alice", "db")]
    assert end[0].code == "T2301I" and end[0].fields["bytes_in"] == len(payload)
    assert end[0].fields["bytes_out"] == len(payload)
    assert end[0].fields["duration_ms"] >= 0 and end[0].fields["client_ip"].startswith("127.0.0.1:")


@pytest_twisted.ensureDeferred
async def test_a_session_is_audited_before_its_101_is_written(env):
    """The tcp.session.start event is emitted (journaled) before the bytes of the 101 are
    written: the TLS layer sends a write at once, and a kill -9 in between must not leave
    a session the client saw start without its event (as for app.request)."""
    order: list[str] = []
    emit = env.access.audit.emit

    def recording_emit(kind, *args, **kwargs):
        order.append(kind)
        return emit(kind, *args, **kwargs)

    def watch(proto):
        def made(made=proto.connectionMade):
            made()
            tls = proto.transport
            write = tls.write
            tls.write = lambda data: (order.append(
                "101" if data.startswith(b"HTTP/1.1 101") else "bytes"), write(data))
        proto.connectionMade = made

    env.access.audit.emit = recording_emit
    env.edge.on_build = watch
    alice = env.profile("alice")
    banner = (f"GET /v1/tcp/multi?port={env.banner_port} HTTP/1.1\r\n"   # says "banner", closes
              "Host: apptunnel.localhost\r\nConnection: Upgrade\r\n"
              "Upgrade: apptunnel-tcp\r\n\r\n").encode()
    reply = await raw(env, banner, alice.cert_pem + alice.key_pem)
    assert reply.startswith(b"HTTP/1.1 101") and reply.endswith(b"banner")
    assert "101" in order and "tcp.session.start" in order
    assert order.index("tcp.session.start") < order.index("101")


@BOTH_MODES
@pytest_twisted.ensureDeferred
async def test_many_concurrent_connections(env):
    """Several local connections at once each get their own stream."""
    port, _ = await env.local(env.profile("alice"), "db")
    payloads = [bytes([65 + i]) * 20_000 for i in range(8)]
    results = await wait(defer.gatherResults([
        defer.ensureDeferred(env.exchange(port, p, close_after=p)) for p in payloads]))
    assert results == payloads


@BOTH_MODES
@pytest_twisted.ensureDeferred
async def test_app_close_reaches_the_client(env):
    """When the app closes after writing, the client gets the bytes and then EOF."""
    port, said = await env.local(env.profile("alice"), "multi", remote_port=env.banner_port)
    assert await env.exchange(port, b"") == b"banner"


@BOTH_MODES
@pytest_twisted.ensureDeferred
async def test_multi_port_app_declared_port_works(env):
    """A declared port of a multi-port app is reachable."""
    port, _ = await env.local(env.profile("alice"), "multi", remote_port=env.echo2_port)
    assert await env.exchange(port, b"hello", close_after=b"hello") == b"hello"


@pytest.mark.parametrize("app, remote, line", [
    ("multi", 22, "403 Forbidden: port 22 is not served by multi"),
    ("multi", None, "403 Forbidden: multi serves several ports: name one"),
    ("prod-db", None, "403 Forbidden: you are not allowed to use prod-db"),
    ("nope", None, "404 Not Found: no app named 'nope'"),
    ("web", None, "400 Bad Request: web is an HTTP app"),
    ("down", None, "502 Bad Gateway: down is not reachable: connection refused"),
    ("gone", None, "503 Service Unavailable: no agent is serving gone"),
])
@BOTH_MODES
@pytest_twisted.ensureDeferred
async def test_refusals_are_one_line_and_close(env, app, remote, line):
    """Each refusal closes the local connection and prints the proxy's reason as one line."""
    port, said = await env.local(env.profile("alice"), app, remote_port=remote)
    assert await env.exchange(port, b"early bytes") == b""
    await until(lambda: said, "the printed reason")
    assert len(said) == 1 and said[0].startswith("proxy refused: " + line), said


@BOTH_MODES
@pytest_twisted.ensureDeferred
async def test_rbac_denial_is_audited(env):
    """A role denial is audited as access.denied naming the user and app."""
    port, _ = await env.local(env.profile("alice"), "prod-db")
    await env.exchange(port, b"")
    denied = await env.events("access.denied")
    assert [(e.code, e.actor, e.target) for e in denied] == [("T2200W", "alice", "prod-db")]


@pytest_twisted.ensureDeferred
async def test_without_certificate_is_401(env):
    """No client certificate: 401 with a hint, no stream opened."""
    answer = await raw(env, UPGRADE)
    assert answer.startswith(b"HTTP/1.1 401 ")
    assert b"run apptunnel login" in answer


@pytest_twisted.ensureDeferred
async def test_expired_certificate_is_refused_locally(env):
    """An expired profile certificate is refused by the local proxy with one line."""
    profile = env.profile("alice", ttl=60)
    port, said = await env.local(profile, "db", now=lambda: profile.expires + 1)
    assert await env.exchange(port, b"x") == b""
    assert said == ["certificate expired: run apptunnel login"]


@pytest_twisted.ensureDeferred
async def test_agent_certificate_is_not_a_user_401(env):
    """An agent certificate of this cluster (TLS accepts its chain) is not a user: 401."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "host-1")]))
           .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    cert = env.ca.sign_agent_csr(csr, "host-1", 3600)
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    answer = await raw(env, UPGRADE, cert + priv)
    assert answer.startswith(b"HTTP/1.1 401 ")
    assert b"not a user certificate" in answer


@BOTH_MODES
@pytest_twisted.ensureDeferred
async def test_lock_refuses_and_ends_live_sessions(env):
    """A lock on the user refuses new sessions (403 with its message) and ends live ones."""
    port, said = await env.local(env.profile("alice"), "db")
    client = await wait(TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(
        protocol.Factory.forProtocol(Collect)))
    client.transport.write(b"ping")
    await until(lambda: client.data == b"ping", "the echo")
    now = reactor.seconds()
    await wait(env.backend.put_lock(Lock("l1", "alice", None, "incident", now, None, "admin")))
    await wait(client.done)
    assert await env.exchange(port, b"x") == b""
    await until(lambda: said, "the printed reason")
    assert said == ["proxy refused: 403 Forbidden: your access is locked: incident"]


@pytest_twisted.ensureDeferred
async def test_web_host_without_upgrade_still_goes_to_the_site(env):
    """A plain request on the proxy host is the web UI's, not TcpAccess's."""
    answer = await raw(env, b"GET /v1/tcp/db HTTP/1.1\r\nHost: apptunnel.localhost\r\n"
                            b"Connection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 404 ")


@pytest_twisted.ensureDeferred
async def test_browser_on_tcp_app_host_gets_400_page(env):
    """A browser opening a TCP app's subdomain is told to use apptunnel proxy app."""
    answer = await raw(env, b"GET / HTTP/1.1\r\nHost: db.apptunnel.localhost\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b"TCP app: use apptunnel proxy app db" in answer


def test_port_spec():
    """--port takes LOCAL or LOCAL:REMOTE; anything else is a usage error."""
    assert parse_port_spec("15432") == (15432, None)
    assert parse_port_spec("15432:5432") == (15432, 5432)
    for bad in ("", "x", "1:0", "70000", "1:2:3", "-1"):
        with pytest.raises(UsageError):
            parse_port_spec(bad)


def test_hello_tcp_ports_are_checked():
    """The proxy takes tcp_ports only as [low, high] pairs of a tcp:// app."""
    assert _tcp_ports([[1, 2], [5, 5]], "tcp", "apps[0]") == ((1, 2), (5, 5))
    assert _tcp_ports(None, "http", "apps[0]") == ()
    for bad, scheme in [([[1, 2]], "http"), ([[2, 1]], "tcp"), ([[0, 1]], "tcp"),
                        ([[1, True]], "tcp"), ("1-2", "tcp"), ([[1, 2, 3]], "tcp")]:
        with pytest.raises(MessageError):
            _tcp_ports(bad, scheme, "apps[0]")


async def live_session(env, user: str, roles, app: str):
    """A relaying session of `user` through a local proxy: (local port, said, client)."""
    port, said = await env.local(env.profile(user, roles=roles), app)
    client = await wait(TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(
        protocol.Factory.forProtocol(Collect)))
    client.transport.write(b"ping")
    await until(lambda: client.data == b"ping", "the echo")
    return port, said, client


@BOTH_MODES
@pytest_twisted.ensureDeferred
async def test_removed_user_is_refused_and_their_live_session_ends(env):
    """users rm: the live stream ends within the poll interval; a new one is a 403 line."""
    port, said, client = await live_session(env, "alice", ("dev",), "db")
    _, _, other = await live_session(env, "bob", ("dev",), "db")
    await wait(env.backend.delete_user("alice"))
    await wait(client.done)
    assert other.transport.connected    # bob is not removed
    assert await env.exchange(port, b"x") == b""
    await until(lambda: said, "the printed reason")
    assert said == ["proxy refused: 403 Forbidden: your user account no longer exists"]
    denied = await env.events("access.denied")
    # The cut of the live session is audited too (issue 9: one policy, as on app hosts).
    assert [(e.actor, e.fields["reason"]) for e in denied
            if e.fields.get("where") != "live connection"] == [("alice", "user removed")]
    assert [(e.actor, e.fields["reason"]) for e in denied
            if e.fields.get("where") == "live connection"] == [("alice", "user removed")]


@BOTH_MODES
@pytest_twisted.ensureDeferred
async def test_role_taken_away_ends_the_session_that_role_allowed(env):
    """bob loses ops: his live prod-db stream ends, his dev stream keeps flowing."""
    _, said, prod = await live_session(env, "bob", ("dev", "ops"), "prod-db")
    _, _, dev = await live_session(env, "bob", ("dev", "ops"), "db")
    await wait(env.backend.update_user(User("bob", None, ("dev",), {}, 0.0)))
    await wait(prod.done)
    dev.transport.write(b"more")
    await until(lambda: dev.data == b"pingmore", "the dev echo after the change")
    port, said = await env.local(env.profile("bob", roles=("dev", "ops")), "prod-db")
    assert await env.exchange(port, b"x") == b""
    await until(lambda: said, "the printed reason")
    assert said == ["proxy refused: 403 Forbidden: you are not allowed to use prod-db"]


def dry_run(app: str, port: int | None = None) -> bytes:
    target = f"/v1/tcp/{app}" + (f"?port={port}" if port is not None else "")
    return (f"GET {target} HTTP/1.1\r\nHost: apptunnel.localhost\r\nConnection: Upgrade\r\n"
            "Upgrade: apptunnel-tcp\r\nApptunnel-Dry-Run: 1\r\n\r\n").encode()


@pytest.mark.parametrize("app, port, status, line", [
    ("db", None, 200, b"tcp"),
    ("multi", "echo2", 200, b"tcp"),
    ("multi", 22, 403, b"port 22 is not served by multi"),
    ("prod-db", None, 403, b"you are not allowed to use prod-db"),
    ("nope", None, 404, b"no app named 'nope'"),
    ("web", None, 400, b"web is an HTTP app"),
])
@pytest_twisted.ensureDeferred
async def test_dry_run_gives_the_same_decision_and_opens_nothing(env, app, port, status, line):
    """A dry run answers 200 + the app's kind or the real upgrade's refusal; no stream opens."""
    profile = env.profile("alice")
    port = env.echo2_port if port == "echo2" else port
    answer = await raw(env, dry_run(app, port), profile.cert_pem + profile.key_pem)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % status), answer
    assert body.startswith(line), answer
    assert not env.access.sessions
    assert await env.events("tcp.session.start") == []


@pytest_twisted.ensureDeferred
async def test_dry_run_of_an_http_app_with_a_forwarder_says_http(env, tmp_path):
    """With a forwarder an HTTP app is accepted: the dry run says http and hands nothing over."""
    env.access.forwarder = object()   # never used by a dry run
    profile = env.profile("alice")
    answer = await raw(env, dry_run("web"), profile.cert_pem + profile.key_pem)
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"\r\n\r\nhttp\n")


@pytest_twisted.ensureDeferred
async def test_dry_run_denial_is_audited(env):
    """A denied dry run is a denied attempt: audited like the real one."""
    profile = env.profile("alice")
    await raw(env, dry_run("prod-db"), profile.cert_pem + profile.key_pem)
    denied = await env.events("access.denied")
    assert [(e.actor, e.target) for e in denied] == [("alice", "prod-db")]


@pytest.mark.parametrize("app, expected", [
    ("prod-db", b"HTTP/1.1 403 Forbidden\r\n"),
    ("nope", b"HTTP/1.1 404 Not Found\r\n"),
    ("down", b"HTTP/1.1 502 Bad Gateway\r\n"),
])
@BOTH_MODES
@pytest_twisted.ensureDeferred
async def test_http_kind_local_proxy_answers_refusals_over_http(env, app, expected):
    """For an HTTP app the local client gets the proxy's refusal as an HTTP answer."""
    said: list[str] = []
    profile = env.profile("alice")
    factory = LocalProxy(reactor, lambda: profile, app, None, said.append, kind="http")
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    env.listening.append(port)
    got = await env.exchange(port.getHost().port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert got.startswith(expected), got
    assert got.count(b"\n") >= 5 and len(said) == 1


@pytest_twisted.ensureDeferred
async def test_http_kind_local_proxy_answers_an_expired_certificate_with_401(env):
    """An expired login is a local 401 with the login hint for an HTTP client."""
    profile = env.profile("alice", ttl=60)
    factory = LocalProxy(reactor, lambda: profile, "web", None, [].append,
                         now=lambda: profile.expires + 1, kind="http")
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    env.listening.append(port)
    got = await env.exchange(port.getHost().port, b"GET / HTTP/1.1\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 401 Unauthorized\r\n")
    assert got.endswith(b"\r\n\r\ncertificate expired: run apptunnel login\n")


@pytest_twisted.ensureDeferred
async def test_check_before_listening(env):
    """proxy app's check: the app's kind when allowed, the proxy's one line when not."""
    from apptunnel.cli.context import CliError
    from apptunnel.cli.proxy_app import check

    profile = env.profile("alice")

    def local(app, port=None):
        return LocalProxy(reactor, lambda: profile, app, port, [].append)

    assert await check(local("db")) == "tcp"
    with pytest.raises(CliError) as info:
        await check(local("multi", 22))
    assert info.value.message == "proxy refused: 403 Forbidden: port 22 is not served by multi"
    assert not env.access.sessions


@BOTH_MODES
@pytest_twisted.ensureDeferred
async def test_a_proxy_outside_the_pinned_ca_is_refused_with_one_line(env, tmp_path):
    """A login pinned to another CA: the dry run and each connection stop at the TLS
    handshake with one line saying the proxy's certificate was refused and why."""
    from apptunnel.cli.context import CliError
    from apptunnel.cli.proxy_app import check

    other = ClusterCA.load_or_create(str(tmp_path / "other"), "other", wall_clock)
    profile = attrs.evolve(env.profile("alice"), ca_pem=other.cert_pem)
    with pytest.raises(CliError) as info:
        await check(LocalProxy(reactor, lambda: profile, "db", None, [].append))
    line = info.value.message
    assert line.startswith("the proxy's certificate was refused: "), line
    assert "certificate" in line.partition(": ")[2]
    port, said = await env.local(profile, "db")
    assert await env.exchange(port, b"hello") == b""
    await until(lambda: said, "the printed line")
    assert said == [line]
    assert await env.events("tcp.session.start") == []


@pytest_twisted.ensureDeferred
async def test_dry_run_without_a_certificate_is_401(env):
    """A dry run asks the same question: no certificate, no answer but 401."""
    answer = await raw(env, dry_run("db"))
    assert answer.startswith(b"HTTP/1.1 401 ") and b"run apptunnel login" in answer


MUX_UPGRADE = UPGRADE.replace(b"Upgrade: apptunnel-tcp", b"Upgrade: apptunnel-mux")


class MuxClient:
    """A hand-driven multiplexed client: the upgrade, then a TunnelProtocol (a `TunnelHandler`)."""

    def __init__(self):
        self.ready = defer.Deferred()
        self.answer = b""
        self.tunnel = None

    def tunnel_ready(self, tunnel):
        self.ready.callback(tunnel)

    def control_received(self, tunnel, message):
        pass

    def stream_requested(self, tunnel, target):
        return defer.fail(AssertionError("the proxy opened a stream"))

    def tunnel_lost(self, tunnel, reason):
        pass


class MuxUpgrade(protocol.Protocol):
    """Sends the mux upgrade; after the 101 every byte goes to the tunnel protocol."""

    def __init__(self, client: MuxClient):
        self.client = client
        self.tunnel = None
        self.lost = defer.Deferred()

    def connectionMade(self):
        self.transport.write(MUX_UPGRADE)

    def dataReceived(self, data):
        if self.tunnel is not None:
            self.tunnel.dataReceived(data)
            return
        self.client.answer += data
        head, sep, rest = self.client.answer.partition(b"\r\n\r\n")
        if sep and head.startswith(b"HTTP/1.1 101 "):
            self.tunnel = TunnelProtocol(self.client, reactor, initiator=True)
            self.tunnel.makeConnection(self.transport)
            if rest:
                self.tunnel.dataReceived(rest)

    def connectionLost(self, reason):
        if self.tunnel is not None:
            self.tunnel.connectionLost(reason)
        self.lost.callback(None)


async def mux_client(env, user="alice") -> tuple[MuxClient, MuxUpgrade]:
    pub, priv = key_pair()
    cert = env.ca.issue_user_cert(pub, user, ("dev",), {}, 3600.0)
    options = ssl.optionsForClientTLS(
        PUBLIC_HOST, trustRoot=ssl.Certificate.loadPEM(env.ca.cert_pem),
        clientCertificate=ssl.PrivateCertificate.loadPEM(cert + priv))
    client = MuxClient()
    conn = await wait(SSL4ClientEndpoint(reactor, "127.0.0.1", env.edge_port, options).connect(
        protocol.Factory.forProtocol(lambda: MuxUpgrade(client))))
    await wait(client.ready)
    return client, conn


@pytest.mark.parametrize("env", [True], indirect=True, ids=["multiplexed"])
@pytest_twisted.ensureDeferred
async def test_multiplexed_run_carries_every_connection_on_one_tls_connection(env):
    """Eleven local connections, concurrent and one after another: one TLS connection to
    the proxy, eleven audited TCP sessions."""
    from apptunnel.cli.proxy_app import check

    profile = env.profile("alice")
    asked = LocalProxy(reactor, lambda: profile, "db", None, [].append)
    assert await check(asked) == "tcp" and asked.multiplexed   # the dry run offered it
    port, said = await env.local(profile, "db")
    before = env.edge.accepted
    payloads = [bytes([65 + i]) * 50_000 for i in range(8)]
    assert await wait(defer.gatherResults([
        defer.ensureDeferred(env.exchange(port, p, close_after=p)) for p in payloads])) == payloads
    for i in range(3):
        assert await env.exchange(port, b"again", close_after=b"again") == b"again"
    assert env.edge.accepted - before == 1 and said == []
    await until(lambda: not env.access.sessions, "the sessions to end")
    starts = await env.events("tcp.session.start")
    assert len(starts) == 11 and {(e.actor, e.target) for e in starts} == {("alice", "db")}


@pytest.mark.parametrize("env", [True], indirect=True, ids=["multiplexed"])
@pytest_twisted.ensureDeferred
async def test_multiplexed_run_makes_a_new_connection_once_the_old_one_is_gone(env):
    """A replaced or lost connection: the next local connection opens a new one."""
    port, said = await env.local(env.profile("alice"), "db")
    assert await env.exchange(port, b"one", close_after=b"one") == b"one"
    env.local_proxies[0].stop()
    assert await env.exchange(port, b"two", close_after=b"two") == b"two"
    assert env.edge.accepted == 2 and said == []


@pytest_twisted.ensureDeferred
async def test_a_stream_of_a_multiplexed_connection_can_name_nothing(env):
    """Hostile client: the upgrade decided alice -> db; a stream naming another app (one
    she may not use) or another user is refused with 400, and an empty one reaches db."""
    from apptunnel.tunnel.errors import StreamRefused, status_of

    client, conn = await mux_client(env)
    tunnel = conn.tunnel
    for target in ({"app": "prod-db"}, {"user": "bob"}, {"port": 22}):
        with pytest.raises(StreamRefused) as info:
            await wait(tunnel.open_stream(target))
        assert status_of(info.value.reason, 0)[0] == 400
    stream = await wait(tunnel.connect_stream({}, protocol.Factory.forProtocol(Collect)))
    stream.transport.write(b"hello")
    await until(lambda: stream.data == b"hello", "the echo over the stream")
    conn.tunnel.close()
    await wait(conn.lost)


@pytest_twisted.ensureDeferred
async def test_a_multiplexed_connection_ends_with_its_certificate(env):
    """The connection and its streams end when the certificate it was opened with does."""
    pub, priv = key_pair()
    cert = env.ca.issue_user_cert(pub, "alice", ("dev",), {}, 3.0)
    options = ssl.optionsForClientTLS(
        PUBLIC_HOST, trustRoot=ssl.Certificate.loadPEM(env.ca.cert_pem),
        clientCertificate=ssl.PrivateCertificate.loadPEM(cert + priv))
    client = MuxClient()
    conn = await wait(SSL4ClientEndpoint(reactor, "127.0.0.1", env.edge_port, options).connect(
        protocol.Factory.forProtocol(lambda: MuxUpgrade(client))))
    await wait(client.ready)
    stream = await wait(conn.tunnel.connect_stream({}, protocol.Factory.forProtocol(Collect)))
    stream.transport.write(b"ping")
    await until(lambda: stream.data == b"ping", "the echo")
    await wait(stream.done, timeout=10)
    await wait(conn.lost, timeout=5)


@pytest_twisted.ensureDeferred
async def test_a_multiplexed_upgrade_is_decided_like_any_other(env):
    """No certificate, or an app the user may not use: the plain one-line refusal, no 101."""
    answer = await raw(env, MUX_UPGRADE)
    assert answer.startswith(b"HTTP/1.1 401 ")
    pub, priv = key_pair()
    cert = env.ca.issue_user_cert(pub, "alice", ("dev",), {}, 3600.0)
    denied = await raw(env, MUX_UPGRADE.replace(b"/v1/tcp/db", b"/v1/tcp/prod-db"), cert + priv)
    assert denied.startswith(b"HTTP/1.1 403 ") and b"not allowed to use prod-db" in denied


@BOTH_MODES
@pytest_twisted.ensureDeferred
async def test_audit_not_writable_refuses_new_tcp_sessions_503(env, monkeypatch):
    """audit.on_failure: refuse (issue 13): while the audit can keep no event (backend
    failing and journal full), a new TCP session is refused 503 with the reason; nothing
    is opened and no session is audited."""
    monkeypatch.setattr(AuditLog, "writable", property(lambda self: False))
    port, said = await env.local(env.profile("alice"), "db")
    assert await env.exchange(port, b"early bytes") == b""
    await until(lambda: said, "the printed reason")
    assert said[0].startswith("proxy refused: 503 Service Unavailable: the proxy's audit log "
                              "is not writable"), said
    monkeypatch.undo()
    assert await env.events("tcp.session.start") == []
