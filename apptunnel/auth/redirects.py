"""Return targets after login: only same-origin absolute paths survive.

A ``next``/``path`` parameter is attacker-controlled. Browsers treat ``//host``, ``/\\host``
and paths with tabs or newlines stripped as links to another origin, and some apps decode
percent-escapes again before redirecting, so ``/%2F%2Fevil`` can become ``//evil`` one hop
later. Anything that could leave the origin, now or after more decoding, becomes ``/``.
"""

from __future__ import annotations

import unicodedata
from urllib.parse import quote, unquote, urlsplit

MAX_PATH_LENGTH = 2048
_MAX_DECODE_ROUNDS = 4


def _is_control(c: str) -> bool:
    return unicodedata.category(c)[0] == "C"


def _leaves_origin(path: str) -> bool:
    """True if a browser (or a decoding app) could read this as another origin."""
    if not path.startswith("/") or path.startswith("//") or path.startswith("/\\"):
        return True
    if any(_is_control(c) for c in path):
        return True
    parts = urlsplit(path)
    return bool(parts.scheme or parts.netloc)


def safe_path(target: str | None) -> str:
    """``target`` if it is a harmless same-origin path (at every decoding depth), else "/".

    Non-ASCII characters come back percent-encoded so the result fits in a header.
    """
    if not target or not isinstance(target, str) or len(target) > MAX_PATH_LENGTH:
        return "/"
    # Raw whitespace, separators and backslashes have no business in a URL path; browsers
    # strip or rewrite them, which is how "/\t/evil" turns into "//evil".
    if any(c == "\\" or c.isspace() or unicodedata.category(c)[0] in "CZ" for c in target):
        return "/"
    path = "".join(c if c.isascii() else quote(c) for c in target)
    if _leaves_origin(path):
        return "/"
    decoded = path
    for _ in range(_MAX_DECODE_ROUNDS):
        once_more = unquote(decoded)
        if once_more == decoded:
            return path
        if _leaves_origin(once_more):
            return "/"
        decoded = once_more
    return "/"   # still decoding after several rounds: deliberately nested, refuse
