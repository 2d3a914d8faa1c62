"""The forwarder environment: a real EdgeFactory + AppForwarder over the in-memory backend,
a real upstream twisted.web app (echo, redirect, chunked, SSE, big, WebSocket echo,
garbage) on loopback, and a small HTTP client that reads responses with our own
ResponseReader.

`running_forward_env` yields an Env whose proxy port serves the apps grafana, prod, ws,
down, ghost and broken to the signed-in users alice (role dev) and bob (role ops).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.web import resource, server
from websockets.frames import Frame, Opcode
from websockets.server import ServerProtocol

from apptunnel.audit import AuditLog
from apptunnel.auth.jwt import JwtKeys, JwtSigner
from apptunnel.auth.policy import RoleCache
from apptunnel.auth.sessions import SessionManager
from apptunnel.backend.memory import MemoryBackend
from apptunnel.backend.records import Resource, User
from apptunnel.config import ProxyConfig
from apptunnel.proxy.edge import EdgeFactory
from apptunnel.proxy.forward import AppForwarder
from apptunnel.proxy.pool import tunnel_connector
from apptunnel.proxy.http1 import BodyBytes, EndOfMessage, ResponseHead, ResponseReader, Trailers, Upgraded
from apptunnel.catalog import AppInfo
from apptunnel.proxy.registry import AgentRegistry
from tests.support.waiting import TIMEOUT, wait

PUBLIC = "apptunnel.localhost:3080"
APP_HOST = "grafana.apptunnel.localhost:3080"


def role_doc(name, allow):
    return {"kind": "role", "metadata": {"name": name}, "spec": {"allow": {"app_labels": allow}}}


# The upstream app


class Echo(resource.Resource):
    """Answers with what it received, so tests can see exactly what the proxy forwarded."""

    isLeaf = True

    def render(self, request):
        body = request.content.read()
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({
            "method": request.method.decode(),
            "uri": request.uri.decode(),
            "headers": [[k.decode(), v.decode()] for k, vs in request.requestHeaders.getAllRawHeaders()
                        for v in vs],
            "body_length": len(body),
        }).encode()


class Redirect(resource.Resource):
    isLeaf = True

    def __init__(self, origin: str):
        super().__init__()
        self.origin = origin

    def render_GET(self, request):
        request.setResponseCode(302)
        request.setHeader(b"location", f"{self.origin}/landing?x=1".encode())
        request.setHeader(b"x-other-location", f"{self.origin}/kept".encode())
        request.addCookie(b"app_cookie", b"1", path=b"/")
        request.addCookie(b"__Host-apptunnel_app", b"planted", path=b"/", secure=True)
        return b""


class Chunked(resource.Resource):
    isLeaf = True

    def render_GET(self, request):
        for i in range(5):
            request.write(b"part-%d;" % i)
        request.finish()
        return server.NOT_DONE_YET


class Events(resource.Resource):
    """Server-sent events: the first one now, the end when the test says so."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.release = defer.Deferred()

    def render_GET(self, request):
        request.setHeader(b"content-type", b"text/event-stream")
        request.write(b"data: first\n\n")

        def finish(_):
            request.write(b"data: last\n\n")
            request.finish()

        self.release.addCallback(finish)
        return server.NOT_DONE_YET


class _Blocks:
    """A pull producer writing ``total`` bytes in 64 KiB blocks."""

    def __init__(self, request, total):
        self.request, self.left = request, total
        self.block = b"x" * 65536

    def resumeProducing(self):
        if self.left <= 0:
            return
        n = min(self.left, len(self.block))
        self.left -= n
        self.request.write(self.block[:n])
        if self.left <= 0:
            self.request.unregisterProducer()
            self.request.finish()

    def stopProducing(self):
        self.left = 0


class Big(resource.Resource):
    isLeaf = True

    def render_GET(self, request):
        total = int(request.args[b"mb"][0]) * 1024 * 1024
        request.setHeader(b"content-length", b"%d" % total)
        request.registerProducer(_Blocks(request, total), False)
        return server.NOT_DONE_YET


