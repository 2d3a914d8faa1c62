"""Request and response helpers every route module of the proxy host shares.

Pure functions over a Twisted request: form and query fields, bounded JSON bodies,
cookies, redirects, JSON answers, who the client is. No decisions live here; the route
modules (web/*_routes.py) and the shared context (web/context.py) use them so each one is
written once.
"""

from __future__ import annotations

import json
from typing import Any

from apptunnel.errors import ApptunnelError

SESSION_COOKIE = "__Host-apptunnel_session"
MFA_COOKIE = "__Host-apptunnel_mfa"      # the browser's pending second sign-in step
SSO_COOKIE = "__Host-apptunnel_sso"      # binds an OIDC flow to the browser that began it

MAX_COOKIE = 256
MAX_JSON_BODY = 16 * 1024

# Set on every response of the proxy host. Referrer-Policy is `same-origin`, not
# `no-referrer`: under `no-referrer` browsers send `Origin: null` on our own form POSTs
# (Fetch spec, "append a request Origin header"), which the CSRF check must refuse, so
# nobody could sign in. With `same-origin` no Referer ever leaves for another origin.
SECURITY_HEADERS = (
    (b"Content-Security-Policy",
     b"default-src 'self'; frame-ancestors 'none'; form-action 'self' https:; "
     b"base-uri 'none'; object-src 'none'"),
    (b"X-Frame-Options", b"DENY"),
    (b"X-Content-Type-Options", b"nosniff"),
    (b"Referrer-Policy", b"same-origin"),
    (b"Cache-Control", b"no-store"),
    (b"Strict-Transport-Security", b"max-age=31536000"),
)

HEADINGS = {
    400: ("Bad request", "The request was not valid."),
    401: ("Sign-in required", "Sign in to continue."),
    403: ("Access denied", "You are not allowed to do this."),
    404: ("Not found", "There is nothing at this address."),
    405: ("Method not allowed", "This address does not accept that method."),
    413: ("Request too large", "The request body is larger than this address accepts."),
    415: ("Unsupported media type", "This address accepts application/json only."),
    421: ("Wrong address", "This connection serves the proxy itself, not that address."),
    429: ("Too many attempts", "Too many attempts; wait a little and try again."),
    500: ("Something went wrong", "The proxy could not complete the request; it has been logged."),
    503: ("Busy", "The proxy is busy; try again in a moment."),
}

# Paths answered with JSON errors rather than the error page.
JSON_PREFIXES = (b"/v1/", b"/.well-known/", b"/healthz")


class WebError(ApptunnelError):
    """An HTTP error to show on the uniform page (or as JSON under the API paths)."""

    def __init__(self, status: int, message: str | None = None) -> None:
        self.status = status
        self.message = message or HEADINGS.get(status, ("", "The request failed."))[1]
        super().__init__(self.message)


def arg(request, name: str) -> str | None:
    """First value of a query or form field, or None; bad UTF-8 is a 400, not a traceback."""
    values = request.args.get(name.encode("ascii"))
    if not values:
        return None
    try:
        return values[0].decode("utf-8")
    except UnicodeDecodeError:
        raise WebError(400, f"The {name} field is not valid UTF-8.") from None


def json_body(request) -> dict:
    """The request's JSON object, bounded in size; 415/413/400 for anything else."""
    content_type = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
    if content_type != b"application/json":
        raise WebError(415, "Content-Type must be application/json")
    request.content.seek(0)
    raw = request.content.read(MAX_JSON_BODY + 1)
    if len(raw) > MAX_JSON_BODY:
        raise WebError(413, "request body too large")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise WebError(400, "malformed JSON") from None
    if not isinstance(body, dict):
        raise WebError(400, "the body must be a JSON object")
    return body


def json_response(request, status: int, body: Any) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    return json.dumps(body).encode("utf-8")


def no_content(request) -> bytes:
    request.setResponseCode(204)
    return b""


def redirect(request, status: int, location: str) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Location", location.encode("utf-8"))
    return b""


def script_json(value: Any) -> str:
    """JSON for a <script type="application/json"> block: its text is not entity-decoded,
    so it goes unescaped, with <, > and & as \\u escapes so it can never close the tag."""
    return (json.dumps(value).replace("<", "\\u003c").replace(">", "\\u003e")
            .replace("&", "\\u0026"))


def cookie(request, name: str) -> str | None:
    """A cookie's ASCII value, or None when absent, oversized or not ASCII."""
    raw = request.getCookie(name.encode("ascii"))
    if not raw or len(raw) > MAX_COOKIE:
        return None
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        return None


def set_cookie(request, name: str, value: str, max_age: float) -> None:
    """Host-only, Secure, HttpOnly, Lax: the only shape the `__Host-` prefix allows anyway."""
    request.responseHeaders.addRawHeader(
        b"Set-Cookie",
        f"{name}={value}; Path=/; Secure; HttpOnly; SameSite=Lax; "
        f"Max-Age={int(max_age)}".encode("ascii"),
    )


def set_session_cookie(request, secret: str, max_age: float) -> None:
    set_cookie(request, SESSION_COOKIE, secret, max_age)


def client_host(request) -> str:
    """The client's IP address alone: what sign-in throttling counts per address."""
    return str(getattr(request.getClientAddress(), "host", "") or "")


def client(request) -> str:
    """host:port of the client, as the audit records it."""
    addr = request.getClientAddress()
    host = getattr(addr, "host", None)
    port = getattr(addr, "port", None)
    return f"{host}:{port}" if host is not None else ""


def retry_after(request, err: Exception) -> None:
    """Retry-After for a throttled attempt (scripts and the CLI wait that long)."""
    seconds = getattr(err, "retry_after", None)
    if seconds is not None:
        request.setHeader(b"Retry-After", str(seconds).encode("ascii"))


def tls_transport(request):
    """The TLS transport a request came over (the edge hands it to the Site)."""
    return getattr(request.channel, "transport", None) or request.transport
