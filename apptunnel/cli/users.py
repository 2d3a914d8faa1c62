"""`apptunnel users add|ls|rm|set-password|reset|update`: local users and their roles.

Passwords are hashed with argon2id in a thread (never on the reactor) and never echoed.
A new user without ``--password-stdin`` gets an invite link to choose their password
(`auth/links.py`); `users reset` takes the password away, ends the sessions and prints a
reset link; `set-password` without stdin prints a generated password exactly once.
Every role named must exist (as in `tctl users add`): a typo would otherwise create a
user who can open nothing, with only a warning to notice. Removing a user or changing their roles or traits reaches their
existing sessions and certificates too (`auth/directory.py`): the proxy of this config
is asked to apply it before the command returns.
"""

from __future__ import annotations

import argparse
import secrets

from twisted.internet.threads import deferToThread

from apptunnel.auth.names import ROLE_NAME, TRAIT_NAME, USER_NAME  # noqa: F401 (re-exported)
from apptunnel.auth.passwords import MAX_PASSWORD_LENGTH, MIN_PASSWORD_LENGTH, hash_password
from apptunnel.backend import AlreadyExists
from apptunnel.backend.records import User
from apptunnel.cli.context import Admin, CliError, Io, UsageError, duration_arg
from apptunnel.auth.links import issue_link, link_url
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
    if not USER_NAME.match(name):
        raise UsageError(f"invalid user name {name!r} (letters, digits and . _ @ + -, "
                         "starting with a letter or digit)")
    return name


def parse_roles(text: str) -> tuple[str, ...]:
    """``"a,b"`` -> ("a", "b"), each a valid role name, duplicates dropped."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise UsageError("--roles: give at least one role name")
    for name in names:
        if not ROLE_NAME.match(name):
            raise UsageError(f"--roles: invalid role name {name!r}")
    return tuple(dict.fromkeys(names))


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


async def _hash(password: str | None) -> tuple[str, str | None]:
    """(argon2 hash, generated password to show once or None)."""
    generated = None
    if password is None:
        generated = password = secrets.token_urlsafe(18)
    return await deferToThread(hash_password, password), generated


async def require_roles(admin: Admin, roles: tuple[str, ...], where: str = "--roles",
                        planned: frozenset[str] = frozenset()) -> None:
    """UsageError (exit 2) naming the first role that is neither stored nor `planned`."""
    for role in roles:
        if role not in planned and await admin.backend.get_resource("role", role) is None:
            raise UsageError(f"{where}: role {role!r} does not exist (create it first with "
                             "`apptunnel create -f ROLE.yaml`; `apptunnel get roles` lists "
                             "them); nothing was changed")


async def _existing(admin: Admin, name: str) -> User:
    user = await admin.backend.get_user(check_user_name(name))
    if user is None:
        raise CliError(f"no user named {name!r}")
    return user


# -- verbs -------------------------------------------------------------------------------


async def add_user(admin: Admin, args: argparse.Namespace) -> int:
    name = check_user_name(args.name)
    roles = parse_roles(args.roles)
    traits = parse_traits(args.traits)
    ttl = duration_arg("--ttl", args.ttl) if args.password is None else None
    await require_roles(admin, roles)
    # Without --password-stdin the user chooses their own password through an invite link.
    password_hash = None if args.password is None else (await _hash(args.password))[0]
    user = User(name=name, password_hash=password_hash, roles=roles, traits=traits,
                created=admin.now())
    try:
        await admin.backend.create_user(user)
    except AlreadyExists:
        raise CliError(f"user {name!r} already exists (see `apptunnel users update` and "
                       "`apptunnel users set-password`)") from None
    admin.emit("user.create", name, roles=list(roles), traits=sorted(traits))
    admin.io.out(f"Created user {clean(name)} with roles {clean(', '.join(roles))}.\n")
    if ttl is not None:
        await _print_link(admin, name, "invite", ttl)
    return 0


async def _print_link(admin: Admin, name: str, kind: str, ttl: float) -> None:
    token = await issue_link(admin.backend, name, kind, ttl, admin.now())
    admin.emit("user.link.issue", name, method=kind, ttl=ttl)
    what = "set their password" if kind == "invite" else "choose a new password"
    admin.io.out(f"Send this link to {clean(name)} to {what} (works once, for "
                 f"{human_duration(ttl)}):\n"
                 f"{link_url(admin.config.public_addr, kind, token)}\n")


async def reset_user(admin: Admin, args: argparse.Namespace) -> int:
    """Take the password away and end every session now; print a reset link."""
    ttl = duration_arg("--ttl", args.ttl)
    user = await _existing(admin, args.name)
    await admin.backend.update_user(User(
        name=user.name, password_hash=None, roles=user.roles, traits=user.traits,
        created=user.created,
    ))
    ended = await admin.backend.delete_user_sessions(user.name)
    admin.emit("user.update", user.name, changed=["password"], reset=True,
               app_sessions_ended=len(ended))
    await admin.refresh_proxy()   # the proxy forgets cached sessions now
    admin.io.out(f"Reset {clean(user.name)}: the old password no longer works and their "
                 "sessions have ended.\n")
    await _print_link(admin, user.name, "reset", ttl)
    return 0


async def list_users(admin: Admin, args: argparse.Namespace) -> int:
    users = sorted(await admin.backend.list_users(), key=lambda u: u.name)
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
    name = check_user_name(args.name)
    if not await admin.backend.delete_user(name):
        raise CliError(f"no user named {name!r}")
    admin.emit("user.delete", name)
    await admin.refresh_proxy()   # their certificates and live connections end now
    admin.io.out(f"Removed user {clean(name)}: their sessions and certificates no longer "
                 "open anything.\n")
    return 0


async def set_password(admin: Admin, args: argparse.Namespace) -> int:
    user = await _existing(admin, args.name)
    password_hash, generated = await _hash(args.password)
    await admin.backend.update_user(User(
        name=user.name, password_hash=password_hash, roles=user.roles, traits=user.traits,
        created=user.created,
    ))
    admin.emit("user.update", user.name, changed=["password"])
    admin.io.out(f"Password of {clean(user.name)} changed.\n")
    if generated is not None:
        admin.io.out(f"Password (shown only once): {generated}\n")
    return 0


async def update_user(admin: Admin, args: argparse.Namespace) -> int:
    if args.roles is None and args.traits is None:
        raise UsageError("users update: nothing to change (give --roles and/or --traits)")
    roles = parse_roles(args.roles) if args.roles is not None else None
    traits = parse_traits(args.traits) if args.traits is not None else None
    user = await _existing(admin, args.name)
    if roles is not None:
        await require_roles(admin, roles)
    changed = []
    if roles is not None:
        changed.append("roles")
    if traits is not None:
        changed.append("traits")
    await admin.backend.update_user(User(
        name=user.name, password_hash=user.password_hash,
        roles=roles if roles is not None else user.roles,
        traits=traits if traits is not None else user.traits,
        created=user.created, connector=user.connector,
    ))
    admin.emit("user.update", user.name, changed=changed,
               roles=list(roles if roles is not None else user.roles))
    await admin.refresh_proxy()   # live connections are re-checked now
    admin.io.out(f"Updated {' and '.join(changed)} of {clean(user.name)}.\n")
    return 0
