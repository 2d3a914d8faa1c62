"""Storage down (issue 13 item 3): one exception type, StorageUnavailable, raised by SQLite
and PostgreSQL for connection-level failures only, and mapped to a 503 with Retry-After
and one log line (no traceback) on the web/API, the app hosts and TCP access."""

from __future__ import annotations

import sqlite3

import psycopg
import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from apptunnel.auth.access import AccessPolicy
from apptunnel.backend.base import AlreadyExists, BackendError, StorageUnavailable
from apptunnel.backend.postgres import _Unreachable
from apptunnel.backend.postgres import unavailable as pg_unavailable
from apptunnel.backend.sqlite import unavailable
from apptunnel.metrics import ProxyMetrics, TimedBackend
from apptunnel.proxy.errors import Refusal
from apptunnel.proxy.forward import AppForwarder
from apptunnel.proxy.registry import AgentRegistry
from apptunnel.proxy.tcp_access import TcpAccess
from tests.support.access_fakes import NOW, Roles, Users, cert
from tests.support.app_router import Signer, router
from tests.support.audit_fake import Audit
from tests.support.web_env import app_info, header, running_web_env


def sqlite_error(code: int) -> sqlite3.Error:
    err = sqlite3.OperationalError("x")
    err.sqlite_errorcode = code
    return err


@pytest.mark.parametrize("code, down", [
    (5, True), (6, True), (10, True), (13, True), (14, True),
    (5 | (1 << 8), True),           # SQLITE_BUSY_RECOVERY: the primary code decides
    (1, False),                     # SQLITE_ERROR: a bad statement
    (19, False),                    # SQLITE_CONSTRAINT
    (None, False),
])
def test_sqlite_errors_that_mean_storage_unavailable(code, down):
    """Busy, locked, I/O, full, cannot open: unavailable; a bad statement or constraint is not."""
    err = sqlite3.OperationalError("x") if code is None else sqlite_error(code)
    assert unavailable(err) is down


def test_postgres_errors_that_mean_storage_unavailable():
    """psycopg's OperationalError (refused, lost, statement timeout) or any error on a
    broken connection: unavailable; an integrity or SQL error on a good one is not."""
    assert pg_unavailable(psycopg.OperationalError("connection refused"), broken=False)
    assert pg_unavailable(_Unreachable("server closed the connection"), broken=False)
    assert pg_unavailable(sqlite3.OperationalError("anything"), broken=True)
    assert not pg_unavailable(sqlite3.OperationalError("syntax error"), broken=False)
    assert not pg_unavailable(sqlite3.IntegrityError("duplicate key"), broken=False)
    assert issubclass(StorageUnavailable, BackendError)
    assert not issubclass(AlreadyExists, StorageUnavailable)


class Logged:
    """Every log event published while the block runs."""

    def __enter__(self):
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        return self

    def __exit__(self, *exc):
        globalLogPublisher.removeObserver(self.events.append)

    def about_storage(self):
        return [e for e in self.events if "storage unavailable" in e.get("log_format", "")]

    def failures(self):
        return [e for e in self.events if "log_failure" in e]


@pytest_twisted.ensureDeferred
async def test_web_and_api_answer_503_with_retry_after_and_one_log_line(tmp_path):
    """Storage down: a sign-in form POST gets the uniform page, an API sign-in and an API
    call with a session get JSON, each 503 with Retry-After, one warning line each naming
    the storage, no traceback (no log_failure); back up, the same sign-in works."""
    async with running_web_env(tmp_path) as env:
        secret = await env.login()
        env.backend.unreachable = True
        with Logged() as log:
            page, body = await env.call("POST", "/web/login",
                                        data={"username": "alice", "password": "alice-pw"})
            api, api_body = await env.call("POST", "/v1/sessions",
                                           json={"username": "alice", "password": "alice-pw"})
            apps, apps_body = await env.call("GET", "/v1/apps", cookie=secret)
        for response in (page, api, apps):
            assert response.code == 503, (response.code, body, api_body, apps_body)
            assert header(response, "Retry-After") == "5"
        assert b"storage is unavailable" in body and b"<html" in body.lower()
        assert b'"error"' in api_body and b"storage is unavailable" in api_body
        assert b"storage is unavailable" in apps_body
        assert b"memory backend" not in body + api_body + apps_body   # no detail for clients
        assert len(log.about_storage()) == 3 and log.failures() == []
        assert "memory backend: unreachable" in log.about_storage()[0]["error"]
        env.backend.unreachable = False
        again, _ = await env.call("POST", "/v1/sessions",
                                  json={"username": "alice", "password": "alice-pw"})
        assert again.code == 200


