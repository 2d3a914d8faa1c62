"""The app edge end to end over loopback: a real edge, a real upstream app, real auth.

The proxy side is the real EdgeFactory + AppForwarder with SessionManager, RoleCache,
JwtSigner and AuditLog over SQLite in tmp_path. ``connect_app`` opens a TCP connection to
the app's URI (what the agent does at the other end of a tunnel). The upstream is a
twisted.web Site, plus a raw WebSocket echo built on the websockets sans-IO protocol.
"""

from __future__ import annotations

import gc
import json
import tracemalloc
from urllib.parse import parse_qs, urlsplit

import jwt as pyjwt
import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from websockets.client import ClientProtocol
from websockets.typing import Origin
from websockets.uri import parse_uri

from tests.support.forward_env import APP_HOST, PUBLIC, header_map, request_bytes
from tests.support.waiting import TIMEOUT, wait


@pytest.fixture
def env(forward_env):
    """The tests here run against the shared forwarder environment."""
    return forward_env


# Sign-in hand-off


@pytest_twisted.ensureDeferred
async def test_no_cookie_redirects_to_launch_with_state_cookie(env):
    """Without an app session a GET is sent to the proxy's launch page, bound to a state cookie."""
    head, _ = await env.fetch(request_bytes(path="/dash/x?a=1&b=%2F"))
    assert head.status == 302
    loc = urlsplit(head.headers.get(b"location").decode())
    assert (loc.scheme, loc.netloc, loc.path) == ("https", PUBLIC, "/web/launch/grafana")
    query = parse_qs(loc.query)
    assert query["path"] == ["/dash/x?a=1&b=%2F"]
    cookie = head.headers.get(b"set-cookie").decode()
    assert cookie.startswith(f"__Host-apptunnel_state={query['state'][0]};")
    for attr in ("Path=/", "Secure", "HttpOnly", "SameSite=Lax", "Max-Age=300"):
        assert attr in cookie
    assert "Domain" not in cookie


@pytest_twisted.ensureDeferred
async def test_post_without_session_is_401(env):
    """A non-GET request without a session gets 401, not a redirect."""
    head, body = await env.fetch(request_bytes("POST", "/echo", body=b"x=1"), b"POST")
    assert head.status == 401 and b"Sign in" in body


@pytest_twisted.ensureDeferred
async def test_auth_code_hand_off_sets_host_only_cookie_and_lands_on_path(env):
    """Redeeming a code sets a __Host- Secure HttpOnly cookie, clears state and redirects to the path."""
    code = await wait(env.sessions.create_auth_code(env.webs["alice"], "grafana", "/dash?x=1", "st"))
    raw = request_bytes(path=f"/.apptunnel/auth?code={code}", headers=[("Cookie", "__Host-apptunnel_state=st")])
    head, _ = await env.fetch(raw)
    assert head.status == 302 and head.headers.get(b"location") == b"/dash?x=1"
    cookies = [c.decode() for c in head.headers.get_all(b"set-cookie")]
    app_cookie = next(c for c in cookies if c.startswith("__Host-apptunnel_app="))
    secret = app_cookie.split(";")[0].split("=", 1)[1]
    for attr in ("Path=/", "Secure", "HttpOnly", "SameSite=Lax"):
        assert attr in app_cookie
    assert "Domain" not in app_cookie
    max_age = int(app_cookie.split("Max-Age=")[1].split(";")[0])
    assert env.config.session_ttl - 60 < max_age <= env.config.session_ttl
    assert any(c.startswith("__Host-apptunnel_state=;") and "Max-Age=0" in c for c in cookies)
    # The cookie now opens the app.
    head, body = await env.fetch(request_bytes(path="/echo", headers=[("Cookie", f"__Host-apptunnel_app={secret}")]))
    assert head.status == 200 and json.loads(body)["uri"] == "/echo"
    events = await env.audit_events("session.app.start")
    assert [(e.actor, e.target, e.outcome) for e in events] == [("alice", "grafana", "success")]


