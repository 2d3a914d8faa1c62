"""HTTP apps with certificate identity on real loopback sockets.

The edge over TLS with the cluster CA (client certificate requested), TcpAccess handing
HTTP apps to the AppForwarder in fixed-app mode, the CLI's LocalProxy as the client,
real SQLite/SessionManager/RoleCache/JwtSigner/AuditLog/LockWatcher, a real upstream
twisted.web app, and user certificates issued by the real CA.
"""

from __future__ import annotations

import json
from urllib.parse import urlsplit

import pytest_twisted
from twisted.internet import defer, reactor

from apptunnel.backend.records import Lock, User
from apptunnel.auth.callers import Caller
from apptunnel.proxy.router import Answer
from apptunnel.proxy.http1 import Headers, RequestHead
from tests.support.forward_env import header_map, request_bytes
from tests.support.cert_env import APP_PUBLIC, cenv  # noqa: F401 - cenv is a fixture
from tests.support.waiting import wait


FORGED = [("Apptunnel-Jwt-Assertion", "forged"), ("X-Forwarded-For", "6.6.6.6"),
          ("X-Forwarded-Host", "evil.example"), ("Cookie", "__Host-apptunnel_app=stolen; a=1")]


@pytest_twisted.ensureDeferred
async def test_local_port_reaches_http_app_with_identity(cenv):
    """proxy app on an HTTP app: requests get one valid JWT, X-Forwarded-*, no forged headers."""
    port, said = await cenv.local("alice")
    client = await cenv.plain(port)
    tokens = []
    for _ in range(2):  # two requests on one keep-alive connection
        head, body = await client.request(request_bytes(path="/echo?x=1", host=f"127.0.0.1:{port}",
                                                        headers=FORGED))
        assert head.status == 200, body
        echo = json.loads(body)
        headers = header_map(echo)
        assert echo["uri"] == "/echo?x=1"
        assert len(headers["apptunnel-jwt-assertion"]) == 1
        tokens.append(headers["apptunnel-jwt-assertion"][0])
        assert headers["x-forwarded-host"] == [APP_PUBLIC]
        assert headers["x-forwarded-proto"] == ["https"]
        assert headers["x-forwarded-for"] == ["127.0.0.1"]
        assert headers["host"] == [urlsplit(cenv.registry.app("grafana").uri).netloc]
        assert headers["cookie"] == ["a=1"]
    claims = cenv.claims(tokens[0])
    assert (claims["sub"], claims["roles"], claims["traits"]) == ("alice", ["dev"], {"team": ["sre"]})
    assert tokens[0] == tokens[1]  # signed once per certificate, then cached
    assert said == []
    requests = await cenv.events("app.request")
    assert [(e.actor, e.target, e.fields["status"]) for e in requests] == [("alice", "grafana", 200)] * 2
    assert await cenv.events("tcp.session.start") == []


@pytest_twisted.ensureDeferred
async def test_local_port_http_app_refused_by_role_before_upgrade(cenv):
    """A user whose roles do not allow the app gets the one-line 403 from TcpAccess."""
    port, said = await cenv.local("bob", "prod")
    client = await cenv.plain(port)
    client.transport.write(request_bytes(path="/echo"))
    await wait(client.closed)
    assert client.head is None
    assert said == ["proxy refused: 403 Forbidden: you are not allowed to use prod"]


@pytest_twisted.ensureDeferred
async def test_local_port_redirects_become_relative(cenv):
    """An app-origin redirect through a local port points at the local address, not the public one."""
    port, _ = await cenv.local("alice")
    client = await cenv.plain(port)
    head, _ = await client.request(request_bytes(path="/redirect", host=f"127.0.0.1:{port}"))
    assert head.status == 302 and head.headers.get(b"location") == b"/landing?x=1"


