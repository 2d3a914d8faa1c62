"""Security review findings on the app edge, each pinned by a test on real loopback sockets.

* CONNECT on an app host: a 2xx answer from the app used to turn the connection into a raw
  byte pipe, after which the client spoke HTTP to the app directly, past header stripping,
  the JWT and the audit.
* Fixed-app mode (``apptunnel proxy app``): a page on a DNS name rebound to 127.0.0.1 could
  use the local port as the signed-in user, because any Host was accepted.
* Issue 8 (HTTP edge): rewrite headers spoofable when the template had no value, peer
  identity headers and JWT-header spellings passed, X-Forwarded-Host was the raw client
  Host, request trailers were forwarded byte for byte, ambiguous framing was forwarded
  as-is, an app's Set-Cookie with a Domain reached the browser, and the local port took
  cross-site browser requests.
"""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol

from apptunnel.proxy.http1 import EndOfMessage, RequestReader
from apptunnel.catalog import AppInfo
from tests.support.forward_env import APP_HOST, PUBLIC, header_map, request_bytes
from tests.support.waiting import TIMEOUT, until, wait
from tests.support.cert_env import cenv  # noqa: F401 - the certificate environment

SMUGGLED = (b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Team: admin\r\n"
            b"Apptunnel-Jwt-Assertion: forged\r\n\r\n")


class Raw(Protocol):
    """Collects every byte the proxy sends; `closed` fires when it hangs up."""

    def __init__(self):
        self.data = bytearray()
        self.closed = defer.Deferred()

    def dataReceived(self, data):
        self.data += data

    def connectionLost(self, reason):
        self.closed.callback(None)


async def raw_connect(port: int) -> Raw:
    raw = Raw()
    await wait(TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(Factory.forProtocol(lambda: raw)))
    return raw


@pytest.fixture
def env(forward_env):
    return forward_env


@pytest_twisted.ensureDeferred
async def test_connect_on_app_host_is_refused_and_never_becomes_a_raw_pipe(env):
    """CONNECT to an app host is answered 405 here; no bytes after it reach the app unfiltered."""
    cookie = await env.app_cookie()
    raw = await raw_connect(env.port)
    raw.transport.write(request_bytes("CONNECT", "/echo", headers=[
        ("Cookie", f"__Host-apptunnel_app={cookie}")]) + SMUGGLED)
    await until(lambda: b"\r\n\r\n" in raw.data, "a response head")
    await defer.Deferred.fromCoroutine(_settle())
    raw.transport.loseConnection()
    await wait(raw.closed)
    assert raw.data.startswith(b"HTTP/1.1 405 "), bytes(raw.data[:200])
    assert b"forged" not in raw.data and b"admin" not in raw.data


@pytest_twisted.ensureDeferred
async def test_connect_on_fixed_app_connection_is_refused(cenv):  # noqa: F811
    """Through a local port too, CONNECT is refused instead of opening a raw pipe to the app."""
    port, _ = await cenv.local("alice")
    raw = await raw_connect(port)
    raw.transport.write(request_bytes("CONNECT", "/echo", host=f"127.0.0.1:{port}") + SMUGGLED)
    await until(lambda: b"\r\n\r\n" in raw.data, "a response head")
    await defer.Deferred.fromCoroutine(_settle())
    raw.transport.loseConnection()
    await wait(raw.closed)
    assert raw.data.startswith(b"HTTP/1.1 405 "), bytes(raw.data[:200])
    assert b"forged" not in raw.data and b"admin" not in raw.data


@pytest.mark.parametrize("host", ["attacker.example", "attacker.example:{port}", "127.0.0.1.nip.io:{port}"])
@pytest_twisted.ensureDeferred
async def test_local_port_refuses_foreign_host_names(cenv, host):  # noqa: F811
    """A request through a local port naming a foreign DNS host (DNS rebinding) gets 421, not the app."""
    port, _ = await cenv.local("alice")
    client = await cenv.plain(port)
    head, body = await client.request(request_bytes(path="/echo", host=host.format(port=port)))
    assert head.status == 421
    assert b"apptunnel-jwt-assertion" not in body.lower()
    assert await cenv.events("app.request") == []


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "[::1]:{port}", "x",
                                  "grafana.localhost:{port}", "grafana.apptunnel.localhost"])
