"""What the proxy host serves to anyone: static assets, the JWT keys, the health check.

    GET /static/NAME, GET /.well-known/jwks.json, GET /healthz
"""

from __future__ import annotations

import mimetypes
from importlib.resources import files
from typing import TYPE_CHECKING

from klein import Klein
from twisted.web.static import Data

from apptunnel.web.context import Routes
from apptunnel.web.http import WebError, json_response

if TYPE_CHECKING:
    from apptunnel.auth.jwt import JwtKeys
    from apptunnel.web.context import WebContext


def load_static() -> dict[str, Data]:
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


class SiteRoutes(Routes):
    app = Klein()
    app.handle_errors(Routes.on_error)

    def __init__(self, ctx: WebContext, jwt_keys: JwtKeys) -> None:
        super().__init__(ctx)
        self._jwt_keys = jwt_keys
        self._static = load_static()

    @app.route("/static/<string:name>", methods=["GET"])
    def static(self, request, name: str):
        asset = self._static.get(name)
        if asset is None:
            raise WebError(404)
        request.setHeader(b"Cache-Control", b"public, max-age=300")
        return asset

    @app.route("/.well-known/jwks.json", methods=["GET"])
    def jwks(self, request):
        request.setHeader(b"Cache-Control", b"public, max-age=300")
        return json_response(request, 200, self._jwt_keys.jwks())

    @app.route("/healthz", methods=["GET"])
    def healthz(self, request):
        return json_response(request, 200, {"status": "ok"})
