"""Metrics and readiness logic, with no network and a Clock: apptunnel/metrics.py, diag.py."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer
from twisted.internet.task import Clock

from apptunnel.backend.memory import MemoryBackend
from apptunnel.diag import FAILING, Readiness
from apptunnel.metrics import (
    MAX_LOGIN_METHODS,
    AgentMetrics,
    CountedAudit,
    ProxyMetrics,
    TimedBackend,
    render,
    status_label,
)
from apptunnel.tunnel import mux as M


def samples(registry) -> dict:
    """{(name, sorted labels): value} of everything ``registry`` exposes."""
    out = {}
    for family in text_string_to_metric_families(render(registry).decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_requests_are_counted_by_app_and_code_and_timed():
    """Each request moves its (app, code) counter by one and lands in its app's histogram."""
    metrics = ProxyMetrics()
    metrics.request("wiki", 200, 0.02)
    metrics.request("wiki", 200, 0.3)
    metrics.request("wiki", 502, 1.0)
    metrics.request("", 404, 0.001)
    got = samples(metrics.registry)
    assert got[("apptunnel_http_requests_total", (("app", "wiki"), ("code", "200")))] == 2
    assert got[("apptunnel_http_requests_total", (("app", "wiki"), ("code", "502")))] == 1
    assert got[("apptunnel_http_requests_total", (("app", ""), ("code", "404")))] == 1
    assert got[("apptunnel_http_request_duration_seconds_count", (("app", "wiki"),))] == 3
    assert got[("apptunnel_http_request_duration_seconds_bucket",
                (("app", "wiki"), ("le", "0.025")))] == 1


def test_status_labels_are_bounded():
    """A status an app invents (999, -1) cannot grow the label set: it is counted as 0."""
    assert [status_label(c) for c in (100, 200, 599, 600, 999, -1, 0)] == [100, 200, 599, 0, 0, 0, 0]
    metrics = ProxyMetrics()
    for code in range(600, 700):
        metrics.request("wiki", code, 0.0)
    got = samples(metrics.registry)
    codes = {dict(labels)["code"] for name, labels in got if name == "apptunnel_http_requests_total"}
    assert codes == {"0"}


def test_each_registry_is_its_own():
    """Two proxies in one process do not share counters (no global registry)."""
    a, b = ProxyMetrics(), ProxyMetrics()
    a.request("wiki", 200, 0.0)
    assert ("apptunnel_http_requests_total", (("app", "wiki"), ("code", "200"))) \
        not in samples(b.registry)


def test_tunnels_streams_and_rtt_are_read_per_agent_at_scrape_time():
    """Gauges come from the live tunnels when scraped: counts summed, the slowest RTT."""
    live = [("agent-1", 3, 0.010), ("agent-1", 2, 0.030), ("agent-2", 0, None)]
    pending = [7]
    metrics = ProxyMetrics(tunnels=lambda: live, audit_pending=lambda: pending[0],
                           tcp_sessions=lambda: ["db", "db", "ssh"],
                           journal_bytes=lambda: 4096)
    got = samples(metrics.registry)
    assert got[("apptunnel_tunnels", (("agent", "agent-1"),))] == 2
    assert got[("apptunnel_streams", (("agent", "agent-1"),))] == 5
    assert got[("apptunnel_tunnel_rtt_seconds", (("agent", "agent-1"),))] == 0.030
    assert got[("apptunnel_tunnels", (("agent", "agent-2"),))] == 1
    assert ("apptunnel_tunnel_rtt_seconds", (("agent", "agent-2"),)) not in got
    assert got[("apptunnel_audit_queue_depth", ())] == 7
    assert got[("apptunnel_audit_journal_bytes", ())] == 4096
    assert got[("apptunnel_tcp_sessions", (("app", "db"),))] == 2
    live.clear()
    pending[0] = 0
    got = samples(metrics.registry)
    assert not any(name == "apptunnel_tunnels" for name, _ in got)
    assert got[("apptunnel_audit_queue_depth", ())] == 0
    assert any(name == "process_cpu_seconds_total" for name, _ in got)


