"""HTTP apps from the command line on a real cluster: `apptunnel proxy app` for an HTTP
app, `apptunnel apps config` run with the real curl, a lock cutting a live keep-alive
connection of the local proxy, and `proxy app` asking the proxy before it listens (every
refusal exits 1 with one line; a refused request on a running one is an HTTP answer).

Everything runs as installed commands (proxy, agent, CLI) in subprocesses stopped by the
PID we hold; every wait is bounded.
"""

from __future__ import annotations

import http.client
import json
import shlex
import socket
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
    c = Cluster([
        {"name": "hello", "uri": upstream.uri, "labels": {"env": "dev"}},
        {"name": "prod-web", "uri": upstream.uri, "labels": {"env": "prod-only"}},
        # TCP apps nobody dials here: the checks before listening are all the proxy's.
        {"name": "db", "uri": f"tcp://127.0.0.1:{free_port()}", "labels": {"env": "dev"}},
        {"name": "multi", "uri": "tcp://127.0.0.1", "labels": {"env": "dev"},
         "tcp_ports": [free_port()]},
    ])
    try:
        c.start_proxy()
        c.add_role({"kind": "role", "metadata": {"name": "dev"},
                    "spec": {"allow": {"app_labels": {"env": "dev"}}}})
        c.add_role({"kind": "role", "metadata": {"name": "ops"},
                    "spec": {"allow": {"app_labels": {"env": "prod"}}}})
        for name, role in (("alice", "dev"), ("bob", "ops"), ("carol", "dev"), ("dave", "dev")):
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
    for name in ("alice", "bob", "carol", "dave"):
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


def proxy_app_once(home, name: str, spec: str) -> subprocess.CompletedProcess:
    """`apptunnel proxy app` expected to stop by itself (a refusal before listening)."""
    return subprocess.run([str(BIN / "apptunnel"), "proxy", "app", name, "--port", spec],
                          capture_output=True, text=True, timeout=30, env=user_env(home))


def assert_refused_before_listening(result: subprocess.CompletedProcess, port: int,
                                    line: str) -> None:
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout == ""   # never "Proxying connections..."
    assert result.stderr == f"apptunnel: error: {line}\n"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


@pytest.mark.parametrize("user, app, remote, line", [
    ("bob", "hello", None, "proxy refused: 403 Forbidden: you are not allowed to use hello"),
    ("alice", "prod-web", None, "proxy refused: 403 Forbidden: you are not allowed to use prod-web"),
    ("alice", "nope", None, "proxy refused: 404 Not Found: no app named 'nope'"),
    ("alice", "hello", 8080, "proxy refused: 400 Bad Request: hello is an HTTP app: it takes no port"),
    ("alice", "multi", 22, "proxy refused: 403 Forbidden: port 22 is not served by multi"),
    ("alice", "multi", None, "proxy refused: 403 Forbidden: multi serves several ports: name one"),
])
def test_proxy_app_refusals_exit_1_with_the_proxys_line(cluster, homes, user, app, remote, line):
    """Unknown, denied, a port on an HTTP app, an undeclared or missing port: exit 1, one line."""
    local = free_port()
    spec = str(local) if remote is None else f"{local}:{remote}"
    assert_refused_before_listening(proxy_app_once(homes[user], app, spec), local, line)


def test_proxy_app_of_a_locked_user_exits_1(cluster, homes):
    """A locked user's proxy app exits 1 with the lock's message and listens on nothing."""
    lock_id = cluster.cli("lock", "--user", "dave", "--message", "audit 12").stdout.split()[0]
    try:
        local = free_port()
        assert_refused_before_listening(
            proxy_app_once(homes["dave"], "db", str(local)), local,
            "proxy refused: 403 Forbidden: your access is locked: audit 12")
    finally:
        cluster.cli("locks", "rm", lock_id)


def test_proxy_app_with_an_expired_certificate_exits_1(cluster, tmp_path):
    """An expired login exits 1 with the login hint before anything listens."""
    cluster.add_user("erin", ["dev"], PASSWORD)
    home = tmp_path / ".apptunnel"
    log_in(cluster, "erin", home, PASSWORD, ca_pin(cluster), "--ttl", "1s")
    wait_until(lambda: subprocess.run([str(BIN / "apptunnel"), "status"], capture_output=True,
                                      timeout=30, env=user_env(home)).returncode == 1,
               10, "erin's certificate to expire", interval=0.3)
    local = free_port()
    assert_refused_before_listening(proxy_app_once(home, "hello", str(local)), local,
                                    "certificate expired: run apptunnel login")


def test_proxy_app_for_a_tcp_app_starts(cluster, homes):
    """An allowed TCP app passes the check and listens (the dry run opened no stream)."""
    proxy = start(homes["alice"], "db", str(free_port()))
    proxy.stop()


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
        # A refused request on the running proxy app is an HTTP answer, not an empty reply.
        r = curl("-i", f"http://127.0.0.1:{local}/echo")
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith("HTTP/1.1 403 Forbidden\n"), r.stdout  # text mode: \r\n -> \n
        assert r.stdout.endswith("\n\nyour access is locked: incident 7\n"), r.stdout
        wait_until(lambda: "your access is locked: incident 7" in proxy.log(), 10, "the lock line")
        wait_until(lambda: "live connection" in cluster.cli(
            "audit", "search", "--type", "lock.enforced", "--format", "json").stdout,
            10, "lock.enforced for the cut connection in the audit log", interval=0.3)
    finally:
        conn.close()
        proxy.stop()
        if lock_id:
            cluster.cli("locks", "rm", lock_id)