@pytest_twisted.ensureDeferred
async def test_local_port_accepts_loopback_and_app_host_names(cenv, host):  # noqa: F811
    """Loopback names, IP literals, single labels and the app's own name still reach the app."""
    port, _ = await cenv.local("alice")
    client = await cenv.plain(port)
    head, body = await client.request(request_bytes(path="/echo", host=host.format(port=port)))
    assert head.status == 200, body
    assert json.loads(body)["uri"] == "/echo"


async def _settle():
    """Give a response that should not come a moment to arrive."""
    from twisted.internet import task

    await task.deferLater(reactor, min(0.2, TIMEOUT), lambda: None)


# Issue 8: the HTTP edge


@pytest_twisted.ensureDeferred
async def test_rewrite_headers_are_removed_from_the_client_request_in_any_spelling(env):
    """A rewrite header the user has no value for (X-Missing) never arrives from the client;
    one they have (X-Team) arrives once, the proxy's value."""
    cookie = await env.app_cookie()
    spoofs = [("X-Missing", "admin"), ("x-missing", "admin"), ("X-MISSING", "admin"),
              ("X.Missing", "admin"), ("XMissing", "admin"), ("X-Team", "admin"), ("x-team", "root"),
              ("X.Team", "root")]
    head, body = await env.fetch(request_bytes(path="/echo", headers=[
        ("Cookie", f"__Host-apptunnel_app={cookie}"), *spoofs]))
    assert head.status == 200
    seen = header_map(json.loads(body))
    assert "admin" not in body.decode() and "root" not in body.decode()
    assert seen["x-team"] == ["sre,web"]
    assert not any(name.replace("-", "").replace(".", "") == "xmissing" for name in seen)


@pytest.mark.parametrize("name", ["Teleport-Jwt-Assertion", "X-Pomerium-Jwt-Assertion", "Cf-Access-Jwt-Assertion",
                                  "cf-access-jwt-assertion", "Apptunnel.Jwt.Assertion", "ApptunnelJwtAssertion",
                                  "APPTUNNEL-JWT.ASSERTION", "Teleport.Jwt.Assertion"])
@pytest_twisted.ensureDeferred
async def test_identity_headers_of_peers_and_jwt_spellings_are_stripped(env, name):
    """Identity headers apps built for Teleport/Pomerium/Cloudflare trust, and any spelling of
    ours without . _ -, are stripped."""
    cookie = await env.app_cookie()
    head, body = await env.fetch(request_bytes(path="/echo", headers=[
        ("Cookie", f"__Host-apptunnel_app={cookie}"), (name, "forged")]))
    assert head.status == 200
    assert b"forged" not in body
    assert len(header_map(json.loads(body))["apptunnel-jwt-assertion"]) == 1


@pytest.mark.parametrize("host", [APP_HOST.upper(), APP_HOST.split(":")[0] + ":3080"])
@pytest_twisted.ensureDeferred
async def test_x_forwarded_host_is_the_apps_public_address(env, host):
    """X-Forwarded-Host is the app's public address, whatever spelling of the Host came in."""
    cookie = await env.app_cookie()
    head, body = await env.fetch(request_bytes(path="/echo", host=host, headers=[
        ("Cookie", f"__Host-apptunnel_app={cookie}")]))
    assert head.status == 200
    assert header_map(json.loads(body))["x-forwarded-host"] == [f"grafana.{PUBLIC}"]


@pytest.mark.parametrize("host", [f"grafana.{PUBLIC}:@evil.com", f"grafana.{PUBLIC}@evil.com",
                                  f"grafana.{PUBLIC}/x", f"grafana.{PUBLIC}:x"])
