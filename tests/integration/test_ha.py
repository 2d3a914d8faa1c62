"""Several proxies (issue 13 items 2-4), real processes: three installed proxies on one
PostgreSQL behind HAProxy, two agents serving one app through the balancer's tunnel port.

Every agent keeps a tunnel to every proxy, so any proxy serves the app; a lock made on
one proxy cuts a live download on another within a second (LISTEN/NOTIFY: polling alone
takes 2 s); kill -9 of a proxy under load fails no more requests than there were
connections on it, and the agents' tunnels come back when it restarts; kill -9 of one
agent fails at most its in-flight requests; PostgreSQL restarted, all recover within 5 s.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
import requests

from tests.support.cluster import Browser, wait_until
from tests.support.haproxy import ProxyFarm
from tests.support.localhost import localhost_resolution
from tests.support.postgres import PostgresServer
from tests.support.upstream import HttpUpstream

PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="module")
def farm(tmp_path_factory):
    server = PostgresServer().start()
    upstream = HttpUpstream()
    farm = ProxyFarm(tmp_path_factory.mktemp("ha"), server.new_database(), count=3)
    farm.pg = server
    try:
        farm.start()
        role = farm.root / "role.yaml"
        role.write_text("kind: role\nmetadata: {name: sre}\n"
                        "spec: {allow: {app_labels: {team: sre}}}\n---\n"
                        "kind: role\nmetadata: {name: admin}\n"
                        "spec: {allow: {rules: [{resources: ['*'], verbs: ['*']}]}}\n")
        farm.cli("create", "-f", str(role))
        farm.cli("users", "add", "root", "--roles", "admin", "--password-stdin",
                 stdin=PASSWORD + "\n")
        farm.cli("users", "add", "alice", "--roles", "sre", "--password-stdin",
                 stdin=PASSWORD + "\n")
        app = {"name": "hello", "uri": upstream.uri, "labels": {"team": "sre"}}
        farm.start_agent("agent-a", [app])
        farm.start_agent("agent-b", [app])
        wait_until(lambda: len(tunnels(farm)) == 6, 30, "two agents with a tunnel to each of "
                   "three proxies")
        yield farm
    finally:
        farm.stop()
        upstream.stop()
        server.stop()


def tunnels(farm: ProxyFarm, since: float = 0.0) -> set[tuple[str, str]]:
    """(agent, proxy) pairs with a live tunnel, as the proxies recorded them."""
    for agent in farm.agents:
        assert agent.alive(), agent.log_tail()
    out = farm.pg.psql(f"SELECT host_id, proxy_id FROM agent_tunnels WHERE since > {since}",
                       database=farm.db["dbname"])
    return {tuple(line.split("|")) for line in out.splitlines() if line}


def signed_in(farm: ProxyFarm) -> Browser:
    """alice with an app session for hello, signed in through the balancer."""
    browser = Browser(farm)
    landed = browser.login_through(farm.url("hello", "/echo?in=1"), "alice", PASSWORD)
    assert landed.status_code == 200, landed.text
    return browser


def test_any_proxy_serves_the_app_through_either_agent(farm):
    """Asked directly on each of the three proxies, hello answers (each has tunnels of
    both agents); the proxies list each other (the proxies table has three live rows)."""
    browser = signed_in(farm)
    for web, _ in farm.ports:
        r = browser.get(farm.url("hello", f"/echo?port={web}", port=web), allow_redirects=False)
        assert r.status_code == 200 and r.json()["path"] == f"/echo?port={web}", r.text
    rows = farm.pg.psql("SELECT proxy_id, tunnel_addr FROM proxies ORDER BY tunnel_addr",
                        database=farm.db["dbname"]).split()
    assert sorted(rows) == sorted(f"{farm.proxy_id(n)}|127.0.0.1:{tunnel}"
                                  for n, (_, tunnel) in enumerate(farm.ports))
    listed = json.loads(farm.cli("agents", "ls", "--format", "json").stdout)
    every = sorted(farm.proxy_id(n) for n in range(3))
    assert [sorted(agent["proxies"]) for agent in listed] == [every, every], listed


def admin_on(farm: ProxyFarm, n: int) -> requests.Session:
    """root's API session on proxy n itself (not through the balancer)."""
    s = requests.Session()
    s.trust_env = False
    s.verify = farm.ca_file
    s.headers["Origin"] = farm.url().rstrip("/")
    with localhost_resolution():
        r = s.post(farm.url(path="/v1/sessions", port=farm.ports[n][0]),
                   json={"username": "root", "password": PASSWORD}, timeout=10)
    assert r.status_code == 200, r.text
    return s


