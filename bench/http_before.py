"""The HTTP head code of the proxy's request path as it was before issue 14's HTTP levers.

Kept verbatim (only renamed where it called itself) for two uses: ``bench.micro`` pairs
(old way against new) and the hypothesis properties in ``tests/unit/test_http_fast_path.py``
that hold the restructured code to the same results, errors included. Not used by apptunnel.
"""

from __future__ import annotations

import re

from apptunnel.proxy.app_heads import _app_host_header, _identity_names
from apptunnel.proxy.headers import _HOP_BY_HOP, squash
from apptunnel.proxy.http1 import (
    _DIGITS,
    _REQUEST_VERSIONS,
    _STATUS,
    _REASON_BAD,
    _TARGET,
    MAX_HEADERS,
    Headers,
    HttpError,
    RequestHead,
    ResponseHead,
    _Framer,
    _parse_version,
)
from apptunnel.auth.sessions import PROXY_COOKIE_PREFIX

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_PROTECTED = frozenset([b"host", b"content-length", b"transfer-encoding"])


def tokens(headers: Headers, name: bytes) -> list[bytes]:
    """``Headers.tokens`` before it was remembered per head."""
    found = []
    for value in headers.get_all(name):
        for part in value.split(b","):
            part = part.strip(b" \t").lower()
            if part:
                found.append(part)
    return found


def keep_alive(version: bytes, headers: Headers) -> bool:
    conn = tokens(headers, b"connection")
    if b"close" in conn:
        return False
    if version == b"HTTP/1.0":
        return b"keep-alive" in conn
    return True


def _parse_fields(lines: list[bytes], status: int) -> Headers:
    if len(lines) > MAX_HEADERS:
        raise HttpError(431 if status == 400 else status, "too many header fields")
    items = []
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            raise HttpError(status, "obsolete line folding in header")
        name, sep, value = line.partition(b":")
        if not sep or _TOKEN.fullmatch(name) is None:
            raise HttpError(status, "invalid header field name")
        value = value.strip(b" \t")
        if _BAD_VALUE.search(value) is not None:
            raise HttpError(status, "invalid character in header field value")
        items.append((name, value))
    return Headers(items)


def _split_head(head: bytes, status: int) -> tuple[bytes, list[bytes]]:
    lines = head.split(b"\r\n")
    if head.count(b"\r") != len(lines) - 1 or head.count(b"\n") != len(lines) - 1:
        raise HttpError(status, "bare CR or LF in message head")
    return lines[0], lines[1:]


def parse_request_head(head: bytes) -> RequestHead:
    first, lines = _split_head(head, 400)
    parts = first.split(b" ")
    if len(parts) != 3:
        raise HttpError(400, "malformed request line")
    method, target, version = parts
    if _TOKEN.fullmatch(method) is None:
        raise HttpError(400, "invalid request method")
    if _TARGET.fullmatch(target) is None:
        raise HttpError(400, "invalid request target")
    version = _parse_version(version, 400)
    if version not in _REQUEST_VERSIONS:
        raise HttpError(505, "unsupported HTTP version")
    headers = _parse_fields(lines, 400)
    hosts = headers.get_all(b"host")
    if len(hosts) > 1 or (version == b"HTTP/1.1" and not hosts):
        raise HttpError(400, "a request needs exactly one Host header")
    return RequestHead(method, target, version, headers)


def parse_response_head(head: bytes) -> ResponseHead:
    first, lines = _split_head(head, 502)
    version, sep, rest = first.partition(b" ")
    status_raw, _, reason = rest.partition(b" ")
    if not sep or _STATUS.fullmatch(status_raw) is None:
        raise HttpError(502, "malformed status line")
    if _REASON_BAD.search(reason) is not None:
        raise HttpError(502, "invalid status reason")
    version = _parse_version(version, 502)
    status = int(status_raw)
    if status < 100:
        raise HttpError(502, "invalid status code")
    return ResponseHead(version, status, reason, _parse_fields(lines, 502))


def _content_length(headers: Headers, status: int) -> int | None:
    values = headers.get_all(b"content-length")
    if not values:
        return None
    found = set()
    for value in values:
        for part in value.split(b","):
            part = part.strip(b" \t")
            if _DIGITS.fullmatch(part) is None:
                raise HttpError(status, "invalid Content-Length")
            found.add(int(part))
    if len(found) != 1:
        raise HttpError(status, "conflicting Content-Length values")
    return found.pop()


