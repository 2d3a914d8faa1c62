"""`apptunnel lock` and `apptunnel locks ls|rm`: shut a user or an app out, now.

A lock is only a row in the backend; every running proxy polls it within seconds, ends
the matching sessions and refuses new ones (`auth/locks.py`). So these verbs need no
running proxy, exactly like the other admin verbs; when the proxy of this config runs on
this machine, they wait (briefly) until it has the change (`cli/control.py`).
"""

from __future__ import annotations

import argparse
import re
import uuid

from apptunnel.auth.bots import bot_of, bot_principal
from apptunnel.backend.records import Lock
from apptunnel.cli.bots import check_bot_name
from apptunnel.cli.context import Admin, CliError, UsageError, duration_arg
from apptunnel.cli.output import clean, human_duration, iso, json_text, table
from apptunnel.cli.users import USER_NAME

MAX_MESSAGE = 500
MAX_TTL = 3650 * 86400.0
MIN_ID_PREFIX = 6
_APP_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-")
_AGENT_ID = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,126}[A-Za-z0-9])?\Z")


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


def _target(args: argparse.Namespace) -> tuple[str | None, str | None]:
    user, app = args.user, args.app
    if args.bot is not None:
        # A bot acts as the principal bot:NAME (auth/bots.py): its lock is on that name.
        if user is not None or args.agent is not None:
            raise UsageError("lock: --bot goes alone or with --app (not with --user or --agent)")
        return bot_principal(check_bot_name(args.bot)), app
    if args.agent is not None:
        if user is not None or app is not None:
            raise UsageError("lock: --agent goes alone (without --user or --app)")
        if not _AGENT_ID.match(args.agent):
            raise UsageError(f"--agent: not a valid agent id: {clean(args.agent)!r}")
        return None, None
    if user is None and app is None:
        raise UsageError("lock: give --user NAME, --app NAME, or both (or --agent ID)")
    if user is not None and not USER_NAME.match(user):
        raise UsageError(f"--user: not a valid user name: {clean(user)!r}")
    if app is not None and not (0 < len(app) <= 63 and set(app) <= _APP_NAME_CHARS
                                and app[0] != "-" and app[-1] != "-"):
        raise UsageError(f"--app: not a valid app name: {clean(app)!r}")
    return user, app

def _message(text: str) -> str:
    text = text.strip()
    if len(text) > MAX_MESSAGE:
        raise UsageError(f"--message: at most {MAX_MESSAGE} characters")
    if any(ord(c) < 32 or 127 <= ord(c) < 160 for c in text):
        raise UsageError("--message: control characters are not allowed")
    return text


def _describe(lock: Lock) -> str:
    if lock.agent:
        return f"agent {lock.agent}"
    who = f"bot {bot_of(lock.user)}" if lock.user and bot_of(lock.user) else f"user {lock.user}"
    if lock.user and lock.app:
        return f"{who} on app {lock.app}"
    return who if lock.user else f"app {lock.app}"


def _as_json(lock: Lock) -> dict:
    return {
        "id": lock.id, "user": lock.user, "app": lock.app, "agent": lock.agent,
        "message": lock.message,
        "created": iso(lock.created), "created_by": lock.created_by,
        "expires": iso(lock.expires) if lock.expires is not None else None,
    }


async def add_lock(admin: Admin, args: argparse.Namespace) -> int:
    user, app = _target(args)
    ttl = duration_arg("--ttl", args.ttl, MAX_TTL, "3650d")
    message = _message(args.message)
    if args.bot is not None and await admin.backend.get_bot(args.bot) is None:
        admin.io.warn(f"no bot {args.bot!r}; the lock applies if one is added")
    elif user is not None and args.bot is None and await admin.backend.get_user(user) is None:
        admin.io.warn(f"no local user {user!r}; the lock still applies if they sign in through SSO")
    if args.agent is not None and await admin.backend.get_agent(args.agent) is None:
        admin.io.warn(f"no agent {args.agent!r} has joined; the lock applies if one does")
    now = admin.now()
    lock = Lock(id=str(uuid.uuid4()), user=user, app=app, message=message, created=now,
                expires=now + ttl if ttl is not None else None, created_by=admin.io.actor,
                agent=args.agent)
    await admin.backend.put_lock(lock)
    await admin.refresh_proxy()   # holds on this machine's proxy before we return
    admin.emit("lock.create", lock.id, user=user, app=app, agent=lock.agent, message=message,
               expires=_as_json(lock)["expires"])
    if args.format == "json":
        admin.io.out(json_text(_as_json(lock)))
        return 0
    until = f"expires {iso(lock.expires)} (in {human_duration(ttl)})" if ttl else "until removed"
    # The id alone on the first line, so scripts can take it without parsing prose.
    admin.io.out(f"{lock.id}\nLocked {clean(_describe(lock))}, {until}.\n")
    return 0


async def list_locks(admin: Admin, args: argparse.Namespace) -> int:
    locks = await admin.backend.list_locks(admin.now())
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
    given = args.id.strip().lower()
    locks = await admin.backend.list_locks(admin.now())
    matches = [lock for lock in locks if lock.id == given]
    if not matches and len(given) >= MIN_ID_PREFIX:
        matches = [lock for lock in locks if lock.id.startswith(given)]
    if not matches:
        raise CliError(f"no lock in force matches {clean(args.id)!r} (see `apptunnel locks ls`)")
    if len(matches) > 1:
        raise CliError(f"{len(matches)} locks start with {clean(args.id)!r}; give more characters")
    lock = matches[0]
    if not await admin.backend.delete_lock(lock.id):
        raise CliError("the lock was removed by someone else meanwhile")
    await admin.refresh_proxy()
    admin.emit("lock.delete", lock.id, user=lock.user, app=lock.app)
    admin.io.out(f"Removed lock {lock.id} ({clean(_describe(lock))}).\n")
    return 0