@pytest_twisted.ensureDeferred
async def test_app_host_accepts_user_certificate(cenv):
    """Directly on the app host, a valid user certificate stands in for the app session."""
    client = await cenv.tls(cenv.cert("alice"))
    head, body = await client.request(request_bytes(path="/echo", host=APP_PUBLIC, headers=FORGED))
    assert head.status == 200
    headers = header_map(json.loads(body))
    assert len(headers["apptunnel-jwt-assertion"]) == 1
    assert cenv.claims(headers["apptunnel-jwt-assertion"][0])["username"] == "alice"
    assert headers["x-forwarded-host"] == [APP_PUBLIC]


@pytest_twisted.ensureDeferred
async def test_app_host_certificate_denied_by_role_and_browser_unaffected(cenv):
    """A certificate whose roles deny the app gets 403 (audited); no certificate still redirects."""
    client = await cenv.tls(cenv.cert("bob", roles=("ops",)))
    head, _ = await client.request(request_bytes(path="/echo", host=APP_PUBLIC))
    assert head.status == 403
    denied = await cenv.events("access.denied")
    assert [(e.actor, e.target) for e in denied] == [("bob", "grafana")]
    browser = await cenv.tls(None)
    head, _ = await browser.request(request_bytes(path="/echo", host=APP_PUBLIC))
    assert head.status == 302 and b"/web/launch/grafana" in head.headers.get(b"location")


@pytest_twisted.ensureDeferred
async def test_lock_cuts_live_http_connections(cenv):
    """A new lock cuts keep-alive connections of that user in every mode; new requests refused."""
    port, said = await cenv.local("alice")
    fixed = await cenv.plain(port)
    head, _ = await fixed.request(request_bytes(path="/echo", host="x"))
    assert head.status == 200
    direct = await cenv.tls(cenv.cert("alice"))
    head, _ = await direct.request(request_bytes(path="/echo", host=APP_PUBLIC))
    assert head.status == 200
    _, web = await wait(cenv.sessions.create_web_session(User("alice", None, ("dev",), {}, 0.0)))
    code = await wait(cenv.sessions.create_auth_code(web, "grafana", "/", "st"))
    secret, _, _ = await wait(cenv.sessions.redeem_auth_code(code, "st", "grafana"))
    browser = await cenv.tls(None)
    head, _ = await browser.request(request_bytes(
        path="/echo", host=APP_PUBLIC, headers=[("Cookie", f"__Host-apptunnel_app={secret}")]))
    assert head.status == 200
    other = await cenv.tls(cenv.cert("carol"))
    head, _ = await other.request(request_bytes(path="/echo", host=APP_PUBLIC))
    assert head.status == 200

    await wait(cenv.backend.put_lock(Lock("l1", "alice", None, "incident", reactor.seconds(), None, "admin")))
    await wait(defer.gatherResults([fixed.closed, direct.closed, browser.closed]))
    assert other.transport.connected  # carol is not locked
    enforced = await cenv.events("lock.enforced")
    assert sum(1 for e in enforced if e.fields.get("where") == "live connection") == 3

    again = await cenv.plain(port)
    again.transport.write(request_bytes(path="/echo"))
    await wait(again.closed)
    assert said[-1] == "proxy refused: 403 Forbidden: your access is locked: incident"
    direct = await cenv.tls(cenv.cert("alice"))
    head, body = await direct.request(request_bytes(path="/echo", host=APP_PUBLIC))
    assert head.status == 403 and b"your access is locked: incident" in body


@pytest_twisted.ensureDeferred
async def test_fixed_route_refuses_expired_certificate(cenv):
    """A fixed-app request after the certificate expired is answered 401 and closed."""
    caller = Caller("alice", ("dev",), {}, "certificate", "ab" * 32, reactor.seconds() - 1)
    head = RequestHead(b"GET", b"/echo", b"HTTP/1.1", Headers([(b"Host", b"x")]))
    answer = await cenv.forwarder.router.route_fixed(head, "127.0.0.1", "grafana", caller)
    assert isinstance(answer, Answer) and (answer.status, answer.close) == (401, True)
    assert b"certificate expired: run apptunnel login" in answer.data
