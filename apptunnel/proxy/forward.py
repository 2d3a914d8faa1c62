"""The app side of the edge: sign-in hand-off, RBAC, and relaying HTTP to the app.

Every user request to an app subdomain comes through here. ``AppForwarder.route`` decides
what a request head gets (a page or redirect answered here, or a rewritten head for the
app); ``AppConnection`` does the I/O. Only heads are parsed and rewritten: body bytes are
relayed as they arrive, framing untouched, with backpressure both ways (the client's
transport is paused while the app's stream cannot take more, and the other way round), so
memory per connection stays bounded whatever the body size.

One request at a time per client connection: the next head is read only after the
current response has ended. One stream to the app per client connection, opened for the
first authorized request and reused while both ends keep the connection alive.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import secrets
from collections import deque
from collections.abc import Callable
from urllib.parse import parse_qs, quote, quote_from_bytes, urlsplit

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IAddress, IPushProducer, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from apptunnel.auth.access import AccessPolicy, Allow, Deny, Facts, LiveRecheck
from apptunnel.auth.callers import Caller, certificate_caller
from apptunnel.auth.errors import AuthError
from apptunnel.auth.origins import own_origins, same_origin
from apptunnel.auth.sessions import PROXY_COOKIE_PREFIX
from apptunnel.config import UNREWRITABLE_HEADERS
from apptunnel.proxy import pages
from apptunnel.proxy.http1 import (
    BodyBytes,
    EndOfMessage,
    Headers,
    HttpError,
    RequestHead,
    RequestReader,
    ResponseHead,
    ResponseReader,
    Trailers,
    Upgraded,
    keep_alive,
)
from apptunnel.proxy.headers import (
    LOOPBACK_ORIGIN,
    client_headers,
    cookie_has_domain,
    identity_names,
    local_port_cross_site,
    valid_host,
)
from apptunnel.proxy.pool import AppEndpoint, ConnectApp, NoAgent, TunnelPool
from apptunnel.proxy.registry import AgentRegistry, AppInfo, host_only
from apptunnel.tunnel.errors import StreamRefused
from apptunnel.tunnel.frames import ErrorCode

APP_COOKIE = PROXY_COOKIE_PREFIX + "app"
STATE_COOKIE = PROXY_COOKIE_PREFIX + "state"
AUTH_PATH = b"/.apptunnel/auth"
LOGOUT_PATH = b"/.apptunnel/logout"
STATE_MAX_AGE = 300

# Bytes held per connection while a request is being authorized, and bytes of a request
# body thrown away after answering it here, before the connection is closed instead.
MAX_PENDING = 1024 * 1024
MAX_DISCARD = 1024 * 1024

_TEMPLATE = re.compile(r"\{\{\s*(internal|external)\.([A-Za-z0-9_.\-]+)\s*\}\}")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_LOCATION_SAFE = "!#$%&'()*+,/:;=?@[]~"

def _local_host_ok(host_raw: bytes | None, public_addr: str) -> bool:
    """Whether a request through a local port names a host no web page can rebind.

    The local port answers as the signed-in user whatever the Host, so a page on a DNS name
    an attacker points at 127.0.0.1 could read the app through it (DNS rebinding). Only
    names such a page cannot own pass: IP literals, single labels (``localhost``), names
    under ``.localhost`` (RFC 6761) and the app's own public name.
    """
    if host_raw is None:
        return True  # HTTP/1.0 without Host: not a browser's request
    host = host_only(host_raw.decode("latin-1"))
    if "." not in host or host.endswith(".localhost") or host.startswith("["):
        return True
    if host == host_only(public_addr):
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@attrs.frozen
class Answer:
    """A response the edge gives by itself (page, redirect)."""

    data: bytes
    status: int
    close: bool = False


@attrs.frozen
class Forward:
    """A request allowed through: the head to send and who is calling."""

    app: AppInfo
    head: RequestHead
    user: str
    upgrade: bool
    caller: Caller | None = None   # who was allowed, acting with the roles held now


def _is_upgrade(head: RequestHead) -> bool:
    """A WebSocket upgrade request (the only upgrade we forward)."""
    return (b"websocket" in head.headers.tokens(b"upgrade")
            and b"upgrade" in head.headers.tokens(b"connection"))


def _public_origin_ok(head: RequestHead, app: AppInfo) -> bool:
    """A WebSocket on an app host must be a GET from the app's own https origin."""
    origin = (head.headers.get(b"origin") or b"").decode("latin-1").lower()
    return head.method == b"GET" and origin == f"https://{app.public_addr}".lower()


def _cookies(headers: Headers) -> dict[str, str]:
    found: dict[str, str] = {}
    for value in headers.get_all(b"cookie"):
        for part in value.decode("latin-1").split(";"):
            name, sep, val = part.strip().partition("=")
            if sep and name not in found:
                found[name] = val.strip()
    return found


def _strip_proxy_cookies(headers: Headers) -> None:
    """Remove every cookie of ours from Cookie headers (an app must never see them)."""
    prefix = PROXY_COOKIE_PREFIX.encode("ascii")
    kept = []
    for name, value in headers:
        if name.lower() == b"cookie":
            parts = [p.strip() for p in value.split(b";")]
            parts = [p for p in parts if p and not p.startswith(prefix)]
            if not parts:
                continue
            value = b"; ".join(parts)
        kept.append((name, value))
    headers.replace_all(kept)


def _cookie_header(name: str, value: str, max_age: int) -> tuple[bytes, bytes]:
    text = f"{name}={value}; Path=/; Max-Age={max_age}; Secure; HttpOnly; SameSite=Lax"
    return b"Set-Cookie", text.encode("ascii")


