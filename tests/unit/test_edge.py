"""The edge: first-head routing by Host, hand-over of the transport, limits (memory
transports; behind real TLS: tests/integration/test_edge.py)."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web import server

from apptunnel.config import ProxyConfig
from apptunnel.proxy.edge import EdgeFactory
from apptunnel.proxy.forward import AppForwarder, AppConnection
from apptunnel.proxy.http1 import MAX_HEAD
from apptunnel.catalog import AppInfo
from tests.support.audit_fake import Audit
from apptunnel.proxy.registry import AgentRegistry
from tests.support.edge_site import Hello
from tests.support.forward_env import APP_HOST, PUBLIC, request_bytes


class _TransportWithProtocol(StringTransport):
    """A memory transport that, like tcp.Server, dispatches through `.protocol`."""

    protocol = None


def make_edge(clock):
    config = ProxyConfig(
        path="p.yaml", cluster_name="t", data_dir="/nonexistent", public_addr=PUBLIC,
        web_listen_addr="127.0.0.1:0", tunnel_listen_addr="127.0.0.1:0", backend_type="sqlite",
        backend_path="/nonexistent/db", tls_cert_file=None, tls_key_file=None,
    )
    registry = AgentRegistry()
    registry.add(object(), "a1", [AppInfo(name="grafana", uri="http://127.0.0.1:1", public_addr=APP_HOST)])
    # Routing and hand-over never reach sessions, roles or signing; a request no app
    # serves is audited (its error page names its request id).
    forwarder = AppForwarder(
        config=config, registry=registry, sessions=None, roles=None, signer=None, audit=Audit(),
        clock=clock, connect_app=None,
    )
    site = server.Site(Hello())
    return EdgeFactory("Apptunnel.Localhost", site, forwarder)


def connect(factory):
    proto = factory.buildProtocol(None)
    transport = _TransportWithProtocol()
    transport.protocol = proto
    proto.makeConnection(transport)
    return proto, transport


def test_head_split_across_reads_is_replayed_to_the_web_site():
    """A first head arriving in pieces is handed whole to the web Site, which answers it."""
    clock = Clock()
    edge, transport = connect(make_edge(clock))
    raw = request_bytes(host="APPTUNNEL.localhost:3080")
    for i in range(0, len(raw), 5):
        transport.protocol.dataReceived(raw[i:i + 5])
    assert transport.value().startswith(b"HTTP/1.1 200 OK")
    assert transport.value().endswith(b"web:APPTUNNEL.localhost:3080")
    assert transport.protocol is not edge  # later bytes skip the edge


def test_app_host_goes_to_the_forwarder():
    """A head naming an app host gives the connection to an AppConnection."""
    edge, transport = connect(make_edge(Clock()))
    edge.dataReceived(b"GET / HTTP/1.1\r\n")
    assert transport.value() == b""
    edge.dataReceived(f"Host: {APP_HOST}\r\n".encode())
    assert not isinstance(transport.protocol, AppConnection)
    edge.dataReceived(b"\r\n")
    assert isinstance(transport.protocol, AppConnection)


def test_foreign_host_is_421_and_closed():
    """A Host that is neither ours nor an app's is refused with 421 and the connection closed."""
    _, transport = connect(make_edge(Clock()))
    transport.protocol.dataReceived(request_bytes(host="example.com"))
    assert transport.value().startswith(b"HTTP/1.1 421 ")
    assert transport.disconnecting


def test_first_head_a_byte_at_a_time_costs_linear_time():
    """A first head in 1-byte reads is routed in linear CPU: four times the bytes cost about
    four times as much (the edge used to join and re-parse everything held on each read)."""
    from tests.support.scaling import growth

    def route(pad):
        _, transport = connect(make_edge(Clock()))
        raw = b"GET / HTTP/1.1\r\nHost: nothing." + PUBLIC.encode() + b"\r\nX-Pad: " + b"p" * pad + b"\r\n\r\n"
        edge = transport.protocol
        for i in range(len(raw)):
            edge.dataReceived(raw[i:i + 1])
        assert transport.value().startswith(b"HTTP/1.1 404 ")

    assert growth(route, 15000) < 8


def test_oversized_first_head_is_431():
    """A first head over the limit is refused with 431 before its end arrives."""
    _, transport = connect(make_edge(Clock()))
    transport.protocol.dataReceived(b"GET / HTTP/1.1\r\nX: " + b"a" * (MAX_HEAD + 10))
    assert transport.value().startswith(b"HTTP/1.1 431 ")
    assert transport.disconnecting


def test_malformed_first_head_is_400():
    """A malformed first head is answered 400 and closed."""
    _, transport = connect(make_edge(Clock()))
    transport.protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 400 ")


