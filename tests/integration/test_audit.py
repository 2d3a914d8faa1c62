"""AuditLog's JSON-lines mirror, which appends to its file on Twisted's thread pool.
(Queueing, batches on the clock and search: tests/unit/test_audit.py.)"""

from __future__ import annotations

import json
import os
import stat

import attrs
import pytest_twisted

from apptunnel.audit import AuditLog
from apptunnel.backend.records import AuditEvent
from tests.support.audit_log import backend, capture, clock  # noqa: F401 - fixtures
from tests.support.waiting import wait


@pytest_twisted.ensureDeferred
async def test_json_mirror(backend, clock, tmp_path):
    """The JSON-lines mirror gets one object per event, in order, in a 0600 file."""
    path = str(tmp_path / "audit.jsonl")
    audit = AuditLog(backend, clock, json_file=path, batch_size=2)
    audit.emit("user.login", actor="alice", outcome="failure", reason="bad password")
    clock.advance(1)
    audit.emit("session.web.start", actor="alice")
    audit.emit("access.denied", actor="alice", target="prod-db", outcome="failure")
    await wait(audit.flush())
    with open(path) as f:
        lines = [json.loads(line) for line in f]
    assert [(d["type"], d["code"], d["time"]) for d in lines] == [
        ("user.login", "T1000W", 5000.0),
        ("session.web.start", "T2000I", 5001.0),
        ("access.denied", "T2200W", 5001.0),
    ]
    assert lines[0]["fields"] == {"reason": "bad password"}
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


@pytest_twisted.ensureDeferred
async def test_backend_failure_is_retried_without_duplicates(backend, clock, tmp_path):
    """A failed batch is retried on the next tick, stored once and mirrored once."""
    backend.fail = 1
    path = str(tmp_path / "audit.jsonl")
    audit = AuditLog(backend, clock, json_file=path)
    logged = capture(audit)
    audit.start()
    audit.emit("user.create", actor="admin", target="carol")
    clock.advance(1)
    await wait(audit.flush())
    assert backend.batches == [1, 1]
    assert [e.target for e in await wait(backend.search_audit())] == ["carol"]
    with open(path) as f:
        assert len(f.readlines()) == 1
    assert any("nothing is dropped" in e["log_format"] for e in logged)
    await wait(audit.stop())


@pytest_twisted.ensureDeferred
async def test_the_mirror_lines_are_the_record_without_the_cached_text(backend, clock, tmp_path):
    """A chained event's mirror line has the record's fields and nothing more."""
    path = str(tmp_path / "audit.jsonl")
    audit = AuditLog(backend, clock, json_file=path, proxy_id="p1")
    await wait(audit.recover())
    audit.emit("app.request", actor="alice", target="wiki", status=200)
    await wait(audit.flush())
    with open(path) as f:
        (line,) = [json.loads(text) for text in f]
    assert sorted(line) == sorted(a.name for a in attrs.fields(AuditEvent)
                                  if a.name != "fields_json")
    assert (line["fields"], line["seq"], line["proxy_id"]) == ({"status": 200}, 1, "p1")
