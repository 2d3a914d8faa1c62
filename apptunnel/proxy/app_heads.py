"""The heads the app and the client see: pure functions, no I/O, no state.

``app_request_head`` turns a client's request head into the one the app receives (the
client-header rules of ``proxy/headers.py``, our cookies stripped, Host/X-Forwarded-*,
the signed identity token and the app's rewrite headers added); ``app_response_head``
turns the app's response head into the one the client receives (app-origin redirects
made public, our cookies and Domain cookies dropped).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit

from apptunnel.auth.sessions import PROXY_COOKIE_PREFIX
from apptunnel.config import UNREWRITABLE_HEADERS
from apptunnel.proxy.headers import (
    client_header_dropped,
    connection_named,
    cookie_has_domain,
    identity_names,
    response_header_dropped,
)
from apptunnel.proxy.http1 import Headers, RequestHead, ResponseHead
from apptunnel.catalog import AppInfo

_TEMPLATE = re.compile(r"\{\{\s*(internal|external)\.([A-Za-z0-9_.\-]+)\s*\}\}")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


_PREFIX = PROXY_COOKIE_PREFIX.encode("ascii")


def _without_proxy_cookies(value: bytes) -> bytes | None:
    """A Cookie value without our cookies; None when nothing else was in it."""
    parts = [p.strip() for p in value.split(b";")]
    parts = [p for p in parts if p and not p.startswith(_PREFIX)]
    return b"; ".join(parts) if parts else None


def strip_proxy_cookies(headers: Headers) -> None:
    """Remove every cookie of ours from Cookie headers (an app must never see them)."""
    kept = []
    for lname, (name, value) in headers.lowered_items():
        if lname == b"cookie":
            value = _without_proxy_cookies(value)
            if value is None:
                continue
        kept.append((name, value))
    headers.replace_all(kept)


def forwarded_client_headers(headers: Headers, identity: frozenset[bytes], host: bytes,
                             added: Sequence[tuple[bytes, bytes]] = ()) -> Headers:
    """The client's headers the app sees, our cookies stripped, ``Host`` set, then ``added``.

    ``client_headers``, then ``strip_proxy_cookies``, then ``set(b"Host", host)``, then an
    ``add`` of each of ``added``, in one pass over the fields (the same result;
    ``test_http_fast_path.py`` holds them to it).
    """
    named = connection_named(headers)
    items = []
    names = []
    for lname, item in headers.lowered_items():
        if lname == b"host" or client_header_dropped(lname, identity, named):
            continue
        if lname == b"cookie":
            value = _without_proxy_cookies(item[1])
            if value is None:
                continue
            item = (item[0], value)
        items.append(item)
        names.append(lname)
    items.append((b"Host", host))
    names.append(b"host")
    for item in added:
        items.append(item)
        names.append(item[0].lower())
    return Headers(items, lowered=names)



@functools.lru_cache(maxsize=1024)
def _internal_origins(uri: str) -> tuple[str, ...]:
    """The spellings of the app's own origin that a Location header may use."""
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    default = {"http": 80, "https": 443}.get(scheme)
    port = parts.port or default
    origins = {f"{scheme}://{host}:{port}"}
    if port == default:
        origins.add(f"{scheme}://{host}")
    return tuple(sorted(origins, key=len, reverse=True))


@functools.lru_cache(maxsize=1024)
def _identity_names(jwt_header: str, rewrite_headers: tuple[tuple[str, str], ...]) -> frozenset[bytes]:
    return identity_names(jwt_header, (name for name, _ in rewrite_headers))


@functools.lru_cache(maxsize=1024)
def _app_host_header(uri: str) -> bytes:
    parts = urlsplit(uri)
    return parts.netloc.rpartition("@")[2].encode("ascii", "ignore")


def _expand(template: str, traits: dict) -> str | None:
    """Fill ``{{internal.x}}``/``{{external.x}}`` from traits; None if one is missing."""
    missing = False

    def fill(m: re.Match) -> str:
        nonlocal missing
        values = traits.get(m.group(2)) or ()
        if isinstance(values, str):
            values = (values,)
        if not values:
            missing = True
            return ""
        return ",".join(str(v) for v in values)

    value = _TEMPLATE.sub(fill, template)
    return None if missing else value


def app_request_head(head: RequestHead, app: AppInfo, caller, client_ip: str, upgrade: bool,
                     jwt_header: str, token: str) -> RequestHead:
    """The head the app sees: no hop-by-hop or spoofable headers, ours added.

    ``caller`` is who acts (user, roles and traits held now); ``token`` the identity token
    signed for them, sent in ``jwt_header``.
    """
    identity = _identity_names(jwt_header, app.rewrite_headers)
    added = [(b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")] if upgrade else []
    added += [
        (b"X-Forwarded-For", client_ip.encode("ascii", "replace")),
        (b"X-Forwarded-Proto", b"https"),
        # The app's public address, never the client's Host: the app builds URLs from it.
        (b"X-Forwarded-Host", app.public_addr.encode("ascii", "replace")),
        (jwt_header.encode("ascii"), token.encode("ascii")),
    ]
    out = forwarded_client_headers(head.headers, identity, _app_host_header(app.uri), added)
    for name, template in app.rewrite_headers:
        value = _expand(template, caller.traits)
        if (value is None or _TOKEN.fullmatch(name) is None or _BAD_VALUE.search(value)
                or name.lower() in UNREWRITABLE_HEADERS):
            continue  # a missing trait or a value no header may carry: the header is left out
        out.set(name.encode("ascii"), value.encode("utf-8"))
    return RequestHead(head.method, head.target, head.version, out)


def app_response_head(head: ResponseHead, app: AppInfo, fixed: bool,
                      dropped: Callable[[str, bytes], None],
                      connection: bytes | None = None) -> ResponseHead:
    """The head the client sees: app-origin redirects made public, our cookies kept ours,
    the app's hop-by-hop fields gone and ``connection`` (when given) as its Connection field.

    On a fixed-app connection the client reached us through a local port whose address
    we do not know, so app-origin redirects become origin-relative instead. A Set-Cookie
    with a Domain is dropped and ``dropped(app name, cookie name)`` told (for one log line).
    A 101 keeps the app's Upgrade field: it names the protocol switched to.
    """
    public = "" if fixed else f"https://{app.public_addr}"
    origins = _internal_origins(app.uri)
    named = connection_named(head.headers)
    switching = head.status == 101
    out = []
    for lname, (name, value) in head.headers.lowered_items():
        if response_header_dropped(lname, named) and not (switching and lname == b"upgrade"):
            continue
        if lname == b"set-cookie" and value.lstrip().startswith(_PREFIX):
            continue
        if lname == b"set-cookie" and cookie_has_domain(value):
            dropped(app.name, value.partition(b"=")[0].strip()[:100])
            continue
        if lname == b"location":
            text = value.decode("latin-1")
            low = text.lower()
            for origin in origins:
                if low.startswith(origin) and (len(text) == len(origin) or text[len(origin)] in "/?#"):
                    value = (public + text[len(origin):] or "/").encode("latin-1")
                    break
        out.append((name, value))
    if connection is not None:
        out.append((b"Connection", connection))
    return ResponseHead(head.version, head.status, head.reason, Headers(out))
