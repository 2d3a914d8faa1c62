"""`apptunnel auth rotate --type jwt` and `apptunnel auth status`: the cluster's keys.

The keys are rows in the backend (auth/keystore.py), so like every admin verb these need
no running proxy: a rotation is stored with its times, every proxy publishes the new key
at its next poll (the local one at once, through the control socket), switches to it when
its time comes and drops the old one after its last token expired.

`--type user-ca` stores a new user CA (auth/keystore.py rotate_ca): every proxy trusts it
within a poll, it signs user and bot certificates from CA_PUBLISH_DELAY on, and the old
one stays trusted for `--grace-period` (default 30h, at least the config's
ca_min_grace_period) after that, then certificates it signed are refused.
`--type host-ca` the same way for the host CA: agents are sent the new CA at once (the
`trust` message) and renew onto it once it issues; proxies keep presenting a server
certificate of the old one until the grace ends, then switch, when every agent and every
CLI or bot that heard of the rotation trusts the new one.
"""

from __future__ import annotations

import argparse

from apptunnel.auth.ca_rotation import grace_period
from apptunnel.auth.keystore import CA_KINDS, KIND_JWT, KeyStoreError, is_sealed
from apptunnel.cli.context import Admin, CliError, UsageError, duration_arg
from apptunnel.cli.output import human_duration, iso, json_text, table

TYPES = ("jwt", "user-ca", "host-ca")


def add_parsers(verbs: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    auth = verbs.add_parser("auth", parents=[common], help="the cluster's keys: rotate, status")
    sub = auth.add_subparsers(dest="action", metavar="ACTION", required=True)
    rotate = sub.add_parser("rotate", parents=[common],
                            help="rotate a cluster key (JWT signing key) without downtime")
    rotate.add_argument("--type", required=True, choices=TYPES, help="which key to rotate")
    rotate.add_argument("--grace-period", metavar="DURATION",
                        help="CA rotation: how long the old CA stays trusted after the new "
                             "one starts issuing (default 30h)")
    rotate.add_argument("--format", choices=("text", "json"), default="text")
    rotate.set_defaults(handler=rotate_key)
    for name in ("status", "ls"):
        status = sub.add_parser(name, parents=[common], help="list the keys and their states")
        status.add_argument("--format", choices=("text", "json"), default="text")
        status.set_defaults(handler=key_status)


async def rotate_key(admin: Admin, args: argparse.Namespace) -> int:
    if args.type != "jwt":
        return await rotate_ca(admin, args)
    if args.grace_period is not None:
        raise UsageError("--grace-period: only for --type user-ca|host-ca (a JWT key is kept "
                         "until its last token expired)")
    try:
        plan = await admin.keystore().rotate_jwt(admin.config.jwt_ttl)
    except KeyStoreError as err:
        admin.emit("auth.rotate", "jwt", outcome="failure", reason=str(err))
        raise CliError(str(err)) from None
    admin.emit("auth.rotate", "jwt", old_key=plan.old_id, new_key=plan.new_id,
               activate_at=iso(plan.activate_at), retire_at=iso(plan.retire_at))
    await admin.refresh_proxy()
    if args.format == "json":
        admin.io.out(json_text({"type": "jwt", "old_key": plan.old_id, "new_key": plan.new_id,
                                "published_at": iso(plan.published_at),
                                "activate_at": iso(plan.activate_at),
                                "retire_at": iso(plan.retire_at)}))
        return 0
    now = admin.now()
    admin.io.out(
        f"New JWT signing key {plan.new_id}:\n"
        f"  {'now':<{len(iso(now))}}  published in the JWKS of every proxy (within a poll)\n"
        f"  {iso(plan.activate_at)}  signs every new token "
        f"(in {human_duration(plan.activate_at - now)})\n"
        f"  {iso(plan.retire_at)}  old key {plan.old_id} leaves the JWKS, its last token "
        f"expired (in {human_duration(plan.retire_at - now)})\n")
    return 0


async def rotate_ca(admin: Admin, args: argparse.Namespace) -> int:
    """A new CA for one role; the old one trusted until the grace after it issues ends."""
    wanted = duration_arg("--grace-period", args.grace_period)
    try:
        grace = grace_period(wanted, admin.config.ca_min_grace_period)
    except ValueError as err:
        raise UsageError(f"--grace-period: {err} (ca_min_grace_period in "
                         f"{admin.config.path})") from None
    try:
        plan = await admin.keystore().rotate_ca(CA_KINDS[args.type], grace)
    except KeyStoreError as err:
        admin.emit("auth.rotate", args.type, outcome="failure", reason=str(err))
        raise CliError(str(err)) from None
    admin.emit("auth.rotate", args.type, old_key=plan.old_id, new_key=plan.new_id,
               activate_at=iso(plan.activate_at), retire_at=iso(plan.retire_at))
    await admin.refresh_proxy()
    if args.format == "json":
        admin.io.out(json_text({"type": args.type, "old_key": plan.old_id,
                                "new_key": plan.new_id, "published_at": iso(plan.published_at),
                                "activate_at": iso(plan.activate_at),
                                "retire_at": iso(plan.retire_at)}))
        return 0
    now = admin.now()
    if args.type == "user-ca":
        trusted, signs = "trusted by every proxy", "signs every new user and bot certificate"
        retired = "is no longer trusted: certificates it signed are refused"
    else:
        trusted = "trusted by every proxy and sent to every connected agent"
        signs = "signs agent certificates: agents renew onto it"
        retired = ("is no longer trusted; proxies present certificates of the new CA "
                   "(give new join tokens' ca_pin)")
    admin.io.out(
        f"New {args.type} {plan.new_id}:\n"
        f"  {'now':<{len(iso(now))}}  {trusted} (within a poll)\n"
        f"  {iso(plan.activate_at)}  {signs} (in {human_duration(plan.activate_at - now)})\n"
        f"  {iso(plan.retire_at)}  old CA {plan.old_id} {retired} "
        f"(in {human_duration(plan.retire_at - now)})\n")
    return 0


async def key_status(admin: Admin, args: argparse.Namespace) -> int:
    store = admin.keystore()
    try:
        await store.load()
        await store.settle(KIND_JWT, *CA_KINDS.values())
    except KeyStoreError as err:
        raise CliError(str(err)) from None
    rows = await admin.backend.list_keys()
    if args.format == "json":
        admin.io.out(json_text([{
            "kind": r.kind, "id": r.id, "state": r.state, "created": iso(r.created),
            "activate_at": iso(r.activate_at) if r.activate_at is not None else None,
            "retire_at": iso(r.retire_at) if r.retire_at is not None else None,
            "encrypted": is_sealed(r)} for r in rows]))
        return 0
    admin.io.out(table(
        ("KIND", "ID", "STATE", "SIGNS FROM", "RETIRES", "ENCRYPTED"),
        [(r.kind, r.id, r.state, iso(r.activate_at) if r.activate_at is not None else "-",
          iso(r.retire_at) if r.retire_at is not None else "-",
          "yes" if is_sealed(r) else "no") for r in rows]))
    return 0
