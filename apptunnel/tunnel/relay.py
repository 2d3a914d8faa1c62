"""The one byte relay: two transports joined, with backpressure and half close both ways.

Used wherever apptunnel joins two connections: the agent's app socket to its tunnel
stream, the proxy's TCP access (client connection to stream), and ``apptunnel proxy app``
(local client to the upgraded TLS connection to the proxy).

A :class:`Relay` has two symmetric ends, ``a`` and ``b``. Each is the protocol of one
transport, either given to the transport directly or fed by an owner protocol that did
something else first (read an upgrade, waited for a handshake) and then hands its
transport over with ``end.makeConnection(transport)`` and passes its events on.

Invariants (read ``twisted/protocols/portforward.py`` for the shape):

* No unbounded buffer. Once both ends are connected each transport is the other's push
  producer, so a side whose write buffer is full stops reading on the other side. Before
  the other end is connected, an end pauses its transport and keeps what had already been
  read, at most ``early_limit`` bytes; more aborts that end.
* A FIN on one side (``readConnectionLost``) becomes a half close on the other side when
  that transport can half close (a TCP socket, a tunnel stream), else a whole close (TLS:
  close_notify, never a bare FIN that would truncate the session). An end whose reading
  and writing are both finished closes its transport.
* A clean end (``ConnectionDone``) on one side closes the other after its queued bytes;
  a reset or error aborts it (a TCP abort is a RST). Nothing is ever written to a closed
  end.
* ``received`` counts the bytes each end read (for the audit of TCP sessions).
"""

from __future__ import annotations

from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol, ITransport
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = ["EARLY_LIMIT", "Relay", "RelayEnd", "can_half_close"]

# Bytes an end may hold while its peer is not connected yet (it is paused meanwhile).
EARLY_LIMIT = 64 * 1024


def can_half_close(transport: ITransport) -> bool:
    """Whether a FIN may be sent on `transport` while it keeps reading.

    Asked of the transport's class: Twisted's TLS wrapper forwards unknown attributes to
    the socket below it, whose ``loseWriteConnection`` would be a bare FIN under TLS.
    """
    return callable(getattr(type(transport), "loseWriteConnection", None))


@implementer(IHalfCloseableProtocol)
class RelayEnd(Protocol):
    """One side of a :class:`Relay`: what its transport reads goes to the other side."""

    def __init__(self, relay: Relay) -> None:
        self._relay = relay
        self._peer: RelayEnd | None = None     # the other end, set by the relay
        self.received = 0
        self.lost: Failure | None = None       # set once this end's transport is gone
        self._held: list[bytes] = []           # read before the peer was connected
        self._held_size = 0
        self._read_done = False                # its transport sent us FIN
        self._write_done = False               # we sent it FIN (or closed it)
        self._producing = False                # our transport has the peer's as producer

    @property
    def peer(self) -> RelayEnd:
        return self._peer

    # -- events from this end's transport ----------------------------------------------

    def connectionMade(self) -> None:
        peer = self.peer
        if peer.transport is None:
            # Read nothing more until there is somewhere to write it.
            self.transport.pauseProducing()
            return
        self._relay.join()

    def dataReceived(self, data: bytes) -> None:
        if self.lost is not None:
            return
        self.received += len(data)
        peer = self._peer
        transport = peer.transport
        if transport is not None and peer.lost is None and not peer._write_done:
            transport.write(data)   # peer.writable, inlined: this runs per read
            return
        if peer.transport is not None:
            return  # the other side can take no more: drop, as a closed socket would
        self._held.append(data)
        self._held_size += len(data)
        if self._held_size > self._relay.early_limit:
            # Gone from the relay's point of view now: the other end, once connected, is
            # aborted too and nothing is written to this one.
            self._held, self._held_size = [], 0
            self.lost = Failure(ConnectionAborted("too many bytes before the other side joined"))
            self.transport.abortConnection()

    def readConnectionLost(self) -> None:
        """FIN from our transport: finish the other side's writing, keep relaying back."""
        self._read_done = True
        peer = self.peer
        if peer.transport is not None:
            peer.finish_writing()
        self._close_if_done()

    def writeConnectionLost(self) -> None:
        """Our FIN went out; ``_write_done`` was set when we asked for it."""

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        if self.lost is not None:
            return
        self.lost = reason
        self._producing = False  # the transport dropped its producer as it closed
        peer = self.peer
        if peer.transport is not None:
            peer.end_with(reason)

    # -- called by the other end / the relay -------------------------------------------

    def start(self) -> None:
        """Both ends are connected: flush what was held, then couple the producers."""
        held, self._held, self._held_size = self._held, [], 0
        peer = self.peer
        for chunk in held:
            if peer.writable:
                peer.transport.write(chunk)
        if self.lost is not None:
            peer.end_with(self.lost)
            return
        if self._read_done:
            peer.finish_writing()
            return
        # Resume first: registering may pause us at once (a stream whose window is spent),
        # and resuming may deliver queued bytes or a FIN.
        self.transport.resumeProducing()
        if self.lost is None and not self._read_done and peer.writable:
            peer.produce_from(self.transport)

    @property
    def writable(self) -> bool:
        """Whether bytes may still be written to this end's transport."""
        return self.transport is not None and self.lost is None and not self._write_done

    def produce_from(self, producer) -> None:
        """Backpressure: while our transport is full, `producer` (the other one) is paused."""
        self.transport.registerProducer(producer, True)
        self._producing = True

    def finish_writing(self) -> None:
        """The other side sent FIN: half close ours, or close it if it cannot."""
        if self.lost is not None or self._write_done:
            return
        self._write_done = True
        self._stop_producer()
        if can_half_close(self.transport):
            self.transport.loseWriteConnection()
            self._close_if_done()
        else:
            self.transport.loseConnection()

    def end_with(self, reason: Failure) -> None:
        """The other side is gone: close ours after its queued bytes, or abort on an error."""
        if self.lost is not None:
            return
        self._write_done = True
        self._stop_producer()
        if reason.check(ConnectionDone):
            self.transport.loseConnection()
        else:
            self.transport.abortConnection()

    def _stop_producer(self) -> None:
        """A transport closes only once no producer is registered (TLS waits for that)."""
        if self._producing and self.transport is not None:
            self._producing = False
            self.transport.unregisterProducer()

    def _close_if_done(self) -> None:
        if self._read_done and self._write_done and self.lost is None:
            self.transport.loseConnection()


class Relay:
    """Two ends, ``a`` and ``b``; bytes read by one are written by the other."""

    def __init__(self, early_limit: int = EARLY_LIMIT) -> None:
        self.early_limit = early_limit
        self.a = RelayEnd(self)
        self.b = RelayEnd(self)
        self.a._peer, self.b._peer = self.b, self.a
        self.joined = False

    def other(self, end: RelayEnd) -> RelayEnd:
        return self.b if end is self.a else self.a

    def join(self) -> None:
        """Called once the second end is connected."""
        if self.joined:
            return
        self.joined = True
        self.a.start()
        self.b.start()
