"""PostgreSQL storage (issue 13): one throwaway server for the test session
(tests/support/postgres.py), a fresh database per test.

The storage contract (tests/support/backend_contract.py) runs here on PostgresBackend;
plus the server helper, and the schema (backend/pg_schema.py) from empty and from an older
version.
"""

from __future__ import annotations

import os
import pathlib
import sqlite3
import subprocess
import threading
import time

import pytest
import pytest_twisted
import requests
import yaml
from twisted.internet import reactor

from apptunnel.backend import pg_schema
from apptunnel.backend.sqlite import SCHEMA_VERSION, migrate_file
from apptunnel.backend.base import BackendError
from apptunnel.backend.postgres import PostgresBackend, migrate_database
from tests.support.backend_contract import *  # noqa: F401,F403 - the contract tests
from tests.support.backend_contract import user
from tests.support.cluster import BIN, Browser, Cluster, free_port, wait_until
from tests.support.localhost import localhost_resolution
from tests.support.postgres import PostgresServer
from tests.support.upstream import HttpUpstream
from tests.support.waiting import wait

E2E_PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="session")
def postgres_server():
    server = PostgresServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_db(postgres_server):
    """A fresh, empty database and its owner role for one test."""
    return postgres_server.new_database()


@pytest_twisted.async_yield_fixture
async def backend(postgres_db):
    """The contract's fixture: a PostgresBackend on a fresh database."""
    b = PostgresBackend(postgres_db["dsn"], reactor, password=postgres_db["password"])
    yield b
    await wait(b.close())


def test_each_test_gets_its_own_empty_database_owned_by_its_role(postgres_server, postgres_db):
    """Two databases from one server are distinct, empty, and owned by their own login role;
    the dsn names host, port, database and user but never the password."""
    other = postgres_server.new_database()
    assert other["dbname"] != postgres_db["dbname"]
    assert "password" not in postgres_db["dsn"] and postgres_db["password"] not in postgres_db["dsn"]
    owner = postgres_server.psql(
        f"SELECT pg_catalog.pg_get_userbyid(datdba) FROM pg_database "
        f"WHERE datname = '{postgres_db['dbname']}'").strip()
    assert owner == postgres_db["user"]
    tables = postgres_server.psql(
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'",
        database=postgres_db["dbname"]).strip()
    assert tables == "0"


# -- schema: SQLite's migrations translated, applied by psql ------------------------------


def migrate_with_psql(server, db, upto=None) -> int:
    """Run prologue(), read the version, run upgrade_statements() in one transaction, as
    the backend will; `upto` stops at an older version (to make an old database)."""
    def run(*sql):
        return server.psql(*sql, database=db["dbname"])

    run(*pg_schema.prologue())
    version = int(run(pg_schema.VERSION_QUERY).strip())
    if upto is None:
        statements = pg_schema.upgrade_statements(version)
    else:
        statements = (*[s for step in pg_schema.MIGRATIONS[version:upto] for s in step],
                      f"UPDATE {pg_schema.VERSION_TABLE} SET version = {upto}")
    if statements:
        run("BEGIN", *pg_schema.prologue(), *statements, "COMMIT")
    return int(run(pg_schema.VERSION_QUERY).strip())


def pg_columns(server, db) -> dict[str, list[str]]:
    out = server.psql(
        "SELECT table_name, column_name FROM information_schema.columns "
        f"WHERE table_schema = 'public' AND table_name <> '{pg_schema.VERSION_TABLE}' "
        "ORDER BY table_name, ordinal_position", database=db["dbname"])
    tables: dict[str, list[str]] = {}
    for line in out.splitlines():
        table, column = line.split("|")
        if column not in pg_schema.PG_ONLY_COLUMNS.get(table, ()):
            tables.setdefault(table, []).append(column)
    return tables


def sqlite_columns(path: str) -> dict[str, list[str]]:
    conn = sqlite3.connect(path)
    try:
        names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {n: [c[1] for c in conn.execute(f"PRAGMA table_info({n})")] for n in sorted(names)}
    finally:
        conn.close()


