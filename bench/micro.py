"""CPU-only, in-process micro benchmarks of single hot-path levers (issue 14).

A shared, noisy machine times whole-path runs badly; the CPU of one mechanism, old way
against new way in one process, is steady. ``python -m bench.micro`` prints microseconds
of CPU per call (and CPU seconds per 10,000 requests) for each pair. A lever whose old code
is no longer in the tree (the HTTP heads: their before figures were measured against
commit e388f12) is timed after only, its before column printed as ``-``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import secrets
import time
import uuid

from twisted.internet import defer

from apptunnel.audit import new_event_id
from apptunnel.audit.chain import canonical, link_line, link_parts
from apptunnel.backend.records import AuditEvent
from apptunnel.proxy import http1
from apptunnel.proxy.app_heads import _app_host_header, _identity_names, forwarded_client_headers
from apptunnel.catalog import AppInfo
from apptunnel.proxy.app_connection import new_request_id
from apptunnel.proxy.eager import run_eagerly
from apptunnel.proxy.headers import valid_host

N = 100_000
_HOSTS = itertools.cycle([b"app%d.example.test:8443" % i for i in range(1000)])


async def _leaf() -> int:
    return 1


async def _route() -> int:
    """Shaped like a cached route(): a few awaits that never wait."""
    return await _leaf() + await _leaf() + await defer.succeed(1)


def _sink(value, tag) -> None:
    pass


def _deferred_route() -> None:
    d = defer.Deferred.fromCoroutine(_route())
    d.addCallback(_sink, None)
    d.addErrback(_sink, None)


def _eager_route() -> None:
    run_eagerly(_route(), _sink, _sink, None)


# -- the audit path of one app.request (reactor thread + SQLite thread) ------------------

_FIELDS = {"method": "GET", "path": "/", "status": 200, "bytes_in": 0, "bytes_out": 6,
           "duration_ms": 1.234, "user": "alice", "app": "hello", "client_ip": "127.0.0.1",
           "request_id": "0123456789abcdef"}
_EVENT = AuditEvent("a" * 32, 1234.5, "app.request", "T2100I", "alice", "hello", "success",
                    _FIELDS)
_OLD_ENCODE = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode
_CHAINED = link_line(_EVENT, "p" * 32, 7, "0" * 64)[0]


def _dump(value) -> str:
    """What the SQLite store does to a fields dict it has no text for."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _audit_before() -> None:
    """Before: the chain encodes the event once (a JSONEncoder.encode per call), the store
    json-dumps its fields again for the row."""
    e = _EVENT
    body = _OLD_ENCODE(["p" * 32, 7, "0" * 64, e.id, e.time, e.type, e.code, e.actor,
                        e.target, e.outcome, e.fields]).encode("ascii")
    digest = hashlib.sha256(body).hexdigest()
    chained = AuditEvent(e.id, e.time, e.type, e.code, e.actor, e.target, e.outcome,
                         e.fields, "p" * 32, 7, "0" * 64, digest)
    _dump(chained.fields)


def _audit_after() -> None:
    """After: link_line encodes the fields once; the store takes that text."""
    chained, _ = link_line(_EVENT, "p" * 32, 7, "0" * 64)
    chained.fields_json or _dump(chained.fields)


_PARTS = ("a" * 32, 1234.5, "app.request", "T2100I", "alice", "hello", "success", _FIELDS)


def _one_record_before() -> None:
    """emit made the event, then link_line made it again with its chain fields."""
    p = _PARTS
    e = AuditEvent(id=p[0], time=p[1], type=p[2], code=p[3], actor=p[4], target=p[5],
                   outcome=p[6], fields=p[7])
    link_line(e, "p" * 32, 7, "0" * 64)


def _canonical_before() -> None:
    """The canonical encoding (audit verify, the journal's check) with JSONEncoder.encode."""
    e = _CHAINED
    _OLD_ENCODE([e.proxy_id, e.seq, e.prev, e.id, e.time, e.type, e.code, e.actor, e.target,
                 e.outcome, e.fields]).encode("ascii")


# -- the HTTP heads of one request (reactor thread) ----------------------------------------

