"""The app catalogue and the launch hand-off to an app host.

    GET /                          the catalogue (the proxy's home page)
    GET/POST /web/launch/NAME      the hand-off: a one-time code for the app host, after
                                   the per-session MFA prompt when a role asks for it
    GET /web/apps                  the same, the catalogue's own address
    GET /v1/apps                   the apps the caller may open (session or certificate);
                                   ?all=1 adds those a role they may request would open
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import quote

from klein import Klein

from apptunnel.auth.access import Allow, Deny, Facts, NeedsMore
from apptunnel.auth.access_requests import roles_for_app
from apptunnel.auth.callers import caller_from_session
from apptunnel.auth.errors import AuthError
from apptunnel.auth.mfa import NO_SESSION_FACTOR, given_factors
from apptunnel.auth.redirects import safe_path
from apptunnel.web.catalogue import Filters, connect_commands, request_url
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
    @app.route("/web/apps", methods=["GET"])
    async def apps_page(self, request):
        """The catalogue: the caller's apps (and those a role they may request opens),
        filtered by the query string (web/catalogue.py)."""
        ctx = self.ctx
        secret, web = await ctx.web_session(request)
        if web is None:
            here = request.uri.decode("latin-1")
            target = "" if here == "/" else "?next=" + quote(here, safe="")
            return redirect(request, 302, "/web/login" + target)
        if web.enroll_only:
            return redirect(request, 302, "/web/account")
        caller = caller_from_session(web)
        filters = Filters.from_args(request.args)
        cards = [card for card in await self.cards(caller)
                 if filters.keeps(card["name"], card["description"], dict(card["labels"]))]
        for card in cards:
            card["chips"] = [(k, v, filters.toggle(k, v), (k, v) in filters.labels)
                             for k, v in card["labels"]]
        return ctx.page(request, 200, "apps.html", {
            "user": web.user,
            "roles": list(web.roles),
            "apps": cards,
            "filters": filters,
            "active_labels": [(k, v, filters.toggle(k, v)) for k, v in filters.labels],
            "clear_url": "/web/apps",
            "ca_pin": ctx.ca.pin,
            "nav": "apps",
        })

    async def cards(self, caller) -> list[dict]:
        """The catalogue's entries: allowed apps, then those the caller may request."""
        ctx = self.ctx
        allowed = await ctx.allowed_apps(caller)
        names = {app.name for app in allowed}
        others = [app for app in sorted(ctx.registry.apps(include_offline=True),
                                        key=lambda a: a.name) if app.name not in names]
        requestable = await self.requestable(caller, others)
        proxy_addr = f"{ctx.config.public_host}:{ctx.config.public_port}"
        out = []
        for app, may_open in [*((a, True) for a in allowed), *((a, False) for a in requestable)]:
            kind = app_type(app.uri)
            out.append({
                "name": app.name,
                "description": app.description,
                "labels": sorted(app.labels.items()),
                "type": kind,
                "public_addr": ctx.app_addr(app),
                "launch_url": f"https://{ctx.app_addr(app)}/",
                "online": ctx.registry.is_online(app.name),
                "allowed": may_open,
                "requestable": not may_open,
                "request_url": request_url(app.name),
                "connect": connect_commands(proxy_addr, caller.user, app.name, ctx.ca.pin)
                if kind == "tcp" else [],
            })
        return sorted(out, key=lambda card: card["name"])

    async def requestable(self, caller, apps) -> list:
        """Those of ``apps`` a role the caller may request would open (the Request button)."""
        held = await self.ctx.roles.role_set(caller.roles)
        names = held.requestable()
        if not names or not apps:
            return []
        candidates = (await self.ctx.roles.role_set(names)).roles
        return [app for app in apps if roles_for_app(candidates, app.labels, caller.traits)]

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
        if caller.is_bot:   # a bot asks nobody for access: only what it may open
            apps = await ctx.allowed_apps(caller)
            cards = [{"name": a.name, "type": app_type(a.uri), "description": a.description,
                      "labels": dict(a.labels), "public_addr": ctx.app_addr(a),
                      "online": ctx.registry.is_online(a.name), "requestable": False}
                     for a in apps]
        else:
            cards = [{"name": c["name"], "type": c["type"], "description": c["description"],
                      "labels": dict(c["labels"]), "public_addr": c["public_addr"],
                      "online": c["online"], "requestable": c["requestable"]}
                     for c in await self.cards(caller)]
        if arg(request, "all") is None:
            # The CLI's `apps ls` lists what it may open; ?all=1 adds the requestable ones.
            cards = [c for c in cards if not c["requestable"]]
        return json_response(request, 200, {"apps": cards})

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
