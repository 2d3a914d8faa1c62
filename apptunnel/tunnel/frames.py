"""The tunnel's wire format: frame objects, an encoder and an incremental decoder.

Sans-IO and Twisted-free so it can be fuzzed and reused.  The layout is specified in
``docs/protocol.rst``; every limit is checked from the 12-byte header *before* the payload
is buffered, and nothing but :class:`TunnelProtocolError` ever leaves the decoder.
"""

from __future__ import annotations

import enum
import json
import math
import struct
from collections import deque
from dataclasses import dataclass, field
from typing import Union

from apptunnel.tunnel.errors import TunnelProtocolError

VERSION = 1
HEADER = struct.Struct("!BBHII")  # version<<4 | type, flags, reserved, stream id, length
HEADER_SIZE = HEADER.size  # 12
MAX_PAYLOAD = 256 * 1024  # largest DATA payload any peer must accept
MAX_JSON = 64 * 1024  # OPEN target and CONTROL message
MAX_REASON = 1024  # utf-8 bytes of a reason string
MAX_U32 = 0xFFFFFFFF
FLAG_FIN = 0x01

_U32 = struct.Struct("!I")
_DATA = 0                  # FrameType.DATA as a plain int, for the decoder's hot path
_DATA_VT = VERSION << 4    # the first header byte of a DATA frame
_U32_U32 = struct.Struct("!II")


class FrameType(enum.IntEnum):
    DATA = 0
    OPEN = 1
    OPEN_OK = 2
    OPEN_FAIL = 3
    WINDOW_UPDATE = 4
    RESET = 5
    PING = 6
    PONG = 7
    GOAWAY = 8
    CONTROL = 9


class ErrorCode(enum.IntEnum):
    """Reset, refusal and go-away codes (u32 on the wire; unknown values are kept as ints)."""

    NO_ERROR = 0
    PROTOCOL = 1
    INTERNAL = 2
    FLOW_CONTROL = 3
    REFUSED = 4
    CANCEL = 5
    UNKNOWN_TARGET = 6
    CONNECT_FAILED = 7
    GOING_AWAY = 8
    TIMEOUT = 9


@dataclass(frozen=True, slots=True)
class Data:
    stream_id: int
    data: bytes
    fin: bool = False


@dataclass(frozen=True, slots=True)
class Open:
    stream_id: int
    window: int  # receive credit the opener grants for this stream
    target: dict = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class OpenOk:
    stream_id: int
    window: int  # receive credit the acceptor grants for this stream


@dataclass(frozen=True, slots=True)
class OpenFail:
    stream_id: int
    code: int
    reason: str = ""


@dataclass(frozen=True, slots=True)
class WindowUpdate:
    stream_id: int
    increment: int


@dataclass(frozen=True, slots=True)
class Reset:
    stream_id: int
    code: int
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Ping:
    opaque: bytes


@dataclass(frozen=True, slots=True)
class Pong:
    opaque: bytes


@dataclass(frozen=True, slots=True)
class GoAway:
    last_stream_id: int
    code: int
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Control:
    message: dict


Frame = Union[Data, Open, OpenOk, OpenFail, WindowUpdate, Reset, Ping, Pong, GoAway, Control]


# -- encoding ---------------------------------------------------------------------------


def encode_header(frame_type: int, flags: int, stream_id: int, length: int) -> bytes:
    return HEADER.pack((VERSION << 4) | frame_type, flags, 0, stream_id, length)


def encode_json(obj: dict) -> bytes:
    """JSON-encode a dict for OPEN/CONTROL; ValueError when it cannot go on the wire."""
    if not isinstance(obj, dict):
        raise ValueError("tunnel JSON payloads must be objects")
    try:
        raw = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as e:
        raise ValueError(f"not JSON-serialisable: {e}") from None
    data = raw.encode("utf-8")
    if len(data) > MAX_JSON:
        raise ValueError(f"JSON payload of {len(data)} bytes exceeds {MAX_JSON}")
    return data


def encode_reason(reason: str) -> bytes:
    """UTF-8, cut at a character boundary so it fits MAX_REASON (reasons are for humans)."""
    data = reason.encode("utf-8", "replace")
    if len(data) > MAX_REASON:
        data = data[:MAX_REASON].decode("utf-8", "ignore").encode("utf-8")
    return data


