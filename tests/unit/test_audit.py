"""AuditLog: queued emit, batched writes on the clock, search (the JSON mirror, written on
a thread: tests/integration/test_audit.py)."""

from __future__ import annotations

import pytest_twisted

from apptunnel.audit import AuditLog, code_for
from tests.support.audit_log import backend, capture, clock  # noqa: F401 - fixtures
from tests.support.waiting import wait


def test_codes_table():
    """Types map to the documented codes; failures get the W code."""
    assert code_for("user.login", "success") == "T1000I"
    assert code_for("user.login", "failure") == "T1000W"
    assert code_for("access.denied", "failure") == "T2200W"
    assert code_for("agent.join", "failure") == "T3100W"
    assert code_for("resource.delete", "success") == "T4101I"
    assert code_for("no.such.type", "success") == "T0000I"


@pytest_twisted.ensureDeferred
async def test_emit_does_not_touch_backend(backend, clock):
    """emit only queues: nothing reaches the backend until the loop or flush runs."""
    audit = AuditLog(backend, clock)
    audit.emit("user.login", actor="alice", method="password")
    assert backend.batches == [] and audit.pending == 1
    assert await wait(backend.search_audit()) == []
    await wait(audit.flush())
    assert audit.pending == 0
    (event,) = await wait(backend.search_audit())
    assert (event.type, event.code, event.actor, event.outcome, event.time) == (
        "user.login", "T1000I", "alice", "success", 5000.0)
    assert event.fields == {"method": "password"} and len(event.id) == 32


@pytest_twisted.ensureDeferred
async def test_background_loop_writes_batches(backend, clock):
    """With start(), each clock interval writes the queue in batches of batch_size."""
    audit = AuditLog(backend, clock, batch_size=500, interval=1.0)
    audit.start()
    for i in range(1200):
        audit.emit("app.request", actor="alice", target="grafana", status=200, n=i)
    clock.advance(0.5)
    assert backend.batches == []
    clock.advance(0.5)
    await wait(audit.flush())
    assert backend.batches == [500, 500, 200]
    stored = await wait(backend.search_audit(limit=5000))
    assert [e.fields["n"] for e in stored] == sorted(e.fields["n"] for e in stored)
    assert len({e.id for e in stored}) == 1200
    await wait(audit.stop())


@pytest_twisted.ensureDeferred
async def test_stop_flushes(backend, clock):
    """stop() writes what is still queued."""
    audit = AuditLog(backend, clock)
    audit.start()
    audit.emit("token.create", actor="admin")
    await wait(audit.stop())
    assert [e.code for e in await wait(backend.search_audit())] == ["T3000I"]


@pytest_twisted.ensureDeferred
async def test_search_by_type_and_since(backend, clock):
    """search() flushes first and filters by type and time."""
    audit = AuditLog(backend, clock)
    audit.emit("user.login", actor="alice")
    clock.advance(60)
    audit.emit("user.login", actor="bob")
    audit.emit("app.request", actor="bob")
    logins = await wait(audit.search(type="user.login"))
    assert [e.actor for e in logins] == ["alice", "bob"]
    recent = await wait(audit.search(since=5030.0))
    assert [e.type for e in recent] == ["user.login", "app.request"]
    assert [e.actor for e in await wait(audit.search(until=5030.0))] == ["alice"]


@pytest_twisted.ensureDeferred
async def test_nothing_is_dropped_however_many_are_queued(backend, clock):
    """Issue 13: no queue bound drops the oldest events (the journal bounds what waits)."""
    audit = AuditLog(backend, clock)
    for i in range(100_001):
        audit.emit("app.request", n=i)
    assert audit.pending == audit.queue_depth == 100_001
    await wait(audit.flush())
    assert audit.pending == 0 and sum(backend.batches) == 100_001


@pytest_twisted.ensureDeferred
async def test_persistent_failure_keeps_the_batch_and_retries_in_order(backend, clock):
    """Issue 13: a refused batch is never dropped; it is retried first, one error line for
    the whole outage and one line when the backend takes writes again."""
    backend.fail = 5
    audit = AuditLog(backend, clock)
    logged = capture(audit)
    audit.emit("user.delete", target="x")
    for _ in range(5):
        await wait(audit.flush())
        assert audit.pending == 1
    audit.emit("user.delete", target="y")
    await wait(audit.flush())
    assert [e.target for e in await wait(backend.search_audit())] == ["x", "y"]
    errors = [e for e in logged if e["log_level"].name == "error"]
    assert len(errors) == 1 and "nothing is dropped" in errors[0]["log_format"]
    assert any("takes writes again" in e["log_format"] for e in logged)


@pytest_twisted.ensureDeferred
async def test_emit_never_raises_on_odd_fields(backend, clock):
    """Unserializable field values are stored as strings instead of failing the batch."""
    audit = AuditLog(backend, clock)
    audit.emit("resource.create", actor=None, target=42, blob=b"\x00", obj=object(),
               nested={"k": {1, 2}.__class__.__name__})
    await wait(audit.flush())
    (event,) = await wait(backend.search_audit())
    assert event.actor == "None" and event.target == "42"
    assert event.fields["blob"] == "b'\\x00'" and event.fields["obj"].startswith("<object")



def test_event_ids_are_unique_and_shaped_like_before():
    """The store keeps the first event of an id: two events with one id would lose one.
    (Between processes the ids differ by a random 64-bit prefix per process.)"""
    import re

    from apptunnel.audit import new_event_id
    ids = [new_event_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert len({i[:16] for i in ids}) == 1 and len({i[16:] for i in ids}) == len(ids)
