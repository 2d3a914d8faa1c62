"""Whole responses the edge answers by itself: uniform error pages and redirects.

Pages say what happened in one sentence and what to do about it, and never carry
internal detail (socket errors, agent names): that goes to the log. Every page forbids
caching, sniffing and framing. Given ``home`` (the proxy's own origin,
``https://PUBLIC_HOST[:PORT]``) a page looks like the proxy's UI: its stylesheet comes
from the proxy host's ``/static/`` (cached there, revalidated by ETag; the CSP names that
origin and nothing else, no script at all), and it links back to the catalogue. Given
``request_id`` it shows "Request ID: ..." with a link to that event in the audit viewer:
the same id the request's ``app.request`` audit event carries.
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

# What the user can do about each error (shown under the sentence above).
_HINTS = {
    400: "Go back and try again; if you followed a link, open the app from your apps.",
    401: "Open the app from your apps to sign in again.",
    403: "If you need this app, ask for access on the Requests page.",
    404: "Check the address, or open the app from your list of apps.",
    408: "Try again.",
    421: "Open the app from your list of apps.",
    502: "The app may be down or restarting: try again in a minute. If it lasts, tell "
         "the app's owner and give them the request ID.",
    503: "The app is offline: its agent is not connected. Try again later, or tell the "
         "app's owner.",
    504: "Try again; if it lasts, tell the app's owner and give them the request ID.",
}

_SECURITY_HEADERS = [
    (b"Cache-Control", b"no-store"),
    (b"X-Content-Type-Options", b"nosniff"),
    (b"X-Frame-Options", b"DENY"),
    (b"Referrer-Policy", b"no-referrer"),
    (b"Strict-Transport-Security", b"max-age=31536000"),
]
_PLAIN_CSP = b"default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'"


def csp(home: str = "") -> bytes:
    """The page's CSP: no script anywhere; styles and the icon only from ``home``."""
    if not home:
        return _PLAIN_CSP
    origin = home.encode("ascii")
    return (b"default-src 'none'; style-src " + origin + b"; img-src " + origin
            + b"; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")


def reason(status: int) -> str:
    return _REASONS.get(status, "Error")


def page_html(status: int, message: str | None = None, *, request_id: str = "",
              home: str = "") -> bytes:
    """The HTML page for ``status``; ``message`` replaces the default sentence."""
    title = f"{status} {reason(status)}"
    text = message if message is not None else _MESSAGES.get(status, "The request failed.")
    if home:
        return _styled(status, title, text, request_id, home)
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title>"
        "<style>body{font:16px system-ui,sans-serif;margin:4em auto;max-width:36em;"
        "color:#222}h1{font-size:1.4em}</style></head>\n"
        f"<body><h1>{html.escape(title)}</h1><p>{html.escape(text)}</p>"
        "<p><small>apptunnel</small></p></body></html>\n"
    ).encode("utf-8")


def _styled(status: int, title: str, text: str, request_id: str, home: str) -> bytes:
    """The error page in the proxy UI's style (its CSS from ``home``, no inline anything)."""
    esc = html.escape
    hint = _HINTS.get(status, "")
    rid = ""
    if request_id:
        audit = f"{home}/web/audit?request_id={esc(request_id)}"
        rid = (f'<p class="hint">Request ID: <code id="request-id">{esc(request_id)}</code> '
               f'(<a href="{audit}">find it in the audit log</a>)</p>')
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{esc(title)} · apptunnel</title>"
        f"<link rel=\"icon\" href=\"{esc(home)}/static/favicon.svg\" type=\"image/svg+xml\">"
        f"<link rel=\"stylesheet\" href=\"{esc(home)}/static/app.css\"></head>\n"
        "<body><header class=\"topbar\"><a class=\"brand\" "
        f"href=\"{esc(home)}/web/apps\"><span class=\"logo\" aria-hidden=\"true\">&#9650;</span>"
        " apptunnel</a></header>"
        "<main class=\"content\" id=\"main\"><section class=\"card narrow error\">"
        f"<p class=\"status\">{status}</p><h1>{esc(reason(status))}</h1>"
        f"<p>{esc(text)}</p>" + (f"<p>{esc(hint)}</p>" if hint else "") + rid
        + f"<p><a class=\"button primary\" href=\"{esc(home)}/web/apps\">Back to your apps</a>"
        + (f" <a class=\"button\" href=\"{esc(home)}/web/requests\">Requests</a>"
           if status == 403 else "")
        + "</p></section></main></body></html>\n"
    ).encode("utf-8")


def response(
    status: int,
    body: bytes,
    headers: Iterable[tuple[bytes, bytes]] = (),
    *,
    close: bool = False,
    head_only: bool = False,
    home: str = "",
) -> bytes:
    """A complete HTTP/1.1 response; ``head_only`` answers a HEAD request."""
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, reason(status).encode("ascii"))]
    fields = [
        (b"Content-Type", b"text/html; charset=utf-8"),
        (b"Content-Length", b"%d" % len(body)),
        *_SECURITY_HEADERS,
        (b"Content-Security-Policy", csp(home)),
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
    request_id: str = "",
    home: str = "",
) -> bytes:
    return response(status, page_html(status, message, request_id=request_id, home=home),
                    headers, close=close, head_only=head_only, home=home)


def storage_unavailable(err, *, close: bool = True, head_only: bool = False,
                        request_id: str = "", home: str = "") -> bytes:
    """The 503 for a request that needed storage while the backend was unreachable
    (backend.StorageUnavailable): its sentence and a Retry-After, no internal detail."""
    return error_response(503, err.message, [(b"Retry-After", str(err.retry_after).encode())],
                          close=close, head_only=head_only, request_id=request_id, home=home)


def home_origin(public_host: str, public_port: int) -> str:
    """https://PUBLIC_HOST[:PORT]: where app-host pages take their style and links from."""
    return f"https://{public_host}" + ("" if public_port == 443 else f":{public_port}")


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