@functools.lru_cache(maxsize=1024)
def _internal_origins(uri: str) -> tuple[str, ...]:
    """The spellings of the app's own origin that a Location header may use."""
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    default = {"http": 80, "https": 443}.get(scheme)
    port = parts.port or default
    origins = {f"{scheme}://{host}:{port}"}
    if port == default:
        origins.add(f"{scheme}://{host}")
    return tuple(sorted(origins, key=len, reverse=True))


@functools.lru_cache(maxsize=1024)
def _app_origins(public_addr: str) -> frozenset[str]:
    """The Origin values of the app's pages: https on its public address."""
    netloc = urlsplit("//" + public_addr).netloc
    host, sep, port = netloc.rpartition(":")
    if sep and port.isdigit() and (not host.startswith("[") or host.endswith("]")):
        return own_origins(host, int(port))
    return own_origins(netloc, 443)


@functools.lru_cache(maxsize=1024)
def _identity_names(jwt_header: str, rewrite_headers: tuple[tuple[str, str], ...]) -> frozenset[bytes]:
    return identity_names(jwt_header, (name for name, _ in rewrite_headers))


@functools.lru_cache(maxsize=1024)
def _app_host_header(uri: str) -> bytes:
    parts = urlsplit(uri)
    return parts.netloc.rpartition("@")[2].encode("ascii", "ignore")


def _expand(template: str, traits: dict) -> str | None:
    """Fill ``{{internal.x}}``/``{{external.x}}`` from traits; None if one is missing."""
    missing = False

    def fill(m: re.Match) -> str:
        nonlocal missing
        values = traits.get(m.group(2)) or ()
        if isinstance(values, str):
            values = (values,)
        if not values:
            missing = True
            return ""
        return ",".join(str(v) for v in values)

    value = _TEMPLATE.sub(fill, template)
    return None if missing else value


