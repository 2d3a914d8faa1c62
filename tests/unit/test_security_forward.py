"""Security review findings on the app edge, each pinned by a test on real loopback sockets.

* CONNECT on an app host: a 2xx answer from the app used to turn the connection into a raw
  byte pipe, after which the client spoke HTTP to the app directly, past header stripping,
  the JWT and the audit.
* Fixed-app mode (``apptunnel proxy app``): a page on a DNS name rebound to 127.0.0.1 could
  use the local port as the signed-in user, because any Host was accepted.
"""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol

from tests.support.forward_env import request_bytes
from tests.support.waiting import TIMEOUT, until, wait
from tests.unit.test_forward_certs import cenv  # noqa: F401 - the certificate environment

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
