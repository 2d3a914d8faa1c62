"""The main path end to end: installed commands, real sockets, a real upstream app.

A proxy (`twistd apptunnel`) and an agent (`twistd apptunnel-agent`) run as subprocesses;
roles, users and the join token are made with the `apptunnel` CLI; a user signs in through
redirects alone and reaches apps on their subdomains. Tests run in file order and share
the cluster; the last ones stop and restart its processes.
"""

from __future__ import annotations

import json
import re
import ssl
import subprocess
import time

import jwt as pyjwt
import pytest
import requests
from jwcrypto import jwk as jc_jwk
from jwcrypto import jwt as jc_jwt

from tests.support.cluster import BIN, Browser, Cluster, free_port, wait_until
from tests.support.localhost import localhost_resolution
from tests.support.system import require_program
from tests.support.upstream import HttpUpstream, WebSocketEcho

PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="module")
def upstreams():
    http, ws = HttpUpstream(), WebSocketEcho()
    yield http, ws
    http.stop()
    ws.stop()


@pytest.fixture(scope="module")
def cluster(upstreams):
    http, ws = upstreams
    apps = [
        {"name": "hello", "uri": http.uri, "labels": {"team": "sre", "env": "staging"}},
        {"name": "echo-ws", "uri": ws.uri, "labels": {"team": "sre", "env": "dev-1"}},
        {"name": "prod-db", "uri": http.uri, "labels": {"team": "sre", "env": "prod"}},
        {"name": "down", "uri": f"http://127.0.0.1:{free_port()}", "labels": {"team": "sre", "env": "staging"}},
    ]
    c = Cluster(apps)
    try:
        c.start_proxy()
        c.add_role({
            "kind": "role", "metadata": {"name": "sre-apps"},
            "spec": {"allow": {"app_labels": {"team": "sre", "env": ["staging", "^dev-.*$", "prod"]}},
                     "deny": {"app_labels": {"env": "prod"}}},
        })
        c.add_role({"kind": "role", "metadata": {"name": "other-team"},
                    "spec": {"allow": {"app_labels": {"team": "other"}}}})
        c.add_user("alice", ["sre-apps"], PASSWORD, traits=["logins=alice,root"])
        c.add_user("bob", ["other-team"], PASSWORD)
        c.start_agent()
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def alice(cluster):
    """A browser signed in as alice, with an app session on `hello`."""
    browser = Browser(cluster)
    wait_until(lambda: _app_online(cluster, "hello"), 30, "the agent to register hello")
    landed = browser.login_through(cluster.url("hello", "/echo?first=1"), "alice", PASSWORD)
    assert landed.status_code == 200, landed.text
    return browser


def _app_online(cluster: Cluster, name: str) -> bool:
    if not cluster.agent.alive():
        raise AssertionError("agent exited:\n" + cluster.agent.log_tail())
    s = requests.Session()
    s.trust_env = False
    with localhost_resolution():
        r = s.post(cluster.url(path="/v1/sessions"), json={"username": "alice", "password": PASSWORD},
                   verify=cluster.ca_file, timeout=5)
        r.raise_for_status()
        apps = s.get(cluster.url(path="/v1/apps"), verify=cluster.ca_file, timeout=5).json()["apps"]
    return any(app["name"] == name and app["online"] for app in apps)


def _jwks(cluster: Cluster) -> dict:
    with localhost_resolution():
        return requests.get(cluster.url(path="/.well-known/jwks.json"), verify=cluster.ca_file,
                            timeout=5).json()


def _json_events(out: str) -> list[dict]:
    """`audit search --format json` output: a JSON array or one object per line."""
    out = out.strip()
    if out.startswith("["):
        return json.loads(out)
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def _header_values(echo: dict, name: str) -> list[str]:
    return [value for key, value in echo["headers"] if key.lower() == name.lower()]


