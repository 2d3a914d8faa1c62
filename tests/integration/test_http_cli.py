"""HTTP apps from the command line on a real cluster: `apptunnel proxy app` for an HTTP
app, `apptunnel apps config` run with the real curl, and a lock cutting a live keep-alive
connection of the local proxy.

Everything runs as installed commands (proxy, agent, CLI) in subprocesses stopped by the
PID we hold; every wait is bounded.
"""

from __future__ import annotations

import http.client
import json
import shlex
import subprocess

import jwt as pyjwt
import pytest
import requests

from tests.support.cli_user import ca_pin, log_in, start, user_env
from tests.support.cluster import BIN, Cluster, free_port, wait_until
from tests.support.localhost import localhost_resolution
from tests.support.upstream import HttpUpstream

PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="module")
def cluster():
    upstream = HttpUpstream()
    c = Cluster([{"name": "hello", "uri": upstream.uri, "labels": {"env": "dev"}}])
    try:
        c.start_proxy()
        c.add_role({"kind": "role", "metadata": {"name": "dev"},
                    "spec": {"allow": {"app_labels": {"env": "dev"}}}})
        c.add_role({"kind": "role", "metadata": {"name": "ops"},
                    "spec": {"allow": {"app_labels": {"env": "prod"}}}})
        for name, role in (("alice", "dev"), ("bob", "ops"), ("carol", "dev")):
            c.add_user(name, [role], PASSWORD)
        c.start_agent()
        yield c
    finally:
        c.stop()
        upstream.stop()


@pytest.fixture(scope="module")
def homes(cluster, tmp_path_factory):
    """alice, bob and carol logged in with the installed `apptunnel login`."""
    pin = ca_pin(cluster)
    homes = {}
    for name in ("alice", "bob", "carol"):
        homes[name] = tmp_path_factory.mktemp(name) / ".apptunnel"
        log_in(cluster, name, homes[name], PASSWORD, pin)

    def online():
        out = subprocess.run([str(BIN / "apptunnel"), "apps", "ls", "--format", "json"],
                             capture_output=True, text=True, timeout=30,
                             env=user_env(homes["alice"])).stdout
        return any(a["name"] == "hello" and a["online"] for a in json.loads(out)["apps"])
    wait_until(online, 30, "hello to be online in alice's apps ls")
    return homes


def curl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "--max-time", "20", *args], capture_output=True,
                          text=True, timeout=30)


def jwt_claims(cluster: Cluster, token: str) -> dict:
    with localhost_resolution():
        jwks = requests.get(cluster.url(path="/.well-known/jwks.json"), verify=cluster.ca_file,
                            timeout=5).json()
    key = pyjwt.PyJWKSet.from_dict(jwks)[pyjwt.get_unverified_header(token)["kid"]]
    return pyjwt.decode(token, key.key, algorithms=["RS256"], issuer="e2e",
                        audience=f"https://hello.apptunnel.localhost:{cluster.web_port}")


def values(echo: dict, name: str) -> list[str]:
    return [v for k, v in echo["headers"] if k.lower() == name.lower()]


def test_curl_through_proxy_app_gets_the_users_identity(cluster, homes):
    """curl on the local port reaches the app with one verifiable JWT and X-Forwarded-*."""
    local = free_port()
    proxy = start(homes["alice"], "hello", str(local))
    try:
        r = curl("-H", "Apptunnel-Jwt-Assertion: forged", "-H", "X-Forwarded-For: 6.6.6.6",
                 f"http://127.0.0.1:{local}/echo")
    finally:
        proxy.stop()
    assert r.returncode == 0, r.stderr + proxy.log()
    echo = json.loads(r.stdout)
    assert echo["path"] == "/echo"
    tokens = values(echo, "Apptunnel-Jwt-Assertion")
    assert len(tokens) == 1 and tokens[0] != "forged"
    claims = jwt_claims(cluster, tokens[0])
    assert claims["sub"] == "alice" and claims["roles"] == ["dev"]
    assert values(echo, "X-Forwarded-For") == ["127.0.0.1"]
    assert values(echo, "X-Forwarded-Proto") == ["https"]
    assert values(echo, "X-Forwarded-Host") == [f"hello.apptunnel.localhost:{cluster.web_port}"]


def test_proxy_app_refuses_a_user_the_role_does_not_allow(cluster, homes):
    """bob (role ops) gets one 403 line from proxy app; curl gets no response."""
    local = free_port()
    proxy = start(homes["bob"], "hello", str(local))
    try:
        r = curl(f"http://127.0.0.1:{local}/echo")
        wait_until(lambda: "proxy refused" in proxy.log(), 10, "the refusal line")
    finally:
        proxy.stop()
    assert r.returncode != 0
    assert "apptunnel: proxy refused: 403 Forbidden: you are not allowed to use hello" in proxy.log()


def test_apps_config_curl_line_reaches_the_app(cluster, homes):
    """The curl line printed by apps config, run as printed, reaches the app as alice."""
    out = subprocess.run([str(BIN / "apptunnel"), "apps", "config", "hello", "--format", "curl"],
                         capture_output=True, text=True, timeout=30, env=user_env(homes["alice"]))
    assert out.returncode == 0, out.stderr
    argv = shlex.split(out.stdout)
    assert argv[0] == "curl" and argv[-1] == f"https://hello.apptunnel.localhost:{cluster.web_port}/"
    argv[-1] += "echo"
    r = curl(*argv[1:])
    assert r.returncode == 0, r.stderr
    tokens = values(json.loads(r.stdout), "Apptunnel-Jwt-Assertion")
    assert len(tokens) == 1 and jwt_claims(cluster, tokens[0])["username"] == "alice"


def test_lock_cuts_a_live_keep_alive_connection(cluster, homes):
    """A lock on carol closes her open keep-alive connection; new requests are refused."""
    local = free_port()
    proxy = start(homes["carol"], "hello", str(local))
    conn = http.client.HTTPConnection("127.0.0.1", local, timeout=20)
    lock_id = None
    try:
        for _ in range(2):
            conn.request("GET", "/echo")
            response = conn.getresponse()
            assert response.status == 200 and json.loads(response.read())["path"] == "/echo"
        lock_id = cluster.cli("lock", "--user", "carol", "--message", "incident 7").stdout.split()[0]
        conn.sock.settimeout(15)
        try:
            assert conn.sock.recv(1) == b""  # closed by the proxy, not by us
        except ConnectionResetError:
            pass
        r = curl(f"http://127.0.0.1:{local}/echo")
        assert r.returncode != 0
        wait_until(lambda: "your access is locked: incident 7" in proxy.log(), 10, "the lock line")
        wait_until(lambda: "live connection" in cluster.cli(
            "audit", "search", "--type", "lock.enforced", "--format", "json").stdout,
            10, "lock.enforced for the cut connection in the audit log", interval=0.3)
    finally:
        conn.close()
        proxy.stop()
        if lock_id:
            cluster.cli("locks", "rm", lock_id)
