"""Opening an app stream retries on another tunnel when the first one is going away.

Two real tunnel pairs (proxy side and agent side) on in-memory transports; the pump
decides what crosses the wire when, so an OPEN can be made to cross the agent's GOAWAY.
"""

from __future__ import annotations

from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock

from apptunnel.proxy.pool import NoAgent, tunnel_connector
from apptunnel.proxy.registry import AgentRegistry
from tests.support.tunnel_pairs import APP, outcome, tunnel_pair


def test_open_crossing_goaway_is_retried_on_another_tunnel():
    """The agent's GOAWAY crosses our OPEN: the stream opens on the other agent instead."""
    clock = Clock()
    proxy1, agent1, handler1, pump1 = tunnel_pair(clock)
    proxy2, agent2, handler2, pump2 = tunnel_pair(clock)
    pump1.flush()
    pump2.flush()
    registry = AgentRegistry()
    registry.add(proxy1, "agent-1", [APP])
    registry.add(proxy2, "agent-2", [APP])
    connect = tunnel_connector(registry)

    agent1.go_away("stopping")  # GOAWAY is on the wire before our OPEN reaches agent 1
    result = outcome(connect(APP, {"app": "echo"}, Factory.forProtocol(Protocol)))
    for _ in range(20):
        pump1.step()
        pump2.step()

    assert handler1.opened == []
    assert handler2.opened == [{"app": "echo"}]
    assert len(result) == 1 and isinstance(result[0], Protocol)


def test_open_crossing_goaway_with_no_other_tunnel_is_no_agent():
    """With no other tunnel the open ends as NoAgent (503), not as a connect failure."""
    clock = Clock()
    proxy1, agent1, handler1, pump1 = tunnel_pair(clock)
    pump1.flush()
    registry = AgentRegistry()
    registry.add(proxy1, "agent-1", [APP])
    connect = tunnel_connector(registry)

    agent1.go_away("stopping")
    result = outcome(connect(APP, {"app": "echo"}, Factory.forProtocol(Protocol)))
    for _ in range(20):
        pump1.step()

    assert handler1.opened == []
    assert len(result) == 1 and result[0].check(NoAgent)