def _is_chunked(headers: Headers, status: int, request: bool) -> bool | None:
    if not headers.get_all(b"transfer-encoding"):
        return None
    codings = tokens(headers, b"transfer-encoding")
    if not codings:
        raise HttpError(status, "empty Transfer-Encoding")
    if codings.count(b"chunked") > 1 or (b"chunked" in codings and codings[-1] != b"chunked"):
        raise HttpError(status, "chunked must be the final transfer coding, once")
    if codings[-1] != b"chunked":
        if request:
            raise HttpError(400, "request body length cannot be determined")
        return False
    return True


def request_framing(req: RequestHead) -> _Framer:
    """``RequestReader._framing`` before."""
    chunked = _is_chunked(req.headers, 400, request=True)
    length = _content_length(req.headers, 400)
    lengths = req.headers.get_all(b"content-length")
    if length is not None and (len(lengths) != 1 or _DIGITS.fullmatch(lengths[0]) is None):
        raise HttpError(400, "Content-Length must be one plain number")
    if chunked is not None:
        if req.version == b"HTTP/1.0":
            raise HttpError(400, "Transfer-Encoding in an HTTP/1.0 request")
        if length is not None:
            raise HttpError(400, "both Transfer-Encoding and Content-Length")
        codings = req.headers.get_all(b"transfer-encoding")
        if len(codings) != 1 or codings[0].lower() != b"chunked":
            raise HttpError(400, "Transfer-Encoding other than chunked")
        return _Framer("chunked", status=400, strict=True)
    if length:
        return _Framer("length", length, status=400)
    return _Framer("none")


def response_framing(method: bytes, resp: ResponseHead) -> tuple[str, int, bool]:
    """``ResponseReader._settle`` before, for a final non-upgrade response: (kind, length,
    must_close)."""
    must_close = not keep_alive(resp.version, resp.headers)
    if method == b"HEAD" or resp.status in (204, 304):
        return "none", 0, must_close
    chunked = _is_chunked(resp.headers, 502, request=False)
    length = _content_length(resp.headers, 502)
    if chunked is not None and length is not None:
        raise HttpError(502, "both Transfer-Encoding and Content-Length")
    if chunked:
        return "chunked", 0, must_close
    if chunked is False or length is None:
        return "close", 0, True
    return "length", length, must_close


def head_bytes(head: RequestHead) -> bytes:
    """``RequestHead.to_bytes`` before: the fields formatted and joined, then joined again."""
    fields = b"".join([b"%s: %s\r\n" % (n, v) for n, v in head.headers])
    return b"".join([head.method, b" ", head.target, b" ", head.version, b"\r\n", fields, b"\r\n"])


def client_header_dropped(lname: bytes, identity: frozenset[bytes], named: frozenset[bytes]) -> bool:
    """``headers.client_header_dropped`` before its answers were remembered."""
    return (
        lname in _HOP_BY_HOP
        or lname in named
        or lname.startswith(b"proxy-")
        or b"_" in lname
        or lname == b"forwarded"
        or lname.startswith(b"x-forwarded-")
        or lname == b"x-real-ip"
        or squash(lname) in identity
    )


def client_headers(headers: Headers, identity: frozenset[bytes]) -> Headers:
    named = frozenset(t for t in tokens(headers, b"connection") if t not in _PROTECTED)
    return Headers([(n, v) for n, v in headers if not client_header_dropped(n.lower(), identity, named)])


def strip_proxy_cookies(headers: Headers) -> None:
    prefix = PROXY_COOKIE_PREFIX.encode("ascii")
    kept = []
    for name, value in headers:
        if name.lower() == b"cookie":
            parts = [p.strip() for p in value.split(b";")]
            parts = [p for p in parts if p and not p.startswith(prefix)]
            if not parts:
                continue
            value = b"; ".join(parts)
        kept.append((name, value))
    headers.replace_all(kept)


def forwarded_client_headers(head: RequestHead, app, jwt_header: str, added=()) -> Headers:
    """The first steps of ``app_request_head`` before: client_headers, our cookies
    stripped, Host set, ours added one by one (what ``app_heads.forwarded_client_headers``
    does in one pass)."""
    out = client_headers(head.headers, _identity_names(jwt_header, app.rewrite_headers))
    strip_proxy_cookies(out)
    out.set(b"Host", _app_host_header(app.uri))
    for name, value in added:
        out.add(name, value)
    return out
