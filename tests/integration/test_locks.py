"""Locks end to end: installed proxy + agent + a real upstream, locked through the CLI.

The proxy polls locks every 2 s, so every wait below is bounded by a few seconds.
"""

from __future__ import annotations

import json

import pytest
import requests

from tests.support.cluster import Browser, Cluster, wait_until
from tests.support.localhost import localhost_resolution
from tests.support.upstream import HttpUpstream

PASSWORD = "correct horse battery staple"
LOCK_WAIT = 10


@pytest.fixture(scope="module")
def cluster():
    upstream = HttpUpstream()
    c = Cluster([{"name": "hello", "uri": upstream.uri, "labels": {"team": "sre"}}])
    try:
        c.start_proxy()
        c.add_role({"kind": "role", "metadata": {"name": "sre-apps"},
                    "spec": {"allow": {"app_labels": {"team": "sre"}}}})
        c.add_user("alice", ["sre-apps"], PASSWORD)
        c.start_agent()
        wait_until(lambda: _hello_online(c), 30, "the agent to register hello")
        yield c
    finally:
        c.stop()
        upstream.stop()


def _api_login(cluster: Cluster) -> requests.Response:
    s = requests.Session()
    s.trust_env = False
    with localhost_resolution():
        return s.post(cluster.url(path="/v1/sessions"),
                      json={"username": "alice", "password": PASSWORD},
                      verify=cluster.ca_file, timeout=5)


def _hello_online(cluster: Cluster) -> bool:
    if not cluster.agent.alive():
        raise AssertionError("agent exited:\n" + cluster.agent.log_tail())
    s = requests.Session()
    s.trust_env = False
    with localhost_resolution():
        s.post(cluster.url(path="/v1/sessions"), json={"username": "alice", "password": PASSWORD},
               verify=cluster.ca_file, timeout=5).raise_for_status()
        apps = s.get(cluster.url(path="/v1/apps"), verify=cluster.ca_file, timeout=5).json()["apps"]
    return any(app["name"] == "hello" and app["online"] for app in apps)


def _audit_types(cluster: Cluster) -> set[str]:
    out = cluster.cli("audit", "search", "--since", "1h", "--format", "json").stdout.strip()
    events = json.loads(out) if out.startswith("[") else [
        json.loads(line) for line in out.splitlines() if line.strip()]
    return {event["type"] for event in events}


def test_lock_cuts_a_signed_in_user_off_and_unlock_restores_login(cluster):
    """lock --user ends alice's sessions within seconds, refuses login; locks rm undoes it."""
    alice = Browser(cluster)
    landed = alice.login_through(cluster.url("hello", "/echo?before=1"), "alice", PASSWORD)
    assert landed.status_code == 200 and "before=1" in landed.text

    lock_id = cluster.cli("lock", "--user", "alice", "--message", "incident 42").stdout.split()[0]
    assert lock_id in cluster.cli("locks", "ls").stdout

    def app_refused() -> bool:
        r = alice.get(cluster.url("hello", "/echo?after=1"), allow_redirects=False)
        return r.status_code != 200 and "after=1" not in r.text

    wait_until(app_refused, LOCK_WAIT, "alice's app request to be refused", interval=0.2)
    r = alice.get(cluster.url("hello", "/echo"), allow_redirects=False)
    assert r.status_code in (302, 303, 401, 403), r.status_code
    home = alice.get(cluster.url(path="/"), allow_redirects=False)
    assert home.status_code in (302, 303) and "/web/login" in home.headers["Location"]

    page = Browser(cluster).login_through(cluster.url("hello", "/echo"), "alice", PASSWORD)
    assert page.status_code == 403 and "your access is locked: incident 42" in page.text
    api = _api_login(cluster)
    assert api.status_code == 403 and "incident 42" in api.json()["error"]

    cluster.cli("locks", "rm", lock_id)
    assert "No locks." in cluster.cli("locks", "ls").stdout
    wait_until(lambda: _api_login(cluster).status_code == 200, LOCK_WAIT,
               "login to work again after locks rm", interval=0.2)
    again = Browser(cluster).login_through(cluster.url("hello", "/echo?again=1"), "alice", PASSWORD)
    assert again.status_code == 200 and "again=1" in again.text

    wait_until(lambda: {"lock.create", "lock.delete", "lock.enforced"} <= _audit_types(cluster),
               LOCK_WAIT, "lock.create, lock.delete and lock.enforced in the audit log",
               interval=0.5)


def test_app_lock_refuses_everyone_on_that_app_only(cluster):
    """lock --app hello refuses the app to a signed-in user while the web session lives on."""
    alice = Browser(cluster)
    assert alice.login_through(cluster.url("hello", "/echo"), "alice", PASSWORD).status_code == 200
    lock_id = cluster.cli("lock", "--app", "hello").stdout.split()[0]
    try:
        wait_until(
            lambda: alice.get(cluster.url("hello", "/echo"), allow_redirects=False).status_code != 200,
            LOCK_WAIT, "the app request to be refused", interval=0.2,
        )
        assert alice.get(cluster.url(path="/"), allow_redirects=False).status_code == 200
        launch = alice.get(cluster.url("hello", "/echo"))   # follows into launch: refused
        assert launch.status_code == 403 and "your access is locked" in launch.text
    finally:
        cluster.cli("locks", "rm", lock_id)
    wait_until(lambda: alice.get(cluster.url("hello", "/echo")).status_code == 200, LOCK_WAIT,
               "the app to open again after locks rm", interval=0.2)
