"""SqliteBackend against a real database file in tmp_path."""

from __future__ import annotations

import os
import sqlite3
import stat
from types import SimpleNamespace

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from apptunnel.backend import open_backend
from apptunnel.backend.base import AlreadyExists, BackendError, NotFound
from apptunnel.backend.records import (
    AppSession,
    AuditEvent,
    AuthCode,
    JoinToken,
    Resource,
    User,
    WebSession,
)
from apptunnel.backend.sqlite import SCHEMA_VERSION, SqliteBackend
from tests.support.waiting import wait


@pytest_twisted.async_yield_fixture
async def backend(tmp_path):
    b = SqliteBackend(str(tmp_path / "data" / "apptunnel.db"), reactor)
    yield b
    await wait(b.close())


def user(name="alice", roles=("dev",), traits=None, created=100.0):
    if traits is None:
        traits = {"logins": ("alice", "root")}
    return User(name, "argon-hash", tuple(roles), traits, created)


def web(id_hash="w1", user_name="alice", expires=1000.0):
    return WebSession(id_hash, user_name, ("dev",), {"team": ("sre",)}, 10.0, expires)


def app_session(id_hash="a1", web_session="w1", user_name="alice", app="grafana",
                expires=1000.0):
    return AppSession(id_hash, web_session, user_name, app, 10.0, expires)


def code(code_hash="c1", web_session="w1", expires=1000.0):
    return AuthCode(code_hash, web_session, "grafana", "/d/1", "statehash", expires)


def event(i, time, type="user.login"):
    return AuditEvent(f"id{i:03d}", time, type, "T1000I", "alice", "proxy", "success",
                      {"n": i, "method": "password"})


@pytest_twisted.ensureDeferred
async def test_user_round_trip(backend):
    """A created user reads back equal, with tuples for roles and trait values."""
    await wait(backend.create_user(user()))
    got = await wait(backend.get_user("alice"))
    assert got == user()
    assert isinstance(got.traits["logins"], tuple)
    assert await wait(backend.get_user("bob")) is None


@pytest_twisted.ensureDeferred
async def test_create_user_twice_is_already_exists(backend):
    """Creating a user whose name exists raises AlreadyExists."""
    await wait(backend.create_user(user()))
    with pytest.raises(AlreadyExists):
        await wait(backend.create_user(user(roles=("admin",))))
    assert (await wait(backend.get_user("alice"))).roles == ("dev",)


@pytest_twisted.ensureDeferred
async def test_update_and_list_users(backend):
    """update_user replaces fields; list_users is sorted by name; unknown user is NotFound."""
    await wait(backend.create_user(user("carol")))
    await wait(backend.create_user(user("alice")))
    await wait(backend.update_user(user("alice", roles=("admin", "dev"), traits={})))
    users = await wait(backend.list_users())
    assert [u.name for u in users] == ["alice", "carol"]
    assert users[0].roles == ("admin", "dev") and users[0].traits == {}
    with pytest.raises(NotFound):
        await wait(backend.update_user(user("nobody")))


@pytest_twisted.ensureDeferred
async def test_delete_user_removes_sessions(backend):
    """delete_user drops the user's web sessions, app sessions and auth codes only."""
    await wait(backend.create_user(user("alice")))
    await wait(backend.create_user(user("bob")))
    await wait(backend.put_web_session(web("w1", "alice")))
    await wait(backend.put_web_session(web("w2", "bob")))
    await wait(backend.put_app_session(app_session("a1", "w1", "alice")))
    await wait(backend.put_app_session(app_session("a2", "w2", "bob")))
    await wait(backend.put_auth_code(code("c1", "w1")))
    await wait(backend.put_auth_code(code("c2", "w2")))

    assert await wait(backend.delete_user("alice")) is True
    assert await wait(backend.delete_user("alice")) is False
    assert await wait(backend.get_user("alice")) is None
    assert await wait(backend.get_web_session("w1")) is None
    assert await wait(backend.get_app_session("a1")) is None
    assert await wait(backend.take_auth_code("c1")) is None
    assert await wait(backend.get_web_session("w2")) is not None
    assert await wait(backend.get_app_session("a2")) is not None
    assert await wait(backend.take_auth_code("c2")) is not None