def test_logins_are_counted_from_the_audit_events():
    """Every user.login event counts once by method and outcome; other events do not."""
    emitted = []

    class Log:
        pending = 3

        def emit(self, type, **kw):
            emitted.append(type)

    metrics = ProxyMetrics()
    audit = CountedAudit(Log(), metrics)
    audit.emit("user.login", actor="ann", method="password", client="1.2.3.4")
    audit.emit("user.login", actor="bob", outcome="failure", method="ldap", reason="x")
    audit.emit("user.login", actor="bob", outcome="failure", method="ldap", reason="y")
    audit.emit("app.request", actor="ann", target="wiki")
    for n in range(MAX_LOGIN_METHODS + 5):       # a flood of made-up methods stays bounded
        audit.emit("user.login", method=f"m{n}", outcome="failure")
    assert audit.pending == 3 and len(emitted) == 4 + MAX_LOGIN_METHODS + 5
    got = samples(metrics.registry)
    assert got[("apptunnel_logins_total", (("method", "password"), ("outcome", "success")))] == 1
    assert got[("apptunnel_logins_total", (("method", "ldap"), ("outcome", "failure")))] == 2
    methods = {dict(labels)["method"] for name, labels in got if name == "apptunnel_logins_total"}
    assert len(methods) == MAX_LOGIN_METHODS + 1 and "other" in methods


def test_refusals_are_counted_by_reason():
    metrics = ProxyMetrics()
    metrics.refused("login_attempts")
    metrics.refused("login_attempts")
    metrics.refused("connection_limit")
    got = samples(metrics.registry)
    assert got[("apptunnel_rate_limit_refusals_total", (("reason", "login_attempts"),))] == 2
    assert got[("apptunnel_rate_limit_refusals_total", (("reason", "connection_limit"),))] == 1


def test_login_throttle_counts_its_refusals():
    """LoginThrottle tells the metrics each time it refuses an attempt."""
    from apptunnel.auth.throttle import LoginThrottle, Throttled

    metrics = ProxyMetrics()
    throttle = LoginThrottle(max_per_user=1, max_per_address=100, window=60, metrics=metrics)
    throttle.attempt("ann", "10.0.0.1", 0.0)
    with pytest.raises(Throttled):
        throttle.attempt("ann", "10.0.0.1", 1.0)
    assert samples(metrics.registry)[
        ("apptunnel_rate_limit_refusals_total", (("reason", "login_attempts"),))] == 1


@pytest.mark.parametrize("fails", [False, True])
def test_backend_calls_are_timed_by_operation(fails):
    """The wrapped backend times each coroutine method, also when it raises, on the clock."""
    clock = Clock()
    metrics = ProxyMetrics()
    backend = MemoryBackend()

    class Slow:
        async def list_locks(self, now):
            clock.advance(0.2)
            if fails:
                raise RuntimeError("down")
            return await backend.list_locks(now)

        name = "slow"

    timed = TimedBackend(Slow(), metrics, clock)
    assert timed.name == "slow"             # plain attributes pass through
    d = defer.ensureDeferred(timed.list_locks(0.0))
    if fails:
        assert isinstance(d.result.value, RuntimeError)
        d.addErrback(lambda _: None)
    else:
        assert d.result == []
    got = samples(metrics.registry)
    key = ("apptunnel_backend_operation_duration_seconds", (("operation", "list_locks"),))
    assert got[(key[0] + "_count", key[1])] == 1
    assert got[(key[0] + "_sum", key[1])] == pytest.approx(0.2)


def test_agent_metrics():
    """The agent's tunnels per proxy, upstream errors per app, renewals per outcome."""
    metrics = AgentMetrics(tunnels=lambda: [("127.0.0.1:3024", 4, 0.005)])
    metrics.upstream_error("wiki")
    metrics.renewal("success")
    got = samples(metrics.registry)
    assert got[("apptunnel_agent_tunnels", (("proxy", "127.0.0.1:3024"),))] == 1
    assert got[("apptunnel_agent_streams", (("proxy", "127.0.0.1:3024"),))] == 4
    assert got[("apptunnel_agent_tunnel_rtt_seconds", (("proxy", "127.0.0.1:3024"),))] == 0.005
    assert got[("apptunnel_agent_upstream_errors_total", (("app", "wiki"),))] == 1
    assert got[("apptunnel_agent_certificate_renewals_total", (("outcome", "success"),))] == 1


# -- tunnel round-trip time ----------------------------------------------------------------


def test_mux_measures_the_round_trip_of_its_keepalive_ping():
    """The PONG of our latest PING gives the RTT on the times passed in; others do not."""
    a = M.Mux(initiator=True, now=0.0, keepalive_interval=5, keepalive_timeout=15)
    b = M.Mux(initiator=False, now=0.0, keepalive_interval=5, keepalive_timeout=15)
    assert a.rtt is None
    a.tick(5.0)                                   # silence: a pings
    b.receive(a.bytes_to_send(), 5.01)
    pong = b.bytes_to_send()
    a.receive(pong, 5.25)
    assert a.rtt == pytest.approx(0.25)
    a.receive(pong, 9.0)                          # a replayed PONG measures nothing
    assert a.rtt == pytest.approx(0.25)


