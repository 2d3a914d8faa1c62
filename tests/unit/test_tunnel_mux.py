"""The sans-IO multiplexer: streams, credit, half close, reset, keepalive, go-away, limits."""

import pytest
from hypothesis import given, settings, strategies as st

from apptunnel.tunnel import frames as F
from apptunnel.tunnel import mux as M
from apptunnel.tunnel.errors import StreamRefused, TunnelLost, TunnelProtocolError
from apptunnel.tunnel.frames import ErrorCode


def pair(**kw):
    return M.Mux(initiator=True, now=0.0, **kw), M.Mux(initiator=False, now=0.0, **kw)


def exchange(a, b, now=0.0, chunk=None):
    """Move bytes both ways until quiet; returns (events at a, events at b)."""
    ea, eb = [], []
    for _ in range(1000):
        wa, wb = a.bytes_to_send(), b.bytes_to_send()
        if not wa and not wb:
            return ea + a.pop_events(), eb + b.pop_events()
        for i in range(0, len(wa), chunk or max(1, len(wa))):
            eb.extend(b.receive(wa[i:i + (chunk or len(wa))], now))
        for i in range(0, len(wb), chunk or max(1, len(wb))):
            ea.extend(a.receive(wb[i:i + (chunk or len(wb))], now))
    raise AssertionError("muxes never went quiet")


def opened(a, b, target=None):
    """Open a stream from a, accept it at b; returns its id."""
    sid = a.open_stream(target or {"app": "x"})
    _, eb = exchange(a, b)
    assert eb == [M.StreamOpened(sid, target or {"app": "x"})]
    assert b.accept(sid)
    ea, _ = exchange(a, b)
    assert ea == [M.StreamAccepted(sid)]
    return sid


def data_of(events, sid):
    return b"".join(e.data for e in events if type(e) is M.DataReceived and e.stream_id == sid)


def frames_of(raw):
    return F.FrameDecoder().feed(raw)


def test_stream_ids_have_parity_and_both_sides_open():
    """The initiator uses odd ids, the responder even ids, and both may open streams."""
    a, b = pair()
    assert [opened(a, b), opened(a, b)] == [1, 3]
    assert [opened(b, a), opened(b, a)] == [2, 4]
    assert a.stream_count == b.stream_count == 4


def test_data_both_ways_and_full_close():
    """Data flows both ways; FIN from each side closes the stream on both."""
    a, b = pair()
    sid = opened(a, b)
    a.send_data(sid, b"ping")
    b.send_data(sid, b"pong")
    ea, eb = exchange(a, b)
    assert data_of(eb, sid) == b"ping" and data_of(ea, sid) == b"pong"
    a.end_stream(sid)
    _, eb = exchange(a, b)
    assert M.StreamEnded(sid) in eb and b.stream_count == 1
    b.send_data(sid, b"after your FIN")  # half close: b can still talk
    ea, _ = exchange(a, b)
    assert data_of(ea, sid) == b"after your FIN"
    b.end_stream(sid)
    ea, eb = exchange(a, b)
    assert M.StreamEnded(sid) in ea and M.StreamClosed(sid) in ea
    assert M.StreamClosed(sid) in eb
    assert a.stream_count == b.stream_count == 0


def test_writes_after_fin_are_refused():
    """After end_stream the stream takes no more data."""
    a, b = pair()
    sid = opened(a, b)
    a.end_stream(sid)
    assert a.send_data(sid, b"late") is False


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.binary(min_size=1, max_size=700)), max_size=30),
       st.integers(1, 500))
def test_interleaved_streams_arrive_intact(writes, chunk):
    """Writes interleaved over four streams, delivered in arbitrary chunks, arrive per stream."""
    a, b = pair(initial_window=4096)
    sids = [opened(a, b) for _ in range(4)]
    got = {sid: [] for sid in sids}
    expected = {sid: b"" for sid in sids}
    for index, payload in writes:
        sid = sids[index]
        a.send_data(sid, payload)
        expected[sid] += payload
        _, eb = exchange(a, b, chunk=chunk)
        for sid2 in sids:
            d = data_of(eb, sid2)
            got[sid2].append(d)
            b.consumed(sid2, len(d))
    for _ in range(20):
        _, eb = exchange(a, b, chunk=chunk)
        for sid2 in sids:
            d = data_of(eb, sid2)
            got[sid2].append(d)
            b.consumed(sid2, len(d))
    assert {sid: b"".join(parts) for sid, parts in got.items()} == expected


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.tuples(st.just("write"), st.integers(1, 5000)),
                          st.tuples(st.just("consume"), st.integers(1, 5000))), max_size=40))
