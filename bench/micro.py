"""CPU-only, in-process micro benchmarks of single hot-path levers (issue 14).

A shared, noisy machine times whole-path runs badly; the CPU of one mechanism, old way
against new way in one process, is steady. ``python -m bench.micro`` prints microseconds
of CPU per call (and CPU seconds per 10,000 requests) for each pair.
"""

from __future__ import annotations

import itertools
import time
import uuid

from twisted.internet import defer

from apptunnel.audit import new_event_id
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


PAIRS = [
    ("route driving", _deferred_route, _eager_route),
    # Before: a Host the cache has not seen (1,000 of them in turn, more than it holds).
    ("valid_host", lambda: valid_host(next(_HOSTS)), lambda: valid_host(b"app.example.test:8443")),
    ("audit event id", lambda: uuid.uuid4().hex, new_event_id),
]


def _cpu_per_call(fn) -> float:
    start = time.process_time()
    for _ in range(N):
        fn()
    return (time.process_time() - start) / N


def main() -> None:
    print(f"{'lever':16s} {'before us':>10s} {'after us':>10s} {'saved CPU s/10k req':>20s}")
    for name, before, after in PAIRS:
        b, a = _cpu_per_call(before), _cpu_per_call(after)
        print(f"{name:16s} {b * 1e6:10.2f} {a * 1e6:10.2f} {(b - a) * 1e4:20.4f}")


if __name__ == "__main__":
    main()
