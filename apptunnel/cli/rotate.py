"""`apptunnel auth rotate --type jwt` and `apptunnel auth status`: the cluster's keys.

The keys are rows in the backend (auth/keystore.py), so like every admin verb these need
no running proxy: a rotation is stored with its times, every proxy publishes the new key
at its next poll (the local one at once, through the control socket), switches to it when
its time comes and drops the old one after its last token expired. CA rotation
(`--type user-ca|host-ca`) is not built yet and is refused rather than half done.
"""

from __future__ import annotations

import argparse

from apptunnel.auth.keystore import KeyStoreError, is_sealed
from apptunnel.cli.context import Admin, CliError, UsageError
from apptunnel.cli.output import human_duration, iso, json_text, table

TYPES = ("jwt", "user-ca", "host-ca")


def add_parsers(verbs: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    auth = verbs.add_parser("auth", parents=[common], help="the cluster's keys: rotate, status")
    sub = auth.add_subparsers(dest="action", metavar="ACTION", required=True)
    rotate = sub.add_parser("rotate", parents=[common],
                            help="rotate a cluster key (JWT signing key) without downtime")
    rotate.add_argument("--type", required=True, choices=TYPES, help="which key to rotate")
    rotate.add_argument("--format", choices=("text", "json"), default="text")
    rotate.set_defaults(handler=rotate_key)
    for name in ("status", "ls"):
        status = sub.add_parser(name, parents=[common], help="list the keys and their states")
        status.add_argument("--format", choices=("text", "json"), default="text")
        status.set_defaults(handler=key_status)


async def rotate_key(admin: Admin, args: argparse.Namespace) -> int:
    if args.type != "jwt":
        raise UsageError(f"--type {args.type}: not supported yet (CA rotation is planned; "
                         f"only --type jwt rotates today)")
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


async def key_status(admin: Admin, args: argparse.Namespace) -> int:
    store = admin.keystore()
    try:
        await store.load()
        await store.settle()
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
