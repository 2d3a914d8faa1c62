"""`apptunnel audit search`: read the audit trail from the backend, oldest first.

Filters (time window, type, user, app, outcome) are applied by the backend, so
``--limit`` counts matching events. Times are ISO 8601 UTC in text and JSON alike,
including time-valued fields that events store as epoch seconds (``expires``).
"""

from __future__ import annotations

import argparse
import json

from apptunnel.admin import audit as admin_audit
from apptunnel.admin.context import AdminError
from apptunnel.backend.records import AuditEvent
from apptunnel.cli import audit_tools
from apptunnel.cli.context import Admin, UsageError
from apptunnel.cli.output import clean, iso, json_text

MAX_LIMIT = 10_000
OUTCOMES = ("success", "failure")
# Fields some events store as epoch seconds; shown as ISO times like every other time.
TIME_FIELDS = frozenset({"expires", "created", "not_after", "not_before", "since", "until"})


def add_parsers(verbs: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    audit = verbs.add_parser("audit", parents=[common], help="the audit log")
    sub = audit.add_subparsers(dest="action", metavar="ACTION", required=True)
    search = sub.add_parser("search", parents=[common], help="search audit events")
    search.add_argument("--since", help="a duration ago (1h, 2d) or an ISO time (UTC if no zone)")
    search.add_argument("--until", help="a duration ago or an ISO time (default: now)")
    search.add_argument("--type", help="only this event type, e.g. user.login")
    search.add_argument("--user", metavar="NAME",
                        help="only events this user caused (the actor: sign-ins, app requests, "
                             "TCP sessions, denials; for admin changes the OS account)")
    search.add_argument("--app", metavar="NAME",
                        help="only events whose target is this app (requests, sessions, denials)")
    search.add_argument("--outcome", choices=OUTCOMES, help="only successes or only failures")
    search.add_argument("--limit", type=int, default=1000, help="at most this many (default 1000)")
    search.add_argument("--format", choices=("text", "json"), default="text")
    search.set_defaults(handler=search_audit)
    audit_tools.add_parsers(sub, common)   # verify and export: same verb, own module


def parse_time(option: str, text: str, now: float) -> float:
    """``1h`` means an hour before now; otherwise an ISO 8601 time (naive = UTC)."""
    try:
        return admin_audit.parse_time(option, text, now)
    except AdminError as err:
        raise UsageError(err.text()) from None


def _field_value(key: str, value: object) -> object:
    if key in TIME_FIELDS and isinstance(value, (int, float)) and not isinstance(value, bool):
        return iso(value)
    return value


def _fields(event: AuditEvent) -> dict:
    return {key: _field_value(key, value) for key, value in event.fields.items()}


def _field_text(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False,
                                                          sort_keys=True)


def event_line(event: AuditEvent) -> str:
    """One event per line: time, type, code, actor, target, outcome, then key=value fields."""
    head = [iso(event.time), event.type, event.code, event.actor or "-", event.target or "-",
            event.outcome]
    fields = [f"{key}={_field_text(value)}" for key, value in sorted(_fields(event).items())]
    return " ".join(clean(part) for part in head + fields)


def event_json(event: AuditEvent) -> dict:
    return {"id": event.id, "time": iso(event.time), "type": event.type,
            "code": event.code, "actor": event.actor, "target": event.target,
            "outcome": event.outcome, "fields": _fields(event)}


async def search_audit(admin: Admin, args: argparse.Namespace) -> int:
    now = admin.now()
    since = parse_time("--since", args.since, now) if args.since else None
    until = parse_time("--until", args.until, now) if args.until else None
    if not 1 <= args.limit <= MAX_LIMIT:
        raise UsageError(f"--limit: must be 1-{MAX_LIMIT}, got {args.limit}")
    if since is not None and until is not None and since >= until:
        raise UsageError("--since must be before --until")
    events = await admin.backend.search_audit(since=since, until=until, type=args.type,
                                              limit=args.limit, actor=args.user,
                                              target=args.app, outcome=args.outcome)
    if args.format == "json":
        admin.io.out(json_text([event_json(e) for e in events]))
    else:
        admin.io.out("".join(event_line(e) + "\n" for e in events))
        if not events:
            admin.io.warn("no audit events match")
    if len(events) == args.limit:
        admin.io.warn(f"showing the first {args.limit} matching events; narrow --since or "
                      "raise --limit for more")
    return 0