# What a browser sends (wrk sends only Host and the cookie), and nginx's answer.
_REQUEST = (b"GET /index.html?x=1 HTTP/1.1\r\nHost: hello.apptunnel.localhost:8443\r\n"
            b"User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0\r\n"
            b"Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\n"
            b"Accept-Language: en-US,en;q=0.5\r\nAccept-Encoding: gzip, deflate, br\r\n"
            b"Connection: keep-alive\r\nCookie: theme=dark; __Host-apptunnel_app=" + b"x" * 43
            + b"\r\nUpgrade-Insecure-Requests: 1\r\nSec-Fetch-Dest: document\r\n"
            b"Sec-Fetch-Mode: navigate\r\nSec-Fetch-Site: none\r\nSec-Fetch-User: ?1")
_RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Tue, 01 Dec 2026 04:00:00 GMT\r\n"
             b"Content-Type: text/plain\r\nContent-Length: 6\r\nConnection: keep-alive")
_APP = AppInfo("hello", "http://127.0.0.1:8080", public_addr="hello.apptunnel.localhost:8443")
_HEAD = http1.parse_request_head(_REQUEST)
_FORWARDED = http1.RequestHead(_HEAD.method, _HEAD.target, _HEAD.version, http1.Headers(
    list(_HEAD.headers) + [(b"X-Forwarded-For", b"127.0.0.1"), (b"Teleport-Jwt-Assertion", b"t" * 300)]))


def _head_facts_after() -> None:
    """Parse, framing, keep-alive (twice), the upgrade test and the Connection-named set of
    one request."""
    head = http1.parse_request_head(_REQUEST)
    h = head.headers
    http1.RequestReader._framing(head)
    http1.keep_alive(head.version, h)
    http1.keep_alive(head.version, h)
    b"websocket" in h.tokens(b"upgrade") and b"upgrade" in h.tokens(b"connection")
    h.tokens(b"connection")


_OURS = [(b"X-Forwarded-For", b"127.0.0.1"), (b"X-Forwarded-Proto", b"https"),
         (b"X-Forwarded-Host", b"hello.apptunnel.localhost:8443"),
         (b"Teleport-Jwt-Assertion", b"t" * 300)]


def _rewrite_after() -> None:
    forwarded_client_headers(_HEAD.headers, _identity_names("Teleport-Jwt-Assertion", ()),
                             _app_host_header(_APP.uri), _OURS)


# (name, before, after); before None: after only (the old code is not kept).
PAIRS = [
    ("request head", None, lambda: http1.parse_request_head(_REQUEST)),
    ("request facts", None, _head_facts_after),
    ("client rewrite", None, _rewrite_after),
    ("request id", lambda: secrets.token_hex(8), new_request_id),
    ("head to bytes", None, _FORWARDED.to_bytes),
    ("response head", None, lambda: http1.parse_response_head(_RESPONSE)),
    ("route driving", _deferred_route, _eager_route),
    # Before: a Host the cache has not seen (1,000 of them in turn, more than it holds).
    ("valid_host", lambda: valid_host(next(_HOSTS)), lambda: valid_host(b"app.example.test:8443")),
    ("audit event id", lambda: uuid.uuid4().hex, new_event_id),
    ("audit canonical", _canonical_before, lambda: canonical(_CHAINED)),
    ("audit encoded once", _audit_before, _audit_after),
    ("audit one record", _one_record_before, lambda: link_parts(_PARTS, "p" * 32, 7, "0" * 64)),
]


ROUNDS = 10


def _cpu_per_call(fn, n: int) -> float:
    start = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - start) / n


def _before_and_after(before, after) -> tuple[float | None, float]:
    """The best of ROUNDS rounds each, before and after taking turns: on a shared machine a
    busy spell then slows both sides alike, and the best round is the least disturbed.
    ``before`` None: only ``after`` is timed (None for before)."""
    b = a = float("inf")
    for _ in range(ROUNDS):
        if before is not None:
            b = min(b, _cpu_per_call(before, N // ROUNDS))
        a = min(a, _cpu_per_call(after, N // ROUNDS))
    return (None if before is None else b), a


def main() -> None:
    print(f"{'lever':16s} {'before us':>10s} {'after us':>10s} {'saved CPU s/10k req':>20s}")
    for name, before, after in PAIRS:
        b, a = _before_and_after(before, after)
        if b is None:
            print(f"{name:16s} {'-':>10s} {a * 1e6:10.2f} {'-':>20s}")
        else:
            print(f"{name:16s} {b * 1e6:10.2f} {a * 1e6:10.2f} {(b - a) * 1e4:20.4f}")


if __name__ == "__main__":
    main()
