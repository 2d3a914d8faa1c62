"""Trust between agents and the proxy, end to end (issue 8, findings 1, 12 and part of 13).

The installed proxy and agents run as processes, with real upstreams on loopback. Agent
certificates live 30 s here, so every agent of this module renews over its tunnel all
the time (and the renewal test watches it happen).
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from apptunnel.agent.service import VERSION
from tests.support.cluster import BIN, Browser, Child, Cluster, audit, wait_until
from tests.support.upstream import HttpUpstream

PASSWORD = "correct horse battery staple"
WAIT = 20
CERT_TTL = 30   # long enough that an agent stopped for a while under load comes back


class RogueUpstream:
    """The attacker's app: answers every request with ROGUE and counts them."""

    def __init__(self):
        hits = self.hits = []

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                hits.append(self.path)
                self.send_response(200)
                self.send_header("Content-Length", "5")
                self.end_headers()
                self.wfile.write(b"ROGUE")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.uri = f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


class Agent:
    """One more agent process of the cluster, in its own data dir."""

    def __init__(self, cluster: Cluster, name: str, apps: list[dict], token: dict | None):
        self.cluster, self.name, self.apps = cluster, name, apps
        self.data_dir = cluster.root / name
        self.config = cluster.root / f"{name}.yaml"
        self.child: Child | None = None
        self.start(token)

    def start(self, token: dict | None = None) -> None:
        config = {
            "data_dir": str(self.data_dir),
            "proxy_addr": f"127.0.0.1:{self.cluster.tunnel_port}",
            "diag_addr": "127.0.0.1:0",
            "keepalive": {"interval": "1s", "timeout": "3s"},
            "apps": self.apps,
        }
        if token is not None:
            config["join"] = {"token": token["token"], "ca_pin": token["ca_pin"]}
        self.config.write_text(yaml.safe_dump(config))
        self.child = Child(self.name, [str(BIN / "twistd"), "-n", "--pidfile=", "apptunnel-agent",
                                       "--config", str(self.config)],
                           self.cluster.root, self.cluster.root / f"{self.name}.log")

    @property
    def host_id(self) -> str:
        return (self.data_dir / "host_id").read_text().strip()

    def log(self) -> str:
        return self.child.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop()


def token(cluster: Cluster, *args: str) -> dict:
    return json.loads(cluster.cli("tokens", "add", "--format", "json", *args).stdout)


def agents(cluster: Cluster) -> dict[str, dict]:
    return {a["id"]: a for a in json.loads(cluster.cli("agents", "ls", "--format", "json").stdout)}


def refusals(cluster: Cluster, app: str) -> list[dict]:
    return [e for e in audit(cluster, "agent.app.refused") if e["target"] == app]


@pytest.fixture(scope="module")
def upstream():
    u = HttpUpstream()
    yield u
    u.stop()


@pytest.fixture(scope="module")
def cluster(upstream):
    c = Cluster([{"name": "echo", "uri": upstream.uri, "labels": {"team": "a"}}])
    config = yaml.safe_load(c.proxy_config.read_text())
    config["agent_cert_ttl"] = f"{CERT_TTL}s"
    config["allowed_public_addrs"] = [f"127.0.0.1:{c.web_port}"]
    c.proxy_config.write_text(yaml.safe_dump(config))
    try:
        c.start_proxy()
        for team in ("a", "b"):
            c.add_role({"kind": "role", "metadata": {"name": f"team-{team}"},
                        "spec": {"allow": {"app_labels": {"team": team}}}})
        c.add_user("alice", ["team-a"], PASSWORD)
        c.add_user("bob", ["team-b"], PASSWORD)
        c.start_agent()
        wait_until(lambda: "echo" in _serving(c), WAIT, "the agent to serve echo")
        yield c
    finally:
        c.stop()


def _serving(cluster: Cluster) -> set[str]:
    if not cluster.agent.alive():
        raise AssertionError("agent exited:\n" + cluster.agent.log_tail())
    return {app for a in agents(cluster).values() if a["connected_since"] for app in a["apps"]}


