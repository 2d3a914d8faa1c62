"""Uniform pages and redirects the edge answers itself."""

from apptunnel.proxy.http1 import ResponseReader
from apptunnel.proxy.pages import error_response, page_html, redirect_response


def parse(raw, method=b"GET"):
    reader = ResponseReader()
    reader.start(method)
    events = reader.receive(raw)
    return events[0], b"".join(bytes(e.data) for e in events[1:-1])


def test_error_page_is_valid_http_with_security_headers():
    """An error page parses as one complete response with no-store and nosniff."""
    head, body = parse(error_response(502))
    assert head.status == 502 and b"The app is not reachable." in body
    assert head.headers.get(b"cache-control") == b"no-store"
    assert head.headers.get(b"x-content-type-options") == b"nosniff"
    assert int(head.headers.get(b"content-length")) == len(body)


def test_page_escapes_message():
    """Messages are HTML-escaped so nothing a client sent can inject markup."""
    assert b"<script>" not in page_html(400, "<script>alert(1)</script>")


def test_redirect_sets_location_and_extra_headers():
    """A redirect carries Location and any Set-Cookie given."""
    raw = redirect_response("/x?y=1", [(b"Set-Cookie", b"a=b")], close=True)
    head, _ = parse(raw)
    assert head.status == 302 and head.headers.get(b"location") == b"/x?y=1"
    assert head.headers.get(b"set-cookie") == b"a=b" and head.headers.get(b"connection") == b"close"


def test_head_only_response_has_no_body():
    """For HEAD the page keeps its Content-Length but sends no body."""
    raw = error_response(404, head_only=True)
    assert raw.endswith(b"\r\n\r\n")
    head, body = parse(raw, b"HEAD")
    assert head.status == 404 and body == b""


def test_app_host_error_page_is_styled_and_names_its_request():
    """With the proxy's origin an error page takes its CSS from there, allows no script,
    says what to do, links back to the catalogue and shows its (escaped) request id."""
    home = "https://apptunnel.localhost:3080"
    head, body = parse(error_response(503, request_id="ab<12", home=home))
    policy = head.headers.get(b"content-security-policy")
    assert policy == (b"default-src 'none'; style-src https://apptunnel.localhost:3080; "
                      b"img-src https://apptunnel.localhost:3080; frame-ancestors 'none'; "
                      b"base-uri 'none'; form-action 'self'")
    assert head.headers.get(b"strict-transport-security") == b"max-age=31536000"
    page = body.decode()
    assert f'<link rel="stylesheet" href="{home}/static/app.css">' in page
    assert "<script" not in page and "<style" not in page and "style=" not in page
    assert "Try again later" in page and f'href="{home}/web/apps"' in page
    assert "ab&lt;12" in page and "ab<12" not in page
    assert f"{home}/web/audit?request_id=ab&lt;12" in page
    _, denied = parse(error_response(403, home=home))
    assert b"/web/requests" in denied and b"Request ID" not in denied
