"""Metrics and health of real processes: /metrics scraped from a proxy and an agent after
real requests, /readyz following PostgreSQL down and back, hostile scrapes.

The proxy and agent are the installed `twistd` commands (tests/support/cluster.py), each
with its diagnostics listener on a free loopback port.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
from pathlib import Path
import time

import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support.cluster import BIN, Browser, Cluster, free_port, wait_until
from tests.support.localhost import localhost_resolution
from tests.support.postgres import PostgresServer
from tests.support.upstream import HttpUpstream

PASSWORD = "correct horse battery staple"
REQUESTS = 7


def scrape(port: int) -> dict:
    """{(name, sorted labels): value} from GET /metrics on a diag port."""
    r = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def upstream():
    http = HttpUpstream()
    yield http
    http.stop()


@pytest.fixture(scope="module")
def cluster(upstream):
    apps = [{"name": "hello", "uri": upstream.uri, "labels": {"team": "sre"}},
            {"name": "down", "uri": f"http://127.0.0.1:{free_port()}", "labels": {"team": "sre"}}]
    c = Cluster(apps)
    try:
        c.start_proxy()
        c.add_role({"kind": "role", "metadata": {"name": "sre"},
                    "spec": {"allow": {"app_labels": {"team": "sre"}}}})
        c.add_user("alice", ["sre"], PASSWORD)
        c.start_agent()
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def alice(cluster):
    browser = Browser(cluster)
    wait_until(lambda: any(n == "apptunnel_tunnels" for n, _ in scrape(cluster.diag_port)),
               30, "the agent's tunnel on the proxy's /metrics")
    landed = wait_until(lambda: _landed(browser, cluster), 30, "hello to be served")
    assert landed.status_code == 200, landed.text
    return browser


def _landed(browser: Browser, cluster: Cluster):
    r = browser.login_through(cluster.url("hello", "/echo?first=1"), "alice", PASSWORD) \
        if not browser.session.cookies else browser.get(cluster.url("hello", "/echo?first=1"))
    return r if r.status_code == 200 else None


def test_requests_move_the_counters_by_exactly_their_number(cluster, alice):
    """N requests to an app: its (app, 200) counter and its histogram count grow by N; the
    sign-in is counted by method and outcome; tunnels, backend and audit gauges are there."""
    before = scrape(cluster.diag_port)
    for n in range(REQUESTS):
        assert alice.get(cluster.url("hello", f"/echo?n={n}")).status_code == 200
    after = scrape(cluster.diag_port)
    grew = (value(after, "apptunnel_http_requests_total", app="hello", code="200")
            - value(before, "apptunnel_http_requests_total", app="hello", code="200"))
    assert grew == REQUESTS
    timed = (value(after, "apptunnel_http_request_duration_seconds_count", app="hello")
             - value(before, "apptunnel_http_request_duration_seconds_count", app="hello"))
    assert timed == REQUESTS
    assert value(after, "apptunnel_http_request_duration_seconds_bucket", app="hello",
                 le="+Inf") >= REQUESTS
    assert value(after, "apptunnel_logins_total", method="password", outcome="success") >= 1
    agents = [dict(labels)["agent"] for name, labels in after if name == "apptunnel_tunnels"]
    assert len(agents) == 1
    assert value(after, "apptunnel_tunnels", agent=agents[0]) == 1
    assert ("apptunnel_audit_queue_depth", ()) in after
    assert value(after, "apptunnel_backend_operation_duration_seconds_count",
                 operation="list_locks") >= 1
    assert value(after, "process_open_fds") > 0


def test_hosts_and_paths_never_become_labels(cluster, alice):
    """Requests for unknown hosts and odd paths add no label value chosen by the client."""
    for n in range(5):
        alice.get(cluster.url(f"nosuch{n}", f"/x{n}"))
        alice.get(cluster.url("hello", f"/weird-path-{n}"))
    text = requests.get(f"http://127.0.0.1:{cluster.diag_port}/metrics", timeout=5).text
    assert "nosuch" not in text and "weird-path" not in text
    assert value(scrape(cluster.diag_port), "apptunnel_http_requests_total", app="",
                 code="404") >= 5


def test_failed_sign_ins_are_counted(cluster):
    before = scrape(cluster.diag_port)
    with localhost_resolution():
        r = requests.post(cluster.url(path="/v1/sessions"), verify=cluster.ca_file, timeout=10,
                          json={"username": "alice", "password": "wrong"})
    assert r.status_code == 401
    after = scrape(cluster.diag_port)
    assert (value(after, "apptunnel_logins_total", method="password", outcome="failure")
            - value(before, "apptunnel_logins_total", method="password", outcome="failure")) == 1


def test_health_and_readiness_on_the_diag_and_web_ports(cluster, alice):
    """/healthz and /readyz answer the same JSON on the diag listener and the web port."""
    diag = f"http://127.0.0.1:{cluster.diag_port}"
    assert requests.get(diag + "/healthz", timeout=5).json() == {"status": "ok"}
    ready = requests.get(diag + "/readyz", timeout=5)
    assert ready.status_code == 200
    assert ready.json() == {"status": "ok", "checks": {"audit": "ok", "backend": "ok",
                                                      "listeners": "ok"}}
    with localhost_resolution():
        web = requests.get(cluster.url(path="/readyz"), verify=cluster.ca_file, timeout=5)
        health = requests.get(cluster.url(path="/healthz"), verify=cluster.ca_file, timeout=5)
    assert web.status_code == 200 and web.json() == ready.json()
    assert health.json() == {"status": "ok"}
    assert requests.get(diag + "/nothing", timeout=5).status_code == 404
    assert requests.post(diag + "/metrics", timeout=5).status_code == 405


def test_the_agent_has_its_own_metrics_and_health(cluster, alice):
    """The agent's diag port: one tunnel to the proxy, an unreachable app counted."""
    port = cluster.agent_diag_port
    before = scrape(port)
    proxies = [dict(labels)["proxy"] for name, labels in before if name == "apptunnel_agent_tunnels"]
    assert len(proxies) == 1
    r = alice.get(cluster.url("down", "/"))
    assert r.status_code == 502, r.text
    after = scrape(port)
    assert (value(after, "apptunnel_agent_upstream_errors_total", app="down")
            - value(before, "apptunnel_agent_upstream_errors_total", app="down")) == 1
    assert requests.get(f"http://127.0.0.1:{port}/readyz", timeout=5).json() == {
        "status": "ok", "checks": {"listeners": "ok", "tunnel": "ok"}}