def test_single_use_token_cannot_join_a_second_agent(cluster):
    """A new token is single-use: a second agent joining with it is refused (and audited),
    and tokens ls shows no use left."""
    secret = token(cluster)
    first = Agent(cluster, "first", [], secret)
    second = None
    try:
        wait_until(lambda: (first.data_dir / "agent.crt").exists(), WAIT, "the first join")
        second = Agent(cluster, "second", [], secret)
        wait_until(lambda: "refused the join" in second.log(), WAIT, "the second join refused")
        assert not (second.data_dir / "agent.crt").exists()
        [listed] = [t for t in json.loads(cluster.cli("tokens", "ls", "--format", "json").stdout)
                    if t["expires"] == secret["expires"]]
        assert listed["uses_left"] == 0
        wait_until(lambda: "token used up" in [
            e["fields"].get("reason") for e in audit(cluster, "agent.join")
            if e["outcome"] == "failure"], WAIT, "the refused join in the audit log")
    finally:
        first.stop()
        if second is not None:
            second.stop()


def test_token_scope_holds_after_restart(cluster, upstream):
    """An agent whose token allows app scoped-a cannot announce scoped-b, also after a
    restart with its certificate (no token any more)."""
    apps = [{"name": "scoped-a", "uri": upstream.uri}, {"name": "scoped-b", "uri": upstream.uri}]
    agent = Agent(cluster, "scoped", apps, token(cluster, "--apps", "scoped-a"))
    try:
        wait_until(lambda: "scoped-a" in _serving(cluster), WAIT, "scoped-a online")
        assert "scoped-b" not in _serving(cluster)
        wait_until(lambda: "the proxy refused app scoped-b" in agent.log(), WAIT,
                   "the agent's line about scoped-b")
        agent.stop()
        agent.start()                       # restart: certificate, no token
        wait_until(lambda: agent.log().count("the proxy refused app scoped-b") == 2, WAIT,
                   "scoped-b refused again after the restart")
        assert agents(cluster)[agent.host_id]["apps"] == ["scoped-a"]
        wait_until(lambda: len(refusals(cluster, "scoped-b")) == 2, WAIT,
                   "two agent.app.refused for scoped-b")
    finally:
        agent.stop()


def test_rogue_agent_cannot_take_over_an_app(cluster):
    """A second agent announcing echo with other labels, another upstream and an
    X-Webauth-User rewrite is refused for echo (its own app registers): every request goes
    to the real upstream, bob (team b) stays out, also when the rogue re-announces while
    the real agent is away and after the real agent is back."""
    rogue_app = RogueUpstream()
    rogue = Agent(cluster, "rogue", [
        {"name": "echo", "uri": rogue_app.uri, "labels": {"team": "b"},
         "rewrite": {"headers": ["X-Webauth-User: admin"]}},
        {"name": "rogue-own", "uri": rogue_app.uri, "labels": {"team": "b"}},
    ], token(cluster))
    try:
        wait_until(lambda: "rogue-own" in _serving(cluster), WAIT, "the rogue's own app")
        wait_until(lambda: refusals(cluster, "echo"), WAIT, "agent.app.refused for echo")
        assert "already defined differently" in refusals(cluster, "echo")[0]["fields"]["reason"]
        wait_until(lambda: "the proxy refused app echo" in rogue.log(), WAIT,
                   "the rogue's line about echo")

        alice = Browser(cluster)
        assert alice.login_through(cluster.url("echo", "/echo?n=0"), "alice", PASSWORD).status_code == 200
        for n in range(1, 9):
            r = alice.get(cluster.url("echo", f"/echo?n={n}"))
            assert r.status_code == 200 and f"n={n}" in r.text and "ROGUE" not in r.text
            assert "admin" not in r.text
        bob = Browser(cluster)
        assert bob.login_through(cluster.url("echo", "/echo"), "bob", PASSWORD).status_code == 403

        cluster.agent.stop()                 # the real agent goes away...
        rogue.stop()
        rogue.start()                        # ...and the rogue announces again meanwhile
        wait_until(lambda: len(refusals(cluster, "echo")) >= 2, WAIT, "echo refused again")
        cluster.start_agent()                # the real agent is back
        # (not the agents table: it may still show the old tunnel until the proxy saw it go)
        again = wait_until(lambda: (r := alice.get(cluster.url("echo", "/echo?back=1")))
                           .status_code == 200 and r, WAIT, "echo served again")
        assert "back=1" in again.text and "ROGUE" not in again.text
        assert bob.get(cluster.url("echo", "/echo")).status_code == 403
        assert rogue_app.hits == []
    finally:
        rogue.stop()
        rogue_app.stop()


