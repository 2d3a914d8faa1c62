"""What the cluster runs, as storage records it: agents (and whether a lock holds each)
and apps (announced by agents or defined as resources) with the agents serving them.
Read by ``apptunnel agents ls``, ``apptunnel apps ls --admin`` and the admin API/pages."""

from __future__ import annotations

from apptunnel.admin.context import AdminContext
from apptunnel.backend.records import Agent


def agent_state(agent: Agent) -> str:
    if agent.connected_since is None:
        return "gone"
    return "draining" if agent.draining else "connected"


async def agents(ctx: AdminContext) -> list[tuple[Agent, bool]]:
    """Every agent that joined, with whether a lock on it is in force."""
    found = await ctx.backend.list_agents()
    locked = {lock.agent for lock in await ctx.backend.list_locks(ctx.now()) if lock.agent}
    return [(agent, agent.host_id in locked) for agent in found]


async def apps(ctx: AdminContext) -> list[dict]:
    """Every app an agent announced or a resource defines: name, ``resource``, labels (of
    the resource), and ``agents`` (the Agent records serving it), by name."""
    found = await ctx.backend.list_agents()
    resources = {r.name: r.doc for r in await ctx.backend.list_resources("app")}
    rows = []
    for name in sorted(set(resources) | {name for a in found for name in a.apps}):
        labels = ((resources.get(name) or {}).get("metadata") or {}).get("labels") or {}
        rows.append({"name": name, "resource": name in resources,
                     "labels": {str(k): str(v) for k, v in labels.items()},
                     "agents": [a for a in found if name in a.apps]})
    return rows
