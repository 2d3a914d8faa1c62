"""PostgreSQL storage (issue 13): one throwaway server for the test session
(tests/support/postgres.py), a fresh database per test.

What is here today: the server helper itself. The storage contract
(tests/support/backend_contract.py) is to be imported here with a `backend` fixture on a
PostgresBackend once apptunnel/backend/postgres.py exists (see the issue-13 report).
"""

from __future__ import annotations

import pytest

from tests.support.postgres import PostgresServer


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
