"""`apptunnel agents ls`: the agents that joined, what they may announce and serve now.

Read from the backend like every admin verb: each proxy writes an agent's connection
state (peer, apps, connected since) there when its tunnel comes and goes.
"""

from __future__ import annotations

import argparse

from apptunnel.admin import inventory
from apptunnel.auth.tokens import describe_scope
from apptunnel.backend.records import Agent
from apptunnel.cli.context import Admin
from apptunnel.cli.output import iso, json_text, table


def add_parsers(verbs: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    agents = verbs.add_parser("agents", parents=[common], help="agents that joined the cluster")
    sub = agents.add_subparsers(dest="action", metavar="ACTION", required=True)
    ls = sub.add_parser("ls", parents=[common], help="list agents: id, host, apps, connected since")
    ls.add_argument("--format", choices=("text", "json"), default="text")
    ls.set_defaults(handler=list_agents)


def _as_json(agent: Agent, locked: set[str]) -> dict:
    def when(t: float | None) -> str | None:
        return iso(t) if t is not None else None

    return {
        "id": agent.host_id,
        "host": agent.peer,
        "version": agent.version,
        "apps": list(agent.apps) if agent.connected_since is not None else [],
        "connected_since": when(agent.connected_since),
        # Every proxy holding a live tunnel of it (admin/inventory.py with_tunnels).
        "proxies": agent.proxy_id.split(",") if agent.connected_since is not None
        and agent.proxy_id else [],
        "last_seen": when(agent.last_seen),
        "joined": iso(agent.joined),
        "cert_expires": iso(agent.cert_expires),
        "scope": agent.scope.to_json(),
        "locked": agent.host_id in locked,
    }


async def list_agents(admin: Admin, args: argparse.Namespace) -> int:
    listed = await inventory.agents(admin.services)
    agents = [agent for agent, _ in listed]
    locked = {agent.host_id for agent, is_locked in listed if is_locked}
    rows = [_as_json(agent, locked) for agent in agents]
    if args.format == "json":
        admin.io.out(json_text(rows))
        return 0
    if not rows:
        admin.io.out("No agents.\n")
        return 0
    admin.io.out(table(
        ("ID", "HOST", "APPS", "CONNECTED SINCE", "CERT EXPIRES", "SCOPE", "LOCKED"),
        [(r["id"], r["host"] or "-", ",".join(r["apps"]) or "-", r["connected_since"] or "offline",
          r["cert_expires"], describe_scope(a.scope), "yes" if r["locked"] else "")
         for r, a in zip(rows, agents)],
    ))
    return 0