def test_garbage_and_slowloris_get_a_closed_connection_and_never_block(cluster):
    """Garbage is answered 400 and closed; a head sent a byte at a time is cut after the
    head deadline; meanwhile scrapes are answered at once (the reactor is free)."""
    with socket.create_connection(("127.0.0.1", cluster.diag_port), timeout=5) as s:
        s.sendall(b"\x16\x03\x01garbage\xff\xfe\r\n\r\n")
        got = _read_until_closed(s, 5)
    assert got == b"" or got.startswith(b"HTTP/1.1 400"), got
    slow = socket.create_connection(("127.0.0.1", cluster.diag_port), timeout=10)
    try:
        slow.sendall(b"GET /metrics HTTP/1.1\r\n")
        started = time.monotonic()
        closed = False
        for n in range(20):                     # at most 20 s of drip
            try:
                slow.sendall(b"X-Drip-%d: y\r\n" % n)
            except OSError:
                closed = True
                break
            t0 = time.monotonic()
            assert requests.get(f"http://127.0.0.1:{cluster.diag_port}/healthz",
                                timeout=2).status_code == 200
            assert time.monotonic() - t0 < 1.0
            slow.settimeout(1.0)
            try:
                if slow.recv(1024) == b"":
                    closed = True
                    break
            except TimeoutError:
                pass
            except OSError:
                closed = True
                break
        assert closed, "a dripped head was never cut"
        assert time.monotonic() - started < 10
    finally:
        slow.close()
    assert "Traceback" not in (cluster.root / "proxy.log").read_text()


def _read_until_closed(s: socket.socket, timeout: float) -> bytes:
    deadline = time.monotonic() + timeout
    data = b""
    while time.monotonic() < deadline:
        try:
            chunk = s.recv(4096)
        except (ConnectionResetError, TimeoutError):
            break
        if not chunk:
            break
        data += chunk
    else:
        raise AssertionError("connection still open")
    return data


def exported_names(port: int) -> set[str]:
    """Every series name /metrics can carry, also for families with no sample yet (a
    labelled counter before its first increment has only its HELP and TYPE lines)."""
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    names = set()
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count"),
                "gauge": ("",), "summary": ("_sum", "_count")}
    for family in text_string_to_metric_families(text):
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