def encode_chunks(frame: Frame) -> list[bytes]:
    """The frame as a header chunk plus a payload chunk (DATA payloads are not copied)."""
    t = type(frame)
    if t is Data:
        flags = FLAG_FIN if frame.fin else 0
        return [encode_header(FrameType.DATA, flags, frame.stream_id, len(frame.data)),
                frame.data]
    if t is Open:
        payload = _U32.pack(frame.window) + encode_json(frame.target)
        return [encode_header(FrameType.OPEN, 0, frame.stream_id, len(payload)), payload]
    if t is OpenOk:
        return [encode_header(FrameType.OPEN_OK, 0, frame.stream_id, 4),
                _U32.pack(frame.window)]
    if t is OpenFail or t is Reset:
        ft = FrameType.OPEN_FAIL if t is OpenFail else FrameType.RESET
        payload = _U32.pack(frame.code) + encode_reason(frame.reason)
        return [encode_header(ft, 0, frame.stream_id, len(payload)), payload]
    if t is WindowUpdate:
        return [encode_header(FrameType.WINDOW_UPDATE, 0, frame.stream_id, 4),
                _U32.pack(frame.increment)]
    if t is Ping or t is Pong:
        if len(frame.opaque) != 8:
            raise ValueError("PING/PONG payload must be 8 bytes")
        ft = FrameType.PING if t is Ping else FrameType.PONG
        return [encode_header(ft, 0, 0, 8), bytes(frame.opaque)]
    if t is GoAway:
        payload = _U32_U32.pack(frame.last_stream_id, frame.code) + encode_reason(frame.reason)
        return [encode_header(FrameType.GOAWAY, 0, 0, len(payload)), payload]
    if t is Control:
        payload = encode_json(frame.message)
        return [encode_header(FrameType.CONTROL, 0, 0, len(payload)), payload]
    raise TypeError(f"not a frame: {frame!r}")


def encode(frame: Frame) -> bytes:
    return b"".join(encode_chunks(frame))


# -- decoding ---------------------------------------------------------------------------

# (min payload, max payload or None for "the decoder's max_payload", stream 0 allowed?)
_RULES: dict[int, tuple[int, int | None, bool]] = {
    FrameType.DATA: (0, None, False),
    FrameType.OPEN: (4, 4 + MAX_JSON, False),
    FrameType.OPEN_OK: (4, 4, False),
    FrameType.OPEN_FAIL: (4, 4 + MAX_REASON, False),
    FrameType.WINDOW_UPDATE: (4, 4, False),
    FrameType.RESET: (4, 4 + MAX_REASON, False),
    FrameType.PING: (8, 8, True),
    FrameType.PONG: (8, 8, True),
    FrameType.GOAWAY: (8, 8 + MAX_REASON, True),
    FrameType.CONTROL: (2, MAX_JSON, True),
}


def _fail(reason: str) -> TunnelProtocolError:
    return TunnelProtocolError(ErrorCode.PROTOCOL, reason)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed")


def _finite_float(text: str) -> float:
    # "1e400" parses to inf, which no peer could have sent through encode_json.
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


def _decode_json(payload: bytes, what: str) -> dict:
    try:
        obj = json.loads(payload.decode("utf-8"), parse_constant=_reject_constant,
                         parse_float=_finite_float)
    except (ValueError, RecursionError) as e:
        raise _fail(f"{what} is not valid JSON: {type(e).__name__}") from None
    if not isinstance(obj, dict):
        raise _fail(f"{what} is not a JSON object")
    return obj


def _decode_reason(payload: bytes, what: str) -> str:
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError:
        raise _fail(f"{what} reason is not UTF-8") from None


def _decode_payload(ftype: int, flags: int, sid: int, payload: bytes) -> Frame:
    if ftype == _DATA:
        return Data(sid, payload, bool(flags & FLAG_FIN))
    if ftype == FrameType.OPEN:
        (window,) = _U32.unpack_from(payload)
        if window == 0:
            raise _fail("OPEN grants a zero window")
        return Open(sid, window, _decode_json(payload[4:], "OPEN target"))
    if ftype == FrameType.OPEN_OK:
        (window,) = _U32.unpack(payload)
        if window == 0:
            raise _fail("OPEN_OK grants a zero window")
        return OpenOk(sid, window)
    if ftype == FrameType.OPEN_FAIL or ftype == FrameType.RESET:
        (code,) = _U32.unpack_from(payload)
        cls = OpenFail if ftype == FrameType.OPEN_FAIL else Reset
        return cls(sid, code, _decode_reason(payload[4:], cls.__name__))
    if ftype == FrameType.WINDOW_UPDATE:
        (inc,) = _U32.unpack(payload)
        if inc == 0:
            raise _fail("WINDOW_UPDATE with a zero increment")
        return WindowUpdate(sid, inc)
    if ftype == FrameType.PING:
        return Ping(payload)
    if ftype == FrameType.PONG:
        return Pong(payload)
    if ftype == FrameType.GOAWAY:
        last, code = _U32_U32.unpack_from(payload)
        return GoAway(last, code, _decode_reason(payload[8:], "GOAWAY"))
    return Control(_decode_json(payload, "CONTROL message"))


