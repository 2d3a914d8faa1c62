"""Identity revocation end to end: the installed proxy, agent and CLI, a real HTTP app, a
real WebSocket echo and a real TCP echo server, users signed in with `apptunnel login`.

`users rm`, `users update --roles` and `lock` hold on the proxy before the command
returns (the control socket); certificates and live connections of the user end with
them. Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import pwd
import socket
import socketserver
import ssl
import subprocess
import threading
from pathlib import Path

import pytest
import requests

from tests.support.cli_user import ca_pin, log_in, start, user_env
from tests.support.cluster import BIN, Browser, Cluster, audit, free_port, wait_until
from tests.support.localhost import localhost_resolution
from tests.support.upstream import HttpUpstream, WebSocketEcho

PASSWORD = "correct horse battery staple"
CUT_WITHIN = 3.0   # the poll interval (2 s) and some slack; the CLI makes it at once


class _EchoHandler(socketserver.BaseRequestHandler):
    def handle(self):
        while data := self.request.recv(65536):
            self.request.sendall(data)


class TcpEcho:
    """A real TCP echo server on a free loopback port, in threads."""

    def __init__(self):
        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _EchoHandler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def cluster():
    http, ws, tcp = HttpUpstream(), WebSocketEcho(), TcpEcho()
    c = Cluster([
        {"name": "hello", "uri": http.uri, "labels": {"env": "dev"}},
        {"name": "echo-ws", "uri": ws.uri, "labels": {"env": "dev"}},
        {"name": "pipe", "uri": f"tcp://127.0.0.1:{tcp.port}", "labels": {"env": "dev"}},
        {"name": "prod", "uri": http.uri, "labels": {"env": "prod"}},
    ])
    try:
        c.start_proxy()
        c.add_role({"kind": "role", "metadata": {"name": "dev"},
                    "spec": {"allow": {"app_labels": {"env": "dev"}}}})
        c.add_role({"kind": "role", "metadata": {"name": "ops"},
                    "spec": {"allow": {"app_labels": {"env": "prod"}}}})
        for name, roles in (("bob", ["dev"]), ("carol", ["dev", "ops"]), ("dave", ["dev"]),
                            ("erin", ["dev"])):
            c.add_user(name, roles, PASSWORD)
        c.start_agent()
        yield c
    finally:
        c.stop()
        for upstream in (http, ws, tcp):
            upstream.stop()


@pytest.fixture(scope="module")
def homes(cluster, tmp_path_factory):
    """Each user logged in with the installed `apptunnel login` in their own home."""
    pin = ca_pin(cluster)
    homes = {}
    for name in ("bob", "carol", "dave", "erin"):
        homes[name] = tmp_path_factory.mktemp(name) / ".apptunnel"
        log_in(cluster, name, homes[name], PASSWORD, pin)

    def online():
        if not cluster.agent.alive():
            raise AssertionError("agent exited:\n" + cluster.agent.log_tail())
        out = apps_ls(homes["erin"]).stdout
        return {a["name"] for a in json.loads(out)["apps"] if a["online"]} >= {
            "hello", "echo-ws", "pipe"}
    wait_until(online, 30, "the apps to be online in erin's apps ls")
    return homes


def apps_ls(home: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "apptunnel"), "apps", "ls", "--format", "json"],
                          capture_output=True, text=True, timeout=30, env=user_env(home))


def with_cert(cluster: Cluster, home: Path, app: str, path: str = "/echo") -> requests.Response:
    """A request on the app host with the user's certificate (what `apps config` prints)."""
    s = requests.Session()
    s.trust_env = False
    with localhost_resolution():
        return s.get(cluster.url(app, path), cert=(str(home / "user.crt"), str(home / "user.key")),
                     verify=str(home / "ca.crt"), timeout=20)


