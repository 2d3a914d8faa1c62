"""`apptunnel apps ls|config`: the apps the logged-in user may open, asked with their
certificate, and how to call one directly with that certificate (curl and friends).

`apps ls --admin` is the operator's view, read from the backend like every admin verb
(``--config``): every app an agent announced or an app resource defines, with the agents
serving it and their state (connected, draining, gone).
"""

from __future__ import annotations

import argparse
import os
import shlex
import time
from typing import Callable

from apptunnel.admin import inventory
from apptunnel.cli.context import Admin, CliError, Io
from apptunnel.cli.output import iso, json_text, table
from apptunnel.cli.profile import TRUST_INSECURE, TRUST_PINNED, Profile, home_dir, require_profile

__all__ = ["add_parsers", "app_config", "list_apps"]

_FIELDS = ("name", "type", "labels", "public_addr", "online")


def add_parsers(verbs: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    apps = verbs.add_parser("apps", parents=[common], help="apps you may open")
    sub = apps.add_subparsers(dest="action", metavar="ACTION", required=True)
    ls = sub.add_parser("ls", parents=[common], help="list the apps your roles allow")
    ls.add_argument("--format", choices=("text", "json"), default="text")
    ls.add_argument("--admin", action=_AdminView, nargs=0,
                    help="operator view from the backend (--config): every app, the agents "
                         "serving it and their state")
    ls.set_defaults(user_handler=list_apps)
    config = sub.add_parser("config", parents=[common],
                            help="how to call an HTTP app directly with your certificate")
    config.add_argument("name", metavar="NAME", help="the app")
    config.add_argument("--format", choices=("curl", "text", "json"), default="curl")
    config.set_defaults(user_handler=app_config)


class _AdminView(argparse.Action):
    """``--admin`` turns `apps ls` into an admin verb (backend, not the user's login)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        namespace.user_handler = None
        namespace.handler = list_apps_admin


async def list_apps_admin(admin: Admin, args: argparse.Namespace) -> int:
    """Every app (announced by an agent, or an app resource) and who serves it."""
    rows = [
        {**row, "agents": [{"id": a.host_id, "state": inventory.agent_state(a), "host": a.peer,
                            "last_seen": iso(a.last_seen) if a.last_seen is not None else None}
                           for a in row["agents"]]}
        for row in await inventory.apps(admin.services)
    ]
    if args.format == "json":
        admin.io.out(json_text({"apps": rows}))
        return 0
    if not rows:
        admin.io.out("No apps.\n")
        return 0
    admin.io.out(table(("NAME", "SOURCE", "LABELS", "AGENTS"), [
        (row["name"], "resource" if row["resource"] else "agent",
         ",".join(f"{k}={v}" for k, v in sorted(row["labels"].items())) or "-",
         " ".join(f"{a['id']}({a['state']})" for a in row["agents"]) or "-")
        for row in rows
    ]))
    return 0


def list_apps(args: argparse.Namespace, io: Io, now: Callable[[], float] = time.time) -> int:
    """GET /v1/apps with the profile's certificate and print name, type, labels, address, state."""
    apps = _fetch_apps(require_profile(io.environ, now()))
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


def app_config(args: argparse.Namespace, io: Io, now: Callable[[], float] = time.time) -> int:
    """Print the app's public URL and the profile files to call it with (the app host
    accepts the user certificate in place of a browser session)."""
    profile = require_profile(io.environ, now())
    app = next((a for a in _fetch_apps(profile) if a["name"] == args.name), None)
    if app is None:
        raise CliError(f"no app named {args.name!r} that you may open (see apptunnel apps ls)")
    if app["type"] == "tcp":
        raise CliError(f"{args.name} is a TCP app: use apptunnel proxy app {args.name}")
    home = os.path.abspath(home_dir(io.environ))
    config = {
        "name": app["name"],
        "url": f"https://{app['public_addr']}/",
        "ca": os.path.join(home, "ca.crt") if profile.trust == TRUST_PINNED else None,
        "cert": os.path.join(home, "user.crt"),
        "key": os.path.join(home, "user.key"),
        "insecure": profile.trust == TRUST_INSECURE,
        "expires": iso(profile.expires),
    }
    if args.format == "json":
        io.out(json_text(config))
    elif args.format == "text":
        io.out(_config_text(config, profile))
    else:
        argv = ["curl"]
        if config["insecure"]:
            argv.append("--insecure")
        if config["ca"]:
            argv += ["--cacert", config["ca"]]
        argv += ["--cert", config["cert"], "--key", config["key"], config["url"]]
        io.out(shlex.join(argv) + "\n")
    return 0


def _config_text(config: dict, profile: Profile) -> str:
    trust = config["ca"] or ("none (--insecure login)" if config["insecure"] else "the system store")
    return (
        f"Name:   {config['name']}\n"
        f"URL:    {config['url']}\n"
        f"CA:     {trust}\n"
        f"Cert:   {config['cert']}\n"
        f"Key:    {config['key']}\n"
        f"Valid:  until {iso(profile.expires)}\n"
    )


def _fetch_apps(profile: Profile) -> list[dict]:
    """GET /v1/apps with the profile's certificate: the apps the user may open."""
    client = profile.client()
    try:
        code, answer = client.call("GET", "/v1/apps")
    finally:
        client.close()
    if code == 401:
        raise CliError(f"the proxy at {profile.proxy} did not accept your certificate: "
                       "run apptunnel login")
    if code == 403 and isinstance(answer, dict) and isinstance(answer.get("error"), str):
        # A lock or a removed account: say so rather than a bare status.
        raise CliError(f"the proxy at {profile.proxy} refused: {answer['error'][:300]}")
    if code != 200 or not isinstance(answer, dict) or not isinstance(answer.get("apps"), list):
        raise CliError(f"the proxy at {profile.proxy} could not list apps (HTTP {code})")
    return [_app(entry) for entry in answer["apps"] if isinstance(entry, dict)]


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