@pytest_twisted.ensureDeferred
async def test_forged_wrong_state_and_replayed_codes_are_refused(env):
    """Unknown codes, a wrong state, and a second use of a code all get 400 and no cookie."""
    web = env.webs["alice"]
    state_cookie = [("Cookie", "__Host-apptunnel_state=st")]
    head, _ = await env.fetch(request_bytes(path="/.apptunnel/auth?code=forged", headers=state_cookie))
    assert head.status == 400
    code = await wait(env.sessions.create_auth_code(web, "grafana", "/", "other-state"))
    head, _ = await env.fetch(request_bytes(path=f"/.apptunnel/auth?code={code}", headers=state_cookie))
    assert head.status == 400
    code = await wait(env.sessions.create_auth_code(web, "grafana", "/", "st"))
    first, _ = await env.fetch(request_bytes(path=f"/.apptunnel/auth?code={code}", headers=state_cookie))
    again, _ = await env.fetch(request_bytes(path=f"/.apptunnel/auth?code={code}", headers=state_cookie))
    assert first.status == 302 and again.status == 400
    assert not any(c.startswith(b"__Host-apptunnel_app=") for c in again.headers.get_all(b"set-cookie"))
    outcomes = [e.outcome for e in await env.audit_events("session.app.start")]
    assert sorted(outcomes) == ["failure", "failure", "failure", "success"]


@pytest_twisted.ensureDeferred
async def test_logout_ends_app_session_and_clears_cookie(env):
    """The app-host logout path ends the session, clears the cookie and goes to the proxy."""
    secret = await env.app_cookie()
    cookie = [("Cookie", f"__Host-apptunnel_app={secret}")]
    # Since issue 8 a logout is a POST from the app's own page (the GET shows its button).
    head, _ = await env.fetch(request_bytes("POST", "/.apptunnel/logout", headers=cookie + [
        ("Origin", f"https://{APP_HOST}")]), b"POST")
    assert head.status == 303 and head.headers.get(b"location") == f"https://{PUBLIC}/".encode()
    assert head.headers.get(b"set-cookie").startswith(b"__Host-apptunnel_app=;")
    head, _ = await env.fetch(request_bytes(path="/echo", headers=cookie))
    assert head.status == 302 and b"/web/launch/grafana" in head.headers.get(b"location")


@pytest_twisted.ensureDeferred
async def test_logout_get_shows_a_button_and_keeps_the_session(env):
    """GET on the logout path (what any page can fire) only shows a form that POSTs."""
    secret = await env.app_cookie()
    cookie = [("Cookie", f"__Host-apptunnel_app={secret}")]
    head, body = await env.fetch(request_bytes(path="/.apptunnel/logout", headers=cookie))
    assert head.status == 200 and head.headers.get(b"set-cookie") is None
    assert b'<form method="post" action="/.apptunnel/logout">' in body
    head, _ = await env.fetch(request_bytes(path="/echo", headers=cookie))
    assert head.status == 200


@pytest.mark.parametrize("proof", [
    [],
    [("Origin", "https://evil.example")],
    [("Origin", "null")],
    [("Origin", f"https://prod.{PUBLIC}")],
    [("Referer", "https://evil.example/page")],
    [("Origin", f"http://{APP_HOST}")],
])
@pytest_twisted.ensureDeferred
async def test_cross_site_logout_post_is_refused(env, proof):
    """A logout POST without Origin/Referer of the app's own https origin is 403; the session lives."""
    secret = await env.app_cookie()
    cookie = [("Cookie", f"__Host-apptunnel_app={secret}")]
    head, _ = await env.fetch(request_bytes("POST", "/.apptunnel/logout", headers=cookie + proof), b"POST")
    assert head.status == 403
    head, _ = await env.fetch(request_bytes(path="/echo", headers=cookie))
    assert head.status == 200


@pytest_twisted.ensureDeferred
async def test_logout_with_same_origin_referer_is_accepted(env):
    """A Referer on the app's own origin stands in for Origin, as on the proxy's logout."""
    secret = await env.app_cookie()
    cookie = [("Cookie", f"__Host-apptunnel_app={secret}")]
    head, _ = await env.fetch(request_bytes("POST", "/.apptunnel/logout", headers=cookie + [
        ("Referer", f"https://{APP_HOST}/some/page")]), b"POST")
    assert head.status == 303


# Forwarding


