"""One multiplexed stream, seen by the protocol that owns it as an ordinary Twisted transport.

A :class:`Stream` is ``ITransport`` + ``IConsumer`` + ``IPushProducer``.  The stream's
bookkeeping (windows, FIN, reset) lives in the tunnel's ``Mux``; this object adapts it to
Twisted's producer/consumer contract.

Backpressure invariants:

* Inbound: data is handed to ``protocol.dataReceived`` unless the stream is paused
  (``pauseProducing`` by whoever consumes it); while paused it is queued here.  Credit goes
  back to the peer only for bytes actually delivered, so the queue never exceeds the window
  this side granted, and a stalled reader stalls only its own stream.
* Outbound: ``write`` sends what the peer's window allows and the tunnel queues the rest.
  A registered producer is paused while that queue holds ``SEND_BUFFER_LIMIT`` bytes or more,
  or, once it wrote while the tunnel's socket is full, until its turn comes after the socket
  drained (``TunnelProtocol.resumeProducing``); it is resumed when both clear.  A writer
  without a producer (one big ``write``) is still accepted whole: the caller chose to hold
  that memory.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.internet.interfaces import (
    IAddress, IConsumer, IHalfCloseableProtocol, IProtocol, IPushProducer, ITransport)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from apptunnel.tunnel.frames import ErrorCode
from apptunnel.tunnel.pull import PullAsPush

if TYPE_CHECKING:
    from apptunnel.tunnel.protocol import TunnelProtocol

SEND_BUFFER_LIMIT = 64 * 1024


@implementer(IAddress)
@dataclass(frozen=True, slots=True)
class StreamAddress:
    """Both ends of a stream are named by its id and target (there is no IP to give)."""

    stream_id: int
    target: dict


@implementer(ITransport, IConsumer, IPushProducer)
class Stream:
    """A bidirectional byte stream inside a tunnel, usable as a Twisted transport."""

    _log = Logger()

    __slots__ = ("stream_id", "target", "protocol", "disconnecting", "_tunnel", "_producer",
                 "_producer_paused", "_paused", "_inbound", "_remote_fin", "_fin_delivered",
                 "_both_fins", "_closed", "_write_closed", "_discard", "_lost_reason")

    def __init__(self, tunnel: TunnelProtocol, stream_id: int, target: dict) -> None:
        self.stream_id = stream_id
        self.target = target
        self.protocol: IProtocol | None = None
        self.disconnecting = False
        self._tunnel = tunnel
        self._producer = None
        self._producer_paused = False
        self._paused = False
        self._inbound: deque[bytes] | None = None  # only while the reader is paused
        self._remote_fin = False
        self._fin_delivered = False
        self._both_fins = False
        self._closed = False
        self._write_closed = False
        self._discard = False
        self._lost_reason: Failure | None = None

    def __repr__(self) -> str:
        return f"<Stream {self.stream_id} {self.target!r}>"

    # -- wiring -----------------------------------------------------------------------

    def attach(self, protocol: IProtocol) -> None:
        """Give the stream to its protocol (``makeConnection``); data waits until then."""
        if self.protocol is not None:
            raise RuntimeError(f"stream {self.stream_id} already has a protocol")
        self.protocol = protocol
        protocol.makeConnection(self)
        if self._lost_reason is not None:
            reason, self._lost_reason = self._lost_reason, None
            self._notify_lost(reason)
        else:
            self._drain()

    # -- ITransport -------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if isinstance(data, str):
            raise TypeError("Stream.write takes bytes, not str")
        if self._write_closed or self._closed or not data:
            return
        if type(data) is not bytes:
            data = bytes(data)
        self._tunnel._stream_write(self, data)

    def writeSequence(self, seq) -> None:
        self.write(b"".join(seq))

    def loseConnection(self) -> None:
        """FIN after queued data; closed once the peer has sent its FIN too.

        Like a TCP socket after ``loseConnection``, we stop reading: later data is dropped
        (its credit returned so the peer is never stuck).
        """
        if self._closed or self.disconnecting:
            return
        self.disconnecting = True
        self._discard = True
        if self._inbound:
            dropped = sum(len(chunk) for chunk in self._inbound)
            self._inbound = None
            self._tunnel._stream_consumed(self, dropped)
        self.loseWriteConnection()

    def loseWriteConnection(self) -> None:
        """Half close: FIN after queued data, keep reading."""
        if self._write_closed or self._closed:
            return
        self._write_closed = True
        self._tunnel._stream_fin(self)

    def abortConnection(self) -> None:
        """RESET with CANCEL; the protocol gets connectionLost(ConnectionAborted) now."""
        self._reset(ErrorCode.CANCEL, "aborted", Failure(ConnectionAborted()))

    def reset(self, code: int, reason: str = "") -> None:
        """RESET the stream with a code the peer sees; both sides drop it at once."""
        self._reset(code, reason, Failure(ConnectionLost(f"stream reset: {reason}")))

    def getPeer(self) -> StreamAddress:
        return StreamAddress(self.stream_id, self.target)

    def getHost(self) -> StreamAddress:
        return StreamAddress(self.stream_id, self.target)

    # -- IConsumer (outbound) ---------------------------------------------------------

    def registerProducer(self, producer, streaming: bool) -> None:
        if self._producer is not None:
            raise RuntimeError(f"stream {self.stream_id} already has a producer")
        if self._closed:
            producer.stopProducing()
            return
        if not streaming:
            producer = PullAsPush(producer, self)
        self._producer = producer
        self._producer_paused = False
        self._tunnel._add_producer(self)
        self._update_producer()

    def unregisterProducer(self) -> None:
        producer, self._producer = self._producer, None
        self._tunnel._drop_producer(self)
        if isinstance(producer, PullAsPush):
            producer.stop_streaming()

    # -- IPushProducer (inbound) ------------------------------------------------------

    def pauseProducing(self) -> None:
        """Our reader is full: hold data here and stop returning credit."""
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._drain()

    def stopProducing(self) -> None:
        self.loseConnection()

    # -- called by TunnelProtocol -----------------------------------------------------

    def _data_received(self, data: bytes) -> None:
        if self._closed:
            return
        if self._discard:
            self._tunnel._stream_consumed(self, len(data))
        elif self._inbound is not None or self._paused or self.protocol is None:
            if self._inbound is None:
                self._inbound = deque()
            self._inbound.append(data)
        else:
            self._deliver(data)

    def _peer_fin(self) -> None:
        self._remote_fin = True
        self._drain()

    def _streams_closed(self) -> None:
        """Both FINs are through; report ConnectionDone once buffered data is delivered."""
        self._both_fins = True
        self._drain()

    def _peer_reset(self, code: int, reason: str) -> None:
        try:
            name = ErrorCode(code).name
        except ValueError:
            name = f"code {code}"
        self._connection_lost(Failure(ConnectionLost(f"stream reset by peer ({name}): {reason}")))

    def _update_producer(self) -> None:
        producer = self._producer
        if producer is None:
            return
        tunnel = self._tunnel
        pause = (tunnel._awaits_turn(self)
                 or tunnel._pending_bytes(self) >= SEND_BUFFER_LIMIT)
        if pause != self._producer_paused:
            self._producer_paused = pause
            if pause:
                producer.pauseProducing()
            else:
                producer.resumeProducing()

    def _connection_lost(self, reason: Failure) -> None:
        """The end of the stream, exactly once: stop our producer, tell our protocol."""
        if self._closed:
            return
        self._closed = True
        self._write_closed = True
        self._inbound = None
        self._tunnel._forget(self)
        producer, self._producer = self._producer, None
        if producer is not None:
            self._tunnel._drop_producer(self)
            try:
                producer.stopProducing()
            except Exception:
                self._log.failure("stream {id}: producer failed to stop", id=self.stream_id)
        if self.protocol is None:
            self._lost_reason = reason
        else:
            self._notify_lost(reason)

    # -- internals --------------------------------------------------------------------

    def _reset(self, code: int, reason: str, failure: Failure) -> None:
        if self._closed:
            return
        self._tunnel._stream_reset(self, code, reason)
        self._connection_lost(failure)

    def _notify_lost(self, reason: Failure) -> None:
        try:
            self.protocol.connectionLost(reason)
        except Exception:
            self._log.failure("stream {id}: connectionLost failed", id=self.stream_id)

    def _deliver(self, data: bytes) -> None:
        try:
            self.protocol.dataReceived(data)
        except Exception:
            self._log.failure("stream {id}: protocol failed on data", id=self.stream_id)
            self.reset(ErrorCode.INTERNAL, "stream protocol failed")
            return
        self._tunnel._stream_consumed(self, len(data))

    def _drain(self) -> None:
        """Deliver queued data while the reader lets us, then a pending FIN and close."""
        if self.protocol is None:
            return
        inbound = self._inbound
        while inbound and not self._paused and not self._closed:
            self._deliver(inbound.popleft())
        if inbound or self._paused or self._closed:
            return
        self._inbound = None
        if self._remote_fin and not self._fin_delivered:
            self._fin_delivered = True
            self._deliver_fin()
        if self._both_fins and not self._closed:
            self._connection_lost(Failure(ConnectionDone()))

    def _deliver_fin(self) -> None:
        if self._discard:
            return  # we already sent FIN; the close follows from the mux
        if IHalfCloseableProtocol.providedBy(self.protocol):
            try:
                self.protocol.readConnectionLost()
            except Exception:
                self._log.failure("stream {id}: readConnectionLost failed", id=self.stream_id)
                self.reset(ErrorCode.INTERNAL, "stream protocol failed")
        else:
            self.loseConnection()
