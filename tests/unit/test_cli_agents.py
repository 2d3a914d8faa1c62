"""`apptunnel agents ls` and `apptunnel lock --agent`, in-process against a real SQLite file."""

from __future__ import annotations

import json

import pytest
import pytest_twisted

from apptunnel.backend.records import Agent, Scope
from tests.support.cli_admin import cli, one_error, stored


@pytest.fixture
def config_path(tmp_path) -> str:
    path = tmp_path / "proxy.yaml"
    path.write_text("cluster_name: t\ndata_dir: data\npublic_addr: apptunnel.localhost:3080\n"
                    "tunnel_listen_addr: 127.0.0.1:3024\n")
    return str(path)


async def put(config_path, agent):
    await stored(config_path, lambda b: b.put_agent(agent))


@pytest_twisted.ensureDeferred
async def test_agents_ls_shows_id_host_apps_connected_since_and_locks(config_path):
    """JSON and text list each agent; apps only while connected; a lock shows."""
    await put(config_path, Agent("host-a", Scope(apps=("grafana",)), 1.0e9, 2.0e9, "sha256:a",
                                 last_seen=1.5e9, connected_since=1.5e9, peer="10.0.0.5:4711",
                                 proxy_id="p1", apps=("grafana",)))
    await put(config_path, Agent("host-b", Scope(), 1.0e9, 2.0e9, "sha256:b",
                                 last_seen=1.4e9, apps=("wiki",)))
    assert (await cli(config_path, "lock", "--agent", "host-b")).code == 0
    rows = {r["id"]: r for r in json.loads((await cli(config_path, "agents", "ls",
                                                      "--format", "json")).out)}
    a, b = rows["host-a"], rows["host-b"]
    assert (a["host"], a["apps"], a["locked"]) == ("10.0.0.5:4711", ["grafana"], False)
    assert a["connected_since"] == "2017-07-14T02:40:00Z"
    assert a["scope"] == {"apps": ["grafana"], "labels": {}}
    assert (b["apps"], b["connected_since"], b["locked"]) == ([], None, True)
    text = (await cli(config_path, "agents", "ls")).out
    assert "10.0.0.5:4711" in text and "apps grafana" in text and "offline" in text


@pytest_twisted.ensureDeferred
async def test_lock_agent_validation(config_path):
    """--agent goes alone and must look like a host id; an unknown one is a warning."""
    assert "goes alone" in one_error(await cli(config_path, "lock", "--agent", "h", "--user", "bob"), 2)
    assert "not a valid agent id" in one_error(await cli(config_path, "lock", "--agent", "a b!"), 2)
    result = await cli(config_path, "lock", "--agent", "ghost", "--format", "json")
    assert result.code == 0 and "no agent 'ghost' has joined" in result.err
    assert json.loads(result.out)["agent"] == "ghost"
    assert "No agents." in (await cli(config_path, "agents", "ls")).out