def test_every_dashboard_query_names_metrics_the_proxy_exports(cluster, alice):
    """etc/grafana-apptunnel.json: each PromQL expression (and the job variable's query)
    names only series a real proxy exposes, so no panel is silently empty."""
    dashboard = json.loads((Path(__file__).resolve().parents[2] / "etc" /
                            "grafana-apptunnel.json").read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    queries += [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    assert len(queries) >= 12
    exported = exported_names(cluster.diag_port)
    used = set()
    for query in queries:
        names = set(re.findall(r"\b((?:apptunnel|process)_[a-z0-9_]+)\b", query))
        assert names, query
        used |= names
        assert names <= exported, f"{query}: {sorted(names - exported)} not exported"
    for wanted in ("apptunnel_http_requests_total", "apptunnel_streams", "apptunnel_tunnels",
                   "apptunnel_logins_total", "apptunnel_audit_queue_depth",
                   "apptunnel_http_request_duration_seconds_bucket",
                   "apptunnel_backend_operation_duration_seconds_bucket"):
        assert wanted in used, f"the dashboard has no panel for {wanted}"


# -- readiness follows PostgreSQL ----------------------------------------------------------


@pytest.fixture
def postgres():
    server = PostgresServer().start()
    try:
        yield server
    finally:
        server.stop()


def test_readyz_is_503_while_postgresql_is_down_and_200_once_it_is_back(tmp_path, postgres):
    """Stop PostgreSQL: /readyz says 503 naming the backend (liveness stays 200); start it
    again: /readyz is 200 within seconds, nothing restarted."""
    db = postgres.new_database()
    cluster = Cluster([], root=tmp_path)
    try:
        config = yaml.safe_load(cluster.proxy_config.read_text())
        pw = tmp_path / "pg-password"
        pw.write_text(db["password"] + "\n")
        os.chmod(pw, 0o600)
        config["backend"] = {"type": "postgres", "dsn": db["dsn"], "password_file": str(pw)}
        cluster.proxy_config.write_text(yaml.safe_dump(config))
        cluster.start_proxy()
        url = f"http://127.0.0.1:{cluster.diag_port}"
        assert requests.get(url + "/readyz", timeout=10).status_code == 200
        postgres.halt()
        down = wait_until(lambda: _ready(url, 503), 15, "/readyz to fail")
        assert down["status"] == "unavailable" and down["checks"]["backend"] != "ok"
        assert down["checks"]["listeners"] == "ok"
        assert requests.get(url + "/healthz", timeout=5).status_code == 200
        postgres.resume()
        back = wait_until(lambda: _ready(url, 200), 15, "/readyz to pass again")
        assert back["checks"]["backend"] == "ok"
    finally:
        cluster.stop()


def _ready(url: str, status: int):
    r = requests.get(url + "/readyz", timeout=10)
    return r.json() if r.status_code == status else None


# -- a busy diag port ----------------------------------------------------------------------


def test_a_busy_diag_port_ends_the_proxy_with_one_line(tmp_path):
    """diag_addr taken by something else: exit 1, one line naming diag_addr, never serving."""
    cluster = Cluster([], root=tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        doc = yaml.safe_load(cluster.proxy_config.read_text())
        doc["diag_addr"] = f"127.0.0.1:{port}"
        cluster.proxy_config.write_text(yaml.safe_dump(doc))
        result = subprocess.run([str(BIN / "twistd"), "-n", "--pidfile=", "apptunnel", "--config",
                                 str(cluster.proxy_config)], cwd=tmp_path, capture_output=True,
                                text=True, timeout=60, stdin=subprocess.DEVNULL)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output and "serving" not in output, output
    lines = [line for line in output.splitlines() if "#critical]" in line or "#error]" in line]
    assert len(lines) == 1, output
    assert f"diag_addr 127.0.0.1:{port}" in lines[0] and "address already in use" in lines[0]


def test_keepalive_rtt_is_exported_and_the_agent_is_unready_without_its_tunnel(cluster, alice):
    """Keepalive pings (1 s here) give a round-trip time on both ends; with the proxy gone
    the agent's /readyz is 503 naming the tunnel while /healthz stays 200. Runs last: it
    stops the module's proxy."""
    def rtt(port: int, name: str):
        return [v for (n, _), v in scrape(port).items() if n == name]

    proxy_rtt = wait_until(lambda: rtt(cluster.diag_port, "apptunnel_tunnel_rtt_seconds"), 15,
                           "a keepalive round trip on the proxy")
    agent_rtt = wait_until(lambda: rtt(cluster.agent_diag_port,
                                       "apptunnel_agent_tunnel_rtt_seconds"), 15,
                           "a keepalive round trip on the agent")
    assert 0 <= proxy_rtt[0] < 5 and 0 <= agent_rtt[0] < 5
    cluster.proxy.stop()
    url = f"http://127.0.0.1:{cluster.agent_diag_port}"
    down = wait_until(lambda: _ready(url, 503), 15, "the agent's /readyz to fail")
    assert down["checks"] == {"listeners": "ok", "tunnel": "failing"}
    assert requests.get(url + "/healthz", timeout=5).status_code == 200
