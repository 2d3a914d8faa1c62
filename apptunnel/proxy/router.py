"""What a request to an app host gets: an answer given here, or a head to forward.

``AppRouter.route`` takes a request head and who the connection is (its certificate, if
any; the cookies are in the head) and returns an `Answer` (the sign-in hand-off, the
app-host logout, the launch redirect, a refusal) or a `Forward` (the rewritten head and
who it acts as). It does no socket I/O: the connection (``proxy/app_connection.py``) acts
on what it returns. Whether the caller may open the app is the access policy's decision
(``auth/access.py``); the WebSocket origin rule is the router's, because the right origin
depends on the listener the request came through, and its verdict goes to the policy as
a fact.
"""

from __future__ import annotations

import functools
import ipaddress
import secrets
from urllib.parse import parse_qs, quote, quote_from_bytes, urlsplit

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from apptunnel.auth.access import AccessPolicy, Allow, Deny, Facts, NeedsMore
from apptunnel.auth.callers import Caller
from apptunnel.auth.errors import AuthError
from apptunnel.auth.origins import own_origins, same_origin
from apptunnel.auth.sessions import PROXY_COOKIE_PREFIX
from apptunnel.proxy import pages
from apptunnel.proxy.app_heads import app_request_head
from apptunnel.proxy.headers import LOOPBACK_ORIGIN, local_port_cross_site, valid_host
from apptunnel.proxy.http1 import Headers, RequestHead, keep_alive
from apptunnel.catalog import AppInfo
from apptunnel.net import host_only
from apptunnel.proxy.registry import AgentRegistry

APP_COOKIE = PROXY_COOKIE_PREFIX + "app"
STATE_COOKIE = PROXY_COOKIE_PREFIX + "state"
AUTH_PATH = b"/.apptunnel/auth"
LOGOUT_PATH = b"/.apptunnel/logout"
STATE_MAX_AGE = 300
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


def _cookie_header(name: str, value: str, max_age: int) -> tuple[bytes, bytes]:
    text = f"{name}={value}; Path=/; Max-Age={max_age}; Secure; HttpOnly; SameSite=Lax"
    return b"Set-Cookie", text.encode("ascii")


@functools.lru_cache(maxsize=1024)
def _app_origins(public_addr: str) -> frozenset[str]:
    """The Origin values of the app's pages: https on its public address."""
    netloc = urlsplit("//" + public_addr).netloc
    host, sep, port = netloc.rpartition(":")
    if sep and port.isdigit() and (not host.startswith("[") or host.endswith("]")):
        return own_origins(host, int(port))
    return own_origins(netloc, 443)


