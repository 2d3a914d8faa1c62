"""Signing a person in over HTTP: password (local or LDAP), second factor, the web
session it opens, and the one-time codes that end a browser sign-in the CLI started.

Shared by the sign-in pages (web/login_routes.py), the account page (a new device turns
an enroll-only session into a full one) and certificate issue (web/cert_routes.py). The
decisions are auth/'s (sessions, mfa, throttle, connectors); this audits each attempt and
reads what it needs from the request.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import quote

from apptunnel.auth.connectors.cli_codes import CliCodes, CliReturn, digest
from apptunnel.auth.errors import AuthError
from apptunnel.auth.mfa import ENROLL_FIRST, given_factors
from apptunnel.auth.throttle import Throttled
from apptunnel.web.http import (
    WebError,
    client,
    client_host,
    redirect,
    retry_after,
    set_session_cookie,
)

if TYPE_CHECKING:
    from apptunnel.auth.connectors.ldap import LdapSignIn
    from apptunnel.auth.connectors.store import ConnectorStore
    from apptunnel.auth.mfa import SecondFactors
    from apptunnel.backend.records import User, WebSession
    from apptunnel.web.context import WebContext

LOGIN_FAILED = "invalid username or password"

# Bounds checked before any work is done (argon2 on a megabyte password is a DoS).
MAX_USERNAME = 256
MAX_PASSWORD = 1024


class SignIn:
    """Password and connector sign-in, second factors, web sessions, CLI sign-in codes."""

    def __init__(self, ctx: WebContext, factors: SecondFactors | None,
                 ldap: LdapSignIn | None, connectors: ConnectorStore | None,
                 backend=None) -> None:
        self._ctx = ctx
        self.factors = factors          # None without a backend: no second factors
        self._ldap = ldap               # sign-in through LDAP connectors
        self._connectors = connectors   # the sign-in page's single sign-on buttons
        self.sso_starts = {}            # connector kind -> start(request, name, target)
        # `apptunnel login --auth`'s one-time codes, one store for every browser connector.
        self.cli_codes = CliCodes(ctx.clock, backend)   # in the backend: any proxy redeems

    async def check_password(self, request, username: str, password: str) -> User:
        """The user if the password is right, with the attempt audited; AuthError(401) if not."""
        audit, where = self._ctx.audit, client(request)
        if not username or len(username) > MAX_USERNAME or len(password) > MAX_PASSWORD:
            audit.emit("user.login", actor=username[:MAX_USERNAME], outcome="failure",
                       method="password", client=where)
            raise AuthError(401, LOGIN_FAILED)
        try:
            user = await self._ctx.sessions.login(username, password, client_host(request))
        except Throttled as err:
            # Same answer for known and unknown names; Retry-After for scripts and the CLI.
            retry_after(request, err)
            audit.emit("user.login", actor=username, outcome="failure",
                       method="password", client=where, reason=err.reason)
            raise
        except AuthError as err:
            reason = "locked" if err.status == 403 else "invalid credentials"
            audit.emit("user.login", actor=username, outcome="failure",
                       method="password", client=where, reason=reason)
            raise
        audit.emit("user.login", actor=user.name, method="password", client=where)
        return user

    async def check_connector(self, request, connector: str, username: str,
                              password: str) -> User:
        """The user an LDAP connector signs in (it audits every attempt itself)."""
        if self._ldap is None:
            raise WebError(400, "sign-in through connectors is not available here")
        try:
            return await self._ldap.login(connector, username, password,
                                          client_host(request), client(request))
        except Throttled as err:
            retry_after(request, err)
            raise

    async def connector_names(self) -> list[str]:
        return [] if self._ldap is None else await self._ldap.connector_names()

    async def browser_connectors(self) -> list:
        """The browser (OIDC, SAML) connectors this proxy can start."""
        browser = [] if self._connectors is None else await self._connectors.browser()
        return [spec for spec in browser if spec.kind in self.sso_starts]

    async def connector(self, name: str):
        """The connector spec called ``name``, or None."""
        return None if self._connectors is None else await self._connectors.get(name)

    async def login_choices(self) -> dict[str, list]:
        """The sign-in page's LDAP choice and its single sign-on buttons (label, kind, url)."""
        return {"connectors": await self.connector_names(),
                "sso": [(getattr(spec, "display", spec.name), spec.kind, f"/web/sso/{spec.name}")
                        for spec in await self.browser_connectors()]}

    async def password_login(self, request, username: str, password: str, given=None,
                             connector: str | None = None) -> tuple[str, WebSession, float]:
        """Check the password (locally with the second factor, auth/mfa.py, or with
        ``connector``), open a web session and audit both; AuthError(401) on failure,
        SecondFactorRequired when a local user's factor is missing."""
        if connector is not None:
            user = await self.check_connector(request, connector, username, password)
            return await self.open_web_session(request, user, method=f"ldap:{connector}")
        user = await self.check_password(request, username, password)
        enroll_only = await self.second_factor(request, user.name, given)
        return await self.open_web_session(request, user, enroll_only,
                                           method=password_method(given))

    async def open_web_session(self, request, user: User, enroll_only: bool = False,
                               method: str = "") -> tuple[str, WebSession, float]:
        ctx = self._ctx
        role_set = await ctx.roles.role_set(user.roles)
        default = ctx.config.session_ttl
        ttl = min(default, role_set.max_session_ttl(default))
        secret, web = await ctx.sessions.create_web_session(user, ttl=ttl,
                                                            enroll_only=enroll_only,
                                                            method=method)
        ctx.audit.emit("session.web.start", actor=user.name, client=client(request),
                       expires=web.expires)
        return secret, web, ttl

    async def end_session(self, request) -> None:
        """End the caller's web session (and its app sessions) if any; always clear the cookie."""
        secret, web = await self._ctx.web_session(request)
        if web is not None:
            await self._ctx.sessions.end_web_session(secret)
            self._ctx.audit.emit("session.web.end", actor=web.user, client=client(request))
        set_session_cookie(request, "", 0)

    async def second_factor(self, request, user: str, given) -> bool:
        """Pass the second-factor check of ``user``'s sign-in; True for enroll-only."""
        if self.factors is None:
            return False
        try:
            need = await self.factors.check(user, given or given_factors({}),
                                            client_host(request))
        except AuthError as err:
            retry_after(request, err)
            raise
        return need.enroll_only

    async def full_sign_in(self, request, user: str, given) -> None:
        """A certificate needs the whole sign-in: no enroll-only certificates exist."""
        if await self.second_factor(request, user, given):
            raise AuthError(403, ENROLL_FIRST)

    async def user(self, name: str) -> User:
        user = await self._ctx.sessions.user(name)
        if user is None:
            raise AuthError(401, LOGIN_FAILED)
        return user

    # -- `apptunnel login --auth`: the browser hands the CLI a one-time code ------------

    async def cli_redirect(self, request, user: User, cli: CliReturn) -> bytes:
        """The end of a browser sign-in `apptunnel login --auth` started (OIDC or SAML):
        no web session, the browser goes to the CLI's loopback listener with a one-time
        code the CLI exchanges at POST /v1/certs with its verifier."""
        code = await self.cli_codes.issue(user.name, cli.challenge)
        query = f"code={quote(code, safe='')}&state={quote(cli.state, safe='')}"
        return redirect(request, 302, f"http://127.0.0.1:{cli.port}/callback?{query}")

    async def redeem_sso_code(self, request, body: dict) -> User:
        """The user a CLI's one-time code was issued to, if its verifier is right;
        throttled per address and audited like a sign-in."""
        ctx = self._ctx
        code, verifier = body.get("sso_code"), body.get("code_verifier")
        if not isinstance(code, str) or not isinstance(verifier, str) \
                or len(code) > 128 or len(verifier) > 128:
            raise WebError(400, "sso_code and code_verifier (strings) are required")
        address, key = client_host(request), f"sso-code:{digest(code)}"
        try:
            ctx.sessions.throttle.attempt(key, address, ctx.clock.seconds())
        except Throttled as err:
            retry_after(request, err)
            raise
        name = await self.cli_codes.redeem(code, verifier)
        user = None if name is None else await ctx.sessions.user(name)
        if user is None:
            ctx.audit.emit("user.login", actor="", outcome="failure", method="sso-code",
                           client=client(request), reason="unknown or used code")
            raise AuthError(401, "this sign-in code is unknown, used or expired")
        ctx.sessions.throttle.succeeded(key, address)
        return user


def password_method(given) -> str:
    """How a local sign-in went, for the account page: the password and the factor used."""
    if given is None or given.empty:
        return "password"
    if given.otp:
        return "password + authenticator code"
    if given.recovery_code:
        return "password + recovery code"
    return "password + security key"


def connector_field(body: dict) -> str | None:
    """The optional ``connector`` of a sign-in body (an LDAP connector's name)."""
    value = body.get("connector")
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > 64:
        raise WebError(400, "connector must be a connector's name")
    return value