class AppForwarder(Factory):
    """Shared state of the app edge; builds one ``AppConnection`` per client connection."""

    _log = Logger()

    def __init__(
        self,
        *,
        config,
        registry: AgentRegistry,
        sessions,
        roles,
        signer,
        audit,
        clock: IReactorTime,
        connect_app: ConnectApp,
        idle_timeout: float = 120.0,
        head_timeout: float = 30.0,
        upgraded_idle_timeout: float = 3600.0,
        connect_timeout: float = 15.0,
        decision_ttl: float = 5.0,
        max_cached_decisions: int = 10000,
        ca=None,
        locks=None,
        users=None,
        access: AccessPolicy | None = None,
    ) -> None:
        self.config = config
        self.registry = registry
        self.sessions = sessions
        self.roles = roles
        self.signer = signer
        self.audit = audit
        self.clock = clock
        self.connect_app = connect_app
        self.idle_timeout = idle_timeout
        # Every request head must be whole this long after its first byte: the idle timer
        # alone restarts on each byte, so a head sent a byte a second would never end.
        self.head_timeout = head_timeout
        self.upgraded_idle_timeout = upgraded_idle_timeout
        self.connect_timeout = connect_timeout
        self._max_cached = max_cached_decisions
        # Every "may this caller open this app" goes to the one policy (shared with the
        # TCP access and the web UI when the proxy service hands it in).
        self.access = access or AccessPolicy(roles=roles, audit=audit, clock=clock, locks=locks,
                                             users=users, ttl=decision_ttl,
                                             max_cached=max_cached_decisions)
        self._jwt_header = config.jwt_header.encode("ascii")
        self._public_host = host_only(config.public_addr)
        # With the cluster CA, app hosts also accept a user certificate (apps config);
        # with a lock watcher, a new lock cuts the live connections it covers.
        self.ca = ca
        self.locks = locks
        self.connections: set[AppConnection] = set()
        self._cookies_dropped: set[tuple[str, bytes]] = set()  # (app, cookie name) logged once
        # A new lock, a removed user or a role change re-asks the policy for live ones.
        self.users = users
        LiveRecheck(self.access, clock, lambda: self.connections, registry.app,
                    locks=locks, users=users)
        registry.add_drain_listener(self._tunnel_draining)

    def buildProtocol(self, addr: IAddress) -> "AppConnection":
        return AppConnection(self)

    def fixed_connection(self, app_name: str, caller: Caller) -> "AppConnection":
        """A connection bound to one app and one certificate (``apptunnel proxy app``)."""
        return AppConnection(self, fixed_app=app_name, caller=caller)

    def forget_decisions(self) -> None:
        """Decide every request afresh (roles were edited: ``apptunnel create -f``)."""
        self.access.forget()

    def tunnel_of(self, proto) -> object | None:
        """The tunnel under a stream to an app (None when the connector does not say)."""
        pool = self.connect_app
        return pool.tunnel_of(proto) if isinstance(pool, TunnelPool) else None

    def draining(self, proto) -> bool:
        """Whether the tunnel under a stream to an app is going away."""
        pool = self.connect_app
        return pool.draining(proto) if isinstance(pool, TunnelPool) else False

    def _tunnel_draining(self, tunnel) -> None:
        """An agent is going away: connections idle between requests let go of their
        stream on its tunnel now, so it can close; busy ones finish first."""
        for conn in list(self.connections):
            conn.tunnel_draining(tunnel)

    # Deciding what a request gets

    async def route(self, head: RequestHead, client_ip: str,
                    caller: Caller | None = None) -> Answer | Forward:
        """Answer here (hand-off, logout, sign-in redirect, refusal) or allow through.

        ``caller`` is the connection's verified user certificate, used only when the
        request carries no valid app session (a browser without one is unaffected).
        """
        head_only = head.method == b"HEAD"
        close = not keep_alive(head.version, head.headers)

        def page(status: int, headers=(), close_now: bool = False) -> Answer:
            c = close or close_now
            return Answer(pages.error_response(status, headers=headers, close=c, head_only=head_only), status, c)

        host_raw = head.headers.get(b"host")
        if not valid_host(host_raw):
            return page(400, close_now=True)
        host = host_raw.decode("latin-1")
        app = self.registry.app_by_host(host)
        if app is None:
            return page(421 if host_only(host) == self._public_host else 404)
        if app.kind == "tcp":
            message = f"TCP app: use apptunnel proxy app {app.name}"
            return Answer(pages.error_response(400, message, close=True, head_only=head_only), 400, True)
        if head.method == b"CONNECT" or not head.target.startswith(b"/"):
            # A 2xx to CONNECT would make the connection a raw pipe to the app, past
            # header stripping, the JWT and the audit: never forward one.
            return page(405 if head.method == b"CONNECT" else 400, close_now=True)
        path, _, query = head.target.partition(b"?")
        cookies = _cookies(head.headers)

        if path == AUTH_PATH:
            return await self._redeem(app, query, cookies, close, head_only)
        if path == LOGOUT_PATH:
            return await self._logout(app, head, cookies, close, head_only)

        upgrade = _is_upgrade(head)
        facts = Facts(client_ip=client_ip, method=head.method.decode("latin-1"),
                      path=path.decode("latin-1"), upgrade=upgrade,
                      origin_ok=not upgrade or _public_origin_ok(head, app))
        app_session = await self.sessions.app_session(cookies.get(APP_COOKIE), app.name)
        decision = None
        if app_session is not None:
            now = self.clock.seconds()
            # A cached decision needs no look at the session behind the cookie.
            decision = self.access.recall(app_session.id_hash, app_session.user, app, facts, now)
            if decision is None:
                session_caller = await self.sessions.caller(app_session)
                if session_caller is not None:
                    decision = await self.access.decide(session_caller, app, facts, now)
        if decision is None or (isinstance(decision, Deny) and decision.code == "user_removed"):
            # No session (or one whose user is gone): a certificate, else sign in.
            if caller is not None and self.clock.seconds() < caller.expires:
                return await self._by_certificate(head, app, caller, client_ip, False)
            if head.method not in (b"GET", b"HEAD"):
                return page(401)
            return self._launch(app, head.target, close, head_only)
        if not isinstance(decision, Allow):
            if isinstance(decision, Deny) and decision.code == "origin":
                self._log.info("refused WebSocket upgrade to {app} from origin {origin}", app=app.name,
                               origin=(head.headers.get(b"origin") or b"").decode("latin-1").lower())
            return page(403)
        who = decision.caller
        return Forward(app, self._app_head(head, app, who, client_ip, upgrade), who.user, upgrade, who)

    async def route_fixed(self, head: RequestHead, client_ip: str, app_name: str,
                          caller: Caller) -> Answer | Forward:
        """A request of a fixed-app connection: the app and caller are the connection's,
        whatever Host says; no cookies, no hand-off."""
        head_only = head.method == b"HEAD"
        if self.clock.seconds() >= caller.expires:
            message = "certificate expired: run apptunnel login"
            return Answer(pages.error_response(401, message, close=True, head_only=head_only), 401, True)
        app = self.registry.app(app_name)
        if app is None:
            close = not keep_alive(head.version, head.headers)
            return Answer(pages.error_response(503, close=close, head_only=head_only), 503, close)
        if head.method == b"CONNECT":
            return Answer(pages.error_response(405, close=True, head_only=head_only), 405, True)
        host_raw = head.headers.get(b"host")
        if not head.target.startswith(b"/") or (host_raw is not None and not valid_host(host_raw)):
            return Answer(pages.error_response(400, close=True, head_only=head_only), 400, True)
        if not _local_host_ok(head.headers.get(b"host"), app.public_addr):
            self._log.info("refused {app} through a local port for Host {host!r}", app=app.name,
                           host=(head.headers.get(b"host") or b"").decode("latin-1")[:100])
            return Answer(pages.error_response(421, close=True, head_only=head_only), 421, True)
        why = local_port_cross_site(head.headers, f"https://{app.public_addr}")
        if why is not None:
            self._log.info("refused {app} through a local port for {user}: {why}", app=app.name,
                           user=caller.user, why=why)
            self.audit.emit("access.denied", actor=caller.user, target=app.name, outcome="failure",
                            reason=why, client_ip=client_ip, method=head.method.decode("latin-1"),
                            path=head.target.partition(b"?")[0].decode("latin-1"))
            return Answer(pages.error_response(403, close=True, head_only=head_only), 403, True)
        return await self._by_certificate(head, app, caller, client_ip, True)

    async def _by_certificate(self, head: RequestHead, app: AppInfo, caller: Caller,
                              client_ip: str, fixed: bool) -> Answer | Forward:
        """The policy's decision for a certificate caller, as for sessions."""
        head_only = head.method == b"HEAD"
        close = not keep_alive(head.version, head.headers)
        upgrade = _is_upgrade(head)
        if not upgrade:
            origin_ok = True
        elif fixed:
            # Through a local port: a browser page must come from a loopback origin.
            origin = (head.headers.get(b"origin") or b"").decode("latin-1").lower()
            origin_ok = head.method == b"GET" and (not origin or LOOPBACK_ORIGIN.fullmatch(origin) is not None)
        else:
            origin_ok = _public_origin_ok(head, app)
        facts = Facts(client_ip=client_ip, method=head.method.decode("latin-1"),
                      path=head.target.partition(b"?")[0].decode("latin-1"),
                      upgrade=upgrade, origin_ok=origin_ok)
        decision = await self.access.decide(caller, app, facts, self.clock.seconds())
        if not isinstance(decision, Allow):
            message = decision.message if isinstance(decision, Deny) and decision.message else None
            return Answer(pages.error_response(403, message, close=close, head_only=head_only),
                          403, close)
        who = decision.caller
        return Forward(app, self._app_head(head, app, who, client_ip, upgrade), who.user, upgrade, who)

    async def _redeem(self, app: AppInfo, query: bytes, cookies: dict, close: bool, head_only: bool) -> Answer:
        codes = parse_qs(query.decode("latin-1")).get("code") or [""]
        clear_state = _cookie_header(STATE_COOKIE, "", 0)
        try:
            secret, app_session, path = await self.sessions.redeem_auth_code(
                codes[0], cookies.get(STATE_COOKIE), app.name
            )
        except AuthError as err:
            self._log.info("app hand-off to {app} refused: {why}", app=app.name, why=err.message)
            self.audit.emit("session.app.start", target=app.name, outcome="failure", reason=err.message)
            return Answer(
                pages.error_response(400, "This sign-in link is not valid. Open the app again.",
                                     [clear_state], close=close, head_only=head_only), 400, close,
            )
        max_age = max(0, int(app_session.expires - self.clock.seconds()))
        self.audit.emit("session.app.start", actor=app_session.user, target=app.name)
        location = quote(path, safe=_LOCATION_SAFE)
        data = pages.redirect_response(
            location, [_cookie_header(APP_COOKIE, secret, max_age), clear_state],
            close=close, head_only=head_only,
        )
        return Answer(data, 302, close)

    async def _logout(self, app: AppInfo, head: RequestHead, cookies: dict, close: bool,
                      head_only: bool) -> Answer:
        """GET shows a sign-out button; only a same-origin POST (what it sends) signs out.

        A GET that signed out could be fired by any page (``<img src=.../logout>``); the
        POST must prove with Origin or Referer that it came from the app's own page, as
        the proxy's own logout does.
        """
        if head.method in (b"GET", b"HEAD"):
            return Answer(pages.logout_response(app.name, LOGOUT_PATH.decode("ascii"), close=close,
                                                head_only=head_only), 200, close)
        if head.method != b"POST":
            return Answer(pages.error_response(405, headers=[(b"Allow", b"GET, POST")], close=close), 405, close)
        origin, referer = head.headers.get(b"origin"), head.headers.get(b"referer")
        proof = same_origin(None if origin is None else origin.decode("latin-1"),
                            None if referer is None else referer.decode("latin-1"),
                            _app_origins(app.public_addr))
        if proof is not True:
            self._log.info("refused a cross-site logout on {app}", app=app.name)
            return Answer(pages.error_response(403, "This sign-out was not sent from this app.",
                                               close=close), 403, close)
        secret = cookies.get(APP_COOKIE)
        if secret:
            app_session = await self.sessions.app_session(secret, app.name)
            await self.sessions.end_app_session(secret)
            if app_session is not None:
                self.access.forget(app_session.id_hash, app.name)
                self.signer.forget(app_session.id_hash)
                self.audit.emit("session.app.end", actor=app_session.user, target=app.name)
        data = pages.redirect_response(
            f"https://{self.config.public_addr}/", [_cookie_header(APP_COOKIE, "", 0)],
            close=close, status=303,
        )
        return Answer(data, 303, close)

    def _launch(self, app: AppInfo, target: bytes, close: bool, head_only: bool) -> Answer:
        """Send the browser to sign in at the proxy, bound to a fresh state cookie."""
        state = secrets.token_urlsafe(32)
        location = (
            f"https://{self.config.public_addr}/web/launch/{quote(app.name, safe='')}"
            f"?path={quote_from_bytes(target, safe='')}&state={state}"
        )
        data = pages.redirect_response(
            location, [_cookie_header(STATE_COOKIE, state, STATE_MAX_AGE)], close=close, head_only=head_only,
        )
        return Answer(data, 302, close)

    def _app_head(self, head: RequestHead, app: AppInfo, web: Caller, client_ip: str,
                  upgrade: bool) -> RequestHead:
        """The head the app sees: no hop-by-hop or spoofable headers, ours added.

        ``web`` is who acts (user, roles and traits held now); its credential keys the
        signer's token cache.
        """
        identity = _identity_names(self.config.jwt_header, app.rewrite_headers)
        out = client_headers(head.headers, identity)
        _strip_proxy_cookies(out)
        out.set(b"Host", _app_host_header(app.uri))
        if upgrade:
            out.add(b"Connection", b"Upgrade")
            out.add(b"Upgrade", b"websocket")
        out.add(b"X-Forwarded-For", client_ip.encode("ascii", "replace"))
        out.add(b"X-Forwarded-Proto", b"https")
        # The app's public address, never the client's Host: the app builds URLs from it.
        out.add(b"X-Forwarded-Host", app.public_addr.encode("ascii", "replace"))
        token = self.signer.token(
            web.credential, web.user, web.roles, web.traits,
            audience=f"https://{app.public_addr}", claims=app.jwt_claims,
        )
        out.add(self._jwt_header, token.encode("ascii"))
        for name, template in app.rewrite_headers:
            value = _expand(template, web.traits)
            if (value is None or _TOKEN.fullmatch(name) is None or _BAD_VALUE.search(value)
                    or name.lower() in UNREWRITABLE_HEADERS):
                self._log.debug("skipped header rewrite {name} for {app}", name=name, app=app.name)
                continue
            out.set(name.encode("ascii"), value.encode("utf-8"))
        return RequestHead(head.method, head.target, head.version, out)

    def _cookie_dropped(self, app: str, name: bytes) -> None:
        """One log line per (app, cookie name), not one per response."""
        if (app, name) in self._cookies_dropped:
            return
        if len(self._cookies_dropped) >= self._max_cached:
            self._cookies_dropped.clear()
        self._cookies_dropped.add((app, name))
        self._log.info("dropped a Set-Cookie with a Domain from app {app}: {name} (only host-only "
                       "cookies reach the browser)", app=app, name=name.decode("latin-1"))

    def response_head(self, head: ResponseHead, app: AppInfo, fixed: bool = False) -> ResponseHead:
        """The head the client sees: app-origin redirects made public, our cookies kept ours.

        On a fixed-app connection the client reached us through a local port whose address
        we do not know, so app-origin redirects become origin-relative instead.
        """
        prefix = PROXY_COOKIE_PREFIX.encode("ascii")
        public = "" if fixed else f"https://{app.public_addr}"
        origins = _internal_origins(app.uri)
        out = []
        for name, value in head.headers:
            lname = name.lower()
            if lname == b"set-cookie" and value.lstrip().startswith(prefix):
                continue
            if lname == b"set-cookie" and cookie_has_domain(value):
                self._cookie_dropped(app.name, value.partition(b"=")[0].strip()[:100])
                continue
            if lname == b"location":
                text = value.decode("latin-1")
                low = text.lower()
                for origin in origins:
                    if low.startswith(origin) and (len(text) == len(origin) or text[len(origin)] in "/?#"):
                        value = (public + text[len(origin):] or "/").encode("latin-1")
                        break
            out.append((name, value))
        return ResponseHead(head.version, head.status, head.reason, Headers(out))