class FrameDecoder:
    """Turns arbitrary byte chunks into frames.

    Input is kept as a deque of the chunks received, with a byte count and an offset into
    the first one, so feeding is O(bytes) however the input is split and a payload that sits
    inside one chunk is sliced out with a single copy.  At most one incomplete frame is held,
    and its size was checked against the limits from its header before we waited for it.
    """

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        self._max_payload = max_payload
        self._chunks: deque[bytes] = deque()
        self._offset = 0
        self._size = 0
        self._header: tuple[int, int, int, int] | None = None
        self._error: TunnelProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames."""
        return self._size

    def feed(self, data: bytes) -> list[Frame]:
        """Add bytes and return every frame now complete; TunnelProtocolError if malformed."""
        if self._error is not None:
            raise self._error
        if data:
            if type(data) is not bytes:
                data = bytes(data)
            self._chunks.append(data)
            self._size += len(data)
        frames: list[Frame] = []
        try:
            while True:
                header = self._header
                if header is None:
                    if self._size < HEADER_SIZE:
                        break
                    header = self._header = self._next_header()
                length = header[3]
                if self._size < length:
                    break
                payload = self._take(length) if length else b""
                self._header = None
                frames.append(_decode_payload(header[0], header[1], header[2], payload))
        except TunnelProtocolError as e:
            self._error = e
            self._chunks.clear()
            self._size = 0
            raise
        except Exception as e:  # a bug here must still look like one clean protocol error
            self._error = TunnelProtocolError(ErrorCode.INTERNAL, f"decoder: {e!r}")
            self._chunks.clear()
            self._size = 0
            raise self._error from None
        return frames

    def _next_header(self) -> tuple[int, int, int, int]:
        """Parse the next 12 bytes, in place when they sit in the first chunk (they
        nearly always do), and check them."""
        first = self._chunks[0]
        off = self._offset
        if len(first) - off > HEADER_SIZE:
            fields = HEADER.unpack_from(first, off)
            self._offset = off + HEADER_SIZE
            self._size -= HEADER_SIZE
        else:
            fields = HEADER.unpack(self._take(HEADER_SIZE))
        vt, flags, reserved, sid, length = fields
        # The common case, a DATA frame within the limits, without the general checks.
        if vt == _DATA_VT and not reserved and not flags & ~FLAG_FIN and sid \
                and length <= self._max_payload:
            return _DATA, flags, sid, length
        return self._check_header(vt, flags, reserved, sid, length)

    def _check_header(self, vt: int, flags: int, reserved: int, sid: int,
                      length: int) -> tuple[int, int, int, int]:
        version, ftype = vt >> 4, vt & 0x0F
        if version != VERSION:
            raise _fail(f"unsupported protocol version {version}")
        rule = _RULES.get(ftype)
        if rule is None:
            raise _fail(f"unknown frame type {ftype}")
        name = FrameType(ftype).name
        if reserved:
            raise _fail(f"{name} frame with non-zero reserved field")
        allowed_flags = FLAG_FIN if ftype == FrameType.DATA else 0
        if flags & ~allowed_flags:
            raise _fail(f"{name} frame with unknown flags 0x{flags:02x}")
        lo, hi, on_zero = rule
        if hi is None:
            hi = self._max_payload
        if length > hi:
            raise _fail(f"{name} frame of {length} bytes exceeds the limit of {hi}")
        if length < lo:
            raise _fail(f"{name} frame of {length} bytes is too short")
        if on_zero != (sid == 0):
            if on_zero:
                raise _fail(f"{name} frame on stream {sid} (must be 0)")
            raise _fail(f"{name} frame on stream 0")
        return ftype, flags, sid, length

    def _take(self, n: int) -> bytes:
        chunks = self._chunks
        first = chunks[0]
        off = self._offset
        avail = len(first) - off
        self._size -= n
        if n <= avail:
            if n == avail:
                chunks.popleft()
                self._offset = 0
                return first if off == 0 else first[off:]
            self._offset = off + n
            return first[off:off + n]
        parts = []
        need = n
        while need:
            first = chunks[0]
            avail = len(first) - off
            if avail <= need:
                parts.append(memoryview(first)[off:])
                chunks.popleft()
                off = 0
                need -= avail
            else:
                parts.append(memoryview(first)[off:off + need])
                off += need
                need = 0
        self._offset = off
        return b"".join(parts)