def test_a_lock_made_on_one_proxy_cuts_a_live_download_on_another_within_a_second(farm):
    """A download streams from proxy 2; a lock created through proxy 0's admin API (which
    refreshes proxy 0 only) cuts it on proxy 2 within one second. Three rounds: polling
    alone (every 2 s) would pass one round in two, all three about one time in eight."""
    admin = admin_on(farm, 0)
    web2 = farm.ports[2][0]
    took = []
    for round in range(3):
        browser = signed_in(farm)
        with localhost_resolution():
            stream = browser.session.get(farm.url("hello", "/endless", port=web2),
                                         stream=True, timeout=10)
        assert stream.status_code == 200
        chunks = stream.iter_content(64 * 1024)
        next(chunks)
        locked_at = time.monotonic()
        with localhost_resolution():
            r = admin.post(farm.url(path="/v1/admin/locks", port=farm.ports[0][0]),
                           json={"user": "alice", "message": "ha test"}, timeout=10)
        assert r.status_code == 201, r.text
        lock_id = r.json()["lock"]["id"]
        try:
            with pytest.raises(requests.RequestException):
                deadline = time.monotonic() + 10
                for _ in chunks:
                    assert time.monotonic() < deadline, "the download was never cut"
                raise requests.ConnectionError("ended")   # a clean end counts as cut too
            took.append(time.monotonic() - locked_at)
        finally:
            stream.close()
            with localhost_resolution():
                admin.delete(farm.url(path=f"/v1/admin/locks/{lock_id}", port=farm.ports[0][0]),
                             timeout=10).raise_for_status()
        wait_until(lambda: signed_in(farm), 10, "alice to get in again after the unlock",
                   interval=0.2)
    assert max(took) < 1.0, took


def established_to(port: int) -> int:
    """TCP connections established to 127.0.0.1:port (the server side of each)."""
    count = 0
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "01" and int(local.split(":")[1], 16) == port:
                count += 1
    return count


def test_kill_9_of_a_proxy_under_load_fails_only_its_in_flight_requests(farm):
    """Eight keep-alive clients through HAProxy for a bounded run; proxy 1 is killed
    mid-run: failed requests <= the connections that were on it (open at the kill, or
    sent to it by HAProxy before its health check noticed); the others go on.
    `agents ls` stops listing it once its row is stale; restarted, it deletes the tunnel
    rows its earlier run left and gets both agents' tunnels back."""
    threads, ok, failed = load(farm, signed_in(farm).session.cookies, 6)
    time.sleep(2)
    on_dead = established_to(farm.ports[1][0])
    sent = farm.haproxy.sessions("webs", "p1")
    farm.kill(1)
    killed_at = time.time()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    # Connections on the dead proxy: those open at the kill, plus those HAProxy sent it
    # before its health check took it out (about a second).
    on_dead += farm.haproxy.sessions("webs", "p1") - sent
    assert ok[0] > 100, (ok, failed)
    assert failed[0] <= on_dead, (failed, on_dead, failed_reasons)

    # Its tunnels leave `agents ls` once its row is stale (STALE_AFTER, 10 s).
    dead = farm.proxy_id(1)
    wait_until(lambda: all(dead not in agent["proxies"] for agent in listed_agents(farm)),
               15, "agents ls to drop the killed proxy", interval=1.0)
    # A tunnel row its run recorded for an agent that never comes back (as if that agent
    # died with it): the restarted proxy (same id) deletes it at its first heartbeat.
    db = farm.db["dbname"]
    farm.pg.psql("INSERT INTO agent_tunnels (host_id, proxy_id, peer, since) VALUES "
                 f"('ghost-agent', '{dead}', '127.0.0.1:1', {killed_at - 1})", database=db)
    farm.start_proxy(1)
    wait_until(lambda: len([1 for _, p in tunnels(farm, since=killed_at) if p == dead]) == 2,
               20, "both agents' tunnels to the restarted proxy")
    assert farm.pg.psql(f"SELECT count(*) FROM agent_tunnels WHERE proxy_id = '{dead}' "
                        f"AND since < {killed_at}", database=db).strip() == "0"
    every = sorted(farm.proxy_id(n) for n in range(3))
    wait_until(lambda: [sorted(agent["proxies"]) for agent in listed_agents(farm)]
               == [every, every], 10, "agents ls to list the restarted proxy again")


def listed_agents(farm: ProxyFarm) -> list[dict]:
    """`apptunnel agents ls --format json` (the admin CLI reads the backend)."""
    return json.loads(farm.cli("agents", "ls", "--format", "json").stdout)


failed_reasons: list[str] = []   # why requests failed, for the assertion messages


