"""What the proxy host serves to anyone: static assets, the JWT keys, the health check.

    GET /static/NAME, GET /favicon.ico, GET /.well-known/jwks.json, GET /healthz, GET /readyz

/healthz and /readyz answer as on the diagnostics listener (apptunnel/diag.py), same JSON,
so a balancer can check either port.

Static files are revalidated, not re-fetched: each carries an ETag (a hash of its bytes)
with ``Cache-Control: no-cache``, and a matching ``If-None-Match`` is a 304 without a body,
so an upgraded proxy never serves a stale stylesheet or script.
"""

from __future__ import annotations

import hashlib
import mimetypes
from importlib.resources import files
from typing import TYPE_CHECKING

from klein import Klein
from twisted.web.static import Data

from apptunnel.diag import HEALTHY_BODY, readiness_response
from apptunnel.web.context import Routes
from apptunnel.web.http import WebError, json_response

if TYPE_CHECKING:
    from apptunnel.auth.jwt import JwtKeys
    from apptunnel.diag import Readiness
    from apptunnel.web.context import WebContext


def load_static() -> dict[str, tuple[Data, bytes]]:
    """The package's static files and their ETags, read once: serving them never touches
    the disk."""
    assets = {}
    for entry in (files("apptunnel.web") / "static").iterdir():
        if not entry.is_file():
            continue
        content_type = mimetypes.guess_type(entry.name)[0] or "application/octet-stream"
        if content_type.startswith("text/"):
            content_type += "; charset=utf-8"
        content = entry.read_bytes()
        etag = b'"' + hashlib.sha256(content).hexdigest()[:32].encode("ascii") + b'"'
        assets[entry.name] = (Data(content, content_type), etag)
    return assets


class SiteRoutes(Routes):
    app = Klein()
    app.handle_errors(Routes.on_error)

    def __init__(self, ctx: WebContext, jwt_keys: JwtKeys,
                 readiness: Readiness | None = None) -> None:
        super().__init__(ctx)
        self._jwt_keys = jwt_keys
        self._readiness = readiness
        self._static = load_static()

    @app.route("/static/<string:name>", methods=["GET"])
    def static(self, request, name: str):
        found = self._static.get(name)
        if found is None:
            raise WebError(404)
        asset, etag = found
        request.setHeader(b"Cache-Control", b"public, no-cache")
        request.setHeader(b"ETag", etag)
        if etag in (request.getHeader(b"if-none-match") or b"").replace(b" ", b"").split(b","):
            request.setResponseCode(304)
            return b""
        return asset

    @app.route("/favicon.ico", methods=["GET"])
    def favicon(self, request):
        """Browsers ask for it whatever the page says; an answer keeps 404s out of logs."""
        return self.static(request, "favicon.svg")

    @app.route("/.well-known/jwks.json", methods=["GET"])
    def jwks(self, request):
        request.setHeader(b"Cache-Control", b"public, max-age=300")
        return json_response(request, 200, self._jwt_keys.jwks())

    @app.route("/healthz", methods=["GET"])
    def healthz(self, request):
        """Alive: the process answers (nothing else is checked; see /readyz)."""
        request.setHeader(b"Cache-Control", b"no-store")
        return json_response(request, 200, HEALTHY_BODY)

    @app.route("/readyz", methods=["GET"])
    async def readyz(self, request):
        """Ready for users: the backend answers, the listeners are up, the audit writes."""
        if self._readiness is None:
            raise WebError(404)
        ready, body = await self._readiness.check()
        return readiness_response(request, ready, body)