# -- readiness -----------------------------------------------------------------------------


def run(d: defer.Deferred):
    assert d.called, "still waiting"
    return d.result


def test_readiness_is_ok_when_every_check_passes():
    clock = Clock()

    async def backend():
        return None

    ready = Readiness(clock, {"backend": backend, "listeners": lambda: None})
    assert run(defer.ensureDeferred(ready.check())) == (
        True, {"status": "ok", "checks": {"backend": "ok", "listeners": "ok"}})


def test_readiness_names_the_failing_check_without_its_error_text():
    """A raising check is "failing" (its message may name hosts: never shown)."""
    clock = Clock()

    async def backend():
        raise RuntimeError("connection to 10.1.2.3:5432 refused")

    ready = Readiness(clock, {"backend": backend, "audit": lambda: FAILING,
                              "listeners": lambda: None})
    ok, body = run(defer.ensureDeferred(ready.check()))
    assert not ok
    assert body == {"status": "unavailable",
                    "checks": {"backend": "failing", "audit": "failing", "listeners": "ok"}}
    assert "10.1.2.3" not in repr(body)


def test_a_hung_check_times_out_and_is_not_started_twice():
    """A backend that never answers: "timeout" after the deadline, and one probe in flight
    however often /readyz is asked (no pile of stuck queries)."""
    clock = Clock()
    started = []

    def backend():
        started.append(1)
        return defer.Deferred()                  # never fires

    ready = Readiness(clock, {"backend": backend}, timeout=2.0)
    first = defer.ensureDeferred(ready.check())
    second = defer.ensureDeferred(ready.check())
    assert not first.called
    clock.advance(2.0)
    assert run(first) == (False, {"status": "unavailable", "checks": {"backend": "timeout"}})
    assert run(second)[0] is False
    third = defer.ensureDeferred(ready.check())
    clock.advance(2.0)
    assert run(third)[1]["checks"]["backend"] == "timeout"
    assert len(started) == 1


def test_a_check_that_recovers_is_ok_again():
    clock = Clock()
    answer = [defer.Deferred()]
    ready = Readiness(clock, {"backend": lambda: answer[0]}, timeout=1.0)
    first = defer.ensureDeferred(ready.check())
    clock.advance(1.0)
    assert run(first)[0] is False
    answer[0].callback(None)                      # the stuck probe finally ends
    answer[0] = None
    assert run(defer.ensureDeferred(ready.check()))[0] is True


# -- diag_addr -----------------------------------------------------------------------------


def load(tmp_path, extra: str, agent: bool = False):
    from apptunnel.config import load_agent_config, load_proxy_config

    path = tmp_path / "c.yaml"
    if agent:
        path.write_text("data_dir: d\nproxy_addr: p.example.com:3024\n"
                        "join: {token: " + "x" * 32 + ", ca_pin: 'sha256:" + "0" * 64 + "'}\n" + extra)
        return load_agent_config(str(path)).diag_addr
    path.write_text("data_dir: d\npublic_addr: a.example.com\n" + extra)
    return load_proxy_config(str(path)).diag_addr


def test_diag_addr_defaults_to_loopback_and_can_be_turned_off(tmp_path):
    assert load(tmp_path, "") == "127.0.0.1:3090"
    assert load(tmp_path, "", agent=True) == "127.0.0.1:3091"
    assert load(tmp_path, "diag_addr: off\n") is None
    assert load(tmp_path, "diag_addr: 'off'\n", agent=True) is None
    assert load(tmp_path, "diag_addr: '[::1]:9100'\n") == "[::1]:9100"


@pytest.mark.parametrize("extra, problem", [
    ("diag_addr: 0.0.0.0:9100\n", "diag_addr: '0.0.0.0' is not a loopback address"),
    ("diag_addr: 10.0.0.5:9100\n", "set diag_addr_public: true"),
    ("diag_addr: nonsense\n", "diag_addr: expected host:port"),
    ("diag_addr: off\ndiag_addr_public: true\n", "diag_addr_public: diag_addr is off"),
])
def test_diag_addr_beyond_loopback_needs_an_explicit_opt_in(tmp_path, extra, problem):
    """A metrics port reachable from the network is a choice: one line naming the key."""
    from apptunnel.config import ConfigError

    with pytest.raises(ConfigError) as err:
        load(tmp_path, extra)
    assert problem in str(err.value) and "\n" not in str(err.value)
    assert load(tmp_path, "diag_addr: 0.0.0.0:9100\ndiag_addr_public: true\n") == "0.0.0.0:9100"