class AppRouter:
    """Decides what each request head on an app host gets; see the module docstring."""

    _log = Logger()

    def __init__(self, *, config, registry: AgentRegistry, sessions, access: AccessPolicy,
                 signer, audit, clock: IReactorTime) -> None:
        self.config = config
        self.registry = registry
        self.sessions = sessions
        self.access = access
        self.signer = signer
        self.audit = audit
        self.clock = clock
        self._public_host = host_only(config.public_addr)
        self._home = pages.home_origin(config.public_host, config.public_port)

    def _error(self, head: RequestHead, status: int, message: str | None = None, *,
               headers=(), close: bool, head_only: bool = False) -> Answer:
        """An error page on an app host: styled, linking home, naming the request id."""
        return Answer(pages.error_response(status, message, headers, close=close,
                                           head_only=head_only, home=self._home,
                                           request_id=head.request_id), status, close)

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
            return self._error(head, status, headers=headers, head_only=head_only, close=c)

        host_raw = head.headers.get(b"host")
        if not valid_host(host_raw):
            return page(400, close_now=True)
        host = host_raw.decode("latin-1")
        app = self.registry.app_by_host(host)
        if app is None:
            return page(421 if host_only(host) == self._public_host else 404)
        if app.kind == "tcp":
            message = f"TCP app: use apptunnel proxy app {app.name}"
            return self._error(head, 400, message, head_only=head_only, close=True)
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

        app_session = await self.sessions.app_session(cookies.get(APP_COOKIE), app.name)
        decision = None
        if app_session is not None:
            upgrade = _is_upgrade(head)
            facts = Facts(client_ip=client_ip, method=head.method.decode("latin-1"),
                          path=path.decode("latin-1"), upgrade=upgrade,
                          origin_ok=not upgrade or _public_origin_ok(head, app))
            now = self.clock.seconds()
            # A cached decision needs no look at the session behind the cookie.
            decision = self.access.recall(app_session.id_hash, app_session.user, app, facts, now)
            if decision is None:
                session_caller = await self.sessions.caller(app_session)
                if session_caller is not None:
                    decision = await self.access.decide(session_caller, app, facts, now)
        if isinstance(decision, NeedsMore) and caller is None:
            # An app session started without the second factor a role now asks for
            # (per-session MFA): GETs go through the launch and its prompt again.
            if head.method not in (b"GET", b"HEAD"):
                return page(401)
            return self._launch(app, head.target, close, head_only)
        if decision is None or isinstance(decision, NeedsMore) or (
                isinstance(decision, Deny) and decision.code == "user_removed"):
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
            return self._error(head, 401, message, head_only=head_only, close=True)
        app = self.registry.app(app_name)
        if app is None:
            close = not keep_alive(head.version, head.headers)
            return self._error(head, 503, head_only=head_only, close=close)
        if head.method == b"CONNECT":
            return self._error(head, 405, head_only=head_only, close=True)
        host_raw = head.headers.get(b"host")
        if not head.target.startswith(b"/") or (host_raw is not None and not valid_host(host_raw)):
            return self._error(head, 400, head_only=head_only, close=True)
        if not _local_host_ok(head.headers.get(b"host"), app.public_addr):
            self._log.info("refused {app} through a local port for Host {host!r}", app=app.name,
                           host=(head.headers.get(b"host") or b"").decode("latin-1")[:100])
            return self._error(head, 421, head_only=head_only, close=True)
        why = local_port_cross_site(head.headers, f"https://{app.public_addr}")
        if why is not None:
            self._log.info("refused {app} through a local port for {user}: {why}", app=app.name,
                           user=caller.user, why=why)
            self.audit.emit("access.denied", actor=caller.user, target=app.name, outcome="failure",
                            reason=why, client_ip=client_ip, method=head.method.decode("latin-1"),
                            path=head.target.partition(b"?")[0].decode("latin-1"))
            return self._error(head, 403, head_only=head_only, close=True)
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
            # A Deny's message, or NeedsMore's "needs a second factor" (per-session MFA:
            # a certificate gets one only from apptunnel proxy app, bound to the app).
            message = decision.message or None
            return self._error(head, 403, message, head_only=head_only, close=close)
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
                                     [clear_state], close=close, head_only=head_only, home=self._home), 400, close,
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
            return self._error(head, 405, headers=[(b"Allow", b"GET, POST")], close=close)
        origin, referer = head.headers.get(b"origin"), head.headers.get(b"referer")
        proof = same_origin(None if origin is None else origin.decode("latin-1"),
                            None if referer is None else referer.decode("latin-1"),
                            _app_origins(app.public_addr))
        if proof is not True:
            self._log.info("refused a cross-site logout on {app}", app=app.name)
            return self._error(head, 403, "This sign-out was not sent from this app.", close=close)
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
        """The head the app sees, with the identity token signed for ``web`` (who acts)."""
        token = self.signer.token(
            web.credential, web.user, web.roles, web.traits,
            audience=f"https://{app.public_addr}", claims=app.jwt_claims, bot=web.is_bot,
        )
        return app_request_head(head, app, web, client_ip, upgrade, self.config.jwt_header, token)
