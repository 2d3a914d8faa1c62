"""Run a routing coroutine without a Deferred when it never waits.

Most requests on a keep-alive connection are decided from caches: the session, the
decision and the JWT are already known, so the router's coroutine finishes on its first
step. ``Deferred.fromCoroutine`` would still build a Deferred, an inlineCallbacks driver and
a copied context for it, per request. ``run_eagerly`` steps the coroutine once itself and
only hands it to a Deferred when it really waits (a backend read, an audit drain).
The outcome reaches the same callback and errback either way, at the same moment.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure


def run_eagerly(coro: Coroutine, callback: Callable[..., Any],
                errback: Callable[..., Any], *args: Any) -> None:
    """``callback(result, *args)`` or ``errback(failure, *args)``: now if coro never waits."""
    try:
        waiting = coro.send(None)
    except StopIteration as done:
        try:
            callback(done.value, *args)
        except Exception:
            errback(Failure(), *args)
        return
    except Exception:
        errback(Failure(), *args)
        return
    d = defer.Deferred.fromCoroutine(_resume(coro, waiting))
    d.addCallback(callback, *args)
    d.addErrback(errback, *args)


async def _resume(coro: Coroutine, waiting: Any) -> Any:
    """Carry on a coroutine suspended on ``waiting`` (what it yielded) to its end."""
    while True:
        try:
            value = (await waiting) if isinstance(waiting, defer.Deferred) else waiting
        except Exception as failed:
            step = coro.throw, failed
        else:
            step = coro.send, value
        try:
            waiting = step[0](step[1])
        except StopIteration as done:
            return done.value
