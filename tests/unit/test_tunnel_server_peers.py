"""The tunnel server tells each registered agent the live proxies (the ``proxies``
message): after hello_ok, again on every change, never before hello_ok or after loss."""

from __future__ import annotations

import pytest_twisted

from apptunnel.proxy.peers import Peers
from tests.support.tunnel_server_world import (  # noqa: F401 - world is a fixture
    AgentSide,
    enrolled,
    hello,
    settle,
    world,
)


@pytest_twisted.ensureDeferred
async def test_agents_hear_the_live_proxies_after_hello_ok_and_on_each_change(world):
    peers = Peers(world.backend, world.clock, "p-1", "127.0.0.1:3024", "1")
    world.factory.peers = peers
    await peers.beat()
    agent = AgentSide(hello())
    pump = world.connect(agent, await enrolled(world))
    await settle(pump, lambda: len(agent.controls) >= 2, "hello_ok and proxies")
    assert agent.controls[0]["type"] == "hello_ok"
    assert agent.controls[1] == {"type": "proxies",
                                 "proxies": [{"proxy_id": "p-1", "addr": "127.0.0.1:3024"}]}
    other = Peers(world.backend, world.clock, "p-2", "127.0.0.2:3024", "1")
    await other.beat()
    await peers.beat()
    await settle(pump, lambda: len(agent.controls) >= 3, "the changed set")
    assert [p["proxy_id"] for p in agent.controls[2]["proxies"]] == ["p-1", "p-2"]
    await peers.beat()          # unchanged: nothing sent
    pump.flush()
    assert len(agent.controls) == 3
    pump.client_transport.loseConnection()
    pump.flush()
    await other.stop()
    await peers.beat()          # the lost tunnel's session no longer listens
    pump.flush()
    assert len(agent.controls) == 3


@pytest_twisted.ensureDeferred
async def test_a_tunnel_outlives_its_certificate_when_the_agent_renewed_over_another_proxy(world):
    """The agent renewed over another proxy's tunnel (its record's cert_expires moved on,
    same key): at the old certificate's expiry this tunnel stays, and is cut when the
    renewed one expires unrenewed; a lock in between would cut it at the check too."""
    agent = AgentSide(hello())
    pump = world.connect(agent, await enrolled(world, ttl=60.0))
    await settle(pump, lambda: agent.controls, "hello_ok")
    record = await world.backend.get_agent("host-1")
    await world.backend.update_agent("host-1", cert_expires=record.cert_expires + 600)
    await advance(world, pump, 61)
    assert agent.lost is None and world.registry.pick("grafana") is pump.server
    await advance(world, pump, 600)
    assert agent.lost is not None


@pytest_twisted.ensureDeferred
async def test_without_a_renewal_elsewhere_the_tunnel_is_cut_at_expiry(world):
    """No newer certificate recorded: cut when the hello's certificate expires."""
    agent = AgentSide(hello())
    pump = world.connect(agent, await enrolled(world, ttl=60.0))
    await settle(pump, lambda: agent.controls, "hello_ok")
    await advance(world, pump, 61)
    assert agent.lost is not None


async def advance(world, pump, seconds: int) -> None:
    """Second by second, the pump flushed each time, so keep-alives flow."""
    for _ in range(seconds):
        world.clock.advance(1)
        await settle(pump, lambda: True, "a second")