@pytest_twisted.ensureDeferred
async def test_malformed_host_is_400_on_first_and_later_heads(env, host):
    """`echo.apptunnel.localhost:@evil.com` and friends are refused, first head or kept-alive."""
    cookie = await env.app_cookie()
    head, _ = await env.fetch(request_bytes(path="/echo", host=host))
    assert head.status == 400
    client = await env.connect()
    first, _ = await client.request(request_bytes(path="/echo", headers=[("Cookie", f"__Host-apptunnel_app={cookie}")]))
    assert first.status == 200
    second, body = await client.request(request_bytes(path="/echo", host=host, headers=[
        ("Cookie", f"__Host-apptunnel_app={cookie}")]))
    assert second.status == 400 and b"evil" not in body
    client.transport.loseConnection()
    await wait(client.closed)


class Recorder(Protocol):
    """A raw upstream app: records the bytes of each request, answers with a fixed response."""

    response = (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
                b"Set-Cookie: planted=1; Domain=apptunnel.localhost; Path=/\r\n"
                b"Set-Cookie: sibling=1; path=/; domain=.prod.apptunnel.localhost\r\n"
                b"Set-Cookie: own=1; Path=/; Secure; HttpOnly\r\n\r\nok")

    def __init__(self, seen: list):
        self.seen = seen
        self.reader = RequestReader()
        self.raw = bytearray()

    def dataReceived(self, data):
        self.raw += data
        events = self.reader.receive(data)
        while events:
            if any(isinstance(e, EndOfMessage) for e in events):
                self.seen.append(bytes(self.raw))
                self.raw = bytearray()
                self.transport.write(self.response)
            events = self.reader.next_message() if self.reader.state == "done" else []


@pytest.fixture
def recorder(env):
    """An app `rawcap` whose upstream records raw request bytes; yields (seen, app cookie getter)."""
    seen: list[bytes] = []
    port = reactor.listenTCP(0, Factory.forProtocol(lambda: Recorder(seen)), interface="127.0.0.1")
    env.registry.add(object(), "agent-raw", [AppInfo(
        name="rawcap", uri=f"http://127.0.0.1:{port.getHost().port}", labels={"env": "dev"},
        public_addr=f"rawcap.{PUBLIC}", agent_id="agent-raw")])
    yield seen
    port.stopListening()


@pytest_twisted.ensureDeferred
async def test_request_trailers_never_reach_the_app(env, recorder):
    """A forged JWT header in a chunked body's trailer section is dropped; the body arrives."""
    cookie = await env.app_cookie(app="rawcap")
    raw = (f"POST /up HTTP/1.1\r\nHost: rawcap.{PUBLIC}\r\nCookie: __Host-apptunnel_app={cookie}\r\n"
           "Transfer-Encoding: chunked\r\nTrailer: Apptunnel-Jwt-Assertion\r\n\r\n"
           "5\r\nhello\r\n0\r\nApptunnel-Jwt-Assertion: forged\r\nX-Team: admin\r\n\r\n").encode()
    head, body = await env.fetch(raw, b"POST")
    assert head.status == 200 and body == b"ok"
    [got] = recorder
    assert b"forged" not in got and b"admin" not in got
    assert got.endswith(b"\r\n\r\n5\r\nhello\r\n0\r\n\r\n")


@pytest.mark.parametrize("framing", [
    b"Transfer-Encoding: identity, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"Content-Length: 3, 3\r\n\r\nabc",
    b"Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
    b"Transfer-Encoding: chunked\r\n\r\n3 \r\nabc\r\n0\r\n\r\n",
    b"Transfer-Encoding: chunked\r\n\r\n0000000000000003\r\nabc\r\n0\r\n\r\n",
])
@pytest_twisted.ensureDeferred
async def test_ambiguous_framing_is_refused_before_the_app(env, recorder, framing):
    """Framing an app might read differently is answered 400 and never forwarded."""
    cookie = await env.app_cookie(app="rawcap")
    raw = (f"POST /up HTTP/1.1\r\nHost: rawcap.{PUBLIC}\r\nCookie: __Host-apptunnel_app={cookie}\r\n"
           ).encode() + framing
    head, _ = await env.fetch(raw, b"POST")
    assert head.status == 400
    assert recorder == []


