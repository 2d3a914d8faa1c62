"""The per-proxy hash chain (audit/chain.py) and its walk over stored events
(audit/verify.py on the in-memory backend): altered, missing and reordered events are each
named by id and seq; unchained events are counted, not errors."""

from __future__ import annotations

import attrs
import pytest_twisted

from apptunnel.audit.chain import GENESIS, ChainWalk, digest_of, link
from apptunnel.audit.verify import verify_all
from apptunnel.backend.records import AuditEvent
from tests.support.memory import MemoryBackend
from tests.support.waiting import wait


def chain(n: int, proxy: str = "p1") -> list[AuditEvent]:
    out, prev = [], GENESIS
    for i in range(1, n + 1):
        e = link(AuditEvent(f"e{i}" if proxy == "p1" else f"{proxy}-{i}", 100.0 + i, "app.request", "T2100I", "alice", "wiki",
                            "success", {"status": 200, "n": i}), proxy, i, prev)
        out.append(e)
        prev = e.digest
    return out


def walk(events):
    w = ChainWalk("p1")
    by_seq = {e.seq: e for e in events}
    for e in events:
        if not w.feed(e, by_seq.get(w.last_seq + 1) if e.seq > w.last_seq + 1 else None):
            break
    return w


def test_an_intact_chain_walks_to_the_end():
    w = walk(chain(5))
    assert w.problem is None and w.count == 5 and w.last_seq == 5


def test_every_stored_field_is_in_the_digest():
    e = chain(1)[0]
    for change in ({"time": 100.5}, {"type": "user.login"}, {"code": "T2100W"},
                   {"actor": "mallory"}, {"target": "x"}, {"outcome": "failure"},
                   {"fields": {"status": 500, "n": 1}}, {"proxy_id": "p2"}, {"seq": 2},
                   {"prev": "1" * 64}, {"id": "other"}):
        assert digest_of(attrs.evolve(e, digest="", **change)) != e.digest, change


def test_an_altered_event_is_named():
    events = chain(5)
    events[2] = attrs.evolve(events[2], actor="mallory")
    p = walk(events).problem
    assert (p.kind, p.id, p.seq) == ("altered", "e3", 3)


def test_a_deleted_event_is_named_by_the_one_after_the_gap():
    events = chain(5)
    del events[2]
    p = walk(events).problem
    assert (p.kind, p.id, p.seq) == ("missing", "e4", 4) and "seq 3" in p.detail


def test_a_moved_event_is_reordered_not_missing():
    events = chain(5)
    events.append(events.pop(1))       # e2 stored after e5
    p = walk(events).problem
    assert (p.kind, p.id, p.seq) == ("reordered", "e2", 2) and "seq 3 (e3)" in p.detail


def test_a_recomputed_digest_still_breaks_the_link():
    """Forging one event with a fresh digest: its successor's prev no longer matches."""
    events = chain(4)
    forged = attrs.evolve(events[1], actor="mallory", digest="")
    events[1] = attrs.evolve(forged, digest=digest_of(forged))
    p = walk(events).problem
    assert (p.kind, p.id, p.seq) == ("altered", "e3", 3)


@pytest_twisted.ensureDeferred
async def test_verify_all_reports_unchained_and_each_proxy():
    backend = MemoryBackend()
    old = AuditEvent("old", 1.0, "user.login", "T1000I", "a", "", "success", {})
    a, b = chain(30, "pa"), chain(3, "pb")
    b[1] = attrs.evolve(b[1], target="elsewhere")
    await wait(backend.append_audit([old, *a, *b]))
    report = await wait(verify_all(backend))
    assert report.unchained == 1 and not report.intact
    by_proxy = {c.proxy_id: c for c in report.chains}
    assert by_proxy["pa"].problem is None and by_proxy["pa"].events == 30
    assert (by_proxy["pb"].problem.id, by_proxy["pb"].problem.seq) == ("pb-2", 2)
    only = await wait(verify_all(backend, "pa"))
    assert only.intact and [c.proxy_id for c in only.chains] == ["pa"]