@pytest_twisted.ensureDeferred
async def test_identity_and_forwarding_headers_are_stripped_and_set(env):
    """Client identity headers, proxy cookies and hop-by-hop headers never reach the app; ours do."""
    secret = await env.app_cookie()
    raw = request_bytes(path="/echo?q=1", headers=[
        ("Apptunnel-Jwt-Assertion", "forged-1"),
        ("apptunnel-jwt-assertion", "forged-2"),
        ("APPTUNNEL-JWT-ASSERTION", "forged-3"),
        ("Apptunnel_Jwt_Assertion", "forged-4"),
        ("X_Remote_User", "admin"),
        ("X-Forwarded-For", "6.6.6.6"),
        ("X-Forwarded-Host", "evil.example"),
        ("X-Forwarded-Proto", "http"),
        ("Forwarded", "for=6.6.6.6"),
        ("X-Real-IP", "6.6.6.6"),
        ("Proxy-Authorization", "Basic eA=="),
        ("Connection", "keep-alive, X-Drop-Me, Content-Length"),
        ("X-Drop-Me", "1"),
        ("Cookie", f"a=1; __Host-apptunnel_app={secret}; __Host-apptunnel_state=s; b=2"),
        ("X-Kept", "yes"),
    ])
    head, body = await env.fetch(raw)
    assert head.status == 200
    seen = header_map(json.loads(body))
    assert not any("_" in name for name in seen)
    for gone in ("forwarded", "x-real-ip", "proxy-authorization", "x-drop-me", "x-missing"):
        assert gone not in seen
    assert seen["cookie"] == ["a=1; b=2"]
    assert seen["x-forwarded-for"] == ["127.0.0.1"]
    assert seen["x-forwarded-host"] == [APP_HOST]
    assert seen["x-forwarded-proto"] == ["https"]
    assert seen["host"] == [f"127.0.0.1:{env.up_port}"]
    assert seen["x-kept"] == ["yes"]
    assert seen["x-team"] == ["sre,web"]
    tokens = seen["apptunnel-jwt-assertion"]
    assert len(tokens) == 1 and "forged" not in tokens[0]
    key = pyjwt.PyJWK(env.keys.jwks()["keys"][0]).key
    claims = pyjwt.decode(tokens[0], key, algorithms=["ES256"], audience=f"https://grafana.{PUBLIC}")
    assert claims["sub"] == claims["username"] == "alice" and claims["roles"] == ["dev"]
    assert claims["iss"] == "test"


@pytest_twisted.ensureDeferred
async def test_request_body_and_keep_alive_reuse(env):
    """Bodies reach the app and several requests on one connection each get their response."""
    secret = await env.app_cookie()
    cookie = [("Cookie", f"__Host-apptunnel_app={secret}")]
    client = await env.connect()
    for i in range(3):
        body = b"z" * (1000 * (i + 1))
        head, data = await client.request(request_bytes("POST", f"/echo?i={i}", headers=cookie, body=body), b"POST")
        echo = json.loads(data)
        assert head.status == 200 and echo["body_length"] == len(body) and echo["uri"] == f"/echo?i={i}"
    chunked = request_bytes("PUT", "/echo", headers=cookie + [("Transfer-Encoding", "chunked")])
    head, data = await client.request(chunked + b"3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n", b"PUT")
    assert json.loads(data)["body_length"] == 5
    client.transport.loseConnection()
    await wait(client.closed)
    events = await env.audit_events("app.request")
    assert [e.fields["status"] for e in events] == [200] * 4
    first = events[0]
    assert (first.actor, first.target, first.fields["method"], first.fields["path"]) == ("alice", "grafana", "POST", "/echo")
    assert first.fields["bytes_in"] == 1000 and first.fields["bytes_out"] > 0
    assert first.fields["client_ip"] == "127.0.0.1" and first.fields["duration_ms"] >= 0


@pytest_twisted.ensureDeferred
async def test_pipelined_requests_are_answered_in_order(env):
    """Two requests sent at once are answered one after the other, in order."""
    secret = await env.app_cookie()
    cookie = [("Cookie", f"__Host-apptunnel_app={secret}")]
    client = await env.connect()
    both = request_bytes(path="/echo?n=1", headers=cookie) + request_bytes(path="/echo?n=2", headers=cookie)
    _, first = await client.request(both)
    second = defer.Deferred()
    client.done = second
    client.head, client.body = None, bytearray()
    client._handle(client.reader.start(b"GET"))
    _, data = await second.addTimeout(TIMEOUT, reactor)
    assert json.loads(first)["uri"] == "/echo?n=1" and json.loads(data)["uri"] == "/echo?n=2"
    client.transport.loseConnection()
    await wait(client.closed)


