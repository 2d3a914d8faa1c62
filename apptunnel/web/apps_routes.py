"""The app catalogue and the launch hand-off to an app host.

    GET /                          the catalogue (the proxy's home page)
    GET/POST /web/launch/NAME      the hand-off: a one-time code for the app host, after
                                   the per-session MFA prompt when a role asks for it
    GET /v1/apps                   the apps the caller may open (session or certificate)
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import quote

from klein import Klein

from apptunnel.auth.access import Allow, Deny, Facts, NeedsMore
from apptunnel.auth.callers import caller_from_session
from apptunnel.auth.errors import AuthError
from apptunnel.auth.mfa import NO_SESSION_FACTOR, given_factors
from apptunnel.auth.redirects import safe_path
from apptunnel.web.context import Routes
from apptunnel.web.http import (
    WebError,
    arg,
    client,
    client_host,
    json_response,
    redirect,
    retry_after,
    script_json,
)

if TYPE_CHECKING:
    from apptunnel.auth.mfa import SecondFactors
    from apptunnel.backend.records import WebSession
    from apptunnel.web.context import WebContext

MAX_STATE = 512


def app_type(uri: str) -> str:
    """``http`` for web apps, ``tcp`` for tcp:// apps: how a client reaches the app."""
    scheme = uri.split(":", 1)[0].lower() if ":" in uri else ""
    return "tcp" if scheme == "tcp" else "http"


class AppsRoutes(Routes):
    app = Klein()
    app.handle_errors(Routes.on_error)

    def __init__(self, ctx: WebContext, factors: SecondFactors | None) -> None:
        super().__init__(ctx)
        self._factors = factors

    @app.route("/", methods=["GET"])
    async def apps_page(self, request):
        ctx = self.ctx
        secret, web = await ctx.web_session(request)
        if web is None:
            return redirect(request, 302, "/web/login")
        if web.enroll_only:
            return redirect(request, 302, "/web/account")
        apps = await ctx.allowed_apps(caller_from_session(web))
        return ctx.page(request, 200, "apps.html", {
            "user": web.user,
            "roles": list(web.roles),
            "apps": [
                {
                    "name": app.name,
                    "labels": sorted(app.labels.items()),
                    "public_addr": ctx.app_addr(app),
                    "launch_url": f"https://{ctx.app_addr(app)}/",
                    "online": ctx.registry.is_online(app.name),
                }
                for app in apps
            ],
            "ca_pin": ctx.ca.pin,
        })

    @app.route("/web/launch/<string:name>", methods=["GET", "POST"])
    async def launch(self, request, name: str):
        """The hand-off to an app host; first the per-session MFA prompt when a role asks
        for it (GET shows it, a same-origin POST with the factor passes it)."""
        ctx = self.ctx
        posting = request.method == b"POST"
        if posting:
            ctx.require_same_origin(request)
        _, web = await ctx.web_session(request)
        if web is None:
            if posting:
                return redirect(request, 303, "/web/login")
            here = request.uri.decode("latin-1")
            return redirect(request, 302, "/web/login?next=" + quote(here, safe=""))
        if web.enroll_only:
            return redirect(request, 302 if not posting else 303, "/web/account")
        app = ctx.registry.app(name)
        if app is None:
            raise WebError(404, "No application of that name is online.")
        state = arg(request, "state")
        if not state or len(state) > MAX_STATE:
            raise WebError(400, "The launch link is missing its state; open the app again.")
        decision = await ctx.access.decide(caller_from_session(web), app,
                                           Facts(client_ip=client(request), where="launch"),
                                           ctx.clock.seconds())
        path = safe_path(arg(request, "path"))
        verified = False
        if isinstance(decision, NeedsMore) and decision.kind == "mfa":
            answer = await self._session_mfa(request, web, app.name, path, state, posting)
            if answer is not None:
                return answer
            verified = True
        elif not isinstance(decision, Allow):
            message = decision.message if isinstance(decision, Deny) and decision.message else None
            raise WebError(403, message or "Your roles do not allow you to open this application.")
        code = await ctx.sessions.create_auth_code(web, app.name, path, state, verified)
        url = f"https://{ctx.app_addr(app)}/.apptunnel/auth?code={quote(code, safe='')}"
        return redirect(request, 303 if posting else 302, url)

    @app.route("/v1/apps", methods=["GET"])
    async def api_apps(self, request):
        ctx = self.ctx
        caller = await ctx.caller(request, bots=True)
        if caller is None:
            raise WebError(401, "sign in required")
        apps = await ctx.allowed_apps(caller)
        return json_response(request, 200, {"apps": [
            {
                "name": app.name,
                "type": app_type(app.uri),
                "labels": dict(app.labels),
                "public_addr": ctx.app_addr(app),
                "online": ctx.registry.is_online(app.name),
            }
            for app in apps
        ]})

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
        given = given_factors({k: arg(request, k) for k in ("otp", "recovery_code",
                                                              "webauthn")})
        try:
            await self._factors.check_session(web.user, app, given, client_host(request))
        except AuthError as err:
            retry_after(request, err)
            return await self._session_mfa_page(request, err.status, web.user, app, path,
                                                state, need, err.message)
        return None

    async def _session_mfa_page(self, request, status: int, user: str, app: str, path: str,
                                state: str, need, error: str | None) -> bytes:
        options = await self._factors.sign_in_options(user) if "webauthn" in need.factors \
            else None
        return self.ctx.page(request, status, "login_mfa.html", {
            "heading": f"{app} asks for a second factor",
            "action": f"/web/launch/{quote(app, safe='')}",
            "hidden": [("path", path), ("state", state)],
            "error": error, "factors": list(need.factors),
            "webauthn_options": script_json(options) if options else None})
