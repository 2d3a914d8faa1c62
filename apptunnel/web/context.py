"""What every route module of the proxy host shares: who is calling, whether a request
comes from our own pages, rendering a page and the one uniform error answer.

`WebContext` is built once by `WebApp` (web/routes.py) and handed to each route class.
It makes no access decision of its own: the session store and the access policy answer,
this only reads them from a request.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, Any

from jinja2 import Environment, PackageLoader, StrictUndefined
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from apptunnel.auth.access import AccessPolicy, Allow, Deny, Facts
from apptunnel.auth.callers import Caller, caller_from_session, certificate_caller
from apptunnel.auth.errors import AuthError
from apptunnel.auth.mfa import ENROLL_FIRST, SecondFactorRequired
from apptunnel.auth.origins import own_origins, same_origin
from apptunnel.backend.base import StorageUnavailable
from apptunnel.web.http import (
    HEADINGS,
    JSON_PREFIXES,
    SESSION_COOKIE,
    WebError,
    cookie,
    json_response,
    tls_transport,
)

if TYPE_CHECKING:
    from apptunnel.audit import AuditLog
    from apptunnel.auth.ca import ClusterCA
    from apptunnel.auth.policy import RoleCache
    from apptunnel.auth.sessions import SessionManager
    from apptunnel.backend.records import WebSession
    from apptunnel.catalog import AppCatalog, AppInfo
    from apptunnel.config import ProxyConfig

# Every template, loaded at start so rendering on the reactor never touches the disk.
# A route module adding templates lists them here (or calls WebContext.load).
TEMPLATES = ("base.html", "apps.html", "login.html", "error.html", "link.html",
             "login_mfa.html", "account.html", "requests.html")


class WebContext:
    """The shared reading of a request: session, caller, origin; pages and errors."""

    _log = Logger()

    def __init__(self, config: ProxyConfig, sessions: SessionManager, roles: RoleCache,
                 registry: AppCatalog, audit: AuditLog, ca: ClusterCA, clock: IReactorTime,
                 access: AccessPolicy) -> None:
        self.config = config
        self.sessions = sessions
        self.roles = roles
        self.registry = registry
        self.audit = audit
        self.ca = ca
        self.clock = clock
        self.access = access
        self.origins = own_origins(config.public_host, config.public_port)
        self._templates = Environment(
            loader=PackageLoader("apptunnel.web", "templates"),
            autoescape=True,
            undefined=StrictUndefined,
            auto_reload=False,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.load(*TEMPLATES)
        # Header links other modules add (admin, audit): async (WebSession) -> list of
        # (label, href, nav key) shown to that user; see extra_nav().
        self.nav_hooks: list = []

    def load(self, *names: str) -> None:
        """Load (and cache) templates now, at start, not on the reactor's first request."""
        for name in names:
            self._templates.get_template(name)

    # -- who is calling ---------------------------------------------------------------

    async def web_session(self, request) -> tuple[str | None, WebSession | None]:
        """(secret, WebSession) from the session cookie, or (None, None)."""
        secret = cookie(request, SESSION_COOKIE)
        if secret is None:
            return None, None
        web = await self.sessions.web_session(secret)
        return (secret, web) if web is not None else (None, None)

    async def caller(self, request, bots: bool = False) -> Caller | None:
        """The session cookie's user, else the user certificate of the TLS connection,
        as the access policy lets them act now (AuthError 403 for a locked or removed user).

        A bot's certificate is a caller only where ``bots`` says so (the app list): a bot
        has no second factors and asks nobody for access, so every other route refuses
        it (403) rather than acting for ``bot:NAME`` as if it were a person.
        """
        _, web = await self.web_session(request)
        if web is not None:
            if web.enroll_only:
                raise AuthError(403, ENROLL_FIRST)
            return caller_from_session(web)
        caller = certificate_caller(self.ca, tls_transport(request), self.clock.seconds())
        if caller is not None and caller.is_bot and not bots:
            raise AuthError(403, "a bot cannot do this")
        return None if caller is None else await self.acting(caller, "api")

    async def signed_in(self, request, where: str) -> Caller:
        """The caller of a JSON route that acts for a person, as they may act now: 403
        cross-origin, 401 without a credential."""
        self.refuse_cross_origin(request)
        caller = await self.caller(request)
        if caller is None:
            raise WebError(401, "sign in required")
        return await self.acting(caller, where)

    async def acting(self, caller: Caller, where: str) -> Caller:
        """The policy's answer to "may this user act at all" (exists, not locked):
        the caller with the roles held now; AuthError with the policy's status otherwise."""
        decision = await self.access.decide(caller, None, Facts(where=where),
                                            self.clock.seconds())
        if isinstance(decision, Deny):
            raise AuthError(decision.status, decision.message or "access denied")
        if not isinstance(decision, Allow):
            raise AuthError(403, "access denied")
        return decision.caller

    # -- cross-site requests ----------------------------------------------------------

    def same_origin(self, request) -> bool | None:
        """Whether Origin (or else Referer) names this proxy; None when neither is sent."""
        origin, referer = request.getHeader(b"origin"), request.getHeader(b"referer")
        return same_origin(None if origin is None else origin.decode("latin-1"),
                           None if referer is None else referer.decode("latin-1"),
                           self.origins)

    def require_same_origin(self, request) -> None:
        """CSRF guard for form POSTs: browsers always label those with Origin or Referer."""
        if self.same_origin(request) is not True:
            raise WebError(403, "This form was not submitted from this site.")

    def refuse_cross_origin(self, request) -> None:
        """CSRF guard for the JSON API: a browser's cross-site fetch carries a foreign
        Origin; the CLI sends none (and is authenticated by its certificate or body)."""
        if self.same_origin(request) is False:
            raise WebError(403, "cross-origin request refused")

    # -- apps ---------------------------------------------------------------------------

    async def allowed_apps(self, caller: Caller) -> list[AppInfo]:
        apps = sorted(self.registry.apps(include_offline=True), key=lambda app: app.name)
        return await self.access.allowed_apps(caller, apps, self.clock.seconds())

    def app_addr(self, app: AppInfo) -> str:
        """host[:port] users reach the app at: all app hosts share the proxy's public port."""
        addr = app.public_addr or f"{app.name}.{self.config.public_host}"
        if ":" not in addr and self.config.public_port != 443:
            addr = f"{addr}:{self.config.public_port}"
        return addr

    # -- pages and errors ---------------------------------------------------------------

    async def extra_nav(self, web: WebSession | None) -> list[tuple[str, str, str]]:
        """The header links ``nav_hooks`` offer this user (pass as ``extra_nav``)."""
        if web is None:
            return []
        links = []
        for hook in self.nav_hooks:
            links.extend(await hook(web))
        return links

    def page(self, request, status: int, name: str, context: dict[str, Any]) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        context.setdefault("nav", None)
        context.setdefault("extra_nav", [])
        template = self._templates.get_template(name)
        return template.render(cluster_name=self.config.cluster_name, **context).encode("utf-8")

    def error_page(self, request, status: int, message: str, request_id: str = "") -> bytes:
        """The uniform error page, with a request id the log line of a failure names."""
        heading = HEADINGS.get(status, ("Error", ""))[0]
        return self.page(request, status, "error.html", {
            "status": status, "heading": heading, "message": message,
            "request_id": request_id or secrets.token_hex(8),
        })

    def on_error(self, request, failure: Failure) -> bytes:
        """Every failure becomes one uniform page (or JSON error); never a traceback."""
        err = failure.value
        extra = {}
        if isinstance(err, SecondFactorRequired):
            extra["mfa_required"] = err.mfa_required
            if err.webauthn is not None:
                extra["webauthn"] = err.webauthn
        if isinstance(err, (WebError, AuthError)):
            status, message = err.status, err.message
        elif isinstance(err, StorageUnavailable):
            # Nothing wrong with the request: one line naming the backend, no traceback.
            self._log.warn("web request {method} {path}: storage unavailable: {error}",
                           method=request.method.decode("latin-1"),
                           path=request.path.decode("latin-1"), error=err.one_line())
            status, message = err.status, err.message
            request.setHeader(b"Retry-After", str(err.retry_after).encode("ascii"))
        elif isinstance(err, HTTPException):
            status = err.code if err.code in HEADINGS else 404
            message = HEADINGS[status][1]
            if isinstance(err, MethodNotAllowed) and err.valid_methods:
                request.setHeader(b"Allow", ", ".join(err.valid_methods).encode("ascii"))
        else:
            request_id = secrets.token_hex(8)
            self._log.failure(
                "web request {method} {path} failed (request id {request_id})", failure,
                method=request.method.decode("latin-1"), path=request.path.decode("latin-1"),
                request_id=request_id,
            )
            status, message = 500, HEADINGS[500][1]
            if not request.path.startswith(JSON_PREFIXES):
                return self.error_page(request, status, message, request_id)
        if request.path.startswith(JSON_PREFIXES):
            return json_response(request, status, {"error": message, **extra})
        return self.error_page(request, status, message)


class Routes:
    """Base of a route module: its Klein app's errors go to the one uniform handler.

    A subclass declares ``app = Klein()`` and ``app.handle_errors(Routes.on_error)`` in
    its body (Klein keeps error handlers per app), and is mounted in web/routes.py.
    """

    def __init__(self, ctx: WebContext) -> None:
        self.ctx = ctx

    def on_error(self, request, failure: Failure) -> bytes:
        return self.ctx.on_error(request, failure)
