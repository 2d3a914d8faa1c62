"""The audit journal (audit/journal.py) and AuditLog with it, on a Clock: every emitted event
is on disk when emit returns, replayed at the next start (idempotently) and trimmed once
committed; a torn last line is skipped with one log line; nothing is dropped when the
backend fails; audit.on_failure refuses or holds while neither can take more."""

from __future__ import annotations

import json
import os
import stat

import attrs
import pytest
import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import succeed

from apptunnel.audit import AuditLog
from apptunnel.audit.chain import GENESIS, link
from apptunnel.audit.journal import Journal, JournalFull, encode, parse_line, read_segment
from apptunnel.audit.verify import verify_all
from apptunnel.backend.records import AuditEvent
from tests.support.audit_log import backend, capture, clock  # noqa: F401 - fixtures
from tests.support.waiting import wait


def inline(fn, *args):
    """run_in_thread for a Clock: the fsync runs at once."""
    fn(*args)
    return succeed(None)


def event(i: int, prev: str = GENESIS, **fields) -> AuditEvent:
    return link(AuditEvent(f"id{i}", 1000.0 + i, "app.request", "T2100I", "alice", "wiki",
                           "success", {"n": i, **fields}), "px", i, prev)


def make_log(backend, clock, directory, **kw):
    bound = kw.pop("max_bytes", 1 << 20)
    journal, held = Journal.open(str(directory), bound, kw.pop("segment_bytes", 4096))
    audit = AuditLog(backend, clock, proxy_id="px", journal=journal, run_in_thread=inline, **kw)
    return audit, held


# -- the line format ---------------------------------------------------------------------

def test_a_line_round_trips_and_is_checked_by_its_digest():
    e = event(1, path="/ü", ratio=0.1)
    line = encode(e)
    assert line.endswith(b"\n") and parse_line(line[:-1]) == e
    assert parse_line(line.replace(b"alice", b"alicf")) is None     # altered on disk
    assert parse_line(line[:-5]) is None                            # torn


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_garbage_is_never_an_event_and_never_raises(data):
    assert parse_line(data) is None
    events, bad, torn = read_segment(data)
    assert events == []


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                     | st.text(max_size=10),
                     lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_JSON, min_size=11, max_size=13))
def test_well_formed_json_of_the_wrong_shape_is_not_an_event(values):
    """Arrays of the right length with any types (or a forged digest) never parse."""
    assert parse_line(json.dumps(values).encode()) is None


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(min_value=1, max_value=6), st.integers(min_value=0, max_value=400),
       st.binary(max_size=40))
def test_a_cut_or_garbled_tail_loses_only_the_tail(n, cut, junk):
    """Whole lines before a torn write are all read back; the torn part is never an event."""
    # JSON allows whitespace after a value: a line cut just before its newline and followed
    # by junk that starts with " \n" is whole again and rightly read (this flaked).
    junk = junk.lstrip(b" \t\r")
    events, prev = [], GENESIS
    for i in range(1, n + 1):
        events.append(event(i, prev))
        prev = events[-1].digest
    data = b"".join(encode(e) for e in events)
    whole = data[:max(0, len(data) - cut)]
    got, bad, torn = read_segment(whole + junk)
    written = whole + junk
    intact = [e for i, e in enumerate(events)
              if written.startswith(b"".join(encode(x) for x in events[:i + 1]))]
    assert got == intact      # every line that survived whole, nothing else


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(st.text(max_size=30), st.integers(), st.floats(allow_nan=False),
                          st.booleans(), st.none()), max_size=5))
def test_any_plain_field_values_round_trip(values):
    e = event(1, **{f"k{i}": v for i, v in enumerate(values)})
    assert parse_line(encode(e)) == e


# -- the journal on disk ---------------------------------------------------------------

def test_files_are_private_and_segments_rotate_and_trim(tmp_path):
    journal, held = Journal.open(str(tmp_path / "j"), 1 << 20, 1000)
    assert held.events == [] and stat.S_IMODE(os.stat(tmp_path / "j").st_mode) == 0o700
    prev = GENESIS
    for i in range(1, 31):
        e = event(i, prev)
        prev = e.digest
        journal.append(e)
    names = sorted(os.listdir(tmp_path / "j"))
    assert len(names) > 3
    assert all(stat.S_IMODE(os.stat(tmp_path / "j" / n).st_mode) == 0o600 for n in names)
    size = journal.size
    assert size == sum(os.path.getsize(tmp_path / "j" / n) for n in names)
    journal.committed(15)
    assert journal.size < size and len(os.listdir(tmp_path / "j")) < len(names)
    journal.committed(30)
    assert journal.size == 0
    journal.close()
    assert os.listdir(tmp_path / "j") == []