def test_login_launch_lands_on_the_path_with_a_verifiable_jwt(cluster, alice):
    """A signed-in user reaches the app's path; the app gets a JWT two libraries verify."""
    r = alice.get(cluster.url("hello", "/echo?x=1"))
    assert r.status_code == 200
    echo = r.json()
    assert echo["path"] == "/echo?x=1"
    tokens = _header_values(echo, "Apptunnel-Jwt-Assertion")
    assert len(tokens) == 1
    token = tokens[0]
    audience = f"https://hello.apptunnel.localhost:{cluster.web_port}"
    jwks = _jwks(cluster)

    kid = pyjwt.get_unverified_header(token)["kid"]
    key = pyjwt.PyJWKSet.from_dict(jwks)[kid]
    claims = pyjwt.decode(token, key.key, algorithms=["RS256"], audience=audience, issuer="e2e")
    assert claims["sub"] == "alice" and claims["username"] == "alice"
    assert claims["roles"] == ["sre-apps"]
    assert claims["traits"]["logins"] == ["alice", "root"]
    assert claims["exp"] - claims["iat"] <= 600

    keyset = jc_jwk.JWKSet.from_json(json.dumps(jwks))
    verified = jc_jwt.JWT(jwt=token, key=keyset, check_claims={"aud": audience, "iss": "e2e"})
    assert json.loads(verified.claims)["username"] == "alice"

    assert _header_values(echo, "Host") == [f"127.0.0.1:{cluster.apps[0]['uri'].rsplit(':', 1)[1]}"]
    assert _header_values(echo, "X-Forwarded-Proto") == ["https"]
    assert _header_values(echo, "X-Forwarded-Host") == [f"hello.apptunnel.localhost:{cluster.web_port}"]
    assert _header_values(echo, "X-Forwarded-For") == ["127.0.0.1"]


def test_hand_off_cookie_is_host_only_and_no_secret_in_urls(cluster):
    """The app cookie is host-only, Secure, HttpOnly, and its value never appears in a URL."""
    browser = Browser(cluster)
    landed = browser.login_through(cluster.url("hello", "/echo?via=handoff"), "alice", PASSWORD)
    assert landed.status_code == 200
    assert landed.json()["path"] == "/echo?via=handoff"
    set_cookies = [h.headers.get("Set-Cookie", "") for h in landed.history]
    app_cookie = next(c for c in set_cookies if c.startswith("__Host-apptunnel_app="))
    attributes = [a.strip().lower() for a in app_cookie.split(";")]
    assert "secure" in attributes and "httponly" in attributes and "path=/" in attributes
    assert not any(a.startswith("domain") for a in attributes)
    secret = app_cookie.split(";")[0].split("=", 1)[1]
    assert all(secret not in hop.url for hop in [*landed.history, landed])
    codes = [h.url for h in landed.history if "/.apptunnel/auth" in h.url]
    assert codes, "the hand-off went through /.apptunnel/auth"
    replay = Browser(cluster).get(codes[0], allow_redirects=False)
    assert replay.status_code == 400


@pytest.mark.parametrize("spelling", [
    "Apptunnel-Jwt-Assertion", "apptunnel-jwt-assertion", "APPTUNNEL-JWT-ASSERTION",
    "apptunnel_jwt_assertion", "Apptunnel_Jwt_Assertion",
])
def test_client_identity_headers_are_stripped(cluster, alice, spelling):
    """Forged identity headers in any spelling never reach the app; ours does, once."""
    r = alice.get(cluster.url("hello", "/echo"), headers={
        spelling: "forged.token.value", "X-Forwarded-For": "6.6.6.6", "X_Custom": "x",
    })
    echo = r.json()
    tokens = _header_values(echo, "Apptunnel-Jwt-Assertion")
    assert len(tokens) == 1 and tokens[0] != "forged.token.value"
    assert not [name for name, _ in echo["headers"] if "_" in name]
    assert "forged.token.value" not in json.dumps(echo)
    assert _header_values(echo, "X-Forwarded-For") == ["127.0.0.1"]
    cookie = ";".join(_header_values(echo, "Cookie"))
    assert "__Host-apptunnel" not in cookie


def test_curl_follows_the_login_by_redirects_alone(cluster, alice):  # alice: the app is online
    """`curl -L -c jar -b jar` reaches the app after posting the login form: no JavaScript."""
    require_program("curl", "curl")
    jar = cluster.root / "curl.jar"
    common = ["curl", "-sS", "-L", "-c", str(jar), "-b", str(jar), "--cacert", cluster.ca_file,
              "--max-time", "30"]
    page = subprocess.run(common + [cluster.url("hello", "/echo?curl=1")], capture_output=True,
                          text=True, timeout=60)
    assert page.returncode == 0, page.stderr
    assert 'name="password"' in page.stdout
    next_value = re.search(r'name="next" value="([^"]*)"', page.stdout).group(1)
    import html

    landed = subprocess.run(common + [
        "-H", f"Origin: {cluster.url().rstrip('/')}",
        "--data-urlencode", "username=alice", "--data-urlencode", f"password={PASSWORD}",
        "--data-urlencode", f"next={html.unescape(next_value)}",
        cluster.url(path="/web/login"),
    ], capture_output=True, text=True, timeout=60)
    assert landed.returncode == 0, landed.stderr
    assert json.loads(landed.stdout)["path"] == "/echo?curl=1"


