"""`apptunnel users add|ls|rm|set-password|reset|update`: local users and their roles.

Passwords are hashed with argon2id in a thread (never on the reactor) and never echoed.
A new user without ``--password-stdin`` gets an invite link to choose their password
(`auth/links.py`); `users reset` takes the password away, ends the sessions and prints a
reset link; `set-password` without stdin prints a generated password exactly once.
Every role named must exist (as in `tctl users add`): a typo would otherwise create a
user who can open nothing, with only a warning to notice. Removing a user or changing their roles or traits reaches their
existing sessions and certificates too (`auth/directory.py`): the proxy of this config
is asked to apply it before the command returns. The work is the admin service's
(apptunnel/admin/users.py), shared with the admin API; this module parses and prints.
"""

from __future__ import annotations

import argparse
import secrets

from twisted.internet.threads import deferToThread

from apptunnel.admin import users as service
from apptunnel.admin.context import AdminError
from apptunnel.admin.users import Link, UserAdmin
from apptunnel.auth.names import ROLE_NAME, TRAIT_NAME, USER_NAME  # noqa: F401 (re-exported)
from apptunnel.auth.passwords import MAX_PASSWORD_LENGTH, MIN_PASSWORD_LENGTH, hash_password
from apptunnel.cli.context import Admin, Io, UsageError, cli_error, duration_arg
from apptunnel.cli.output import clean, human_duration, iso, json_text, table



