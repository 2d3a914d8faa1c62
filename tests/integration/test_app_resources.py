"""Apps as resources, dynamic labels and failover, end to end (issue 11, item 3).

The installed proxy and agents run as processes with real upstreams on loopback. App
resources are created and removed with the admin CLI while agents run; a dynamic label
reads a file the test rewrites; agents are killed with SIGKILL.
"""

from __future__ import annotations

import json
import time

import pytest
import requests

from tests.support.agents import FAILOVER_HOST, Agent, agents, serving, token, write_app
from tests.support.cluster import Browser, Cluster, audit, wait_until
from tests.support.upstream import HttpUpstream

PASSWORD = "correct horse battery staple"
WAIT = 20
FLIP = 4.0


def app_doc(name: str, uri: str, labels: dict, **spec) -> dict:
    return {"kind": "app", "metadata": {"name": name, "labels": labels},
            "spec": {"uri": uri, **spec}}


@pytest.fixture(scope="module")
def upstream():
    u = HttpUpstream()
    yield u
    u.stop()


@pytest.fixture(scope="module")
def cluster():
    c = Cluster([])
    try:
        c.start_proxy()
        c.add_role({"kind": "role", "metadata": {"name": "everything"},
                    "spec": {"allow": {"app_labels": {"*": "*"}}}})
        c.add_role({"kind": "role", "metadata": {"name": "mode-on"},
                    "spec": {"allow": {"app_labels": {"mode": "on"}}}})
        c.add_user("alice", ["everything"], PASSWORD)
        c.add_user("carol", ["mode-on"], PASSWORD)
        yield c
    finally:
        c.stop()


def connected(cluster: Cluster, agent: Agent) -> bool:
    if not agent.child.alive():
        raise AssertionError(f"agent {agent.name} exited:\n" + agent.child.log_tail())
    row = agents(cluster).get(agent.host_id) if (agent.data_dir / "host_id").exists() else None
    return bool(row and row["connected_since"])


def status(browser: Browser, url: str) -> int:
    return browser.get(url, allow_redirects=False).status_code


def test_app_resource_is_served_within_seconds_and_gone_after_rm(cluster, upstream):
    """An app resource created while an agent runs is reachable within seconds (one whose
    labels the agent's selector does not match is not served); `apps ls --admin` names its
    agent; after `rm app/NAME` it is gone, its open streams ended."""
    agent = Agent(cluster, "res", {"apps": [], "resources": [{"labels": {"env": "dev"}}]},
                  token(cluster))
    try:
        wait_until(lambda: connected(cluster, agent), WAIT, "the agent's tunnel")
        path = cluster.root / "apps.yaml"
        path.write_text(
            json.dumps(app_doc("wiki", upstream.uri, {"env": "dev"})) + "\n---\n"
            + json.dumps(app_doc("prodwiki", upstream.uri, {"env": "prod"})) + "\n")
        created = time.monotonic()
        out = cluster.cli("create", "-f", str(path)).stdout
        assert "app 'wiki' created" in out and "app 'prodwiki' created" in out
        wait_until(lambda: "wiki" in serving(cluster), 10, "wiki served")
        assert time.monotonic() - created < 10

        alice = Browser(cluster)
        landed = alice.login_through(cluster.url("wiki", "/echo?n=1"), "alice", PASSWORD)
        assert landed.status_code == 200 and "n=1" in landed.text
        assert "prodwiki" not in serving(cluster) and "prodwiki" not in agent.log()

        listed = json.loads(cluster.cli("apps", "ls", "--admin", "--format", "json").stdout)
        rows = {row["name"]: row for row in listed["apps"]}
        assert rows["wiki"]["resource"] is True and rows["wiki"]["labels"] == {"env": "dev"}
        assert rows["wiki"]["agents"] == [{"id": agent.host_id, "state": "connected",
                                           "host": rows["wiki"]["agents"][0]["host"],
                                           "last_seen": rows["wiki"]["agents"][0]["last_seen"]}]
        assert rows["prodwiki"]["agents"] == []
        got = json.loads(cluster.cli("get", "app/wiki", "--format", "json").stdout)
        assert got["spec"]["uri"] == upstream.uri

        endless = alice.get(cluster.url("wiki", "/endless"), stream=True)
        assert endless.status_code == 200
        chunks = endless.iter_content(64 * 1024)
        next(chunks)
        cluster.cli("rm", "app/wiki")
        removed = time.monotonic()
        try:
            for _ in chunks:               # the open stream ends (the app sends for 30 s)
                assert time.monotonic() - removed < 10, "the open stream outlived its app"
        except requests.RequestException:
            pass
        assert time.monotonic() - removed < 10
        wait_until(lambda: status(alice, cluster.url("wiki", "/echo?n=2")) != 200, 10,
                   "wiki no longer served")
        wait_until(lambda: "wiki" not in serving(cluster), 10, "agents ls without wiki")
        assert "removed wiki" in agent.log()
        assert "Traceback" not in agent.log()
    finally:
        agent.stop()
        cluster.cli("rm", "app/prodwiki", check=False)


def test_agent_whose_token_scope_excludes_a_resource_cannot_serve_it(cluster, upstream):
    """The token scope holds for app resources: an agent allowed only app `other` whose
    selector matches resource `scoped` announces it and is refused (audited), and the app
    is not reachable."""
    agent = Agent(cluster, "scoped", {"apps": [], "resources": [{"labels": {"env": "scoped"}}]},
                  token(cluster, "--apps", "other"))
    path = write_app(cluster, "scoped", app_doc("scoped", upstream.uri, {"env": "scoped"}))
    try:
        wait_until(lambda: connected(cluster, agent), WAIT, "the agent's tunnel")
        cluster.cli("create", "-f", str(path))
        wait_until(lambda: [e for e in audit(cluster, "agent.app.refused")
                            if e["target"] == "scoped"], WAIT, "agent.app.refused for scoped")
        wait_until(lambda: "the proxy refused app scoped" in agent.log(), WAIT,
                   "the agent's line about scoped")
        assert "scoped" not in serving(cluster)
        alice = Browser(cluster)
        assert status(alice, cluster.url("scoped", "/echo")) in (403, 404, 503)
    finally:
        agent.stop()
        cluster.cli("rm", "app/scoped", check=False)


