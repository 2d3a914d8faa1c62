"""write_through: a write to an idle TCP socket is sent at once; anything else takes
Twisted's queue, so order, backpressure, half close, abort and TLS keep Twisted's rules.

A real socketpair under a memory reactor: the reactor's ``writers`` set shows whether the
socket was registered for writability, and ``doWrite`` is called by hand where the real
reactor would call it.
"""

import socket

from hypothesis import given, settings, strategies as st
from twisted.internet import tcp
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from zope.interface import implementer
from twisted.internet.interfaces import IPushProducer

from apptunnel.tunnel.endpoints import write_through


class Wrapper:
    """Stands for a TLS or policy wrapper: the socket's transport is its ``transport``."""

    def __init__(self, transport):
        self.transport = transport


@implementer(IPushProducer)
class Producer:
    def __init__(self):
        self.paused = False

    def pauseProducing(self):
        self.paused = True

    def resumeProducing(self):
        self.paused = False

    def stopProducing(self):
        pass


def socket_pair():
    """A connected TCP transport over one end of a socketpair, and the other end."""
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    reactor = MemoryReactorClock()
    conn = tcp.Connection(ours, Protocol(), reactor)
    conn.connected = 1
    conn.protocol.makeConnection(conn)
    return conn, theirs, reactor


def read_all(sock):
    out = []
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return b"".join(out)
        if not chunk:
            return b"".join(out)
        out.append(chunk)


def drain(conn, sock, reactor):
    """Read the peer's side and let the 'reactor' write until nothing is queued."""
    got = []
    for _ in range(10_000):
        got.append(read_all(sock))
        if conn not in reactor.writers:
            break
        conn.doWrite()
    got.append(read_all(sock))
    return b"".join(got)


def test_an_idle_socket_sends_at_once_without_registering_for_writability():
    conn, peer, reactor = socket_pair()
    write_through(Wrapper(conn))
    conn.write(b"GET / HTTP/1.1\r\n\r\n")
    assert conn not in reactor.writers          # no epoll_ctl, no doWrite pass
    assert read_all(peer) == b"GET / HTTP/1.1\r\n\r\n"


def test_a_full_socket_queues_the_rest_and_later_writes_wait_behind_it():
    """What send() did not take is queued; writes after it are queued behind it (never
    sent ahead of it), the producer is paused and resumed by Twisted as before."""
    conn, peer, reactor = socket_pair()
    write_through(conn)
    producer = Producer()
    conn.registerProducer(producer, True)
    big = bytes(range(256)) * (64 * 1024)       # 16 MiB: more than the socket takes
    conn.write(big)
    assert conn in reactor.writers and producer.paused
    conn.write(b"tail")
    assert conn in reactor.writers
    assert drain(conn, peer, reactor) == big + b"tail"
    assert not producer.paused
    conn.write(b"again")                         # idle again: straight out
    assert conn not in reactor.writers and read_all(peer) == b"again"


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 300_000), st.booleans()), min_size=1, max_size=12))
def test_bytes_arrive_in_the_order_written_however_the_socket_drains(writes):
    """Any mix of small and large writes, with the peer reading (and the reactor writing)
    between some of them: the peer gets exactly the concatenation, in order."""
    conn, peer, reactor = socket_pair()
    write_through(conn)
    expected, got = [], []
    for i, (size, drain_now) in enumerate(writes):
        chunk = bytes([i % 251]) * size
        expected.append(chunk)
        conn.write(chunk)
        if drain_now:
            got.append(drain(conn, peer, reactor))
    got.append(drain(conn, peer, reactor))
    assert b"".join(got) == b"".join(expected)
    conn.socket.close()
    peer.close()


def test_after_half_close_or_abort_nothing_is_sent_directly():
    conn, peer, reactor = socket_pair()
    write_through(conn)
    conn.write(b"last")
    conn.loseWriteConnection()
    conn.write(b"late")                        # Twisted's rules: queued before the FIN
    assert conn in reactor.writers
    assert read_all(peer) == b"last"

    conn, peer, reactor = socket_pair()
    write_through(conn)
    conn.abortConnection()
    conn.write(b"never")                       # Twisted queues it and never sends it
    assert read_all(peer) == b""


def test_a_tls_started_connection_never_sends_plaintext_directly():
    """startTLS puts the TLS layer inside the TCP transport's own write: keep that path."""
    conn, peer, reactor = socket_pair()
    write_through(conn)
    seen = []

    class TLSLayer:
        def write(self, data):
            seen.append(data)

    conn.TLS = True
    conn.protocol = TLSLayer()
    conn.write(b"secret")
    assert seen == [b"secret"] and read_all(peer) == b""


def test_memory_transports_and_streams_are_left_alone_and_twice_is_once():
    memory = StringTransport()
    write_through(memory)
    assert type(memory) is StringTransport
    write_through(Wrapper(memory))
    conn, peer, _ = socket_pair()
    write_through(conn)
    cls = type(conn)
    write_through(conn)
    assert type(conn) is cls and issubclass(cls, tcp.Connection)
    other, _, _ = socket_pair()
    write_through(other)
    assert type(other) is cls                 # one subclass per transport class