def load(farm: ProxyFarm, cookies, seconds: float, clients: int = 8) -> tuple[list, list, list]:
    """Keep-alive clients through HAProxy for a bounded run: (threads, [ok], [failed])."""
    stop_at = time.monotonic() + seconds
    ok, failed = [0], [0]
    lock = threading.Lock()

    def client():
        s = requests.Session()
        s.trust_env = False
        s.cookies.update(cookies)
        n = 0
        while time.monotonic() < stop_at and n < 2000:
            n += 1
            try:
                with localhost_resolution():
                    r = s.get(farm.url("hello", f"/echo?n={n}"), verify=farm.ca_file,
                              timeout=10, allow_redirects=False)
                why = None if r.status_code == 200 else f"status {r.status_code}"
            except requests.RequestException as err:
                why = f"{type(err).__name__}: {err}"[:200]
            good = why is None
            with lock:
                if why is not None:
                    failed_reasons.append(why)
                (ok if good else failed)[0] += 1

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    return threads, ok, failed


def test_kill_9_of_an_agent_fails_at_most_its_in_flight_streams(farm):
    """Eight clients through HAProxy while agent-a is killed: the other agent serves the
    app; at most one request per client (those in flight) fails."""
    cookies = signed_in(farm).session.cookies
    threads, ok, failed = load(farm, cookies, 5)
    time.sleep(2)
    victim = farm.agents[0]
    victim.proc.kill()
    victim.proc.wait(10)
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    assert ok[0] > 100 and failed[0] <= len(threads), (ok, failed)


def api_login(farm: ProxyFarm, port: int | None = None) -> tuple[int, float]:
    """(status, seconds) of alice's API sign-in on a proxy (or through the balancer); a
    503 must say when to try again (Retry-After)."""
    s = requests.Session()
    s.trust_env = False
    started = time.monotonic()
    try:
        with localhost_resolution():
            r = s.post(farm.url(path="/v1/sessions", port=port),
                       json={"username": "alice", "password": PASSWORD},
                       verify=farm.ca_file, timeout=30)
        status = r.status_code
        if status == 503 and not r.headers.get("Retry-After"):
            status = -503
    except requests.RequestException as err:
        status = 0
        failed_reasons.append(f"login: {type(err).__name__}: {err}"[:300])
    return status, time.monotonic() - started


def test_postgres_restarted_requests_fail_clearly_then_all_recover_within_5s(farm):
    """PostgreSQL stopped: a sign-in (it needs the database) is refused with 503 and a
    Retry-After within its timeout on every proxy, none hangs, and so are a sign-in form
    POST and an admin API read; the proxies log no traceback for them; PostgreSQL back:
    within 5 s sign-ins work on every proxy again (the very first one too), nothing
    restarted, and the LISTEN connections are back."""
    for n in range(3):
        assert api_login(farm, farm.ports[n][0])[0] == 200
    admin = admin_on(farm, 0)
    logged = [farm.proxies[n].log_path.stat().st_size for n in range(3)]
    farm.pg.halt()
    try:
        for n in range(3):
            status, took = api_login(farm, farm.ports[n][0])
            assert status == 503 and took < 15, (n, status, took, failed_reasons[-1:])
        web0 = farm.ports[0][0]
        with localhost_resolution():
            form = admin.post(farm.url(path="/web/login", port=web0), timeout=15,
                              data={"username": "alice", "password": PASSWORD})
            agents = admin.get(farm.url(path="/v1/admin/agents", port=web0), timeout=15)
        assert form.status_code == 503 and "storage is unavailable" in form.text, form.text
        assert agents.status_code == 503 and agents.headers["Retry-After"] == "5", agents.text
        assert "storage is unavailable" in agents.json()["error"]
    finally:
        farm.pg.resume()
    for n in range(3):
        with open(farm.proxies[n].log_path, errors="replace") as f:
            f.seek(logged[n])
            while_down = f.read()
        assert "Traceback" not in while_down, while_down[-3000:]
        assert "storage unavailable" in while_down, while_down[-3000:]
    back = time.monotonic()
    # The first request after the return is not failed by a connection the restart
    # dropped: the backend notices it before anything ran and uses a new one.
    for n in range(3):
        assert api_login(farm, farm.ports[n][0])[0] == 200, (n, failed_reasons[-1:])
    for n in range(3):
        wait_until(lambda: api_login(farm, farm.ports[n][0])[0] == 200,
                   max(0.5, 5 - (time.monotonic() - back)), f"sign-in on proxy {n} after the "
                   "database came back", interval=0.2)
    assert time.monotonic() - back < 5.5
    for n in range(3):
        assert farm.proxies[n].alive()
        wait_until(lambda: "listening for changes again" in farm.proxies[n].log_path.read_text(),
                   5, f"proxy {n} to LISTEN again")