class DownUsers(Users):
    """A user directory whose storage is down: nothing cached, every lookup fails."""

    def current(self, name):
        return None

    async def lookup(self, name):
        raise StorageUnavailable("postgres host=127.0.0.1: connection refused")


def test_app_host_answers_503_with_retry_after_and_one_log_line():
    """An app request whose decision needs storage while it is down: 503 page with
    Retry-After and the sentence, one warning line, no traceback, no stream opened."""
    from twisted.internet.testing import StringTransport

    clock = Clock()
    clock.advance(NOW)
    r, _ = router()
    audit = Audit()
    access = AccessPolicy(roles=Roles(), audit=audit, clock=clock, users=DownUsers())
    opened = []
    fw = AppForwarder(config=r.config, registry=r.registry, sessions=None, roles=None,
                      signer=Signer(), audit=audit, clock=clock,
                      connect_app=lambda *a: opened.append(a), access=access)
    conn = fw.fixed_connection("grafana", cert())
    client = StringTransport()
    conn.makeConnection(client)
    with Logged() as log:
        conn.dataReceived(b"GET /x HTTP/1.1\r\nHost: localhost\r\n\r\n")
    out = client.value()
    assert out.startswith(b"HTTP/1.1 503 "), out[:200]
    assert b"\r\nRetry-After: 5\r\n" in out and b"storage is unavailable" in out
    assert opened == []
    assert len(log.about_storage()) == 1 and log.failures() == []


def test_tcp_access_refuses_503_while_storage_is_down():
    """TCP access (upgrade and multiplexed streams share authorize): a Refusal 503 with
    a sentence for the client, no traceback."""
    registry = AgentRegistry()
    registry.add(object(), "agent-1", [app_info("grafana", {"env": "dev"})])
    clock = Clock()
    clock.advance(NOW)
    access = TcpAccess(ca=None, registry=registry, roles=Roles(), audit=Audit(), clock=clock,
                       connect_app=None, users=DownUsers())
    d = defer.ensureDeferred(access.authorize(cert(), "grafana", None, "127.0.0.1"))
    refusal = d.result.value
    d.addErrback(lambda _: None)
    assert isinstance(refusal, Refusal) and refusal.status == 503
    assert "storage is unavailable" in refusal.message and "127.0.0.1" not in refusal.message


def test_unavailable_storage_calls_are_counted_by_operation():
    """apptunnel_backend_unavailable_total{operation}: counted where the proxy times its
    backend, once per failed call; other errors are not counted."""
    from prometheus_client.parser import text_string_to_metric_families

    from apptunnel.metrics import render

    class Store:
        async def get_user(self, name):
            raise StorageUnavailable("down")

        async def list_users(self):
            raise BackendError("bad record")

    metrics = ProxyMetrics()
    timed = TimedBackend(Store(), metrics, Clock())
    for call in (timed.get_user("a"), timed.get_user("b"), timed.list_users()):
        defer.ensureDeferred(call).addErrback(lambda _: None)
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for family in text_string_to_metric_families(render(metrics.registry).decode())
           for s in family.samples}
    assert got[("apptunnel_backend_unavailable_total", (("operation", "get_user"),))] == 2
    assert ("apptunnel_backend_unavailable_total", (("operation", "list_users"),)) not in got


@pytest_twisted.ensureDeferred
async def test_sign_ins_refused_during_an_outage_use_up_no_attempts(tmp_path):
    """Twenty sign-ins while storage is down (each a 503, no password checked) leave the
    user's and the address's attempts untouched: the first one after the outage works."""
    async with running_web_env(tmp_path) as env:
        env.backend.unreachable = True
        for _ in range(20):
            with pytest.raises(StorageUnavailable):
                await env.sessions.login("alice", "alice-pw", "192.0.2.7")
        env.backend.unreachable = False
        user = await env.sessions.login("alice", "alice-pw", "192.0.2.7")
        assert user.name == "alice"


def test_a_live_recheck_that_cannot_reach_storage_is_one_line_and_cuts_nothing():
    """A user change re-asks the policy for a live connection while storage is down: one
    warning, no traceback, and the connection stays as last decided (not refused)."""
    from apptunnel.auth.access import LiveRecheck

    class Conn:
        caller, app_name = cert(), "grafana"

        def __init__(self):
            self.refusals = []

        def refused(self, deny):
            self.refusals.append(deny)

    clock = Clock()
    clock.advance(NOW)
    users = DownUsers()
    access = AccessPolicy(roles=Roles(), audit=Audit(), clock=clock, users=users)
    conn = Conn()
    LiveRecheck(access, clock, lambda: [conn], {"grafana": app_info("grafana", {})}.get,
                users=users)
    with Logged() as log:
        users.listener("alice", None)
    assert conn.refusals == []
    assert len(log.about_storage()) == 1 and log.failures() == []
