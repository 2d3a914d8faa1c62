"""Header rules of the app edge, as pure functions: what a client may send on, what an app
may send back, and which Host names a request may carry.

An app trusts the identity headers the proxy sets (the JWT header, the app's rewrite
headers). A client copy of any of them that survived, in any spelling an app framework
folds together (case, ``_`` for ``-``, and some drop ``.``), would be read as the proxy's
word. So every such name is removed from the client's head first, whether or not the
proxy then sets a value.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

from apptunnel.net import is_ip
from apptunnel.proxy.http1 import Headers

# Identity headers of the products apptunnel stands in for: apps built for them trust these.
PEER_IDENTITY_HEADERS = ("Teleport-Jwt-Assertion", "X-Pomerium-Jwt-Assertion", "Cf-Access-Jwt-Assertion")

_HOP_BY_HOP = frozenset(
    [b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"upgrade"]
)
# Never removed because a client listed them in Connection: framing and routing.
_PROTECTED = frozenset([b"host", b"content-length", b"transfer-encoding"])
# An app's fields about its own connection to the proxy (the client's is the proxy's to
# describe: ``app_response_head`` adds its Connection field). Trailer stays: trailers are
# relayed with the body.
_RESPONSE_HOP_BY_HOP = frozenset(
    [b"connection", b"keep-alive", b"proxy-connection", b"te", b"upgrade"]
)

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST = re.compile(
    rf"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<name>{_LABEL}(?:\.{_LABEL})*\.?))(?::(?P<port>[0-9]{{1,5}}))?"
)


def squash(name: bytes | str) -> bytes:
    """A header name as frameworks may fold it: lower case, without ``-``, ``_`` and ``.``."""
    if isinstance(name, str):
        name = name.encode("latin-1")
    return name.lower().replace(b"-", b"").replace(b"_", b"").replace(b".", b"")


def identity_names(jwt_header: str, rewrite_names: Iterable[str] = ()) -> frozenset[bytes]:
    """Squashed names a client must never send on: ours, the peers', the app's rewrites."""
    return frozenset(squash(n) for n in (jwt_header, *PEER_IDENTITY_HEADERS, *rewrite_names))


MAX_CACHED_NAME = 64      # longer client header names are judged afresh each time


def client_header_dropped(lname: bytes, identity: frozenset[bytes], named: frozenset[bytes]) -> bool:
    """Whether a client header (lower-cased ``lname``) stops at the proxy.

    ``named`` holds the tokens of the client's Connection header (hop-by-hop by request).
    The rest of the answer depends on the name and the app's identity names only, and a
    request repeats the same dozen names: it is remembered (bounded, short names only).
    """
    if lname in named:
        return True
    if len(lname) <= MAX_CACHED_NAME:
        return _dropped_by_name_cached(lname, identity)
    return _dropped_by_name(lname, identity)


@functools.lru_cache(maxsize=1024)
def _dropped_by_name_cached(lname: bytes, identity: frozenset[bytes]) -> bool:
    return _dropped_by_name(lname, identity)


def _dropped_by_name(lname: bytes, identity: frozenset[bytes]) -> bool:
    return (
        lname in _HOP_BY_HOP
        or lname.startswith(b"proxy-")
        or b"_" in lname
        or lname == b"forwarded"
        or lname.startswith(b"x-forwarded-")
        or lname == b"x-real-ip"
        or squash(lname) in identity
    )


def response_header_dropped(lname: bytes, named: frozenset[bytes]) -> bool:
    """Whether an app's response field (lower-cased ``lname``) stops at the proxy: the
    hop-by-hop fields of the app's connection, and those its Connection field names
    (``named``, from ``connection_named``). A client told ``keep-alive`` by the app while
    the proxy closes would send its next request into a closing connection."""
    return lname in _RESPONSE_HOP_BY_HOP or lname in named


def connection_named(headers: Headers) -> frozenset[bytes]:
    """The fields a Connection header makes hop-by-hop (framing and Host never)."""
    return frozenset(t for t in headers.tokens(b"connection") if t not in _PROTECTED)


def client_headers(headers: Headers, identity: frozenset[bytes]) -> Headers:
    """The client's headers an app may see (the proxy adds its own afterwards)."""
    named = connection_named(headers)
    return Headers([item for lname, item in headers.lowered_items()
                    if not client_header_dropped(lname, identity, named)])


MAX_CACHED_HOST = 300   # longer than any valid Host (a 254-byte name, brackets, a port)


def valid_host(raw: bytes | None) -> bool:
    """A Host value that is a DNS name or an IP literal with an optional numeric port.

    Anything else (``a.example:@evil.com``, userinfo, paths, empty) could be read as
    another authority by whoever uses it later, e.g. an app building URLs from it.
    Every request asks about one of a few Host values: the answer is remembered (a pure
    function of short bytes; the cache is bounded and longer values are checked afresh).
    """
    if not raw:
        return False
    if len(raw) <= MAX_CACHED_HOST:
        return _valid_host_cached(raw)
    return _valid_host(raw)


@functools.lru_cache(maxsize=256)
def _valid_host_cached(raw: bytes) -> bool:
    return _valid_host(raw)


def _valid_host(raw: bytes) -> bool:
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        return False
    m = _HOST.fullmatch(text)
    if m is None:
        return False
    if m.group("port") is not None and not 0 < int(m.group("port")) <= 65535:
        return False
    if m.group("v6") is not None:
        if not is_ip(m.group("v6"), version=6):
            return False
    return len(m.group("name") or "") <= 254


def cookie_has_domain(set_cookie: bytes) -> bool:
    """Whether a Set-Cookie value carries a ``Domain`` attribute.

    Apps share the proxy's parent domain: a cookie with any Domain reaches the proxy's host
    or sibling apps (or is one the browser rejects anyway). Host-only cookies are the
    safe form, so the proxy passes only those.
    """
    for attribute in set_cookie.split(b";")[1:]:
        name = attribute.partition(b"=")[0].strip(b" \t").lower()
        if name == b"domain":
            return True
    return False


LOOPBACK_ORIGIN = re.compile(r"http://(localhost|127\.0\.0\.1|\[::1\])(:[0-9]{1,5})?")


def local_port_cross_site(headers: Headers, app_origin: str) -> str | None:
    """Why a request through a local port (``apptunnel proxy app``) looks cross-site, or None.

    The local port adds the user's identity to whatever reaches it, so a page on any site
    could make the browser POST to it (text/plain needs no preflight). Browsers label such
    requests: ``Sec-Fetch-Site: cross-site``, and an ``Origin`` naming the page's site.
    Refused: ``cross-site``, and an Origin that is neither a loopback origin nor the app's
    own (``null`` included). Accepted: no such headers (curl, psql, scripts),
    ``same-origin``, ``none`` (typed or bookmarked), and ``same-site``, which on a
    loopback address can only mean a page served from this machine (another local port,
    such as a developer's front end); the Host check in front of this already refuses
    names a remote page could rebind to 127.0.0.1.
    """
    site = headers.get(b"sec-fetch-site")
    if site is not None and site.strip().lower() == b"cross-site":
        return "cross-site request (Sec-Fetch-Site)"
    origin = headers.get(b"origin")
    if origin is not None:
        text = origin.decode("latin-1").strip().lower()
        if LOOPBACK_ORIGIN.fullmatch(text) is None and text != app_origin.lower():
            return "cross-site request (Origin)"
    return None