def test_dynamic_label_flips_an_app_in_and_out_of_a_role(cluster, upstream):
    """A dynamic label (a command reading a file the test rewrites, every second) moves
    an app in and out of carol's role: 200, then 403, then 200, each within a bounded
    wait; the app session is the same throughout, and a download running on another
    connection is cut when the label takes the app out of her role."""
    mode = cluster.root / "mode"
    mode.write_text("on\n")
    app = {"name": "flip", "uri": upstream.uri,
           "dynamic_labels": {"mode": {"command": ["cat", str(mode)], "period": "1s"}}}
    agent = Agent(cluster, "flipper", {"apps": [app]}, token(cluster))
    try:
        wait_until(lambda: "flip" in serving(cluster), WAIT, "flip served")
        carol = Browser(cluster)
        landed = carol.login_through(cluster.url("flip", "/echo?n=0"), "carol", PASSWORD)
        assert landed.status_code == 200, landed.text
        # Each flip is seen within FLIP s: one period, the run and the announcement. A
        # request right before it leaves a fresh decision in the proxy's cache (5 s), so
        # a cache that kept decisions made on old labels would be too slow.
        live = Browser(cluster)            # a second connection, busy with a download
        live.session.cookies.update(carol.session.cookies)
        endless = live.get(cluster.url("flip", "/endless"), stream=True)
        assert endless.status_code == 200
        chunks = endless.iter_content(64 * 1024)
        next(chunks)
        for value, expected in (("off", 403), ("on", 200), (None, 403)):
            assert status(carol, cluster.url("flip", "/echo")) == (403 if expected == 200 else 200)
            if value is None:
                mode.unlink()              # the command fails: the label says "error"
            else:
                mode.write_text(value + "\n")
            wait_until(lambda: status(carol, cluster.url("flip", "/echo")) == expected, FLIP,
                       f"carol's answer {expected} after mode={value}")
            if value == "off":             # the live download was cut as well
                flipped = time.monotonic()
                try:
                    for _ in chunks:
                        assert time.monotonic() - flipped < FLIP, "the download outlived access"
                except requests.RequestException:
                    pass
    finally:
        agent.stop()


def test_one_of_two_agents_killed_while_requests_keep_succeeding(cluster, upstream):
    """Two agents serve one app resource; one is killed with SIGKILL while a client keeps
    sending requests: at most the request in flight on the dead agent fails, every later
    one succeeds through the other agent."""
    path = write_app(cluster, "shared", app_doc("shared", upstream.uri, {"env": "shared"}))
    cluster.cli("create", "-f", str(path))
    config = {"apps": [], "resources": [{"labels": {"env": "shared"}}]}
    first = Agent(cluster, "shared-1", config, token(cluster))
    second = Agent(cluster, "shared-2", config, token(cluster))
    try:
        wait_until(lambda: len(serving(cluster).get("shared", ())) == 2, WAIT,
                   "both agents serving shared")
        alice = Browser(cluster)
        assert alice.login_through(cluster.url("shared", "/echo"), "alice",
                                   PASSWORD).status_code == 200
        failures = []
        for n in range(60):
            if n == 10:
                first.kill()
            r = alice.get(cluster.url("shared", f"/echo?n={n}"))
            if r.status_code != 200 or f"n={n}" not in r.text:
                failures.append((n, r.status_code))
            time.sleep(0.05)
        assert len(failures) <= 1 and all(n in (10, 11) for n, _ in failures), failures
    finally:
        first.stop()
        second.stop()
        cluster.cli("rm", "app/shared", check=False)


def test_a_request_fails_over_when_one_agents_upstream_is_down(cluster, upstream):
    """Two agents serve one app whose uri names a host each resolves for itself; on one
    the app is down (connection refused). Every request succeeds: the proxy retries the
    refused open on the other agent, before any byte was sent."""
    port = upstream.uri.rsplit(":", 1)[1]
    uri = f"http://{FAILOVER_HOST}:{port}"
    path = write_app(cluster, "fo", app_doc("fo", uri, {"env": "fo"}))
    cluster.cli("create", "-f", str(path))
    config = {"apps": [], "resources": [{"labels": {"env": "fo"}}]}
    good = Agent(cluster, "fo-good", config, token(cluster), resolve="127.0.0.1")
    down = Agent(cluster, "fo-down", config, token(cluster), resolve="127.0.0.2")
    try:
        wait_until(lambda: len(serving(cluster).get("fo", ())) == 2, WAIT,
                   "both agents serving fo")
        alice = Browser(cluster)
        assert alice.login_through(cluster.url("fo", "/echo"), "alice",
                                   PASSWORD).status_code == 200
        for n in range(12):
            r = alice.get(cluster.url("fo", f"/echo?n={n}"), headers={"Connection": "close"})
            assert r.status_code == 200 and f"n={n}" in r.text, (n, r.status_code, r.text[:200])
        assert "app fo unreachable: connection refused" in down.log()
        assert "unreachable" not in good.log()
    finally:
        good.stop()
        down.stop()
        cluster.cli("rm", "app/fo", check=False)
