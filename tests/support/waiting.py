"""Bounded waits for tests on the real reactor: a stuck thread or socket fails the test
instead of hanging the run."""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet import defer, reactor, task, threads

TIMEOUT = 10.0
THREAD_TIMEOUT = 15.0


def wait(d, timeout: float = TIMEOUT) -> defer.Deferred:
    """A Deferred or coroutine, failed with TimeoutError after `timeout` seconds."""
    return defer.ensureDeferred(d).addTimeout(timeout, reactor)


async def until(predicate: Callable[[], Any], what: str, timeout: float = TIMEOUT) -> Any:
    """Poll `predicate` on the reactor and return its first true value; fail naming `what`
    after `timeout` seconds."""
    deadline = reactor.seconds() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await task.deferLater(reactor, 0.01)


async def in_thread(function, *args, **kwargs):
    """Run blocking client code off the reactor, bounded."""
    return await threads.deferToThread(function, *args, **kwargs).addTimeout(THREAD_TIMEOUT, reactor)
