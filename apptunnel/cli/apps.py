"""`apptunnel apps ls`: the apps the logged-in user may open, asked with their certificate."""

from __future__ import annotations

import argparse
import time
from typing import Callable

from apptunnel.cli.context import CliError, Io
from apptunnel.cli.output import json_text, table
from apptunnel.cli.profile import require_profile

__all__ = ["add_parsers", "list_apps"]

_FIELDS = ("name", "type", "labels", "public_addr", "online")


def add_parsers(verbs: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    apps = verbs.add_parser("apps", parents=[common], help="apps you may open")
    sub = apps.add_subparsers(dest="action", metavar="ACTION", required=True)
    ls = sub.add_parser("ls", parents=[common], help="list the apps your roles allow")
    ls.add_argument("--format", choices=("text", "json"), default="text")
    ls.set_defaults(user_handler=list_apps)


def list_apps(args: argparse.Namespace, io: Io, now: Callable[[], float] = time.time) -> int:
    """GET /v1/apps with the profile's certificate and print name, type, labels, address, state."""
    profile = require_profile(io.environ, now())
    client = profile.client()
    try:
        code, answer = client.call("GET", "/v1/apps")
    finally:
        client.close()
    if code == 401:
        raise CliError(f"the proxy at {profile.proxy} did not accept your certificate: "
                       "run apptunnel login")
    if code != 200 or not isinstance(answer, dict) or not isinstance(answer.get("apps"), list):
        raise CliError(f"the proxy at {profile.proxy} could not list apps (HTTP {code})")
    apps = [_app(entry) for entry in answer["apps"] if isinstance(entry, dict)]
    if args.format == "json":
        io.out(json_text({"apps": apps}))
        return 0
    rows = [
        (app["name"], app["type"],
         ",".join(f"{k}={v}" for k, v in sorted(app["labels"].items())) or "-",
         app["public_addr"], "online" if app["online"] else "offline")
        for app in apps
    ]
    io.out(table(("NAME", "TYPE", "LABELS", "ADDRESS", "STATUS"), rows))
    return 0


def _app(entry: dict) -> dict:
    """Only the fields we show, with sane types whatever the proxy sent."""
    labels = entry.get("labels")
    return {
        "name": str(entry.get("name", "")),
        "type": str(entry.get("type", "http")),
        "labels": {str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {},
        "public_addr": str(entry.get("public_addr", "")),
        "online": entry.get("online") is True,
    }
