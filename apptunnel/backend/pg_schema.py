"""The PostgreSQL schema: SQLite's migrations (backend/sqlite.py _MIGRATIONS) translated
step by step, so one schema version number means the same tables and columns on both
backends and a new SQLite migration is a new PostgreSQL one without a second copy to keep
in step.

The translation is by column type only: SQLite REAL (a double) becomes DOUBLE PRECISION
(PostgreSQL's REAL is a 4-byte float: timestamps would lose seconds) and INTEGER becomes
BIGINT. Everything else in those statements is already plain SQL both engines accept.

The version lives in a one-row table (PostgreSQL has no PRAGMA user_version). Migrating
runs in one transaction under a transaction-scoped advisory lock, so proxies starting at
once on one database run each step exactly once: the second waits, re-reads the version
and finds nothing to do.
"""

from __future__ import annotations

import re

from apptunnel.backend.sqlite import MIGRATIONS as _SQLITE_MIGRATIONS
from apptunnel.backend.sqlite import SCHEMA_VERSION

__all__ = ["ADVISORY_LOCK_KEY", "MIGRATIONS", "SCHEMA_VERSION", "newer_schema_message",
           "upgrade_statements"]

# pg_advisory_xact_lock key for migrations: any constant that no other user of the
# database picks; this is "apptunnl" as a big-endian 64-bit integer.
ADVISORY_LOCK_KEY = int.from_bytes(b"apptunnl", "big") - (1 << 63)

VERSION_TABLE = "apptunnel_schema"

_TYPES = ((re.compile(r"\bREAL\b"), "DOUBLE PRECISION"), (re.compile(r"\bINTEGER\b"), "BIGINT"))


def _translate(statement: str) -> str:
    for pattern, replacement in _TYPES:
        statement = pattern.sub(replacement, statement)
    return statement


# PostgreSQL-only additions, by step: audit_events.seq stands for SQLite's implicit rowid
# (search_audit orders ties in time by insertion order).
_EXTRA: dict[int, tuple[str, ...]] = {0: ("ALTER TABLE audit_events ADD COLUMN seq BIGSERIAL",)}

# Changes that must act at once on every proxy (backend/notify.py): a statement on one of
# these tables announces itself with pg_notify, whoever made it. Sessions only when they
# end (a logout, `users reset`): a new one concerns only the proxy that made it.
NOTIFY_CHANNEL = "apptunnel_changes"
NOTIFY_TABLES = {"locks": "INSERT OR UPDATE OR DELETE", "users": "INSERT OR UPDATE OR DELETE",
                 "resources": "INSERT OR UPDATE OR DELETE",
                 "access_requests": "INSERT OR UPDATE OR DELETE",
                 "bots": "INSERT OR UPDATE OR DELETE", "web_sessions": "DELETE",
                 "app_sessions": "DELETE"}


def _notify_statements() -> tuple[str, ...]:
    function = ("CREATE OR REPLACE FUNCTION apptunnel_notify() RETURNS trigger "
                "LANGUAGE plpgsql AS $$ BEGIN "
                f"PERFORM pg_notify('{NOTIFY_CHANNEL}', TG_TABLE_NAME); RETURN NULL; END $$")
    return (function, *(f"CREATE TRIGGER {table}_notify AFTER {events} ON {table} "
                        "FOR EACH STATEMENT EXECUTE FUNCTION apptunnel_notify()"
                        for table, events in NOTIFY_TABLES.items()))


def _step_creating(table: str) -> int:
    """The index of the SQLite step that creates ``table`` (robust to renumbering)."""
    return next(i for i, step in enumerate(_SQLITE_MIGRATIONS)
                if any(f"CREATE TABLE {table} " in s for s in step))


_EXTRA[_step_creating("proxies")] = _notify_statements()
PG_ONLY_COLUMNS = {"audit_events": ("seq",)}

MIGRATIONS: tuple[tuple[str, ...], ...] = tuple(
    (*(_translate(s) for s in step), *_EXTRA.get(i, ()))
    for i, step in enumerate(_SQLITE_MIGRATIONS)
)
assert len(MIGRATIONS) == SCHEMA_VERSION


def newer_schema_message(version: int) -> str:
    """The same words SQLite uses (backend/sqlite.py _migrate)."""
    return (f"database schema version {version} is newer than this apptunnel "
            f"understands ({SCHEMA_VERSION}); upgrade apptunnel")


def prologue() -> tuple[str, ...]:
    """Run first inside the migration transaction: take the lock, make the version table."""
    return (
        f"SELECT pg_advisory_xact_lock({ADVISORY_LOCK_KEY})",
        f"CREATE TABLE IF NOT EXISTS {VERSION_TABLE} (version BIGINT NOT NULL)",
        f"INSERT INTO {VERSION_TABLE} (version) SELECT 0 "
        f"WHERE NOT EXISTS (SELECT 1 FROM {VERSION_TABLE})",
    )


VERSION_QUERY = f"SELECT version FROM {VERSION_TABLE}"


def upgrade_statements(version: int) -> tuple[str, ...]:
    """What brings a database at `version` (read after prologue(), under the lock) to
    SCHEMA_VERSION; empty when it is there. ValueError (with newer_schema_message) when the
    database is newer than this apptunnel."""
    if version > SCHEMA_VERSION:
        raise ValueError(newer_schema_message(version))
    if version == SCHEMA_VERSION:
        return ()
    steps = [s for step in MIGRATIONS[version:] for s in step]
    return (*steps, f"UPDATE {VERSION_TABLE} SET version = {SCHEMA_VERSION}")
