"""Access requests end to end (issue 11): the installed proxy, agent and CLI, a real HTTP
app and a real TCP echo, users signed in with `apptunnel login`, reviewers with
`apptunnel request review`, and a real HTTPS webhook receiver.

The elevation's role has ``max_duration: 12s`` so the test sees it end by itself: the
browser's app session and a live `proxy app` TCP stream are cut without anyone acting.
Every wait is bounded.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.support.cli_user import ca_pin, log_in, online_apps, start, user_env
from tests.support.cluster import (
    BIN, Browser, Cluster, app_jwt_claims, audit, free_port, wait_until,
)
from tests.support.upstream import HttpUpstream, WebSocketEcho
from tests.support.webhook import WebhookReceiver

PASSWORD = "correct horse battery staple"
ELEVATION = 12.0        # prod-access's max_duration
CUT_SLACK = 4.0         # the poll interval (2 s) and some slack


class _Echo:
    """A TCP echo server on a free loopback port."""

    def __init__(self):
        import socketserver
        import threading

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                try:
                    while data := self.request.recv(65536):
                        self.request.sendall(data)
                except ConnectionResetError:
                    pass

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


ROLES = [
    {"kind": "role", "metadata": {"name": "dev"}, "spec": {
        "options": {"request_access": "reason"},
        "allow": {"app_labels": {"env": "dev"},
                  "request": {"roles": ["prod-access"], "max_duration": f"{int(ELEVATION)}s"}}}},
    {"kind": "role", "metadata": {"name": "prod-access"},
     "spec": {"allow": {"app_labels": {"env": "prod"}}}},
    {"kind": "role", "metadata": {"name": "two-keys"}, "spec": {
        "allow": {"request": {"roles": ["prod-two"],
                              "thresholds": [{"approve": 2, "deny": 1}]}}}},
    {"kind": "role", "metadata": {"name": "prod-two"},
     "spec": {"allow": {"app_labels": {"env": "prod"}}}},
    {"kind": "role", "metadata": {"name": "approver"},
     "spec": {"allow": {"review_requests": {"roles": ["prod-access", "prod-two"]}}}},
]
USERS = {"alice": ["dev"], "bob": ["dev", "two-keys"], "rev1": ["dev", "approver"],
         "rev2": ["approver"], "mallory": ["dev"]}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("requests")
    http, echo, ws = HttpUpstream(), _Echo(), WebSocketEcho()
    hook = WebhookReceiver(root, fail_first=1)      # the first POST is retried
    c = Cluster([
        {"name": "hello", "uri": http.uri, "labels": {"env": "dev"}},
        {"name": "prod", "uri": http.uri, "labels": {"env": "prod"}},
        {"name": "prodpipe", "uri": f"tcp://127.0.0.1:{echo.port}", "labels": {"env": "prod"}},
        {"name": "prodws", "uri": ws.uri, "labels": {"env": "prod"}},
    ])
    config = yaml.safe_load(c.proxy_config.read_text())
    config["access_requests"] = {"webhook_url": hook.url, "ca_file": str(hook.ca_file)}
    c.proxy_config.write_text(yaml.safe_dump(config))
    try:
        c.start_proxy()
        for role in ROLES:
            c.add_role(role)
        for name, roles in USERS.items():
            c.add_user(name, roles, PASSWORD)
        c.start_agent()
        pin = ca_pin(c)
        homes = {}
        for name in USERS:
            homes[name] = tmp_path_factory.mktemp(name) / ".apptunnel"
            log_in(c, name, homes[name], PASSWORD, pin)
        # One agent announces all three apps at once: hello online means all are.
        wait_until(lambda: "hello" in online_apps(homes["alice"]), 30, "the apps to be online")
        yield c, homes, hook
    finally:
        c.stop()
        http.stop()
        echo.stop()
        ws.stop()
        hook.stop()


def user(home: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """The installed `apptunnel` as the user of ``home``."""
    result = subprocess.run([str(BIN / "apptunnel"), *args], capture_output=True, text=True,
                            timeout=60, env=user_env(home), cwd=str(home.parent))
    if check:
        assert result.returncode == 0, (args, result.stderr)
    return result


def create(home: Path, *args: str) -> dict:
    return json.loads(user(home, "request", "create", "--nowait", "--format", "json",
                           *args).stdout)


def review(home: Path, request_id: str, verdict: str, *extra: str,
           check: bool = True) -> subprocess.CompletedProcess:
    return user(home, "request", "review", request_id, verdict, "--format", "json", *extra,
                check=check)


def show(home: Path, request_id: str) -> dict:
    return json.loads(user(home, "request", "show", request_id, "--format", "json").stdout)


def websocket(cluster: Cluster, home: Path):
    """A live WebSocket to prodws, authenticated by the user's certificate."""
    import ssl

    from websockets.sync.client import connect

    from tests.support.localhost import localhost_resolution

    context = ssl.create_default_context(cafile=str(home / "ca.crt"))
    context.load_cert_chain(str(home / "user.crt"), str(home / "user.key"))
    url = f"prodws.apptunnel.localhost:{cluster.web_port}"
    with localhost_resolution():
        return connect(f"wss://{url}/", ssl=context, origin=f"https://{url}", open_timeout=10)


