"""Fuzz the tunnel frame decoder: any bytes, any splits.

Input layout: one byte ``k`` (number of cuts, k % 8), then ``k`` bytes of piece sizes,
then the byte stream itself.  Invariants:

* only ``TunnelProtocolError`` leaves ``feed``, and never with code INTERNAL (that code
  means the decoder's safety net caught one of its own bugs);
* the split feed yields exactly the frames of a one-shot feed, or fails the same way;
* every frame re-encodes to the bytes it came from; OPEN and CONTROL carry JSON, whose
  spelling is free, so those must re-encode to bytes that decode to the same frame.

Run: ``python fuzz/fuzz_frames.py -atheris_runs=100000`` (any libFuzzer flag works).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import Choices, FuzzFailure, run, split  # noqa: E402

from apptunnel.tunnel import frames as F  # noqa: E402
from apptunnel.tunnel.errors import TunnelProtocolError  # noqa: E402

NAME = "frames"
_JSON_FRAMES = (F.Open, F.Control)


def _feed_all(pieces: list[bytes]) -> tuple[list[F.Frame], TunnelProtocolError | None]:
    decoder = F.FrameDecoder()
    got: list[F.Frame] = []
    for piece in pieces:
        try:
            got.extend(decoder.feed(piece))
        except TunnelProtocolError as e:
            if e.code == F.ErrorCode.INTERNAL:
                raise FuzzFailure(f"decoder bug behind its safety net: {e}") from e
            # The decoder must stay failed: the same error for any later input.
            try:
                decoder.feed(b"\x10")
            except TunnelProtocolError as again:
                if again is not e:
                    raise FuzzFailure("decoder changed its error after failing") from None
            else:
                raise FuzzFailure("decoder accepted input after failing")
            return got, e
    return got, None


def _check_reencode(frames: list[F.Frame], stream: bytes) -> None:
    pos = 0
    for frame in frames:
        length = F.HEADER.unpack_from(stream, pos)[4]
        raw = stream[pos:pos + F.HEADER_SIZE + length]
        pos += len(raw)
        try:
            encoded = F.encode(frame)
        except ValueError as e:
            raise FuzzFailure(f"decoded {frame!r} cannot be encoded: {e}") from None
        if isinstance(frame, _JSON_FRAMES):
            again = F.FrameDecoder().feed(encoded)
            if again != [frame] or encoded[:4] != raw[:4]:
                raise FuzzFailure(f"{frame!r} does not survive re-encoding")
        elif encoded != raw:
            raise FuzzFailure(f"{frame!r} re-encodes to {encoded!r}, came from {raw!r}")


def TestOneInput(data: bytes) -> None:  # noqa: N802 - the name atheris looks for
    choices = Choices(data)
    cuts = [choices.byte() for _ in range(choices.byte() % 8)]
    stream = choices.rest()
    whole_frames, whole_error = _feed_all([stream])
    frames, error = _feed_all(split(stream, cuts))
    if (error is None) != (whole_error is None):
        raise FuzzFailure(f"split feed ended with {error}, one-shot with {whole_error}")
    # A failing feed() drops the frames of its own call (the connection is over anyway),
    # so the frame lists are compared only when the stream is clean.
    if error is None and frames != whole_frames:
        raise FuzzFailure("split feed and one-shot feed decode different frames")
    if error is not None and str(error) != str(whole_error):
        raise FuzzFailure(f"split feed failed with {error}, one-shot with {whole_error}")
    _check_reencode(frames, stream)


def seeds() -> list[bytes]:
    """Valid frame streams of every type, each behind a few cuts."""
    samples = [
        F.Data(1, b"hello"), F.Data(3, b"", fin=True), F.Data(2, bytes(range(256)), fin=True),
        F.Open(1, 1024, {"app": "grafana", "user": "alice", "client": "127.0.0.1:5000"}),
        F.Open(5, 65536, {"app": "pg", "port": 5432}),
        F.OpenOk(1, 4096), F.OpenFail(3, F.ErrorCode.UNKNOWN_TARGET, "no such app"),
        F.WindowUpdate(1, 512), F.Reset(7, F.ErrorCode.CANCEL, ""),
        F.Reset(9, F.ErrorCode.CONNECT_FAILED, "connection refused \u2013 port 80"),
        F.Ping(b"\x00" * 7 + b"\x01"), F.Pong(b"pingpong"),
        F.GoAway(11, F.ErrorCode.GOING_AWAY, "shutting down"),
        F.Control({"type": "hello", "host_id": "h1", "apps": [{"name": "a", "labels": {}}]}),
        F.Control({"type": "stats", "load": 0.25, "streams": 3, "ok": True, "none": None}),
    ]
    out = [b"\x00" + F.encode(frame) for frame in samples]
    everything = b"".join(F.encode(frame) for frame in samples)
    out.append(b"\x03\x05\x0c\x01" + everything)
    out.append(b"\x07\x01\x01\x01\x01\x01\x01\x01" + everything[:40])
    return out


def main() -> None:
    run(NAME, TestOneInput, seeds)


if __name__ == "__main__":
    main()
