"""`apptunnel lock` and `apptunnel locks ls|rm`: shut a user or an app out, now.

A lock is only a row in the backend; every running proxy polls it within seconds, ends
the matching sessions and refuses new ones (`auth/locks.py`). So these verbs need no
running proxy, exactly like the other admin verbs; when the proxy of this config runs on
this machine, they wait (briefly) until it has the change (`cli/control.py`). The work
is the admin service's (apptunnel/admin/locks.py), shared with the admin API.
"""

from __future__ import annotations

import argparse

from apptunnel.admin.context import AdminError
from apptunnel.admin.locks import (
    MAX_TTL, MIN_ID_PREFIX, LockAdmin, describe, lock_message, lock_target,
)
from apptunnel.backend.records import Lock
from apptunnel.cli.context import Admin, cli_error, duration_arg
from apptunnel.cli.output import clean, human_duration, iso, json_text, table


def add_parsers(verbs: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    lock = verbs.add_parser(
        "lock", parents=[common],
        help="lock out a user, an app, or a user on one app (ends their sessions now)",
    )
    lock.add_argument("--user", metavar="NAME", help="the user to lock out")
    lock.add_argument("--app", metavar="NAME", help="the app to lock (for everyone, or for --user)")
    lock.add_argument("--agent", metavar="ID",
                      help="the agent to lock out: its tunnels are cut, hello and renewal refused")
    lock.add_argument("--bot", metavar="NAME",
                      help="the bot to lock out: its connections are cut, renewal refused")
    lock.add_argument("--ttl", help="remove the lock by itself after this long (default: never)")
    lock.add_argument("--message", default="", help="shown to the locked-out user")
    lock.add_argument("--format", choices=("text", "json"), default="text")
    lock.set_defaults(handler=add_lock)

    locks = verbs.add_parser("locks", parents=[common], help="list or remove locks")
    sub = locks.add_subparsers(dest="action", metavar="ACTION", required=True)
    ls = sub.add_parser("ls", parents=[common], help="list the locks in force")
    ls.add_argument("--format", choices=("text", "json"), default="text")
    ls.set_defaults(handler=list_locks)
    rm = sub.add_parser("rm", parents=[common], help="remove a lock")
    rm.add_argument("id", metavar="ID", help=f"the lock id, or its first {MIN_ID_PREFIX}+ characters")
    rm.set_defaults(handler=remove_lock)


def _as_json(lock: Lock) -> dict:
    return {
        "id": lock.id, "user": lock.user, "app": lock.app, "agent": lock.agent,
        "message": lock.message,
        "created": iso(lock.created), "created_by": lock.created_by,
        "expires": iso(lock.expires) if lock.expires is not None else None,
    }


async def add_lock(admin: Admin, args: argparse.Namespace) -> int:
    try:
        lock_target(args.user, args.app, args.agent, args.bot)
        ttl = duration_arg("--ttl", args.ttl, MAX_TTL, "3650d")
        lock_message(args.message)
        lock, warnings = await LockAdmin(admin.services).create(
            admin.actor, user=args.user, app=args.app, agent=args.agent, bot=args.bot,
            ttl=ttl, message=args.message)
    except AdminError as err:
        raise cli_error(err) from None
    for warning in warnings:
        admin.io.warn(warning)
    if args.format == "json":
        admin.io.out(json_text(_as_json(lock)))
        return 0
    until = f"expires {iso(lock.expires)} (in {human_duration(ttl)})" if ttl else "until removed"
    # The id alone on the first line, so scripts can take it without parsing prose.
    admin.io.out(f"{lock.id}\nLocked {clean(describe(lock))}, {until}.\n")
    return 0


async def list_locks(admin: Admin, args: argparse.Namespace) -> int:
    locks = await LockAdmin(admin.services).list()
    if args.format == "json":
        admin.io.out(json_text([_as_json(lock) for lock in locks]))
        return 0
    if not locks:
        admin.io.out("No locks.\n")
        return 0
    agent_column = ("AGENT",) if any(lock.agent for lock in locks) else ()
    admin.io.out(table(
        ("ID", "USER", "APP", "EXPIRES", "BY", "MESSAGE") + agent_column,
        [(lock.id, lock.user or ("-" if lock.agent else "*"), lock.app or ("-" if lock.agent else "*"),
          iso(lock.expires) if lock.expires is not None else "never",
          lock.created_by, lock.message) + ((lock.agent or "",) if agent_column else ())
         for lock in locks],
    ))
    return 0


async def remove_lock(admin: Admin, args: argparse.Namespace) -> int:
    """Remove by id or an unambiguous prefix of it (expired locks are already gone)."""
    try:
        lock = await LockAdmin(admin.services).remove(admin.actor, args.id)
    except AdminError as err:
        raise cli_error(err) from None
    admin.io.out(f"Removed lock {lock.id} ({clean(describe(lock))}).\n")
    return 0
