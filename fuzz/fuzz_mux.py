"""Fuzz two multiplexer ends talking to each other, driven by the input as a program.

Each input byte pair is one operation on end A (initiator) or B: open a stream, answer an
open, send, consume, FIN, reset, control, go-away, advance time (keepalive), deliver the
queued bytes in fuzzer-chosen pieces, or inject raw garbage into one end.  Invariants:

* nothing but ``TunnelProtocolError`` leaves ``receive`` -- and between two honest ends
  (before any garbage is injected) not even that;
* bytes delivered to a reader but not yet consumed never exceed the window it granted;
* a stream's delivered bytes are a prefix of what the other end sent, in order, and all of
  it once FIN has arrived.

Run: ``python fuzz/fuzz_mux.py -atheris_runs=100000`` (any libFuzzer flag works).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import Choices, FuzzFailure, run  # noqa: E402

from apptunnel.tunnel import frames as F  # noqa: E402
from apptunnel.tunnel import mux as M  # noqa: E402
from apptunnel.tunnel.errors import StreamRefused, TunnelLost, TunnelProtocolError  # noqa: E402

NAME = "mux"
MAX_OPS = 400


class _End:
    """One Mux and what its application has seen, for checking the other end's claims."""

    def __init__(self, name: str, mux: M.Mux, window: int) -> None:
        self.name = name
        self.mux = mux
        self.window = window
        self.dead = False           # raised TunnelProtocolError or declared the peer dead
        self.poisoned = False       # garbage went in: the peer's bytes are not its own
        self.streams: list[int] = []  # every id seen, for the program to pick from
        self.incoming: list[int] = []  # StreamOpened not yet answered
        self.sent: dict[int, bytearray] = {}
        self.received: dict[int, bytearray] = {}
        self.unconsumed: dict[int, int] = {}
        self.ended: set[int] = set()


class _Session:
    def __init__(self, choices: Choices) -> None:
        self.c = choices
        self.now = 0.0
        window = 1 + choices.u16() % 8192
        frame = M.MIN_FRAME_SIZE + choices.byte() * 16
        self.a = _End("A", M.Mux(initiator=True, now=0.0, initial_window=window,
                                 max_frame_size=frame, max_pending_opens=8, max_streams=16),
                      window)
        self.b = _End("B", M.Mux(initiator=False, now=0.0, initial_window=window,
                                 max_frame_size=frame, max_pending_opens=8, max_streams=16),
                      window)
        self.counter = 0

    def other(self, end: _End) -> _End:
        return self.b if end is self.a else self.a

    def pick(self, ids: list[int]) -> int | None:
        return ids[self.c.byte() % len(ids)] if ids else None

    # -- delivering bytes and checking what comes out ----------------------------------

    def deliver(self, src: _End, pieces: int) -> None:
        dst = self.other(src)
        data = src.mux.bytes_to_send()
        if dst.dead or src.dead and not data:
            return
        pos = 0
        for _ in range(pieces):
            size = self.c.u16() % (len(data) + 1)
            self.feed(dst, data[pos:pos + size])
            pos += size
        self.feed(dst, data[pos:])

    def feed(self, dst: _End, data: bytes) -> None:
        if dst.dead:
            return
        try:
            events = dst.mux.receive(data, self.now)
        except TunnelProtocolError as e:
            if not dst.poisoned:
                raise FuzzFailure(f"{dst.name} failed on an honest peer: {e}") from None
            dst.dead = True
            return
        self.handle(dst, events)

    def handle(self, end: _End, events: list) -> None:
        peer = self.other(end)
        for ev in events:
            if isinstance(ev, M.StreamOpened):
                end.incoming.append(ev.stream_id)
                end.streams.append(ev.stream_id)
            elif isinstance(ev, M.DataReceived):
                sid = ev.stream_id
                got = end.received.setdefault(sid, bytearray())
                got += ev.data
                end.unconsumed[sid] = end.unconsumed.get(sid, 0) + len(ev.data)
                if end.unconsumed[sid] > end.window:
                    raise FuzzFailure(f"{end.name} holds {end.unconsumed[sid]} unconsumed "
                                      f"bytes on stream {sid}, window {end.window}")
                if not end.poisoned:
                    sent = peer.sent.get(sid, b"")
                    if got != sent[:len(got)]:
                        raise FuzzFailure(f"stream {sid} delivered bytes that were not sent")
            elif isinstance(ev, M.StreamEnded):
                end.ended.add(ev.stream_id)
                if not end.poisoned and end.received.get(ev.stream_id, b"") != \
                        peer.sent.get(ev.stream_id, b""):
                    raise FuzzFailure(f"stream {ev.stream_id} ended short of what was sent")
            elif isinstance(ev, (M.StreamReset, M.StreamClosed, M.OpenRefused)):
                if ev.stream_id in end.incoming:
                    end.incoming.remove(ev.stream_id)
            elif isinstance(ev, M.StreamAccepted):
                end.streams.append(ev.stream_id)
            elif isinstance(ev, M.PeerDead):
                end.dead = True

    # -- the program -------------------------------------------------------------------

    def step(self) -> None:
        op = self.c.byte()
        end = self.a if op & 1 else self.b
        mux = end.mux
        action = (op >> 1) % 14
        if end.dead and action not in (9, 10):
            return
        if action == 0:
            self.counter += 1
            try:
                sid = mux.open_stream({"app": "app", "n": self.counter})
            except (StreamRefused, TunnelLost):
                return
            end.streams.append(sid)
        elif action == 1 and end.incoming:
            sid = self.pick(end.incoming)
            end.incoming.remove(sid)
            if self.c.byte() % 4:
                mux.accept(sid)
            else:
                mux.refuse(sid, F.ErrorCode.REFUSED, "no")
        elif action in (2, 3):
            sid = self.pick(end.streams)
            if sid is None:
                return
            n = self.c.u16() % (3 * end.window + 1)
            payload = bytes((self.counter + i) & 0xFF for i in range(n))
            self.counter += 1
            if mux.send_data(sid, payload):
                end.sent.setdefault(sid, bytearray()).extend(payload)
        elif action == 4:
            sid = self.pick(end.streams)
            if sid is not None:
                n = min(end.unconsumed.get(sid, 0), self.c.u16())
                end.unconsumed[sid] = end.unconsumed.get(sid, 0) - n
                mux.consumed(sid, n)
        elif action == 5:
            sid = self.pick(end.streams)
            if sid is not None:
                mux.end_stream(sid)
        elif action == 6:
            sid = self.pick(end.streams)
            if sid is not None:
                mux.reset(sid, self.c.byte() % 10, "fuzz")
        elif action == 7:
            try:
                mux.send_control({"type": "ping", "n": self.counter})
            except TunnelLost:
                return
        elif action == 8:
            mux.go_away(F.ErrorCode.GOING_AWAY, "bye")
        elif action == 9:
            self.now += self.c.byte() / 16.0
            for e in (self.a, self.b):
                if not e.dead:
                    self.handle(e, e.mux.tick(self.now))
        elif action in (10, 11, 12):
            self.deliver(end, self.c.byte() % 4)
        elif action == 13:
            garbage = self.c.take(self.c.byte() % 64)
            # The garbage may frame-shift or answer for the peer: neither end's view of
            # the other is trustworthy from here on, only the local rules are.
            self.a.poisoned = self.b.poisoned = True
            self.feed(end, garbage)


