"""The diagnostics listener of the proxy and the agent: /metrics, /healthz, /readyz.

Plain HTTP on ``diag_addr`` (loopback by default), for Prometheus and a load balancer's
health checks. ``Readiness`` is also what the web port's /readyz answers, so both give
the same JSON: ``{"status": "ok" | "unavailable", "checks": {name: "ok" | problem}}``.
Problems are fixed words ("failing", "timeout"), never an error's text: the web port is
public and an error can name hosts or files.

A check is a zero-argument callable returning None (fine) or a problem word, or an
awaitable of one. Each runs under ``timeout`` on the clock; one whose previous run has
not finished yet is not started again (a hung database must not collect a thread per
health check), its callers share the running one.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from apptunnel.metrics import CONTENT_TYPE, render
from apptunnel.net import loopback_host
from apptunnel.proxy.web_channel import WebSite

log = Logger()

CHECK_TIMEOUT = 3.0
# Heads slower than this and connections idle longer are closed: scrapers are quick.
DIAG_HEAD_TIMEOUT = 5.0
DIAG_IDLE_TIMEOUT = 30.0

OK = "ok"
FAILING = "failing"
TIMEOUT = "timeout"

HEALTHY_BODY = {"status": "ok"}


class _OneAtATime:
    """Runs ``check`` unless a previous run is still going; every caller gets its own Deferred."""

    def __init__(self, check: Callable[[], Any]) -> None:
        self._check = check
        self._running: defer.Deferred | None = None
        self._waiters: list[defer.Deferred] = []

    def __call__(self) -> defer.Deferred:
        mine: defer.Deferred = defer.Deferred()
        self._waiters.append(mine)
        if self._running is None:
            running = defer.maybeDeferred(self._check)
            running.addCallback(lambda r: defer.ensureDeferred(r) if inspect.isawaitable(r) else r)
            self._running = running
            running.addBoth(self._done)
        return mine

    def _done(self, result: Any) -> None:
        self._running = None
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if waiter.called:      # timed out meanwhile
                continue
            if isinstance(result, Failure):
                waiter.callback(FAILING)
            else:
                waiter.callback(result)


class Readiness:
    """Named checks; ``check()`` answers (ready, body) with one word per check."""

    def __init__(self, clock, checks: dict[str, Callable[[], Any]],
                 timeout: float = CHECK_TIMEOUT) -> None:
        self._clock = clock
        self._checks = {name: _OneAtATime(check) for name, check in checks.items()}
        self._timeout = timeout

    async def check(self) -> tuple[bool, dict]:
        names = sorted(self._checks)
        runs = [self._run(self._checks[name]) for name in names]
        results = await defer.gatherResults(runs, consumeErrors=True)
        checks = {name: (result or OK) for name, result in zip(names, results)}
        ready = all(word == OK for word in checks.values())
        return ready, {"status": "ok" if ready else "unavailable", "checks": checks}

    def _run(self, check: _OneAtATime) -> defer.Deferred:
        d = check()
        d.addTimeout(self._timeout, self._clock, onTimeoutCancel=lambda *_: TIMEOUT)
        d.addErrback(lambda _: FAILING)
        return d


def readiness_response(request, ready: bool, body: dict) -> bytes:
    """Write the status and headers of a /readyz answer; returns the body."""
    request.setResponseCode(200 if ready else 503)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Cache-Control", b"no-store")
    return json.dumps(body, sort_keys=True).encode("utf-8")


class _Metrics(Resource):
    isLeaf = True

    def __init__(self, registry) -> None:
        super().__init__()
        self._registry = registry

    def render_GET(self, request) -> bytes:
        request.setHeader(b"Content-Type", CONTENT_TYPE.encode("ascii"))
        request.setHeader(b"Cache-Control", b"no-store")
        return render(self._registry)


class _Healthz(Resource):
    isLeaf = True

    def render_GET(self, request) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Cache-Control", b"no-store")
        return json.dumps(HEALTHY_BODY).encode("utf-8")


class _Readyz(Resource):
    isLeaf = True

    def __init__(self, readiness: Readiness) -> None:
        super().__init__()
        self._readiness = readiness

    def render_GET(self, request):
        gone = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def answer(result: tuple[bool, dict]) -> None:
            if gone:
                return
            request.write(readiness_response(request, *result))
            request.finish()

        d = defer.ensureDeferred(self._readiness.check())
        d.addErrback(_not_ready)
        d.addCallback(answer)
        return NOT_DONE_YET


def _not_ready(failure: Failure) -> tuple[bool, dict]:
    log.failure("readiness check failed", failure)
    return False, {"status": "unavailable", "checks": {}}


class DiagSite(WebSite):
    """The diagnostics HTTP site: short head deadline, short idle timeout, no access log."""

    def __init__(self, registry, readiness: Readiness) -> None:
        root = Resource()                  # any other path: 404
        root.putChild(b"metrics", _Metrics(registry))
        root.putChild(b"healthz", _Healthz())
        root.putChild(b"readyz", _Readyz(readiness))
        super().__init__(root, head_timeout=DIAG_HEAD_TIMEOUT, timeout=DIAG_IDLE_TIMEOUT)
        self.displayTracebacks = False

    def log(self, request) -> None:
        """Scrapes every few seconds would drown the log; the diag listener logs nothing."""


def diag_endpoint(reactor, addr: str):
    """The server endpoint for a ``diag_addr`` the config already checked (host:port)."""
    host, _, port = addr.rpartition(":")
    host = loopback_host(host.strip("[]"))
    endpoint = TCP6ServerEndpoint if ":" in host else TCP4ServerEndpoint
    return endpoint(reactor, int(port), interface=host)


def listener_check(listeners) -> Callable[[], str | None]:
    """A readiness check: every port of ``listeners`` (``startup.Listeners``) is bound."""
    return lambda: None if listeners.up else FAILING