def test_migrations_from_empty_give_sqlites_tables_and_columns(postgres_server, postgres_db,
                                                                 tmp_path):
    """One schema version means the same tables and columns on both backends, and
    timestamps are doubles (PostgreSQL's REAL would round them to about 7 digits)."""
    assert migrate_with_psql(postgres_server, postgres_db) == SCHEMA_VERSION
    migrate_file(str(tmp_path / "a.db"))
    assert pg_columns(postgres_server, postgres_db) == sqlite_columns(str(tmp_path / "a.db"))
    kind = postgres_server.psql(
        "SELECT data_type FROM information_schema.columns "
        "WHERE table_name = 'web_sessions' AND column_name = 'expires'",
        database=postgres_db["dbname"]).strip()
    assert kind == "double precision"
    assert migrate_with_psql(postgres_server, postgres_db) == SCHEMA_VERSION   # idempotent


def test_migrations_from_an_older_version_keep_the_rows(postgres_server, postgres_db):
    old = SCHEMA_VERSION - 2
    assert migrate_with_psql(postgres_server, postgres_db, upto=old) == old
    postgres_server.psql("INSERT INTO users (name, password_hash, roles, traits, created) "
                         "VALUES ('alice', NULL, '[]', '{}', 1700000000.25)",
                         database=postgres_db["dbname"])
    assert migrate_with_psql(postgres_server, postgres_db) == SCHEMA_VERSION
    row = postgres_server.psql("SELECT name, connector, created FROM users",
                               database=postgres_db["dbname"]).strip()
    assert row == "alice||1700000000.25"


def test_a_newer_schema_is_refused_with_sqlites_words():
    with pytest.raises(ValueError) as err:
        pg_schema.upgrade_statements(SCHEMA_VERSION + 1)
    assert str(err.value) == (f"database schema version {SCHEMA_VERSION + 1} is newer than "
                              f"this apptunnel understands ({SCHEMA_VERSION}); upgrade apptunnel")


# -- connection handling ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_wrong_password_is_one_error_without_the_password(postgres_db):
    b = PostgresBackend(postgres_db["dsn"], reactor, password="not-the-Secret-42")
    try:
        with pytest.raises(BackendError) as err:
            await wait(b.get_user("alice"))
    finally:
        await wait(b.close())
    text = str(err.value)
    assert "\n" not in text and "password authentication failed" in text
    assert "not-the-Secret-42" not in text and postgres_db["dbname"] in text


@pytest_twisted.ensureDeferred
async def test_a_lost_connection_is_reconnected_on_the_next_call(postgres_server, postgres_db,
                                                                  backend):
    """The server ends the backend's session (as a PostgreSQL restart would): that call
    fails with BackendError, the next one reconnects and sees the stored data."""
    await wait(backend.create_user(user()))
    postgres_server.psql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                         f"WHERE usename = '{postgres_db['user']}'")
    failed = 0
    for _ in range(2):
        try:
            assert (await wait(backend.get_user("alice"))).name == "alice"
            break
        except BackendError:
            failed += 1
    assert failed <= 1
    assert (await wait(backend.get_user("alice"))).name == "alice"


def test_proxies_migrating_at_once_run_each_step_once(postgres_db):
    """Four migrations started together on an empty database: exactly one goes from 0,
    the others wait on the advisory lock and find nothing to do."""
    results: list = []
    barrier = threading.Barrier(4)

    def one():
        barrier.wait(10)
        results.append(migrate_database(postgres_db["dsn"], postgres_db["password"]))

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(results) == [(0, SCHEMA_VERSION)] + [(SCHEMA_VERSION, SCHEMA_VERSION)] * 3


