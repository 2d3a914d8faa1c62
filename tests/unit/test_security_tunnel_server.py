"""Security review of the tunnel listener's hello: an agent cannot take another app's host.

An app's public host is where browsers send that app's session cookies and where the JWT
audience points. Before the fix, an agent could announce an app of its own under the
public address of another agent's app; while that app's agent was away (restart,
network) the host, its users and their audience-bound tokens went to the newcomer.
"""

from __future__ import annotations

import pytest_twisted

from tests.unit.test_tunnel_server import AgentSide, agent_cert, hello, settle, world  # noqa: F401

GRAFANA_HOST = "grafana.apptunnel.localhost:3080"


def thief_hello(public_addr: str) -> dict:
    return hello(host_id="host-2", apps=[{"name": "thief", "uri": "http://127.0.0.1:9",
                                          "labels": {"env": "dev"}, "public_addr": public_addr}])


@pytest_twisted.ensureDeferred
async def test_agent_cannot_claim_host_of_an_offline_app(world):  # noqa: F811
    """A hello naming the public host of a known (offline) app of another name is refused."""
    owner = AgentSide(hello())
    pump = world.connect(owner, agent_cert(world))
    await settle(pump, lambda: owner.controls, "hello_ok")
    pump.client_transport.loseConnection()
    pump.flush()
    assert not world.registry.is_online("grafana")

    thief = AgentSide(thief_hello("GRAFANA.apptunnel.localhost:443"))
    await settle(world.connect(thief, agent_cert(world, "host-2")),
                 lambda: thief.lost is not None, "close")
    assert thief.controls == []
    assert world.registry.app("thief") is None
    assert world.registry.app_by_host(GRAFANA_HOST).name == "grafana"


@pytest_twisted.ensureDeferred
async def test_agent_cannot_claim_host_of_an_online_app(world):  # noqa: F811
    """A hello naming the public host of another online app is refused; the owner keeps it."""
    owner = AgentSide(hello())
    await settle(world.connect(owner, agent_cert(world)), lambda: owner.controls, "hello_ok")
    thief = AgentSide(thief_hello(GRAFANA_HOST))
    await settle(world.connect(thief, agent_cert(world, "host-2")),
                 lambda: thief.lost is not None, "close")
    assert thief.controls == [] and world.registry.app("thief") is None


@pytest_twisted.ensureDeferred
async def test_two_apps_of_one_hello_cannot_share_a_host(world):  # noqa: F811
    """One hello cannot give two of its apps the same public host."""
    agent = AgentSide(hello(apps=[
        {"name": "a", "uri": "http://127.0.0.1:1", "public_addr": "shared.example.com"},
        {"name": "b", "uri": "http://127.0.0.1:2", "public_addr": "Shared.example.com:8443"},
    ]))
    await settle(world.connect(agent, agent_cert(world)), lambda: agent.lost is not None, "close")
    assert agent.controls == [] and world.registry.apps() == []


@pytest_twisted.ensureDeferred
async def test_same_app_may_come_back_and_another_agent_may_serve_it(world):  # noqa: F811
    """The owner of a host can re-register it, and a second agent of the same app is fine."""
    first = AgentSide(hello())
    pump = world.connect(first, agent_cert(world))
    await settle(pump, lambda: first.controls, "hello_ok")
    second = AgentSide(hello(host_id="host-2"))
    await settle(world.connect(second, agent_cert(world, "host-2")), lambda: second.controls, "hello_ok")
    pump.client_transport.loseConnection()
    pump.flush()
    again = AgentSide(hello())
    await settle(world.connect(again, agent_cert(world)), lambda: again.controls, "hello_ok")
    assert world.registry.app_by_host(GRAFANA_HOST).name == "grafana"