@attrs.define
class _Exchange:
    """One request/response on a client connection, for relaying and the audit record."""

    method: bytes
    path: bytes
    started: float
    keep_alive: bool
    version: bytes
    app: AppInfo | None = None
    user: str = ""
    forwarding: bool = False
    upgrade: bool = False
    status: int = 0
    head_sent: bool = False
    request_done: bool = False
    response_done: bool = False
    bytes_in: int = 0
    bytes_out: int = 0
    discarded: int = 0


@implementer(IPushProducer)
class _Valve:
    """A producer registered with one side's transport that pauses the other side."""

    def __init__(self, pause: Callable[[], None], resume: Callable[[], None]) -> None:
        self.pauseProducing = pause
        self.resumeProducing = resume

    def stopProducing(self) -> None:
        pass


class _AppSide(Protocol):
    """The byte stream to the app; everything goes to the owning AppConnection."""

    def __init__(self, conn: "AppConnection") -> None:
        self._conn = conn

    def dataReceived(self, data: bytes) -> None:
        self._conn.app_data(self, data)

    def connectionLost(self, reason: Failure) -> None:
        self._conn.app_lost(self, reason)


class _AppSideFactory(Factory):
    def __init__(self, conn: "AppConnection") -> None:
        self._conn = conn

    def buildProtocol(self, addr) -> _AppSide:
        return _AppSide(self._conn)


