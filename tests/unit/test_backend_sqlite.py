"""SqliteBackend's own behaviour on a real database file in tmp_path: the file, its
schema migrations, and two backends sharing it. What every backend must do is in
test_backend_contract.py, run against SQLite too."""

from __future__ import annotations

import os
import sqlite3
import stat
from types import SimpleNamespace

import attrs
import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from apptunnel.backend import open_backend
from apptunnel.backend.base import AlreadyExists, BackendError, StorageUnavailable
from apptunnel.backend.records import AuditEvent, AuthCode, JoinToken, Lock, Scope, User
import apptunnel.backend.sqlite as sqlite_module
from apptunnel.audit.chain import GENESIS, link_line
from apptunnel.audit.verify import verify_all
from apptunnel.backend.sqlite import _MIGRATIONS, SCHEMA_VERSION, SqliteBackend
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


def code(code_hash="c1", web_session="w1", expires=1000.0):
    return AuthCode(code_hash, web_session, "grafana", "/d/1", "statehash", expires)


def event(i, time, type="user.login"):
    return AuditEvent(f"id{i:03d}", time, type, "T1000I", "alice", "proxy", "success",
                      {"n": i, "method": "password"})


@pytest_twisted.ensureDeferred
async def test_two_backends_opening_one_new_file_at_once_both_work(tmp_path):
    """The CLI and a starting proxy creating the database together: switching a new file to
    WAL answers "database is locked" without waiting, so it is retried (this flaked
    test_two_backends_share_one_file about once in fifteen pairs)."""
    for i in range(40):
        path = str(tmp_path / f"new-{i}.db")
        pair = [SqliteBackend(path, reactor) for _ in range(2)]
        try:
            assert await defer.gatherResults([wait(b.list_users()) for b in pair]) == [[], []]
        finally:
            for b in pair:
                await wait(b.close())


@pytest_twisted.ensureDeferred
async def test_two_backends_on_one_file_take_an_auth_code_once(backend):
    """Of many takes racing from two backends (CLI and proxy) on one file, exactly one wins."""
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
    lock = Lock("l1", "alice", None, "incident 42", 10.0, None, "admin")
    b = SqliteBackend(path, reactor)
    try:
        assert await wait(b.get_user("alice")) == User("alice", None, (), {}, 1.0)
        await wait(b.put_lock(lock))
        assert await wait(b.list_locks(0.0)) == [lock]
    finally:
        await wait(b.close())
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 17
    finally:
        conn.close()


@pytest_twisted.ensureDeferred
async def test_version_2_database_keeps_its_tokens_unlimited(tmp_path):
    """A schema-2 file gains uses and scope; its old tokens stay unlimited in both."""
    path = str(tmp_path / "old.db")
    conn = sqlite3.connect(path)
    for statements in _MIGRATIONS[:2]:
        for statement in statements:
            conn.execute(statement)
    conn.execute("INSERT INTO join_tokens VALUES ('t', 'app', 1000.0, 1.0)")
    conn.execute("PRAGMA user_version = 2")
    conn.commit()
    conn.close()
    b = SqliteBackend(path, reactor)
    try:
        assert await wait(b.get_token("t")) == JoinToken("t", "app", 1000.0, 1.0, None, Scope())
        assert await wait(b.list_agents()) == []
    finally:
        await wait(b.close())


@pytest_twisted.ensureDeferred
async def test_version_5_database_gains_mfa_verified_as_not_verified(tmp_path):
    """Migration 6 (per-session MFA): app sessions and hand-offs stored before it read as
    started without a second factor, so a role asking for one prompts again."""
    path = str(tmp_path / "v5.db")
    conn = sqlite3.connect(path)
    for migration in _MIGRATIONS[:5]:
        for statement in migration:
            conn.execute(statement)
    conn.execute("INSERT INTO app_sessions VALUES ('a1', 'w1', 'alice', 'grafana', 1.0, 9e9)")
    conn.execute("INSERT INTO auth_codes VALUES ('c1', 'w1', 'grafana', '/', 's', 9e9)")
    conn.execute("PRAGMA user_version = 5")
    conn.commit()
    conn.close()
    b = SqliteBackend(path, reactor)
    try:
        assert (await wait(b.get_app_session("a1"))).mfa_verified is False
        assert (await wait(b.take_auth_code("c1"))).mfa_verified is False
    finally:
        await wait(b.close())