def test_role_denial_gives_403_and_an_audit_event(cluster, alice):
    """Deny wins: a prod app is refused with 403, the app's content never shows."""
    r = alice.get(cluster.url("prod-db", "/echo?secret=1"))
    assert r.status_code == 403
    assert '"headers"' not in r.text
    bob = Browser(cluster)
    r = bob.login_through(cluster.url("hello", "/echo"), "bob", PASSWORD)
    assert r.status_code == 403
    assert '"headers"' not in r.text

    def denied_actors():
        out = cluster.cli("audit", "search", "--type", "access.denied", "--format", "json").stdout
        return {event.get("actor") for event in _json_events(out)} >= {"alice", "bob"}

    wait_until(denied_actors, 10, "access.denied events for alice and bob", interval=0.5)


def test_apps_api_lists_only_allowed_apps(cluster, alice):
    """GET /v1/apps shows alice the apps her role allows and never the denied one."""
    r = alice.get(cluster.url(path="/v1/apps"))
    names = {app["name"] for app in r.json()["apps"]}
    assert {"hello", "echo-ws", "down"} <= names
    assert "prod-db" not in names


def test_redirects_to_the_internal_address_are_rewritten(cluster, alice):
    """A Location pointing at the app's internal URI comes back as its public address."""
    r = alice.get(cluster.url("hello", "/redirect"), allow_redirects=False)
    assert r.status_code == 302
    assert r.headers["Location"] == cluster.url("hello", "/echo?from=redirect")


def test_chunked_and_server_sent_events_stream(cluster, alice):
    """Chunked bodies arrive whole; SSE events arrive one by one, before the response ends."""
    assert alice.get(cluster.url("hello", "/chunked")).text == "one two three"
    started = time.monotonic()
    with localhost_resolution():
        r = alice.session.get(cluster.url("hello", "/sse"), stream=True, timeout=30)
        lines = r.iter_lines(chunk_size=1)  # yield each line as soon as it arrives
        first = next(line for line in lines if line)
        first_at = time.monotonic() - started
        rest = [line for line in lines if line]
    total = time.monotonic() - started
    assert first == b"data: tick 0"
    assert rest == [b"data: tick 1", b"data: tick 2"]
    assert first_at < total - 0.5, (first_at, total)


def test_websocket_echo_and_cross_origin_refusal(cluster, alice):
    """A WebSocket upgrade with the app's own Origin echoes; any other Origin is refused."""
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    landed = alice.get(cluster.url("echo-ws", "/"))  # the hand-off for this app
    assert landed.status_code in (400, 404, 426), landed.status_code  # not a WebSocket request
    cookie = "; ".join(f"{c.name}={c.value}" for c in alice.session.cookies
                       if c.domain.startswith("echo-ws."))
    context = ssl.create_default_context(cafile=cluster.ca_file)
    url = f"wss://echo-ws.apptunnel.localhost:{cluster.web_port}/"
    origin = f"https://echo-ws.apptunnel.localhost:{cluster.web_port}"
    with localhost_resolution():
        with connect(url, ssl=context, origin=origin, additional_headers={"Cookie": cookie},
                     open_timeout=10) as ws:
            ws.send("ping through the tunnel")
            assert ws.recv(timeout=10) == "ping through the tunnel"
        with pytest.raises(InvalidStatus) as refused:
            connect(url, ssl=context, origin="https://evil.example", additional_headers={"Cookie": cookie},
                    open_timeout=10)
    assert refused.value.response.status_code == 403


def test_large_download_keeps_memory_flat(cluster, alice):
    """1 GiB streams through proxy and agent without either growing by more than 48 MiB."""
    before = {c.name: c.rss_kib() for c in (cluster.proxy, cluster.agent)}
    peak = dict(before)
    received = 0
    with localhost_resolution():
        r = alice.session.get(cluster.url("hello", "/big?mb=1024"), stream=True, timeout=120)
        for chunk in r.iter_content(1024 * 1024):
            received += len(chunk)
            for c in (cluster.proxy, cluster.agent):
                peak[c.name] = max(peak[c.name], c.rss_kib())
    assert received == 1024 * 1024 * 1024
    for name in before:
        assert peak[name] - before[name] < 48 * 1024, (name, before[name], peak[name])