@pytest_twisted.ensureDeferred
async def test_writers_of_one_shared_chain_at_once_never_fork_it(postgres_db):
    """Issue 13 (the admin CLI's chain): three backends (three CLI runs) append to chain
    `cli` at once, five rounds: every event gets its own seq 1..15 and the chain verifies
    (the advisory lock serialises reading the head and extending it)."""
    from twisted.internet import defer

    from apptunnel.audit.chain import link
    from tests.support.backend_contract import unchained, verify_one

    backends = [PostgresBackend(postgres_db["dsn"], reactor, password=postgres_db["password"])
                for _ in range(3)]
    try:
        for b in backends:
            await wait(b.list_users())           # connected (and migrated) first
        for r in range(5):
            await wait(defer.gatherResults([
                defer.ensureDeferred(b.append_audit_chained("cli", unchained(f"r{r}w{n}", 1),
                                                            link))
                for n, b in enumerate(backends)], consumeErrors=True))
        chain = await wait(backends[0].audit_chain("cli"))
        assert sorted(e.seq for e in chain) == list(range(1, 16))
        report = await verify_one(backends[0], "cli")
        assert report.problem is None and report.events == 15
    finally:
        for b in backends:
            await wait(b.close())


# -- the installed command and config ------------------------------------------------------


def proxy_yaml(tmp_path, db, mode=0o600, dsn=None) -> str:
    pw = tmp_path / "pg-password"
    pw.write_text(db["password"] + "\n")
    os.chmod(pw, mode)
    path = tmp_path / "proxy.yaml"
    path.write_text(
        "cluster_name: test-cluster\ndata_dir: data\npublic_addr: apptunnel.localhost:3080\n"
        "web_listen_addr: 127.0.0.1:0\ntunnel_listen_addr: 127.0.0.1:0\ndiag_addr: 127.0.0.1:0\n"
        f"backend: {{type: postgres, dsn: \"{dsn or db['dsn']}\", password_file: pg-password}}\n")
    return str(path)


def run_cli(*argv) -> subprocess.CompletedProcess:
    done = subprocess.run([str(BIN / "apptunnel"), *argv], capture_output=True, text=True,
                          timeout=60)
    assert "Traceback" not in done.stdout + done.stderr
    return done


def test_apptunnel_migrate_on_postgres_says_from_and_to(tmp_path, postgres_db):
    config = proxy_yaml(tmp_path, postgres_db)
    first = run_cli("migrate", "--config", config)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == f"schema migrated from version 0 to {SCHEMA_VERSION}"
    again = run_cli("migrate", "--config", config)
    assert again.stdout.strip() == f"schema is at version {SCHEMA_VERSION}; nothing to do"


def test_migrate_refuses_a_newer_postgres_schema_in_one_line(tmp_path, postgres_server,
                                                              postgres_db):
    config = proxy_yaml(tmp_path, postgres_db)
    assert run_cli("migrate", "--config", config).returncode == 0
    postgres_server.psql(f"UPDATE {pg_schema.VERSION_TABLE} SET version = {SCHEMA_VERSION + 1}",
                         database=postgres_db["dbname"])
    done = run_cli("migrate", "--config", config)
    assert done.returncode != 0
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and f"version {SCHEMA_VERSION + 1} is newer" in lines[0], done.stderr


def test_password_file_must_be_0600_and_the_password_is_never_printed(tmp_path, postgres_db):
    config = proxy_yaml(tmp_path, postgres_db, mode=0o644)
    done = run_cli("migrate", "--config", config)
    assert done.returncode != 0
    assert "readable by group or others" in done.stderr and len(done.stderr.splitlines()) == 1
    os.chmod(tmp_path / "pg-password", 0o600)
    (tmp_path / "pg-password").write_text("wrong-Pass-77\n")
    done = run_cli("migrate", "--config", config)
    assert done.returncode != 0 and "password authentication failed" in done.stderr
    assert "wrong-Pass-77" not in done.stdout + done.stderr


# -- a real proxy on PostgreSQL -----------------------------------------------------------


def app_online(cluster: Cluster, name: str) -> bool:
    """Signed in through the API as alice: is the app listed online?"""
    s = requests.Session()
    s.trust_env = False
    with localhost_resolution():
        r = s.post(cluster.url(path="/v1/sessions"),
                   json={"username": "alice", "password": E2E_PASSWORD},
                   verify=cluster.ca_file, timeout=5)
        r.raise_for_status()
        apps = s.get(cluster.url(path="/v1/apps"), verify=cluster.ca_file, timeout=5).json()
    return any(a["name"] == name and a["online"] for a in apps["apps"])


