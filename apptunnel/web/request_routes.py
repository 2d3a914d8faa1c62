"""Access requests over HTTP: these routes authenticate the caller and parse bodies;
web/access_requests.py answers.

    GET/POST /v1/access-requests, GET /v1/access-requests/ID
    POST /v1/access-requests/ID/review, POST /v1/access-requests/ID/certs
    POST /v1/sessions/assume
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from klein import Klein

from apptunnel.auth.callers import Caller
from apptunnel.web.context import Routes
from apptunnel.web.fields import public_key_field, ttl_field
from apptunnel.web.http import WebError, client, json_body, json_response

if TYPE_CHECKING:
    from apptunnel.web.access_requests import AccessRequestApi
    from apptunnel.web.context import WebContext


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

    async def _caller(self, request) -> Caller:
        """The caller of an access-request route, as they may act now (401 without one)."""
        if self._requests is None:
            raise WebError(404)
        return await self.ctx.signed_in(request, "access request")
