"""`apptunnel bots add|ls|rm`: machine identities for CI/CD and scripts (auth/bots.py).

``bots add NAME --roles a,b`` stores the bot and prints a single-use join token with the
CA pin, and the ``bot.yaml`` lines for ``twistd apptunnel-bot`` (the only way to get a
token of kind ``bot``: ``tokens add --type bot`` points here). The bot trades the token
once for a short-lived certificate and renews it with that certificate from then on.

``bots rm NAME`` removes the bot and any unused token of it; every proxy drops it from
its directory at the next poll (at once on this machine's proxy), which cuts its live
connections and refuses its renewals. ``apptunnel lock --bot NAME`` does the same while
keeping the bot (remove the lock to let it renew again, while its certificate is valid).
The work is the admin service's (apptunnel/admin/bots.py), shared with the admin API.
"""

from __future__ import annotations

import argparse


from apptunnel.admin import bots as admin_bots
from apptunnel.admin.bots import BotAdmin
from apptunnel.admin.context import AdminError
from apptunnel.auth.bots import BOT_PREFIX
from apptunnel.backend.records import Bot
from apptunnel.cli.context import Admin, cli_error, duration_arg
from apptunnel.cli.output import human_duration, iso, json_text, table
from apptunnel.cli.tokens import MAX_TTL
from apptunnel.cli.users import parse_roles, require_roles


def add_parsers(verbs: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    bots = verbs.add_parser("bots", parents=[common], help="bots: machine identities")
    sub = bots.add_subparsers(dest="action", metavar="ACTION", required=True)

    add = sub.add_parser("add", parents=[common],
                         help="create a bot and its one-time join token (printed once)")
    add.add_argument("name", metavar="NAME", help="the bot's name (it acts as bot:NAME)")
    add.add_argument("--roles", required=True, help="comma-separated role names")
    add.add_argument("--ttl", default="1h", help="how long the join token stays valid "
                                                 "(default: 1h)")
    add.add_argument("--format", choices=("text", "json"), default="text")
    add.set_defaults(handler=add_bot)

    ls = sub.add_parser("ls", parents=[common], help="list bots")
    ls.add_argument("--format", choices=("text", "json"), default="text")
    ls.set_defaults(handler=list_bots)

    rm = sub.add_parser("rm", parents=[common], help="remove a bot (cuts it off now)")
    rm.add_argument("name", metavar="NAME")
    rm.add_argument("--format", choices=("text", "json"), default="text")
    rm.set_defaults(handler=remove_bot)


def check_bot_name(name: str) -> str:
    try:
        return admin_bots.check_bot_name(name)
    except AdminError as err:
        raise cli_error(err) from None

def _bot_json(bot: Bot, now: float) -> dict:
    return {"name": bot.name, "principal": BOT_PREFIX + bot.name, "roles": list(bot.roles),
            "created": iso(bot.created), "joined": bot.cert_expires is not None,
            "cert_expires": iso(bot.cert_expires) if bot.cert_expires is not None else None,
            "cert_valid": bot.cert_expires is not None and bot.cert_expires > now}


async def add_bot(admin: Admin, args: argparse.Namespace) -> int:
    name = check_bot_name(args.name)
    roles = parse_roles(args.roles)
    ttl = duration_arg("--ttl", args.ttl, MAX_TTL, "30d")
    await require_roles(admin, roles)
    config = admin.config
    ca = await admin.cluster_ca()
    try:
        secret, token = await BotAdmin(admin.services).add(admin.actor, name, roles, ttl)
    except AdminError as err:
        raise cli_error(err) from None
    if args.format == "json":
        admin.io.out(json_text({"name": name, "roles": list(roles), "token": secret,
                                "ca_pin": ca.pin, "expires": iso(token.expires)}))
        return 0
    admin.io.out(
        f"Bot:     {name} (acts as {BOT_PREFIX}{name})\n"
        f"Roles:   {', '.join(roles)}\n"
        f"Token:   {secret}\n"
        f"Expires: {iso(token.expires)} (in {human_duration(ttl)}; one use)\n"
        f"CA pin:  {ca.pin}\n"
        "\n"
        "Add this to the bot's bot.yaml (needed for its first start only):\n"
        "\n"
        f"proxy_addr: {config.public_addr}\n"
        "join:\n"
        f'  token: "{secret}"\n'
        f'  ca_pin: "{ca.pin}"\n'
    )
    return 0


async def list_bots(admin: Admin, args: argparse.Namespace) -> int:
    now = admin.now()
    bots = await BotAdmin(admin.services).list()
    if args.format == "json":
        admin.io.out(json_text([_bot_json(b, now) for b in bots]))
        return 0
    if not bots:
        admin.io.out("No bots.\n")
        return 0
    admin.io.out(table(
        ("NAME", "ROLES", "CREATED", "CERTIFICATE"),
        [(b.name, ",".join(b.roles), iso(b.created),
          "not joined" if b.cert_expires is None else
          (f"valid {human_duration(b.cert_expires - now)}" if b.cert_expires > now
           else "expired")) for b in bots],
    ))
    return 0


async def remove_bot(admin: Admin, args: argparse.Namespace) -> int:
    name = check_bot_name(args.name)
    try:
        await BotAdmin(admin.services).remove(admin.actor, name)
    except AdminError as err:
        raise cli_error(err) from None
    if args.format == "json":
        admin.io.out(json_text({"name": name, "removed": True}))
        return 0
    admin.io.out(f"Removed bot {name}.\n")
    return 0
