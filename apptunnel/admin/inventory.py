"""What the cluster runs, as storage records it: agents (and whether a lock holds each)
and apps (announced by agents or defined as resources) with the agents serving them.
Read by ``apptunnel agents ls``, ``apptunnel apps ls --admin`` and the admin API/pages."""

from __future__ import annotations

import attrs

from apptunnel.admin.context import AdminContext
from apptunnel.backend.records import PROXY_STALE_AFTER, Agent, AgentTunnel, ProxyRecord


def agent_state(agent: Agent) -> str:
    if agent.connected_since is None:
        return "gone"
    return "draining" if agent.draining else "connected"


def with_tunnels(agent: Agent, tunnels: list[AgentTunnel], proxies: list[ProxyRecord],
                 now: float) -> Agent:
    """The agent as its live tunnels say (several proxies): ``proxy_id`` lists every proxy
    holding a tunnel of it (comma-separated), ``connected_since`` is its oldest live
    tunnel. A tunnel recorded by a proxy whose heartbeat went stale (killed), or by an
    earlier run of a proxy (before its ``started``), is not live; one recorded by a proxy
    that never registered (a single proxy on an ephemeral port)
    is taken at its word."""
    stale = {p.proxy_id for p in proxies if p.heartbeat < now - PROXY_STALE_AFTER}
    started = {p.proxy_id: p.started for p in proxies}
    live = sorted((t for t in tunnels if t.host_id == agent.host_id and t.proxy_id not in stale
                   and t.since >= started.get(t.proxy_id, t.since)),
                  key=lambda t: t.proxy_id)
    if not live:
        if agent.connected_since is not None and agent.proxy_id in stale:
            return attrs.evolve(agent, connected_since=None)
        return agent
    return attrs.evolve(agent, proxy_id=",".join(t.proxy_id for t in live),
                        connected_since=min(t.since for t in live))


async def _listed(ctx: AdminContext) -> list[Agent]:
    found = await ctx.backend.list_agents()
    tunnels = await ctx.backend.list_agent_tunnels()
    proxies = await ctx.backend.list_proxies(0.0)
    return [with_tunnels(agent, tunnels, proxies, ctx.now()) for agent in found]


async def agents(ctx: AdminContext) -> list[tuple[Agent, bool]]:
    """Every agent that joined, with whether a lock on it is in force."""
    found = await _listed(ctx)
    locked = {lock.agent for lock in await ctx.backend.list_locks(ctx.now()) if lock.agent}
    return [(agent, agent.host_id in locked) for agent in found]


async def apps(ctx: AdminContext) -> list[dict]:
    """Every app an agent announced or a resource defines: name, ``resource``, labels (of
    the resource), and ``agents`` (the Agent records serving it), by name."""
    found = await _listed(ctx)
    resources = {r.name: r.doc for r in await ctx.backend.list_resources("app")}
    rows = []
    for name in sorted(set(resources) | {name for a in found for name in a.apps}):
        labels = ((resources.get(name) or {}).get("metadata") or {}).get("labels") or {}
        rows.append({"name": name, "resource": name in resources,
                     "labels": {str(k): str(v) for k, v in labels.items()},
                     "agents": [a for a in found if name in a.apps]})
    return rows