def test_lock_agent_cuts_its_tunnel_and_agents_ls_shows_it(cluster, upstream):
    """agents ls lists id, host, apps and connected since; lock --agent cuts the tunnel
    within the poll interval, and the refused agent logs one line per attempt, no
    traceback (no automat NoTransition)."""
    agent = Agent(cluster, "lockme", [{"name": "lockme-app", "uri": upstream.uri}], token(cluster))
    try:
        wait_until(lambda: "lockme-app" in _serving(cluster), WAIT, "lockme-app online")
        row = agents(cluster)[agent.host_id]
        assert row["apps"] == ["lockme-app"] and row["host"].startswith("127.0.0.1:")
        assert row["connected_since"] and row["locked"] is False
        assert row["version"] == VERSION         # what its hello said it runs
        cluster.cli("lock", "--agent", agent.host_id)
        wait_until(lambda: agents(cluster)[agent.host_id]["connected_since"] is None, 10,
                   "the locked agent's tunnel to be cut")
        wait_until(lambda: agent.log().count("refused this agent: this agent is locked") >= 2,
                   WAIT, "two refused reconnects")
        assert agents(cluster)[agent.host_id]["locked"] is True
        log = agent.log()
        assert "Traceback" not in log and "NoTransition" not in log
        wait_until(lambda: [e for e in audit(cluster, "lock.enforced")
                            if e["actor"] == agent.host_id], WAIT, "lock.enforced audited")
    finally:
        agent.stop()


def test_certificate_is_renewed_and_the_tunnel_stays_up(cluster):
    """With a 30 s certificate the agent renews over its tunnel: agent.crt changes, the
    tunnel that was up before the first certificate expired is still the one serving."""
    crt = cluster.root / "agent" / "agent.crt"
    first = x509.load_pem_x509_certificate(crt.read_bytes())
    since = agents(cluster)[(cluster.root / "agent" / "host_id").read_text().strip()]
    # Renewal comes at two thirds of the remaining life: within CERT_TTL.
    wait_until(lambda: crt.read_bytes() != first.public_bytes(Encoding.PEM), CERT_TTL + WAIT,
               "a renewed agent.crt")
    renewed = x509.load_pem_x509_certificate(crt.read_bytes())
    assert renewed.not_valid_after_utc > first.not_valid_after_utc
    assert renewed.public_key().public_numbers() == first.public_key().public_numbers()
    wait_until(lambda: time.time() > first.not_valid_after_utc.timestamp() + 1, CERT_TTL + WAIT,
               "the first certificate to expire")
    now = agents(cluster)[since["id"]]
    assert now["connected_since"] == since["connected_since"]
    alice = Browser(cluster)
    assert alice.login_through(cluster.url("echo", "/echo"), "alice", PASSWORD).status_code == 200


def test_public_addr_outside_public_host_needs_the_allow_list(cluster, upstream):
    """localhost:PORT (in the proxy's certificate) is refused; 127.0.0.1:PORT, which the
    operator allowed, is served."""
    port = cluster.web_port
    agent = Agent(cluster, "addrs", [
        {"name": "local", "uri": upstream.uri, "public_addr": f"localhost:{port}"},
        {"name": "loopback", "uri": upstream.uri, "public_addr": f"127.0.0.1:{port}"},
    ], token(cluster))
    try:
        wait_until(lambda: "loopback" in _serving(cluster), WAIT, "loopback online")
        assert "local" not in _serving(cluster)
        wait_until(lambda: refusals(cluster, "local"), WAIT, "agent.app.refused for local")
        assert "allowed_public_addrs" in refusals(cluster, "local")[0]["fields"]["reason"]
        s = requests.Session()
        s.trust_env = False
        r = s.get(f"https://localhost:{port}/", verify=cluster.ca_file, allow_redirects=False,
                  timeout=10)
        assert r.status_code in (404, 421)   # not an app host: nothing routes there
        r = s.get(f"https://127.0.0.1:{port}/", verify=cluster.ca_file, allow_redirects=False,
                  timeout=10)
        assert r.status_code in (302, 303) and "/web/launch/loopback" in r.headers["Location"]
    finally:
        agent.stop()