@pytest_twisted.ensureDeferred
async def test_http_1_2_is_refused(env, recorder):
    """A request line with HTTP/1.2 is answered 505, not forwarded."""
    cookie = await env.app_cookie(app="rawcap")
    raw = f"GET / HTTP/1.2\r\nHost: rawcap.{PUBLIC}\r\nCookie: __Host-apptunnel_app={cookie}\r\n\r\n"
    head, _ = await env.fetch(raw.encode())
    assert head.status == 505 and recorder == []


@pytest_twisted.ensureDeferred
async def test_app_set_cookie_with_a_domain_is_dropped(env, recorder):
    """An app cannot plant cookies for the proxy or sibling apps: Domain cookies are dropped."""
    cookie = await env.app_cookie(app="rawcap")
    head, _ = await env.fetch(request_bytes(path="/", host=f"rawcap.{PUBLIC}", headers=[
        ("Cookie", f"__Host-apptunnel_app={cookie}")]))
    assert head.status == 200
    assert head.headers.get_all(b"set-cookie") == [b"own=1; Path=/; Secure; HttpOnly"]


# Issue 8: cross-site requests through a local port


@pytest.mark.parametrize("headers", [
    [("Origin", "https://evil.example")],
    [("Origin", "null")],
    [("Origin", "http://127.0.0.1.evil.example")],
    [("Sec-Fetch-Site", "cross-site")],
    [("Sec-Fetch-Site", "cross-site"), ("Origin", "http://127.0.0.1:1")],
])
@pytest_twisted.ensureDeferred
async def test_local_port_refuses_cross_site_browser_requests(cenv, headers):  # noqa: F811
    """A page elsewhere making the browser POST to the local port gets 403, audited as access.denied."""
    port, _ = await cenv.local("alice")
    client = await cenv.plain(port)
    head, body = await client.request(request_bytes("POST", "/echo", host=f"127.0.0.1:{port}",
                                                    headers=headers, body=b"x=1"), b"POST")
    assert head.status == 403
    assert b"apptunnel-jwt-assertion" not in body.lower()
    denied = await cenv.events("access.denied")
    assert [(e.actor, e.target) for e in denied] == [("alice", "grafana")]
    assert "cross-site" in denied[0].fields["reason"]
    assert await cenv.events("app.request") == []


@pytest.mark.parametrize("headers", [
    [],
    [("Sec-Fetch-Site", "same-origin"), ("Origin", "http://127.0.0.1:{port}")],
    [("Sec-Fetch-Site", "none")],
    [("Sec-Fetch-Site", "same-site"), ("Origin", "http://localhost:5173")],
    [("Origin", "https://grafana.apptunnel.localhost")],
])
@pytest_twisted.ensureDeferred
async def test_local_port_serves_same_origin_and_non_browser_requests(cenv, headers):  # noqa: F811
    """curl-like clients (no such headers), same-origin pages and local front ends still work."""
    port, _ = await cenv.local("alice")
    client = await cenv.plain(port)
    headers = [(k, v.format(port=port)) for k, v in headers]
    head, body = await client.request(request_bytes("POST", "/echo", host=f"127.0.0.1:{port}",
                                                    headers=headers, body=b"x=1"), b"POST")
    assert head.status == 200, body


def test_dropped_domain_cookie_is_logged_once_per_app_and_name(env):
    """An app that sets a Domain cookie on every response costs one log line, not one per response."""
    from twisted.logger import globalLogPublisher

    from apptunnel.proxy.http1 import Headers, ResponseHead

    lines = []

    def observer(event):
        if "Set-Cookie with a Domain" in event.get("log_format", ""):
            lines.append(event)

    app = env.registry.app("grafana")
    head = ResponseHead(b"HTTP/1.1", 200, b"OK", Headers([(b"Set-Cookie", b"a=1; Domain=apptunnel.localhost"),
                                                          (b"Set-Cookie", b"b=1; Path=/")]))
    globalLogPublisher.addObserver(observer)
    try:
        for _ in range(5):
            out = env.forwarder.response_head(head, app)
            assert out.headers.get_all(b"set-cookie") == [b"b=1; Path=/"]
    finally:
        globalLogPublisher.removeObserver(observer)
    assert len(lines) == 1
