"""Draining an agent: after its GOAWAY the proxy picks its tunnel no more, lets idle
keep-alive streams go at once, and lets streams in the middle of a response finish, so
stopping the agent takes far less than its drain timeout.

Real pieces on loopback: the forwarder environment (edge + AppForwarder + upstream app),
the proxy's TLS tunnel listener sharing its registry, and a real AgentService.
"""

from __future__ import annotations

import pytest_twisted
from twisted.internet import reactor

from apptunnel.agent.service import DRAIN_TIMEOUT, AgentService
from apptunnel.config import AppConfig
from apptunnel.proxy.pool import tunnel_connector
from apptunnel.catalog import AppInfo
from apptunnel.proxy.registry import AgentRegistry
from tests.support.tunnel_env import Proxy, agent_config
from tests.support.forward_env import PUBLIC, request_bytes, running_forward_env
from tests.support.waiting import until, wait

APP = "slow"
HOST = f"{APP}.{PUBLIC}"
PROMPT = 3.0  # well under DRAIN_TIMEOUT: what "promptly" means here


async def _setup(tmp_path, e):
    """Wire a tunnel listener onto the env's registry and start an agent serving APP."""
    proxy = Proxy(tmp_path)
    proxy.factory.registry = e.registry
    e.forwarder.connect_app = tunnel_connector(e.registry)
    proxy.audit.start()
    await proxy.listen()
    apps = (AppConfig(APP, f"http://127.0.0.1:{e.up_port}", {"env": "dev"}, None),)
    config = agent_config(tmp_path, proxy, token=await proxy.token(), pin=proxy.ca.pin, apps=apps)
    agent = AgentService(config, reactor)
    agent.startService()
    tunnel = await until(lambda: e.registry.pick(APP), "the agent's tunnel to register")
    return proxy, agent, tunnel


async def _teardown(proxy, agent):
    if agent.running:
        await wait(agent.stopService(), DRAIN_TIMEOUT + 5)
    await proxy.port.stopListening()
    await wait(proxy.audit.stop())
    await wait(proxy.backend.close())


def _get(path: str, cookie: str) -> bytes:
    return request_bytes(path=path, host=HOST, headers=[("Cookie", f"__Host-apptunnel_app={cookie}")])


@pytest_twisted.ensureDeferred
async def test_idle_keep_alive_stream_is_let_go(tmp_path):
    """GOAWAY closes an idle keep-alive stream at once, so the agent stops quickly."""
    async with running_forward_env(tmp_path) as e:
        proxy, agent, tunnel = await _setup(tmp_path, e)
        try:
            cookie = await e.app_cookie("alice", APP)
            client = await e.connect()
            head, _ = await client.request(_get("/echo", cookie))
            assert head.status == 200
            assert tunnel.stream_count == 1  # kept open for the next request

            # stopService fires once the agent's tunnel connection is closed.
            started = reactor.seconds()
            await wait(agent.stopService(), PROMPT)
            assert reactor.seconds() - started < PROMPT
            assert tunnel.going_away and tunnel.stream_count == 0
            assert e.registry.pick(APP) is None
            assert not e.registry.is_online(APP)

            # The client connection itself stayed usable: the next request finds no agent.
            head, _ = await client.request(_get("/echo", cookie))
            assert head.status == 503
            client.transport.loseConnection()
            await wait(client.closed)
        finally:
            await _teardown(proxy, agent)


@pytest_twisted.ensureDeferred
async def test_response_in_flight_finishes(tmp_path):
    """A response in flight during GOAWAY completes fully; the tunnel closes after it."""
    async with running_forward_env(tmp_path) as e:
        proxy, agent, tunnel = await _setup(tmp_path, e)
        try:
            cookie = await e.app_cookie("alice", APP)
            client = await e.connect()
            response = client.request(_get("/sse", cookie))
            await client.wait_for(b"data: first")

            stopping = agent.stopService()
            await until(lambda: tunnel.going_away, "the GOAWAY to reach the proxy", PROMPT)
            assert e.registry.pick(APP) is None  # no new stream on the draining tunnel
            assert not stopping.called  # the stream in flight holds the tunnel open
            assert tunnel.stream_count == 1

            e.events.release.callback(None)
            head, body = await response
            assert head.status == 200
            assert b"data: first" in body and b"data: last" in body
            assert body.endswith(b"0\r\n\r\n")  # relayed to its last chunk
            await wait(stopping, PROMPT)  # fires once the agent's tunnel has closed
            assert tunnel.stream_count == 0
        finally:
            await _teardown(proxy, agent)


class _Tunnel:
    going_away = False


def test_registry_skips_and_drains_going_away_tunnels():
    """pick never returns a going-away tunnel; drain removes it and tells listeners."""
    registry = AgentRegistry()
    old, new = _Tunnel(), _Tunnel()
    app = AppInfo(name=APP, uri="http://127.0.0.1:1", public_addr=HOST)
    registry.add(old, "a1", [app])
    registry.add(new, "a2", [app])
    old.going_away = True
    assert {registry.pick(APP) for _ in range(4)} == {new}
    drained = []
    registry.add_drain_listener(drained.append)
    registry.drain(new)
    assert drained == [new]
    registry.drain(old)
    registry.remove(old)  # tunnel_lost after drain: harmless
    assert drained == [new, old]
    assert registry.pick(APP) is None
    assert registry.app(APP) == app and not registry.is_online(APP)  # known, offline