def test_the_bound_raises_journal_full(tmp_path):
    journal, _ = Journal.open(str(tmp_path / "j"), 1000, 4096)
    with pytest.raises(JournalFull):
        for i in range(1, 100):
            journal.append(event(i))
    assert journal.size <= 1000
    journal.close()


# -- AuditLog with the journal -----------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_an_event_is_on_disk_when_emit_returns_and_replays_after_a_crash(
        backend, clock, tmp_path):
    """No flush, no stop (a kill -9): the next start replays every event into the backend,
    the chain continues after them, and a second replay stores nothing twice."""
    audit, held = make_log(backend, clock, tmp_path / "j")
    await wait(audit.recover(held))
    for i in range(50):
        audit.emit("app.request", actor="alice", request_id=f"r{i}")
    assert backend.batches == []            # nothing reached the backend

    again, held = make_log(backend, clock, tmp_path / "j")      # the "restarted" proxy
    assert len(held.events) == 50
    logged = capture(again)
    await wait(again.recover(held))
    again.emit("app.request", request_id="after")
    await wait(again.flush())
    stored = await wait(backend.search_audit(limit=100))
    assert [e.fields["request_id"] for e in stored] == [f"r{i}" for i in range(50)] + ["after"]
    assert [e.seq for e in stored] == list(range(1, 52))
    assert (await wait(verify_all(backend))).intact
    assert any("replaying" in e["log_format"] for e in logged)
    assert again.journal_size == 0          # committed: trimmed

    third, held = make_log(backend, clock, tmp_path / "j")   # nothing left to replay
    await wait(third.recover(held))
    assert held.events == [] and len(await wait(backend.search_audit(limit=100))) == 51


@pytest_twisted.ensureDeferred
async def test_a_torn_last_line_is_ignored_with_one_log_line(backend, clock, tmp_path):
    audit, held = make_log(backend, clock, tmp_path / "j")
    await wait(audit.recover(held))
    for i in range(3):
        audit.emit("user.login", actor=f"u{i}")
    [segment] = os.listdir(tmp_path / "j")
    with open(tmp_path / "j" / segment, "ab") as f:
        f.write(b'["px",4,"abc","id')          # the crash cut this write
    again, held = make_log(backend, clock, tmp_path / "j")
    logged = capture(again)
    await wait(again.recover(held))
    await wait(again.flush())
    assert [e.actor for e in await wait(backend.search_audit())] == ["u0", "u1", "u2"]
    torn = [e for e in logged if "torn" in e["log_format"]]
    assert len(torn) == 1 and not [e for e in logged if "unreadable" in e["log_format"]]


@pytest_twisted.ensureDeferred
async def test_the_chain_continues_from_the_backend_across_restarts(backend, clock, tmp_path):
    audit, held = make_log(backend, clock, tmp_path / "a")
    await wait(audit.recover(held))
    audit.emit("user.login")
    await wait(audit.stop())
    again, held = make_log(backend, clock, tmp_path / "b")      # an empty journal
    await wait(again.recover(held))
    again.emit("user.login")
    await wait(again.stop())
    assert [e.seq for e in await wait(backend.search_audit())] == [1, 2]
    assert (await wait(verify_all(backend))).intact


@pytest_twisted.ensureDeferred
async def test_events_emitted_before_recover_are_chained_after_the_stored_head(
        backend, clock, tmp_path):
    audit, held = make_log(backend, clock, tmp_path / "a")
    await wait(audit.recover(held))
    audit.emit("user.login")
    await wait(audit.stop())
    again, held = make_log(backend, clock, tmp_path / "b")
    again.emit("agent.hello")                    # during start-up, before recover
    assert again.pending == 1
    await wait(again.recover(held))
    await wait(again.stop())
    assert [(e.type, e.seq) for e in await wait(backend.search_audit())] == [
        ("user.login", 1), ("agent.hello", 2)]
    assert (await wait(verify_all(backend))).intact


