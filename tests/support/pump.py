"""Two protocols joined by in-memory transports, moved by a bounded, step-wise pump.

The transports honour producer/consumer: a transport whose outgoing buffer passes
``high_water`` pauses the protocol registered on it as a producer, and resumes it once the
pump has drained the buffer, like a real socket.  Each step moves at most ``chunk`` bytes per
direction, so tests see realistic splits and can interleave clock advances.
"""

from __future__ import annotations

from collections import deque

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IConsumer, IPushProducer, ITransport
from twisted.python.failure import Failure
from zope.interface import implementer


@implementer(ITransport, IConsumer, IPushProducer)
class MemoryTransport:
    """One end of an in-memory connection; ``take`` is how the pump reads what was written."""

    def __init__(self, host: IPv4Address, peer: IPv4Address, high_water: int) -> None:
        self._host = host
        self._peer = peer
        self._high_water = high_water
        self._out: deque[bytes] = deque()
        self.buffered = 0
        self.written = 0
        self.producer = None
        self.producer_paused = False
        self.reading_paused = False
        self.disconnecting = False
        self.aborted = False
        self.closed = False

    def write(self, data: bytes) -> None:
        if isinstance(data, str):
            raise TypeError("write takes bytes")
        if self.disconnecting or self.closed or not data:
            return
        data = bytes(data)
        self._out.append(data)
        self.buffered += len(data)
        self.written += len(data)
        if self.buffered > self._high_water and self.producer is not None \
                and not self.producer_paused:
            self.producer_paused = True
            self.producer.pauseProducing()

    def writeSequence(self, seq) -> None:
        self.write(b"".join(bytes(part) for part in seq))

    def take(self, n: int) -> bytes:
        """Remove up to n bytes from the outgoing buffer (what the wire carries this step)."""
        parts = []
        while self._out and n > 0:
            chunk = self._out.popleft()
            if len(chunk) > n:
                self._out.appendleft(chunk[n:])
                chunk = chunk[:n]
            parts.append(chunk)
            n -= len(chunk)
        data = b"".join(parts)
        self.buffered -= len(data)
        if not self.buffered and self.producer_paused and not self.closed:
            self.producer_paused = False
            self.producer.resumeProducing()
        return data

    def loseConnection(self) -> None:
        self.disconnecting = True

    def abortConnection(self) -> None:
        self.aborted = True
        self.disconnecting = True
        self._out.clear()
        self.buffered = 0

    def registerProducer(self, producer, streaming: bool) -> None:
        if not streaming:
            raise ValueError("MemoryTransport only supports push producers")
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def pauseProducing(self) -> None:
        self.reading_paused = True

    def resumeProducing(self) -> None:
        self.reading_paused = False

    def stopProducing(self) -> None:
        self.loseConnection()

    def getPeer(self) -> IPv4Address:
        return self._peer

    def getHost(self) -> IPv4Address:
        return self._host


class Pump:
    """Connects ``client`` and ``server`` and moves bytes between them on request."""

    def __init__(self, client, server, *, chunk: int = 64 * 1024,
                 high_water: int = 256 * 1024) -> None:
        a = IPv4Address("TCP", "127.0.0.1", 40001)
        b = IPv4Address("TCP", "127.0.0.1", 3024)
        self.client, self.server = client, server
        self.client_transport = MemoryTransport(a, b, high_water)
        self.server_transport = MemoryTransport(b, a, high_water)
        self.chunk = chunk
        self.closed = False
        client.makeConnection(self.client_transport)
        server.makeConnection(self.server_transport)

    def step(self) -> bool:
        """Move one chunk each way; returns whether anything happened."""
        if self.closed:
            return False
        moved = False
        for src, dst, dst_transport in ((self.client_transport, self.server, self.server_transport),
                                        (self.server_transport, self.client, self.client_transport)):
            if dst_transport.reading_paused or src.aborted:
                continue
            data = src.take(self.chunk)
            if data and not dst_transport.closed:
                dst.dataReceived(data)
                moved = True
        for src in (self.client_transport, self.server_transport):
            if src.aborted or (src.disconnecting and not src.buffered):
                self._close(src)
                return True
        return moved

    def flush(self, max_steps: int = 100_000) -> int:
        """Step until nothing moves; a pump that never settles is a bug under test."""
        for steps in range(max_steps):
            if not self.step():
                return steps
        raise AssertionError(f"pump still moving after {max_steps} steps")

    def _close(self, closer: MemoryTransport) -> None:
        self.closed = True
        for transport in (self.client_transport, self.server_transport):
            transport.closed = True
        if closer.aborted:
            mine, theirs = Failure(ConnectionAborted()), Failure(ConnectionLost())
        else:
            mine = theirs = Failure(ConnectionDone())
        if closer is self.client_transport:
            self.client.connectionLost(mine)
            self.server.connectionLost(theirs)
        else:
            self.server.connectionLost(mine)
            self.client.connectionLost(theirs)
