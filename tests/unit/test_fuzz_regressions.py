"""Inputs the fuzzers (fuzz/) found, kept as plain regression tests next to the unit tests."""

from __future__ import annotations

import pytest

from apptunnel.tunnel import frames as F
from apptunnel.tunnel.errors import TunnelProtocolError


@pytest.mark.parametrize("number", [b"1e400", b"-1e400", b"1E999", b"123456789e999"])
def test_control_with_out_of_range_number_is_a_protocol_error(number):
    """A CONTROL number that parses to infinity is refused: no peer could have encoded it."""
    payload = b'{"type":"x","n":' + number + b"}"
    with pytest.raises(TunnelProtocolError) as e:
        F.FrameDecoder().feed(F.encode_header(F.FrameType.CONTROL, 0, 0, len(payload)) + payload)
    assert e.value.code == F.ErrorCode.PROTOCOL


def test_open_target_with_out_of_range_number_is_a_protocol_error():
    """An OPEN target holding 1e400 ends the connection instead of reaching the handler."""
    payload = F._U32.pack(1024) + b'{"app":"a","port":1e400}'
    with pytest.raises(TunnelProtocolError, match="not valid JSON"):
        F.FrameDecoder().feed(F.encode_header(F.FrameType.OPEN, 0, 1, len(payload)) + payload)


def test_finite_floats_still_decode_and_round_trip():
    """Ordinary fractional numbers in CONTROL messages still decode and re-encode."""
    frame = F.Control({"type": "stats", "load": 0.25, "big": 1e300})
    assert F.FrameDecoder().feed(F.encode(frame)) == [frame]
