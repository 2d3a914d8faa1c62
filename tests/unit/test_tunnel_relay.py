"""The byte relay on memory transports: data both ways, backpressure, half close, abort,
byte counts, early bytes, and garbage event orders that must never raise."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.python.failure import Failure

from apptunnel.tunnel.relay import Relay, can_half_close
from tests.support.pump import MemoryTransport

HIGH_WATER = 1000


class Wire(MemoryTransport):
    """The pump's memory transport (pauses its producer past HIGH_WATER, like a socket
    whose peer does not read); ``drain`` is the peer reading it all. Writing to a closed
    transport is a failure here, not a silent drop."""

    def __init__(self) -> None:
        address = IPv4Address("TCP", "127.0.0.1", 1)
        super().__init__(address, address, HIGH_WATER)
        self.write_closed = False     # we sent FIN

    def write(self, data: bytes) -> None:
        assert not self.aborted and not self.write_closed, "write after close"
        super().write(data)

    def drain(self) -> bytes:
        return self.take(self.buffered)

    def registerProducer(self, producer, streaming: bool) -> None:
        assert self.producer is None, "one producer at a time"
        super().registerProducer(producer, streaming)

    def loseConnection(self) -> None:
        super().loseConnection()
        self.closed = True


class TcpWire(Wire):
    """A transport that can half close (a TCP socket, a tunnel stream)."""

    def loseWriteConnection(self) -> None:
        self.write_closed = True


class TlsWire(Wire):
    """A transport that cannot half close, but forwards unknown attributes to the socket
    below it (as Twisted's TLS wrapper does)."""

    def __init__(self) -> None:
        super().__init__()
        self._below = TcpWire()

    def __getattr__(self, name):
        return getattr(self._below, name)


def joined(a_wire=None, b_wire=None) -> tuple[Relay, Wire, Wire]:
    relay = Relay()
    a_wire, b_wire = a_wire or TcpWire(), b_wire or TcpWire()
    relay.a.makeConnection(a_wire)
    relay.b.makeConnection(b_wire)
    return relay, a_wire, b_wire


def test_data_both_ways_and_counts():
    """Bytes read on one side are written on the other; each end counts what it read."""
    relay, a, b = joined()
    relay.a.dataReceived(b"hello")
    relay.b.dataReceived(b"world!")
    assert b.drain() == b"hello" and a.drain() == b"world!"
    assert (relay.a.received, relay.b.received) == (5, 6)


def test_each_side_is_the_others_push_producer():
    """A peer that never reads pauses the other side's reading; reading again resumes it."""
    relay, a, b = joined()
    assert b.producer is a and a.producer is b
    relay.a.dataReceived(b"x" * (HIGH_WATER + 1))
    assert a.reading_paused and not b.reading_paused
    b.drain()
    assert not a.reading_paused
    relay.b.dataReceived(b"y" * (HIGH_WATER + 1))
    assert b.reading_paused


def test_early_bytes_are_held_while_paused_then_flushed():
    """Before the other end exists an end reads nothing more and keeps what it had."""
    relay = Relay()
    a = TcpWire()
    relay.a.makeConnection(a)
    assert a.reading_paused
    relay.a.dataReceived(b"early")
    b = TcpWire()
    relay.b.makeConnection(b)
    assert b.drain() == b"early" and not a.reading_paused and not b.reading_paused


def test_early_bytes_are_bounded():
    """More than early_limit bytes before the other end connects aborts that end."""
    relay = Relay(early_limit=10)
    a = TcpWire()
    relay.a.makeConnection(a)
    relay.a.dataReceived(b"x" * 11)
    assert a.aborted


def test_fin_half_closes_the_other_side_and_replies_still_flow():
    """A FIN becomes loseWriteConnection on the other side; its answer still comes back."""
    relay, a, b = joined()
    relay.a.dataReceived(b"question")
    relay.a.readConnectionLost()
    assert b.write_closed and not b.closed and b.producer is None
    relay.b.dataReceived(b"answer")
    assert a.drain() == b"answer"
    relay.b.readConnectionLost()
    assert a.write_closed
    # Both directions are finished: both transports close, cleanly.
    assert a.closed and b.closed and not a.aborted and not b.aborted


def test_fin_both_directions_from_b_first():
    """Half close works the same starting from the other end."""
    relay, a, b = joined()
    relay.b.readConnectionLost()
    assert a.write_closed and not b.write_closed
    relay.a.dataReceived(b"late")
    assert b.drain() == b"late"


def test_fin_towards_a_transport_without_half_close_closes_it():
    """TLS cannot half close: a FIN from the other side closes it (close_notify, no bare FIN)."""
    tls = TlsWire()
    assert can_half_close(TcpWire()) and not can_half_close(tls)
    relay, a, b = joined(b_wire=tls)
    relay.a.readConnectionLost()
    assert b.closed and not b._below.write_closed and b.producer is None


def test_clean_end_closes_the_other_side_gracefully():
    """ConnectionDone on one side is loseConnection (FIN after queued bytes), never an abort."""
    relay, a, b = joined()
    relay.a.connectionLost(Failure(ConnectionDone()))
    assert b.closed and not b.aborted and b.producer is None


@pytest.mark.parametrize("reason", [ConnectionLost("reset"), ConnectionAborted(), ValueError("x")])
def test_reset_or_error_aborts_the_other_side(reason):
    """A reset or error on one side aborts the other (a RST on TCP)."""
    relay, a, b = joined()
    relay.b.connectionLost(Failure(reason))
    assert a.aborted


def test_nothing_is_written_to_a_lost_end():
    """Once an end is gone, bytes for it are dropped."""
    relay, a, b = joined()
    relay.b.connectionLost(Failure(ConnectionDone()))
    relay.a.dataReceived(b"after")
    assert b.buffered == 0


def test_end_lost_before_the_other_connects_is_applied_on_join():
    """An app that answered and closed before the stream attached: bytes, then the close."""
    relay = Relay()
    a = TcpWire()
    relay.a.makeConnection(a)
    relay.a.dataReceived(b"banner")
    relay.a.readConnectionLost()
    relay.a.connectionLost(Failure(ConnectionDone()))
    b = TcpWire()
    relay.b.makeConnection(b)
    assert b.drain() == b"banner" and b.closed and not b.aborted


def test_reset_before_join_aborts_on_join():
    relay = Relay()
    a = TcpWire()
    relay.a.makeConnection(a)
    relay.a.connectionLost(Failure(ConnectionLost("reset")))
    b = TcpWire()
    relay.b.makeConnection(b)
    assert b.aborted


EVENTS = st.lists(st.tuples(
    st.sampled_from(["a", "b"]),
    st.sampled_from(["data", "fin", "done", "reset", "drain", "connect"]),
    st.binary(max_size=700)), max_size=40)


@settings(max_examples=300, deadline=None)
@given(events=EVENTS, a_tls=st.booleans(), b_tls=st.booleans(), early=st.integers(1, 2000))
def test_any_event_order_never_raises_and_never_overflows(events, a_tls, b_tls, early):
    """Garbage orders of events (data after FIN, FIN twice, data after close) never raise,
    never write to a closed transport, and hold at most early_limit bytes."""
    relay = Relay(early_limit=early)
    wires = {"a": TlsWire() if a_tls else TcpWire(), "b": TlsWire() if b_tls else TcpWire()}
    ends = {"a": relay.a, "b": relay.b}
    relay.a.makeConnection(wires["a"])
    gone = set()
    for name, kind, data in events:
        end, wire = ends[name], wires[name]
        if kind == "connect":
            if end.transport is None:
                end.makeConnection(wire)
            continue
        if end.transport is None or name in gone:
            continue
        if kind == "data":
            end.dataReceived(data)
        elif kind == "fin":
            end.readConnectionLost()
        elif kind == "done":
            gone.add(name)
            end.connectionLost(Failure(ConnectionDone()))
        elif kind == "reset":
            gone.add(name)
            end.connectionLost(Failure(ConnectionLost("reset")))
        elif kind == "drain":
            wire.drain()
        for e in (relay.a, relay.b):
            assert sum(len(c) for c in e._held) <= early
    if all(kind != "reset" for _, kind, _ in events) and early >= sum(len(d) for *_, d in events):
        # Only a reset (or an overflow) may abort: clean ends and FINs never do.
        assert not wires["a"].aborted and not wires["b"].aborted