def test_sender_never_exceeds_the_window(ops):
    """Bytes in flight (received but not consumed) never exceed the granted window."""
    window = 3000
    a, b = pair(initial_window=window, max_frame_size=1024)
    sid = opened(a, b)
    unconsumed = 0
    written = received = 0
    for op, n in ops:
        if op == "write":
            a.send_data(sid, b"x" * n)
            written += n
        else:
            take = min(n, unconsumed)
            b.consumed(sid, take)
            unconsumed -= take
        _, eb = exchange(a, b)
        got = len(data_of(eb, sid))
        received += got
        unconsumed += got
        assert unconsumed <= window
        assert a.pending_bytes(sid) == written - received


def test_credit_returned_only_on_consumption():
    """Receiving data sends no WINDOW_UPDATE; consuming half the window does."""
    a, b = pair(initial_window=1000)
    sid = opened(a, b)
    a.send_data(sid, b"x" * 1000)
    exchange(a, b)
    a.send_data(sid, b"y" * 10)
    _, eb = exchange(a, b)
    assert data_of(eb, sid) == b"" and a.pending_bytes(sid) == 10
    assert b.consumed(sid, 499) is False   # below the batching threshold: nothing queued
    assert b.bytes_to_send() == b""
    assert b.consumed(sid, 1) is True      # says so, so the protocol flushes only then
    assert frames_of(b.bytes_to_send()) == [F.WindowUpdate(sid, 500)]


def test_stalled_reader_does_not_stop_other_streams():
    """A stream whose reader never consumes blocks only itself."""
    a, b = pair(initial_window=2048)
    slow, fast = opened(a, b), opened(a, b)
    a.send_data(slow, b"s" * 100_000)
    total = b""
    for _ in range(50):
        a.send_data(fast, b"f" * 1000)
        _, eb = exchange(a, b)
        chunk = data_of(eb, fast)
        b.consumed(fast, len(chunk))
        total += chunk
        assert len(data_of(eb, slow)) <= 2048
    exchange(a, b)
    assert len(total) == 50_000
    assert a.pending_bytes(slow) == 100_000 - 2048


def test_data_beyond_the_window_is_a_flow_control_error():
    """A peer that ignores the window ends the connection with FLOW_CONTROL."""
    a, b = pair(initial_window=100)
    sid = opened(a, b)
    with pytest.raises(TunnelProtocolError) as info:
        b.receive(F.encode(F.Data(sid, b"z" * 101)), 0.0)
    assert info.value.code == ErrorCode.FLOW_CONTROL
    assert frames_of(b.bytes_to_send())[-1].code == ErrorCode.FLOW_CONTROL  # GOAWAY


def test_fin_waits_for_queued_data():
    """A FIN asked for while data waits for credit goes out after that data."""
    a, b = pair(initial_window=100)
    sid = opened(a, b)
    a.send_data(sid, b"q" * 250)
    a.end_stream(sid)
    _, eb = exchange(a, b)
    assert M.StreamEnded(sid) not in eb
    got = data_of(eb, sid)
    for _ in range(5):
        b.consumed(sid, len(got))
        _, eb = exchange(a, b)
        got = data_of(eb, sid)
        if M.StreamEnded(sid) in eb:
            break
    assert M.StreamEnded(sid) in eb


def test_reset_reaches_the_peer_and_late_frames_are_ignored():
    """RESET carries code and reason; frames already in flight for it are ignored."""
    a, b = pair()
    sid = opened(a, b)
    b.send_data(sid, b"in flight")
    in_flight = b.bytes_to_send()
    a.reset(sid, ErrorCode.CONNECT_FAILED, "connection refused")
    assert a.receive(in_flight, 0.0) == []
    _, eb = exchange(a, b)
    assert eb == [M.StreamReset(sid, ErrorCode.CONNECT_FAILED, "connection refused")]
    assert a.stream_count == b.stream_count == 0


def test_refusal_arrives_with_code_and_reason():
    """refuse() answers an OPEN with OPEN_FAIL; the opener sees OpenRefused."""
    a, b = pair()
    sid = a.open_stream({"app": "nope"})
    exchange(a, b)
    b.refuse(sid, ErrorCode.UNKNOWN_TARGET, "no app nope")
    ea, _ = exchange(a, b)
    assert ea == [M.OpenRefused(sid, ErrorCode.UNKNOWN_TARGET, "no app nope")]
    assert a.stream_count == b.stream_count == 0


