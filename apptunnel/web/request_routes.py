"""Access requests over HTTP: these routes authenticate the caller and parse bodies;
web/access_requests.py answers.

    GET/POST /v1/access-requests, GET /v1/access-requests/ID
    POST /v1/access-requests/ID/review, POST /v1/access-requests/ID/certs
    POST /v1/sessions/assume
    GET /web/requests[?app=NAME&role=NAME]   the page: a new request (prefilled), mine,
                                             and the reviewer's queue
    POST /web/requests, /web/requests/ID/review, /web/requests/ID/assume   its forms

The page's forms call the same AccessRequestApi methods as the JSON routes, after the
same-origin check every form gets.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import quote

from klein import Klein

from apptunnel.auth.callers import Caller, caller_from_session
from apptunnel.auth.errors import AuthError
from apptunnel.web.context import Routes
from apptunnel.web.fields import public_key_field, ttl_field
from apptunnel.web.http import WebError, arg, client, json_body, json_response, redirect

if TYPE_CHECKING:
    from apptunnel.backend.records import WebSession
    from apptunnel.web.access_requests import AccessRequestApi
    from apptunnel.web.context import WebContext

# What the page offers for "for how long" (seconds); the server caps it anyway.
DURATIONS = (("1 hour", 3600), ("4 hours", 4 * 3600), ("8 hours", 8 * 3600),
             ("1 day", 24 * 3600))
REQUESTS_LOGIN = "/web/login?next=%2Fweb%2Frequests"


def remaining(seconds: float) -> str:
    """A short human duration ("2 h 5 min", "40 s"); "ended" at or below zero."""
    seconds = int(seconds)
    if seconds <= 0:
        return "ended"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    return f"{minutes} min" if minutes else f"{secs} s"


def request_rows(listed: list[dict], me: str, assumed: tuple[str, ...], now: float
                 ) -> tuple[list[dict], list[dict]]:
    """(my requests, the queue of others' pending ones I may review), newest first, each
    a request's JSON plus what the page shows: remaining time, whether to offer Assume."""
    mine, queue = [], []
    for item in reversed(listed):
        row = dict(item, remaining=remaining(item["expires"] - now),
                   assumed=item["id"] in assumed,
                   reviewed_by_me=any(r["author"] == me for r in item["reviews"]))
        row["can_assume"] = (item["user"] == me and item["state"] == "approved"
                             and not row["assumed"])
        if item["user"] == me:
            mine.append(row)
        elif item["state"] == "pending" and not row["reviewed_by_me"]:
            queue.append(row)
    return mine, queue


class RequestRoutes(Routes):
    app = Klein()
    app.handle_errors(Routes.on_error)

    def __init__(self, ctx: WebContext, requests: AccessRequestApi | None) -> None:
        super().__init__(ctx)
        self._requests = requests

    @app.route("/v1/access-requests", methods=["GET", "POST"])
    async def api_access_requests(self, request):
        caller = await self._caller(request)
        if request.method == b"POST":
            return json_response(request, 200,
                                 await self._requests.create(caller, json_body(request)))
        return json_response(request, 200, await self._requests.list(caller))

    @app.route("/v1/access-requests/<string:rid>", methods=["GET"])
    async def api_access_request(self, request, rid: str):
        caller = await self._caller(request)
        return json_response(request, 200, await self._requests.show(caller, rid))

    @app.route("/v1/access-requests/<string:rid>/review", methods=["POST"])
    async def api_access_request_review(self, request, rid: str):
        caller = await self._caller(request)
        return json_response(request, 200,
                             await self._requests.review(caller, rid, json_body(request)))

    @app.route("/v1/access-requests/<string:rid>/certs", methods=["POST"])
    async def api_access_request_cert(self, request, rid: str):
        caller = await self._caller(request)
        body = json_body(request)
        return json_response(request, 200, await self._requests.certificate(
            caller, rid, public_key_field(body.get("public_key")), ttl_field(body.get("ttl")),
            client(request)))

    @app.route("/v1/sessions/assume", methods=["POST"])
    async def api_assume(self, request):
        caller = await self._caller(request)
        secret, _ = await self.ctx.web_session(request)
        return json_response(request, 200, await self._requests.assume(
            caller, secret, json_body(request)))

    # -- the page ------------------------------------------------------------------------

    @app.route("/web/requests", methods=["GET"])
    async def requests_page(self, request):
        _, web = await self.ctx.web_session(request)
        if web is None:
            here = request.uri.decode("latin-1")
            return redirect(request, 302, "/web/login?next=" + quote(here, safe=""))
        return await self._page(request, 200, web, None, None)

    @app.route("/web/requests", methods=["POST"])
    async def create_form(self, request):
        roles = [v.decode("utf-8", "replace") for v in request.args.get(b"role", [])][:32]
        app = (arg(request, "app") or "").strip() or None
        ttl = arg(request, "ttl")
        body = {"roles": roles, "app": app, "reason": arg(request, "reason") or "",
                "ttl": int(ttl) if ttl and ttl.isdigit() and int(ttl) > 0 else None}
        return await self._form(request, lambda caller: self._requests.create(caller, body),
                                "Request sent: a reviewer will approve or deny it.")

    @app.route("/web/requests/<string:rid>/review", methods=["POST"])
    async def review_form(self, request, rid: str):
        verdict = arg(request, "verdict")
        if verdict not in ("approve", "deny"):
            raise WebError(400, "Choose approve or deny.")
        body = {"approve": verdict == "approve", "reason": arg(request, "reason") or ""}
        done = "Approved." if verdict == "approve" else "Denied."
        return await self._form(request, lambda caller: self._requests.review(caller, rid, body),
                                done)

    @app.route("/web/requests/<string:rid>/assume", methods=["POST"])
    async def assume_form(self, request, rid: str):
        async def assume(caller):
            secret, _ = await self.ctx.web_session(request)
            return await self._requests.assume(caller, secret, {"request_id": rid})
        return await self._form(request, assume,
                                "Assumed: the request's roles are yours until it ends.")

    async def _form(self, request, act, done: str) -> bytes:
        """Run a form's action as the signed-in user; the page again with the outcome."""
        self.ctx.require_same_origin(request)
        if self._requests is None:
            raise WebError(404)
        _, web = await self.ctx.web_session(request)
        if web is None:
            return redirect(request, 303, REQUESTS_LOGIN)
        try:
            caller = await self.ctx.acting(caller_from_session(web), "access request")
            await act(caller)
        except AuthError as err:
            return await self._page(request, err.status, web, err.message, None)
        _, web = await self.ctx.web_session(request)   # an assumption changed it
        return await self._page(request, 200, web, None, done)

    async def _page(self, request, status: int, web: WebSession, error: str | None,
                    notice: str | None) -> bytes:
        ctx = self.ctx
        if self._requests is None:
            raise WebError(404)
        if web.enroll_only:
            return redirect(request, 302, "/web/account")
        caller = await ctx.acting(caller_from_session(web), "access request")
        listed = (await self._requests.list(caller))["requests"]
        mine, queue = request_rows(listed, web.user, tuple(web.requests), ctx.clock.seconds())
        held = await ctx.roles.role_set(caller.roles)
        wanted_roles = [v.decode("utf-8", "replace") for v in request.args.get(b"role", [])]
        return ctx.page(request, status, "requests.html", {
            "user": web.user, "nav": "requests", "extra_nav": await ctx.extra_nav(web),
            "error": error, "notice": notice,
            "requestable": list(held.requestable()), "wanted_roles": wanted_roles,
            "app": (arg(request, "app") or "")[:128] if request.method == b"GET" else "",
            "durations": DURATIONS, "mine": mine, "queue": queue,
            "reviewer": bool(held.reviewable()),
        })

    async def _caller(self, request) -> Caller:
        """The caller of an access-request route, as they may act now (401 without one)."""
        if self._requests is None:
            raise WebError(404)
        return await self.ctx.signed_in(request, "access request")
