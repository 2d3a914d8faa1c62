"""PostgreSQL storage (issue 13): one throwaway server for the test session
(tests/support/postgres.py), a fresh database per test.

The storage contract (tests/support/backend_contract.py) runs here on PostgresBackend;
plus the server helper, and the schema (backend/pg_schema.py) from empty and from an older
version.
"""

from __future__ import annotations

import sqlite3

import pytest
import pytest_twisted
from twisted.internet import reactor

from apptunnel.backend import pg_schema
from apptunnel.backend.sqlite import SCHEMA_VERSION, migrate_file
from apptunnel.backend.postgres import PostgresBackend
from tests.support.backend_contract import *  # noqa: F401,F403 - the contract tests
from tests.support.postgres import PostgresServer
from tests.support.waiting import wait


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