class WsEcho(Protocol):
    """A WebSocket server (websockets' sans-IO protocol) that echoes text messages."""

    def connectionMade(self):
        self.ws = ServerProtocol()
        self.accepted = False

    def dataReceived(self, data):
        self.ws.receive_data(data)
        for event in self.ws.events_received():
            if not self.accepted:
                self.ws.send_response(self.ws.accept(event))
                self.accepted = True
            elif isinstance(event, Frame) and event.opcode == Opcode.TEXT:
                self.ws.send_text(b"echo:" + event.data)
        for chunk in self.ws.data_to_send():
            if chunk:
                self.transport.write(chunk)
            else:
                self.transport.loseConnection()


class Garbage(Protocol):
    """An app that answers every request with something that is not HTTP."""

    def dataReceived(self, data):
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n")


# A small HTTP client that reads responses with our own reader


class Client(Protocol):
    def __init__(self):
        self.reader = ResponseReader()
        self.head = None
        self.body = bytearray()
        self.count = 0
        self.keep_body = True
        self.done = None
        self.watch = None  # (needle, Deferred)
        self.upgraded = False
        self.closed = defer.Deferred()

    def request(self, raw: bytes, method: bytes = b"GET") -> defer.Deferred:
        self.head, self.body, self.count = None, bytearray(), 0
        self.done = defer.Deferred()
        self._handle(self.reader.start(method))
        self.transport.write(raw)
        return self.done.addTimeout(TIMEOUT, reactor)

    def wait_for(self, needle: bytes) -> defer.Deferred:
        d = defer.Deferred()
        self.watch = (needle, d)
        self._check()
        return d.addTimeout(TIMEOUT, reactor)

    def dataReceived(self, data):
        if self.upgraded:
            self.body += data
            self._check()
            return
        self._handle(self.reader.receive(data))

    def connectionLost(self, reason):
        if not self.upgraded and self.reader.state in ("head", "body"):
            try:
                self._handle(self.reader.connection_closed())
            except Exception as err:
                if self.done is not None and not self.done.called:
                    self.done.errback(err)
        if self.done is not None and not self.done.called:
            self.done.errback(ConnectionError("closed before a response"))
        self.closed.callback(None)

    def _handle(self, events):
        for ev in events:
            if isinstance(ev, ResponseHead):
                if ev.status >= 200 or ev.status == 101:
                    self.head = ev
            elif isinstance(ev, (BodyBytes, Trailers)):  # the body as it was on the wire
                self.count += len(ev.data)
                if self.keep_body:
                    self.body += ev.data
                self._check()
            elif isinstance(ev, Upgraded):
                self.upgraded = True
                self.done.callback((self.head, b""))
            elif isinstance(ev, EndOfMessage):
                self.done.callback((self.head, bytes(self.body)))

    def _check(self):
        if self.watch and self.watch[0] in self.body:
            d, self.watch = self.watch[1], None
            d.callback(None)


def request_bytes(method="GET", path="/", host=APP_HOST, headers=(), body=b""):
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    lines += [f"{k}: {v}" for k, v in headers]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class Env:
    """Everything a test needs: the proxy's port, its parts, a signed-in user's cookie."""

    async def connect(self) -> Client:
        client = Client()
        await wait(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port).connect(
            Factory.forProtocol(lambda: client)))
        return client

    async def fetch(self, raw: bytes, method: bytes = b"GET"):
        client = await self.connect()
        try:
            return await client.request(raw, method)
        finally:
            client.transport.loseConnection()
            await wait(client.closed)

    async def app_cookie(self, user: str = "alice", app: str = "grafana", path: str = "/") -> str:
        web = self.webs[user]
        code = await self.sessions.create_auth_code(web, app, path, "state-1")
        secret, _, _ = await self.sessions.redeem_auth_code(code, "state-1", app)
        return secret

    async def audit_events(self, type: str):
        return await wait(self.audit.search(type=type))


