"""The wire codec: round trips, arbitrary splits, garbage, limits checked from the header."""

import json
import struct

import pytest
from hypothesis import given, settings, strategies as st

from apptunnel.tunnel import frames as F
from apptunnel.tunnel.errors import TunnelProtocolError
from apptunnel.tunnel.frames import ErrorCode, FrameDecoder, FrameType

SETTINGS = settings(max_examples=150, deadline=None)

u32 = st.integers(0, F.MAX_U32)
sids = st.integers(1, F.MAX_U32)
reasons = st.text(max_size=60)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10)
objects = st.dictionaries(st.text(max_size=10), json_values, max_size=5)

frames = st.one_of(
    st.builds(F.Data, sids, st.binary(max_size=3000), st.booleans()),
    st.builds(F.Open, sids, st.integers(1, F.MAX_U32), objects),
    st.builds(F.OpenOk, sids, st.integers(1, F.MAX_U32)),
    st.builds(F.OpenFail, sids, u32, reasons),
    st.builds(F.WindowUpdate, sids, st.integers(1, F.MAX_U32)),
    st.builds(F.Reset, sids, u32, reasons),
    st.builds(F.Ping, st.binary(min_size=8, max_size=8)),
    st.builds(F.Pong, st.binary(min_size=8, max_size=8)),
    st.builds(F.GoAway, u32, u32, reasons),
    st.builds(F.Control, objects),
)


def header(ftype, flags=0, sid=0, length=0, version=F.VERSION, reserved=0):
    return struct.pack("!BBHII", (version << 4) | ftype, flags, reserved, sid, length)


def decode_all(data: bytes) -> list:
    return FrameDecoder().feed(data)


@SETTINGS
@given(frames)
def test_every_frame_type_round_trips(frame):
    """Encoding then decoding any frame gives the same frame back."""
    assert decode_all(F.encode(frame)) == [frame]


@SETTINGS
@given(st.lists(frames, max_size=8), st.data())
def test_arbitrary_splits_give_the_same_frames(seq, data):
    """However the byte stream is cut into chunks, the decoder yields the same frames."""
    wire = b"".join(F.encode(f) for f in seq)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=12)))
    decoder = FrameDecoder()
    out, last = [], 0
    for cut in cuts + [len(wire)]:
        out.extend(decoder.feed(wire[last:cut]))
        last = cut
    assert out == seq
    assert decoder.buffered == 0


@settings(max_examples=30, deadline=None)
@given(st.lists(frames, min_size=1, max_size=4))
def test_byte_at_a_time_feeding(seq):
    """Feeding one byte per call yields the same frames."""
    wire = b"".join(F.encode(f) for f in seq)
    decoder = FrameDecoder()
    out = []
    for i in range(len(wire)):
        out.extend(decoder.feed(wire[i:i + 1]))
    assert out == seq


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_garbage_parses_or_raises_protocol_error(junk):
    """Random bytes either decode or raise TunnelProtocolError, never anything else."""
    try:
        FrameDecoder().feed(junk)
    except TunnelProtocolError as e:
        assert e.code in (ErrorCode.PROTOCOL,)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 15), st.integers(0, 255), st.sampled_from([0, 0, 0, 1]),
       st.integers(0, 9), st.binary(max_size=64))
def test_plausible_headers_with_junk_payloads(ftype, flags, reserved, sid, payload):
    """Version-1 headers with random fields and payloads parse or raise TunnelProtocolError."""
    wire = header(ftype, flags, sid, len(payload), reserved=reserved) + payload
    try:
        FrameDecoder().feed(wire)
    except TunnelProtocolError as e:
        assert e.code == ErrorCode.PROTOCOL and e.reason


def test_oversized_data_frame_rejected_from_the_header():
    """A DATA header announcing more than the maximum is refused before any payload arrives."""
    with pytest.raises(TunnelProtocolError, match="exceeds"):
        FrameDecoder().feed(header(FrameType.DATA, sid=1, length=F.MAX_PAYLOAD + 1))


def test_oversized_control_frame_rejected_from_the_header():
    """A CONTROL frame over 64 KiB is refused from its header alone."""
    with pytest.raises(TunnelProtocolError, match="exceeds"):
        FrameDecoder().feed(header(FrameType.CONTROL, length=F.MAX_JSON + 1))


def test_decoder_limit_is_configurable():
    """A decoder built with a smaller max payload enforces it."""
    with pytest.raises(TunnelProtocolError):
        FrameDecoder(max_payload=100).feed(header(FrameType.DATA, sid=1, length=101))