def closed_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(max(0.1, seconds))
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def browser_for(cluster: Cluster, name: str) -> Browser:
    browser = Browser(cluster)
    landed = browser.login_through(cluster.url(path="/"), name, PASSWORD)
    assert landed.status_code == 200
    return browser


def origin(cluster: Cluster) -> dict:
    return {"Origin": cluster.url().rstrip("/")}


def test_approved_request_opens_the_app_then_ends_by_itself(world):
    """alice waits in `request create`, rev1 approves: her new certificate opens the TCP
    app through `proxy app` and a WebSocket app, her web session assumes the request and
    opens the prod app; when the role's max_duration passes, the app session, the live
    TCP stream and the WebSocket are cut with nobody acting, the request shows
    `expired`, and the webhook heard every state."""
    from websockets.exceptions import ConnectionClosed

    cluster, homes, hook = world
    alice, rev1 = homes["alice"], homes["rev1"]
    browser = browser_for(cluster, "alice")
    denied = browser.get(cluster.url("prod", "/echo"))
    assert denied.status_code == 403
    assert "apptunnel request create --app prod" in denied.text     # how to ask
    hello = browser.get(cluster.url("hello", "/echo"))       # an app session open before
    assert app_jwt_claims(cluster, hello.json())["roles"] == ["dev"]
    refused = user(alice, "request", "create", "--roles", "prod-access", "--nowait",
                   check=False)
    assert refused.returncode == 1 and "require a reason" in refused.stderr
    waiting = subprocess.Popen(
        [str(BIN / "apptunnel"), "request", "create", "--roles", "prod-access",
         "--reason", "incident 42", "--timeout", "1m"], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env=user_env(alice), cwd=str(alice.parent))
    try:
        def pending():
            listed = json.loads(user(rev1, "request", "ls", "--format", "json").stdout)
            return [r for r in listed if r["user"] == "alice" and r["state"] == "pending"]
        [request] = wait_until(pending, 20, "alice's pending request")
        assert request["reason"] == "incident 42" and request["roles"] == ["prod-access"]
        approved = json.loads(review(rev1, request["id"], "--approve", "--reason", "ok").stdout)
        ends = approved["expires"]
        assert approved["state"] == "approved"
        assert ELEVATION - 3 < ends - time.time() <= ELEVATION
        out, err = waiting.communicate(timeout=30)
    finally:
        if waiting.poll() is None:
            waiting.kill()
            waiting.communicate(timeout=10)
    assert waiting.returncode == 0, err
    assert request["id"] in out and "approved" in out and "prod-access" in out

    r = browser.post(cluster.url(path="/v1/sessions/assume"), headers=origin(cluster),
                     json={"request_id": request["id"]})
    assert r.status_code == 200, r.text
    again = browser.get(cluster.url("hello", "/echo"))       # the same app session
    assert again.history == [] and app_jwt_claims(cluster, again.json())["roles"] == \
        ["dev", "prod-access"]
    assert browser.get(cluster.url("prod", "/echo")).status_code == 200
    port = free_port()
    local = start(alice, "prodpipe", str(port))
    stream = socket.create_connection(("127.0.0.1", port), timeout=10)
    live = websocket(cluster, alice)
    try:
        stream.sendall(b"ping")
        assert stream.recv(4) == b"ping"
        live.send("hi")
        assert live.recv(timeout=10) == "hi"
        left = ends - time.time()
        assert left > 1, "the test was too slow to see the elevation live"
        assert closed_within(stream, left + CUT_SLACK)
        assert time.time() >= ends            # cut by the elevation's end, not before
        with pytest.raises(ConnectionClosed):
            live.recv(timeout=CUT_SLACK)
        wait_until(lambda: browser.get(cluster.url("prod", "/echo")).status_code == 403,
                   max(0.0, ends - time.time()) + CUT_SLACK, "the app session to lose prod")
        assert time.time() >= ends
        assert browser.get(cluster.url("hello", "/echo")).status_code == 200
    finally:
        stream.close()
        live.close()
        local.stop()
    wait_until(lambda: show(alice, request["id"])["state"] == "expired", 10, "state expired")
    # The certificate outlives the elevation with alice's own roles: no new login needed.
    assert "hello" in online_apps(alice) and "prod" not in online_apps(alice)
    # Deliveries are independent (the first was retried), so the order is not promised.
    wait_until(lambda: sorted(hook.states(request["id"])) == ["approved", "expired", "pending"],
               20, "the webhook to hear pending, approved, expired")
    [body] = [b for b in hook.bodies if b["id"] == request["id"] and b["state"] == "approved"]
    assert set(body) == {"id", "user", "roles", "apps", "state", "reason", "reviews"}
    assert body["reviews"][0]["author"] == "rev1"
    for kind in ("create", "review", "assume", "expire"):
        events = [e for e in audit(cluster, f"access_request.{kind}")
                  if e["target"] == request["id"]]
        assert events, kind
    expiries = [e for e in audit(cluster, "access_request.expire")
                if e["target"] == request["id"]]
    assert len(expiries) == 1


