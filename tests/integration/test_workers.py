"""`workers: 2` end to end (proxy/workers.py): the installed proxy as worker 0 and the
worker it spawns share the web and tunnel ports (SO_REUSEPORT), one agent keeps a tunnel
to each, and one module-wide cluster answers every check below.

Connections land on a worker at the kernel's choice, so requests here each open a fresh
connection (``Connection: close``): over a dozen of them reach both workers all but
always, and every assertion holds whichever worker a request reached.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pyotp
import pytest
import requests
import yaml

from tests.support.cluster import Browser, Cluster, post_from, wait_until
from tests.support.localhost import localhost_resolution
from tests.support.upstream import HttpUpstream

PASSWORD = "correct horse battery staple"
FRESH = {"Connection": "close"}   # each request a new connection: any worker may take it


@pytest.fixture(scope="module")
def cluster():
    upstream = HttpUpstream()
    c = Cluster([{"name": "hello", "uri": upstream.uri, "labels": {"team": "sre"}}], workers=2)
    config = yaml.safe_load(c.proxy_config.read_text())
    config["auth"] = {"second_factor": "optional"}   # a user with a device must use it
    c.proxy_config.write_text(yaml.safe_dump(config))
    try:
        c.start_proxy()
        c.add_role({"kind": "role", "metadata": {"name": "sre-apps"},
                    "spec": {"allow": {"app_labels": {"team": "sre"}}}})
        c.add_user("alice", ["sre-apps"], PASSWORD)
        c.add_role({"kind": "role", "metadata": {"name": "admin"},
                    "spec": {"allow": {"rules": [{"resources": ["*"], "verbs": ["*"]}]}}})
        c.add_user("root", ["admin"], PASSWORD)
        c.start_agent()
        wait_until(lambda: all(tunnels(c, i) == 1 for i in range(2)), 30,
                   "one tunnel from the agent to each worker")
        yield c
    finally:
        c.stop()
        upstream.stop()


def diag(cluster: Cluster, worker: int, path: str) -> requests.Response:
    """Worker I's own diagnostics listener: diag_addr's port + I."""
    return requests.get(f"http://127.0.0.1:{cluster.diag_port + worker}{path}", timeout=5)


def metric(cluster: Cluster, worker: int, name: str, **labels: str) -> float:
    """The sum of the samples of `name` with `labels` on worker I's /metrics."""
    total = 0.0
    for line in diag(cluster, worker, "/metrics").text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


def tunnels(cluster: Cluster, worker: int) -> float:
    assert cluster.agent.alive(), cluster.agent.log_tail()
    return metric(cluster, worker, "apptunnel_tunnels")


def children(cluster: Cluster) -> list[int]:
    pid = cluster.proxy.proc.pid
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def signed_in(cluster: Cluster) -> Browser:
    browser = Browser(cluster)
    browser.session.headers.update(FRESH)
    landed = browser.login_through(cluster.url("hello", "/echo?in=1"), "alice", PASSWORD)
    assert landed.status_code == 200 and "in=1" in landed.text, landed.text
    return browser


def test_both_workers_are_ready_and_serve_the_app(cluster):
    """Each worker answers /readyz on its own diag port; sixteen app requests on fresh
    connections all answer, and both workers' counters show they served some."""
    for worker in range(2):
        assert diag(cluster, worker, "/readyz").status_code == 200
    browser = signed_in(cluster)
    for n in range(16):
        r = browser.get(cluster.url("hello", f"/echo?n={n}"), allow_redirects=False)
        assert r.status_code == 200 and f"n={n}" in r.text, r.text
    served = [metric(cluster, w, "apptunnel_http_requests_total", app="hello")
              for w in range(2)]
    assert all(count > 0 for count in served), served


def test_sign_in_works_when_its_requests_land_on_different_workers(cluster):
    """Four password sign-ins through the app's redirect, hand-off and session, each request
    on a new connection: every one lands in the app (the login state is in the backend)."""
    for _ in range(4):
        signed_in(cluster)
    logins = [metric(cluster, w, "apptunnel_logins_total", outcome="success") for w in range(2)]
    assert sum(logins) >= 4, logins


def test_the_second_factor_step_works_on_either_worker(cluster):
    """Six form sign-ins with a TOTP second factor, the password step and the code step
    each on a new connection (either worker may take either): all six sign in, since the
    pending step is in the backend (with it in one worker's memory, half would fail)."""
    cluster.add_user("carol", ["sre-apps"], PASSWORD)
    enrolling = Browser(cluster)
    enrolling.session.headers.update({"Origin": cluster.url().rstrip("/")})
    r = enrolling.post(cluster.url(path="/v1/sessions"),
                       json={"username": "carol", "password": PASSWORD})
    assert r.status_code == 200, r.text
    devices = []
    for n in range(6):     # a TOTP step is good once per device: one device per sign-in
        secret = enrolling.post(cluster.url(path="/v1/mfa/totp"), json={}).json()["secret"]
        devices.append(pyotp.TOTP(secret))
        r = enrolling.post(cluster.url(path="/v1/mfa/devices"),
                           json={"type": "totp", "name": f"phone{n}", "secret": secret,
                                 "otp": devices[-1].now()})
        assert r.status_code == 200, r.text
    for device in devices:
        browser = Browser(cluster)
        browser.session.headers.update({"Origin": cluster.url().rstrip("/"), **FRESH})
        first = browser.post(cluster.url(path="/web/login"),
                             data={"username": "carol", "password": PASSWORD, "next": "/web/"})
        assert first.status_code == 200 and 'name="otp"' in first.text, first.text[:300]
        second = browser.post(cluster.url(path="/web/login/mfa"), allow_redirects=False,
                              data={"otp": device.at(time.time() + 30), "next": "/web/"})
        assert second.status_code == 303, second.text[:300]
        assert browser.get(cluster.url(path="/v1/apps")).status_code == 200


