"""Where a browser request came from, for CSRF guards: pure functions over header values.

Browsers label every form POST and cross-origin fetch with ``Origin`` (older ones at least
with ``Referer``), and modern ones label every request with ``Sec-Fetch-Site``. A page on
another site can make the browser send a request with the user's cookies, but it cannot
make these headers lie. The proxy's own forms and the app hosts' logout ask the same
question here, so there is one answer to it.
"""

from __future__ import annotations

from urllib.parse import urlsplit


def origin_of(url: str) -> str | None:
    """``scheme://host[:port]`` of a URL, lower-cased; None when it has none."""
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        return None
    if not parts.scheme or not parts.netloc:
        return None
    return f"{parts.scheme}://{parts.netloc}".lower()


def same_origin(origin: str | None, referer: str | None, allowed: frozenset[str]) -> bool | None:
    """Whether ``Origin`` (or else ``Referer``) names one of ``allowed``; None when neither
    header was sent (not a browser's cross-site request, but no proof either)."""
    if origin is not None:
        return origin.strip().lower() in allowed
    if referer is not None:
        return origin_of(referer) in allowed
    return None


def own_origins(host: str, port: int) -> frozenset[str]:
    """The Origin values a browser sends for https pages of ``host`` (port 443 is implicit)."""
    host = host.lower()
    origins = {f"https://{host}:{port}"}
    if port == 443:
        origins.add(f"https://{host}")
    return frozenset(origins)