def websocket(cluster: Cluster, home: Path):
    """A live WebSocket to echo-ws, authenticated by the user's certificate."""
    from websockets.sync.client import connect

    context = ssl.create_default_context(cafile=str(home / "ca.crt"))
    context.load_cert_chain(str(home / "user.crt"), str(home / "user.key"))
    origin = f"https://echo-ws.apptunnel.localhost:{cluster.web_port}"
    with localhost_resolution():
        return connect(f"wss://echo-ws.apptunnel.localhost:{cluster.web_port}/", ssl=context,
                       origin=origin, open_timeout=10)


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the peer closes `sock` within `seconds` (reset counts as closed)."""
    sock.settimeout(seconds)
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def test_removed_user_loses_certificate_and_live_connections(cluster, homes):
    """users rm bob: his live WebSocket and TCP stream are cut, and his still-valid
    certificate gets 403 on the app host, on the TCP app and on /v1/apps."""
    from websockets.exceptions import ConnectionClosed

    home = homes["bob"]
    assert with_cert(cluster, home, "hello").status_code == 200
    ws = websocket(cluster, home)
    ws.send("before")
    assert ws.recv(timeout=10) == "before"
    port = free_port()
    local = start(home, "pipe", str(port))
    stream = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        stream.sendall(b"ping")
        assert stream.recv(4) == b"ping"

        cluster.cli("users", "rm", "bob")
        assert closed_within(stream, CUT_WITHIN)
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=CUT_WITHIN)

        r = with_cert(cluster, home, "hello")
        assert r.status_code == 403 and "no longer exists" in r.text
        again = socket.create_connection(("127.0.0.1", port), timeout=10)
        assert closed_within(again, 10)
        again.close()
        wait_until(lambda: "403 Forbidden: your user account no longer exists" in local.log(), 10,
                   "the refusal line of proxy app")
        listed = apps_ls(home)
        assert listed.returncode == 1 and "your user account no longer exists" in listed.stderr
    finally:
        stream.close()
        ws.close()
        local.stop()


def test_role_taken_away_stops_the_certificate_at_once(cluster, homes):
    """carol's certificate says [dev, ops]; once ops is taken away it no longer opens prod
    (the very next request), and still opens hello."""
    home = homes["carol"]
    assert with_cert(cluster, home, "prod").status_code == 200
    cluster.cli("users", "update", "carol", "--roles", "dev")
    assert with_cert(cluster, home, "prod").status_code == 403
    assert with_cert(cluster, home, "hello").status_code == 200
    names = {a["name"] for a in json.loads(apps_ls(home).stdout)["apps"]}
    assert "prod" not in names and "hello" in names


def test_lock_holds_before_the_command_returns(cluster, homes):
    """lock --user dave, then at once (no sleep): his certificate, his browser session and
    /v1/apps with his certificate are all refused with the lock message."""
    home = homes["dave"]
    browser = Browser(cluster)
    assert browser.login_through(cluster.url("hello", "/echo"), "dave", PASSWORD).status_code == 200
    assert with_cert(cluster, home, "hello").status_code == 200
    lock_id = cluster.cli("lock", "--user", "dave", "--message", "incident 15").stdout.split()[0]
    try:
        r = with_cert(cluster, home, "hello")
        assert r.status_code == 403 and "your access is locked: incident 15" in r.text
        assert browser.get(cluster.url("hello", "/echo"), allow_redirects=False).status_code != 200
        listed = apps_ls(home)
        assert listed.returncode == 1
        assert "your access is locked: incident 15" in listed.stderr
    finally:
        cluster.cli("locks", "rm", lock_id)
    # locks rm holds at once as well
    assert with_cert(cluster, home, "hello").status_code == 200


def test_create_refuses_a_role_option_nothing_enforces(cluster, tmp_path):
    """create -f of a role asking for what is not built (resource-based access requests)
    exits 2 naming the option (issue 11: plain access requests are enforced now and
    accepted); the shipped example roles load."""
    role = tmp_path / "req.yaml"
    role.write_text("kind: role\nmetadata: {name: req}\nspec:\n"
                    "  allow: {app_labels: {env: prod}, request: {search_as_roles: [admin]}}\n")
    result = cluster.cli("create", "-f", str(role), check=False)
    assert result.returncode == 2
    assert result.stderr.startswith("apptunnel: error: ")
    assert "spec.allow.request.search_as_roles" in result.stderr
    assert "no role named 'req'" in cluster.cli("get", "roles", "req", check=False).stderr
    mfa = tmp_path / "mfa.yaml"
    mfa.write_text("kind: role\nmetadata: {name: mfa}\nspec:\n  options: {require_session_mfa: true}\n"
                   "  allow: {app_labels: {env: prod}}\n")
    cluster.cli("create", "-f", str(mfa))
    examples = Path(__file__).parents[2] / "etc" / "roles"
    for path in sorted(examples.glob("*.yaml")):
        cluster.cli("create", "-f", str(path))


def test_audit_actor_is_the_os_account_not_user(cluster):
    """An admin verb run with USER=mallory is recorded as the real account."""
    account = pwd.getpwuid(os.getuid()).pw_name
    env = {**os.environ, "USER": "mallory", "LOGNAME": "mallory"}
    result = subprocess.run(
        [str(BIN / "apptunnel"), "--config", str(cluster.proxy_config), "lock", "--app", "prod",
         "--format", "json"], capture_output=True, text=True, timeout=60, env=env, cwd=cluster.root)
    assert result.returncode == 0, result.stderr
    lock = json.loads(result.stdout)
    cluster.cli("locks", "rm", lock["id"])
    assert lock["created_by"] == account != "mallory"
    [event] = [e for e in audit(cluster, "lock.create") if e["target"] == lock["id"]]
    assert event["actor"] == account


def test_role_edit_holds_before_create_returns(cluster, homes, tmp_path):
    """create -f --force of an edited role applies to the very next request."""
    home = homes["erin"]
    assert with_cert(cluster, home, "hello").status_code == 200
    role = tmp_path / "dev.yaml"
    role.write_text("kind: role\nmetadata: {name: dev}\nspec:\n  allow: {app_labels: {env: dev}}\n"
                    "  deny: {app_labels: {env: dev}}\n")
    cluster.cli("create", "-f", str(role), "--force")
    try:
        assert with_cert(cluster, home, "hello").status_code == 403
    finally:
        role.write_text("kind: role\nmetadata: {name: dev}\nspec:\n  allow: {app_labels: {env: dev}}\n")
        cluster.cli("create", "-f", str(role), "--force")
    assert with_cert(cluster, home, "hello").status_code == 200


def test_removal_from_another_machine_holds_within_the_poll_interval(cluster, tmp_path):
    """users rm through a config whose proxy is elsewhere (same database, no control socket
    here: like an admin on another machine) still cuts the live TCP stream at the next
    poll, about 2 s later."""
    import yaml

    cluster.add_user("frank", ["dev"], PASSWORD)
    home = tmp_path / ".apptunnel"
    log_in(cluster, "frank", home, PASSWORD, ca_pin(cluster))
    elsewhere = yaml.safe_load(cluster.proxy_config.read_text())
    elsewhere["data_dir"] = str(tmp_path / "elsewhere")
    elsewhere["backend"] = {"type": "sqlite", "path": str(cluster.root / "proxy" / "apptunnel.db")}
    other_config = tmp_path / "other.yaml"
    other_config.write_text(yaml.safe_dump(elsewhere))
    port = free_port()
    local = start(home, "pipe", str(port))
    stream = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        stream.sendall(b"ping")
        assert stream.recv(4) == b"ping"
        removed = subprocess.run([str(BIN / "apptunnel"), "--config", str(other_config), "users",
                                  "rm", "frank"], capture_output=True, text=True, timeout=60)
        assert removed.returncode == 0 and removed.stderr == "", removed.stderr
        assert closed_within(stream, 2.0 + CUT_WITHIN)
        assert with_cert(cluster, home, "hello").status_code == 403
    finally:
        stream.close()
        local.stop()