def test_a_proxy_on_postgres_signs_in_serves_an_app_and_audits_there(tmp_path, postgres_server,
                                                                      postgres_db):
    """twistd apptunnel with backend postgres: roles and users made by the CLI, a sign-in and
    an app request through a real agent; the events are rows in PostgreSQL; the password
    is in no log."""
    upstream = HttpUpstream()
    cluster = Cluster([{"name": "hello", "uri": upstream.uri, "labels": {"team": "sre"}}],
                      root=tmp_path)
    try:
        config = yaml.safe_load(cluster.proxy_config.read_text())
        pw = cluster.root / "pg-password"
        pw.write_text(postgres_db["password"] + "\n")
        os.chmod(pw, 0o600)
        config["backend"] = {"type": "postgres", "dsn": postgres_db["dsn"],
                             "password_file": str(pw)}
        cluster.proxy_config.write_text(yaml.safe_dump(config))
        cluster.start_proxy()
        cluster.add_role({"kind": "role", "metadata": {"name": "sre"},
                          "spec": {"allow": {"app_labels": {"team": "sre"}}}})
        cluster.add_user("alice", ["sre"], E2E_PASSWORD)
        cluster.start_agent()
        wait_until(lambda: app_online(cluster, "hello"), 30, "the agent to register hello")
        browser = Browser(cluster)
        landed = browser.login_through(cluster.url("hello", "/echo?pg=1"), "alice", E2E_PASSWORD)
        assert landed.status_code == 200, landed.text
        assert landed.json()["path"] == "/echo?pg=1"
        def events() -> str:
            return postgres_server.psql("SELECT type, actor, outcome FROM audit_events",
                                        database=postgres_db["dbname"])

        wait_until(lambda: "app.request|alice|success" in events(), 10,
                   "the app.request event in PostgreSQL")
        assert "user.login|alice|success" in events()
        assert postgres_db["password"] not in (cluster.root / "proxy.log").read_text()
    finally:
        cluster.stop()
        upstream.stop()


def test_a_proxy_refuses_to_start_on_a_newer_postgres_schema(tmp_path, postgres_server,
                                                             postgres_db):
    """twistd apptunnel on a database migrated by a newer apptunnel: exit non-zero, one
    line with SQLite's words, no traceback, never serving."""
    config = proxy_yaml(tmp_path, postgres_db)
    assert run_cli("migrate", "--config", config).returncode == 0
    postgres_server.psql(f"UPDATE {pg_schema.VERSION_TABLE} SET version = {SCHEMA_VERSION + 1}",
                         database=postgres_db["dbname"])
    text = pathlib.Path(config).read_text()
    for key in ("web_listen_addr", "tunnel_listen_addr"):
        text = text.replace(f"{key}: 127.0.0.1:0", f"{key}: 127.0.0.1:{free_port()}")
    pathlib.Path(config).write_text(text)
    result = subprocess.run([str(BIN / "twistd"), "-n", "--pidfile=", "apptunnel", "--config",
                             config], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                            stdin=subprocess.DEVNULL)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output and "serving" not in output, output
    lines = [line for line in output.splitlines()
             if "#critical]" in line or "#error]" in line or "error:" in line]
    assert len(lines) == 1 and f"version {SCHEMA_VERSION + 1} is newer" in lines[0], output
    assert postgres_db["password"] not in output


@pytest_twisted.ensureDeferred
async def test_a_connection_dropped_by_the_server_does_not_fail_the_next_call(
        postgres_server, postgres_db, backend):
    """The server ends the backend's idle connection (a restart, a failover): the next
    call notices before anything ran and succeeds on a new connection, instead of failing
    whichever request came first."""
    await wait(backend.create_user(user("alice")))
    postgres_server.psql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                         f"WHERE datname = '{postgres_db['dbname']}' AND pid <> pg_backend_pid()")
    assert (await wait(backend.get_user("alice"))).name == "alice"