def test_a_killed_worker_is_started_again_and_the_agent_returns(cluster):
    """kill -9 of worker 1: worker 0 logs it, starts it again after a second, and the agent
    has its tunnel to it back (the app answers through either worker again)."""
    [child] = children(cluster)
    os.kill(child, signal.SIGKILL)
    wait_until(lambda: children(cluster) and children(cluster) != [child], 10,
               "worker 0 to start worker 1 again")
    wait_until(lambda: tunnels(cluster, 1) == 1, 30, "the agent's tunnel to the new worker 1")
    assert f"worker 1 (pid {child}) was killed by signal 9" in cluster.proxy.log_path.read_text()
    browser = signed_in(cluster)
    for n in range(6):
        assert browser.get(cluster.url("hello", f"/echo?after={n}")).status_code == 200


def admin(cluster: Cluster) -> requests.Session:
    """root's API session, each request on a fresh connection (any worker)."""
    s = requests.Session()
    s.trust_env = False
    s.verify = cluster.ca_file
    s.headers.update({"Origin": cluster.url().rstrip("/"), **FRESH})
    with localhost_resolution():
        r = s.post(cluster.url(path="/v1/sessions"),
                   json={"username": "root", "password": PASSWORD}, timeout=10)
    assert r.status_code == 200, r.text
    return s


def lock_alice(cluster: Cluster, how: str) -> tuple[str, object]:
    """A lock on alice made through the CLI or the admin API; (its id, how to remove it)."""
    if how == "cli":
        lock_id = cluster.cli("lock", "--user", "alice", "--message",
                              "workers test").stdout.split()[0]
        return lock_id, lambda: cluster.cli("locks", "rm", lock_id)
    api = admin(cluster)
    with localhost_resolution():
        r = api.post(cluster.url(path="/v1/admin/locks"),
                     json={"user": "alice", "message": "workers test"}, timeout=10)
    assert r.status_code == 201, r.text
    lock_id = r.json()["lock"]["id"]

    def remove():
        with localhost_resolution():
            api.delete(cluster.url(path=f"/v1/admin/locks/{lock_id}"),
                       timeout=10).raise_for_status()
    return lock_id, remove


@pytest.mark.parametrize("how", ["cli", "api"])
def test_a_lock_cuts_live_downloads_on_every_worker_at_once(cluster, how):
    """Downloads on fresh connections until both workers hold some; `apptunnel lock` (or
    the admin API, on whichever worker takes it) answers once every worker re-read the
    locks (the CLI asks worker 0, which asks the others; another worker asks worker 0),
    so every download is cut within a quarter second of it. Two rounds: polling alone
    (every 2 s) would pass a round about one time in six."""
    for round in range(2):
        browser = signed_in(cluster)
        streams = []
        try:
            for _ in range(16):
                if len(streams) >= 4 and all(metric(cluster, w, "apptunnel_streams") > 0
                                             for w in range(2)):
                    break
                with localhost_resolution():
                    stream = browser.session.get(cluster.url("hello", "/endless"),
                                                 stream=True, timeout=10)
                assert stream.status_code == 200
                chunks = stream.iter_content(64 * 1024)
                next(chunks)
                streams.append((stream, chunks))
            assert all(metric(cluster, w, "apptunnel_streams") > 0 for w in range(2))
            lock_id, unlock = lock_alice(cluster, how)
            locked_at = time.monotonic()
            for stream, chunks in streams:
                with pytest.raises(requests.RequestException):
                    for _ in chunks:
                        assert time.monotonic() - locked_at < 10, "a download was never cut"
                    raise requests.ConnectionError("ended")   # a clean end counts as cut
            took = time.monotonic() - locked_at
        finally:
            for stream, _ in streams:
                stream.close()
        assert took < 0.25, (round, took)
        r = browser.get(cluster.url("hello", "/echo?locked=1"), allow_redirects=False)
        assert r.status_code != 200
        unlock()


def test_a_guesser_spread_over_the_workers_gets_no_more_tries(cluster):
    """Twelve wrong passwords for one name, each on a new connection: the workers count
    3 each (5 per user, shared), so at most 6 are checked and the rest get 429 (counted
    in full by each worker, about 10 would have been checked)."""
    statuses = [post_from(cluster, "/v1/sessions", {"username": "mallory",
                                                    "password": "guess"})[0]
                for _ in range(12)]
    assert set(statuses) <= {401, 429}, statuses
    assert 3 <= statuses.count(401) <= 6, statuses


def test_workers_stop_when_worker_0_is_killed(cluster):
    """kill -9 of worker 0 (no clean stop): worker 1 sees its stdin close and exits, so no
    orphan keeps the shared ports."""
    [child] = children(cluster)
    os.kill(cluster.proxy.proc.pid, signal.SIGKILL)
    cluster.proxy.proc.wait(10)
    wait_until(lambda: not Path(f"/proc/{child}").exists()
               or "zombie" in Path(f"/proc/{child}/status").read_text(), 15,
               "worker 1 to exit after worker 0 died")