def test_cancelled_open_is_reset_and_its_answer_ignored():
    """Resetting our unanswered OPEN tells the peer; its late OPEN_OK is ignored."""
    a, b = pair()
    sid = a.open_stream({})
    exchange(a, b)
    b.accept(sid)
    late = b.bytes_to_send()
    a.reset(sid, ErrorCode.CANCEL)
    assert a.receive(late, 0.0) == []
    _, eb = exchange(a, b)
    assert eb == [M.StreamReset(sid, ErrorCode.CANCEL, "")]


@pytest.mark.parametrize("frame, message", [
    (F.Data(9, b"x"), "never opened"),
    (F.WindowUpdate(8, 1), "never opened"),
    (F.Open(2, 10, {}), "our parity"),
    (F.OpenOk(1, 10), "which the peer opened"),
    (F.OpenOk(2, 10), "never opened"),
    (F.Reset(99, 0, ""), "never opened"),
])
def test_frames_for_unknown_streams_are_protocol_errors(frame, message):
    """Frames naming streams that never existed (or with the wrong parity) are fatal."""
    _, b = pair()
    with pytest.raises(TunnelProtocolError, match=message):
        b.receive(F.encode(frame), 0.0)


def test_stream_ids_must_increase():
    """An OPEN reusing an old id is a protocol error."""
    _, b = pair()
    b.receive(F.encode(F.Open(5, 10, {})), 0.0)
    with pytest.raises(TunnelProtocolError, match="not above"):
        b.receive(F.encode(F.Open(3, 10, {})), 0.0)


def test_data_before_acceptance_is_an_error():
    """DATA on a stream the receiver has not accepted yet is a protocol error."""
    _, b = pair()
    b.receive(F.encode(F.Open(1, 10, {})), 0.0)
    with pytest.raises(TunnelProtocolError):
        b.receive(F.encode(F.Data(1, b"early")), 0.0)


def test_pending_opens_are_bounded_both_ways():
    """Beyond max_pending_opens, local opens raise and remote opens are refused."""
    a, b = pair(max_pending_opens=2)
    a.open_stream({})
    a.open_stream({})
    with pytest.raises(StreamRefused) as info:
        a.open_stream({})
    assert info.value.code == ErrorCode.REFUSED
    raw = b"".join(F.encode(F.Open(sid, 10, {})) for sid in (2, 4, 6))
    events = a.receive(raw, 0.0)
    assert len(events) == 2
    assert frames_of(a.bytes_to_send())[-1] == F.OpenFail(6, ErrorCode.REFUSED,
                                                           "too many pending stream opens")


def test_stream_count_is_bounded():
    """Beyond max_streams new streams are refused."""
    a, b = pair(max_streams=2)
    opened(a, b)
    opened(a, b)
    with pytest.raises(StreamRefused):
        a.open_stream({})
    b.receive(F.encode(F.Open(7, 10, {})), 0.0)
    assert frames_of(b.bytes_to_send())[-1].code == ErrorCode.REFUSED


def test_keepalive_pings_after_interval_of_silence():
    """A PING goes out after keepalive_interval without inbound bytes, then every interval."""
    a = M.Mux(initiator=True, now=0.0, keepalive_interval=5, keepalive_timeout=15)
    assert a.next_deadline() == 5
    assert a.tick(4.9) == [] and a.bytes_to_send() == b""
    a.tick(5.0)
    assert type(frames_of(a.bytes_to_send())[0]) is F.Ping
    assert a.next_deadline() == 10
    a.tick(7.0)
    assert a.bytes_to_send() == b""


def test_peer_dead_after_timeout_and_live_peer_kept():
    """No inbound bytes for keepalive_timeout means PeerDead; a PONG keeps the peer alive."""
    a, b = pair(keepalive_interval=5, keepalive_timeout=15)
    for now in (5.0, 10.0, 15.0, 20.0):
        a.tick(now)
        exchange(a, b, now=now)
        assert not a.closed
    assert not [e for e in a.tick(30.0) if type(e) is M.PeerDead]
    assert a.tick(35.0) == [M.PeerDead(15.0)]
    assert a.closed


def test_ping_is_answered_with_the_same_pong():
    """A PING is echoed as a PONG with the same opaque bytes."""
    a, b = pair()
    b.receive(F.encode(F.Ping(b"12345678")), 0.0)
    assert frames_of(b.bytes_to_send()) == [F.Pong(b"12345678")]
    assert a.receive(F.encode(F.Pong(b"12345678")), 0.0) == [M.PongReceived(b"12345678")]


