"""The multiplexer: stream table, per-stream credit, half close, reset, keepalive, go-away.

Sans-IO: it is fed bytes and the current time, hands back events, and queues the bytes to
send; it never touches a socket or a clock, so every rule here is unit-testable.  The rules
themselves are specified in ``docs/protocol.rst``.
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass
from typing import Union

from apptunnel.tunnel import frames as F
from apptunnel.tunnel.errors import StreamRefused, TunnelLost, TunnelProtocolError
from apptunnel.tunnel.frames import ErrorCode, FrameType

DEFAULT_WINDOW = 1024 * 1024
# Receive credit shared by a tunnel's busy streams: each gets WINDOW_BUDGET / busy streams,
# between MIN_SHARED_WINDOW and its full window. A stream's bytes move a window at a time,
# so with 1,000 busy streams at 1 MiB each a round took ~1 GiB and ~10 s here: in any
# 5 s a stream got zero, one or two windows (max/min 9-16), and the proxy held ~800 MiB.
# A stream counts as busy for BUSY_INTERVAL seconds after it last received data.
WINDOW_BUDGET = 64 * 1024 * 1024
MIN_SHARED_WINDOW = 64 * 1024
BUSY_INTERVAL = 0.5
MAX_WINDOW = 0x7FFFFFFF
MAX_STREAMS = 65536
MAX_PENDING_OPENS = 1024
MIN_FRAME_SIZE = 1024
MAX_BLOCKED_REFUSALS = 4096  # refused OPENs tolerated while the peer is not reading

_U64 = struct.Struct("!Q")


# -- events -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StreamOpened:
    """The peer asks to open a stream; answer with accept() or refuse()."""
    stream_id: int
    target: dict


@dataclass(frozen=True, slots=True)
class StreamAccepted:
    """The peer accepted a stream we opened; it may now carry data both ways."""
    stream_id: int


@dataclass(frozen=True, slots=True)
class OpenRefused:
    """The peer refused (or reset before accepting) a stream we opened."""
    stream_id: int
    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class DataReceived:
    stream_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The peer sent FIN: no more data will arrive on this stream."""
    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The peer reset the stream (also sent for a peer-opened stream not yet answered)."""
    stream_id: int
    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class StreamClosed:
    """Both sides have sent FIN: the stream is gone from the table."""
    stream_id: int


@dataclass(frozen=True, slots=True)
class WindowUpdated:
    """The peer granted credit; queued data may have gone out."""
    stream_id: int


@dataclass(frozen=True, slots=True)
class ControlReceived:
    message: dict


@dataclass(frozen=True, slots=True)
class PongReceived:
    opaque: bytes


@dataclass(frozen=True, slots=True)
class GoAwayReceived:
    last_stream_id: int
    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class Drained:
    """Going away and no stream is left: the connection should be closed now."""


@dataclass(frozen=True, slots=True)
class PeerDead:
    """Nothing arrived for keepalive_timeout seconds."""
    silence: float


Event = Union[StreamOpened, StreamAccepted, OpenRefused, DataReceived, StreamEnded,
              StreamReset, StreamClosed, WindowUpdated, ControlReceived, PongReceived,
              GoAwayReceived, Drained, PeerDead]

# Stream states.
OPENING = 1    # we sent OPEN, waiting for OPEN_OK / OPEN_FAIL
ACCEPTING = 2  # the peer sent OPEN, we have not answered
OPEN = 3


class _StreamState:
    """Per-stream bookkeeping; kept tiny because tunnels hold thousands of idle streams."""

    __slots__ = ("state", "send_window", "recv_window", "in_use", "pending",
                 "pending_bytes", "local_fin", "fin_pending", "remote_fin")

    def __init__(self, state: int, send_window: int, recv_window: int) -> None:
        self.state = state
        self.send_window = send_window  # credit the peer gave us
        self.recv_window = recv_window  # credit we gave the peer, not yet used
        self.in_use = recv_window       # credit given and not yet consumed by our reader
        self.pending: deque[bytes | memoryview] | None = None  # beyond the send window
        self.pending_bytes = 0
        self.local_fin = False          # our side asked to FIN
        self.fin_pending = False        # ... but queued data must go first
        self.remote_fin = False


def shared_window(window: int, busy: int) -> int:
    """The receive window of each of `busy` streams sharing WINDOW_BUDGET (at most `window`)."""
    if busy <= 1:
        return window
    return min(window, max(MIN_SHARED_WINDOW, WINDOW_BUDGET // busy))


def _protocol_error(reason: str) -> TunnelProtocolError:
    return TunnelProtocolError(ErrorCode.PROTOCOL, reason)


class Mux:
    """Streams and credit for one tunnel. Does no I/O and owns no clock.

    Flow control: each side grants a per-stream receive window (in OPEN / OPEN_OK) and only
    returns credit (WINDOW_UPDATE) for bytes its reader has *consumed*, batched once half
    the window is consumed.  A peer sending beyond the window is a FLOW_CONTROL error.  Data
    written beyond our send window waits in that stream's ``pending`` deque; the layer above
    pauses its producer when ``pending_bytes()`` grows, so memory per stream stays bounded
    by the window for well-behaved (producer-driven) writers.
    """

    def __init__(self, *, initiator: bool, now: float,
                 keepalive_interval: float = 5.0, keepalive_timeout: float = 15.0,
                 max_frame_size: int = F.MAX_PAYLOAD, initial_window: int = DEFAULT_WINDOW,
                 max_streams: int = MAX_STREAMS,
                 max_pending_opens: int = MAX_PENDING_OPENS) -> None:
        if not MIN_FRAME_SIZE <= max_frame_size <= F.MAX_PAYLOAD:
            raise ValueError(f"max_frame_size must be in [{MIN_FRAME_SIZE}, {F.MAX_PAYLOAD}]")
        if not 1 <= initial_window <= MAX_WINDOW:
            raise ValueError(f"initial_window must be in [1, {MAX_WINDOW}]")
        if not 0 < keepalive_interval < keepalive_timeout:
            raise ValueError("need 0 < keepalive_interval < keepalive_timeout")
        self._initiator = initiator
        self._interval = keepalive_interval
        self._timeout = keepalive_timeout
        self._max_frame = max_frame_size
        self._window = initial_window
        self._busy: set[int] = set()     # streams that received data this interval
        self._busy_before = 0            # ... and how many in the one before
        self._busy_until = now + BUSY_INTERVAL
        self._max_streams = max_streams
        self._max_pending = max_pending_opens
        self._decoder = F.FrameDecoder()
        self._streams: dict[int, _StreamState] = {}
        self._next_id = 1 if initiator else 2
        self._peer_last_id = 0
        self._opening = 0
        self._accepting = 0
        self._out: list[bytes] = []
        self._events: list[Event] = []
        self._last_inbound = now
        self._last_ping = float("-inf")
        self._ping_counter = 0
        self._ping_answered = True
        self._rtt: float | None = None
        self._closed = False
        self._local_going_away = False
        self._peer_going_away = False
        self._drained = False
        self._output_blocked = False
        self._blocked_refusals = 0
        self._handlers = {
            F.Data: self._on_data, F.Open: self._on_open, F.OpenOk: self._on_open_ok,
            F.OpenFail: self._on_open_fail, F.WindowUpdate: self._on_window_update,
            F.Reset: self._on_reset, F.Ping: self._on_ping, F.Pong: self._on_pong,
            F.GoAway: self._on_goaway, F.Control: self._on_control,
        }

    # -- state ------------------------------------------------------------------------

    @property
    def stream_count(self) -> int:
        return len(self._streams)

    @property
    def rtt(self) -> float | None:
        """Seconds between our last answered keepalive PING and its PONG (None: none yet)."""
        return self._rtt

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def going_away(self) -> bool:
        """True once either side sent GOAWAY: no new streams either way."""
        return self._local_going_away or self._peer_going_away

    def is_open(self, stream_id: int) -> bool:
        """True while the stream is accepted and still in the table."""
        st = self._streams.get(stream_id)
        return st is not None and st.state == OPEN

    def pending_bytes(self, stream_id: int) -> int:
        """Bytes written to the stream that still wait for send credit."""
        st = self._streams.get(stream_id)
        return st.pending_bytes if st is not None else 0

    def send_window(self, stream_id: int) -> int:
        st = self._streams.get(stream_id)
        return st.send_window if st is not None else 0

    def set_output_blocked(self, blocked: bool) -> None:
        """The socket is full.  Replies the peer forces on us must not pile up meanwhile:
        PINGs go unanswered (a peer that does not read cannot see PONGs anyway) and a peer
        that keeps sending OPENs we must refuse is cut off after MAX_BLOCKED_REFUSALS."""
        self._output_blocked = blocked
        self._blocked_refusals = 0

    # -- input ------------------------------------------------------------------------

    def receive(self, data: bytes, now: float) -> list[Event]:
        """Feed bytes from the peer; only TunnelProtocolError can be raised."""
        if self._closed:
            return []
        if data:
            self._last_inbound = now
            if now >= self._busy_until:
                self._busy_before, self._busy = len(self._busy), set()
                self._busy_until = now + BUSY_INTERVAL
        try:
            for frame in self._decoder.feed(data):
                self._handlers[type(frame)](frame)
        except TunnelProtocolError as e:
            self.fail(e.code, e.reason)  # a last GOAWAY naming the problem
            raise
        return self.pop_events()

    def touch(self, now: float) -> None:
        """Count ``now`` as having heard from the peer (the connection just came up)."""
        self._last_inbound = now

    def tick(self, now: float) -> list[Event]:
        """Keepalive: queue a PING after interval of inbound silence; PeerDead after timeout."""
        if self._closed:
            return self.pop_events()
        silence = now - self._last_inbound
        if silence >= self._timeout:
            self._closed = True
            self._events.append(PeerDead(silence))
        elif now >= max(self._last_inbound, self._last_ping) + self._interval:
            self._ping_counter += 1
            self._queue(F.Ping(_U64.pack(self._ping_counter & 0xFFFFFFFFFFFFFFFF)))
            self._last_ping = now
            self._ping_answered = False
        return self.pop_events()

    def next_deadline(self) -> float:
        """When tick() next has something to do."""
        return min(max(self._last_inbound, self._last_ping) + self._interval,
                   self._last_inbound + self._timeout)

    # -- output -----------------------------------------------------------------------

    @property
    def has_events(self) -> bool:
        """Whether pop_events() would return anything."""
        return bool(self._events)

    def pop_events(self) -> list[Event]:
        events, self._events = self._events, []
        return events

    def chunks_to_send(self) -> list[bytes]:
        """Queued output as chunks for ``transport.writeSequence`` (headers and payloads)."""
        out, self._out = self._out, []
        return out

    def bytes_to_send(self) -> bytes:
        return b"".join(self.chunks_to_send())

    # -- local actions ----------------------------------------------------------------

    def open_stream(self, target: dict) -> int:
        """Send OPEN; returns the new stream id.  StreamRefused/TunnelLost/ValueError."""
        if self._closed:
            raise TunnelLost("tunnel is closed")
        if self.going_away:
            raise StreamRefused(ErrorCode.GOING_AWAY, "tunnel is going away")
        if self._opening >= self._max_pending:
            raise StreamRefused(ErrorCode.REFUSED, "too many pending stream opens")
        if len(self._streams) >= self._max_streams:
            raise StreamRefused(ErrorCode.REFUSED, "too many streams")
        sid = self._next_id
        if sid > F.MAX_U32:
            raise StreamRefused(ErrorCode.REFUSED, "stream ids exhausted")
        window = self._shared_window()
        chunks = F.encode_chunks(F.Open(sid, window, target))  # ValueError if bad
        self._next_id += 2
        self._streams[sid] = _StreamState(OPENING, 0, window)
        self._opening += 1
        self._out.extend(chunks)
        return sid

    def accept(self, stream_id: int) -> bool:
        """Answer a StreamOpened with OPEN_OK; False if it is no longer waiting."""
        st = self._streams.get(stream_id)
        if st is None or st.state != ACCEPTING or self._closed:
            return False
        st.state = OPEN
        st.recv_window = st.in_use = window = self._shared_window()
        self._accepting -= 1
        self._queue(F.OpenOk(stream_id, window))
        return True

    def refuse(self, stream_id: int, code: int, reason: str = "") -> bool:
        """Answer a StreamOpened with OPEN_FAIL."""
        st = self._streams.get(stream_id)
        if st is None or st.state != ACCEPTING:
            return False
        del self._streams[stream_id]
        self._accepting -= 1
        if not self._closed:
            self._queue(F.OpenFail(stream_id, code, reason))
        self._check_drained()
        return True

    def send_data(self, stream_id: int, data: bytes) -> bool:
        """Send as much as the window allows now and queue the rest; False if not writable."""
        st = self._streams.get(stream_id)
        if st is None or st.state != OPEN or st.local_fin or self._closed:
            return False
        n = len(data)
        if not n:
            return True
        if st.pending_bytes:
            st.pending.append(data)
            st.pending_bytes += n
            return True
        window = st.send_window
        if n <= window and n <= self._max_frame:  # the common case: one frame, no copy
            st.send_window = window - n
            self._out.append(F.encode_header(FrameType.DATA, 0, stream_id, n))
            self._out.append(data)
            return True
        sent = min(n, window)
        if sent:
            self._emit_data(stream_id, st, data, sent)
        if sent < n:
            if st.pending is None:
                st.pending = deque()
            st.pending.append(memoryview(data)[sent:])  # slicing a view copies nothing
            st.pending_bytes += n - sent
        return True

    def end_stream(self, stream_id: int) -> bool:
        """Half close our direction: FIN after any queued data."""
        st = self._streams.get(stream_id)
        if st is None or st.state != OPEN or st.local_fin or self._closed:
            return False
        st.local_fin = True
        if st.pending_bytes:
            st.fin_pending = True
        else:
            self._queue(F.Data(stream_id, b"", True))
            self._maybe_close(stream_id, st)
        return True

    def reset(self, stream_id: int, code: int, reason: str = "") -> bool:
        """Abandon a stream in any state (including an unanswered OPEN of ours)."""
        st = self._streams.pop(stream_id, None)
        if st is None:
            return False
        if st.state == OPENING:
            self._opening -= 1
        elif st.state == ACCEPTING:
            self._accepting -= 1
        if not self._closed:
            self._queue(F.Reset(stream_id, code, reason))
        self._check_drained()
        return True

    def consumed(self, stream_id: int, n: int) -> bool:
        """Return credit only once the reader has actually taken the bytes; True when that
        queued a WINDOW_UPDATE (batched: once half the stream's share is free)."""
        st = self._streams.get(stream_id)
        if st is None or st.state != OPEN or st.remote_fin or self._closed or n <= 0:
            return False
        # Never count more than was received and not yet consumed, whatever the caller
        # claims. Credit goes back once the stream's credit in use (the peer's window and
        # what it sent that our reader has not taken) is half its share or less: up to
        # the share, which may be more or less than was consumed (more streams busy, or
        # fewer). A peer that spent its window and waits always hears from us once our
        # reader took what it sent.
        st.in_use -= min(n, st.in_use - st.recv_window)
        window = self._shared_window()
        inc = window - st.in_use
        if inc > 0 and inc >= max(1, window // 2):
            st.in_use = window
            st.recv_window += inc
            self._queue(F.WindowUpdate(stream_id, inc))
            return True
        return False

    def _shared_window(self) -> int:
        return shared_window(self._window, max(self._busy_before, len(self._busy)))

    def send_control(self, message: dict) -> None:
        """Queue a CONTROL frame; ValueError if not a JSON object of at most 64 KiB."""
        if self._closed:
            raise TunnelLost("tunnel is closed")
        self._out.extend(F.encode_chunks(F.Control(message)))

    def go_away(self, code: int = ErrorCode.NO_ERROR, reason: str = "") -> None:
        """Stop opening and accepting streams; Drained once the open ones are done."""
        if self._closed or self._local_going_away:
            return
        self._local_going_away = True
        self._queue(F.GoAway(self._peer_last_id, code, reason))
        self._check_drained()

    def fail(self, code: int, reason: str) -> None:
        """Connection-fatal error on our side: a last GOAWAY, then nothing more."""
        if not self._closed:
            self._queue(F.GoAway(self._peer_last_id, code, reason))
            self._closed = True

    def close(self) -> None:
        """The connection is gone: accept no more input and queue no more output."""
        self._closed = True
        self._out = []

    # -- frame handlers ---------------------------------------------------------------

    def _on_data(self, f: F.Data) -> None:
        sid = f.stream_id
        st = self._streams.get(sid)
        if st is None:
            self._check_known(sid, "DATA")
            return  # reset or refused locally; the peer had not seen it yet
        if st.state != OPEN:
            raise _protocol_error(f"DATA on stream {sid} before it was accepted")
        if st.remote_fin:
            raise _protocol_error(f"DATA on stream {sid} after FIN")
        n = len(f.data)
        if n > st.recv_window:
            raise TunnelProtocolError(
                ErrorCode.FLOW_CONTROL,
                f"{n} bytes on stream {sid} exceed its window of {st.recv_window}")
        st.recv_window -= n
        if n:
            self._busy.add(sid)
            self._events.append(DataReceived(sid, f.data))
        if f.fin:
            st.remote_fin = True
            self._events.append(StreamEnded(sid))
            self._maybe_close(sid, st)

    def _on_open(self, f: F.Open) -> None:
        sid = f.stream_id
        if self._is_ours(sid):
            raise _protocol_error(f"peer opened stream {sid}, which has our parity")
        if sid <= self._peer_last_id:
            raise _protocol_error(f"stream id {sid} is not above {self._peer_last_id}")
        self._peer_last_id = sid
        refused = (self.going_away or len(self._streams) >= self._max_streams
                   or self._accepting >= self._max_pending)
        if refused and self._output_blocked:
            self._blocked_refusals += 1
            if self._blocked_refusals > MAX_BLOCKED_REFUSALS:
                raise _protocol_error("peer keeps opening refused streams without reading")
        if self.going_away:
            self._queue(F.OpenFail(sid, ErrorCode.GOING_AWAY, "tunnel is going away"))
        elif len(self._streams) >= self._max_streams:
            self._queue(F.OpenFail(sid, ErrorCode.REFUSED, "too many streams"))
        elif self._accepting >= self._max_pending:
            self._queue(F.OpenFail(sid, ErrorCode.REFUSED, "too many pending stream opens"))
        else:
            self._streams[sid] = _StreamState(ACCEPTING, f.window, 0)
            self._accepting += 1
            self._events.append(StreamOpened(sid, f.target))

    def _on_open_ok(self, f: F.OpenOk) -> None:
        st = self._answer_to_open(f.stream_id, "OPEN_OK")
        if st is not None:
            st.state = OPEN
            st.send_window = f.window
            self._events.append(StreamAccepted(f.stream_id))

    def _on_open_fail(self, f: F.OpenFail) -> None:
        st = self._answer_to_open(f.stream_id, "OPEN_FAIL")
        if st is not None:
            del self._streams[f.stream_id]
            self._events.append(OpenRefused(f.stream_id, f.code, f.reason))
            self._check_drained()

    def _answer_to_open(self, sid: int, what: str) -> _StreamState | None:
        if not self._is_ours(sid):
            raise _protocol_error(f"{what} for stream {sid}, which the peer opened")
        st = self._streams.get(sid)
        if st is None:
            self._check_known(sid, what)
            return None  # we cancelled it meanwhile
        if st.state != OPENING:
            raise _protocol_error(f"{what} for stream {sid}, which is already answered")
        self._opening -= 1
        return st

    def _on_window_update(self, f: F.WindowUpdate) -> None:
        sid = f.stream_id
        st = self._streams.get(sid)
        if st is None:
            self._check_known(sid, "WINDOW_UPDATE")
            return
        window = st.send_window + f.increment
        if window > F.MAX_U32:
            raise TunnelProtocolError(ErrorCode.FLOW_CONTROL,
                                      f"window of stream {sid} overflows")
        st.send_window = window
        if st.pending_bytes:
            self._drain_pending(sid, st)
        self._events.append(WindowUpdated(sid))

    def _on_reset(self, f: F.Reset) -> None:
        sid = f.stream_id
        st = self._streams.pop(sid, None)
        if st is None:
            self._check_known(sid, "RESET")
            return
        if st.state == OPENING:
            self._opening -= 1
            self._events.append(OpenRefused(sid, f.code, f.reason))
        else:
            if st.state == ACCEPTING:
                self._accepting -= 1
            self._events.append(StreamReset(sid, f.code, f.reason))
        self._check_drained()

    def _on_ping(self, f: F.Ping) -> None:
        if not self._output_blocked:
            self._queue(F.Pong(f.opaque))

    def _on_pong(self, f: F.Pong) -> None:
        # Only the PONG of our latest PING measures the round trip (receive() has just set
        # _last_inbound to now); stale or unsolicited ones are passed on and not timed.
        if not self._ping_answered and f.opaque == _U64.pack(self._ping_counter & 0xFFFFFFFFFFFFFFFF):
            self._ping_answered = True
            self._rtt = max(0.0, self._last_inbound - self._last_ping)
        self._events.append(PongReceived(f.opaque))

    def _on_goaway(self, f: F.GoAway) -> None:
        self._peer_going_away = True
        self._events.append(GoAwayReceived(f.last_stream_id, f.code, f.reason))
        self._check_drained()

    def _on_control(self, f: F.Control) -> None:
        self._events.append(ControlReceived(f.message))

    # -- helpers ----------------------------------------------------------------------

    def _queue(self, frame: F.Frame) -> None:
        self._out.extend(F.encode_chunks(frame))

    def _is_ours(self, sid: int) -> bool:
        return (sid & 1) == (1 if self._initiator else 0)

    def _check_known(self, sid: int, what: str) -> None:
        """A frame for a stream not in the table is fine only if that id was ever used."""
        known = sid < self._next_id if self._is_ours(sid) else sid <= self._peer_last_id
        if not known:
            raise _protocol_error(f"{what} for stream {sid}, which was never opened")

    def _emit_data(self, sid: int, st: _StreamState, data: bytes, n: int) -> None:
        """Frame the first n bytes of data (n <= send window) in max-frame-size pieces."""
        step = self._max_frame
        out = self._out
        if n == len(data) and n <= step:
            out.append(F.encode_header(FrameType.DATA, 0, sid, n))
            out.append(data if type(data) is bytes else bytes(data))
        else:
            view = memoryview(data)
            for off in range(0, n, step):
                piece = bytes(view[off:min(off + step, n)])
                out.append(F.encode_header(FrameType.DATA, 0, sid, len(piece)))
                out.append(piece)
        st.send_window -= n

    def _drain_pending(self, sid: int, st: _StreamState) -> None:
        pending = st.pending
        while pending and st.send_window:
            chunk = pending.popleft()
            n = min(len(chunk), st.send_window)
            self._emit_data(sid, st, chunk, n)
            st.pending_bytes -= n
            if n < len(chunk):
                pending.appendleft(chunk[n:])
        if not pending:
            st.pending = None
            if st.fin_pending:
                st.fin_pending = False
                self._queue(F.Data(sid, b"", True))
                self._maybe_close(sid, st)

    def _maybe_close(self, sid: int, st: _StreamState) -> None:
        if st.local_fin and st.remote_fin and not st.fin_pending:
            del self._streams[sid]
            self._events.append(StreamClosed(sid))
            self._check_drained()

    def _check_drained(self) -> None:
        if self.going_away and not self._streams and not self._drained:
            self._drained = True
            self._events.append(Drained())