@pytest_twisted.ensureDeferred
async def test_version_8_database_gains_access_requests_and_sessions_assume_none(tmp_path):
    """Migration 11 (access requests): web sessions stored before it assumed no request,
    and the access_requests table starts empty."""
    path = str(tmp_path / "v8.db")
    conn = sqlite3.connect(path)
    for migration in _MIGRATIONS[:8]:
        for statement in migration:
            conn.execute(statement)
    conn.execute("INSERT INTO web_sessions (id_hash, user_name, roles, traits, created,"
                 " expires) VALUES ('w1', 'alice', '[\"dev\"]', '{}', 1.0, 9e9)")
    conn.execute("PRAGMA user_version = 8")
    conn.commit()
    conn.close()
    b = SqliteBackend(path, reactor)
    try:
        assert (await wait(b.get_web_session("w1"))).requests == ()
        assert (await wait(b.get_web_session("w1"))).method == ""   # migration 12
        assert await wait(b.list_access_requests()) == []
    finally:
        await wait(b.close())


# -- the audit store reuses the chain's encoding of the fields (issue 14) ----------------


def _chain_event(i: int, fields: dict) -> AuditEvent:
    return AuditEvent(f"id{i:04d}", 1000.0 + i / 7, "app.request", "T2100I", "alice", "wiki",
                      "success", fields)


@pytest_twisted.ensureDeferred
async def test_chained_events_are_stored_without_encoding_their_fields_again(
        tmp_path, monkeypatch):
    """The SQLite store writes the chain's text (no second encoding), rows from before it
    (encoded by the store) sit beside them, and ``audit verify`` passes on both."""
    path = str(tmp_path / "apptunnel.db")
    backend = SqliteBackend(path, reactor)
    try:
        old = [_chain_event(i, {"n": i, "path": "/é"}) for i in range(3)]
        chained, prev = [], GENESIS
        for i in range(3, 10):
            e, _ = link_line(_chain_event(i, {"n": i, "path": "/\u2603", "x": [1.5, None]}), "p1",
                             i - 2, prev)
            chained.append(e)
            prev = e.digest
        await wait(backend.append_audit(old + chained[:3]))     # rows as stored before
        dumped: list = []
        real_dump = sqlite_module._dump
        monkeypatch.setattr(sqlite_module, "_dump",
                            lambda value: dumped.append(value) or real_dump(value))
        await wait(backend.append_audit(chained[3:]))
        assert dumped == []
        report = await wait(verify_all(backend))
        assert report.intact and report.unchained == 3
        assert [c.events for c in report.chains] == [7]
        stored = await wait(backend.search_audit())
        assert stored == old + chained
    finally:
        await wait(backend.close())
    with sqlite3.connect(path) as conn:
        texts = dict(conn.execute("SELECT id, fields FROM audit_events").fetchall())
    assert texts["id0009"] == chained[-1].fields_json == real_dump(chained[-1].fields)


@pytest_twisted.ensureDeferred
async def test_a_cached_text_that_lies_is_caught_by_verify(tmp_path):
    """The digest covers the fields, not the cached text: were the two ever to differ, the
    stored row would fail ``audit verify`` as altered, never pass silently."""
    backend = SqliteBackend(str(tmp_path / "apptunnel.db"), reactor)
    try:
        e, _ = link_line(_chain_event(1, {"status": 200}), "p1", 1, GENESIS)
        await wait(backend.append_audit([attrs.evolve(e, fields_json='{"status":500}')]))
        report = await wait(verify_all(backend))
        assert report.chains[0].problem.kind == "altered"
    finally:
        await wait(backend.close())
@pytest_twisted.ensureDeferred
async def test_a_file_that_cannot_be_opened_is_storage_unavailable(tmp_path, backend):
    """Storage down (issue 13 item 3): a file that cannot be opened raises
    StorageUnavailable (a 503 upstream), while a duplicate user stays AlreadyExists."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    down = SqliteBackend(str(blocker / "apptunnel.db"), reactor)
    try:
        with pytest.raises(StorageUnavailable):
            await down.list_users()
    finally:
        await down.close()
    await backend.create_user(user())
    with pytest.raises(AlreadyExists) as raised:
        await backend.create_user(user())
    assert not isinstance(raised.value, StorageUnavailable)
