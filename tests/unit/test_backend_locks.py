"""SqliteBackend locks and bulk session ending, on a real database file in tmp_path."""

from __future__ import annotations

import sqlite3

import pytest
import pytest_twisted
from twisted.internet import reactor

from apptunnel.backend.base import BackendError
from apptunnel.backend.records import AppSession, AuthCode, Lock, User, WebSession
from apptunnel.backend.sqlite import _MIGRATIONS, SCHEMA_VERSION, SqliteBackend
from tests.support.waiting import wait


@pytest_twisted.async_yield_fixture
async def backend(tmp_path):
    b = SqliteBackend(str(tmp_path / "apptunnel.db"), reactor)
    yield b
    await wait(b.close())


def lock(id="l1", user="alice", app=None, expires=None, created=10.0):
    return Lock(id, user, app, "incident 42", created, expires, "admin")


async def sessions_of(b, specs):
    """Store web sessions and their app sessions: {web_hash: (user, [(app_hash, app)])}."""
    for web_hash, (user_name, apps) in specs.items():
        await wait(b.put_web_session(WebSession(web_hash, user_name, (), {}, 1.0, 1000.0)))
        await wait(b.put_auth_code(AuthCode("c-" + web_hash, web_hash, "grafana", "/", "s", 1000.0)))
        for app_hash, app in apps:
            await wait(b.put_app_session(AppSession(app_hash, web_hash, user_name, app, 1.0, 1000.0)))


@pytest_twisted.ensureDeferred
async def test_lock_round_trip_and_delete(backend):
    """A stored lock lists back equal (None fields kept); delete says whether it existed."""
    await wait(backend.put_lock(lock("l1", user="alice")))
    await wait(backend.put_lock(lock("l2", user=None, app="grafana", expires=50.0, created=11.0)))
    await wait(backend.put_lock(lock("l3", user="bob", app="grafana", created=12.0)))
    got = await wait(backend.list_locks(20.0))
    assert got == [lock("l1", user="alice"), lock("l2", user=None, app="grafana", expires=50.0,
                                                  created=11.0),
                   lock("l3", user="bob", app="grafana", created=12.0)]
    assert await wait(backend.delete_lock("l1")) is True
    assert await wait(backend.delete_lock("l1")) is False
    assert [x.id for x in await wait(backend.list_locks(20.0))] == ["l2", "l3"]


@pytest_twisted.ensureDeferred
async def test_list_locks_hides_expired_and_delete_expired_removes_them(backend):
    """Expired locks are not listed; delete_expired drops them but keeps permanent ones."""
    await wait(backend.put_lock(lock("old", expires=50.0)))
    await wait(backend.put_lock(lock("forever")))
    assert [x.id for x in await wait(backend.list_locks(49.0))] == ["forever", "old"]
    assert [x.id for x in await wait(backend.list_locks(50.0))] == ["forever"]
    assert await wait(backend.delete_expired(60.0)) == 1
    conn = sqlite3.connect(backend.path)
    try:
        assert [r[0] for r in conn.execute("SELECT id FROM locks")] == ["forever"]
    finally:
        conn.close()


@pytest_twisted.ensureDeferred
async def test_put_lock_refuses_a_lock_on_nothing(backend):
    """A lock with neither user nor app would match nobody: refused with BackendError."""
    with pytest.raises(BackendError, match="needs a user, an app"):
        await wait(backend.put_lock(lock(user=None, app=None)))


@pytest_twisted.ensureDeferred
async def test_delete_user_sessions_ends_only_that_users_sessions(backend):
    """All of alice's web sessions, app sessions and codes go; bob's stay."""
    await sessions_of(backend, {
        "w1": ("alice", [("a1", "grafana"), ("a2", "wiki")]),
        "w2": ("alice", [("a3", "grafana")]),
        "w3": ("bob", [("b1", "grafana")]),
    })
    ended = await wait(backend.delete_user_sessions("alice"))
    assert sorted(ended) == ["a1", "a2", "a3"]
    for gone in ("w1", "w2"):
        assert await wait(backend.get_web_session(gone)) is None
        assert await wait(backend.take_auth_code("c-" + gone)) is None
    assert await wait(backend.get_web_session("w3")) is not None
    assert await wait(backend.get_app_session("b1")) is not None
    assert await wait(backend.take_auth_code("c-w3")) is not None
    assert await wait(backend.delete_user_sessions("alice")) == []


@pytest_twisted.ensureDeferred
async def test_delete_app_sessions_for_everyone_or_one_user(backend):
    """App sessions on one app end (for one user when given); web sessions survive."""
    await sessions_of(backend, {
        "w1": ("alice", [("a1", "grafana"), ("a2", "wiki")]),
        "w2": ("bob", [("b1", "grafana"), ("b2", "wiki")]),
    })
    assert await wait(backend.delete_app_sessions("wiki", "alice")) == ["a2"]
    assert await wait(backend.get_app_session("b2")) is not None
    assert await wait(backend.take_auth_code("c-w1")) is not None   # a grafana code: kept
    assert sorted(await wait(backend.delete_app_sessions("grafana"))) == ["a1", "b1"]
    assert await wait(backend.take_auth_code("c-w2")) is None        # grafana codes: gone
    assert await wait(backend.get_web_session("w1")) is not None
    assert await wait(backend.get_web_session("w2")) is not None
    assert await wait(backend.get_app_session("b2")) is not None


@pytest_twisted.ensureDeferred
async def test_version_1_database_is_migrated_keeping_its_data(tmp_path):
    """A file at schema 1 gains the locks table on open and keeps its users."""
    path = str(tmp_path / "old.db")
    conn = sqlite3.connect(path)
    for statement in _MIGRATIONS[0]:
        conn.execute(statement)
    conn.execute("INSERT INTO users VALUES ('alice', NULL, '[]', '{}', 1.0)")
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    b = SqliteBackend(path, reactor)
    try:
        assert await wait(b.get_user("alice")) == User("alice", None, (), {}, 1.0)
        await wait(b.put_lock(lock()))
        assert await wait(b.list_locks(0.0)) == [lock()]
    finally:
        await wait(b.close())
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
    finally:
        conn.close()