@pytest.mark.parametrize("wire, message", [
    (header(FrameType.DATA, sid=1, version=2), "version"),
    (header(12), "unknown frame type"),
    (header(FrameType.DATA, sid=1, reserved=1), "reserved"),
    (header(FrameType.DATA, flags=2, sid=1), "flags"),
    (header(FrameType.PING, flags=1, length=8) + bytes(8), "flags"),
    (header(FrameType.DATA, sid=0), "stream 0"),
    (header(FrameType.PING, sid=3, length=8) + bytes(8), "must be 0"),
    (header(FrameType.PING, length=7) + bytes(7), "too short"),
    (header(FrameType.PONG, length=9), "exceeds"),
    (header(FrameType.WINDOW_UPDATE, sid=1, length=4) + bytes(4), "zero increment"),
    (header(FrameType.OPEN_OK, sid=1, length=4) + bytes(4), "zero window"),
    (header(FrameType.OPEN, sid=1, length=6) + b"\0\0\0\1[]", "not a JSON object"),
    (header(FrameType.OPEN, sid=1, length=5) + b"\0\0\0\1{", "not valid JSON"),
    (header(FrameType.CONTROL, length=10) + b'{"a":NaN} ', "not valid JSON"),
    (header(FrameType.CONTROL, length=4) + b'"\xff"x', "not valid JSON"),
    (header(FrameType.RESET, sid=1, length=5) + b"\0\0\0\1\xff", "not UTF-8"),
    (header(FrameType.GOAWAY, length=7) + bytes(7), "too short"),
])
def test_malformed_frames_raise_protocol_error(wire, message):
    """Each kind of malformed frame ends in one TunnelProtocolError naming the problem."""
    with pytest.raises(TunnelProtocolError, match=message) as info:
        FrameDecoder().feed(wire)
    assert info.value.code == ErrorCode.PROTOCOL


def test_deeply_nested_json_is_a_protocol_error():
    """JSON nested deeper than the parser allows is a protocol error, not a RecursionError."""
    body = b"[" * 30000 + b"]" * 30000
    with pytest.raises(TunnelProtocolError):
        FrameDecoder().feed(header(FrameType.CONTROL, length=len(body)) + body)


def test_decoder_stays_failed():
    """After an error the decoder refuses everything, so a broken stream cannot resync."""
    decoder = FrameDecoder()
    with pytest.raises(TunnelProtocolError):
        decoder.feed(header(13))
    with pytest.raises(TunnelProtocolError):
        decoder.feed(F.encode(F.Ping(bytes(8))))


def test_large_payload_spread_over_chunks():
    """A maximum-size DATA frame split over many chunks is reassembled exactly."""
    payload = bytes(range(256)) * (F.MAX_PAYLOAD // 256)
    wire = F.encode(F.Data(7, payload, True))
    decoder = FrameDecoder()
    out = []
    for i in range(0, len(wire), 65536):
        out.extend(decoder.feed(wire[i:i + 65536]))
    assert out == [F.Data(7, payload, True)]


def test_data_chunks_keep_the_payload_object():
    """encode_chunks hands DATA payloads through without copying them."""
    payload = b"x" * 1000
    chunks = F.encode_chunks(F.Data(1, payload))
    assert chunks[1] is payload and len(chunks[0]) == F.HEADER_SIZE


def test_encode_json_rejects_bad_payloads():
    """Non-objects, unserialisable values and oversized objects raise ValueError."""
    for bad in ([1], {"x": object()}, {"x": float("nan")}, {"x": "y" * F.MAX_JSON}):
        with pytest.raises(ValueError):
            F.encode_json(bad)


def test_reason_is_truncated_on_a_character_boundary():
    """Long reasons are cut to MAX_REASON bytes of valid UTF-8."""
    frame = F.Reset(1, ErrorCode.CANCEL, "é" * 2000)
    (decoded,) = decode_all(F.encode(frame))
    assert len(decoded.reason.encode()) <= F.MAX_REASON
    assert set(decoded.reason) == {"é"}


def test_open_target_is_json():
    """The OPEN payload is the granted window then the target as a JSON object."""
    wire = F.encode(F.Open(5, 1024, {"app": "grafana"}))
    assert wire[F.HEADER_SIZE:F.HEADER_SIZE + 4] == struct.pack("!I", 1024)
    assert json.loads(wire[F.HEADER_SIZE + 4:]) == {"app": "grafana"}


@settings(max_examples=500)
@given(st.one_of(
    st.binary(min_size=12, max_size=12),
    # mostly DATA-shaped headers: version 1, type 0, any flags, reserved, id and length
    st.builds(lambda flags, reserved, sid, length: F.HEADER.pack(0x10, flags, reserved, sid, length),
              st.integers(0, 255), st.sampled_from([0, 0, 0, 1, 0xFFFF]),
              st.sampled_from([0, 1, 2, F.MAX_U32]) | st.integers(0, F.MAX_U32),
              st.sampled_from([0, 1, 1024, F.MAX_PAYLOAD, F.MAX_PAYLOAD + 1]) | st.integers(0, F.MAX_U32))),
    st.integers(0, 2))
def test_the_data_fast_path_decides_every_header_as_the_full_check(raw, split):
    """The decoder's shortcut for DATA headers accepts exactly what the full check
    accepts, with the same fields, and anything else gets the full check's error; whether
    the header sits in one chunk or is split across chunks."""
    def outcome(decoder_call):
        try:
            return decoder_call()
        except TunnelProtocolError as e:
            return ("error", e.code, e.reason)

    full = outcome(lambda: FrameDecoder()._check_header(*F.HEADER.unpack(raw)))
    payload = b"\0" * 4
    chunks = [raw + payload] if split == 0 else [raw[:split * 5], raw[split * 5:] + payload]
    dec = FrameDecoder()
    for chunk in chunks:
        dec._chunks.append(chunk)
        dec._size += len(chunk)
    assert outcome(dec._next_header) == full