@pytest_twisted.ensureDeferred
async def test_rbac_denial_is_403_without_app_content_and_audited(env):
    """A user whose roles do not allow the app gets the 403 page, never the app, and an audit event."""
    secret = await env.app_cookie(user="bob")
    head, body = await env.fetch(request_bytes(path="/echo", headers=[("Cookie", f"__Host-apptunnel_app={secret}")]))
    assert head.status == 403 and b"not allowed" in body and b"headers" not in body
    events = await env.audit_events("access.denied")
    assert [(e.actor, e.target, e.outcome) for e in events] == [("bob", "grafana", "failure")]
    assert await env.audit_events("app.request") == []


@pytest_twisted.ensureDeferred
async def test_location_pointing_at_app_origin_is_rewritten(env):
    """Redirects to the app's internal origin become its public address; proxy cookies are dropped."""
    secret = await env.app_cookie()
    head, _ = await env.fetch(request_bytes(path="/redirect", headers=[("Cookie", f"__Host-apptunnel_app={secret}")]))
    assert head.status == 302
    assert head.headers.get(b"location") == f"https://grafana.{PUBLIC}/landing?x=1".encode()
    assert head.headers.get(b"x-other-location") == f"http://127.0.0.1:{env.up_port}/kept".encode()
    cookies = head.headers.get_all(b"set-cookie")
    assert any(c.startswith(b"app_cookie=1") for c in cookies)
    assert not any(b"apptunnel" in c for c in cookies)


@pytest_twisted.ensureDeferred
async def test_chunked_response_passes_through_framed(env):
    """A chunked response keeps its chunked framing and decodes to the app's bytes."""
    secret = await env.app_cookie()
    head, body = await env.fetch(request_bytes(path="/chunked", headers=[("Cookie", f"__Host-apptunnel_app={secret}")]))
    assert head.headers.get(b"transfer-encoding") == b"chunked"
    assert dechunk(body) == b"part-0;part-1;part-2;part-3;part-4;"


def dechunk(data: bytes) -> bytes:
    out, pos = bytearray(), 0
    while True:
        end = data.index(b"\r\n", pos)
        size = int(data[pos:end].split(b";")[0], 16)
        pos = end + 2
        if size == 0:
            return bytes(out)
        out += data[pos:pos + size]
        pos += size + 2


@pytest_twisted.ensureDeferred
async def test_server_sent_events_stream_before_response_ends(env):
    """The first SSE event reaches the client while the response is still open."""
    secret = await env.app_cookie()
    client = await env.connect()
    done = client.request(request_bytes(path="/sse", headers=[("Cookie", f"__Host-apptunnel_app={secret}")]))
    await client.wait_for(b"data: first")
    assert not done.called
    env.events.release.callback(None)
    head, body = await done
    assert head.status == 200 and b"data: last" in body
    client.transport.loseConnection()
    await wait(client.closed)


@pytest_twisted.ensureDeferred
async def test_large_response_streams_with_bounded_memory(env):
    """A 64 MiB response to a stalled then slow reader is relayed with bounded memory (backpressure)."""
    from twisted.internet.task import deferLater

    secret = await env.app_cookie()
    client = await env.connect()
    client.keep_body = False
    gc.collect()
    tracemalloc.start()
    try:
        done = client.request(request_bytes(path="/big?mb=64", headers=[("Cookie", f"__Host-apptunnel_app={secret}")]))
        # The client stops reading: without backpressure the proxy would keep pulling the
        # app's bytes into its write buffer for the client.
        client.transport.pauseProducing()
        await wait(deferLater(reactor, 0.5, lambda: None))
        stalled_count = client.count
        client.transport.resumeProducing()
        head, _ = await done
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert head.status == 200 and client.count == 64 * 1024 * 1024
    assert stalled_count < 8 * 1024 * 1024
    assert peak < 8 * 1024 * 1024, f"peak {peak} bytes"
    client.transport.loseConnection()
    await wait(client.closed)


# WebSocket


async def ws_connect(env, origin):
    secret = await env.app_cookie(app="ws")
    ws = ClientProtocol(parse_uri(f"wss://ws.{PUBLIC}/socket"), origin=Origin(origin) if origin else None)
    handshake = ws.connect()
    handshake.headers["Cookie"] = f"__Host-apptunnel_app={secret}"
    ws.send_request(handshake)
    client = await env.connect()
    done = client.request(b"".join(ws.data_to_send()))
    return ws, client, done


