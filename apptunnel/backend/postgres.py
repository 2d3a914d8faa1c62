"""PostgreSQL backend: several proxies on one database.

How it reaches PostgreSQL without blocking the reactor: psycopg 3 (synchronous API) on a
private worker thread, exactly like SqliteBackend. psycopg's async API hangs under Twisted's
default reactor (TESTBED.md §1, "illegal switch in blockon"), so it is not used.

Why psycopg[binary]: the pure-Python psycopg loads the system libpq at import, and a proxy
host has no reason to have Debian's libpq5 installed (it comes with the PostgreSQL server
or client packages, not with Python); the binary wheel bundles its own libpq.

What it shares with SQLite: the SQL. backend/sqlite.py keeps its statements plain on
purpose, so PostgresBackend reuses SqliteBackend's methods (same semantics: compare-and-set
updates, one-transaction token redemption, generation checks, audit append/search) through
_Dialect, a thin connection wrapper that rewrites the few SQLite spellings (``?``
placeholders, ``INSERT OR IGNORE``, ``BEGIN IMMEDIATE``, ``rowid``) and turns psycopg's
errors into sqlite3's, which SqliteBackend already maps to AlreadyExists/BackendError. A
method that needs different SQL on PostgreSQL is overridden here, one method per protocol
method with its SQL next to it.

Timeouts: connect_timeout on connect and statement_timeout on every statement. A lost
connection is closed and reconnected on the next call. The schema is backend/pg_schema.py,
migrated under an advisory lock when the first connection opens.
"""

from __future__ import annotations

import hashlib
import os
import re
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import psycopg
from psycopg import errors as pg_errors
from twisted.internet.interfaces import IReactorCore, IReactorFromThreads
from twisted.internet.threads import deferToThreadPool

from apptunnel.backend import pg_schema
from apptunnel.backend.base import AlreadyExists, BackendError, StorageUnavailable
from apptunnel.backend.sqlite import SqliteBackend

_T = TypeVar("_T")

CONNECT_TIMEOUT = 5          # seconds
STATEMENT_TIMEOUT_MS = 10_000

_REWRITES = (
    (re.compile(r"\bBEGIN IMMEDIATE\b"), "BEGIN"),
    (re.compile(r"\bINSERT OR IGNORE INTO\b(.*)\Z", re.S), r"INSERT INTO\1 ON CONFLICT DO NOTHING"),
    (re.compile(r"\browid\b"), "seq"),
    # A top-level field of a JSON text column: fields ->> 'name' on the jsonb value.
    (re.compile(r"\bjson_extract\((\w+), '\$\.(\w+)'\)"), r"(\1::jsonb ->> '\2')"),
    (re.compile(r"\?"), "%s"),
)


def translate(sql: str) -> str:
    """SQLite's spelling of one statement in PostgreSQL's (pure; tested directly)."""
    for pattern, replacement in _REWRITES:
        sql = pattern.sub(replacement, sql)
    return sql


def safe_dsn(dsn: str) -> str:
    """The dsn for messages: host, port, dbname and user only, never a password."""
    try:
        parts = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "postgres (unparsable dsn)"
    shown = [f"{k}={parts[k]}" for k in ("host", "port", "dbname", "user") if parts.get(k)]
    return "postgres " + " ".join(shown)


MAX_PASSWORD = 1024


def read_password_file(path: str) -> str:
    """backend.password_file: its text, one trailing newline ignored; refused when group or
    others may read it (0600) or when empty. The password itself is never in a message."""
    try:
        if os.stat(path).st_mode & 0o077:
            raise BackendError(f"backend.password_file {path}: readable by group or others "
                               f"(chmod 600 it)")
        with open(path, encoding="utf-8") as f:
            text = f.read(MAX_PASSWORD + 2)
    except (OSError, UnicodeDecodeError) as err:
        raise BackendError(f"cannot read backend.password_file {path}: "
                           f"{getattr(err, 'strerror', None) or err}") from None
    if text.endswith("\r\n"):
        text = text[:-2]
    elif text.endswith("\n"):
        text = text[:-1]
    if not text or len(text) > MAX_PASSWORD:
        raise BackendError(f"backend.password_file {path}: empty or longer than {MAX_PASSWORD}")
    return text


class _Dialect:
    """What SqliteBackend's methods call on a connection (execute, executemany, close),
    on a psycopg connection in autocommit mode (explicit BEGIN/COMMIT, as SQLite's
    isolation_level=None)."""

    def __init__(self, conn: psycopg.Connection) -> None:
        self._conn = conn
        self.executed = 0    # statements that succeeded since the worker last reset it

    @property
    def broken(self) -> bool:
        return self._conn.closed or self._conn.broken

    def execute(self, sql: str, params: Sequence[Any] = ()) -> psycopg.Cursor:
        try:
            cursor = self._conn.execute(translate(sql), list(params))
            self.executed += 1
            return cursor
        except pg_errors.IntegrityError as err:
            raise sqlite3.IntegrityError(err.diag.message_primary or str(err)) from None
        except psycopg.OperationalError as err:
            raise _Unreachable(_one_line(err)) from None
        except psycopg.Error as err:
            raise sqlite3.OperationalError(_one_line(err)) from None

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        for row in rows:
            self.execute(sql, row)

    def close(self) -> None:
        self._conn.close()


