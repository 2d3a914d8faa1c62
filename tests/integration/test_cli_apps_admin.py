"""`apptunnel create/get/rm` of `kind: app` and `apps ls --admin`, in-process against a
real SQLite file."""

from __future__ import annotations

import json

import pytest
import pytest_twisted

from apptunnel.backend.records import Agent, Scope
from tests.support.cli_admin import cli, one_error, stored

WIKI = """\
kind: app
metadata: {name: wiki, labels: {env: dev}}
spec:
  uri: http://127.0.0.1:8080
  dynamic_labels:
    commit: {command: [git, rev-parse, HEAD], period: 1m}
"""


@pytest.fixture
def config_path(tmp_path) -> str:
    path = tmp_path / "proxy.yaml"
    path.write_text("cluster_name: t\ndata_dir: data\npublic_addr: apptunnel.localhost:3080\n"
                    "tunnel_listen_addr: 127.0.0.1:3024\n")
    return str(path)


@pytest_twisted.ensureDeferred
async def test_create_get_and_rm_an_app(config_path, tmp_path):
    """An app document is stored as written, listed, shown and removed (audited)."""
    path = tmp_path / "wiki.yaml"
    path.write_text(WIKI)
    result = await cli(config_path, "create", "-f", str(path))
    assert result.code == 0 and "app 'wiki' created" in result.out
    again = await cli(config_path, "create", "-f", str(path))
    assert "already exists" in one_error(again, 1)
    [doc] = json.loads((await cli(config_path, "get", "apps", "--format", "json")).out)
    assert doc["spec"]["dynamic_labels"]["commit"]["command"] == ["git", "rev-parse", "HEAD"]
    text = (await cli(config_path, "get", "apps", "--format", "text")).out
    assert "wiki" in text and "env=dev" in text and "commit" in text
    assert (await cli(config_path, "rm", "app/wiki")).code == 0
    assert "no app named 'wiki'" in one_error(await cli(config_path, "rm", "app", "wiki"), 1)
    events = await stored(config_path, lambda b: b.search_audit(type="resource.delete"))
    assert [e.target for e in events] == ["app/wiki"]


@pytest.mark.parametrize("change, message", [
    (("uri: http://127.0.0.1:8080", "uri: ftp://x"), "doc 1: spec.uri: expected an http://"),
    (("commit:", "env:"), "doc 1: spec.dynamic_labels.env: 'env' is also a static label"),
    (("period: 1m", "period: 10ms"), "doc 1: spec.dynamic_labels.commit.period: must be at least 1s"),
    (("name: wiki", "name: Wiki"), "doc 1: metadata.name: expected a DNS label"),
    (("spec:", "specs:"), "doc 1: specs: unknown key"),
])
@pytest_twisted.ensureDeferred
async def test_a_bad_app_document_is_one_line_naming_file_and_key(config_path, tmp_path,
                                                                   change, message):
    path = tmp_path / "bad.yaml"
    path.write_text(WIKI.replace(*change))
    line = one_error(await cli(config_path, "create", "-f", str(path)), 2)
    assert line.startswith(f"apptunnel: {path}: {message}") or f"{path}: {message}" in line, line


@pytest_twisted.ensureDeferred
async def test_apps_ls_admin_shows_each_app_with_its_agents_and_their_state(config_path, tmp_path):
    """Connected, draining and gone agents; resources nobody serves are listed too."""
    (tmp_path / "wiki.yaml").write_text(WIKI)
    assert (await cli(config_path, "create", "-f", str(tmp_path / "wiki.yaml"))).code == 0
    base = dict(scope=Scope(), joined=1.0e9, cert_expires=2.0e9, key_pin="sha256:a",
                last_seen=1.5e9)
    for agent in (Agent("a-up", connected_since=1.5e9, apps=("grafana",), **base),
                  Agent("a-drain", connected_since=1.5e9, apps=("grafana",), draining=True,
                        **base),
                  Agent("a-gone", apps=("grafana",), **base)):
        await stored(config_path, lambda b, agent=agent: b.put_agent(agent))
    rows = {r["name"]: r for r in json.loads(
        (await cli(config_path, "apps", "ls", "--admin", "--format", "json")).out)["apps"]}
    assert {a["id"]: a["state"] for a in rows["grafana"]["agents"]} == {
        "a-up": "connected", "a-drain": "draining", "a-gone": "gone"}
    assert rows["grafana"]["resource"] is False
    assert rows["wiki"] == {"name": "wiki", "resource": True, "labels": {"env": "dev"},
                            "agents": []}
    text = (await cli(config_path, "apps", "ls", "--admin")).out
    assert "a-drain(draining)" in text and "resource" in text
