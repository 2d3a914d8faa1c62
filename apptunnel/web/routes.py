"""The proxy host's own web UI and JSON API (Klein).

Users sign in here, see the apps their roles allow, and launch them; the app host then
receives a one-time code bound to its own state cookie (see proxy/router.py), never a
session secret. Every decision (passwords, sessions, access) is made by the objects handed
in; this module only speaks HTTP: cookies, redirects, CSRF origin checks, security
headers, and one uniform error page so no traceback ever reaches a browser.
"""

from __future__ import annotations

import json
import mimetypes
import re
import time
from importlib.resources import files
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import segno
from cryptography import x509
from jinja2 import Environment, PackageLoader, StrictUndefined
from klein import Klein
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.static import Data
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from apptunnel.auth.access import AccessPolicy, Allow, Deny, Facts, NeedsMore
from apptunnel.auth.callers import Caller, caller_from_session, certificate_caller
from apptunnel.auth.connectors.cli_codes import CliCodes, CliReturn, digest
from apptunnel.auth.connectors.oidc import FLOW_TTL
from apptunnel.auth.errors import AuthError
from apptunnel.auth.links import LinkRedeemer, password_problem
from apptunnel.auth.mfa import (
    ENROLL_FIRST,
    NO_SESSION_FACTOR,
    PendingSignIns,
    SecondFactorRequired,
    SecondFactors,
    given_factors,
)
from apptunnel.auth.passwords import MIN_PASSWORD_LENGTH
from apptunnel.auth.webauthn_devices import WebAuthnKeys
from apptunnel.auth.origins import own_origins, same_origin
from apptunnel.auth.redirects import safe_path
from apptunnel.auth.throttle import Throttled
from apptunnel.errors import ApptunnelError
from apptunnel.net import host_only
from apptunnel.web.fields import public_key_field, ttl_field

if TYPE_CHECKING:
    from apptunnel.audit import AuditLog
    from apptunnel.auth.ca import ClusterCA
    from apptunnel.auth.connectors.ldap import LdapSignIn
    from apptunnel.auth.connectors.oidc import OidcSignIn
    from apptunnel.auth.connectors.store import ConnectorStore
    from apptunnel.web.access_requests import AccessRequestApi
    from apptunnel.web.saml import SamlWeb
    from apptunnel.web.bots import BotRoutes
    from apptunnel.auth.directory import UserDirectory
    from apptunnel.auth.locks import LockWatcher
    from apptunnel.auth.jwt import JwtKeys
    from apptunnel.auth.policy import RoleCache
    from apptunnel.auth.sessions import SessionManager
    from apptunnel.backend.base import Backend
    from apptunnel.backend.records import User, WebSession
    from apptunnel.catalog import AppCatalog, AppInfo
    from apptunnel.config import ProxyConfig

SESSION_COOKIE = "__Host-apptunnel_session"
MFA_COOKIE = "__Host-apptunnel_mfa"      # the browser's pending second sign-in step
SSO_COOKIE = "__Host-apptunnel_sso"      # binds an OIDC flow to the browser that began it
LOGIN_FAILED = "invalid username or password"

# Bounds checked before any work is done (argon2 on a megabyte password is a DoS).
MAX_USERNAME = 256
MAX_PASSWORD = 1024
MAX_STATE = 512
MAX_COOKIE = 256
MAX_JSON_BODY = 16 * 1024
# The shortest user certificate we issue: shorter ones would expire before the CLI used them.
MIN_CERT_TTL = 1.0
SESSION_MFA_CERT_TTL = 60.0   # a one-app MFA certificate starts sessions for a minute

# Set on every response. Referrer-Policy is `same-origin`, not `no-referrer`: under
# `no-referrer` browsers send `Origin: null` on our own form POSTs (Fetch spec, "append a
# request Origin header"), which the CSRF check must refuse, so nobody could sign in. With
# `same-origin` no Referer ever leaves for another origin (an app host, a launched URL).
SECURITY_HEADERS = (
    (b"Content-Security-Policy",
     b"default-src 'self'; frame-ancestors 'none'; form-action 'self' https:"),
    (b"X-Frame-Options", b"DENY"),
    (b"X-Content-Type-Options", b"nosniff"),
    (b"Referrer-Policy", b"same-origin"),
    (b"Cache-Control", b"no-store"),
)

_HEADINGS = {
    400: ("Bad request", "The request was not valid."),
    401: ("Sign-in required", "Sign in to continue."),
    403: ("Access denied", "You are not allowed to do this."),
    404: ("Not found", "There is nothing at this address."),
    405: ("Method not allowed", "This address does not accept that method."),
    413: ("Request too large", "The request body is larger than this address accepts."),
    415: ("Unsupported media type", "This address accepts application/json only."),
    421: ("Wrong address", "This connection serves the proxy itself, not that address."),
    429: ("Too many attempts", "Too many attempts; wait a little and try again."),
    500: ("Something went wrong", "The proxy could not complete the request; it has been logged."),
    503: ("Busy", "The proxy is busy; try again in a moment."),
}

_JSON_PREFIXES = (b"/v1/", b"/.well-known/", b"/healthz")


class WebError(ApptunnelError):
    """An HTTP error to show on the uniform page (or as JSON under the API paths)."""

    def __init__(self, status: int, message: str | None = None) -> None:
        self.status = status
        self.message = message or _HEADINGS.get(status, ("", "The request failed."))[1]
        super().__init__(self.message)


class _SecurityHeaders(Resource):
    """Root resource: stamps the security headers on every response, then lets Klein route.

    It also refuses (421) a request whose Host is not the proxy's own: the edge hands a
    whole keep-alive connection to the web UI after its first request, so a later request
    on it naming an app host must not be answered as if it were the proxy's.
    """

    isLeaf = True

    def __init__(self, inner: IResource, public_host: str, error_page) -> None:
        super().__init__()
        self._inner = inner
        self._public_host = public_host
        self._error_page = error_page

    def render(self, request: IRequest):
        for name, value in SECURITY_HEADERS:
            request.setHeader(name, value)
        host = host_only((request.getHeader(b"host") or b"").decode("latin-1"))
        if host != self._public_host:
            request.setHeader(b"Connection", b"close")
            return self._error_page(request, 421, _HEADINGS[421][1])
        return self._inner.render(request)


