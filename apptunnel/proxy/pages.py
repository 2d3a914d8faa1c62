"""Whole responses the edge answers by itself: uniform error pages and redirects.

Pages say what happened in one sentence and never carry internal detail (socket errors,
agent names): that goes to the log. Every page forbids caching, sniffing and framing.
"""

from __future__ import annotations

import html
from collections.abc import Iterable

_REASONS = {
    200: "OK",
    302: "Found",
    303: "See Other",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    421: "Misdirected Request",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}

_MESSAGES = {
    400: "The request could not be understood.",
    401: "Sign in to use this app.",
    403: "You are not allowed to use this app.",
    404: "No app is served at this address.",
    405: "This method is not allowed here.",
    408: "The request took too long to arrive.",
    421: "This server does not serve that address.",
    431: "The request headers are too large.",
    500: "Something went wrong in the proxy.",
    501: "This request is not supported.",
    502: "The app is not reachable.",
    503: "No agent is serving this app.",
    504: "The app did not answer in time.",
    505: "This HTTP version is not supported.",
}

_SECURITY_HEADERS = [
    (b"Cache-Control", b"no-store"),
    (b"X-Content-Type-Options", b"nosniff"),
    (b"X-Frame-Options", b"DENY"),
    (b"Content-Security-Policy", b"default-src 'none'; style-src 'unsafe-inline'"),
    (b"Referrer-Policy", b"no-referrer"),
]


def reason(status: int) -> str:
    return _REASONS.get(status, "Error")


def page_html(status: int, message: str | None = None) -> bytes:
    """The small HTML page for ``status``; ``message`` replaces the default sentence."""
    title = f"{status} {reason(status)}"
    text = message if message is not None else _MESSAGES.get(status, "The request failed.")
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title>"
        "<style>body{font:16px system-ui,sans-serif;margin:4em auto;max-width:36em;"
        "color:#222}h1{font-size:1.4em}</style></head>\n"
        f"<body><h1>{html.escape(title)}</h1><p>{html.escape(text)}</p>"
        "<p><small>apptunnel</small></p></body></html>\n"
    ).encode("utf-8")


def response(
    status: int,
    body: bytes,
    headers: Iterable[tuple[bytes, bytes]] = (),
    *,
    close: bool = False,
    head_only: bool = False,
) -> bytes:
    """A complete HTTP/1.1 response; ``head_only`` answers a HEAD request."""
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, reason(status).encode("ascii"))]
    fields = [
        (b"Content-Type", b"text/html; charset=utf-8"),
        (b"Content-Length", b"%d" % len(body)),
        *_SECURITY_HEADERS,
        *headers,
    ]
    if close:
        fields.append((b"Connection", b"close"))
    lines.extend(b"%s: %s\r\n" % field for field in fields)
    lines.append(b"\r\n")
    if not head_only:
        lines.append(body)
    return b"".join(lines)


def error_response(
    status: int,
    message: str | None = None,
    headers: Iterable[tuple[bytes, bytes]] = (),
    *,
    close: bool = False,
    head_only: bool = False,
) -> bytes:
    return response(status, page_html(status, message), headers, close=close, head_only=head_only)


def logout_response(app_name: str, action: str, *, close: bool = False, head_only: bool = False) -> bytes:
    """A page whose one button signs out of an app (POST to ``action``, same origin).

    A plain link could be followed by any page (an <img> to the logout path signs the user
    out); a form POST carries the Origin the logout checks.
    """
    title = "Sign out"
    body = (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{title}</title>"
        "<style>body{font:16px system-ui,sans-serif;margin:4em auto;max-width:36em;"
        "color:#222}h1{font-size:1.4em}</style></head>\n"
        f"<body><h1>{title}</h1><p>Sign out of {html.escape(app_name)}?</p>"
        f"<form method=\"post\" action=\"{html.escape(action)}\"><button type=\"submit\">Sign out</button></form>"
        "<p><small>apptunnel</small></p></body></html>\n"
    ).encode("utf-8")
    return response(200, body, close=close, head_only=head_only)


def redirect_response(
    location: str,
    headers: Iterable[tuple[bytes, bytes]] = (),
    *,
    close: bool = False,
    head_only: bool = False,
    status: int = 302,
) -> bytes:
    """A 302 (or ``status``) to ``location`` (already safe and URL-encoded by the caller)."""
    loc = location.encode("ascii")
    body = page_html(status, "Redirecting.")
    return response(status, body, [(b"Location", loc), *headers], close=close, head_only=head_only)