def add_parsers(verbs: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    users = verbs.add_parser("users", parents=[common], help="local users")
    sub = users.add_subparsers(dest="action", metavar="ACTION", required=True)

    add = sub.add_parser("add", parents=[common], help="create a user")
    add.add_argument("name", metavar="NAME")
    add.add_argument("--roles", required=True, help="comma-separated role names")
    add.add_argument("--traits", action="append", default=[], metavar="KEY=V1,V2",
                     help="a trait and its values (repeat for more traits)")
    add.add_argument("--password-stdin", action="store_true",
                     help="read the password from stdin (else an invite link is printed)")
    add.add_argument("--ttl", default="24h", metavar="DURATION",
                     help="how long the invite link works (default 24h)")
    add.set_defaults(handler=add_user, read_inputs=read_password)

    ls = sub.add_parser("ls", parents=[common], help="list users")
    ls.add_argument("--format", choices=("text", "json"), default="text")
    ls.set_defaults(handler=list_users)

    rm = sub.add_parser("rm", parents=[common], help="remove a user and end their sessions")
    rm.add_argument("name", metavar="NAME")
    rm.set_defaults(handler=remove_user)

    pw = sub.add_parser("set-password", parents=[common], help="set a user's password")
    pw.add_argument("name", metavar="NAME")
    pw.add_argument("--password-stdin", action="store_true",
                    help="read the password from stdin (else one is generated and shown once)")
    pw.set_defaults(handler=set_password, read_inputs=read_password)

    reset = sub.add_parser("reset", parents=[common],
                           help="end a user's password and sessions; print a reset link")
    reset.add_argument("name", metavar="NAME")
    reset.add_argument("--ttl", default="24h", metavar="DURATION",
                       help="how long the reset link works (default 24h)")
    reset.set_defaults(handler=reset_user)

    update = sub.add_parser("update", parents=[common], help="change a user's roles or traits")
    update.add_argument("name", metavar="NAME")
    update.add_argument("--roles", help="comma-separated role names (replaces the old ones)")
    update.add_argument("--traits", action="append", default=None, metavar="KEY=V1,V2",
                        help="a trait and its values; given at all, replaces every trait")
    update.set_defaults(handler=update_user)


# -- argument parsing --------------------------------------------------------------------


def check_user_name(name: str) -> str:
    try:
        return service.check_user_name(name)
    except AdminError as err:
        raise cli_error(err) from None


def parse_roles(text: str) -> tuple[str, ...]:
    """``"a,b"`` -> ("a", "b"), each a valid role name, duplicates dropped."""
    try:
        return service.check_roles([part.strip() for part in text.split(",") if part.strip()])
    except AdminError as err:
        raise cli_error(err) from None


def parse_traits(items: list[str]) -> dict[str, tuple[str, ...]]:
    """``["logins=alice,root", "team=sre"]`` -> {"logins": ("alice", "root"), "team": ("sre",)}."""
    traits: dict[str, tuple[str, ...]] = {}
    for item in items:
        key, sep, values_text = item.partition("=")
        key = key.strip()
        if not sep or not TRAIT_NAME.match(key):
            raise UsageError(f"--traits: expected KEY=VALUE[,VALUE...], got {item!r}")
        values = [v.strip() for v in values_text.split(",") if v.strip()]
        if not values:
            raise UsageError(f"--traits: {key}: give at least one value")
        traits[key] = tuple(dict.fromkeys(traits.get(key, ()) + tuple(values)))
    return traits


def read_password(args: argparse.Namespace, io: Io) -> None:
    """Read ``--password-stdin`` before any storage is touched: one line, sane length."""
    args.password = None
    if not args.password_stdin:
        return
    text = io.password_line(MAX_PASSWORD_LENGTH)
    if len(text) < MIN_PASSWORD_LENGTH:
        raise UsageError(f"--password-stdin: password shorter than {MIN_PASSWORD_LENGTH} characters")
    args.password = text


async def hash_in_thread(password: str) -> str:
    """argon2id off the reactor."""
    return await deferToThread(hash_password, password)


def user_admin(admin: Admin) -> UserAdmin:
    return UserAdmin(admin.services, hash_in_thread)


async def require_roles(admin: Admin, roles: tuple[str, ...], where: str = "--roles",
                        planned: frozenset[str] = frozenset()) -> None:
    """UsageError (exit 2) naming the first role that is neither stored nor `planned`."""
    role = await admin.services.missing_role(roles, planned)
    if role is not None:
        raise UsageError(f"{where}: role {role!r} does not exist (create it first with "
                         "`apptunnel create -f ROLE.yaml`; `apptunnel get roles` lists "
                         "them); nothing was changed")


# -- verbs -------------------------------------------------------------------------------


def _print_link(admin: Admin, name: str, link: Link) -> None:
    what = "set their password" if link.kind == "invite" else "choose a new password"
    admin.io.out(f"Send this link to {clean(name)} to {what} (works once, for "
                 f"{human_duration(link.ttl)}):\n{link.url}\n")


async def add_user(admin: Admin, args: argparse.Namespace) -> int:
    check_user_name(args.name)
    roles = parse_roles(args.roles)
    traits = parse_traits(args.traits)
    # Without --password-stdin the user chooses their own password through an invite link.
    ttl = duration_arg("--ttl", args.ttl) if args.password is None else None
    try:
        user, link = await user_admin(admin).create(admin.actor, args.name, roles, traits,
                                                    args.password, ttl)
    except AdminError as err:
        raise cli_error(err) from None
    admin.io.out(f"Created user {clean(user.name)} with roles {clean(', '.join(roles))}.\n")
    if link is not None:
        _print_link(admin, user.name, link)
    return 0


async def reset_user(admin: Admin, args: argparse.Namespace) -> int:
    """Take the password away and end every session now; print a reset link."""
    ttl = duration_arg("--ttl", args.ttl)
    try:
        user, link = await user_admin(admin).reset(admin.actor, args.name, ttl)
    except AdminError as err:
        raise cli_error(err) from None
    admin.io.out(f"Reset {clean(user.name)}: the old password no longer works and their "
                 "sessions have ended.\n")
    _print_link(admin, user.name, link)
    return 0


async def list_users(admin: Admin, args: argparse.Namespace) -> int:
    users = await user_admin(admin).list()
    if args.format == "json":
        admin.io.out(json_text([
            {"name": u.name, "roles": list(u.roles),
             "traits": {k: list(v) for k, v in u.traits.items()},
             "password": u.password_hash is not None, "created": iso(u.created)}
            for u in users
        ]))
        return 0
    if not users:
        admin.io.out("No users.\n")
        return 0
    admin.io.out(table(
        ("NAME", "ROLES", "TRAITS", "PASSWORD", "CREATED"),
        [(u.name, ",".join(u.roles),
          " ".join(f"{k}={','.join(v)}" for k, v in sorted(u.traits.items())) or "-",
          "yes" if u.password_hash else "no", iso(u.created))
         for u in users],
    ))
    return 0


async def remove_user(admin: Admin, args: argparse.Namespace) -> int:
    try:
        await user_admin(admin).delete(admin.actor, args.name)
    except AdminError as err:
        raise cli_error(err) from None
    admin.io.out(f"Removed user {clean(args.name)}: their sessions and certificates no longer "
                 "open anything.\n")
    return 0


async def set_password(admin: Admin, args: argparse.Namespace) -> int:
    generated = None
    password = args.password
    if password is None:
        generated = password = secrets.token_urlsafe(18)
    try:
        user = await user_admin(admin).set_password(admin.actor, args.name, password)
    except AdminError as err:
        raise cli_error(err) from None
    admin.io.out(f"Password of {clean(user.name)} changed.\n")
    if generated is not None:
        admin.io.out(f"Password (shown only once): {generated}\n")
    return 0


async def update_user(admin: Admin, args: argparse.Namespace) -> int:
    if args.roles is None and args.traits is None:
        raise UsageError("users update: nothing to change (give --roles and/or --traits)")
    roles = parse_roles(args.roles) if args.roles is not None else None
    traits = parse_traits(args.traits) if args.traits is not None else None
    try:
        user, changed = await user_admin(admin).update(admin.actor, args.name, roles, traits)
    except AdminError as err:
        raise cli_error(err) from None
    admin.io.out(f"Updated {' and '.join(changed)} of {clean(user.name)}.\n")
    return 0