def test_large_upload_streams_through(cluster, alice):
    """A 64 MiB request body reaches the app whole, with the proxy's memory bounded."""
    before = cluster.proxy.rss_kib()
    body = b"z" * (64 * 1024 * 1024)
    r = alice.post(cluster.url("hello", "/upload"), data=body)
    assert r.json() == {"received": len(body)}
    assert cluster.proxy.rss_kib() - before < 48 * 1024


def test_a_stalled_stream_does_not_block_another(cluster, alice):
    """One response nobody reads does not stop a second request on the same tunnel."""
    with localhost_resolution():
        stalled = alice.session.get(cluster.url("hello", "/endless"), stream=True, timeout=30)
        assert stalled.status_code == 200
        started = time.monotonic()
        r = alice.session.get(cluster.url("hello", "/echo?while=stalled"), timeout=15)
        elapsed = time.monotonic() - started
        stalled.close()
    assert r.status_code == 200 and elapsed < 5


def test_app_that_is_down_gives_502(cluster, alice):
    """An app whose upstream refuses connections answers a clear 502 page."""
    browser = Browser(cluster)
    browser.session.cookies = alice.session.cookies
    r = browser.get(cluster.url("down", "/"))
    assert r.status_code == 502
    assert "not reachable" in r.text.lower()


def test_audit_search_shows_logins_and_requests(cluster, alice):
    """`apptunnel audit search` lists logins and app requests with status and bytes."""
    alice.get(cluster.url("hello", "/echo?audited=1"))

    def found():
        out = cluster.cli("audit", "search", "--since", "1h", "--type", "app.request",
                          "--format", "json").stdout
        return "/echo" in out and "alice" in out

    wait_until(found, 10, "the app.request audit event", interval=0.5)
    text = cluster.cli("audit", "search", "--since", "1h").stdout
    assert "user.login" in text and "session.app.start" in text


def test_logout_ends_the_app_sessions(cluster):
    """Logging out at the proxy ends the user's app sessions too."""
    browser = Browser(cluster)
    assert browser.login_through(cluster.url("hello", "/echo"), "alice", PASSWORD).status_code == 200
    r = browser.post(cluster.url(path="/web/logout"), headers={"Origin": cluster.url().rstrip("/")})
    assert r.url.startswith(cluster.url(path="/web/login"))
    r = browser.get(cluster.url("hello", "/echo"), allow_redirects=False)
    assert r.status_code == 302
    assert "/web/launch/hello" in r.headers["Location"]


def test_agent_reconnects_after_the_proxy_restarts(cluster, alice):
    """The proxy goes away and comes back; the agent's tunnel returns by itself."""
    cluster.proxy.stop()
    cluster.start_proxy()
    wait_until(lambda: _app_online(cluster, "hello"), 30, "the agent to reconnect")
    r = alice.get(cluster.url("hello", "/echo?after=restart"))
    assert r.status_code == 200 and r.json()["path"] == "/echo?after=restart"


def test_no_agent_gives_503_and_the_agent_rejoins_without_a_token(cluster, alice):
    """With the agent gone the app answers 503; restarted without a token it serves again."""
    cluster.agent.stop()
    wait_until(lambda: alice.get(cluster.url("hello", "/echo")).status_code == 503, 20,
               "the proxy to notice the agent left")
    cluster.start_agent()  # the saved certificate is reused: no join section this time
    assert "join" not in cluster.agent_config.read_text()
    wait_until(lambda: _app_online(cluster, "hello"), 30, "the agent to come back")
    assert alice.get(cluster.url("hello", "/echo")).status_code == 200


def test_bad_config_is_one_clear_line(tmp_path):
    """twistd with a broken config exits non-zero with one line naming file and key."""
    bad = tmp_path / "proxy.yaml"
    bad.write_text("cluster_name: x\ndata_dir: d\npublic_addr: a.localhost:1\n"
                   "web_listen_addr: nonsense\ntunnel_listen_addr: 127.0.0.1:1\n")
    result = subprocess.run([str(BIN / "twistd"), "-n", "--pidfile=", "apptunnel", "--config", str(bad)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Traceback" not in output
    assert "web_listen_addr" in output and "proxy.yaml" in output