def test_denied_request_elevates_nothing(world):
    """rev1 denies: the request is denied, `login --request-id` refuses it, and the
    webhook hears the denial."""
    cluster, homes, hook = world
    request = create(homes["alice"], "--roles", "prod-access", "--reason", "curious")
    denied = json.loads(review(homes["rev1"], request["id"], "--deny", "--reason", "no").stdout)
    assert denied["state"] == "denied"
    result = user(homes["alice"], "login", "--request-id", request["id"], check=False)
    assert result.returncode == 1 and "denied" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    wait_until(lambda: sorted(hook.states(request["id"])) == ["denied", "pending"], 20,
               "the webhook to hear the denial")


def test_threshold_of_two_needs_two_reviewers(world):
    """two-keys asks for two approvals: after rev1 the request is still pending, rev1
    cannot review twice, after rev2 it is approved and `login --request-id` elevates."""
    cluster, homes, _ = world
    request = create(homes["bob"], "--roles", "prod-two", "--reason", "deploy")
    assert request["approvals_needed"] == 2
    assert json.loads(review(homes["rev1"], request["id"], "--approve").stdout)["state"] == \
        "pending"
    again = review(homes["rev1"], request["id"], "--approve", check=False)
    assert again.returncode == 1 and "already reviewed" in again.stderr
    assert json.loads(review(homes["rev2"], request["id"], "--approve").stdout)["state"] == \
        "approved"
    out = user(homes["bob"], "login", "--request-id", request["id"]).stdout
    assert "prod-two" in out


def test_self_review_and_reviewers_without_the_right_are_refused(world):
    """rev1 may review prod-access requests, but not her own; mallory may review none and
    cannot even see alice's request (the same answer as for an unknown id)."""
    cluster, homes, _ = world
    own = create(homes["rev1"], "--roles", "prod-access", "--reason", "mine")
    result = review(homes["rev1"], own["id"], "--approve", check=False)
    assert result.returncode == 1 and "your own request" in result.stderr
    theirs = create(homes["alice"], "--roles", "prod-access", "--reason", "x")
    result = review(homes["mallory"], theirs["id"], "--approve", check=False)
    assert result.returncode == 1 and "no such access request" in result.stderr
    unknown = review(homes["mallory"], "0" * 32, "--approve", check=False)
    assert unknown.stderr == result.stderr
    assert show(homes["alice"], theirs["id"])["state"] == "pending"


def test_another_users_request_cannot_be_assumed(world):
    """mallory holds alice's approved request id: neither `login --request-id` nor her web
    session's assume gets its roles; a malformed id is refused as well."""
    cluster, homes, _ = world
    request = create(homes["alice"], "--roles", "prod-access", "--reason", "y")
    review(homes["rev1"], request["id"], "--approve")
    result = user(homes["mallory"], "login", "--request-id", request["id"], check=False)
    assert result.returncode == 1 and "no such access request" in result.stderr
    browser = browser_for(cluster, "mallory")
    for rid in (request["id"], "../" + request["id"], 42):
        r = browser.post(cluster.url(path="/v1/sessions/assume"), headers=origin(cluster),
                         json={"request_id": rid})
        assert r.status_code in (400, 404), r.text
    cross = browser.post(cluster.url(path="/v1/sessions/assume"),
                         headers={"Origin": "https://evil.example"},
                         json={"request_id": request["id"]})
    assert cross.status_code == 403
    assert browser.get(cluster.url("prod", "/echo")).status_code == 403
