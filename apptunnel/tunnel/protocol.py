"""The tunnel as a Twisted protocol: a thin adapter between a transport and the ``Mux``.

One write path (``_run`` dispatches events and flushes with ``writeSequence``), one
keepalive timer, and the tunnel registered as a push producer on its transport so a full
socket pauses every stream's producer.
"""

from __future__ import annotations

import typing
from collections import deque

from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import (
    IDelayedCall, IProtocol, IProtocolFactory, IPushProducer, IReactorTime, ISSLTransport)
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from apptunnel.tunnel import mux as M
from apptunnel.tunnel.endpoints import bulk_buffers, no_delay, write_through
from apptunnel.tunnel.errors import StreamRefused, TunnelError, TunnelLost, TunnelProtocolError
from apptunnel.tunnel.frames import ErrorCode
from apptunnel.tunnel.stream import Stream

if typing.TYPE_CHECKING:
    from cryptography import x509

# Stream producers resumed per reactor turn once the socket has drained. Pausing and
# resuming every producer cost two epoll_ctl calls and two Python calls per stream for
# every 64 KiB the socket took (1,000 busy streams: 0.09 Gbit/s); the first few refill the
# socket anyway, so the rest are resumed a batch per turn, only while it stays writable.
# The batch's size sets how evenly 1,000 busy streams share (fairness row, 20 s, max/min):
# 1 gave 4.0, 16 gave 1.98-2.20, 64 gave 1.65-1.74 at ~8% more CPU per GiB
# (docs/performance.rst, "Fairness: the first-opened streams").
RESUME_BATCH = 64
# Bytes streams not yet paused may write while the socket is full before every producer
# is paused (idle producers are paused only once they write, see pauseProducing).
PAUSED_WRITE_LIMIT = 1024 * 1024


class TunnelHandler(typing.Protocol):
    """What the owner of a tunnel (proxy side or agent side) supplies."""

    def tunnel_ready(self, tunnel: TunnelProtocol) -> None: ...

    def control_received(self, tunnel: TunnelProtocol, message: dict) -> None: ...

    def stream_requested(self, tunnel: TunnelProtocol, target: dict) -> Deferred[IProtocol]:
        """Fire with the protocol that will own the stream; StreamRefused to refuse."""

    def tunnel_lost(self, tunnel: TunnelProtocol, reason: Failure) -> None: ...

    # Optional: ``tunnel_going_away(tunnel)`` is called when the peer sends GOAWAY, so the
    # owner can stop choosing this tunnel and let idle streams go (looked up with getattr).


def _describe(address) -> str:
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    if host is not None and port is not None:
        return f"{host}:{port}"
    return str(address)


