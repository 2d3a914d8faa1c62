"""`apptunnel audit verify` and `apptunnel audit export`: check the per-proxy hash chains
(audit/chain.py) in the backend, and stream events with their chain fields as JSON lines so
they can be kept and checked elsewhere."""

from __future__ import annotations

import argparse
import json

from apptunnel.admin import audit as admin_audit
from apptunnel.admin.context import AdminError
from apptunnel.audit.chain import CLI_CHAIN, chain_name
from apptunnel.audit.verify import verify_all
from apptunnel.backend.base import MAX_SEARCH_LIMIT
from apptunnel.backend.records import AuditEvent
from apptunnel.cli.context import Admin, UsageError
from apptunnel.cli.output import clean

EXIT_BROKEN = 3


def add_parsers(audit_actions: argparse._SubParsersAction,
                common: argparse.ArgumentParser) -> None:
    verify = audit_actions.add_parser(
        "verify", parents=[common],
        help="check every proxy's audit hash chain and the admin CLI's; non-zero at the "
             "first altered, missing or reordered event")
    verify.add_argument("--proxy", metavar="ID",
                        help=f"only this proxy's chain ({CLI_CHAIN}: the admin CLI's)")
    verify.set_defaults(handler=verify_audit)
    export = audit_actions.add_parser(
        "export", parents=[common], help="stream audit events with their chain fields")
    export.add_argument("--format", choices=("jsonl",), default="jsonl")
    export.add_argument("--since", help="a duration ago (1h, 2d) or an ISO time (UTC if no zone)")
    export.add_argument("--until", help="a duration ago or an ISO time")
    export.set_defaults(handler=export_audit)


async def verify_audit(admin: Admin, args: argparse.Namespace) -> int:
    report = await verify_all(admin.backend, args.proxy)
    status = 0
    for chain in report.chains:
        if chain.problem is None:
            admin.io.out(f"{chain_name(chain.proxy_id)}: {chain.events} events, chain intact\n")
        else:
            admin.io.out(f"{chain_name(chain.proxy_id)}: {clean(str(chain.problem))} "
                         f"(after {chain.events} intact events)\n")
            status = EXIT_BROKEN
    if args.proxy is not None and report.chains[0].events == 0 and \
            report.chains[0].problem is None:
        admin.io.warn(f"no chained events for proxy {args.proxy}")
    if report.unchained:
        admin.io.out(f"unchained: {report.unchained} events stored without chain data "
                     "(before the chains existed)\n")
    if not report.chains and not report.unchained:
        admin.io.warn("no audit events")
    return status


def parse_time(option: str, text: str, now: float) -> float:
    try:
        return admin_audit.parse_time(option, text, now)
    except AdminError as err:
        raise UsageError(err.text()) from None


def export_line(e: AuditEvent) -> str:
    """Every stored field, times as epoch seconds (exactly as hashed)."""
    return json.dumps({"id": e.id, "time": e.time, "type": e.type, "code": e.code,
                       "actor": e.actor, "target": e.target, "outcome": e.outcome,
                       "fields": e.fields, "proxy_id": e.proxy_id, "seq": e.seq,
                       "prev": e.prev, "digest": e.digest},
                      sort_keys=True, separators=(",", ":"), ensure_ascii=True) + "\n"


async def export_audit(admin: Admin, args: argparse.Namespace) -> int:
    now = admin.now()
    since = parse_time("--since", args.since, now) if args.since else None
    until = parse_time("--until", args.until, now) if args.until else None
    if since is not None and until is not None and since >= until:
        raise UsageError("--since must be before --until")
    offset = 0
    while True:   # page by page: a long trail never sits in memory at once
        events = await admin.backend.search_audit(since=since, until=until,
                                                  limit=MAX_SEARCH_LIMIT, offset=offset)
        admin.io.out("".join(export_line(e) for e in events))
        if len(events) < MAX_SEARCH_LIMIT:
            return 0
        offset += len(events)
