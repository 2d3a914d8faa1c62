"""Issue 8, the HTTP edge: attacks on a real proxy, agent and upstream apps over TLS.

The proxy and agent run as the installed commands; the requests are exact bytes on raw
TLS sockets (spoofed headers, malformed Host, trailers, ambiguous framing, slow heads),
a signed-in `requests` session, and `apptunnel proxy app` for the local-port checks.
Each test names the finding it proves; every wait is bounded.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time

import pytest
import requests

from apptunnel.proxy.http1 import EndOfMessage, HttpError, RequestReader
from tests.support.cli_user import ca_pin, log_in, start
from tests.support.cluster import Browser, Cluster, audit, free_port, wait_until
from tests.support.localhost import localhost_resolution
from tests.support.upstream import HttpUpstream

PASSWORD = "correct horse battery staple"


class RecordingApp:
    """A raw upstream app: keeps the exact bytes of each request, answers with cookies.

    Its response sets one host-only cookie and two with a Domain (the proxy's parent
    domain and a sibling app), so tests can see which reach the browser.
    """

    RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
                b"Set-Cookie: planted=1; Domain=apptunnel.localhost; Path=/\r\n"
                b"Set-Cookie: sibling=1; Path=/; domain=echo.apptunnel.localhost\r\n"
                b"Set-Cookie: own=1; Path=/; Secure; HttpOnly\r\n\r\nok")

    def __init__(self):
        self.seen: list[bytes] = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.5)
        self.port = self.sock.getsockname()[1]
        self.stopping = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _serve(self):
        while not self.stopping:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn):
        reader, raw = RequestReader(), bytearray()
        conn.settimeout(30)
        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                raw += data
                events = reader.receive(data)
                while events:
                    if any(isinstance(e, EndOfMessage) for e in events):
                        self.seen.append(bytes(raw))
                        raw = bytearray()
                        conn.sendall(self.RESPONSE)
                    events = reader.next_message() if reader.state == "done" else []
        except (OSError, HttpError):
            pass
        finally:
            conn.close()

    def stop(self):
        self.stopping = True
        self.sock.close()


@pytest.fixture(scope="module")
def upstreams():
    http, raw = HttpUpstream(), RecordingApp()
    yield http, raw
    http.stop()
    raw.stop()


@pytest.fixture(scope="module")
def cluster(upstreams):
    http, raw = upstreams
    apps = [
        {"name": "echo", "uri": http.uri, "labels": {"env": "dev"},
         "rewrite": {"headers": ["X-Webauth-User: {{internal.login}}", "X-Webauth-Team: {{internal.team}}"]}},
        {"name": "rawcap", "uri": raw.uri, "labels": {"env": "dev"}},
    ]
    c = Cluster(apps)
    try:
        c.start_proxy()
        c.add_role({"kind": "role", "metadata": {"name": "dev"},
                    "spec": {"allow": {"app_labels": {"env": "dev"}}}})
        c.add_user("alice", ["dev"], PASSWORD, traits=["team=sre"])  # no `login` trait
        c.start_agent()
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def alice(cluster):
    """A browser signed in as alice with app sessions on echo and rawcap."""
    browser = Browser(cluster)
    wait_until(lambda: _online(cluster), 30, "the agent to register its apps")
    landed = browser.login_through(cluster.url("echo", "/echo"), "alice", PASSWORD)
    assert landed.status_code == 200, landed.text
    assert browser.get(cluster.url("rawcap", "/")).status_code == 200
    return browser


def _online(cluster: Cluster) -> bool:
    if not cluster.agent.alive():
        raise AssertionError("agent exited:\n" + cluster.agent.log_tail())
    s = requests.Session()
    s.trust_env = False
    with localhost_resolution():
        r = s.post(cluster.url(path="/v1/sessions"), json={"username": "alice", "password": PASSWORD},
                   verify=cluster.ca_file, timeout=5)
        r.raise_for_status()
        apps = s.get(cluster.url(path="/v1/apps"), verify=cluster.ca_file, timeout=5).json()["apps"]
    return {a["name"] for a in apps if a["online"]} >= {"echo", "rawcap"}


def app_cookie(browser: Browser, app: str) -> str:
    for cookie in browser.session.cookies:
        if cookie.name == "__Host-apptunnel_app" and cookie.domain.startswith(app + "."):
            return cookie.value
    raise AssertionError(f"no app session cookie for {app}")


class Tls:
    """A raw TLS connection to the proxy's web port, for exact bytes."""

    def __init__(self, cluster: Cluster, server_name: str, timeout: float = 20):
        context = ssl.create_default_context(cafile=cluster.ca_file)
        raw = socket.create_connection(("127.0.0.1", cluster.web_port), timeout=timeout)
        self.sock = context.wrap_socket(raw, server_hostname=server_name)
        self.buf = bytearray()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def response(self) -> tuple[int, dict, bytes]:
        """One response with a Content-Length body: (status, lower-cased headers, body)."""
        while b"\r\n\r\n" not in self.buf:
            self._more()
        head, _, rest = bytes(self.buf).partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers: dict[str, list[str]] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers.setdefault(name.strip().lower(), []).append(value.strip())
        length = int(headers.get("content-length", ["0"])[0])
        while len(rest) < length:
            self._more()
            rest = bytes(self.buf).partition(b"\r\n\r\n")[2]
        self.buf = bytearray(rest[length:])
        return status, headers, rest[:length]

    def closed(self) -> bool:
        """True once the proxy has closed (reads what is left)."""
        try:
            data = self.sock.recv(65536)
        except (ConnectionError, ssl.SSLError):
            return True
        self.buf += data
        return data == b""

    def _more(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("the proxy closed before a whole response")
        self.buf += data

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def host(cluster: Cluster, app: str = "") -> str:
    return f"{app + '.' if app else ''}apptunnel.localhost:{cluster.web_port}"


def echo_headers(body: bytes) -> list[tuple[str, str]]:
    return [(k.lower(), v) for k, v in json.loads(body)["headers"]]


# Finding 4


def test_rewrite_headers_cannot_be_spoofed(cluster, alice):
    """Finding 4: `X-Webauth-User: admin` from a user without the `login` trait, in any spelling,
    never reaches the app; a rewrite with a value arrives once, the proxy's."""
    conn = Tls(cluster, "echo.apptunnel.localhost")
    try:
        conn.send((f"GET /echo HTTP/1.1\r\nHost: {host(cluster, 'echo')}\r\n"
                   f"Cookie: __Host-apptunnel_app={app_cookie(alice, 'echo')}\r\n"
                   "X-Webauth-User: admin\r\nx-webauth-user: admin\r\nX-WEBAUTH-USER: admin\r\n"
                   "X.Webauth.User: admin\r\nX-Webauth-Team: root\r\n\r\n").encode())
        status, _, body = conn.response()
    finally:
        conn.close()
    assert status == 200
    seen = echo_headers(body)
    assert not any(k.replace("-", "").replace(".", "").replace("_", "") == "xwebauthuser" for k, _ in seen)
    assert [v for k, v in seen if k == "x-webauth-team"] == ["sre"]
    assert b"admin" not in body and b"root" not in body


# Finding 6


def test_malformed_host_is_refused(cluster, alice):
    """Finding 6: `echo.apptunnel.localhost:@evil.com` is answered 400 and never reaches the app."""
    for bad in (f"{host(cluster, 'echo')}:@evil.com", "echo.apptunnel.localhost:@evil.com",
                f"{host(cluster, 'echo')}@evil.com"):
        conn = Tls(cluster, "echo.apptunnel.localhost")
        try:
            conn.send((f"GET /echo HTTP/1.1\r\nHost: {bad}\r\n"
                       f"Cookie: __Host-apptunnel_app={app_cookie(alice, 'echo')}\r\n\r\n").encode())
            status, _, body = conn.response()
        finally:
            conn.close()
        assert status == 400, bad
        assert b"evil" not in body


def test_x_forwarded_host_is_the_public_address(cluster, alice):
    """Finding 6: X-Forwarded-Host is the app's public address, not the client's Host spelling."""
    conn = Tls(cluster, "echo.apptunnel.localhost")
    try:
        conn.send((f"GET /echo HTTP/1.1\r\nHost: ECHO.APPTUNNEL.LOCALHOST:{cluster.web_port}\r\n"
                   f"Cookie: __Host-apptunnel_app={app_cookie(alice, 'echo')}\r\n"
                   "X-Forwarded-Host: evil.example\r\n\r\n").encode())
        status, _, body = conn.response()
    finally:
        conn.close()
    assert status == 200
    assert [v for k, v in echo_headers(body) if k == "x-forwarded-host"] == [host(cluster, "echo")]


# Finding 13 (HTTP parts)


@pytest.mark.parametrize("name", ["Teleport-Jwt-Assertion", "X-Pomerium-Jwt-Assertion", "Cf-Access-Jwt-Assertion",
                                  "Apptunnel.Jwt.Assertion", "ApptunnelJwtAssertion"])
def test_peer_identity_headers_are_stripped(cluster, alice, name):
    """Finding 13: identity headers of Teleport/Pomerium/Cloudflare and spellings of ours are dropped."""
    r = alice.get(cluster.url("echo", "/echo"), headers={name: "forged"})
    assert r.status_code == 200
    assert "forged" not in r.text


def test_request_trailers_do_not_reach_the_app(cluster, alice, upstreams):
    """Finding 13: a forged JWT header in a chunked request's trailers never reaches the app."""
    _, raw = upstreams
    before = len(raw.seen)
    conn = Tls(cluster, "rawcap.apptunnel.localhost")
    try:
        conn.send((f"POST /up HTTP/1.1\r\nHost: {host(cluster, 'rawcap')}\r\n"
                   f"Cookie: __Host-apptunnel_app={app_cookie(alice, 'rawcap')}\r\n"
                   "Transfer-Encoding: chunked\r\nTrailer: Apptunnel-Jwt-Assertion\r\n\r\n"
                   "5\r\nhello\r\n0\r\nApptunnel-Jwt-Assertion: forged\r\nX-Webauth-User: admin\r\n\r\n").encode())
        status, _, body = conn.response()
    finally:
        conn.close()
    assert status == 200 and body == b"ok"
    wait_until(lambda: len(raw.seen) > before, 10, "the app to record the request")
    got = raw.seen[-1]
    assert b"forged" not in got and b"admin" not in got
    assert got.endswith(b"5\r\nhello\r\n0\r\n\r\n")


@pytest.mark.parametrize("framing, status", [
    (b"Transfer-Encoding: identity, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", 400),
    (b"Content-Length: 3, 3\r\n\r\nabc", 400),
    (b"Transfer-Encoding: chunked\r\n\r\n3 \r\nabc\r\n0\r\n\r\n", 400),
    (b"Transfer-Encoding: chunked\r\n\r\n0000000000000003\r\nabc\r\n0\r\n\r\n", 400),
])
def test_ambiguous_framing_is_refused(cluster, alice, upstreams, framing, status):
    """Finding 13: framing an app could read differently is refused, never forwarded as-is."""
    _, raw = upstreams
    before = len(raw.seen)
    conn = Tls(cluster, "rawcap.apptunnel.localhost")
    try:
        conn.send((f"POST /up HTTP/1.1\r\nHost: {host(cluster, 'rawcap')}\r\n"
                   f"Cookie: __Host-apptunnel_app={app_cookie(alice, 'rawcap')}\r\n").encode() + framing)
        got, _, _ = conn.response()
    finally:
        conn.close()
    assert got == status
    assert len(raw.seen) == before


def test_http_1_2_is_refused(cluster, alice, upstreams):
    """Finding 13: `HTTP/1.2` is answered 505 instead of being forwarded."""
    _, raw = upstreams
    before = len(raw.seen)
    conn = Tls(cluster, "rawcap.apptunnel.localhost")
    try:
        conn.send((f"GET / HTTP/1.2\r\nHost: {host(cluster, 'rawcap')}\r\n"
                   f"Cookie: __Host-apptunnel_app={app_cookie(alice, 'rawcap')}\r\n\r\n").encode())
        status, _, _ = conn.response()
    finally:
        conn.close()
    assert status == 505 and len(raw.seen) == before


def test_app_cookies_with_a_domain_are_dropped(cluster, alice):
    """Finding 13: an app's Set-Cookie with a Domain (proxy's parent, a sibling) never reaches
    the browser; host-only cookies do."""
    r = alice.get(cluster.url("rawcap", "/"))
    assert r.status_code == 200
    assert r.raw.headers.getlist("Set-Cookie") == ["own=1; Path=/; Secure; HttpOnly"]
    assert "planted" not in {c.name for c in alice.session.cookies}
    assert "sibling" not in {c.name for c in alice.session.cookies}
    assert "dropped a Set-Cookie with a Domain" in cluster.proxy.log_tail(200)


# Finding 8


def test_app_host_logout_needs_a_same_origin_post(cluster):
    """Finding 8: a cross-site GET or POST to /.apptunnel/logout leaves the session; the app's
    own form POST ends it."""
    browser = Browser(cluster)
    assert browser.login_through(cluster.url("echo", "/echo"), "alice", PASSWORD).status_code == 200
    logout = cluster.url("echo", "/.apptunnel/logout")

    page = browser.get(logout, allow_redirects=False)  # what <img src=...> would fire
    assert page.status_code == 200 and 'method="post"' in page.text
    assert browser.get(cluster.url("echo", "/echo"), allow_redirects=False).status_code == 200

    for headers in ({}, {"Origin": "https://evil.example"}, {"Origin": cluster.url().rstrip("/")}):
        r = browser.post(logout, headers=headers, allow_redirects=False)
        assert r.status_code == 403, headers
        assert browser.get(cluster.url("echo", "/echo"), allow_redirects=False).status_code == 200

    own = cluster.url("echo").rstrip("/")
    r = browser.post(logout, headers={"Origin": own}, allow_redirects=False)
    assert r.status_code == 303 and r.headers["Location"] == cluster.url()
    r = browser.get(cluster.url("echo", "/echo"), allow_redirects=False)
    assert r.status_code == 302 and "/web/launch/echo" in r.headers["Location"]


# Finding 7


@pytest.fixture(scope="module")
def local_port(cluster, tmp_path_factory):
    """`apptunnel proxy app echo` for alice on a free local port."""
    home = tmp_path_factory.mktemp("alice") / ".apptunnel"
    log_in(cluster, "alice", home, PASSWORD, ca_pin(cluster))
    port = free_port()
    proxy = start(home, "echo", str(port))
    yield port
    proxy.stop()


def local_request(port: int, headers: dict) -> requests.Response:
    s = requests.Session()
    s.trust_env = False
    return s.post(f"http://127.0.0.1:{port}/echo", data="x=1", headers={"Content-Type": "text/plain", **headers},
                  timeout=20)


@pytest.mark.parametrize("headers", [
    {"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"},
    {"Origin": "https://evil.example"},
    {"Sec-Fetch-Site": "cross-site"},
    {"Origin": "null"},
])
def test_local_port_refuses_cross_site_requests(cluster, local_port, headers):
    """Finding 7: a page elsewhere making the browser POST to `apptunnel proxy app`'s port
    gets 403 (audited as access.denied), without the user's identity reaching the app."""
    r = local_request(local_port, headers)
    assert r.status_code == 403
    assert "Jwt-Assertion" not in r.text

    def denied():
        return [e for e in audit(cluster, "access.denied") if "cross-site" in json.dumps(e)]
    wait_until(denied, 15, "an access.denied event for the cross-site request", interval=0.5)


@pytest.mark.parametrize("headers", [
    {},  # curl, psql-like clients
    {"Origin": "http://127.0.0.1:{port}", "Sec-Fetch-Site": "same-origin"},
    {"Sec-Fetch-Site": "none"},
])
def test_local_port_serves_non_browser_and_same_origin_requests(cluster, local_port, headers):
    """Finding 7: clients without those headers and same-origin pages keep working."""
    r = local_request(local_port, {k: v.format(port=local_port) for k, v in headers.items()})
    assert r.status_code == 200, r.text


# Finding 9


def _healthz_latency(cluster: Cluster, samples: int) -> float:
    worst = 0.0
    with localhost_resolution():
        s = requests.Session()
        s.trust_env = False
        for _ in range(samples):
            started = time.monotonic()
            assert s.get(cluster.url(path="/healthz"), verify=cluster.ca_file, timeout=20).status_code == 200
            worst = max(worst, time.monotonic() - started)
            time.sleep(0.05)
    return worst


def _proxy_cpu(cluster: Cluster) -> float:
    fields = open(f"/proc/{cluster.proxy.proc.pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0  # utime + stime, in clock ticks of 10 ms


def test_slow_heads_cost_linear_time(cluster, alice):
    """Finding 9: three clients sending 60 KB heads in one-byte TLS records cost the proxy little
    CPU and /healthz stays fast (quadratic re-parsing took seconds of CPU)."""
    head = (f"GET /echo HTTP/1.1\r\nHost: {host(cluster, 'echo')}\r\nX-Pad: ").encode() + b"p" * 60000 + b"\r\n\r\n"
    results: list = []

    def slow_client():
        conn = Tls(cluster, "echo.apptunnel.localhost", timeout=60)
        try:
            for i in range(len(head)):
                conn.sock.send(head[i:i + 1])  # one TLS record per byte
            results.append(conn.response()[0])
        except Exception as err:  # noqa: BLE001 - reported by the assertion below
            results.append(err)
        finally:
            conn.close()

    cpu_before = _proxy_cpu(cluster)
    threads = [threading.Thread(target=slow_client, daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    worst = _healthz_latency(cluster, 10)
    for t in threads:
        t.join(120)
    cpu = _proxy_cpu(cluster) - cpu_before
    assert results == [302, 302, 302]  # no app cookie: sent to sign in, once the head is whole
    # Generous for a shared, loaded test machine (0.25-0.6 s seen); the CPU bound below is
    # what the quadratic parser failed (3.6 s).
    assert worst < 1.5, worst
    # 180 000 TLS records cost some CPU whatever we do; re-scanning the head on each took 3.6 s.
    assert cpu < 2.0, cpu


# Finding 10


def test_second_head_has_a_deadline_on_app_hosts_and_the_web_ui(cluster, alice):
    """Finding 10: after a first request, a second head sent at 1 byte/s is cut 30 s after its
    first byte, on an app host and on the proxy's own host (the idle timer restarted on each byte)."""
    outcomes: dict[str, object] = {}

    def slowloris(name: str, server_name: str, first: bytes, second: bytes):
        conn = Tls(cluster, server_name, timeout=5)
        try:
            conn.send(first)
            conn.response()
            started = time.monotonic()
            for byte in second:
                try:
                    conn.sock.send(bytes([byte]))
                except OSError:
                    break
                if time.monotonic() - started > 45:
                    break
                end = time.monotonic() + 1
                while time.monotonic() < end:
                    try:
                        conn.sock.settimeout(max(0.01, end - time.monotonic()))
                        if conn.closed():
                            outcomes[name] = (time.monotonic() - started, bytes(conn.buf))
                            return
                    except (socket.timeout, TimeoutError):
                        pass
            outcomes[name] = None
        finally:
            conn.close()

    app_first = (f"GET /echo HTTP/1.1\r\nHost: {host(cluster, 'echo')}\r\n"
                 f"Cookie: __Host-apptunnel_app={app_cookie(alice, 'echo')}\r\n\r\n").encode()
    web_first = f"GET /healthz HTTP/1.1\r\nHost: {host(cluster)}\r\n\r\n".encode()
    second = b"GET /echo HTTP/1.1\r\nX-Slow: " + b"a" * 200
    threads = [
        threading.Thread(target=slowloris, args=("app", "echo.apptunnel.localhost", app_first, second)),
        threading.Thread(target=slowloris, args=("web", "apptunnel.localhost", web_first, second)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for name in ("app", "web"):
        outcome = outcomes.get(name)
        assert outcome is not None, f"{name}: the slow second head was never cut"
        elapsed, said = outcome
        assert 28 <= elapsed <= 40, (name, elapsed)
        assert b"HTTP/1.1 408 " in said, (name, said[:300])