@pytest_twisted.ensureDeferred
async def test_resources_upsert_list_delete(backend):
    """put_resource upserts; list is per kind and sorted; delete reports whether it existed."""
    doc = {"kind": "role", "metadata": {"name": "dev"}, "spec": {"allow": {}}}
    await wait(backend.put_resource(Resource("role", "dev", doc)))
    await wait(backend.put_resource(Resource("role", "admin", {"v": 1})))
    await wait(backend.put_resource(Resource("connector", "dev", {"v": 2})))
    await wait(backend.put_resource(Resource("role", "admin", {"v": 3})))

    assert await wait(backend.get_resource("role", "dev")) == Resource("role", "dev", doc)
    roles = await wait(backend.list_resources("role"))
    assert roles == [Resource("role", "admin", {"v": 3}), Resource("role", "dev", doc)]
    assert await wait(backend.delete_resource("role", "dev")) is True
    assert await wait(backend.delete_resource("role", "dev")) is False
    assert await wait(backend.get_resource("role", "dev")) is None
    assert await wait(backend.get_resource("connector", "dev")) is not None


@pytest_twisted.ensureDeferred
async def test_tokens(backend):
    """Join tokens add, read, list by creation time, refuse duplicates and delete."""
    t1 = JoinToken("h1", "app", 500.0, 20.0)
    t2 = JoinToken("h2", "app", 600.0, 10.0)
    await wait(backend.add_token(t1))
    await wait(backend.add_token(t2))
    with pytest.raises(AlreadyExists):
        await wait(backend.add_token(t1))
    assert await wait(backend.get_token("h1")) == t1
    assert await wait(backend.list_tokens()) == [t2, t1]
    assert await wait(backend.delete_token("h1")) is True
    assert await wait(backend.delete_token("h1")) is False
    assert await wait(backend.get_token("h1")) is None


@pytest_twisted.ensureDeferred
async def test_web_session_delete_ends_app_sessions(backend):
    """delete_web_session removes its app sessions and codes and returns the app hashes."""
    await wait(backend.put_web_session(web("w1")))
    await wait(backend.put_web_session(web("w2")))
    assert await wait(backend.get_web_session("w1")) == web("w1")
    await wait(backend.put_app_session(app_session("a1", "w1")))
    await wait(backend.put_app_session(app_session("a2", "w1", app="kibana")))
    await wait(backend.put_app_session(app_session("a3", "w2")))
    await wait(backend.put_auth_code(code("c1", "w1")))

    ended = await wait(backend.delete_web_session("w1"))
    assert sorted(ended) == ["a1", "a2"]
    assert await wait(backend.get_web_session("w1")) is None
    assert await wait(backend.get_app_session("a1")) is None
    assert await wait(backend.take_auth_code("c1")) is None
    assert await wait(backend.get_app_session("a3")) == app_session("a3", "w2")
    assert await wait(backend.delete_web_session("w1")) == []


@pytest_twisted.ensureDeferred
async def test_app_session_put_get_delete(backend):
    """App sessions round-trip, upsert on the same hash, and delete once."""
    await wait(backend.put_app_session(app_session("a1")))
    await wait(backend.put_app_session(app_session("a1", expires=2000.0)))
    assert (await wait(backend.get_app_session("a1"))).expires == 2000.0
    assert await wait(backend.delete_app_session("a1")) is True
    assert await wait(backend.delete_app_session("a1")) is False
    assert await wait(backend.get_app_session("a1")) is None


@pytest_twisted.ensureDeferred
async def test_take_auth_code_is_one_time(backend):
    """take_auth_code returns the code once, and of many racing takes exactly one wins."""
    await wait(backend.put_auth_code(code("c1")))
    with pytest.raises(AlreadyExists):
        await wait(backend.put_auth_code(code("c1")))
    assert await wait(backend.take_auth_code("c1")) == code("c1")
    assert await wait(backend.take_auth_code("c1")) is None

    await wait(backend.put_auth_code(code("c2")))
    other = SqliteBackend(backend.path, reactor)
    try:
        results = await defer.gatherResults(
            [wait(b.take_auth_code("c2")) for b in (backend, other) for _ in range(5)]
        )
    finally:
        await wait(other.close())
    assert [r for r in results if r is not None] == [code("c2")]