def test_no_head_in_time_is_408():
    """A connection that never completes its first head is closed after the head timeout."""
    clock = Clock()
    _, transport = connect(make_edge(clock))
    transport.protocol.dataReceived(b"GET / HT")
    clock.advance(29)
    assert not transport.disconnecting
    clock.advance(2)
    assert transport.value().startswith(b"HTTP/1.1 408 ") and transport.disconnecting


def test_idle_app_connection_times_out():
    """An app-host connection with no traffic is closed after the idle timeout."""
    clock = Clock()
    edge, transport = connect(make_edge(clock))
    edge.dataReceived(b"GET / HTTP/1.1\r\nHost: nothing." + PUBLIC.encode() + b"\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 404 ") and not transport.disconnecting
    clock.advance(119)
    assert not transport.disconnecting
    clock.advance(2)
    assert transport.disconnecting


def test_second_head_has_a_deadline_from_its_first_byte():
    """Slowloris after the first request: a later head sent a byte at a time is cut at 30 s.

    (Until issue 8 each byte moved the idle deadline, so it stayed open for ever.)
    """
    clock = Clock()
    edge, transport = connect(make_edge(clock))
    edge.dataReceived(b"GET / HTTP/1.1\r\nHost: nothing." + PUBLIC.encode() + b"\r\n\r\n")
    first = len(transport.value())
    clock.advance(50)  # idle between requests: no head deadline yet
    slow = b"GET / HTTP/1.1\r\nHost: nothing." + PUBLIC.encode() + b"\r\nX-Slow: " + b"a" * 100
    for byte in slow[:29]:
        transport.protocol.dataReceived(bytes([byte]))
        clock.advance(1)
    assert not transport.disconnecting
    for byte in slow[29:31]:
        transport.protocol.dataReceived(bytes([byte]))
        clock.advance(1)
    assert transport.disconnecting
    assert transport.value()[first:].startswith(b"HTTP/1.1 408 ")


def test_head_deadline_is_per_head():
    """Heads that each complete in time keep the connection; the deadline restarts per head."""
    clock = Clock()
    edge, transport = connect(make_edge(clock))
    head = b"GET / HTTP/1.1\r\nHost: nothing." + PUBLIC.encode() + b"\r\n\r\n"
    edge.dataReceived(head)
    for _ in range(4):
        for i in range(0, len(head), len(head) // 4 + 1):
            transport.protocol.dataReceived(head[i:i + len(head) // 4 + 1])
            clock.advance(6)
    assert not transport.disconnecting
    assert transport.value().count(b"HTTP/1.1 404 ") == 5


def test_head_timeout_is_a_constructor_parameter():
    """The forwarder's head_timeout sets the per-head deadline (tests use small values)."""
    clock = Clock()
    factory = make_edge(clock)
    factory.forwarder.head_timeout = 2.0
    edge, transport = connect(factory)
    edge.dataReceived(b"GET / HTTP/1.1\r\nHost: nothing." + PUBLIC.encode() + b"\r\n\r\nG")
    clock.advance(1.9)
    assert not transport.disconnecting
    clock.advance(0.2)
    assert transport.disconnecting


@pytest.mark.parametrize("host", [b"grafana.apptunnel.localhost:@evil.com", b"a b", b"x/y", b"user@grafana",
                                  b"grafana.apptunnel.localhost:99999", b"[::1", b"", b"grafana..x"])
def test_malformed_host_on_first_head_is_400(host):
    """A Host that is not a name or IP literal with a numeric port is refused before routing."""
    _, transport = connect(make_edge(Clock()))
    transport.protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 400 ")
    assert transport.disconnecting


def test_malformed_host_on_a_later_head_is_400():
    """The forwarder checks the Host of every later head on the connection too."""
    edge, transport = connect(make_edge(Clock()))
    edge.dataReceived(b"GET / HTTP/1.1\r\nHost: nothing." + PUBLIC.encode() + b"\r\n\r\n")
    transport.protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: nothing." + PUBLIC.encode() + b":@evil.com\r\n\r\n")
    assert transport.value().count(b"HTTP/1.1 400 ") == 1
    assert transport.disconnecting


def test_a_request_no_app_serves_is_audited_under_its_pages_request_id():
    """The 404 page for a host no app has names a request id, and one app.request event
    (failure, the host asked for) carries the same id, so the page leads to its event."""
    import re

    factory = make_edge(Clock())
    edge, transport = connect(factory)
    host = b"nothing." + PUBLIC.encode()
    edge.dataReceived(b"GET /x HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n")
    page = transport.value()
    assert page.startswith(b"HTTP/1.1 404 ")
    shown = re.search(rb'id="request-id">([^<]+)<', page).group(1).decode()
    events = factory.forwarder.audit.of("app.request")
    assert [(e["request_id"], e["host"], e["outcome"], e["status"]) for e in events] == \
        [(shown, host.decode(), "failure", 404)]