class _Unreachable(sqlite3.OperationalError):
    """psycopg's OperationalError (connection lost or refused, statement timeout, server
    shutting down) through SqliteBackend's code: it leaves the backend as
    StorageUnavailable."""


def unavailable(err: BaseException, broken: bool) -> bool:
    """Whether a failed call means "storage unavailable" (a 503) rather than a bad
    statement or record: psycopg's OperationalError, or any error on a broken connection."""
    return broken or isinstance(err, (_Unreachable, psycopg.OperationalError))


def chain_lock_key(chain: str) -> int:
    """pg_advisory_xact_lock key of an audit chain: a signed 64-bit hash of its name, in a
    different space from pg_schema.ADVISORY_LOCK_KEY (a constant) by its prefix."""
    digest = hashlib.sha256(b"apptunnel audit chain " + chain.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _connect(dsn: str, password: str | None) -> _Dialect:
    """Connect, set the statement timeout, migrate; raises BackendError on failure."""
    extra: dict[str, Any] = {"connect_timeout": CONNECT_TIMEOUT, "autocommit": True,
                             "options": f"-c statement_timeout={STATEMENT_TIMEOUT_MS}"}
    if password is not None:
        extra["password"] = password
    conn = psycopg.connect(dsn, **extra)
    try:
        _migrate(conn)
    except BaseException:
        conn.close()
        raise
    return _Dialect(conn)


def _migrate(conn: psycopg.Connection) -> tuple[int, int]:
    """Bring the schema to SCHEMA_VERSION in one transaction under the advisory lock;
    (version before, after). BackendError on a newer schema."""
    with conn.transaction():
        for statement in pg_schema.prologue():
            conn.execute(statement)
        before = int(conn.execute(pg_schema.VERSION_QUERY).fetchone()[0])
        try:
            statements = pg_schema.upgrade_statements(before)
        except ValueError as err:
            raise BackendError(str(err)) from None
        for statement in statements:
            conn.execute(statement)
    return before, pg_schema.SCHEMA_VERSION


def migrate_database(dsn: str, password: str | None) -> tuple[int, int]:
    """`apptunnel migrate` on PostgreSQL: (version before, after). Blocking: CLI only."""
    extra: dict[str, Any] = {"connect_timeout": CONNECT_TIMEOUT, "autocommit": True}
    if password is not None:
        extra["password"] = password
    try:
        conn = psycopg.connect(dsn, **extra)
    except psycopg.Error as err:
        raise BackendError(f"{safe_dsn(dsn)}: {_one_line(err)}") from None
    try:
        return _migrate(conn)
    except psycopg.Error as err:
        raise BackendError(f"{safe_dsn(dsn)}: {_one_line(err)}") from None
    finally:
        conn.close()


class PostgresBackend(SqliteBackend):
    """The Backend protocol on one PostgreSQL database (see the module docstring)."""

    def __init__(self, dsn: str, reactor: IReactorCore, *, password: str | None = None) -> None:
        super().__init__(safe_dsn(dsn), reactor)
        self._dsn = dsn
        self._password = password

    async def _run(self, fn: Callable[[Any], _T]) -> _T:
        if self._closed:
            raise BackendError(f"{self.path}: backend is closed")
        reactor: IReactorFromThreads = self._reactor   # type: ignore[assignment]
        return await deferToThreadPool(reactor, self._pool, self._call, fn)

    def _call(self, fn: Callable[[Any], _T]) -> _T:
        """Worker thread: (re)connect when needed, run fn, errors as SQLite's become.

        A connection the server dropped while it sat idle (a PostgreSQL restart, a
        failover) is only found out by the next statement: when that very first
        statement of ``fn`` finds it broken, nothing was done, so ``fn`` runs once more on
        a fresh connection instead of failing the request that happened to come first."""
        try:
            try:
                return self._call_once(fn)
            except (sqlite3.Error, psycopg.Error):
                conn = self._conn
                if conn is None or not conn.broken or conn.executed:
                    raise
                self._close_in_thread()
                return self._call_once(fn)
        except BackendError:
            raise
        except sqlite3.IntegrityError as err:
            raise AlreadyExists(f"{self.path}: already exists ({err})") from None
        except (sqlite3.Error, psycopg.Error) as err:
            broken = self._conn is not None and self._conn.broken
            if broken:
                self._close_in_thread()
            kind = StorageUnavailable if unavailable(err, broken) else BackendError
            raise kind(f"{self.path}: {_one_line(err)}") from None
        except (TypeError, ValueError) as err:
            raise BackendError(f"{self.path}: cannot encode record: {err}") from None

    def _call_once(self, fn: Callable[[Any], _T]) -> _T:
        if self._conn is not None and self._conn.broken:
            self._close_in_thread()
        if self._conn is None:
            self._conn = _connect(self._dsn, self._password)
        self._conn.executed = 0
        return fn(self._conn)

    def _lock_chain(self, conn: Any, chain: str) -> None:
        """Two transactions may both read a chain's head (no row lock covers an empty
        chain or the next seq): an advisory lock on the chain's name serialises them."""
        conn.execute("SELECT pg_advisory_xact_lock(?)", (chain_lock_key(chain),))

    def _close_in_thread(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None