@pytest_twisted.ensureDeferred
async def test_audit_append_and_search(backend):
    """search_audit filters by since/until/type, orders by time and honours limit."""
    await wait(backend.append_audit([event(i, 100.0 + i) for i in range(10)]))
    await wait(backend.append_audit([event(99, 104.5, type="app.request")]))
    await wait(backend.append_audit([]))

    everything = await wait(backend.search_audit())
    assert len(everything) == 11
    assert [e.time for e in everything] == sorted(e.time for e in everything)
    assert everything[0] == event(0, 100.0)

    window = await wait(backend.search_audit(since=103.0, until=106.0))
    assert [e.time for e in window] == [103.0, 104.0, 104.5, 105.0]
    logins = await wait(backend.search_audit(since=103.0, type="user.login", limit=2))
    assert [e.id for e in logins] == ["id003", "id004"]
    requests = await wait(backend.search_audit(type="app.request"))
    assert requests == [event(99, 104.5, type="app.request")]
    assert await wait(backend.search_audit(limit=0)) == []


@pytest_twisted.ensureDeferred
async def test_audit_search_filters_by_actor_target_and_outcome_in_storage(backend):
    """actor/target/outcome match exactly and the limit counts matching events only, so
    a few of bob's events behind many of alice's are found (not lost in a first page)."""
    noise = [AuditEvent(f"a{i:04d}", 10.0 + i, "app.request", "T2100I", "alice", "grafana",
                        "success", {}) for i in range(50)]
    bobs = [AuditEvent(f"b{i}", 100.0 + i, "app.request", "T2100W", "bob", "wiki",
                       "failure" if i % 2 else "success", {}) for i in range(4)]
    await wait(backend.append_audit(noise + bobs))
    found = await wait(backend.search_audit(actor="bob", limit=3))
    assert [e.id for e in found] == ["b0", "b1", "b2"]
    assert [e.id for e in await wait(backend.search_audit(target="wiki", outcome="failure"))] \
        == ["b1", "b3"]
    assert len(await wait(backend.search_audit(target="grafana", limit=5000))) == 50
    assert await wait(backend.search_audit(actor="bob", target="grafana")) == []
    assert await wait(backend.search_audit(actor="b%")) == []   # no LIKE, no wildcards


@pytest_twisted.ensureDeferred
async def test_audit_batch_larger_than_one_insert_keeps_every_event_in_order(backend):
    """A batch spanning several multi-row INSERTs stores every event, ties in batch order."""
    batch = [event(i, 7.0) for i in range(1001)]
    await wait(backend.append_audit(batch))
    stored = await wait(backend.search_audit(limit=5000))
    assert stored == batch


@pytest_twisted.ensureDeferred
async def test_audit_duplicate_id_rolls_back_batch(backend):
    """A batch with a duplicate id fails as a whole and stores nothing of itself."""
    await wait(backend.append_audit([event(1, 1.0)]))
    with pytest.raises(AlreadyExists):
        await wait(backend.append_audit([event(2, 2.0), event(1, 1.0)]))
    assert [e.id for e in await wait(backend.search_audit())] == ["id001"]


@pytest_twisted.ensureDeferred
async def test_unencodable_fields_are_backend_error(backend):
    """A record that cannot be JSON-encoded is one BackendError, not a stray TypeError."""
    bad = AuditEvent("x", 1.0, "t", "c", "a", "t", "success", {"obj": object()})
    with pytest.raises(BackendError, match="cannot encode"):
        await wait(backend.append_audit([bad]))


@pytest_twisted.ensureDeferred
async def test_delete_expired(backend):
    """delete_expired removes everything with expires <= now and counts it."""
    await wait(backend.put_web_session(web("w-old", expires=50.0)))
    await wait(backend.put_web_session(web("w-new", expires=500.0)))
    await wait(backend.put_app_session(app_session("a-old", "w-old", expires=50.0)))
    await wait(backend.put_auth_code(code("c-old", expires=99.0)))
    await wait(backend.put_auth_code(code("c-new", expires=101.0)))
    await wait(backend.add_token(JoinToken("t-old", "app", 100.0, 0.0)))
    await wait(backend.add_token(JoinToken("t-new", "app", 1000.0, 0.0)))

    assert await wait(backend.delete_expired(100.0)) == 4
    assert await wait(backend.get_web_session("w-new")) is not None
    assert await wait(backend.get_web_session("w-old")) is None
    assert await wait(backend.get_token("t-new")) is not None
    assert await wait(backend.delete_expired(100.0)) == 0