def test_go_away_drains_then_signals():
    """After GOAWAY no stream opens either way; Drained comes once the last one ends."""
    a, b = pair()
    sid = opened(a, b)
    a.go_away(ErrorCode.NO_ERROR, "shutting down")
    _, eb = exchange(a, b)
    assert eb == [M.GoAwayReceived(0, ErrorCode.NO_ERROR, "shutting down")]
    for side in (a, b):
        with pytest.raises(StreamRefused) as info:
            side.open_stream({})
        assert info.value.code == ErrorCode.GOING_AWAY
    a.send_data(sid, b"still works")
    _, eb = exchange(a, b)
    assert data_of(eb, sid) == b"still works"
    a.end_stream(sid)
    b.end_stream(sid)
    ea, eb = exchange(a, b)
    assert M.Drained() in ea and M.Drained() in eb


def test_open_racing_go_away_is_refused():
    """An OPEN arriving after we sent GOAWAY is refused with GOING_AWAY."""
    a, b = pair()
    sid = a.open_stream({})
    b.go_away()
    ea, eb = exchange(a, b)
    assert M.OpenRefused(sid, ErrorCode.GOING_AWAY, "tunnel is going away") in ea
    assert M.Drained() in eb


def test_control_messages_round_trip():
    """CONTROL carries a JSON object; oversized ones are refused locally."""
    a, b = pair()
    a.send_control({"type": "hello", "apps": []})
    _, eb = exchange(a, b)
    assert eb == [M.ControlReceived({"type": "hello", "apps": []})]
    with pytest.raises(ValueError):
        a.send_control({"big": "x" * F.MAX_JSON})


def test_closed_mux_refuses_local_actions():
    """After close() nothing new can be opened or sent."""
    a, _ = pair()
    a.close()
    with pytest.raises(TunnelLost):
        a.open_stream({})
    with pytest.raises(TunnelLost):
        a.send_control({})
    assert a.receive(b"anything", 1.0) == []


def test_consumed_cannot_over_credit():
    """Claiming to consume more than was received never grants more than the window."""
    a, b = pair(initial_window=1000)
    sid = opened(a, b)
    a.send_data(sid, b"x" * 600)
    exchange(a, b)
    b.consumed(sid, 10_000)
    assert frames_of(b.bytes_to_send()) == [F.WindowUpdate(sid, 600)]


def test_window_overflow_is_a_flow_control_error():
    """A WINDOW_UPDATE pushing the window past 2**32-1 is fatal."""
    a, b = pair()
    sid = opened(a, b)
    with pytest.raises(TunnelProtocolError) as info:
        a.receive(F.encode(F.WindowUpdate(sid, F.MAX_U32)), 0.0)
    assert info.value.code == ErrorCode.FLOW_CONTROL


def test_bad_settings_are_rejected():
    """Nonsense limits fail at construction."""
    for kw in ({"max_frame_size": 10}, {"initial_window": 0},
               {"keepalive_interval": 20, "keepalive_timeout": 15}):
        with pytest.raises(ValueError):
            M.Mux(initiator=True, now=0.0, **kw)


def test_blocked_output_bounds_forced_replies():
    """While our socket is full, PINGs go unanswered and an OPEN flood is cut off."""
    a, b = pair(max_pending_opens=1)
    b.set_output_blocked(True)
    b.receive(F.encode(F.Ping(bytes(8))), 0.0)
    assert b.bytes_to_send() == b""
    flood = b"".join(F.encode(F.Open(sid, 10, {})) for sid in range(1, 2 * (M.MAX_BLOCKED_REFUSALS + 3), 2))
    with pytest.raises(TunnelProtocolError, match="without reading"):
        b.receive(flood, 0.0)
    b2 = M.Mux(initiator=False, now=0.0)
    b2.set_output_blocked(True)
    b2.set_output_blocked(False)
    b2.receive(F.encode(F.Ping(bytes(8))), 0.0)
    assert frames_of(b2.bytes_to_send()) == [F.Pong(bytes(8))]


# -- receive credit shared between busy streams -------------------------------------------

def test_shared_window_splits_the_budget_between_busy_streams():
    """One busy stream (or none) gets the whole window; 1,000 get WINDOW_BUDGET / 1,000 each
    (64 KiB), never less than MIN_SHARED_WINDOW, never more than the window."""
    w = M.DEFAULT_WINDOW
    assert M.shared_window(w, 0) == M.shared_window(w, 1) == w
    assert M.shared_window(w, 64) == w
    assert M.shared_window(w, 1000) == M.WINDOW_BUDGET // 1000 == 67108
    assert M.shared_window(w, 100_000) == M.MIN_SHARED_WINDOW
    assert M.shared_window(1000, 100_000) == 1000


