"""Prometheus metrics: what the proxy and the agent count, and what they read at scrape time.

Each process object owns its own ``CollectorRegistry`` (never the global one), so tests can
run several proxies in one interpreter. Two kinds of numbers:

- counters and histograms moved on the hot path by one-line hooks (``request``,
  ``login``, ``refused``, ``backend_call``); their label children are cached per label
  value so a request costs a dict lookup, an ``inc`` and an ``observe``;
- gauges read from public state when Prometheus scrapes (tunnels and streams per agent,
  tunnel round-trip time, audit queue depth): nothing is paid between scrapes.

Label values are bounded: app names come from registration, codes are ints clamped to
100-599, methods, outcomes, reasons and operations are our own words. A value chosen by a
client (a path, an unknown Host) is never a label.

Code that is handed no metrics object gets ``NO_METRICS``, which does nothing, so unit tests
need nothing.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily

from apptunnel.backend.base import StorageUnavailable

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Request latency through the proxy: from the head read to the response's end.
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Storage calls: SQLite answers in well under a millisecond, PostgreSQL over the network.
BACKEND_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)


def status_label(code: int) -> int:
    """An HTTP status as a bounded label: 100-599, anything else (0: no response) is 0."""
    return code if 100 <= code <= 599 else 0


class NoMetrics:
    """Every hook, doing nothing: the default wherever no metrics object is passed in."""

    def request(self, app: str, code: int, seconds: float) -> None:
        pass

    def login(self, method: str, outcome: str) -> None:
        pass

    def refused(self, reason: str) -> None:
        pass

    def backend_call(self, operation: str, seconds: float) -> None:
        pass

    def backend_unavailable(self, operation: str) -> None:
        pass

    def upstream_error(self, app: str) -> None:
        pass

    def renewal(self, outcome: str) -> None:
        pass


NO_METRICS = NoMetrics()


class _Scraped:
    """A collector that asks ``read()`` for metric families each time it is scraped."""

    def __init__(self, read: Callable[[], Iterable[Any]]) -> None:
        self._read = read

    def collect(self):
        return self._read()

    def describe(self):
        return []   # families vary with what is connected: never checked at registration


def _process_collectors(registry: CollectorRegistry) -> None:
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)


def render(registry: CollectorRegistry) -> bytes:
    """The text exposition of ``registry`` (what GET /metrics answers)."""
    return generate_latest(registry)


class ProxyMetrics(NoMetrics):
    """The proxy's metrics. ``tunnels`` and ``audit_pending`` are read at scrape time.

    ``tunnels()`` yields ``(agent_id, stream_count, rtt_or_None)`` for every live tunnel;
    ``tcp_sessions()`` the app name of every relaying TCP session.
    """

    def __init__(self, tunnels: Callable[[], Iterable[tuple[str, int, float | None]]] = tuple,
                 audit_pending: Callable[[], int] = lambda: 0,
                 tcp_sessions: Callable[[], Iterable[str]] = tuple,
                 journal_bytes: Callable[[], int] = lambda: 0) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        _process_collectors(registry)
        self._requests = Counter(
            "apptunnel_http_requests", "HTTP requests to apps, by app and response status "
            "(0: no response was sent; app '' is a Host no app has).",
            ("app", "code"), registry=registry)
        self._durations = Histogram(
            "apptunnel_http_request_duration_seconds",
            "Time from a request head to the end of its response, by app.",
            ("app",), buckets=REQUEST_BUCKETS, registry=registry)
        self._logins = Counter(
            "apptunnel_logins", "Sign-ins by method (password, ldap, saml, oidc, ...) and "
            "outcome (success, failure).", ("method", "outcome"), registry=registry)
        self._refusals = Counter(
            "apptunnel_rate_limit_refusals", "Requests or connections refused by a limit, "
            "by reason.", ("reason",), registry=registry)
        self._backend = Histogram(
            "apptunnel_backend_operation_duration_seconds",
            "Storage call latency, by backend method.", ("operation",),
            buckets=BACKEND_BUCKETS, registry=registry)
        self._unavailable = Counter(
            "apptunnel_backend_unavailable", "Storage calls that failed because the backend "
            "could not be reached (each a 503 where a request needed it), by backend method.",
            ("operation",), registry=registry)
        self._request_children: dict[tuple[str, int], Any] = {}
        self._duration_children: dict[str, Any] = {}
        self._other_children: dict[tuple[str, str, str], Any] = {}
        self._tunnels = tunnels
        self._audit_pending = audit_pending
        self._journal_bytes = journal_bytes
        self._tcp_sessions = tcp_sessions
        registry.register(_Scraped(self._scrape))

    # -- hot path ---------------------------------------------------------------------

    def request(self, app: str, code: int, seconds: float) -> None:
        """One finished request (answered, or cut: code 0)."""
        if not 100 <= code <= 599:
            code = 0                       # as status_label: the cache stays bounded too
        key = (app, code)
        child = self._request_children.get(key)
        if child is None:
            child = self._request_children[key] = self._requests.labels(app, str(code))
        child.inc()
        timer = self._duration_children.get(app)
        if timer is None:
            timer = self._duration_children[app] = self._durations.labels(app)
        timer.observe(seconds)

    def login(self, method: str, outcome: str) -> None:
        self._child(self._logins, "login", method, outcome).inc()

    def refused(self, reason: str) -> None:
        self._child(self._refusals, "refused", reason).inc()

    def backend_call(self, operation: str, seconds: float) -> None:
        self._child(self._backend, "backend", operation).observe(seconds)

    def backend_unavailable(self, operation: str) -> None:
        self._child(self._unavailable, "unavailable", operation).inc()

    def _child(self, family, kind: str, *labels: str):
        key = (kind, *labels)
        child = self._other_children.get(key)
        if child is None:
            child = self._other_children[key] = family.labels(*labels)
        return child

    # -- scrape time ------------------------------------------------------------------

    def _scrape(self):
        tunnels = GaugeMetricFamily("apptunnel_tunnels", "Live tunnels, by agent.",
                                    labels=("agent",))
        streams = GaugeMetricFamily("apptunnel_streams", "Open streams over the tunnels, "
                                    "by agent.", labels=("agent",))
        rtt = GaugeMetricFamily("apptunnel_tunnel_rtt_seconds", "Round-trip time of the "
                                "last keepalive ping answered, by agent (the slowest of its "
                                "tunnels).", labels=("agent",))
        per_agent: dict[str, list] = {}
        for agent, stream_count, seconds in self._tunnels():
            seen = per_agent.setdefault(agent, [0, 0, None])
            seen[0] += 1
            seen[1] += stream_count
            if seconds is not None:
                seen[2] = seconds if seen[2] is None else max(seen[2], seconds)
        for agent, (count, open_streams, slowest) in sorted(per_agent.items()):
            tunnels.add_metric((agent,), count)
            streams.add_metric((agent,), open_streams)
            if slowest is not None:
                rtt.add_metric((agent,), slowest)
        queue = GaugeMetricFamily("apptunnel_audit_queue_depth",
                                  "Audit events accepted but not yet stored.",
                                  value=self._audit_pending())
        journal = GaugeMetricFamily("apptunnel_audit_journal_bytes",
                                    "Bytes in the local audit journal (events not yet "
                                    "committed, and committed ones not yet trimmed).",
                                    value=self._journal_bytes())
        tcp = GaugeMetricFamily("apptunnel_tcp_sessions", "TCP sessions relaying to apps "
                                "(apptunnel-tcp), by app.", labels=("app",))
        per_app: dict[str, int] = {}
        for app in self._tcp_sessions():
            per_app[app] = per_app.get(app, 0) + 1
        for app, count in sorted(per_app.items()):
            tcp.add_metric((app,), count)
        return [tunnels, streams, rtt, queue, journal, tcp]


class AgentMetrics(NoMetrics):
    """The agent's metrics. ``tunnels`` is read at scrape time like the proxy's."""

    def __init__(self, tunnels: Callable[[], Iterable[tuple[str, int, float | None]]] = tuple
                 ) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        _process_collectors(registry)
        self._upstream_errors = Counter(
            "apptunnel_agent_upstream_errors", "Streams the agent could not connect to its "
            "app, by app.", ("app",), registry=registry)
        self._renewals = Counter(
            "apptunnel_agent_certificate_renewals", "Certificate renewals, by outcome.",
            ("outcome",), registry=registry)
        self._children: dict[tuple[str, str], Any] = {}
        self._tunnels = tunnels
        registry.register(_Scraped(self._scrape))

    def upstream_error(self, app: str) -> None:
        self._child(self._upstream_errors, "upstream", app).inc()

    def renewal(self, outcome: str) -> None:
        self._child(self._renewals, "renewal", outcome).inc()

    def _child(self, family, kind: str, label: str):
        child = self._children.get((kind, label))
        if child is None:
            child = self._children[(kind, label)] = family.labels(label)
        return child

    def _scrape(self):
        tunnels = GaugeMetricFamily("apptunnel_agent_tunnels", "Live tunnels, by proxy.",
                                    labels=("proxy",))
        streams = GaugeMetricFamily("apptunnel_agent_streams", "Open streams, by proxy.",
                                    labels=("proxy",))
        rtt = GaugeMetricFamily("apptunnel_agent_tunnel_rtt_seconds", "Round-trip time of "
                                "the last keepalive ping answered, by proxy.", labels=("proxy",))
        for proxy, stream_count, seconds in self._tunnels():
            tunnels.add_metric((proxy,), 1)
            streams.add_metric((proxy,), stream_count)
            if seconds is not None:
                rtt.add_metric((proxy,), seconds)
        return [tunnels, streams, rtt]


class TimedBackend:
    """A backend whose coroutine methods report their latency to ``metrics``.

    Wraps the backend once, where the proxy opens it, instead of timing every caller;
    anything that is not a coroutine method (attributes, ``translate``) passes through.
    Time comes from ``clock``.
    """

    def __init__(self, backend: Any, metrics: NoMetrics, clock) -> None:
        self._backend = backend
        self._metrics = metrics
        self._clock = clock
        self._timed: dict[str, Callable] = {}

    @property
    def wrapped(self) -> Any:
        """The backend underneath (for code that must know its concrete type)."""
        return self._backend

    def __getattr__(self, name: str) -> Any:
        timed = self._timed.get(name)
        if timed is not None:
            return timed
        value = getattr(self._backend, name)
        if name.startswith("_") or not inspect.iscoroutinefunction(value):
            return value
        metrics, clock = self._metrics, self._clock

        async def timed(*args, **kwargs):
            started = clock.seconds()
            try:
                return await value(*args, **kwargs)
            except StorageUnavailable:
                metrics.backend_unavailable(name)
                raise
            finally:
                metrics.backend_call(name, clock.seconds() - started)

        self._timed[name] = timed
        return timed


LOGIN_EVENT = "user.login"
MAX_LOGIN_METHODS = 32     # distinct method labels kept; more (never expected) count as "other"


class CountedAudit:
    """An audit log that also counts ``user.login`` events in ``apptunnel_logins_total``.

    Every way in (password, LDAP, SAML, OIDC, sign-in codes, second factors) already emits
    exactly one ``user.login`` per attempt with its ``method`` and ``outcome``: counting
    them here keeps the metric equal to the audit, with no hook in each sign-in path.
    Everything else is the wrapped log's.
    """

    def __init__(self, audit: Any, metrics: NoMetrics) -> None:
        self._audit = audit
        self._metrics = metrics
        self._methods: set[str] = set()

    def emit(self, type: str, **kwargs: Any) -> None:
        self._audit.emit(type, **kwargs)
        if type == LOGIN_EVENT:
            method = str(kwargs.get("method", "") or "unknown")
            if method not in self._methods:
                if len(self._methods) >= MAX_LOGIN_METHODS:
                    method = "other"
                else:
                    self._methods.add(method)
            self._metrics.login(method, str(kwargs.get("outcome", "success")))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._audit, name)
