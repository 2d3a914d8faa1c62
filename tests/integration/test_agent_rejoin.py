"""An agent the backend does not know (it joined before agent records existed) is refused
at hello with one line, and joins again by itself when its config still has a token.
Real loopback TLS between a real AgentService and the proxy's tunnel listener."""

from __future__ import annotations

import sqlite3

import pytest_twisted
from twisted.internet import reactor
from twisted.logger import globalLogPublisher

from apptunnel.agent.service import AgentService
from apptunnel.config import AppConfig
from tests.support.tunnel_env import agent_config, echo_port, proxy  # noqa: F401 - fixtures
from tests.support.waiting import until, wait


def forget_agents(proxy) -> None:  # noqa: F811
    """What an upgrade from schema 2 looks like to a proxy: certificates, no agent rows."""
    conn = sqlite3.connect(proxy.backend.path, timeout=5)
    try:
        conn.execute("DELETE FROM agents")
        conn.commit()
    finally:
        conn.close()


@pytest_twisted.ensureDeferred
async def test_unknown_agent_with_a_token_joins_again(tmp_path, proxy, echo_port):  # noqa: F811
    """Refused as unknown (rejoin), the agent joins with its configured token and serves."""
    apps = (AppConfig("echo", f"http://127.0.0.1:{echo_port}", {}, None),)
    token = await proxy.token()
    config = agent_config(tmp_path, proxy, token=token, pin=proxy.ca.pin, apps=apps)
    agent = AgentService(config, reactor)
    agent.startService()
    try:
        await until(lambda: proxy.registry.is_online("echo"), "the first registration")
    finally:
        await wait(agent.stopService())
    await until(lambda: not proxy.registry.is_online("echo"), "the app to go offline")
    forget_agents(proxy)

    events = []
    globalLogPublisher.addObserver(events.append)
    again = AgentService(config, reactor)
    again.startService()
    try:
        await until(lambda: proxy.registry.is_online("echo"), "the agent to join again",
                    timeout=15)
    finally:
        await wait(again.stopService())
        globalLogPublisher.removeObserver(events.append)
    assert not [e for e in events if "log_failure" in e], "a traceback was logged"
    assert [e.code for e in await proxy.joins()] == ["T3100I", "T3100I"]