def TestOneInput(data: bytes) -> None:  # noqa: N802 - the name atheris looks for
    choices = Choices(data)
    session = _Session(choices)
    for _ in range(MAX_OPS):
        if not choices.remaining:
            break
        session.step()
    # Deliver until quiet, so bytes still queued are checked too.
    for _ in range(8):
        session.deliver(session.a, 0)
        session.deliver(session.b, 0)


def seeds() -> list[bytes]:
    """Programs that open, accept, stream, consume, close and go away."""
    # op byte: bit 0 = end (1 = A), bits 1.. = action.
    def op(end_a: bool, action: int, *args: int) -> bytes:
        return bytes([(action << 1) | int(end_a), *args])

    header = b"\x04\x00\x00"  # window 1024, smallest frame size
    a_open = op(True, 0)
    a_deliver = op(True, 10, 0)
    b_deliver = op(False, 10, 0)
    b_accept = op(False, 1, 0, 1)
    a_send = op(True, 2, 0, 0x03, 0x00)
    b_consume = op(False, 4, 0, 0x04, 0x00)
    a_fin = op(True, 5, 0)
    b_fin = op(False, 5, 0)
    tick = op(True, 9, 100)
    flow = (a_open + a_deliver + b_accept + b_deliver + a_send + a_deliver + b_consume
            + b_deliver + a_send + a_deliver + a_fin + a_deliver + b_fin + b_deliver)
    return [
        header + flow,
        header + flow + tick + a_deliver + b_deliver + op(False, 8) + b_deliver,
        header + a_open + a_deliver + op(False, 1, 0, 0) + b_deliver,
        header + a_open + a_deliver + b_accept + b_deliver + op(True, 6, 0, 5) + a_deliver,
        header + op(False, 7) + b_deliver + op(True, 8) + a_deliver + tick + tick,
        header + a_open + op(True, 13, 16) + bytes(16),
    ]


def main() -> None:
    run(NAME, TestOneInput, seeds)


if __name__ == "__main__":
    main()