@pytest_twisted.ensureDeferred
async def test_websocket_upgrade_echo_with_matching_origin(env):
    """A WebSocket with the app's own Origin is upgraded and messages echo both ways."""
    ws, client, done = await ws_connect(env, f"https://ws.{PUBLIC}")
    head, _ = await done
    assert head.status == 101
    ws.receive_data(head.to_bytes() + bytes(client.body))
    client.body = bytearray()
    assert ws.events_received()[0].status_code == 101
    ws.send_text(b"hello")
    client.transport.write(b"".join(ws.data_to_send()))
    await client.wait_for(b"echo:hello")
    ws.receive_data(bytes(client.body))
    assert [f.data for f in ws.events_received()] == [b"echo:hello"]
    client.transport.loseConnection()
    await wait(client.closed)
    events = await env.audit_events("app.request")
    assert [(e.target, e.fields["status"]) for e in events] == [("ws", 101)]


@pytest.mark.parametrize("origin", ["https://evil.example", f"http://ws.{PUBLIC}", f"https://grafana.{PUBLIC}", None])
@pytest_twisted.ensureDeferred
async def test_websocket_with_foreign_origin_is_refused(env, origin):
    """A WebSocket upgrade whose Origin is not the app's own is refused with 403."""
    ws, client, done = await ws_connect(env, origin)
    head, _ = await done
    assert head.status == 403
    client.transport.loseConnection()
    await wait(client.closed)


# Errors


@pytest_twisted.ensureDeferred
async def test_app_down_is_502(env):
    """An app nobody listens for gets the 502 page without socket details."""
    secret = await env.app_cookie(app="down")
    head, body = await env.fetch(request_bytes(path="/", host=f"down.{PUBLIC}", headers=[("Cookie", f"__Host-apptunnel_app={secret}")]))
    assert head.status == 502 and b"not reachable" in body and b"refused" not in body.lower()


@pytest_twisted.ensureDeferred
async def test_malformed_app_response_is_502_and_closed(env):
    """An app answering with ambiguous framing gets the client a 502 and a closed connection."""
    secret = await env.app_cookie(app="broken")
    client = await env.connect()
    head, body = await client.request(request_bytes(host=f"broken.{PUBLIC}", headers=[("Cookie", f"__Host-apptunnel_app={secret}")]))
    assert head.status == 502 and b"not reachable" in body
    await wait(client.closed)
    events = await env.audit_events("app.request")
    assert [(e.target, e.fields["status"], e.outcome) for e in events] == [("broken", 502, "failure")]


@pytest_twisted.ensureDeferred
async def test_no_agent_is_503(env):
    """An app with no live tunnel gets the 503 page."""
    secret = await env.app_cookie(app="ghost")
    head, body = await env.fetch(request_bytes(path="/", host=f"ghost.{PUBLIC}", headers=[("Cookie", f"__Host-apptunnel_app={secret}")]))
    assert head.status == 503 and b"No agent" in body


@pytest_twisted.ensureDeferred
async def test_malformed_request_is_400_and_closed(env):
    """A request with an invalid header line gets 400 and the connection is closed."""
    client = await env.connect()
    d = client.request(f"GET / HTTP/1.1\r\nHost: {APP_HOST}\r\nBad Header: x\r\n\r\n".encode())
    head, _ = await d
    assert head.status == 400
    await wait(client.closed)


@pytest_twisted.ensureDeferred
async def test_smuggling_attempt_is_400(env):
    """A request with both Content-Length and Transfer-Encoding is refused before any app sees it."""
    secret = await env.app_cookie()
    raw = request_bytes("POST", "/echo", headers=[("Cookie", f"__Host-apptunnel_app={secret}"),
                                                 ("Content-Length", "4"), ("Transfer-Encoding", "chunked")])
    head, _ = await env.fetch(raw + b"0\r\n\r\n", b"POST")
    assert head.status == 400
    assert await env.audit_events("app.request") == []


@pytest_twisted.ensureDeferred
async def test_unknown_app_host_is_404(env):
    """A subdomain no app serves gets the 404 page."""
    head, body = await env.fetch(request_bytes(host=f"nothing.{PUBLIC}"))
    assert head.status == 404 and b"No app" in body


@pytest_twisted.ensureDeferred
async def test_proxy_host_goes_to_web_ui_and_foreign_host_is_421(env):
    """The edge hands the proxy's own host to the web Site and refuses hosts it does not serve."""
    head, body = await env.fetch(request_bytes(host=PUBLIC))
    assert head.status == 200 and body == b"proxy web ui"
    head, _ = await env.fetch(request_bytes(host="example.com"))
    assert head.status == 421
