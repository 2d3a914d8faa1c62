"""Printing for the CLI: one place that decides how times, tables and documents look.

Everything shown in text form goes through `clean`, because audit fields and names can
carry text from the network (paths, user agents), and a terminal must never receive raw
control sequences from them.
"""

from __future__ import annotations

import datetime
import json
import re
from typing import Any, Iterable, Sequence

import yaml

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def clean(value: Any) -> str:
    """Text safe for one terminal line: control characters shown as escapes."""
    text = value if isinstance(value, str) else str(value)
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def iso(seconds: float) -> str:
    """UTC time as ``2024-05-01T12:00:00Z``; the CLI never prints local times."""
    moment = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def human_duration(seconds: float) -> str:
    """``1h``, ``2h30m``, ``45s``: the same forms the config files accept."""
    seconds = int(round(seconds))
    if seconds <= 0:
        return "0s"
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Left-aligned columns, two spaces apart, every cell cleaned."""
    cells = [[clean(c) for c in headers]] + [[clean(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines) + "\n"


def yaml_docs(docs: list[dict]) -> str:
    """Documents separated by ``---``, in a form `apptunnel create -f` reads back."""
    if not docs:
        return ""
    return yaml.safe_dump_all(docs, explicit_start=True, sort_keys=False,
                              default_flow_style=False, allow_unicode=True)


def json_text(value: Any) -> str:
    """Indented JSON with a final newline (non-ASCII kept as is, no escapes lost)."""
    return json.dumps(value, indent=2, sort_keys=False, ensure_ascii=False) + "\n"