class WebApp:
    """Routes of the proxy host: apps page, sign-in/out, launch hand-off, JSON API, JWKS."""

    app = Klein()
    _log = Logger()

    def __init__(self, config: ProxyConfig, sessions: SessionManager, roles: RoleCache,
                 registry: AppCatalog, audit: AuditLog, jwt_keys: JwtKeys, ca: ClusterCA,
                 clock: IReactorTime, *, locks: LockWatcher | None = None,
                 users: UserDirectory | None = None,
                 access: AccessPolicy | None = None,
                 backend: Backend | None = None,
                 ldap: LdapSignIn | None = None,
                 connectors: ConnectorStore | None = None,
                 saml: SamlWeb | None = None,
                 oidc: OidcSignIn | None = None,
                 bots: BotRoutes | None = None,
                 access_requests: AccessRequestApi | None = None) -> None:
        self._config = config
        self._bots = bots               # bots' join and renewal (web/bots.py)
        self._sessions = sessions
        self._roles = roles
        self._registry = registry
        self._audit = audit
        self._jwt_keys = jwt_keys
        self._ca = ca
        self._clock = clock
        self._ldap = ldap   # sign-in through LDAP connectors (auth/connectors/ldap.py)
        self._requests = access_requests   # the access-request API (web/access_requests.py)
        self._connectors = connectors   # the sign-in page's single sign-on buttons
        self._sso_starts = {}           # connector kind -> start(request, name, target)
        self._saml = saml               # SAML connectors (web/saml.py)
        if saml is not None:
            self._sso_starts["saml"] = lambda request, name, target: saml.start(
                request, name, target, _client_host(request), _cli_return(request))
        self._oidc = oidc               # OIDC connectors (auth/connectors/oidc.py)
        # `apptunnel login --auth`'s one-time codes, one store for every browser connector.
        self._cli_codes = CliCodes(clock)
        if oidc is not None:
            self._sso_starts["oidc"] = self._oidc_start
        # Every "may this caller ..." is the access policy's (shared with the app edge in
        # the proxy service; built from roles, locks and users when not handed in).
        self._access = access or AccessPolicy(roles=roles, audit=audit, clock=clock,
                                              locks=locks, users=users)
        self._origins = own_origins(config.public_host, config.public_port)
        # Links and second factors (auth/links.py, auth/mfa.py); off without a backend.
        self._links = self._factors = None
        if backend is not None:
            self._links = LinkRedeemer(backend, clock, sessions.throttle, sessions.hashes,
                                       audit)
            port = "" if config.public_port == 443 else f":{config.public_port}"
            keys = WebAuthnKeys(config.public_host, f"https://{config.public_host}{port}",
                                config.cluster_name, clock)
            self._factors = SecondFactors(backend, clock, config.second_factor,
                                          sessions.throttle, audit,
                                          issuer=config.cluster_name, webauthn=keys)
        self._pending = PendingSignIns(clock)
        self._templates = Environment(
            loader=PackageLoader("apptunnel.web", "templates"),
            autoescape=True,
            undefined=StrictUndefined,
            auto_reload=False,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        # Load every template now, so rendering on the reactor never touches the disk.
        for name in ("base.html", "apps.html", "login.html", "error.html", "link.html",
                     "login_mfa.html", "account.html"):
            self._templates.get_template(name)
        self._static = _load_static()

    def resource(self) -> IResource:
        """The root resource to serve at https://<public_addr>/ (wrapped in a Site by the caller)."""
        return _SecurityHeaders(self.app.resource(), self._config.public_host.lower(),
                                self._error_page)

    # -- pages -------------------------------------------------------------------------

    @app.route("/", methods=["GET"])
    async def apps_page(self, request):
        secret, web = await self._web_session(request)
        if web is None:
            return _redirect(request, 302, "/web/login")
        if web.enroll_only:
            return _redirect(request, 302, "/web/account")
        apps = await self._allowed_apps(caller_from_session(web))
        return self._page(request, 200, "apps.html", {
            "user": web.user,
            "roles": list(web.roles),
            "apps": [
                {
                    "name": app.name,
                    "labels": sorted(app.labels.items()),
                    "public_addr": self._app_addr(app),
                    "launch_url": f"https://{self._app_addr(app)}/",
                    "online": self._registry.is_online(app.name),
                }
                for app in apps
            ],
            "ca_pin": self._ca.pin,
        })

    @app.route("/web/login", methods=["GET"])
    async def login_form(self, request):
        target = safe_path(_arg(request, "next"))
        _, web = await self._web_session(request)
        if web is not None:
            return _redirect(request, 302, target)
        return self._login_page(request, 200, target, error=None,
                                **await self._login_choices())

    @app.route("/web/login", methods=["POST"])
    async def login_submit(self, request):
        self._require_same_origin(request)
        target = safe_path(_arg(request, "next"))
        username = _arg(request, "username") or ""
        password = _arg(request, "password") or ""
        connector = _arg(request, "connector") or None   # "": the local account
        try:
            secret, web, ttl = await self._password_login(request, username, password,
                                                          connector=connector)
        except SecondFactorRequired:
            # The password was right: the second step asks for the factor (web/mfa page).
            ticket = self._pending.start(username)
            _set_cookie(request, MFA_COOKIE, ticket, self._pending.ttl)
            return await self._mfa_page(request, 200, username, target, error=None)
        except AuthError as err:
            return self._login_page(request, err.status, target, error=err.message,
                                    **await self._login_choices(),
                                    chosen=connector or "")
        _set_session_cookie(request, secret, ttl)
        return _redirect(request, 303, "/web/account" if web.enroll_only else target)

    @app.route("/web/logout", methods=["POST"])
    async def logout(self, request):
        self._require_same_origin(request)
        await self._end_session(request)
        return _redirect(request, 303, "/web/login")

    @app.route("/web/launch/<string:name>", methods=["GET", "POST"])
    async def launch(self, request, name: str):
        """The hand-off to an app host; first the per-session MFA prompt when a role asks
        for it (GET shows it, a same-origin POST with the factor passes it)."""
        posting = request.method == b"POST"
        if posting:
            self._require_same_origin(request)
        _, web = await self._web_session(request)
        if web is None:
            if posting:
                return _redirect(request, 303, "/web/login")
            here = request.uri.decode("latin-1")
            return _redirect(request, 302, "/web/login?next=" + quote(here, safe=""))
        if web.enroll_only:
            return _redirect(request, 302 if not posting else 303, "/web/account")
        app = self._registry.app(name)
        if app is None:
            raise WebError(404, "No application of that name is online.")
        state = _arg(request, "state")
        if not state or len(state) > MAX_STATE:
            raise WebError(400, "The launch link is missing its state; open the app again.")
        decision = await self._access.decide(caller_from_session(web), app,
                                             Facts(client_ip=_client(request), where="launch"),
                                             self._clock.seconds())
        path = safe_path(_arg(request, "path"))
        verified = False
        if isinstance(decision, NeedsMore) and decision.kind == "mfa":
            answer = await self._session_mfa(request, web, app.name, path, state, posting)
            if answer is not None:
                return answer
            verified = True
        elif not isinstance(decision, Allow):
            message = decision.message if isinstance(decision, Deny) and decision.message else None
            raise WebError(403, message or "Your roles do not allow you to open this application.")
        code = await self._sessions.create_auth_code(web, app.name, path, state, verified)
        url = f"https://{self._app_addr(app)}/.apptunnel/auth?code={quote(code, safe='')}"
        return _redirect(request, 303 if posting else 302, url)

    @app.route("/static/<string:name>", methods=["GET"])
    def static(self, request, name: str):
        asset = self._static.get(name)
        if asset is None:
            raise WebError(404)
        request.setHeader(b"Cache-Control", b"public, max-age=300")
        return asset

    # -- single sign-on ----------------------------------------------------------------

    @app.route("/web/sso/<string:name>", methods=["GET"])
    async def sso_start(self, request, name: str):
        """Start connector ``name``'s browser flow (the sign-in page's buttons link here)."""
        target = safe_path(_arg(request, "next"))
        spec = None if self._connectors is None else await self._connectors.get(name)
        start = None if spec is None else self._sso_starts.get(spec.kind)
        if start is None:
            raise WebError(404, "There is no single sign-on connector of that name.")
        return await start(request, name, target)

    @app.route("/v1/webapi/saml/metadata/<string:name>", methods=["GET"])
    async def saml_metadata(self, request, name: str):
        if self._saml is None:
            raise WebError(404)
        return await self._saml.metadata(request, name, _client_host(request))

    @app.route("/v1/webapi/saml/acs/<string:name>", methods=["POST"])
    async def saml_acs(self, request, name: str):
        """The IdP's HTTP-POST: a web session and the user's target, or the login page."""
        if self._saml is None:
            raise WebError(404)
        try:
            user, target, cli = await self._saml.acs(request, name, _client_host(request),
                                                     _client(request))
        except AuthError as err:
            self._retry_after(request, err)
            return self._login_page(request, err.status, "/", error=err.message,
                                    **await self._login_choices())
        if cli is not None:
            return self._cli_redirect(request, user, cli)
        secret, _, ttl = await self._open_web_session(request, user)
        _set_session_cookie(request, secret, ttl)
        return _redirect(request, 303, target)

    # -- JSON API ----------------------------------------------------------------------

    @app.route("/v1/sessions", methods=["POST"])
    async def api_login(self, request):
        if self._same_origin(request) is False:
            raise WebError(403, "cross-origin request refused")
        body = _json_body(request)
        username, password = body.get("username"), body.get("password")
        if not isinstance(username, str) or not isinstance(password, str):
            raise WebError(400, "username and password (strings) are required")
        secret, web, ttl = await self._password_login(request, username, password,
                                                      given_factors(body), _connector(body))
        _set_session_cookie(request, secret, ttl)
        answer = {"user": web.user, "roles": list(web.roles), "expires": web.expires}
        if web.enroll_only:
            answer.update(enroll_only=True, message=ENROLL_FIRST)
        return _json(request, 200, answer)

    @app.route("/v1/sessions", methods=["DELETE"])
    async def api_logout(self, request):
        if self._same_origin(request) is False:
            raise WebError(403, "cross-origin request refused")
        await self._end_session(request)
        request.setResponseCode(204)
        return b""

    @app.route("/v1/certs", methods=["POST"])
    async def api_certs(self, request):
        """A short-lived user certificate for the caller's own public key (the CLI's login).

        Authenticated by username/password in the body or else by the web-session cookie,
        never by a certificate: a certificate must not be able to renew itself forever.
        """
        if self._same_origin(request) is False:
            raise WebError(403, "cross-origin request refused")
        body = _json_body(request)
        public_key = public_key_field(body.get("public_key"))
        wanted = ttl_field(body.get("ttl"))
        username, password = body.get("username"), body.get("password")
        now = self._clock.seconds()
        if body.get("sso_code") is not None:
            user = await self._redeem_sso_code(request, body)
            caller = Caller(user.name, tuple(user.roles), dict(user.traits), "sso", "",
                            now + self._config.session_ttl)
            limit = self._config.session_ttl
        elif username is not None or password is not None:
            if not isinstance(username, str) or not isinstance(password, str):
                raise WebError(400, "username and password must be strings")
            connector = _connector(body)
            if connector is not None:
                # A connector's users prove themselves to their directory; second factors
                # are for local accounts (their devices live here).
                user = await self._check_connector(request, connector, username, password)
            else:
                user = await self._check_password(request, username, password)
                await self._full_sign_in(request, user.name, given_factors(body))
            caller = Caller(user.name, tuple(user.roles), dict(user.traits), "password", "",
                            now + self._config.session_ttl)
            limit = self._config.session_ttl
        else:
            _, web = await self._web_session(request)
            if web is None:
                raise AuthError(401, LOGIN_FAILED)
            if web.enroll_only:
                raise AuthError(403, ENROLL_FIRST)
            caller = caller_from_session(web)
            limit = web.expires - now  # a certificate never outlives the session behind it
        caller = await self._acting(caller, "certificate")
        role_set = await self._roles.role_set(caller.roles)
        ttl = min(limit, role_set.max_session_ttl(self._config.session_ttl))
        if wanted is not None:
            ttl = min(ttl, wanted)
        if ttl < MIN_CERT_TTL:
            raise AuthError(401, LOGIN_FAILED)
        cert_pem = self._ca.issue_user_cert(public_key, caller.user, caller.roles,
                                            caller.traits, ttl)
        self._audit.emit("cert.issue", actor=caller.user, target=caller.user, user=caller.user,
                         ttl=round(ttl, 3), client=_client(request))
        expires = x509.load_pem_x509_certificate(cert_pem).not_valid_after_utc.timestamp()
        return _json(request, 200, {
            "cert": cert_pem.decode("ascii"),
            "ca": self._ca.cert_pem.decode("ascii"),
            "expires": expires,
            "user": caller.user,
            "roles": list(caller.roles),
        })

    @app.route("/v1/certs/app", methods=["POST"])
    async def api_app_cert(self, request):
        """Per-session MFA for ``apptunnel proxy app``: after a fresh factor, a certificate
        for the caller's own key bound to one app, valid a minute to START sessions
        (sessions it starts may run until the caller's credential ends).

        Authenticated by a web session or the user certificate of the connection (a
        one-app certificate cannot ask: it opens its app and nothing else).
        """
        if self._same_origin(request) is False:
            raise WebError(403, "cross-origin request refused")
        if self._factors is None:
            raise WebError(404)
        body = _json_body(request)
        public_key = public_key_field(body.get("public_key"))
        ttl_field(body.get("ttl"))               # a bad one fails before the factor
        name = body.get("app")
        if not isinstance(name, str) or not name:
            raise WebError(400, "app (a string) is required")
        caller = await self._caller(request)
        if caller is None:
            raise WebError(401, "sign in required")
        caller = await self._acting(caller, "mfa certificate")   # roles held now
        app = self._registry.app(name)
        if app is None:
            raise WebError(404, f"no app named {name!r}")
        now = self._clock.seconds()
        decision = await self._access.decide(caller, app, Facts(client_ip=_client(request),
                                                                where="mfa certificate"), now)
        if isinstance(decision, Allow):
            raise WebError(400, f"{name} does not ask for a second factor")
        if not isinstance(decision, NeedsMore) or decision.kind != "mfa":
            message = decision.message if isinstance(decision, Deny) else ""
            raise WebError(403, message or f"you are not allowed to use {name}")
        await self._factors.check_session(caller.user, app.name, given_factors(body),
                                          _client_host(request))
        ttl = min(SESSION_MFA_CERT_TTL, caller.expires - now)
        wanted = ttl_field(body.get("ttl"))      # may only shorten the minute
        if wanted is not None:
            ttl = min(ttl, wanted)
        if ttl < MIN_CERT_TTL:
            raise AuthError(401, LOGIN_FAILED)
        cert_pem = self._ca.issue_user_cert(public_key, caller.user, caller.roles,
                                            caller.traits, ttl, mfa_app=app.name,
                                            sessions_until=caller.expires)
        self._audit.emit("cert.issue", actor=caller.user, target=caller.user, user=caller.user,
                         ttl=round(ttl, 3), app=app.name, mfa=True, client=_client(request))
        expires = x509.load_pem_x509_certificate(cert_pem).not_valid_after_utc.timestamp()
        return _json(request, 200, {"cert": cert_pem.decode("ascii"), "expires": expires,
                                    "app": app.name, "user": caller.user})

    @app.route("/v1/bots/join", methods=["POST"])
    async def bot_join(self, request):
        if self._bots is None:
            raise WebError(404)
        return _json(request, 200, await self._bots.join(_json_body(request), _client(request)))

    @app.route("/v1/bots/renew", methods=["POST"])
    async def bot_renew(self, request):
        if self._bots is None:
            raise WebError(404)
        transport = getattr(request.channel, "transport", None) or request.transport
        return _json(request, 200, await self._bots.renew(_json_body(request), transport,
                                                          _client(request)))

    @app.route("/v1/apps", methods=["GET"])
    async def api_apps(self, request):
        caller = await self._caller(request, bots=True)
        if caller is None:
            raise WebError(401, "sign in required")
        apps = await self._allowed_apps(caller)
        return _json(request, 200, {"apps": [
            {
                "name": app.name,
                "type": _app_type(app.uri),
                "labels": dict(app.labels),
                "public_addr": self._app_addr(app),
                "online": self._registry.is_online(app.name),
            }
            for app in apps
        ]})

    # -- access requests: web/access_requests.py answers, these routes only authenticate

    @app.route("/v1/access-requests", methods=["GET", "POST"])
    async def api_access_requests(self, request):
        caller = await self._request_caller(request)
        if request.method == b"POST":
            return _json(request, 200, await self._requests.create(caller, _json_body(request)))
        return _json(request, 200, await self._requests.list(caller))

    @app.route("/v1/access-requests/<string:rid>", methods=["GET"])
    async def api_access_request(self, request, rid: str):
        caller = await self._request_caller(request)
        return _json(request, 200, await self._requests.show(caller, rid))

    @app.route("/v1/access-requests/<string:rid>/review", methods=["POST"])
    async def api_access_request_review(self, request, rid: str):
        caller = await self._request_caller(request)
        return _json(request, 200, await self._requests.review(caller, rid, _json_body(request)))

    @app.route("/v1/access-requests/<string:rid>/certs", methods=["POST"])
    async def api_access_request_cert(self, request, rid: str):
        caller = await self._request_caller(request)
        body = _json_body(request)
        return _json(request, 200, await self._requests.certificate(
            caller, rid, public_key_field(body.get("public_key")), ttl_field(body.get("ttl")),
            _client(request)))

    @app.route("/v1/sessions/assume", methods=["POST"])
    async def api_assume(self, request):
        caller = await self._request_caller(request)
        secret, _ = await self._web_session(request)
        return _json(request, 200, await self._requests.assume(caller, secret,
                                                               _json_body(request)))

    async def _request_caller(self, request) -> Caller:
        """The caller of an access-request route, as they may act now (401 without one)."""
        if self._requests is None:
            raise WebError(404)
        if self._same_origin(request) is False:
            raise WebError(403, "cross-origin request refused")
        caller = await self._caller(request)
        if caller is None:
            raise WebError(401, "sign in required")
        return await self._acting(caller, "access request")

    @app.route("/.well-known/jwks.json", methods=["GET"])
    def jwks(self, request):
        request.setHeader(b"Cache-Control", b"public, max-age=300")
        return _json(request, 200, self._jwt_keys.jwks())

    @app.route("/healthz", methods=["GET"])
    def healthz(self, request):
        return _json(request, 200, {"status": "ok"})

    # -- OIDC sign-in (decisions: auth/connectors/oidc.py) -------------------------------

    async def _oidc_start(self, request, name: str, target: str):
        """An OIDC connector's button (through ``sso_start``): begin its flow and send the
        browser to the provider."""
        started = await self._oidc.start(name, target, _cli_return(request))
        if started is None:
            raise WebError(404, "There is no single sign-on connector of that name.")
        url, binding = started
        _set_cookie(request, SSO_COOKIE, binding, FLOW_TTL)
        return _redirect(request, 302, url)

    @app.route("/v1/webapi/oidc/callback", methods=["GET"])
    async def oidc_callback(self, request):
        """The provider's redirect back: a web session (or the CLI's one-time code), or a
        page saying why not. Every attempt is audited and throttled per address."""
        if self._oidc is None:
            return self._error_page(request, 404, _HEADINGS[404][1])
        try:
            done = await self._oidc.finish(
                _arg(request, "state"), _arg(request, "code"), _arg(request, "error"),
                _cookie(request, SSO_COOKIE), _client_host(request), _client(request))
        except AuthError as err:
            if isinstance(err, Throttled):
                request.setHeader(b"Retry-After", str(err.retry_after).encode("ascii"))
            return self._error_page(request, err.status, err.message)
        _set_cookie(request, SSO_COOKIE, "", 0)
        if done.flow.cli is not None:
            return self._cli_redirect(request, done.user, done.flow.cli)
        secret, _, ttl = await self._open_web_session(request, done.user)
        _set_session_cookie(request, secret, ttl)
        return _redirect(request, 303, done.flow.next)

    def _cli_redirect(self, request, user: User, cli: CliReturn) -> bytes:
        """The end of a browser sign-in `apptunnel login --auth` started (OIDC or SAML):
        no web session, the browser goes to the CLI's loopback listener with a one-time
        code the CLI exchanges at POST /v1/certs with its verifier."""
        code = self._cli_codes.issue(user.name, cli.challenge)
        query = f"code={quote(code, safe='')}&state={quote(cli.state, safe='')}"
        return _redirect(request, 302, f"http://127.0.0.1:{cli.port}/callback?{query}")

    @app.route("/v1/connectors", methods=["GET"])
    async def api_connectors(self, request):
        """The connectors the sign-in page offers, by name and kind (what the CLI needs to
        choose between a password and a browser flow); no other detail."""
        listed = [{"name": n, "kind": "ldap"} for n in await self._connector_names()]
        if self._connectors is not None:
            listed += [{"name": spec.name, "kind": spec.kind}
                       for spec in await self._connectors.browser()
                       if spec.kind in self._sso_starts]
        return _json(request, 200, {"connectors": sorted(listed, key=lambda c: c["name"])})

    async def _redeem_sso_code(self, request, body: dict) -> User:
        """The user a CLI's one-time code was issued to, if its verifier is right;
        throttled per address and audited like a sign-in."""
        code, verifier = body.get("sso_code"), body.get("code_verifier")
        if not isinstance(code, str) or not isinstance(verifier, str) \
                or len(code) > 128 or len(verifier) > 128:
            raise WebError(400, "sso_code and code_verifier (strings) are required")
        address, key = _client_host(request), f"sso-code:{digest(code)}"
        try:
            self._sessions.throttle.attempt(key, address, self._clock.seconds())
        except Throttled as err:
            request.setHeader(b"Retry-After", str(err.retry_after).encode("ascii"))
            raise
        name = self._cli_codes.redeem(code, verifier)
        user = None if name is None else await self._sessions.user(name)
        if user is None:
            self._audit.emit("user.login", actor="", outcome="failure", method="sso-code",
                             client=_client(request), reason="unknown or used code")
            raise AuthError(401, "this sign-in code is unknown, used or expired")
        self._sessions.throttle.succeeded(key, address)
        return user

    # -- invite/reset links and second factors (decisions: auth/links.py, auth/mfa.py) -

    @app.route("/web/invite/<string:token>", methods=["GET", "POST"])
    async def invite_link(self, request, token: str):
        return await self._link(request, "invite", token)

    @app.route("/web/reset/<string:token>", methods=["GET", "POST"])
    async def reset_link(self, request, token: str):
        return await self._link(request, "reset", token)

    async def _link(self, request, kind: str, token: str) -> bytes:
        """GET: the set-password form (or why the link is no good); POST: set it, once."""
        if self._links is None:
            raise WebError(404)
        heading = "Welcome: choose your password" if kind == "invite" else "Reset your password"
        context = {"heading": heading, "action": f"/web/{kind}/{quote(token, safe='')}",
                   "min_password": MIN_PASSWORD_LENGTH, "max_password": MAX_PASSWORD,
                   "error": None, "user": None, "done": False}
        address = _client_host(request)
        posting = request.method == b"POST"
        if posting:
            self._require_same_origin(request)
        try:
            link = await self._links.look(kind, token, address)
        except AuthError as err:
            self._retry_after(request, err)
            return self._page(request, err.status, "link.html", {**context, "error": err.message})
        context["user"] = link.user
        if not posting:
            return self._page(request, 200, "link.html", context)
        password, confirm = _arg(request, "password"), _arg(request, "confirm")
        problem = password_problem(password, confirm)
        if problem is not None:
            return self._page(request, 400, "link.html", {**context, "error": problem})
        try:
            await self._links.redeem(kind, token, password, address)
        except AuthError as err:
            self._retry_after(request, err)
            return self._page(request, err.status, "link.html",
                              {**context, "user": None, "error": err.message})
        return self._page(request, 200, "link.html", {**context, "done": True})

    @app.route("/web/login/mfa", methods=["POST"])
    async def login_mfa(self, request):
        """The browser's second step: the pending ticket's user presents a factor."""
        self._require_same_origin(request)
        target = safe_path(_arg(request, "next"))
        ticket = _cookie(request, MFA_COOKIE)
        username = self._pending.user(ticket)
        if username is None:
            return self._login_page(request, 401, target,
                                    error="Your sign-in took too long; sign in again.")
        given = given_factors({k: _arg(request, k) for k in ("otp", "recovery_code",
                                                               "webauthn")})
        try:
            enroll_only = await self._second_factor(request, username, given)
        except SecondFactorRequired as err:
            return await self._mfa_page(request, 401, username, target, error=err.message)
        except AuthError as err:
            return await self._mfa_page(request, err.status, username, target,
                                        error=err.message)
        self._pending.finish(ticket)
        _set_cookie(request, MFA_COOKIE, "", 0)
        user = await self._user(username)
        secret, web, ttl = await self._open_web_session(request, user, enroll_only)
        _set_session_cookie(request, secret, ttl)
        return _redirect(request, 303, target)

    @app.route("/web/account", methods=["GET"])
    async def account_page(self, request):
        _, web = await self._web_session(request)
        if web is None:
            return _redirect(request, 302, "/web/login?next=%2Fweb%2Faccount")
        return await self._account_page(request, 200, web, None)

    @app.route("/web/account/totp", methods=["POST"])
    async def account_add_totp(self, request):
        return await self._add_device(request, lambda user: self._factors.add_totp(
            user, _arg(request, "name"), _arg(request, "secret"), _arg(request, "otp")))

    @app.route("/web/account/webauthn", methods=["POST"])
    async def account_add_webauthn(self, request):
        """A security key registered by the account page's script (static/webauthn.js)."""
        return await self._add_device(request, lambda user: self._factors.add_webauthn(
            user, _arg(request, "name"), _arg(request, "webauthn")))

    async def _add_device(self, request, add) -> bytes:
        """Enroll a device with ``add(user)``; an enroll-only session becomes a full one."""
        self._require_same_origin(request)
        secret, web = await self._web_session(request)
        if web is None or self._factors is None:
            return _redirect(request, 303, "/web/login?next=%2Fweb%2Faccount")
        try:
            codes = await add(web.user)
        except AuthError as err:
            return await self._account_page(request, err.status, web, err.message)
        if web.enroll_only:
            # Password + the new device: the session becomes a full one.
            await self._sessions.end_web_session(secret)
            user = await self._user(web.user)
            secret, web, ttl = await self._open_web_session(request, user)
            _set_session_cookie(request, secret, ttl)
        return await self._account_page(request, 200, web, None, codes)

    @app.route("/web/account/devices/remove", methods=["POST"])
    async def account_remove_device(self, request):
        self._require_same_origin(request)
        _, web = await self._web_session(request)
        if web is None or self._factors is None:
            return _redirect(request, 303, "/web/login?next=%2Fweb%2Faccount")
        try:
            await self._factors.remove(web.user, _arg(request, "name") or "")
        except AuthError as err:
            return await self._account_page(request, err.status, web, err.message)
        return _redirect(request, 303, "/web/account")

    @app.route("/v1/mfa/devices", methods=["GET"])
    async def api_mfa_devices(self, request):
        user = await self._account_user(request)
        devices = await self._factors.devices(user)
        return _json(request, 200, {
            "devices": [{"name": d.name, "type": d.kind, "created": d.created}
                        for d in devices],
            "recovery_codes_left": await self._factors.recovery_codes_left(user),
        })

    @app.route("/v1/mfa/totp", methods=["POST"])
    async def api_mfa_new_totp(self, request):
        """A fresh TOTP secret to enroll (nothing stored until a code confirms it)."""
        user = await self._account_user(request)
        secret, uri = self._factors.new_totp(user)
        return _json(request, 200, {"secret": secret, "uri": uri})

    @app.route("/v1/mfa/devices", methods=["POST"])
    async def api_mfa_add(self, request):
        user = await self._account_user(request)
        body = _json_body(request)
        if body.get("type") != "totp":
            raise WebError(400, "type must be totp")
        codes = await self._factors.add_totp(user, body.get("name"), body.get("secret"),
                                             body.get("otp"))
        return _json(request, 200, {"name": body.get("name"), "type": "totp",
                                    "recovery_codes": codes})

    @app.route("/v1/mfa/devices/<string:name>", methods=["DELETE"])
    async def api_mfa_remove(self, request, name: str):
        user = await self._account_user(request)
        await self._factors.remove(user, name)
        request.setResponseCode(204)
        return b""

    async def _account_user(self, request) -> str:
        """Who manages their devices: a web session (enroll-only included) or a user
        certificate; never a cross-origin request."""
        if self._same_origin(request) is False:
            raise WebError(403, "cross-origin request refused")
        if self._factors is None:
            raise WebError(404)
        _, web = await self._web_session(request)
        if web is not None:
            return web.user
        caller = await self._caller(request)
        if caller is None:
            raise WebError(401, "sign in required")
        return caller.user

    async def _second_factor(self, request, user: str, given) -> bool:
        """Pass the second-factor check of ``user``'s sign-in; True for enroll-only."""
        if self._factors is None:
            return False
        try:
            need = await self._factors.check(user, given or given_factors({}),
                                             _client_host(request))
        except AuthError as err:
            self._retry_after(request, err)
            raise
        return need.enroll_only

    async def _full_sign_in(self, request, user: str, given) -> None:
        """A certificate needs the whole sign-in: no enroll-only certificates exist."""
        if await self._second_factor(request, user, given):
            raise AuthError(403, ENROLL_FIRST)

    async def _user(self, name: str) -> User:
        user = await self._sessions.user(name)
        if user is None:
            raise AuthError(401, LOGIN_FAILED)
        return user

    async def _mfa_page(self, request, status: int, user: str, target: str,
                        error: str | None) -> bytes:
        need = await self._factors.needed(user)
        options = await self._factors.sign_in_options(user) if "webauthn" in need.factors \
            else None
        return self._page(request, status, "login_mfa.html", {
            "heading": "Second factor", "action": "/web/login/mfa",
            "hidden": [("next", target)], "error": error, "factors": list(need.factors),
            "webauthn_options": _script_json(options) if options else None})

    # -- per-session MFA (a role's require_session_mfa; decision: auth/access.py) -------

    async def _session_mfa(self, request, web: WebSession, app: str, path: str, state: str,
                           posting: bool) -> bytes | None:
        """None once a fresh factor passed (the launch goes on, MFA-verified); else the
        prompt page (GET, or a wrong / replayed / missing factor) or a refusal."""
        if self._factors is None:
            raise WebError(403, NO_SESSION_FACTOR)
        try:
            need = await self._factors.session_needed(web.user)
        except AuthError as err:
            raise WebError(err.status, err.message) from None
        if not posting:
            return await self._session_mfa_page(request, 200, web.user, app, path, state,
                                                need, None)
        given = given_factors({k: _arg(request, k) for k in ("otp", "recovery_code",
                                                               "webauthn")})
        try:
            await self._factors.check_session(web.user, app, given, _client_host(request))
        except AuthError as err:
            self._retry_after(request, err)
            return await self._session_mfa_page(request, err.status, web.user, app, path,
                                                state, need, err.message)
        return None

    async def _session_mfa_page(self, request, status: int, user: str, app: str, path: str,
                                state: str, need, error: str | None) -> bytes:
        options = await self._factors.sign_in_options(user) if "webauthn" in need.factors \
            else None
        return self._page(request, status, "login_mfa.html", {
            "heading": f"{app} asks for a second factor",
            "action": f"/web/launch/{quote(app, safe='')}",
            "hidden": [("path", path), ("state", state)],
            "error": error, "factors": list(need.factors),
            "webauthn_options": _script_json(options) if options else None})

    async def _account_page(self, request, status: int, web: WebSession, error: str | None,
                            recovery_codes: list[str] | None = None) -> bytes:
        if self._factors is None:
            raise WebError(404)
        secret, uri = self._factors.new_totp(web.user)
        devices = await self._factors.devices(web.user)
        return self._page(request, status, "account.html", {
            "user": web.user, "enroll_only": web.enroll_only, "error": error,
            "devices": [{"name": d.name, "type": d.kind,
                         "created": time.strftime("%Y-%m-%d", time.gmtime(d.created))}
                        for d in devices],
            "recovery_left": await self._factors.recovery_codes_left(web.user),
            "recovery_codes": recovery_codes or [],
            "totp_secret": secret, "totp_uri": uri, "qr_svg": _qr_svg(uri),
            "webauthn_options": _script_json(
                await self._factors.registration_options(web.user)),
            "next": "/",
        })

    @staticmethod
    def _retry_after(request, err: AuthError) -> None:
        if isinstance(err, Throttled):
            request.setHeader(b"Retry-After", str(err.retry_after).encode("ascii"))

    # -- errors ------------------------------------------------------------------------

    @app.handle_errors
    def on_error(self, request, failure: Failure):
        """Every failure becomes one uniform page (or JSON error); never a traceback."""
        err = failure.value
        extra = {}
        if isinstance(err, SecondFactorRequired):
            extra["mfa_required"] = err.mfa_required
            if err.webauthn is not None:
                extra["webauthn"] = err.webauthn
        if isinstance(err, (WebError, AuthError)):
            status, message = err.status, err.message
        elif isinstance(err, HTTPException):
            status = err.code if err.code in _HEADINGS else 404
            message = _HEADINGS[status][1]
            if isinstance(err, MethodNotAllowed) and err.valid_methods:
                request.setHeader(b"Allow", ", ".join(err.valid_methods).encode("ascii"))
        else:
            self._log.failure(
                "web request {method} {path} failed", failure,
                method=request.method.decode("latin-1"), path=request.path.decode("latin-1"),
            )
            status, message = 500, _HEADINGS[500][1]
        if request.path.startswith(_JSON_PREFIXES):
            return _json(request, status, {"error": message, **extra})
        return self._error_page(request, status, message)

    # -- helpers -----------------------------------------------------------------------

    async def _web_session(self, request) -> tuple[str | None, WebSession | None]:
        """(secret, WebSession) from the session cookie, or (None, None)."""
        raw = request.getCookie(SESSION_COOKIE.encode("ascii"))
        if not raw or len(raw) > MAX_COOKIE:
            return None, None
        try:
            secret = raw.decode("ascii")
        except UnicodeDecodeError:
            return None, None
        web = await self._sessions.web_session(secret)
        return (secret, web) if web is not None else (None, None)

    async def _caller(self, request, bots: bool = False) -> Caller | None:
        """The session cookie's user, else the user certificate of the TLS connection,
        as the access policy lets them act now (AuthError 403 for a locked or removed user).

        A bot's certificate is a caller only where ``bots`` says so (the app list): a bot
        has no second factors and asks nobody for access, so every other route refuses
        it (403) rather than acting for ``bot:NAME`` as if it were a person.
        """
        _, web = await self._web_session(request)
        if web is not None:
            if web.enroll_only:
                raise AuthError(403, ENROLL_FIRST)
            return caller_from_session(web)
        transport = getattr(request.channel, "transport", None) or request.transport
        caller = certificate_caller(self._ca, transport, self._clock.seconds())
        if caller is not None and caller.is_bot and not bots:
            raise AuthError(403, "a bot cannot do this")
        return None if caller is None else await self._acting(caller, "api")

    async def _acting(self, caller: Caller, where: str) -> Caller:
        """The policy's answer to "may this user act at all" (exists, not locked):
        the caller with the roles held now; AuthError with the policy's status otherwise."""
        decision = await self._access.decide(caller, None, Facts(where=where),
                                             self._clock.seconds())
        if isinstance(decision, Deny):
            raise AuthError(decision.status, decision.message or "access denied")
        if not isinstance(decision, Allow):
            raise AuthError(403, "access denied")
        return decision.caller

    async def _check_password(self, request, username: str, password: str) -> User:
        """The user if the password is right, with the attempt audited; AuthError(401) if not."""
        client = _client(request)
        if not username or len(username) > MAX_USERNAME or len(password) > MAX_PASSWORD:
            self._audit.emit("user.login", actor=username[:MAX_USERNAME], outcome="failure",
                             method="password", client=client)
            raise AuthError(401, LOGIN_FAILED)
        try:
            user = await self._sessions.login(username, password, _client_host(request))
        except Throttled as err:
            # Same answer for known and unknown names; Retry-After for scripts and the CLI.
            request.setHeader(b"Retry-After", str(err.retry_after).encode("ascii"))
            self._audit.emit("user.login", actor=username, outcome="failure",
                             method="password", client=client, reason=err.reason)
            raise
        except AuthError as err:
            reason = "locked" if err.status == 403 else "invalid credentials"
            self._audit.emit("user.login", actor=username, outcome="failure",
                             method="password", client=client, reason=reason)
            raise
        self._audit.emit("user.login", actor=user.name, method="password", client=client)
        return user

    async def _check_connector(self, request, connector: str, username: str,
                               password: str) -> User:
        """The user an LDAP connector signs in (it audits every attempt itself)."""
        if self._ldap is None:
            raise WebError(400, "sign-in through connectors is not available here")
        try:
            return await self._ldap.login(connector, username, password,
                                          _client_host(request), _client(request))
        except Throttled as err:
            request.setHeader(b"Retry-After", str(err.retry_after).encode("ascii"))
            raise

    async def _connector_names(self) -> list[str]:
        return [] if self._ldap is None else await self._ldap.connector_names()

    async def _login_choices(self) -> dict[str, list]:
        """The sign-in page's LDAP choice and its single sign-on buttons (label, kind, url)."""
        browser = [] if self._connectors is None else await self._connectors.browser()
        return {"connectors": await self._connector_names(),
                "sso": [(getattr(spec, "display", spec.name), spec.kind, f"/web/sso/{spec.name}")
                        for spec in browser if spec.kind in self._sso_starts]}

    async def _password_login(self, request, username: str, password: str, given=None,
                              connector: str | None = None) -> tuple[str, WebSession, float]:
        """Check the password (locally with the second factor, auth/mfa.py, or with
        ``connector``), open a web session and audit both; AuthError(401) on failure,
        SecondFactorRequired when a local user's factor is missing."""
        if connector is not None:
            user = await self._check_connector(request, connector, username, password)
            return await self._open_web_session(request, user)
        user = await self._check_password(request, username, password)
        enroll_only = await self._second_factor(request, user.name, given)
        return await self._open_web_session(request, user, enroll_only)

    async def _open_web_session(self, request, user: User, enroll_only: bool = False
                                ) -> tuple[str, WebSession, float]:
        client = _client(request)
        role_set = await self._roles.role_set(user.roles)
        default = self._config.session_ttl
        ttl = min(default, role_set.max_session_ttl(default))
        secret, web = await self._sessions.create_web_session(user, ttl=ttl,
                                                              enroll_only=enroll_only)
        self._audit.emit("session.web.start", actor=user.name, client=client,
                         expires=web.expires)
        return secret, web, ttl

    async def _end_session(self, request) -> None:
        """End the caller's web session (and its app sessions) if any; always clear the cookie."""
        secret, web = await self._web_session(request)
        if web is not None:
            await self._sessions.end_web_session(secret)
            self._audit.emit("session.web.end", actor=web.user, client=_client(request))
        _set_session_cookie(request, "", 0)

    async def _allowed_apps(self, caller: Caller) -> list[AppInfo]:
        apps = sorted(self._registry.apps(include_offline=True), key=lambda app: app.name)
        return await self._access.allowed_apps(caller, apps, self._clock.seconds())

    def _app_addr(self, app: AppInfo) -> str:
        """host[:port] users reach the app at: all app hosts share the proxy's public port."""
        addr = app.public_addr or f"{app.name}.{self._config.public_host}"
        if ":" not in addr and self._config.public_port != 443:
            addr = f"{addr}:{self._config.public_port}"
        return addr

    def _same_origin(self, request) -> bool | None:
        """Whether Origin (or else Referer) names this proxy; None when neither is sent."""
        origin, referer = request.getHeader(b"origin"), request.getHeader(b"referer")
        return same_origin(None if origin is None else origin.decode("latin-1"),
                           None if referer is None else referer.decode("latin-1"), self._origins)

    def _require_same_origin(self, request) -> None:
        """CSRF guard for form POSTs: browsers always label those with Origin or Referer."""
        if self._same_origin(request) is not True:
            raise WebError(403, "This form was not submitted from this site.")

    def _login_page(self, request, status: int, target: str, error: str | None,
                    connectors: list[str] | None = None, chosen: str = "",
                    sso: list | None = None) -> bytes:
        return self._page(request, status, "login.html", {
            "next": target, "error": error,
            "max_username": MAX_USERNAME, "max_password": MAX_PASSWORD,
            "connectors": connectors or [], "chosen": chosen,
            "sso": sso or [],
        })

    def _error_page(self, request, status: int, message: str) -> bytes:
        heading = _HEADINGS.get(status, ("Error", ""))[0]
        return self._page(request, status, "error.html", {
            "status": status, "heading": heading, "message": message,
        })

    def _page(self, request, status: int, name: str, context: dict[str, Any]) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        template = self._templates.get_template(name)
        return template.render(cluster_name=self._config.cluster_name, **context).encode("utf-8")


def _load_static() -> dict[str, Data]:
    """The package's static files, read once: serving them never touches the disk."""
    assets = {}
    for entry in (files("apptunnel.web") / "static").iterdir():
        if not entry.is_file():
            continue
        content_type = mimetypes.guess_type(entry.name)[0] or "application/octet-stream"
        if content_type.startswith("text/"):
            content_type += "; charset=utf-8"
        assets[entry.name] = Data(entry.read_bytes(), content_type)
    return assets


def _arg(request, name: str) -> str | None:
    """First value of a query or form field, or None; bad UTF-8 is a 400, not a traceback."""
    values = request.args.get(name.encode("ascii"))
    if not values:
        return None
    try:
        return values[0].decode("utf-8")
    except UnicodeDecodeError:
        raise WebError(400, f"The {name} field is not valid UTF-8.") from None


def _json_body(request) -> dict:
    """The request's JSON object, bounded in size; 415/413/400 for anything else."""
    content_type = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
    if content_type != b"application/json":
        raise WebError(415, "Content-Type must be application/json")
    request.content.seek(0)
    raw = request.content.read(MAX_JSON_BODY + 1)
    if len(raw) > MAX_JSON_BODY:
        raise WebError(413, "request body too large")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise WebError(400, "malformed JSON") from None
    if not isinstance(body, dict):
        raise WebError(400, "the body must be a JSON object")
    return body


def _connector(body: dict) -> str | None:
    """The optional ``connector`` of a sign-in body (an LDAP connector's name)."""
    value = body.get("connector")
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > 64:
        raise WebError(400, "connector must be a connector's name")
    return value


def _cli_return(request) -> CliReturn | None:
    """Where ``apptunnel login --auth`` waits (cli_port, cli_state, cli_challenge), if
    it started this flow; 400 for a partial or malformed set."""
    port, state, challenge = (_arg(request, n) for n in ("cli_port", "cli_state",
                                                          "cli_challenge"))
    if port is None and state is None and challenge is None:
        return None
    token = re.compile(r"[A-Za-z0-9_-]{16,128}\Z")
    if not (port and port.isdigit() and 1024 <= int(port) <= 65535 and state
            and token.match(state) and challenge and token.match(challenge)):
        raise WebError(400, "cli_port, cli_state and cli_challenge are malformed")
    return CliReturn(int(port), state, challenge)


def _app_type(uri: str) -> str:
    """``http`` for web apps, ``tcp`` for tcp:// apps: how a client reaches the app."""
    scheme = uri.split(":", 1)[0].lower() if ":" in uri else ""
    return "tcp" if scheme == "tcp" else "http"


def _json(request, status: int, body: Any) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    return json.dumps(body).encode("utf-8")


def _redirect(request, status: int, location: str) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Location", location.encode("utf-8"))
    return b""


def _script_json(value: Any) -> str:
    """JSON for a <script type="application/json"> block: its text is not entity-decoded,
    so it goes unescaped, with <, > and & as \\u escapes so it can never close the tag."""
    return (json.dumps(value).replace("<", "\\u003c").replace(">", "\\u003e")
            .replace("&", "\\u0026"))


def _qr_svg(text: str) -> str:
    """The QR code of ``text`` as inline SVG (made here: no third party sees the secret)."""
    return segno.make(text, error="m").svg_inline(scale=4)


def _cookie(request, name: str) -> str | None:
    raw = request.getCookie(name.encode("ascii"))
    if not raw or len(raw) > MAX_COOKIE:
        return None
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        return None


def _set_cookie(request, name: str, value: str, max_age: float) -> None:
    request.responseHeaders.addRawHeader(
        b"Set-Cookie",
        f"{name}={value}; Path=/; Secure; HttpOnly; SameSite=Lax; "
        f"Max-Age={int(max_age)}".encode("ascii"),
    )


def _set_session_cookie(request, secret: str, max_age: float) -> None:
    """Host-only, Secure, HttpOnly, Lax: the only shape the `__Host-` prefix allows anyway."""
    request.responseHeaders.addRawHeader(
        b"Set-Cookie",
        f"{SESSION_COOKIE}={secret}; Path=/; Secure; HttpOnly; SameSite=Lax; "
        f"Max-Age={int(max_age)}".encode("ascii"),
    )


def _client_host(request) -> str:
    """The client's IP address alone: what sign-in throttling counts per address."""
    return str(getattr(request.getClientAddress(), "host", "") or "")


def _client(request) -> str:
    addr = request.getClientAddress()
    host = getattr(addr, "host", None)
    port = getattr(addr, "port", None)
    return f"{host}:{port}" if host is not None else ""
