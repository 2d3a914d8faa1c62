"""`apptunnel migrate` (issue 13), the installed command on a real SQLite file: it says from
which schema version to which, is a no-op the second time, upgrades an older file, and
refuses (one line, non-zero) a file newer than it knows, which a proxy refuses too."""

from __future__ import annotations

import os
import sqlite3
import subprocess

from apptunnel.backend.sqlite import _MIGRATIONS, SCHEMA_VERSION
from apptunnel.config import load_proxy_config
from tests.support.cli_admin import config_path  # noqa: F401 - the fixture
from tests.support.cluster import BIN

TIMEOUT = 30


def migrate(config: str) -> subprocess.CompletedProcess:
    done = subprocess.run([str(BIN / "apptunnel"), "migrate", "--config", config],
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert "Traceback" not in done.stdout + done.stderr
    return done


def db_path(config: str) -> str:
    return load_proxy_config(config).backend_path


def version(path: str) -> int:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("PRAGMA user_version").fetchone()[0]
    finally:
        conn.close()


def test_migrate_a_new_file_then_again(config_path):  # noqa: F811
    first = migrate(config_path)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == f"schema migrated from version 0 to {SCHEMA_VERSION}"
    assert version(db_path(config_path)) == SCHEMA_VERSION
    again = migrate(config_path)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == f"schema is at version {SCHEMA_VERSION}; nothing to do"


def test_migrate_upgrades_an_older_schema_keeping_its_rows(config_path):  # noqa: F811
    """A file at the previous version (with a user in it) comes up to the current one."""
    path = db_path(config_path)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None)
    for statements in _MIGRATIONS[:SCHEMA_VERSION - 1]:
        for statement in statements:
            conn.execute(statement)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION - 1}")
    conn.execute("INSERT INTO users (name, password_hash, roles, traits, created) "
                 "VALUES ('alice', NULL, '[]', '{}', 1.0)")
    conn.close()
    done = migrate(config_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (f"schema migrated from version {SCHEMA_VERSION - 1} "
                                   f"to {SCHEMA_VERSION}")
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT name FROM users").fetchall() == [("alice",)]
    conn.close()


def test_migrate_refuses_a_newer_schema_in_one_line(config_path):  # noqa: F811
    assert migrate(config_path).returncode == 0
    path = db_path(config_path)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    done = migrate(config_path)
    assert done.returncode != 0
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("apptunnel: error: "), done.stderr
    assert f"version {SCHEMA_VERSION + 1} is newer" in lines[0] and "upgrade apptunnel" in lines[0]
    assert version(path) == SCHEMA_VERSION + 1   # untouched
