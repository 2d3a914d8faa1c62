"""TunnelPool and AppEndpoint: which tunnel a stream rides on, draining, and errbacks only.

Real tunnel pairs on in-memory transports (tests/support/pump.py), as in test_connect_retry.
"""

from __future__ import annotations

from twisted.internet.defer import fail, succeed
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock

from apptunnel.proxy.pool import AppEndpoint, NoAgent, TunnelPool
from apptunnel.catalog import AppInfo
from apptunnel.proxy.registry import AgentRegistry
from apptunnel.tunnel.errors import StreamRefused
from apptunnel.tunnel.frames import ErrorCode
from tests.support.tunnel_pairs import APP, outcome, tunnel_pair


def two_tunnels():
    clock = Clock()
    proxy1, agent1, handler1, pump1 = tunnel_pair(clock)
    proxy2, agent2, handler2, pump2 = tunnel_pair(clock)
    pump1.flush()
    pump2.flush()
    registry = AgentRegistry()
    registry.add(proxy1, "agent-1", [APP])
    registry.add(proxy2, "agent-2", [APP])
    return registry, (proxy1, proxy2), (agent1, agent2), (pump1, pump2)


def test_the_pool_knows_which_tunnel_a_stream_rides_on_and_when_it_drains():
    """tunnel_of names the picked tunnel; draining turns true once that tunnel goes away."""
    registry, proxies, agents, pumps = two_tunnels()
    pool = TunnelPool(registry)
    drained = []
    pool.add_drain_listener(drained.append)
    result = outcome(pool.endpoint(APP, {"app": "echo"}).connect(Factory.forProtocol(Protocol)))
    for pump in pumps:
        pump.flush()
    [proto] = result
    tunnel = pool.tunnel_of(proto)
    assert tunnel in proxies and not pool.draining(proto)
    registry.drain(tunnel)
    tunnel.go_away("stopping")
    assert pool.draining(proto) and drained == [tunnel]
    assert pool.tunnel_of(Protocol()) is None and not pool.draining(Protocol())


def test_no_tunnel_is_no_agent_as_an_errback():
    """An app nobody serves: NoAgent arrives as an errback, nothing is raised."""
    pool = TunnelPool(AgentRegistry())
    result = outcome(pool(APP, {"app": "echo"}, Factory.forProtocol(Protocol)))
    assert result[0].check(NoAgent)


def test_a_changed_registration_is_never_picked():
    """A decision made on one definition of the app is not routed to another one."""
    registry, *_ = two_tunnels()
    other = AppInfo(name="echo", uri="http://127.0.0.1:10", public_addr="echo.apptunnel.localhost")
    result = outcome(TunnelPool(registry)(other, {"app": "echo"}, Factory.forProtocol(Protocol)))
    assert result[0].check(NoAgent)


def test_refusals_other_than_goaway_are_not_retried():
    """UNKNOWN_TARGET says something about the app: it reaches the caller as it is."""
    calls = []

    class Tunnel:
        going_away = False

        def connect_stream(self, target, factory):
            calls.append(target)
            return fail(StreamRefused(ErrorCode.UNKNOWN_TARGET, "no such port"))

    registry = AgentRegistry()
    registry.add(Tunnel(), "agent-1", [APP])
    registry.add(Tunnel(), "agent-2", [APP])
    result = outcome(TunnelPool(registry)(APP, {"app": "echo"}, Factory.forProtocol(Protocol)))
    assert result[0].check(StreamRefused) and len(calls) == 1


def test_an_app_endpoint_never_raises():
    """AppEndpoint is an IStreamClientEndpoint over any ConnectApp; a raise becomes an errback."""
    def broken(app, target, factory):
        raise RuntimeError("boom")

    endpoint = AppEndpoint(broken, APP, {"app": "echo"})
    assert IStreamClientEndpoint.providedBy(endpoint)
    assert outcome(endpoint.connect(Factory()))[0].check(RuntimeError)
    ok = AppEndpoint(lambda app, target, factory: succeed((app.name, target)), APP, {"p": 1})
    assert outcome(ok.connect(Factory())) == [("echo", {"p": 1})]


def _refusing_tunnels(codes):
    calls = []

    class Tunnel:
        going_away = False

        def __init__(self, code):
            self.code = code

        def connect_stream(self, target, factory):
            calls.append(self)
            if self.code is None:
                return succeed(Protocol())
            return fail(StreamRefused(self.code, "connection refused"))

    registry = AgentRegistry()
    tunnels = [Tunnel(code) for code in codes]
    for index, tunnel in enumerate(tunnels):
        registry.add(tunnel, f"agent-{index}", [APP])
    return registry, tunnels, calls


def test_an_agent_that_cannot_dial_the_app_fails_over_to_another():
    """CONNECT_FAILED (the agent's dial failed, nothing was sent) is tried on the next tunnel."""
    registry, tunnels, calls = _refusing_tunnels([ErrorCode.CONNECT_FAILED, None])
    result = outcome(TunnelPool(registry)(APP, {"app": "echo"}, Factory.forProtocol(Protocol)))
    assert isinstance(result[0], Protocol) and calls == tunnels


def test_failover_tries_each_tunnel_once_and_reports_the_last_refusal():
    """Three agents that all cannot dial: three opens, and the caller sees CONNECT_FAILED
    (a 502 with the reason), not NoAgent."""
    registry, tunnels, calls = _refusing_tunnels([ErrorCode.CONNECT_FAILED] * 3)
    result = outcome(TunnelPool(registry)(APP, {"app": "echo"}, Factory.forProtocol(Protocol)))
    assert result[0].check(StreamRefused) and result[0].value.code == ErrorCode.CONNECT_FAILED
    assert sorted(map(id, calls)) == sorted(map(id, tunnels))
