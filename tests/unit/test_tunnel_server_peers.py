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