@contextlib.asynccontextmanager
async def running_forward_env(tmp_path) -> AsyncIterator[Env]:
    e = Env()
    e.backend = backend = MemoryBackend()
    await wait(backend.put_resource(Resource("role", "dev", role_doc("dev", {"env": "dev"}))))
    await wait(backend.put_resource(Resource("role", "ops", role_doc("ops", {"env": "prod"}))))
    alice = User("alice", None, ("dev",), {"team": ("sre", "web")}, 0.0)
    bob = User("bob", None, ("ops",), {}, 0.0)
    for user in (alice, bob):
        await wait(backend.create_user(user))

    # Upstream app on a real port.
    root = resource.Resource()
    e.events = Events()
    for name, child in [(b"echo", Echo()), (b"chunked", Chunked()), (b"sse", e.events), (b"big", Big())]:
        root.putChild(name, child)
    upstream = await wait(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(server.Site(root)))
    up_port = upstream.getHost().port
    origin = f"http://127.0.0.1:{up_port}"
    root.putChild(b"redirect", Redirect(origin))
    ws_listener = await wait(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        Factory.forProtocol(WsEcho)))
    e.up_port = up_port
    garbage = await wait(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        Factory.forProtocol(Garbage)))

    e.config = ProxyConfig(
        path="proxy.yaml", cluster_name="test", data_dir=str(tmp_path), public_addr=PUBLIC,
        web_listen_addr="127.0.0.1:0", tunnel_listen_addr="127.0.0.1:0", backend_type="sqlite",
        backend_path=str(tmp_path / "apptunnel.db"), tls_cert_file=None, tls_key_file=None,
    )
    e.sessions = SessionManager(backend, reactor, e.config.session_ttl)
    e.audit = AuditLog(backend, reactor)
    e.keys = JwtKeys.load_or_create(str(tmp_path), "ES256")
    signer = JwtSigner(e.keys, "test", reactor, 300.0)
    e.registry = AgentRegistry()
    closed_port = await wait(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory()))
    dead = closed_port.getHost().port
    await closed_port.stopListening()

    def app(name, uri, labels=None, **kw):
        return AppInfo(name=name, uri=uri, labels=labels or {"env": "dev"},
                       public_addr=f"{name}.{PUBLIC}", agent_id="agent-1", **kw)

    e.registry.add(object(), "agent-1", [
        app("grafana", origin, rewrite_headers=(("X-Team", "{{internal.team}}"), ("X-Missing", "{{external.nope}}"))),
        app("prod", origin, {"env": "prod"}),
        app("ws", f"http://127.0.0.1:{ws_listener.getHost().port}"),
        app("down", f"http://127.0.0.1:{dead}"),
        app("ghost", origin),
        app("broken", f"http://127.0.0.1:{garbage.getHost().port}"),
    ])

    def connect_app(app_info, target, factory):
        if app_info.name == "ghost":  # no live tunnel: the production connector's answer
            return tunnel_connector(AgentRegistry())(app_info, target, factory)
        parts = urlsplit(app_info.uri)
        return TCP4ClientEndpoint(reactor, parts.hostname, parts.port).connect(factory)

    e.forwarder = AppForwarder(
        config=e.config, registry=e.registry, sessions=e.sessions, roles=RoleCache(backend, reactor),
        signer=signer, audit=e.audit, clock=reactor, connect_app=connect_app,
    )

    class Web(resource.Resource):
        isLeaf = True

        def render_GET(self, request):
            return b"proxy web ui"

    site = server.Site(Web())
    listener = await wait(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        EdgeFactory("apptunnel.localhost", site, e.forwarder)))
    e.port = listener.getHost().port
    e.webs = {}
    for user in (alice, bob):
        _, e.webs[user.name] = await wait(e.sessions.create_web_session(user))
    yield e
    e.events.release.callback(None) if not e.events.release.called else None
    for port in (listener, upstream, ws_listener, garbage):
        await port.stopListening()
    await wait(e.audit.stop())
    await wait(backend.close())


def header_map(echo):
    found = {}
    for name, value in echo["headers"]:
        found.setdefault(name.lower(), []).append(value)
    return found
