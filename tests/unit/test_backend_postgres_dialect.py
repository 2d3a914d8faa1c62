"""The pure parts of backend/postgres.py: SQLite's spellings rewritten for PostgreSQL, and
the dsn as messages show it (never a password)."""

from __future__ import annotations

from apptunnel.backend.postgres import safe_dsn, translate


def test_sqlite_spellings_become_postgres_ones():
    assert translate("SELECT a FROM t WHERE b = ? AND c = ?") == \
        "SELECT a FROM t WHERE b = %s AND c = %s"
    assert translate("BEGIN IMMEDIATE") == "BEGIN"
    assert translate("INSERT OR IGNORE INTO r (a, b) VALUES (?, ?)") == \
        "INSERT INTO r (a, b) VALUES (%s, %s) ON CONFLICT DO NOTHING"
    assert translate("SELECT x FROM audit_events ORDER BY time, rowid LIMIT ?") == \
        "SELECT x FROM audit_events ORDER BY time, seq LIMIT %s"
    assert translate("SELECT rowidx FROM t") == "SELECT rowidx FROM t"
    assert translate("WHERE json_extract(fields, '$.request_id') = ?") == \
        "WHERE (fields::jsonb ->> 'request_id') = %s"


def test_messages_show_the_dsn_without_a_password():
    assert safe_dsn("host=db port=5433 dbname=a user=u password=hunter2") == \
        "postgres host=db port=5433 dbname=a user=u"
    assert "hunter2" not in safe_dsn("postgresql://u:hunter2@db/a")
    assert "hunter2" not in safe_dsn("host='unterminated password=hunter2")
