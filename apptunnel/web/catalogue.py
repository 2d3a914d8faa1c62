"""The catalogue's pure parts: filters read from the query string (so a filtered view is
a shareable URL), which cards they keep, the links of the label chips, and what the
Connect dialog of a TCP app tells the user to run.

    /web/apps?q=wik&label=tier=docs&label=env=prod

``q`` matches the name, the description or a label (``key=value``) case-insensitively;
every ``label`` must be on the app. Garbage is bounded and dropped, never an error: a
filter can only narrow what the caller may already see.
"""

from __future__ import annotations

import shlex
import zlib
from collections.abc import Iterable, Mapping
from urllib.parse import urlencode

import attrs

MAX_QUERY = 100
MAX_LABEL_FILTERS = 10
MAX_LABEL = 200


@attrs.frozen
class Filters:
    """A catalogue view: free text and ``key=value`` labels, all of which must match."""

    q: str = ""
    labels: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_args(cls, args: Mapping[bytes, list[bytes]]) -> Filters:
        """From request.args; oversized, undecodable or malformed values are dropped."""
        q = _text(args.get(b"q", [b""])[0])[:MAX_QUERY].strip()
        labels = []
        for raw in args.get(b"label", [])[:MAX_LABEL_FILTERS]:
            text = _text(raw)
            key, sep, value = text.partition("=")
            if sep and key and len(text) <= MAX_LABEL and (key, value) not in labels:
                labels.append((key, value))
        return cls(q, tuple(labels))

    def keeps(self, name: str, description: str, labels: Mapping[str, str]) -> bool:
        for key, value in self.labels:
            if labels.get(key) != value:
                return False
        if not self.q:
            return True
        needle = self.q.casefold()
        haystack = [name, description, *(f"{k}={v}" for k, v in labels.items())]
        return any(needle in text.casefold() for text in haystack)

    def query(self, q: str | None = None, labels: Iterable[tuple[str, str]] | None = None
              ) -> str:
        """The query string of this view with ``q`` or ``labels`` replaced ('' if empty)."""
        q = self.q if q is None else q
        labels = self.labels if labels is None else tuple(labels)
        pairs = ([("q", q)] if q else []) + [("label", f"{k}={v}") for k, v in labels]
        return ("?" + urlencode(pairs)) if pairs else ""

    def toggle(self, key: str, value: str) -> str:
        """The URL of this view with label ``key=value`` added, or removed if present."""
        label = (key, value)
        if label in self.labels:
            return "/web/apps" + self.query(labels=[x for x in self.labels if x != label])
        return "/web/apps" + self.query(labels=[*self.labels, label])


def _text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return ""


def connect_commands(proxy_addr: str, user: str, app: str, ca_pin: str) -> list[str]:
    """What a TCP app's Connect dialog shows: log in, then a local port to the app."""
    return [
        f"apptunnel login --proxy {shlex.quote(proxy_addr)} --user {shlex.quote(user)} "
        f"--ca-pin {shlex.quote(ca_pin)}",
        f"apptunnel proxy app {shlex.quote(app)} --port {suggested_port(app)}",
    ]


def suggested_port(app: str) -> int:
    """A local port for ``app`` that stays the same between visits (20000-29999)."""
    return 20000 + zlib.crc32(app.encode("utf-8")) % 10000


def request_url(app: str) -> str:
    """The requests page, prefilled to ask for ``app``."""
    return "/web/requests?" + urlencode([("app", app)])
