"""Mechanisms added to keep the HTTP hot path cheap, each with the behaviour it must keep."""

from __future__ import annotations

import json
import socket

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport

from apptunnel.audit import _plain
from apptunnel.proxy.http1 import Headers, RequestReader
from apptunnel.tunnel.endpoints import no_delay
from tests.support.forward_env import request_bytes
from tests.support.waiting import wait


@pytest.fixture
def env(forward_env):
    """The tests here run against the shared forwarder environment."""
    return forward_env


_names = st.sampled_from([b"Host", b"host", b"Cookie", b"X-A", b"x-a", b"CONNECTION"])
_ops = st.lists(st.tuples(st.sampled_from(["add", "set", "remove", "replace"]), _names,
                          st.binary(max_size=3)), max_size=12)


@settings(max_examples=60, deadline=None)
@given(_ops)
def test_header_lookups_match_a_plain_scan_after_any_changes(ops):
    """Cached lower-case names never go stale: lookups equal a linear scan after every edit."""
    h = Headers([(b"Host", b"h")])
    for op, name, value in ops:
        h.get(b"host")  # build the cache before changing things
        if op == "add":
            h.add(name, value)
        elif op == "set":
            h.set(name, value)
        elif op == "remove":
            h.remove(name)
        else:
            h.replace_all(list(h) + [(name, value)])
        for probe in (b"host", b"x-a", b"cookie", b"connection"):
            scan = [v for n, v in h if n.lower() == probe]
            assert h.get_all(probe) == scan
            assert h.get(probe) == (scan[0] if scan else None)
            assert (probe in h) == bool(scan)


def test_request_reader_reports_bytes_held_past_the_request():
    """`held` is 0 after a lone request and counts a pipelined one that came behind it."""
    reader = RequestReader()
    reader.receive(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert reader.state == "done" and reader.held == 0
    reader.receive(b"GET /2 HTTP/1.1\r\n")
    assert reader.held == len(b"GET /2 HTTP/1.1\r\n")


@pytest.mark.parametrize("fields", [
    {"method": "GET", "status": 200, "ms": 1.5, "ok": True, "none": None, "text": "é\u2028"},
    {"nested": {"a": (1, 2)}, "when": object},
])
def test_audit_fields_are_the_same_as_a_json_round_trip(fields):
    """The scalar fast path gives exactly what the JSON round trip gives (exotic values too)."""
    assert _plain(fields) == json.loads(json.dumps(fields, default=str))


@pytest_twisted.ensureDeferred
async def test_no_delay_is_set_on_a_real_socket_and_ignored_without_one():
    """no_delay turns Nagle off on a TCP transport and leaves socketless transports alone."""
    accepted = defer.Deferred()

    class Server(Protocol):
        def connectionMade(self):
            accepted.callback(self.transport)

    port = await wait(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        Factory.forProtocol(Server)))
    client = await wait(TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port).connect(
        Factory.forProtocol(Protocol)))
    server_transport = await wait(accepted)
    try:
        no_delay(server_transport)
        sock = server_transport.getHandle()
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        no_delay(StringTransport())  # no socket: nothing to do, nothing raised
    finally:
        client.transport.loseConnection()
        server_transport.loseConnection()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_client_is_paused_only_when_it_sends_more_during_an_exchange(env):  # noqa: F811
    """A lone request costs no pause; bytes of a next request while one is open pause the client."""
    secret = await env.app_cookie()
    cookie = [("Cookie", f"__Host-apptunnel_app={secret}")]
    transport = StringTransport()
    conn = env.forwarder.buildProtocol(None)
    conn.makeConnection(transport)
    conn.dataReceived(request_bytes(path="/sse", headers=cookie))
    for _ in range(200):  # the stream to the app opens over a real socket
        if b"data: first" in transport.value():
            break
        await wait(_sleep(0.01))
    assert b"data: first" in transport.value()
    assert transport.producerState == "producing"
    conn.dataReceived(request_bytes(path="/echo?n=2", headers=cookie))
    assert transport.producerState == "paused"
    env.events.release.callback(None)
    for _ in range(200):
        if b"/echo?n=2" in transport.value():
            break
        await wait(_sleep(0.01))
    assert b"/echo?n=2" in transport.value() and transport.producerState == "producing"
    conn.connectionLost(None)


def _sleep(seconds: float) -> defer.Deferred:
    d = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d