@implementer(IPushProducer)
class TunnelProtocol(Protocol):
    """Many streams over one connection; see docs/protocol.rst for the wire rules."""

    _log = Logger()

    def __init__(self, handler: TunnelHandler, clock: IReactorTime, *, initiator: bool,
                 keepalive_interval: float = 5.0, keepalive_timeout: float = 15.0,
                 max_frame_size: int = 256 * 1024,
                 initial_window: int = 1024 * 1024, max_streams: int = M.MAX_STREAMS) -> None:
        self._handler = handler
        self._clock = clock
        self._mux = M.Mux(initiator=initiator, now=clock.seconds(),
                          keepalive_interval=keepalive_interval,
                          keepalive_timeout=keepalive_timeout,
                          max_frame_size=max_frame_size, initial_window=initial_window,
                          max_streams=max_streams)
        self._streams: dict[int, Stream] = {}
        self._opening: dict[int, tuple[Deferred, dict]] = {}
        self._accepting: dict[int, Deferred] = {}
        # Streams with a registered producer; of those, the ones that wrote since they
        # were last resumed, least recently written first; and the ones paused because
        # the socket was full, waiting for their turn in that order (fairness: a stream
        # that did not get to write goes before one that did).
        self._producing: set[Stream] = set()
        self._active: dict[Stream, None] = {}
        self._held: deque[Stream] = deque()
        self._held_set: set[Stream] = set()
        self._paused_writes = 0
        self._admit_call: IDelayedCall | None = None
        self._transport_paused = False
        self._connected = False
        self._lost = False
        self._running = False
        self._backlog: list[M.Event] = []
        self._timer: IDelayedCall | None = None
        self._close_waiters: list[Deferred] = []
        self._cert: x509.Certificate | None = None
        self._peer = "<unconnected>"

    # -- public API -------------------------------------------------------------------

    @property
    def peer_certificate(self) -> x509.Certificate | None:
        """The peer's TLS certificate once the handshake is done (None over plain TCP)."""
        if self._cert is None and self.transport is not None \
                and ISSLTransport.providedBy(self.transport):
            try:
                cert = self.transport.getPeerCertificate()
            except Exception:
                cert = None
            # A cryptography certificate from apptunnel.tls (every end of ours), or
            # pyOpenSSL's X509 under Twisted's own TLS (a peer wrapped with it).
            to_cryptography = getattr(cert, "to_cryptography", None)
            if to_cryptography is not None:
                cert = to_cryptography()
            if cert is not None:
                self._cert = cert
        return self._cert

    @property
    def stream_count(self) -> int:
        return self._mux.stream_count

    @property
    def rtt(self) -> float | None:
        """The last keepalive round trip in seconds (None until one was answered)."""
        return self._mux.rtt

    @property
    def going_away(self) -> bool:
        """True once either side sent or received GOAWAY: no new stream can open here."""
        return self._mux.going_away

    @property
    def peer(self) -> str:
        """The peer's address for log lines."""
        return self._peer

    def open_stream(self, target: dict) -> Deferred[Stream]:
        """Open a stream; fires with it once the peer accepted.  Cancelling resets it."""
        if not self._connected:
            return fail(TunnelLost("tunnel is not connected"))
        try:
            sid = self._mux.open_stream(target)
        except (TunnelError, ValueError) as e:
            return fail(e)
        d: Deferred[Stream] = Deferred(lambda _: self._cancel_open(sid))
        self._opening[sid] = (d, target)
        self._run([])
        return d

    def connect_stream(self, target: dict, factory: IProtocolFactory) -> Deferred[IProtocol]:
        """open_stream, then a protocol from ``factory`` owns the stream."""
        def connected(stream: Stream) -> IProtocol:
            try:
                proto = factory.buildProtocol(stream.getPeer())
            except BaseException:
                stream.reset(ErrorCode.INTERNAL, "client protocol factory failed")
                raise
            if proto is None:
                stream.reset(ErrorCode.CANCEL, "client protocol factory refused the stream")
                raise TunnelError("protocol factory returned None")
            stream.attach(proto)
            return proto

        return self.open_stream(target).addCallback(connected)

    def send_control(self, message: dict) -> None:
        """Send a CONTROL message: a JSON object of at most 64 KiB (else ValueError)."""
        if not self._connected:
            raise TunnelLost("tunnel is not connected")
        self._mux.send_control(message)
        self._run([])

    def go_away(self, reason: str = "") -> Deferred[None]:
        """Refuse new streams, let the open ones finish, then close; fires once closed."""
        if self._lost:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._close_waiters.append(d)
        if self._connected:
            self._mux.go_away(ErrorCode.NO_ERROR, reason)
            self._run([])
        return d

    def close(self) -> None:
        """End the tunnel now, after writing what is queued; open streams are lost."""
        self._close()

    # -- Protocol ---------------------------------------------------------------------

    def connectionMade(self) -> None:
        self._connected = True
        no_delay(self.transport)
        bulk_buffers(self.transport)
        write_through(self.transport)
        self._peer = _describe(self.transport.getPeer())
        self._mux.touch(self._clock.seconds())
        self.transport.registerProducer(self, True)
        self._schedule()
        try:
            self._handler.tunnel_ready(self)
        except Exception:
            self._log.failure("tunnel {peer}: tunnel_ready failed", peer=self._peer)
            self._close()
            return
        self._run([])

    def dataReceived(self, data: bytes) -> None:
        if self._mux.closed:
            return
        try:
            events = self._mux.receive(data, self._clock.seconds())
        except TunnelProtocolError as e:
            self._log.warn("tunnel {peer} closed: {reason}", peer=self._peer, reason=str(e))
            self._close()
            return
        self._run(events)

    def connectionLost(self, reason: Failure = Failure(ConnectionLost())) -> None:
        if self._lost:
            return
        self._lost = True
        self._connected = False
        self._mux.close()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        opening, self._opening = self._opening, {}
        for d, target in opening.values():
            d.errback(TunnelLost(f"tunnel lost while opening a stream to {target!r}"))
        accepting, self._accepting = self._accepting, {}
        for d in accepting.values():
            d.cancel()
        why = reason.getErrorMessage()
        for stream in list(self._streams.values()):
            stream._connection_lost(Failure(ConnectionLost(f"tunnel lost: {why}")))
        self._producing.clear()
        self._active.clear()
        self._held.clear()
        self._held_set.clear()
        self._cancel_admit()
        try:
            self._handler.tunnel_lost(self, reason)
        except Exception:
            self._log.failure("tunnel {peer}: tunnel_lost failed", peer=self._peer)
        waiters, self._close_waiters = self._close_waiters, []
        for d in waiters:
            d.callback(None)

    # -- IPushProducer: the socket tells us when it is full ---------------------------

    def pauseProducing(self) -> None:
        """The socket is full: pause the producers that wrote since they were resumed.

        The others are idle; each is paused when it writes, so a full socket costs as
        many pauses as there are busy streams, not one per stream. If idle ones write more
        than PAUSED_WRITE_LIMIT meanwhile, all are paused.
        """
        self._transport_paused = True
        self._paused_writes = 0
        self._mux.set_output_blocked(True)
        self._cancel_admit()
        for stream in list(self._active):
            self._hold(stream)

    def resumeProducing(self) -> None:
        """Resume held streams in turn, RESUME_BATCH per reactor turn.

        Least recently written first: their sockets are re-armed in this order and read in
        it, and the first few refill the transport; in any fixed order the same few streams
        would take the whole tunnel and the rest would starve. The next batch follows on
        the next turn while the transport still takes data, so a stream that has nothing
        to send costs its turn, never the others theirs.
        """
        self._transport_paused = False
        self._mux.set_output_blocked(False)
        self._admit()

    def stopProducing(self) -> None:
        self._transport_paused = True

    # -- called by Stream -------------------------------------------------------------

    def _stream_write(self, stream: Stream, data: bytes) -> None:
        if stream in self._producing and stream not in self._held_set:
            active = self._active
            active.pop(stream, None)   # to the back of the resume order
            active[stream] = None
            if self._transport_paused:
                self._hold(stream)
                self._paused_writes += len(data)
                if self._paused_writes > PAUSED_WRITE_LIMIT:
                    for other in list(self._producing):
                        if other not in self._held_set:
                            self._hold(other)
        self._mux.send_data(stream.stream_id, data)
        self._run([])
        stream._update_producer()

    def _stream_fin(self, stream: Stream) -> None:
        self._mux.end_stream(stream.stream_id)
        self._run([])

    def _stream_reset(self, stream: Stream, code: int, reason: str) -> None:
        self._mux.reset(stream.stream_id, code, reason)
        self._run([])

    def _stream_consumed(self, stream: Stream, n: int) -> None:
        if self._mux.consumed(stream.stream_id, n):   # else nothing queued, nothing to do
            self._run([])

    def _pending_bytes(self, stream: Stream) -> int:
        return self._mux.pending_bytes(stream.stream_id)

    def _add_producer(self, stream: Stream) -> None:
        self._producing.add(stream)

    def _drop_producer(self, stream: Stream) -> None:
        self._producing.discard(stream)
        self._active.pop(stream, None)
        self._held_set.discard(stream)

    def _awaits_turn(self, stream: Stream) -> bool:
        """Whether the stream's producer stays paused until its turn comes."""
        return stream in self._held_set

    def _hold(self, stream: Stream) -> None:
        """Pause the stream's producer until its turn (at the back of the line)."""
        self._active.pop(stream, None)
        if stream not in self._held_set:
            self._held_set.add(stream)
            self._held.append(stream)
            stream._update_producer()

    def _cancel_admit(self) -> None:
        if self._admit_call is not None and self._admit_call.active():
            self._admit_call.cancel()
        self._admit_call = None

    def _admit(self) -> None:
        """Resume the next RESUME_BATCH held producers; the rest on the next turn."""
        self._admit_call = None
        held, held_set = self._held, self._held_set
        resumed = 0
        while held and resumed < RESUME_BATCH and not self._transport_paused:
            stream = held.popleft()
            if stream in held_set:     # else dropped meanwhile
                held_set.discard(stream)
                stream._update_producer()
                resumed += 1
        if held_set and not self._transport_paused and not self._lost:
            self._admit_call = self._clock.callLater(0, self._admit)

    def _forget(self, stream: Stream) -> None:
        self._streams.pop(stream.stream_id, None)

    # -- internals --------------------------------------------------------------------

    def _run(self, events: list[M.Event]) -> None:
        """Dispatch events and those they cause, then flush; re-entrant calls just queue."""
        if self._running:
            self._backlog.extend(events)
            return
        if not events and not self._backlog and not self._mux.has_events:
            self._flush()   # the common case: a write queued frames and caused nothing
            return
        self._running = True
        try:
            while True:
                events = events + self._backlog + self._mux.pop_events()
                self._backlog = []
                if not events:
                    break
                for event in events:
                    try:
                        self._dispatch(event)
                    except Exception:
                        self._log.failure("tunnel {peer}: handling {event} failed",
                                          peer=self._peer, event=type(event).__name__)
                events = []
        finally:
            self._running = False
        self._flush()

    def _close(self, abort: bool = False) -> None:
        """The one way we end the connection: send what is queued, then let go.

        Unregistering as the transport's producer comes first because TLS transports
        wait for their producer to go away before they close; without it a tunnel
        over TLS would never finish closing.
        """
        if not self._connected:
            return
        self._flush()
        self._connected = False
        self.transport.unregisterProducer()
        abort_connection = getattr(self.transport, "abortConnection", None)
        if abort and abort_connection is not None:
            abort_connection()
        else:
            self.transport.loseConnection()

    def _flush(self) -> None:
        chunks = self._mux.chunks_to_send()
        if chunks and self._connected:
            self.transport.writeSequence(chunks)

    def _dispatch(self, event: M.Event) -> None:
        kind = type(event)
        if kind is M.DataReceived:
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream._data_received(event.data)
        elif kind is M.WindowUpdated:
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream._update_producer()
        elif kind is M.StreamOpened:
            self._stream_requested(event.stream_id, event.target)
        elif kind is M.StreamAccepted:
            entry = self._opening.pop(event.stream_id, None)
            if entry is None:
                self._mux.reset(event.stream_id, ErrorCode.CANCEL, "nobody is waiting")
                return
            d, target = entry
            stream = Stream(self, event.stream_id, target)
            self._streams[event.stream_id] = stream
            d.callback(stream)
        elif kind is M.OpenRefused:
            entry = self._opening.pop(event.stream_id, None)
            if entry is not None:
                entry[0].errback(StreamRefused(event.code, event.reason))
        elif kind is M.StreamEnded:
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream._peer_fin()
        elif kind is M.StreamClosed:
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream._streams_closed()
        elif kind is M.StreamReset:
            pending = self._accepting.pop(event.stream_id, None)
            if pending is not None:
                pending.cancel()
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream._peer_reset(event.code, event.reason)
        elif kind is M.ControlReceived:
            self._handler.control_received(self, event.message)
        elif kind is M.GoAwayReceived:
            self._log.info("tunnel {peer} is going away (code {code}): {reason}",
                           peer=self._peer, code=event.code, reason=event.reason)
            going_away = getattr(self._handler, "tunnel_going_away", None)
            if going_away is not None:
                going_away(self)
        elif kind is M.Drained:
            self._close()
        elif kind is M.PeerDead:
            self._log.warn("tunnel {peer} closed: no data from the peer for {silence:.1f}s",
                           peer=self._peer, silence=event.silence)
            self._close(abort=True)

    def _stream_requested(self, sid: int, target: dict) -> None:
        d = maybeDeferred(self._handler.stream_requested, self, target)
        self._accepting[sid] = d
        d.addCallbacks(self._accept, self._refuse, callbackArgs=(sid, target),
                       errbackArgs=(sid, target))

    def _accept(self, proto: IProtocol | None, sid: int, target: dict) -> None:
        if proto is None:
            self._refuse(Failure(TunnelError("handler returned no protocol")), sid, target)
            return
        stream = Stream(self, sid, target)
        if self._accepting.pop(sid, None) is None or not self._mux.accept(sid):
            # Reset by the peer or the tunnel was lost meanwhile, and the handler ignored
            # the cancel: the protocol still gets a stream that is already over.
            stream.attach(proto)
            stream._connection_lost(Failure(ConnectionLost("stream ended before it was accepted")))
            return
        self._streams[sid] = stream
        stream.attach(proto)
        self._run([])

    def _refuse(self, failure: Failure, sid: int, target: dict) -> None:
        if self._accepting.pop(sid, None) is None:
            return None  # already reset by the peer or lost: nothing to answer
        if failure.check(StreamRefused):
            code, reason = failure.value.code, failure.value.reason
        else:
            self._log.failure("tunnel {peer}: stream request {target!r} failed", failure,
                              peer=self._peer, target=target)
            code, reason = ErrorCode.INTERNAL, "internal error"
        self._mux.refuse(sid, code, reason)
        self._run([])
        return None

    def _cancel_open(self, sid: int) -> None:
        if self._opening.pop(sid, None) is not None:
            self._mux.reset(sid, ErrorCode.CANCEL, "cancelled")
            self._run([])

    def _schedule(self) -> None:
        delay = max(0.0, self._mux.next_deadline() - self._clock.seconds())
        self._timer = self._clock.callLater(delay, self._keepalive)

    def _keepalive(self) -> None:
        self._timer = None
        if self._lost:
            return
        self._run(self._mux.tick(self._clock.seconds()))
        if not self._mux.closed and not self._lost:
            self._schedule()