@given(st.integers(1, M.MAX_WINDOW), st.integers(0, 10**6), st.integers(0, 10**6))
def test_shared_window_is_bounded_and_shrinks_as_streams_get_busy(window, busy, more):
    got = M.shared_window(window, busy)
    assert min(window, M.MIN_SHARED_WINDOW) <= got <= window
    assert M.shared_window(window, busy + more) <= got


def _busy_pair(monkeypatch, streams, window=256 * 1024):
    monkeypatch.setattr(M, "WINDOW_BUDGET", 1024 * 1024)
    monkeypatch.setattr(M, "MIN_SHARED_WINDOW", 4096)
    a, b = pair(initial_window=window)
    return a, b, [opened(a, b) for _ in range(streams)]


def _pour(a, b, sids, now, rounds=20):
    """a writes 64 KiB per round on each stream; b's reader consumes all it gets."""
    got = dict.fromkeys(sids, 0)
    for _ in range(rounds):
        for sid in sids:
            if a.pending_bytes(sid) < 64 * 1024:
                a.send_data(sid, b"x" * (64 * 1024))
        _, eb = exchange(a, b, now)
        for sid in sids:
            n = len(data_of(eb, sid))
            got[sid] += n
            b.consumed(sid, n)
        exchange(a, b, now)
    return got


def test_busy_streams_share_the_receive_budget_and_a_lone_one_gets_its_whole_window(monkeypatch):
    """16 busy streams with a 1 MiB budget: the receiver keeps each one's credit at 64 KiB,
    and every stream keeps moving. Once the others went quiet (two BUSY_INTERVALs later)
    the one still sending is credited up to its whole window again."""
    a, b, sids = _busy_pair(monkeypatch, 16)
    got = _pour(a, b, sids, now=0.0)
    assert min(got.values()) > 256 * 1024           # all of them moved, past the first window
    assert max(got.values()) <= min(got.values()) + 64 * 1024
    assert max(a.send_window(sid) for sid in sids) <= 64 * 1024
    lone = sids[0]
    t = 2 * M.BUSY_INTERVAL + 0.1
    _pour(a, b, [lone], now=t, rounds=2)
    _pour(a, b, [lone], now=2 * t, rounds=2)
    assert a.send_window(lone) > 64 * 1024           # back above the share...
    assert a.send_window(lone) + a.pending_bytes(lone) >= 64 * 1024
    _pour(a, b, [lone], now=2 * t, rounds=8)
    assert a.send_window(lone) > 128 * 1024          # ...up to the whole window


def test_a_blocked_stream_is_credited_when_its_share_grew_meanwhile(monkeypatch):
    """A stream opened among 16 busy ones gets their share (64 KiB), spends it and waits;
    the others go quiet, so its share is the whole window (256 KiB) when its reader
    consumes the 64 KiB: the update must still come (half the new share would never be
    consumed: the writer cannot send more), and the rest flows."""
    a, b, sids = _busy_pair(monkeypatch, 16)
    _pour(a, b, sids, now=0.0, rounds=3)
    slow = opened(a, b)
    assert a.send_window(slow) == 64 * 1024
    a.send_data(slow, b"y" * (512 * 1024))
    _, eb = exchange(a, b, 0.0)
    held = len(data_of(eb, slow))
    assert held == 64 * 1024 and a.send_window(slow) == 0
    for t in (1.0, 2.0):                 # two intervals with one byte on one other stream
        a.send_data(sids[1], b"z")
        exchange(a, b, t)
    got = held
    for _ in range(20):
        b.consumed(slow, held)
        _, eb = exchange(a, b, 2.0)
        held = len(data_of(eb, slow))
        got += held
        if not held:
            break
    assert got == 512 * 1024


def test_a_stream_opened_among_busy_ones_grows_to_its_whole_window_once_alone(monkeypatch):
    """Opened while 16 streams are busy, a stream gets their share (64 KiB); once it is the
    only one sending, the receiver credits it beyond what it consumed, up to the whole
    window (credit is the receiver's to give, not only to return)."""
    a, b, sids = _busy_pair(monkeypatch, 16)
    _pour(a, b, sids, now=0.0, rounds=3)
    late = opened(a, b)
    assert a.send_window(late) == 64 * 1024
    for t in (1.0, 2.0, 3.0):
        _pour(a, b, [late], now=t, rounds=4)
    a.send_data(late, b"w" * (1024 * 1024))
    _, eb = exchange(a, b, 3.0)
    assert len(data_of(eb, late)) > 2 * 64 * 1024     # well past its old share at once
