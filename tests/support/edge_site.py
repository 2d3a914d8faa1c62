"""The web side of an EdgeFactory for edge tests: `Hello` answers every GET with
`web:<Host>`, so a test sees that a request reached the web UI and not an app. Shared by
the unit tests on memory transports and the integration test behind real TLS."""

from __future__ import annotations

from twisted.web import resource


class Hello(resource.Resource):
    isLeaf = True

    def render_GET(self, request):
        return b"web:" + request.getHeader(b"host")
