"""Sign-in and sign-out: the sign-in page and its second step, invite and reset links,
single sign-on (OIDC, SAML) and the JSON sign-in the CLI and scripts use.

    GET/POST /web/login, POST /web/login/mfa, POST /web/logout
    GET/POST /web/invite/TOKEN, /web/reset/TOKEN
    GET /web/sso/NAME, GET /v1/webapi/oidc/callback
    GET /v1/webapi/saml/metadata/NAME, POST /v1/webapi/saml/acs/NAME
    POST/DELETE /v1/sessions, GET /v1/connectors
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING
from urllib.parse import quote

from klein import Klein

from apptunnel.auth.connectors.cli_codes import CliReturn
from apptunnel.auth.connectors.oidc import FLOW_TTL
from apptunnel.auth.errors import AuthError
from apptunnel.auth.links import password_problem
from apptunnel.auth.mfa import ENROLL_FIRST, SecondFactorRequired, given_factors
from apptunnel.auth.passwords import MIN_PASSWORD_LENGTH
from apptunnel.auth.redirects import safe_path
from apptunnel.web.context import Routes
from apptunnel.web.http import (
    HEADINGS,
    MFA_COOKIE,
    SSO_COOKIE,
    WebError,
    arg,
    client,
    client_host,
    cookie,
    json_body,
    json_response,
    no_content,
    redirect,
    retry_after,
    script_json,
    set_cookie,
    set_session_cookie,
)
from apptunnel.web.sign_in import (
    MAX_PASSWORD,
    MAX_USERNAME,
    connector_field,
    password_method,
)

if TYPE_CHECKING:
    from apptunnel.auth.connectors.oidc import OidcSignIn
    from apptunnel.auth.links import LinkRedeemer
    from apptunnel.auth.mfa import PendingSignIns
    from apptunnel.web.context import WebContext
    from apptunnel.web.saml import SamlWeb
    from apptunnel.web.sign_in import SignIn

_CLI_TOKEN = re.compile(r"[A-Za-z0-9_-]{16,128}\Z")


class LoginRoutes(Routes):
    app = Klein()
    app.handle_errors(Routes.on_error)

    def __init__(self, ctx: WebContext, sign_in: SignIn, pending: PendingSignIns | None,
                 links: LinkRedeemer | None, saml: SamlWeb | None,
                 oidc: OidcSignIn | None) -> None:
        super().__init__(ctx)
        self._sign_in = sign_in
        self._pending = pending
        self._links = links
        self._saml = saml               # SAML connectors (web/saml.py)
        self._oidc = oidc               # OIDC connectors (auth/connectors/oidc.py)
        if saml is not None:
            sign_in.sso_starts["saml"] = lambda request, name, target: saml.start(
                request, name, target, client_host(request), cli_return(request))
        if oidc is not None:
            sign_in.sso_starts["oidc"] = self._oidc_start

    # -- the sign-in page ----------------------------------------------------------------

    @app.route("/web/login", methods=["GET"])
    async def login_form(self, request):
        target = safe_path(arg(request, "next"))
        _, web = await self.ctx.web_session(request)
        if web is not None:
            return redirect(request, 302, target)
        return self.login_page(request, 200, target, error=None,
                               **await self._sign_in.login_choices())

    @app.route("/web/login", methods=["POST"])
    async def login_submit(self, request):
        self.ctx.require_same_origin(request)
        target = safe_path(arg(request, "next"))
        username = arg(request, "username") or ""
        password = arg(request, "password") or ""
        connector = arg(request, "connector") or None   # "": the local account
        try:
            secret, web, ttl = await self._sign_in.password_login(
                request, username, password, connector=connector)
        except SecondFactorRequired:
            # The password was right: the second step asks for the factor (web/mfa page).
            ticket = await self._pending.start(username)
            set_cookie(request, MFA_COOKIE, ticket, self._pending.ttl)
            return await self._mfa_page(request, 200, username, target, error=None)
        except AuthError as err:
            return self.login_page(request, err.status, target, error=err.message,
                                   **await self._sign_in.login_choices(),
                                   chosen=connector or "", username=username)
        set_session_cookie(request, secret, ttl)
        return redirect(request, 303, "/web/account" if web.enroll_only else target)

    @app.route("/web/logout", methods=["POST"])
    async def logout(self, request):
        self.ctx.require_same_origin(request)
        await self._sign_in.end_session(request)
        return redirect(request, 303, "/web/login")

    @app.route("/web/login/mfa", methods=["POST"])
    async def login_mfa(self, request):
        """The browser's second step: the pending ticket's user presents a factor."""
        self.ctx.require_same_origin(request)
        target = safe_path(arg(request, "next"))
        ticket = cookie(request, MFA_COOKIE)
        username = await self._pending.user(ticket)
        if username is None:
            return self.login_page(request, 401, target,
                                   error="Your sign-in took too long; sign in again.")
        given = given_factors({k: arg(request, k) for k in ("otp", "recovery_code",
                                                              "webauthn")})
        try:
            enroll_only = await self._sign_in.second_factor(request, username, given)
        except SecondFactorRequired as err:
            return await self._mfa_page(request, 401, username, target, error=err.message)
        except AuthError as err:
            return await self._mfa_page(request, err.status, username, target,
                                        error=err.message)
        await self._pending.finish(ticket)
        set_cookie(request, MFA_COOKIE, "", 0)
        user = await self._sign_in.user(username)
        secret, web, ttl = await self._sign_in.open_web_session(
            request, user, enroll_only, method=password_method(given))
        set_session_cookie(request, secret, ttl)
        return redirect(request, 303, target)

    def login_page(self, request, status: int, target: str, error: str | None,
                   connectors: list[str] | None = None, chosen: str = "",
                   sso: list | None = None, username: str = "") -> bytes:
        return self.ctx.page(request, status, "login.html", {
            "next": target, "error": error, "username": username[:MAX_USERNAME],
            "max_username": MAX_USERNAME, "max_password": MAX_PASSWORD,
            "connectors": connectors or [], "chosen": chosen,
            "sso": sso or [],
        })

    async def _mfa_page(self, request, status: int, user: str, target: str,
                        error: str | None) -> bytes:
        factors = self._sign_in.factors
        need = await factors.needed(user)
        options = await factors.sign_in_options(user) if "webauthn" in need.factors \
            else None
        return self.ctx.page(request, status, "login_mfa.html", {
            "heading": "Second factor", "action": "/web/login/mfa",
            "hidden": [("next", target)], "error": error, "factors": list(need.factors),
            "webauthn_options": script_json(options) if options else None})

    # -- invite/reset links (decisions: auth/links.py) --------------------------------

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
        page = self.ctx.page
        heading = "Welcome: choose your password" if kind == "invite" else "Reset your password"
        context = {"heading": heading, "action": f"/web/{kind}/{quote(token, safe='')}",
                   "min_password": MIN_PASSWORD_LENGTH, "max_password": MAX_PASSWORD,
                   "error": None, "user": None, "done": False}
        address = client_host(request)
        posting = request.method == b"POST"
        if posting:
            self.ctx.require_same_origin(request)
        try:
            link = await self._links.look(kind, token, address)
        except AuthError as err:
            retry_after(request, err)
            return page(request, err.status, "link.html", {**context, "error": err.message})
        context["user"] = link.user
        if not posting:
            return page(request, 200, "link.html", context)
        password, confirm = arg(request, "password"), arg(request, "confirm")
        problem = password_problem(password, confirm)
        if problem is not None:
            return page(request, 400, "link.html", {**context, "error": problem})
        try:
            await self._links.redeem(kind, token, password, address)
        except AuthError as err:
            retry_after(request, err)
            return page(request, err.status, "link.html",
                        {**context, "user": None, "error": err.message})
        return page(request, 200, "link.html", {**context, "done": True})

    # -- single sign-on ----------------------------------------------------------------

    @app.route("/web/sso/<string:name>", methods=["GET"])
    async def sso_start(self, request, name: str):
        """Start connector ``name``'s browser flow (the sign-in page's buttons link here)."""
        target = safe_path(arg(request, "next"))
        spec = await self._sign_in.connector(name)
        start = None if spec is None else self._sign_in.sso_starts.get(spec.kind)
        if start is None:
            raise WebError(404, "There is no single sign-on connector of that name.")
        return await start(request, name, target)

    @app.route("/v1/webapi/saml/metadata/<string:name>", methods=["GET"])
    async def saml_metadata(self, request, name: str):
        if self._saml is None:
            raise WebError(404)
        return await self._saml.metadata(request, name, client_host(request))

    @app.route("/v1/webapi/saml/acs/<string:name>", methods=["POST"])
    async def saml_acs(self, request, name: str):
        """The IdP's HTTP-POST: a web session and the user's target, or the login page."""
        if self._saml is None:
            raise WebError(404)
        try:
            user, target, cli = await self._saml.acs(request, name, client_host(request),
                                                     client(request))
        except AuthError as err:
            retry_after(request, err)
            return self.login_page(request, err.status, "/", error=err.message,
                                   **await self._sign_in.login_choices())
        if cli is not None:
            return await self._sign_in.cli_redirect(request, user, cli)
        secret, _, ttl = await self._sign_in.open_web_session(request, user,
                                                              method=f"saml:{name}")
        set_session_cookie(request, secret, ttl)
        return redirect(request, 303, target)

    async def _oidc_start(self, request, name: str, target: str):
        """An OIDC connector's button (through ``sso_start``): begin its flow and send the
        browser to the provider."""
        started = await self._oidc.start(name, target, cli_return(request))
        if started is None:
            raise WebError(404, "There is no single sign-on connector of that name.")
        url, binding = started
        set_cookie(request, SSO_COOKIE, binding, FLOW_TTL)
        return redirect(request, 302, url)

    @app.route("/v1/webapi/oidc/callback", methods=["GET"])
    async def oidc_callback(self, request):
        """The provider's redirect back: a web session (or the CLI's one-time code), or a
        page saying why not. Every attempt is audited and throttled per address."""
        if self._oidc is None:
            return self.ctx.error_page(request, 404, HEADINGS[404][1])
        try:
            done = await self._oidc.finish(
                arg(request, "state"), arg(request, "code"), arg(request, "error"),
                cookie(request, SSO_COOKIE), client_host(request), client(request))
        except AuthError as err:
            retry_after(request, err)
            return self.ctx.error_page(request, err.status, err.message)
        set_cookie(request, SSO_COOKIE, "", 0)
        if done.flow.cli is not None:
            return await self._sign_in.cli_redirect(request, done.user, done.flow.cli)
        secret, _, ttl = await self._sign_in.open_web_session(
            request, done.user, method=f"oidc:{done.flow.connector}")
        set_session_cookie(request, secret, ttl)
        return redirect(request, 303, done.flow.next)

    # -- JSON sign-in --------------------------------------------------------------------

    @app.route("/v1/sessions", methods=["POST"])
    async def api_login(self, request):
        self.ctx.refuse_cross_origin(request)
        body = json_body(request)
        username, password = body.get("username"), body.get("password")
        if not isinstance(username, str) or not isinstance(password, str):
            raise WebError(400, "username and password (strings) are required")
        secret, web, ttl = await self._sign_in.password_login(
            request, username, password, given_factors(body), connector_field(body))
        set_session_cookie(request, secret, ttl)
        answer = {"user": web.user, "roles": list(web.roles), "expires": web.expires}
        if web.enroll_only:
            answer.update(enroll_only=True, message=ENROLL_FIRST)
        return json_response(request, 200, answer)

    @app.route("/v1/sessions", methods=["DELETE"])
    async def api_logout(self, request):
        self.ctx.refuse_cross_origin(request)
        await self._sign_in.end_session(request)
        return no_content(request)

    @app.route("/v1/connectors", methods=["GET"])
    async def api_connectors(self, request):
        """The connectors the sign-in page offers, by name and kind (what the CLI needs to
        choose between a password and a browser flow); no other detail."""
        listed = [{"name": n, "kind": "ldap"} for n in await self._sign_in.connector_names()]
        listed += [{"name": spec.name, "kind": spec.kind}
                   for spec in await self._sign_in.browser_connectors()]
        return json_response(request, 200,
                             {"connectors": sorted(listed, key=lambda c: c["name"])})


def cli_return(request) -> CliReturn | None:
    """Where ``apptunnel login --auth`` waits (cli_port, cli_state, cli_challenge), if
    it started this flow; 400 for a partial or malformed set."""
    port, state, challenge = (arg(request, n) for n in ("cli_port", "cli_state",
                                                         "cli_challenge"))
    if port is None and state is None and challenge is None:
        return None
    if not (port and port.isdigit() and 1024 <= int(port) <= 65535 and state
            and _CLI_TOKEN.match(state) and challenge and _CLI_TOKEN.match(challenge)):
        raise WebError(400, "cli_port, cli_state and cli_challenge are malformed")
    return CliReturn(int(port), state, challenge)
