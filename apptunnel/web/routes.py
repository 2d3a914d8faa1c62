"""The proxy host's own web UI and JSON API: the root that mounts one route module per job.

Users sign in here, see the apps their roles allow, and launch them; the app host then
receives a one-time code bound to its own state cookie (see proxy/router.py), never a
session secret. Every decision (passwords, sessions, access) is made by the objects handed
in; the route modules only speak HTTP.

Structure (docs/internals.rst, "web/"): each job is a class with its own Klein app in its
own module (web/login_routes.py, apps_routes.py, account_routes.py, cert_routes.py,
request_routes.py, site_routes.py); they share one `WebContext` (web/context.py: the
caller of a request, same-origin checks, page rendering, the uniform error answer) and the
helpers of web/http.py. `WebApp._mounts` lists which path prefixes each module answers;
adding a module is a class, its construction and its prefixes there. The root resource
stamps the security headers on every response, refuses a foreign Host, and hands the
request, path unchanged, to the module of the longest matching prefix.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource

from apptunnel.auth.access import AccessPolicy
from apptunnel.auth.links import LinkRedeemer
from apptunnel.auth.mfa import PendingSignIns, SecondFactors
from apptunnel.auth.webauthn_devices import WebAuthnKeys
from apptunnel.net import host_only
from apptunnel.web.account_routes import AccountRoutes
from apptunnel.web.apps_routes import AppsRoutes
from apptunnel.web.cert_routes import CertRoutes
from apptunnel.web.context import Routes, WebContext
from apptunnel.web.http import (  # noqa: F401  (re-exported: tests and tools import them here)
    HEADINGS,
    MFA_COOKIE,
    SECURITY_HEADERS,
    SESSION_COOKIE,
    SSO_COOKIE,
    WebError,
)
from apptunnel.web.login_routes import LoginRoutes
from apptunnel.web.request_routes import RequestRoutes
from apptunnel.web.sign_in import SignIn
from apptunnel.web.site_routes import SiteRoutes

if TYPE_CHECKING:
    from apptunnel.audit import AuditLog
    from apptunnel.auth.ca import ClusterCA
    from apptunnel.auth.connectors.ldap import LdapSignIn
    from apptunnel.auth.connectors.oidc import OidcSignIn
    from apptunnel.auth.connectors.store import ConnectorStore
    from apptunnel.auth.directory import UserDirectory
    from apptunnel.auth.jwt import JwtKeys
    from apptunnel.auth.locks import LockWatcher
    from apptunnel.auth.policy import RoleCache
    from apptunnel.auth.sessions import SessionManager
    from apptunnel.backend.base import Backend
    from apptunnel.catalog import AppCatalog
    from apptunnel.config import ProxyConfig
    from apptunnel.diag import Readiness
    from apptunnel.web.access_requests import AccessRequestApi
    from apptunnel.web.bots import BotRoutes
    from apptunnel.web.saml import SamlWeb


def mount_for(path: str, prefixes) -> str | None:
    """The longest of ``prefixes`` that ``path`` is under (``/`` matches only itself)."""
    best = None
    for prefix in prefixes:
        if prefix == "/":
            hit = path == "/"
        else:
            hit = path == prefix or path.startswith(prefix + "/")
        if hit and (best is None or len(prefix) > len(best)):
            best = prefix
    return best


class WebApp:
    """The proxy host's route modules, mounted by path prefix under one root resource."""

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
                 access_requests: AccessRequestApi | None = None,
                 readiness: Readiness | None = None) -> None:
        # Every "may this caller ..." is the access policy's (shared with the app edge in
        # the proxy service; built from roles, locks and users when not handed in).
        access = access or AccessPolicy(roles=roles, audit=audit, clock=clock,
                                        locks=locks, users=users)
        self.context = ctx = WebContext(config, sessions, roles, registry, audit, ca, clock,
                                        access)
        self.backend = backend
        # Links and second factors (auth/links.py, auth/mfa.py); off without a backend.
        links = factors = None
        if backend is not None:
            links = LinkRedeemer(backend, clock, sessions.throttle, sessions.hashes, audit)
            port = "" if config.public_port == 443 else f":{config.public_port}"
            keys = WebAuthnKeys(config.public_host, f"https://{config.public_host}{port}",
                                config.cluster_name, clock, backend)
            factors = SecondFactors(backend, clock, config.second_factor,
                                    sessions.throttle, audit,
                                    issuer=config.cluster_name, webauthn=keys)
        self.sign_in = sign_in = SignIn(ctx, factors, ldap, connectors, backend)
        self.factors = factors
        pending = PendingSignIns(backend, clock) if backend is not None else None
        login = LoginRoutes(ctx, sign_in, pending, links, saml, oidc)
        apps = AppsRoutes(ctx, factors)
        account = AccountRoutes(ctx, sign_in, factors)
        certs = CertRoutes(ctx, sign_in, factors, bots)
        requests = RequestRoutes(ctx, access_requests)
        site = SiteRoutes(ctx, jwt_keys, readiness)
        self._mounts: dict[str, Routes] = {
            "/": apps, "/web/apps": apps, "/web/launch": apps, "/v1/apps": apps,
            "/web/login": login, "/web/logout": login, "/web/invite": login,
            "/web/reset": login, "/web/sso": login, "/v1/webapi": login,
            "/v1/sessions": login, "/v1/connectors": login,
            "/web/account": account, "/v1/mfa": account,
            "/v1/account": account, "/v1/sessions/all": account,
            "/v1/certs": certs, "/v1/bots": certs,
            "/v1/access-requests": requests, "/v1/sessions/assume": requests, "/web/requests": requests,
            "/static": site, "/favicon.ico": site, "/.well-known": site, "/healthz": site,
            "/readyz": site,
        }

    def mount(self, prefixes: tuple[str, ...], routes: Routes) -> None:
        """Answer ``prefixes`` (and every path under them) with ``routes`` (a `Routes`
        subclass built on ``self.context``); call before ``resource()``."""
        for prefix in prefixes:
            self._mounts[prefix] = routes

    def resource(self) -> IResource:
        """The root resource to serve at https://<public_addr>/ (wrapped in a Site by the caller)."""
        resources = {}
        mounts = {}
        for prefix, routes in self._mounts.items():
            if id(routes) not in resources:
                resources[id(routes)] = routes.app.resource()
            mounts[prefix] = resources[id(routes)]
        return _Root(mounts, self.context)


class _Root(Resource):
    """Root resource: stamps the security headers on every response, then hands the
    request to the route module mounted at its path.

    It also refuses (421) a request whose Host is not the proxy's own: the edge hands a
    whole keep-alive connection to the web UI after its first request, so a later request
    on it naming an app host must not be answered as if it were the proxy's.
    """

    isLeaf = True

    def __init__(self, mounts: dict[str, IResource], ctx: WebContext) -> None:
        super().__init__()
        self._mounts = mounts
        self._ctx = ctx
        self._public_host = ctx.config.public_host.lower()

    def render(self, request: IRequest):
        for name, value in SECURITY_HEADERS:
            request.setHeader(name, value)
        host = host_only((request.getHeader(b"host") or b"").decode("latin-1"))
        if host != self._public_host:
            request.setHeader(b"Connection", b"close")
            return self._ctx.error_page(request, 421, HEADINGS[421][1])
        prefix = mount_for(request.path.decode("latin-1"), self._mounts)
        if prefix is None:
            return self._ctx.on_error(request, Failure(WebError(404)))
        return self._mounts[prefix].render(request)
