"""AppConnection's named states, walked on memory transports (StringTransport + Clock)."""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from apptunnel.auth.access import AccessPolicy
from apptunnel.auth.callers import Caller
from apptunnel.proxy.app_connection import (
    ANSWERED, CLOSED, CLOSING, FORWARDING, READING_HEAD, ROUTING, UPGRADED,
)
from apptunnel.proxy.forward import AppForwarder
from tests.support.access_fakes import Roles, Users
from tests.support.app_router import NOW, Signer, router
from tests.support.audit_fake import Audit


class Apps:
    """connect_app that opens each stream on a memory transport the test reads."""

    def __init__(self):
        self.streams = []
        self.hold = None   # a Deferred to return instead (the stream is "opening")

    def __call__(self, app, target, factory):
        if self.hold is not None:
            return self.hold
        proto = factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        self.streams.append((proto, transport))
        return succeed(proto)


def connection(apps=None, app="grafana", audit=None):
    clock = Clock()
    clock.advance(NOW)
    r, _ = router()
    audit = audit or Audit()
    access = AccessPolicy(roles=Roles(), audit=audit, clock=clock, users=Users(alice=("dev",)))
    apps = apps or Apps()
    fw = AppForwarder(config=r.config, registry=r.registry, sessions=None, roles=None,
                      signer=Signer(), audit=audit, clock=clock, connect_app=apps, access=access)
    alice = Caller("alice", ("dev",), {}, "certificate", "fp", NOW + 3600)
    conn = fw.fixed_connection(app, alice)
    client = StringTransport()
    conn.makeConnection(client)
    return conn, client, apps


