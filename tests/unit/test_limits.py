"""Connection limits: the pure shedding decision, and the wrapper on memory transports."""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from apptunnel.config import LimitsConfig as Limits
from apptunnel.proxy.limits import (
    ConnectionTracker,
    LimitedFactory,
    Seen,
    connection_budget,
    plan_admission,
)

CAPS = Limits(handshake_timeout=10.0, max_connections=4, max_connections_per_ip=2)


def plan(live, client, limits=CAPS):
    return plan_admission(iter(live), len(live), sum(s.client == client for s in live),
                          client, limits)


# -- the decision ------------------------------------------------------------------------


def test_under_the_caps_everyone_is_admitted():
    """Below both caps a newcomer is admitted and nobody is shed."""
    assert plan([Seen("a", True)], "b").admit
    assert plan([Seen("a", True)], "b").shed == ()


def test_per_address_cap_sheds_that_address_oldest_idle():
    """At the per-address cap the oldest idle connection of that address goes."""
    live = [Seen("b", True), Seen("a", False), Seen("a", True)]
    assert plan(live, "a").shed == (2,)


def test_per_address_cap_never_sheds_another_address():
    """Another address's idle connection is no room for this address."""
    live = [Seen("b", True), Seen("a", False), Seen("a", False)]
    result = plan(live, "a")
    assert not result.admit and result.shed == ()


def test_total_cap_sheds_the_oldest_idle_of_anybody():
    """At the total cap the oldest idle connection goes, busy ones stay."""
    live = [Seen("a", False), Seen("b", True), Seen("c", True), Seen("d", False)]
    assert plan(live, "e").shed == (1,)


def test_total_cap_with_nothing_idle_refuses_the_newcomer():
    """Busy connections are never shed for a newcomer: it is refused instead."""
    live = [Seen(c, False) for c in "abcd"]
    result = plan(live, "e")
    assert not result.admit and result.shed == ()


def test_one_shed_can_meet_both_caps():
    """Shedding the address's own idle connection also makes room in the total."""
    live = [Seen("x", True), Seen("a", True), Seen("a", False), Seen("y", False)]
    assert plan(live, "a").shed == (1,)


def test_budget_fits_the_descriptor_limit():
    """The connection cap comes down to what fits in the soft descriptor limit."""
    assert connection_budget(10_000, 256, reserve=64) == 192
    assert connection_budget(100, 65536) == 100


# -- the wrapper -------------------------------------------------------------------------


class Recorder(Protocol):
    def __init__(self):
        self.data, self.lost, self.idle, self.handshakes = [], [], True, 0

    def dataReceived(self, data):
        self.data.append(data)

    def connectionLost(self, reason):
        self.lost.append(reason)

    def is_idle(self):
        return self.idle


class AbortableTransport(StringTransport):
    """A StringTransport that records aborts and whether close was graceful."""

    def __init__(self, host):
        super().__init__(peerAddress=IPv4Address("TCP", host, 40000))
        self.aborted = False

    def abortConnection(self):
        self.aborted = True
        self.disconnecting = True


class Harness:
    def __init__(self, limits=CAPS):
        self.clock = Clock()
        self.tracker = ConnectionTracker(limits, self.clock)
        self.inner = Factory.forProtocol(Recorder)
        self.factory = LimitedFactory(self.inner, self.tracker)

    def connect(self, host="10.0.0.1", handshake=False):
        addr = IPv4Address("TCP", host, 40000)
        proto = self.factory.buildProtocol(addr)
        transport = AbortableTransport(host)
        proto.makeConnection(transport)
        if handshake:
            proto.handshakeCompleted()
        return proto, transport


def test_no_handshake_is_aborted_at_the_deadline():
    """A connection that never finishes the TLS handshake is aborted at the deadline."""
    h = Harness()
    proto, transport = h.connect()
    h.clock.advance(9.9)
    assert not transport.aborted
    h.clock.advance(0.2)
    assert transport.aborted


def test_finished_handshake_cancels_the_deadline():
    """Once the handshake is done, the deadline no longer applies."""
    h = Harness()
    proto, transport = h.connect()
    h.clock.advance(5)
    proto.handshakeCompleted()
    h.clock.advance(60)
    assert not transport.aborted
    assert h.clock.getDelayedCalls() == []


def test_close_before_handshake_aborts():
    """A close before the handshake (the edge's 408) aborts: a TLS close would wait forever."""
    h = Harness()
    proto, transport = h.connect()
    proto.wrappedProtocol.transport.write(b"HTTP/1.1 408 ...")
    proto.wrappedProtocol.transport.loseConnection()
    assert transport.aborted


def test_close_after_handshake_is_graceful():
    """After the handshake loseConnection is the ordinary close."""
    h = Harness()
    proto, transport = h.connect(handshake=True)
    proto.wrappedProtocol.transport.loseConnection()
    assert transport.disconnecting and not transport.aborted


def test_cap_sheds_the_oldest_idle_connection():
    """At the per-address cap the oldest idle connection is aborted and the newcomer served."""
    h = Harness()
    first, first_t = h.connect(handshake=True)
    second, second_t = h.connect(handshake=True)
    first.wrappedProtocol.idle = False        # relaying: never shed for a newcomer
    third, third_t = h.connect()
    assert second_t.aborted and not first_t.aborted and not third_t.aborted
    assert len(h.tracker) == 2


def test_connection_without_handshake_counts_as_idle():
    """A connection still in its handshake is idle, whatever the protocol behind it says."""
    h = Harness()
    first, first_t = h.connect()
    first.wrappedProtocol.idle = False
    h.connect(handshake=True)
    h.connect(handshake=True)
    assert first_t.aborted


def test_refused_when_nothing_idle():
    """When every connection is busy, the newcomer is aborted and never reaches the app."""
    h = Harness()
    for _ in range(2):
        proto, _ = h.connect(handshake=True)
        proto.wrappedProtocol.idle = False
    proto, transport = h.connect()
    assert transport.aborted
    assert proto.wrappedProtocol.transport is None
    proto.dataReceived(b"ignored")
    assert proto.wrappedProtocol.data == []
    proto.connectionLost(None)
    assert len(h.tracker) == 2


def test_total_cap_counts_every_address():
    """The total cap holds across addresses; the lost connections free their places."""
    h = Harness()
    conns = [h.connect(host=f"10.0.0.{i}", handshake=True) for i in range(4)]
    for proto, _ in conns:
        proto.wrappedProtocol.idle = False
    conns[0][0].wrappedProtocol.idle = True
    h.connect(host="10.0.0.9")
    assert conns[0][1].aborted
    conns[0][0].connectionLost(None)  # the abort arrives
    assert len(h.tracker) == 4
    conns[1][0].connectionLost(None)
    assert len(h.tracker) == 3
    _, transport = h.connect(host="10.0.0.9")
    assert not transport.aborted


def test_handed_over_protocol_is_asked():
    """After a hand-over (the edge re-points wrappedProtocol) the new owner decides idleness."""
    h = Harness()
    proto, _ = h.connect(handshake=True)
    owner = Recorder()
    owner.idle = False
    proto.wrappedProtocol = owner
    assert not proto.is_idle()
    proto.wrappedProtocol = Protocol()     # no is_idle(): busy
    assert not proto.is_idle()


def test_ipv6_addresses_count_per_64():
    """All addresses of one IPv6 /64 share one per-address quota."""
    h = Harness()
    conns = [h.connect(host=f"2001:db8::{i}", handshake=True) for i in (1, 2)]
    h.connect(host="2001:db8::3")
    assert conns[0][1].aborted