@pytest_twisted.ensureDeferred
async def test_files_are_private(backend):
    """The database file and its WAL are created with mode 0600."""
    await wait(backend.create_user(user()))
    for suffix in ("", "-wal"):
        mode = stat.S_IMODE(os.stat(backend.path + suffix).st_mode)
        assert mode == 0o600, (suffix, oct(mode))


@pytest_twisted.ensureDeferred
async def test_wal_mode_and_schema_version(backend):
    """The file is in WAL mode and stamped with the current schema version."""
    await wait(backend.list_users())
    conn = sqlite3.connect(backend.path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        conn.close()


@pytest_twisted.ensureDeferred
async def test_reopen_is_idempotent(tmp_path):
    """Opening an existing, migrated file again keeps data and does not re-run migrations."""
    path = str(tmp_path / "apptunnel.db")
    first = SqliteBackend(path, reactor)
    await wait(first.create_user(user()))
    await wait(first.close())
    second = SqliteBackend(path, reactor)
    try:
        assert await wait(second.get_user("alice")) == user()
    finally:
        await wait(second.close())


@pytest_twisted.ensureDeferred
async def test_newer_schema_is_refused(tmp_path):
    """A file from a newer apptunnel fails with a clear BackendError instead of corrupting it."""
    path = str(tmp_path / "apptunnel.db")
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    b = SqliteBackend(path, reactor)
    try:
        with pytest.raises(BackendError, match="newer than this apptunnel"):
            await wait(b.list_users())
    finally:
        await wait(b.close())


@pytest_twisted.ensureDeferred
async def test_two_backends_share_one_file(tmp_path):
    """Two backends (CLI and proxy) on one new file write concurrently and see each other."""
    path = str(tmp_path / "shared.db")
    a = SqliteBackend(path, reactor)
    b = SqliteBackend(path, reactor)
    try:
        writes = []
        for i in range(20):
            writes.append(wait(a.create_user(user(f"a{i:02d}"))))
            writes.append(wait(b.create_user(user(f"b{i:02d}"))))
            writes.append(wait(a.append_audit([event(i, float(i))])))
        await defer.gatherResults(writes)
        names_a = [u.name for u in await wait(a.list_users())]
        names_b = [u.name for u in await wait(b.list_users())]
        assert names_a == names_b and len(names_a) == 40
        assert len(await wait(b.search_audit())) == 20
    finally:
        await wait(a.close())
        await wait(b.close())


@pytest_twisted.ensureDeferred
async def test_closed_backend_raises(tmp_path):
    """Calls after close() raise BackendError; close() twice is harmless."""
    b = SqliteBackend(str(tmp_path / "x.db"), reactor)
    await wait(b.close())
    await wait(b.close())
    with pytest.raises(BackendError, match="closed"):
        await wait(b.get_user("alice"))


@pytest_twisted.ensureDeferred
async def test_unopenable_path_is_backend_error(tmp_path):
    """A path that cannot be a database gives one BackendError naming the file."""
    path = str(tmp_path / "a-directory")
    os.mkdir(path)
    b = SqliteBackend(path, reactor)
    try:
        with pytest.raises(BackendError, match="a-directory"):
            await wait(b.get_user("alice"))
    finally:
        await wait(b.close())


@pytest_twisted.ensureDeferred
async def test_open_backend_picks_sqlite(tmp_path):
    """open_backend returns a working SqliteBackend for backend_type sqlite."""
    config = SimpleNamespace(backend_type="sqlite", backend_path=str(tmp_path / "o.db"))
    b = open_backend(config, reactor)
    try:
        assert isinstance(b, SqliteBackend)
        assert await wait(b.list_users()) == []
    finally:
        await wait(b.close())


def test_open_backend_unknown_type():
    """An unknown backend_type is a BackendError that names it."""
    config = SimpleNamespace(backend_type="mongo", backend_path="/nonexistent")
    with pytest.raises(BackendError, match="mongo"):
        open_backend(config, reactor)