def test_a_request_walks_reading_routing_forwarding_and_back():
    """One exchange: reading_head -> forwarding (routed at once) -> reading_head, idle."""
    conn, client, apps = connection()
    assert conn.state == READING_HEAD and conn.is_idle()
    conn.dataReceived(b"GET /x HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert conn.state == FORWARDING and not conn.is_idle()
    proto, upstream = apps.streams[0]
    assert upstream.value().startswith(b"GET /x HTTP/1.1\r\n")
    proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert client.value().endswith(b"\r\n\r\nok")
    assert conn.state == READING_HEAD and conn.is_idle()


def test_routing_holds_while_the_stream_opens():
    """While the app's stream is opening the connection is routing, not idle."""
    apps = Apps()
    apps.hold = Deferred()
    conn, client, _ = connection(apps)
    conn.dataReceived(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert conn.state == ROUTING and not conn.is_idle()


def test_a_local_answer_is_answered_until_the_body_ends_then_reading_again():
    """A response made here (503: no such app now): answered while the rest of the body
    is thrown away, then reading_head for the next request on the same connection."""
    conn, client, _ = connection(app="gone")
    conn.dataReceived(b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 4\r\n\r\nab")
    assert client.value().startswith(b"HTTP/1.1 503 ")
    assert conn.state == ANSWERED
    conn.dataReceived(b"cd")
    assert conn.state == READING_HEAD and not client.disconnecting


def test_a_101_makes_the_connection_upgraded_then_cut_closes_it():
    """After the app's 101 the connection relays bytes both ways; cut() closes it."""
    conn, client, apps = connection()
    conn.dataReceived(b"GET /ws HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\n"
                      b"Upgrade: websocket\r\n\r\n")
    proto, upstream = apps.streams[0]
    proto.dataReceived(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                       b"Upgrade: websocket\r\n\r\nframe")
    assert conn.state == UPGRADED and client.value().endswith(b"frame")
    conn.dataReceived(b"raw")
    assert upstream.value().endswith(b"raw")
    conn.cut()
    assert conn.state == CLOSING
    conn.connectionLost(Failure(ConnectionDone()))
    assert conn.state == CLOSED


def test_audit_not_writable_refuses_with_503_and_opens_nothing():
    """audit.on_failure (issue 13): while the audit cannot keep an event, a request is
    answered 503 with a page saying why, no stream is opened and nothing is audited."""
    audit = Audit()
    audit.writable = False
    conn, client, apps = connection(audit=audit)
    conn.dataReceived(b"GET /x HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert client.value().startswith(b"HTTP/1.1 503 ")
    assert b"audit log is not writable" in client.value()
    assert apps.streams == [] and audit.of("app.request") == []
    assert conn.state in (CLOSING, CLOSED)


def test_audit_admitting_again_forwards_as_usual():
    """block policy answered True (writable again): the request goes through."""
    audit = Audit()
    audit.writable, audit.admit = False, True
    conn, client, apps = connection(audit=audit)
    conn.dataReceived(b"GET /x HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert conn.state == FORWARDING and len(apps.streams) == 1


def test_states_are_the_documented_names():
    """The state names the module documents (logs and tests read them)."""
    assert (READING_HEAD, ROUTING, FORWARDING, ANSWERED, UPGRADED, CLOSING, CLOSED) == (
        "reading_head", "routing", "forwarding", "answered", "upgraded", "closing", "closed")


def _response_fields(client: StringTransport) -> list[tuple[bytes, bytes]]:
    head = client.value().partition(b"\r\n\r\n")[0]
    return [tuple(line.split(b": ", 1)) for line in head.split(b"\r\n")[1:]]


def _exchange(request: bytes, response: bytes):
    conn, client, apps = connection()
    conn.dataReceived(request)
    proto, _ = apps.streams[0]
    proto.dataReceived(response)
    return conn, client, proto


def test_a_client_that_asks_to_close_is_told_close_whatever_the_app_said():
    """The app keeps its own connection alive; the client's response says what the proxy
    does with the client's: close (else the client may reuse a connection being closed)."""
    _, client, _ = _exchange(
        b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n"
        b"Content-Length: 2\r\n\r\nok")
    fields = _response_fields(client)
    assert [v for n, v in fields if n.lower() == b"connection"] == [b"close"]
    assert not [n for n, _ in fields if n.lower() == b"keep-alive"]
    assert client.value().endswith(b"ok") and client.disconnecting


def test_an_apps_hop_by_hop_fields_stay_with_the_app():
    """Fields about the app's connection, and those its Connection field names, never reach
    the client; framing named there is kept; a kept-alive HTTP/1.1 exchange needs no
    Connection field at all."""
    conn, client, _ = _exchange(
        b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Internal, Content-Length\r\n"
        b"X-Internal: upstream secret\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\n"
        b"Upgrade: h2c\r\nX-Kept: yes\r\nContent-Length: 2\r\n\r\nok")
    names = [n.lower() for n, _ in _response_fields(client)]
    assert names == [b"x-kept", b"content-length"]
    assert conn.state == READING_HEAD and not client.disconnecting


def test_an_http_1_0_client_is_told_whether_its_connection_stays():
    """HTTP/1.0 closes unless told keep-alive: the proxy says which it does."""
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    _, client, _ = _exchange(b"GET / HTTP/1.0\r\nHost: localhost\r\nConnection: keep-alive\r\n\r\n", ok)
    assert (b"Connection", b"keep-alive") in _response_fields(client) and not client.disconnecting
    _, client, _ = _exchange(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n", ok)
    assert (b"Connection", b"close") in _response_fields(client) and client.disconnecting


def test_a_response_that_ends_with_the_apps_close_says_close():
    """A body delimited by the app closing its stream ends the client's connection too."""
    _, client, proto = _exchange(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
                                 b"HTTP/1.1 200 OK\r\n\r\nsome body")
    assert (b"Connection", b"close") in _response_fields(client)
    proto.connectionLost(Failure(ConnectionDone()))
    assert client.value().endswith(b"some body") and client.disconnecting


def test_a_101_names_the_upgrade_once():
    """A 101 carries Connection: Upgrade and the app's Upgrade field, once each."""
    _, client, _ = _exchange(
        b"GET /ws HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Keep-Alive: timeout=5\r\n\r\n")
    fields = [(n.lower(), v) for n, v in _response_fields(client)]
    assert sorted(fields) == [(b"connection", b"Upgrade"), (b"upgrade", b"websocket")]


class _AuditedWhenWritten(StringTransport):
    """Notes, at each write, how many app.request events had been emitted by then: writes
    leave at once under apptunnel's TLS layer, so that count is what a kill -9 right after
    the bytes left would find in the journal."""

    def __init__(self, audit):
        super().__init__()
        self.audit = audit
        self.seen: list[tuple[bytes, int]] = []

    def write(self, data):
        self.seen.append((bytes(data), len(self.audit.of("app.request"))))
        super().write(data)

    def writeSequence(self, seq):
        self.write(b"".join(seq))


def _audited_connection(app="grafana"):
    audit = Audit()
    conn, _, apps = connection(app=app, audit=audit)
    client = _AuditedWhenWritten(audit)
    conn.makeConnection(client)
    return conn, client, apps, audit


def test_a_forwarded_response_is_audited_before_its_last_bytes_are_written():
    """The event of an exchange is emitted before the bytes that complete its response."""
    conn, client, apps, audit = _audited_connection()
    conn.dataReceived(b"GET /x HTTP/1.1\r\nHost: localhost\r\n\r\n")
    proto, _ = apps.streams[0]
    proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
    assert client.seen[-1][1] == 0          # a partial response: no event yet
    proto.dataReceived(b"cd")
    assert client.seen[-1] == (b"cd", 1)    # the last bytes leave after the event
    assert len(audit.of("app.request")) == 1


def test_a_local_answer_is_audited_before_it_is_written_even_with_a_body_to_come():
    """A response made here (502: the app's stream failed) is on record before its bytes
    leave, while the rest of the request body is still to be read; one event."""
    apps = Apps()
    apps.hold = Deferred()
    audit = Audit()
    conn, _, _ = connection(apps, audit=audit)
    client = _AuditedWhenWritten(audit)
    conn.makeConnection(client)
    conn.dataReceived(b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 4\r\n\r\nab")
    apps.hold.errback(Failure(ConnectionDone("the app's stream failed")))
    data, events = client.seen[-1]
    assert data.startswith(b"HTTP/1.1 502 ") and events == 1
    conn.dataReceived(b"cd")
    assert conn.state == READING_HEAD and len(audit.of("app.request")) == 1


def test_a_101_is_audited_before_it_is_written():
    """An upgrade's exchange is on record before the 101 reaches the client."""
    conn, client, apps, audit = _audited_connection()
    conn.dataReceived(b"GET /ws HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\n"
                      b"Upgrade: websocket\r\n\r\n")
    proto, _ = apps.streams[0]
    proto.dataReceived(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                       b"Upgrade: websocket\r\n\r\n")
    data, events = client.seen[-1]
    assert data.startswith(b"HTTP/1.1 101 ") and events == 1