_UNKNOWN = object()  # the connection's certificate has not been looked at yet


class AppConnection(Protocol):
    """One client connection to app hosts: requests in order, each authorized and relayed.

    In fixed-app mode (``fixed_app`` and ``caller`` given, after an ``apptunnel-tcp``
    upgrade for an HTTP app) every request goes to that app as that certificate's user.
    ``user`` / ``app_name`` say who the connection currently serves, for locks.
    """

    _log = Logger()

    def __init__(self, forwarder: AppForwarder, fixed_app: str | None = None,
                 caller: Caller | None = None) -> None:
        self._fw = forwarder
        self._fixed_app = fixed_app
        self._cert = caller if fixed_app is not None else _UNKNOWN
        self.user = caller.user if fixed_app is not None and caller is not None else ""
        self.app_name = fixed_app
        self.caller = caller if fixed_app is not None else None  # who the policy last allowed
        self._expiry = None
        self._clock = forwarder.clock
        self._reader = RequestReader()
        self._pending: deque = deque()
        self._pending_bytes = 0
        self._pumping = False
        self._routing = False
        self._ex: _Exchange | None = None
        self._upstream: _AppSide | None = None
        self._upstream_app: str | None = None
        self._resp = ResponseReader()
        self._connecting: defer.Deferred | None = None
        self._client_pauses: set[str] = set()
        self._client_full = False
        self._raw = False
        self._closing = False
        self._closed = False
        self._client_ip = ""
        self._last_active = 0.0
        self._timer = None
        self._head_timer = None

    # Client side

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self._client_ip = getattr(peer, "host", "") or ""
        self.transport.registerProducer(_Valve(self._client_blocked, self._client_unblocked), True)
        self._fw.connections.add(self)
        if self._fixed_app is not None:
            delay = max(0.0, self._cert.expires - self._clock.seconds())
            self._expiry = self._clock.callLater(delay, self.cut)
        self._touch()

    def cut(self) -> None:
        """End the connection now (a lock, an expired certificate), whatever is in flight."""
        if self._closed:
            return
        self._close()
        self.transport.abortConnection()

    def refused(self, deny) -> None:
        """The policy no longer allows this connection's caller (lock, removed user, roles)."""
        self._log.info("{user} may no longer open {app} ({why}): cutting their connection",
                       user=self.user, app=self.app_name, why=deny.reason)
        self.cut()

    def is_idle(self) -> bool:
        """Between requests (no exchange, not upgraded): the connection limits may shed it."""
        return self._ex is None and not self._raw

    def tunnel_draining(self, tunnel) -> None:
        """Close our idle upstream stream if it rides on ``tunnel`` (which is going away).

        Only between requests: an exchange in progress keeps its stream until the response
        ends (``_finish`` then lets it go), and an upgraded connection keeps relaying.
        """
        if self._raw or self._closing or self._upstream is None:
            return
        if self._ex is not None and self._ex.forwarding:
            return
        if self._fw.tunnel_of(self._upstream) is tunnel:
            self._drop_upstream(abort=False)

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        self._last_active = self._clock.seconds()
        if self._raw:
            if self._upstream is not None:
                self._upstream.transport.write(data)
            return
        try:
            events = self._reader.receive(data)
        except HttpError as err:
            self._bad_request(err)
            return
        self._queue(events)
        self._watch_head()
        # Pause only when the client actually sends more while we are busy with a request:
        # what arrived is held (one read at most), and the common case (one request, then
        # wait for its response) costs no syscalls.
        if self._routing and not self._closing:
            self._pause_client("routing")
        if (self._ex is not None and self._reader.state == "done" and self._reader.held
                and not self._closing):
            self._pause_client("waiting")

    def connectionLost(self, reason: Failure) -> None:
        self._closed = self._closing = True
        self._fw.connections.discard(self)
        if self._expiry is not None and self._expiry.active():
            self._expiry.cancel()
        self._expiry = None
        self._cancel_timer()
        self._cancel_head_timer()
        if self._connecting is not None:
            self._connecting.cancel()
        ex = self._ex
        if ex is not None and not ex.response_done:
            self._audit(ex, incomplete=True)
        self._ex = None
        self._drop_upstream(abort=True)
        self._pending.clear()

    def _queue(self, events: list) -> None:
        for event in events:
            if isinstance(event, (BodyBytes, Trailers)):
                self._pending_bytes += len(event.data)
        self._pending.extend(events)
        if self._pending_bytes > MAX_PENDING:
            self._log.warn("client {ip} sent too much while waiting; closing", ip=self._client_ip)
            self._close()
            return
        self._pump()

    def _pump(self) -> None:
        """Handle queued request events until one needs an asynchronous decision."""
        if self._pumping:
            return
        self._pumping = True
        try:
            while self._pending and not self._routing and not self._closing:
                event = self._pending.popleft()
                if isinstance(event, RequestHead):
                    self._begin(event)
                elif isinstance(event, BodyBytes):
                    self._pending_bytes -= len(event.data)
                    self._request_body(event.data)
                elif isinstance(event, Trailers):
                    # Trailer fields would reach the app as header fields past our
                    # stripping (a JWT header, a rewrite header): an empty section goes instead.
                    self._pending_bytes -= len(event.data)
                    self._request_body(b"\r\n")
                elif isinstance(event, EndOfMessage):
                    self._request_end()
        finally:
            self._pumping = False

    def _begin(self, head: RequestHead) -> None:
        path = head.target.partition(b"?")[0]
        self._ex = _Exchange(
            method=head.method, path=path, started=self._clock.seconds(),
            keep_alive=keep_alive(head.version, head.headers), version=head.version,
        )
        self._routing = True
        if self._fixed_app is not None:
            routing = self._fw.route_fixed(head, self._client_ip, self._fixed_app, self._cert)
        else:
            if self._cert is _UNKNOWN:
                # A TLS connection's certificate cannot change: verify it once.
                self._cert = certificate_caller(self._fw.ca, self.transport, self._clock.seconds())
            routing = self._fw.route(head, self._client_ip, self._cert)
        d = defer.Deferred.fromCoroutine(routing)
        d.addCallback(self._routed, self._ex)
        d.addErrback(self._route_failed, self._ex)

    def _routed(self, outcome: Answer | Forward, ex: _Exchange) -> None:
        if self._closing or ex is not self._ex:
            return
        if isinstance(outcome, Answer):
            self._answer(outcome)
            return
        ex.app, ex.user, ex.upgrade = outcome.app, outcome.user, outcome.upgrade
        self.user, self.app_name = outcome.user, outcome.app.name
        self.caller = outcome.caller
        if (self._upstream is not None and self._upstream_app == outcome.app.name
                and not self._fw.draining(self._upstream)):
            self._send_head(outcome)
            return
        self._drop_upstream(abort=False)
        target = {"app": outcome.app.name, "user": outcome.user, "client": self._client_address()}
        d = AppEndpoint(self._fw.connect_app, outcome.app, target).connect(_AppSideFactory(self))
        d.addTimeout(self._fw.connect_timeout, self._clock)
        self._connecting = d
        d.addCallbacks(self._app_connected, self._connect_failed,
                       callbackArgs=(outcome, ex), errbackArgs=(outcome, ex))

    def _route_failed(self, failure: Failure, ex: _Exchange) -> None:
        self._log.failure("routing a request failed", failure)
        if not self._closing and ex is self._ex:
            self._answer(Answer(pages.error_response(500, close=True), 500, True))

    def _app_connected(self, proto: _AppSide, outcome: Forward, ex: _Exchange) -> None:
        self._connecting = None
        if self._closing or ex is not self._ex:
            proto.transport.loseConnection()
            return
        self._upstream = proto
        self._upstream_app = outcome.app.name
        self._resp = ResponseReader()
        proto.transport.registerProducer(
            _Valve(lambda: self._app_full(proto, True), lambda: self._app_full(proto, False)), True
        )
        if self._client_full:
            proto.transport.pauseProducing()
        self._send_head(outcome)

    def _connect_failed(self, failure: Failure, outcome: Forward, ex: _Exchange) -> None:
        self._connecting = None
        if self._closing or ex is not self._ex:
            return
        err = failure.value
        if isinstance(err, NoAgent) or (isinstance(err, StreamRefused) and err.code == ErrorCode.UNKNOWN_TARGET):
            status = 503
        elif isinstance(err, (defer.TimeoutError, defer.CancelledError)):
            status = 504
        else:
            status = 502
        self._log.warn(
            "cannot reach app {app} for {user}: {why}", app=outcome.app.name, user=outcome.user,
            why=failure.getErrorMessage() or failure.type.__name__,
        )
        ex.status = status
        self._answer(Answer(pages.error_response(status, close=not ex.keep_alive,
                                                 head_only=ex.method == b"HEAD"), status, not ex.keep_alive))

    def _send_head(self, outcome: Forward) -> None:
        ex = self._ex
        ex.forwarding = True
        self._routing = False
        held = self._resp.start(ex.method)
        self._upstream.transport.write(outcome.head.to_bytes())
        self._resume_client("routing")
        if held:
            self._relay(held)
        self._pump()

    def _answer(self, answer: Answer) -> None:
        """Give a locally made response; the rest of the request body is thrown away."""
        ex = self._ex
        self._routing = False
        ex.status = answer.status
        ex.response_done = True
        self.transport.write(answer.data)
        if answer.close:
            self._ex = None
            self._audit(ex)  # only exchanges that got as far as an app are audited
            self._close()
            return
        self._resume_client("routing")
        if ex.request_done:
            self._finish()
        else:
            self._pump()

    def _request_body(self, data) -> None:
        ex = self._ex
        ex.bytes_in += len(data)
        if ex.forwarding and self._upstream is not None and not ex.response_done:
            self._upstream.transport.write(data)
        else:
            ex.discarded += len(data)
            if ex.discarded > MAX_DISCARD:
                self._close()

    def _request_end(self) -> None:
        ex = self._ex
        ex.request_done = True
        if ex.response_done:
            self._finish()

    def _finish(self) -> None:
        """Both halves of an exchange are done: audit it and read the next request."""
        ex = self._ex
        self._ex = None
        self._audit(ex)
        if not ex.keep_alive:
            self._close()
            return
        if self._upstream is not None and self._fw.draining(self._upstream):
            self._drop_upstream(abort=False)  # the next request opens a stream elsewhere
        self._resume_client("waiting")
        try:
            events = self._reader.next_message()
        except HttpError as err:
            self._bad_request(err)
            return
        self._queue(events)
        self._watch_head()

    def _bad_request(self, err: HttpError) -> None:
        self._log.info("bad request from {ip}: {why}", ip=self._client_ip, why=err.reason)
        ex = self._ex
        if ex is not None and ex.head_sent:
            self._close()  # mid-exchange: the response already started, just stop
            return
        status = err.status if err.status in (400, 431, 501, 505) else 400
        self.transport.write(pages.error_response(status, close=True))
        self._close()

    # App side

    def app_data(self, proto: _AppSide, data: bytes) -> None:
        if proto is not self._upstream or self._closing:
            return
        self._last_active = self._clock.seconds()
        if self._raw:
            self.transport.write(data)
            return
        try:
            events = self._resp.receive(data)
        except HttpError as err:
            self._app_broken(err)
            return
        self._relay(events)

    def app_lost(self, proto: _AppSide, reason: Failure) -> None:
        if proto is not self._upstream:
            return
        self._upstream = None
        self._resume_client("app-full")
        if self._closing:
            return
        if self._raw:
            self._close()
            return
        ex = self._ex
        if ex is None or not ex.forwarding or ex.response_done:
            return
        try:
            events = self._resp.connection_closed()
        except HttpError as err:
            self._app_broken(err)
            return
        self._relay(events)

    def _relay(self, events: list) -> None:
        out: list = []
        ex = self._ex
        for event in events:
            if isinstance(event, (BodyBytes, Trailers)):
                out.append(event.data)
                if ex is not None:
                    ex.bytes_out += len(event.data)
            elif isinstance(event, ResponseHead):
                if ex is None or not ex.forwarding:
                    self._app_broken(HttpError(502, "response without a request"))
                    return
                if event.status == 101 and not ex.upgrade:
                    self._app_broken(HttpError(502, "upgrade the client did not ask for"))
                    return
                if event.status < 200 and event.status != 101:
                    if ex.version != b"HTTP/1.0":
                        out.append(event.to_bytes())
                    continue
                ex.status = event.status
                ex.head_sent = True
                out.append(self._fw.response_head(event, ex.app, self._fixed_app is not None).to_bytes())
                if self._resp.must_close and event.status != 101:
                    ex.keep_alive = False
            elif isinstance(event, Upgraded):
                self._flush(out)
                self._go_raw()
            elif isinstance(event, EndOfMessage):
                self._flush(out)
                self._response_end()
                if self._closing:
                    return
        self._flush(out)

    def _flush(self, out: list) -> None:
        if out and not self._closing:
            self.transport.writeSequence(out)
        out.clear()

    def _response_end(self) -> None:
        ex = self._ex
        ex.response_done = True
        if self._resp.must_close:
            self._drop_upstream(abort=False)
        if ex.request_done:
            self._finish()
        else:
            # The app answered before the whole body arrived: stop here rather than
            # guess whether it still wants the rest.
            self._audit(ex)
            self._ex = None
            self._close()

    def _go_raw(self) -> None:
        """After a 101: the connection is a plain byte relay both ways from now on."""
        ex = self._ex
        self._raw = True
        self._ex = None
        self._audit(ex)
        rest = self._reader.switch_to_raw()
        self._pending.clear()
        self._pending_bytes = 0
        if rest:
            self._upstream.transport.write(rest)
        self._resume_client("waiting")
        self._resume_client("routing")

    def _app_broken(self, err: HttpError) -> None:
        ex = self._ex
        self._log.warn(
            "bad response from app {app}: {why}", app=ex.app.name if ex and ex.app else "?", why=err.reason,
        )
        self._drop_upstream(abort=True)
        if ex is not None and ex.forwarding and not ex.head_sent:
            ex.status = 502
            self.transport.write(pages.error_response(502, close=True))
        if ex is not None and ex.forwarding:
            self._audit(ex, incomplete=not ex.head_sent)
            self._ex = None
        self._close()

    # Flow control and lifetime

    def _pause_client(self, why: str) -> None:
        if not self._client_pauses and not self._closing:
            self.transport.pauseProducing()
        self._client_pauses.add(why)

    def _resume_client(self, why: str) -> None:
        if why in self._client_pauses:
            self._client_pauses.discard(why)
            if not self._client_pauses and not self._closing:
                self.transport.resumeProducing()

    def _app_full(self, proto: _AppSide, full: bool) -> None:
        """The app's stream cannot take more: stop reading the client (current stream only)."""
        if proto is not self._upstream:
            return
        if full:
            self._pause_client("app-full")
        else:
            self._resume_client("app-full")

    def _client_blocked(self) -> None:
        """The client's transport is full: stop reading from the app."""
        self._client_full = True
        if self._upstream is not None:
            self._upstream.transport.pauseProducing()

    def _client_unblocked(self) -> None:
        self._client_full = False
        if self._upstream is not None:
            self._upstream.transport.resumeProducing()

    def _drop_upstream(self, abort: bool) -> None:
        proto, self._upstream, self._upstream_app = self._upstream, None, None
        self._resume_client("app-full")
        if proto is None or proto.transport is None:
            return
        if abort and hasattr(proto.transport, "abortConnection"):
            proto.transport.abortConnection()
        else:
            proto.transport.loseConnection()

    def _close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._cancel_timer()
        self._cancel_head_timer()
        ex, self._ex = self._ex, None
        in_flight = ex is not None and not ex.response_done
        if in_flight:
            self._audit(ex, incomplete=True)
        # A finished exchange lets the app side close gracefully; anything else is cut.
        self._drop_upstream(abort=in_flight or self._raw)
        self.transport.unregisterProducer()
        self.transport.loseConnection()

    def _watch_head(self) -> None:
        """Start the head deadline at a head's first byte; stop it once the head is read."""
        waiting = self._reader.state == "head" and self._reader.held > 0 and not self._closing
        if waiting and self._head_timer is None:
            self._head_timer = self._clock.callLater(self._fw.head_timeout, self._head_late)
        elif not waiting:
            self._cancel_head_timer()

    def _head_late(self) -> None:
        self._head_timer = None
        if self._closing or self._reader.state != "head":
            return
        self._log.info("request head from {ip} not complete in time; closing", ip=self._client_ip)
        self.transport.write(pages.error_response(408, close=True))
        self._close()

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None and self._head_timer.active():
            self._head_timer.cancel()
        self._head_timer = None

    def _touch(self) -> None:
        self._last_active = self._clock.seconds()
        self._timer = self._clock.callLater(self._fw.idle_timeout, self._idle_check)

    def _idle_check(self) -> None:
        """Close after a quiet spell; the timer re-arms instead of resetting per packet."""
        self._timer = None
        if self._closing:
            return
        limit = self._fw.upgraded_idle_timeout if self._raw else self._fw.idle_timeout
        quiet = self._clock.seconds() - self._last_active
        if quiet < limit:
            self._timer = self._clock.callLater(limit - quiet, self._idle_check)
            return
        ex = self._ex
        self._log.info("closing idle connection from {ip}", ip=self._client_ip)
        if ex is not None and not ex.head_sent and ex.forwarding:
            ex.status = 504
            self.transport.write(pages.error_response(504, close=True))
        self._close()

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _client_address(self) -> str:
        peer = self.transport.getPeer()
        return f"{getattr(peer, 'host', '')}:{getattr(peer, 'port', '')}"

    def _audit(self, ex: _Exchange, incomplete: bool = False) -> None:
        if ex.app is None:
            return
        fields = dict(
            method=ex.method.decode("latin-1"),
            path=ex.path.decode("latin-1"),
            status=ex.status,
            bytes_in=ex.bytes_in,
            bytes_out=ex.bytes_out,
            duration_ms=round((self._clock.seconds() - ex.started) * 1000.0, 3),
            user=ex.user,
            app=ex.app.name,
            client_ip=self._client_ip,
        )
        if incomplete:
            fields["incomplete"] = True
        outcome = "failure" if incomplete or ex.status >= 500 else "success"
        self._fw.audit.emit("app.request", actor=ex.user, target=ex.app.name, outcome=outcome, **fields)