@pytest_twisted.ensureDeferred
async def test_fsync_runs_off_the_reactor_in_batches(backend, clock, tmp_path):
    calls = []

    def thread(fn, *args):
        calls.append(args)
        return succeed(fn(*args))

    journal, held = Journal.open(str(tmp_path / "j"))
    audit = AuditLog(backend, clock, proxy_id="px", journal=journal, run_in_thread=thread)
    await wait(audit.recover(held))
    audit.start()
    for _ in range(100):
        audit.emit("app.request")
    assert calls == []                      # never per event
    clock.advance(1.0)
    assert len(calls) == 1
    await wait(audit.stop())


@pytest_twisted.ensureDeferred
async def test_refuse_when_backend_fails_and_journal_is_full_then_recover(
        backend, clock, tmp_path):
    """on_failure=refuse: admitted() is False at once with one log line; every event is
    still kept (memory, then backend); admission comes back by itself."""
    backend.fail = 10 ** 6
    audit, held = make_log(backend, clock, tmp_path / "j", max_bytes=4096)
    await wait(audit.recover(held))
    audit.start()
    logged = capture(audit)
    n = 0
    while audit.writable and n < 1000:
        audit.emit("app.request", n=n)
        n += 1
        clock.advance(0.05)
    assert not audit.writable and n < 1000
    assert [await wait(audit.admitted()) for _ in range(3)] == [False, False, False]
    audit.emit("app.request", n=n)        # an in-flight request's event: kept in memory
    refusing = [e for e in logged if "not writable" in e["log_format"]]
    assert len(refusing) == 1
    backend.fail = 0
    clock.advance(1.0)
    await wait(audit.flush())
    assert audit.writable and await wait(audit.admitted()) is True
    assert len(await wait(backend.search_audit(limit=5000))) == n + 1
    assert (await wait(verify_all(backend))).intact
    await wait(audit.stop())


@pytest_twisted.ensureDeferred
async def test_block_holds_until_writable_or_times_out(backend, clock, tmp_path):
    backend.fail = 10 ** 6
    audit, held = make_log(backend, clock, tmp_path / "j", max_bytes=4096,
                           on_failure="block", block_timeout=5.0)
    await wait(audit.recover(held))
    audit.start()
    while audit.writable:
        audit.emit("app.request", pad="x" * 200)
        clock.advance(0.1)
    first, second = audit.admitted(), None
    results = []
    first.addCallback(results.append)
    clock.advance(5.0)
    assert results == [False]               # bounded by block_timeout
    second = audit.admitted()
    second.addCallback(results.append)
    clock.advance(2.0)
    assert results == [False]
    backend.fail = 0
    clock.advance(1.0)
    await wait(audit.flush())
    assert results == [False, True]
    await wait(audit.stop())


@pytest_twisted.ensureDeferred
async def test_enospc_keeps_events_and_the_journal_is_retried(backend, clock, tmp_path,
                                                             monkeypatch):
    """A write error (ENOSPC) is one line; the event stays queued; once the disk takes
    writes the queued events go into the journal in order."""
    backend.fail = 10 ** 6
    audit, held = make_log(backend, clock, tmp_path / "j")
    await wait(audit.recover(held))
    logged = capture(audit)
    real = os.write
    monkeypatch.setattr(os, "write", lambda fd, b: (_ for _ in ()).throw(OSError(28, "No space")))
    audit.emit("app.request", n=1)
    audit.emit("app.request", n=2)
    await wait(audit.flush())               # the backend fails too
    assert audit.pending == 2 and not audit.writable
    assert len([e for e in logged if "cannot take more" in e["log_format"]]) == 1
    monkeypatch.setattr(os, "write", real)
    audit.start()
    clock.advance(1.0)
    assert audit.writable
    _, held = Journal.open(str(tmp_path / "j"))
    assert [e.fields["n"] for e in held.events] == [1, 2]


def test_line_is_the_canonical_json_with_the_digest():
    e = event(7)
    assert json.loads(encode(e))[-1] == e.digest and json.loads(encode(e))[1] == 7
    assert attrs.evolve(e, digest="").digest == ""
