"""`apptunnel tokens add|ls|rm`: join tokens that let a new agent get its certificate.

Only the SHA-256 of a token is stored; the secret is printed once, next to the CA pin the
agent needs to verify the proxy on its first connection.

A new token is single-use unless ``--uses`` says otherwise, and may be limited to what
its agent may announce: ``--apps a,b`` (names) and/or ``--labels k=v`` (repeatable: every
pair must be among an app's labels). The scope is copied into the agent's record at join
and checked at every hello, also after restarts with the certificate. The work is the admin
service's (apptunnel/admin/tokens.py), shared with the admin API.
"""

from __future__ import annotations

import argparse
import re


from apptunnel.admin.context import AdminError
from apptunnel.admin.tokens import MAX_TTL, MAX_USES, SHOWN_HASH as _SHOWN_HASH, TokenAdmin
from apptunnel.auth.tokens import describe_scope
from apptunnel.backend.records import JoinToken, Scope
from apptunnel.cli.context import Admin, UsageError, cli_error, duration_arg
from apptunnel.cli.output import human_duration, iso, json_text, table

TOKEN_TYPES = ("app", "bot")   # "bot" only to say where bot tokens come from
_APP_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")
_LABEL = re.compile(r"([^=\s]{1,63})=([^\x00-\x1f\x7f]{0,255})\Z")


def add_parsers(verbs: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    tokens = verbs.add_parser("tokens", parents=[common], help="join tokens for agents")
    sub = tokens.add_subparsers(dest="action", metavar="ACTION", required=True)

    add = sub.add_parser("add", parents=[common], help="create a join token (printed once)")
    add.add_argument("--type", choices=TOKEN_TYPES, default="app",
                     help="what may join with it (default: app, an agent; bots get theirs "
                          "from `apptunnel bots add`)")
    add.add_argument("--ttl", default="1h", help="how long it stays valid (default: 1h)")
    add.add_argument("--uses", type=_uses, default=1, metavar="N",
                     help="how many agents may join with it (default: 1)")
    add.add_argument("--apps", type=_apps, metavar="A,B",
                     help="its agent may announce only these app names")
    add.add_argument("--labels", action="append", type=_label, default=[], metavar="K=V",
                     help="its agent may announce only apps labelled K=V (repeatable: all)")
    add.add_argument("--format", choices=("text", "json"), default="text")
    add.set_defaults(handler=add_token)

    ls = sub.add_parser("ls", parents=[common], help="list join tokens (hash prefixes)")
    ls.add_argument("--format", choices=("text", "json"), default="text")
    ls.set_defaults(handler=list_tokens)

    rm = sub.add_parser("rm", parents=[common], help="remove a join token")
    rm.add_argument("token", metavar="TOKEN_OR_HASH_PREFIX",
                    help="the token itself, or a prefix of its hash as `tokens ls` shows it")
    rm.set_defaults(handler=remove_token)

def _uses(text: str) -> int:
    if not (text.isdigit() and text.isascii() and 1 <= int(text) <= MAX_USES):
        raise argparse.ArgumentTypeError(f"expected a number from 1 to {MAX_USES}, got {text!r}")
    return int(text)


def _apps(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    bad = [n for n in names if not _APP_NAME.match(n)]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"expected app names like a,b, got {text!r}")
    return names


def _label(text: str) -> tuple[str, str]:
    match = _LABEL.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return match.group(1), match.group(2)


def _scope(args: argparse.Namespace) -> Scope:
    labels = dict(args.labels)
    if len(labels) != len(args.labels):
        raise UsageError("--labels: a key is given twice with different values")
    return Scope(apps=args.apps, labels=tuple(sorted(labels.items())))


def _token_json(t: JoinToken, now: float) -> dict:
    return {"hash": t.token_hash, "type": t.kind, "created": iso(t.created),
            "expires": iso(t.expires), "expired": t.expires <= now,
            "uses_left": t.uses_left, "scope": t.scope.to_json(),
            **({"bot": t.bot} if t.kind == "bot" else {})}


def _join_snippet(secret: str, pin: str, proxy_addr: str) -> str:
    return (
        "Add this to the agent's agent.yaml (needed for its first start only):\n"
        "\n"
        f"# proxy_addr: {proxy_addr}   (the proxy's tunnel address, as agents reach it)\n"
        "join:\n"
        f'  token: "{secret}"\n'
        f'  ca_pin: "{pin}"\n'
    )


async def add_token(admin: Admin, args: argparse.Namespace) -> int:
    if args.type == "bot":
        raise UsageError("--type bot: a bot's token is made with its bot: "
                         "`apptunnel bots add NAME --roles ...` prints it")
    ttl = duration_arg("--ttl", args.ttl, MAX_TTL, "30d")
    config = admin.config
    ca = await admin.cluster_ca()
    scope = _scope(args)
    try:
        secret, token = await TokenAdmin(admin.services).create(
            admin.actor, ttl, args.uses, scope.apps, dict(scope.labels))
    except AdminError as err:
        raise cli_error(err) from None
    if args.format == "json":
        admin.io.out(json_text({"token": secret, "expires": iso(token.expires),
                                "ca_pin": ca.pin, "uses_left": token.uses_left,
                                "scope": token.scope.to_json()}))
        return 0
    proxy_addr = f"{config.public_host}:{config.tunnel_listen_port}"
    admin.io.out(
        f"Token:   {secret}\n"
        f"Type:    {token.kind}\n"
        f"Uses:    {token.uses_left}\n"
        f"Scope:   {describe_scope(token.scope)}\n"
        f"Expires: {iso(token.expires)} (in {human_duration(ttl)})\n"
        f"CA pin:  {ca.pin}\n"
        "\n" + _join_snippet(secret, ca.pin, proxy_addr)
    )
    return 0


async def list_tokens(admin: Admin, args: argparse.Namespace) -> int:
    now = admin.now()
    tokens = await TokenAdmin(admin.services).list()
    if args.format == "json":
        admin.io.out(json_text([_token_json(t, now) for t in tokens]))
        return 0
    if not tokens:
        admin.io.out("No join tokens.\n")
        return 0
    admin.io.out(table(
        ("HASH", "TYPE", "EXPIRES", "STATUS", "USES LEFT", "SCOPE"),
        [(t.token_hash[:_SHOWN_HASH], t.kind, iso(t.expires),
          "expired" if t.expires <= now else f"valid {human_duration(t.expires - now)}",
          "unlimited" if t.uses_left is None else t.uses_left,
          f"bot {t.bot}" if t.kind == "bot" else describe_scope(t.scope))
         for t in tokens],
    ))
    return 0


async def remove_token(admin: Admin, args: argparse.Namespace) -> int:
    """Remove by the secret itself or by an unambiguous prefix of its hash."""
    try:
        token = await TokenAdmin(admin.services).remove(admin.actor, args.token)
    except AdminError as err:
        raise cli_error(err) from None
    admin.io.out(f"Removed join token {token.token_hash[:_SHOWN_HASH]}.\n")
    return 0
