"""SQLite backend: the default single-machine store.

Every call runs on one private worker thread, so the reactor never waits on disk and the
connection is never used by two threads at once. WAL mode plus a busy timeout let the CLI
and a running proxy share the file. The SQL is deliberately plain (no sqlite-only
features in the interface) so a PostgreSQL backend can mirror it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorCore, IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from apptunnel.audit.chain import GENESIS
from apptunnel.backend.base import (
    AGENT_STATE,
    LINK_KEEP,
    MAX_SEARCH_LIMIT,
    AlreadyExists,
    BackendError,
    StorageUnavailable,
    NotFound,
)
from apptunnel.backend.records import (
    AccessRequest,
    AppSession,
    AuditEvent,
    Agent,
    AgentTunnel,
    AuthCode,
    Bot,
    JoinToken,
    KeyRecord,
    Lock,
    MfaDevice,
    ProxyRecord,
    Resource,
    Review,
    SamlRequest,
    Scope,
    SignInState,
    User,
    UserLink,
    WebSession,
)

# Rows per audit INSERT: 12 parameters each, under SQLite's historic 999-variable limit.
_AUDIT_ROWS_PER_INSERT = 80
_AUDIT_COLUMNS = ("id, time, type, code, actor, target, outcome, fields,"
                  " proxy_id, chain_seq, chain_prev, chain_digest")

_T = TypeVar("_T")

BUSY_TIMEOUT_MS = 5000
_WAL_RETRY_MS = 10

# Each entry upgrades the schema by one version (PRAGMA user_version). Append only:
# never edit a migration that has shipped.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE users (
            name TEXT PRIMARY KEY,
            password_hash TEXT,
            roles TEXT NOT NULL,
            traits TEXT NOT NULL,
            created REAL NOT NULL)""",
        """CREATE TABLE resources (
            kind TEXT NOT NULL,
            name TEXT NOT NULL,
            doc TEXT NOT NULL,
            PRIMARY KEY (kind, name))""",
        """CREATE TABLE join_tokens (
            token_hash TEXT PRIMARY KEY,
            kind TEXT NOT NULL,
            expires REAL NOT NULL,
            created REAL NOT NULL)""",
        """CREATE TABLE web_sessions (
            id_hash TEXT PRIMARY KEY,
            user_name TEXT NOT NULL,
            roles TEXT NOT NULL,
            traits TEXT NOT NULL,
            created REAL NOT NULL,
            expires REAL NOT NULL)""",
        "CREATE INDEX web_sessions_user ON web_sessions (user_name)",
        """CREATE TABLE app_sessions (
            id_hash TEXT PRIMARY KEY,
            web_session TEXT NOT NULL,
            user_name TEXT NOT NULL,
            app TEXT NOT NULL,
            created REAL NOT NULL,
            expires REAL NOT NULL)""",
        "CREATE INDEX app_sessions_web ON app_sessions (web_session)",
        "CREATE INDEX app_sessions_user ON app_sessions (user_name)",
        """CREATE TABLE auth_codes (
            code_hash TEXT PRIMARY KEY,
            web_session TEXT NOT NULL,
            app TEXT NOT NULL,
            path TEXT NOT NULL,
            state_hash TEXT NOT NULL,
            expires REAL NOT NULL)""",
        "CREATE INDEX auth_codes_web ON auth_codes (web_session)",
        """CREATE TABLE audit_events (
            id TEXT PRIMARY KEY,
            time REAL NOT NULL,
            type TEXT NOT NULL,
            code TEXT NOT NULL,
            actor TEXT NOT NULL,
            target TEXT NOT NULL,
            outcome TEXT NOT NULL,
            fields TEXT NOT NULL)""",
        "CREATE INDEX audit_events_time ON audit_events (time)",
        "CREATE INDEX audit_events_type_time ON audit_events (type, time)",
    ),
    (
        """CREATE TABLE locks (
            id TEXT PRIMARY KEY,
            user_name TEXT,
            app TEXT,
            message TEXT NOT NULL,
            created REAL NOT NULL,
            expires REAL,
            created_by TEXT NOT NULL)""",
        "CREATE INDEX app_sessions_app ON app_sessions (app)",
    ),
    (
        # Tokens made before version 3 keep working as they did: unlimited uses
        # (uses_left NULL) and an unlimited scope ('{}').
        "ALTER TABLE join_tokens ADD COLUMN uses_left INTEGER",
        "ALTER TABLE join_tokens ADD COLUMN scope TEXT NOT NULL DEFAULT '{}'",
        """CREATE TABLE agents (
            host_id TEXT PRIMARY KEY,
            scope TEXT NOT NULL,
            joined REAL NOT NULL,
            cert_expires REAL NOT NULL,
            key_pin TEXT NOT NULL,
            last_seen REAL,
            connected_since REAL,
            peer TEXT NOT NULL,
            proxy_id TEXT NOT NULL,
            apps TEXT NOT NULL)""",
        "ALTER TABLE locks ADD COLUMN agent TEXT",
    ),
    (
        # Invite/reset links, second factors and recovery codes (auth/links.py, auth/mfa.py).
        "ALTER TABLE web_sessions ADD COLUMN enroll_only INTEGER NOT NULL DEFAULT 0",
        """CREATE TABLE user_links (
            token_hash TEXT PRIMARY KEY,
            user_name TEXT NOT NULL,
            kind TEXT NOT NULL,
            created REAL NOT NULL,
            expires REAL NOT NULL,
            used REAL)""",
        "CREATE INDEX user_links_user ON user_links (user_name)",
        """CREATE TABLE mfa_devices (
            user_name TEXT NOT NULL,
            name TEXT NOT NULL,
            kind TEXT NOT NULL,
            secret TEXT NOT NULL,
            counter INTEGER NOT NULL,
            created REAL NOT NULL,
            PRIMARY KEY (user_name, name))""",
        """CREATE TABLE recovery_codes (
            user_name TEXT NOT NULL,
            code_hash TEXT NOT NULL,
            PRIMARY KEY (user_name, code_hash))""",
    ),
    (
        # Users made by a connector's sign-in (LDAP, later OIDC/SAML) name it; '' = local.
        "ALTER TABLE users ADD COLUMN connector TEXT NOT NULL DEFAULT ''",
    ),
    (
        # Per-session MFA: a hand-off and the app session it starts after a fresh second
        # factor say so (auth/access.py); rows from before were started without one.
        "ALTER TABLE auth_codes ADD COLUMN mfa_verified INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE app_sessions ADD COLUMN mfa_verified INTEGER NOT NULL DEFAULT 0",
    ),
    (
        # Outstanding SAML AuthnRequest ids, each accepted once (auth/connectors/saml.py).
        """CREATE TABLE saml_requests (
            request_id TEXT PRIMARY KEY,
            connector TEXT NOT NULL,
            target TEXT NOT NULL,
            expires REAL NOT NULL)""",
    ),
    (
        # Where `apptunnel login --auth` waits for a SAML sign-in it started ('' = none).
        "ALTER TABLE saml_requests ADD COLUMN cli TEXT NOT NULL DEFAULT ''",
    ),
    (
        # An agent whose tunnel is going away (shutdown): `apptunnel apps ls --admin`.
        "ALTER TABLE agents ADD COLUMN draining INTEGER NOT NULL DEFAULT 0",
    ),
    (
        # Bots (auth/bots.py): a join token names its bot ('' for agent tokens).
        "ALTER TABLE join_tokens ADD COLUMN bot TEXT NOT NULL DEFAULT ''",
        """CREATE TABLE bots (
            name TEXT PRIMARY KEY,
            roles TEXT NOT NULL,
            created REAL NOT NULL,
            generation INTEGER NOT NULL,
            cert_expires REAL)""",
    ),
    (
        # Access requests (auth/access_requests.py), and the ones a web session assumed.
        """CREATE TABLE access_requests (
            id TEXT PRIMARY KEY,
            user_name TEXT NOT NULL,
            roles TEXT NOT NULL,
            apps TEXT NOT NULL,
            reason TEXT NOT NULL,
            state TEXT NOT NULL,
            created REAL NOT NULL,
            ttl REAL NOT NULL,
            expires REAL NOT NULL,
            approve INTEGER NOT NULL,
            deny INTEGER NOT NULL,
            reviews TEXT NOT NULL)""",
        "CREATE INDEX access_requests_user ON access_requests (user_name)",
        "CREATE INDEX access_requests_state ON access_requests (state)",
        "ALTER TABLE web_sessions ADD COLUMN requests TEXT NOT NULL DEFAULT '[]'",
    ),
    (
        "ALTER TABLE web_sessions ADD COLUMN method TEXT NOT NULL DEFAULT ''",
    ),
    (
        # What each agent's last hello said it runs (the admin agents page).
        "ALTER TABLE agents ADD COLUMN version TEXT NOT NULL DEFAULT ''",
    ),
    (
        # Cluster keys (auth/keystore.py): CA, JWT signing and SAML SP keys, shared by
        # every proxy on the store; at most one `current` and one `next` key per kind.
        """CREATE TABLE keys (
            kind TEXT NOT NULL,
            id TEXT NOT NULL,
            state TEXT NOT NULL,
            material TEXT NOT NULL,
            public TEXT NOT NULL,
            created REAL NOT NULL,
            activate_at REAL,
            retire_at REAL,
            PRIMARY KEY (kind, id))""",
        "CREATE UNIQUE INDEX keys_one_current ON keys (kind) WHERE state = 'current'",
        "CREATE UNIQUE INDEX keys_one_next ON keys (kind) WHERE state = 'next'",
    ),
    (
        # Several proxies (proxy/peers.py): each one's row, kept fresh by its heartbeat,
        # and one row per live (agent, proxy) tunnel.
        "CREATE TABLE proxies (proxy_id TEXT PRIMARY KEY, tunnel_addr TEXT NOT NULL, "
        "version TEXT NOT NULL, started REAL NOT NULL, heartbeat REAL NOT NULL)",
        "CREATE TABLE agent_tunnels (host_id TEXT NOT NULL, proxy_id TEXT NOT NULL, "
        "peer TEXT NOT NULL, since REAL NOT NULL, PRIMARY KEY (host_id, proxy_id))",
    ),
    (
        # The per-proxy audit hash chain (audit/chain.py); older rows stay unchained
        # (proxy_id '', chain_seq NULL).
        "ALTER TABLE audit_events ADD COLUMN proxy_id TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE audit_events ADD COLUMN chain_seq INTEGER",
        "ALTER TABLE audit_events ADD COLUMN chain_prev TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE audit_events ADD COLUMN chain_digest TEXT NOT NULL DEFAULT ''",
        "CREATE INDEX audit_events_chain ON audit_events (proxy_id, chain_seq)",
    ),
    (
        # Pending sign-in steps (auth/signin_states.py): a second-factor ticket, a WebAuthn
        # challenge, an OIDC flow, finished on whichever proxy or worker the next request
        # reaches; keyed by the hash of the step's secret.
        "CREATE TABLE signin_states (key_hash TEXT PRIMARY KEY, kind TEXT NOT NULL, "
        "body TEXT NOT NULL, expires REAL NOT NULL)",
        "CREATE INDEX signin_states_kind ON signin_states (kind, expires)",
    ),
)

SCHEMA_VERSION = len(_MIGRATIONS)
MIGRATIONS = _MIGRATIONS   # public for backend/pg_schema.py, which translates them


def _dump(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _traits(text: str) -> dict[str, tuple[str, ...]]:
    return {k: tuple(v) for k, v in json.loads(text).items()}


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """A write transaction that takes the lock up front, so readers never deadlock-upgrade."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _open_connection(path: str) -> sqlite3.Connection:
    """Create the file 0600 before SQLite sees it, then set the pragmas and migrate."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.close(fd)
    conn = sqlite3.connect(
        path,
        timeout=BUSY_TIMEOUT_MS / 1000,
        isolation_level=None,
        check_same_thread=False,
    )
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        _use_wal(conn)
        conn.execute("PRAGMA synchronous = NORMAL")
        _migrate(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def _use_wal(conn: sqlite3.Connection) -> None:
    """Switch the file to WAL (a no-op once it is). Two connections switching one new file
    at the same moment (the CLI and a starting proxy) get "database is locked" at once:
    SQLite skips its busy handler there. So retry, on this worker thread, for about the
    busy timeout."""
    for _ in range(BUSY_TIMEOUT_MS // _WAL_RETRY_MS):
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as err:
            if "locked" not in str(err):
                raise
        time.sleep(_WAL_RETRY_MS / 1000)
    conn.execute("PRAGMA journal_mode = WAL")


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring the schema to SCHEMA_VERSION; safe when two processes open a new file at once."""
    if _user_version(conn) == SCHEMA_VERSION:
        return
    with _transaction(conn):
        version = _user_version(conn)   # re-read under the write lock
        if version > SCHEMA_VERSION:
            raise BackendError(
                f"database schema version {version} is newer than this apptunnel "
                f"understands ({SCHEMA_VERSION}); upgrade apptunnel"
            )
        for statements in _MIGRATIONS[version:]:
            for statement in statements:
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def migrate_file(path: str) -> tuple[int, int]:
    """`apptunnel migrate`: bring the file's schema to SCHEMA_VERSION now (a proxy would do
    it when it opens the file) and return (version before, version after). BackendError when
    the file's schema is newer than this apptunnel knows. Blocking: for the CLI, not the
    reactor."""
    before = 0
    if os.path.exists(path):
        probe = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_MS / 1000)
        try:
            before = _user_version(probe)
        finally:
            probe.close()
    _open_connection(path).close()
    return before, SCHEMA_VERSION


def _user_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def _user(row: tuple) -> User:
    return User(
        name=row[0],
        password_hash=row[1],
        roles=tuple(json.loads(row[2])),
        traits=_traits(row[3]),
        created=row[4],
        connector=row[5],
    )


def _web_session(row: tuple) -> WebSession:
    return WebSession(
        id_hash=row[0],
        user=row[1],
        roles=tuple(json.loads(row[2])),
        traits=_traits(row[3]),
        created=row[4],
        expires=row[5],
        enroll_only=bool(row[6]),
        requests=tuple(json.loads(row[7])),
        method=row[8],
    )


def _access_request(row: tuple) -> AccessRequest:
    return AccessRequest(
        id=row[0], user=row[1], roles=tuple(json.loads(row[2])),
        apps=tuple(json.loads(row[3])), reason=row[4], state=row[5], created=row[6],
        ttl=row[7], expires=row[8], approve=row[9], deny=row[10],
        reviews=tuple(Review(v["author"], bool(v["approve"]), v["reason"], v["created"])
                      for v in json.loads(row[11])),
    )


def _request_row(r: AccessRequest) -> tuple:
    reviews = [{"author": v.author, "approve": v.approve, "reason": v.reason,
                "created": v.created} for v in r.reviews]
    return (r.id, r.user, _dump(list(r.roles)), _dump(list(r.apps)), r.reason, r.state,
            r.created, r.ttl, r.expires, r.approve, r.deny, _dump(reviews))


def _app_session(row: tuple) -> AppSession:
    return AppSession(*row[:6], mfa_verified=bool(row[6]))


_TOKEN_COLUMNS = "token_hash, kind, expires, created, uses_left, scope, bot"
_BOT_COLUMNS = "name, roles, created, generation, cert_expires"
_AGENT_COLUMNS = ("host_id, scope, joined, cert_expires, key_pin, last_seen, connected_since,"
                  " peer, proxy_id, apps, draining, version")
_LOCK_COLUMNS = "id, user_name, app, message, created, expires, created_by, agent"
_KEY_COLUMNS = "kind, id, state, material, public, created, activate_at, retire_at"
_WEB_COLUMNS = ("id_hash, user_name, roles, traits, created, expires, enroll_only, requests,"
                " method")
_REQUEST_COLUMNS = ("id, user_name, roles, apps, reason, state, created, ttl, expires, approve,"
                    " deny, reviews")
_LINK_COLUMNS = "token_hash, user_name, kind, created, expires, used"
_DEVICE_COLUMNS = "user_name, name, kind, secret, counter, created"


def _token(row: tuple) -> JoinToken:
    return JoinToken(*row[:5], scope=Scope.from_json(json.loads(row[5])), bot=row[6])


def _bot(row: tuple) -> Bot:
    return Bot(row[0], tuple(json.loads(row[1])), *row[2:5])


def _agent(row: tuple) -> Agent:
    return Agent(row[0], Scope.from_json(json.loads(row[1])), *row[2:9],
                 apps=tuple(json.loads(row[9])), draining=bool(row[10]), version=row[11])


def _audit_event(row: tuple) -> AuditEvent:
    return AuditEvent(*row[:7], fields=json.loads(row[7]), proxy_id=row[8],
                      seq=row[9] or 0, prev=row[10], digest=row[11])


# SQLite's primary result codes that say the file cannot be used right now (busy past
# the busy timeout, locked, I/O error, disk full, cannot open), not that a request is bad.
_UNAVAILABLE_CODES = frozenset({5, 6, 10, 13, 14})   # BUSY LOCKED IOERR FULL CANTOPEN


def unavailable(err: sqlite3.Error) -> bool:
    """Whether a driver error means "storage unavailable" (StorageUnavailable, a 503)
    rather than a bad statement or record (pure; tested directly)."""
    code = getattr(err, "sqlite_errorcode", None)
    return code is not None and (code & 0xFF) in _UNAVAILABLE_CODES


class _Unchanged(BackendError):
    """A compare-and-set found a row not in the state expected: roll back, answer False."""


class SqliteBackend:
    """The Backend protocol on one SQLite file, driven from a private one-thread pool."""

    _log = Logger()

    def __init__(self, path: str, reactor: IReactorCore) -> None:
        self._path = path
        self._reactor = reactor
        self._conn: sqlite3.Connection | None = None   # touched only on the worker thread
        self._closed = False
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name="apptunnel-sqlite")
        # Daemon: a backend nobody closed must not keep the process alive at exit. A write
        # cut short that way is a rolled-back transaction, never a corrupt file (WAL).
        self._pool.threadFactory = functools.partial(threading.Thread, daemon=True)
        self._pool.start()
        self._shutdown_trigger = reactor.addSystemEventTrigger(
            "during", "shutdown", self._on_shutdown
        )

    @property
    def path(self) -> str:
        return self._path

    # -- plumbing ---------------------------------------------------------------

    async def _run(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        if self._closed:
            raise BackendError(f"sqlite {self._path}: backend is closed")
        reactor: IReactorFromThreads = self._reactor   # type: ignore[assignment]
        return await deferToThreadPool(reactor, self._pool, self._call, fn)

    def _call(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        """Worker thread: open lazily, run fn, and turn driver errors into BackendError."""
        try:
            if self._conn is None:
                self._conn = _open_connection(self._path)
            return fn(self._conn)
        except BackendError:
            raise
        except sqlite3.IntegrityError as err:
            raise AlreadyExists(f"sqlite {self._path}: already exists ({err})") from None
        except sqlite3.Error as err:
            kind = StorageUnavailable if unavailable(err) else BackendError
            raise kind(f"sqlite {self._path}: {err}") from None
        except OSError as err:
            raise StorageUnavailable(f"sqlite {self._path}: {err.strerror or err}") from None
        except (TypeError, ValueError) as err:
            raise BackendError(f"sqlite {self._path}: cannot encode record: {err}") from None

    def _close_in_thread(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def close(self) -> None:
        """Close the connection on its own thread, then stop that thread."""
        if self._closed:
            return
        self._closed = True
        reactor: IReactorFromThreads = self._reactor   # type: ignore[assignment]
        try:
            await deferToThreadPool(reactor, self._pool, self._close_in_thread)
        finally:
            self._pool.stop()
            self._reactor.removeSystemEventTrigger(self._shutdown_trigger)

    def _on_shutdown(self) -> Deferred:
        return Deferred.fromCoroutine(self.close())

    # -- users ------------------------------------------------------------------

    async def create_user(self, user: User) -> None:
        def run(conn: sqlite3.Connection) -> None:
            try:
                conn.execute(
                    "INSERT INTO users (name, password_hash, roles, traits, created, connector)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (user.name, user.password_hash, _dump(list(user.roles)),
                     _dump(user.traits), user.created, user.connector),
                )
            except sqlite3.IntegrityError:
                raise AlreadyExists(f"user {user.name!r} already exists") from None

        await self._run(run)

    async def update_user(self, user: User) -> None:
        def run(conn: sqlite3.Connection) -> None:
            cur = conn.execute(
                "UPDATE users SET password_hash = ?, roles = ?, traits = ?, connector = ?"
                " WHERE name = ?",
                (user.password_hash, _dump(list(user.roles)), _dump(user.traits),
                 user.connector, user.name),
            )
            if cur.rowcount == 0:
                raise NotFound(f"user {user.name!r} does not exist")

        await self._run(run)

    async def get_user(self, name: str) -> User | None:
        def run(conn: sqlite3.Connection) -> User | None:
            row = conn.execute(
                "SELECT name, password_hash, roles, traits, created, connector FROM users"
                " WHERE name = ?",
                (name,),
            ).fetchone()
            return _user(row) if row else None

        return await self._run(run)

    async def list_users(self) -> list[User]:
        def run(conn: sqlite3.Connection) -> list[User]:
            rows = conn.execute(
                "SELECT name, password_hash, roles, traits, created, connector FROM users"
                " ORDER BY name"
            ).fetchall()
            return [_user(row) for row in rows]

        return await self._run(run)

    async def delete_user(self, name: str) -> bool:
        """Remove the user and every session and pending hand-off that belongs to them."""
        def run(conn: sqlite3.Connection) -> bool:
            with _transaction(conn):
                conn.execute(
                    "DELETE FROM auth_codes WHERE web_session IN"
                    " (SELECT id_hash FROM web_sessions WHERE user_name = ?)",
                    (name,),
                )
                conn.execute("DELETE FROM app_sessions WHERE user_name = ?", (name,))
                conn.execute("DELETE FROM web_sessions WHERE user_name = ?", (name,))
                for table in ("user_links", "mfa_devices", "recovery_codes"):
                    conn.execute(f"DELETE FROM {table} WHERE user_name = ?", (name,))
                cur = conn.execute("DELETE FROM users WHERE name = ?", (name,))
                return cur.rowcount > 0

        return await self._run(run)

    # -- resources --------------------------------------------------------------

    async def put_resource(self, res: Resource) -> None:
        def run(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO resources (kind, name, doc) VALUES (?, ?, ?)"
                " ON CONFLICT (kind, name) DO UPDATE SET doc = excluded.doc",
                (res.kind, res.name, _dump(res.doc)),
            )

        await self._run(run)

    async def get_resource(self, kind: str, name: str) -> Resource | None:
        def run(conn: sqlite3.Connection) -> Resource | None:
            row = conn.execute(
                "SELECT kind, name, doc FROM resources WHERE kind = ? AND name = ?",
                (kind, name),
            ).fetchone()
            return Resource(row[0], row[1], json.loads(row[2])) if row else None

        return await self._run(run)

    async def list_resources(self, kind: str) -> list[Resource]:
        def run(conn: sqlite3.Connection) -> list[Resource]:
            rows = conn.execute(
                "SELECT kind, name, doc FROM resources WHERE kind = ? ORDER BY name", (kind,)
            ).fetchall()
            return [Resource(r[0], r[1], json.loads(r[2])) for r in rows]

        return await self._run(run)

    async def delete_resource(self, kind: str, name: str) -> bool:
        def run(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "DELETE FROM resources WHERE kind = ? AND name = ?", (kind, name)
            )
            return cur.rowcount > 0

        return await self._run(run)

    # -- join tokens ------------------------------------------------------------

    @staticmethod
    def _add_token(conn: sqlite3.Connection, token: JoinToken) -> None:
        try:
            conn.execute(
                f"INSERT INTO join_tokens ({_TOKEN_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (token.token_hash, token.kind, token.expires, token.created,
                 token.uses_left, _dump(token.scope.to_json()), token.bot),
            )
        except sqlite3.IntegrityError:
            raise AlreadyExists("join token already exists") from None

    async def add_token(self, token: JoinToken) -> None:
        await self._run(lambda conn: self._add_token(conn, token))

    async def get_token(self, token_hash: str) -> JoinToken | None:
        def run(conn: sqlite3.Connection) -> JoinToken | None:
            row = conn.execute(
                f"SELECT {_TOKEN_COLUMNS} FROM join_tokens WHERE token_hash = ?",
                (token_hash,),
            ).fetchone()
            return _token(row) if row else None

        return await self._run(run)

    async def list_tokens(self) -> list[JoinToken]:
        def run(conn: sqlite3.Connection) -> list[JoinToken]:
            rows = conn.execute(
                f"SELECT {_TOKEN_COLUMNS} FROM join_tokens ORDER BY created, token_hash"
            ).fetchall()
            return [_token(row) for row in rows]

        return await self._run(run)

    async def delete_token(self, token_hash: str) -> bool:
        def run(conn: sqlite3.Connection) -> bool:
            cur = conn.execute("DELETE FROM join_tokens WHERE token_hash = ?", (token_hash,))
            return cur.rowcount > 0

        return await self._run(run)

    async def redeem_token(self, token_hash: str, now: float, agent: Agent) -> Agent | None:
        """Take one use of a live token and store ``agent`` with the token's scope, in one
        transaction: of two joins racing for a token's last use, exactly one gets it.
        None when the token is unknown, expired or used up; AlreadyExists (and no use
        taken) when the host id is recorded with another key."""
        def run(conn: sqlite3.Connection) -> Agent | None:
            with _transaction(conn):
                known = conn.execute("SELECT key_pin FROM agents WHERE host_id = ?",
                                     (agent.host_id,)).fetchone()
                if known is not None and known[0] != agent.key_pin:
                    raise AlreadyExists(f"agent {agent.host_id} is recorded with another key")
                row = conn.execute(
                    f"SELECT {_TOKEN_COLUMNS} FROM join_tokens WHERE token_hash = ?"
                    " AND expires > ? AND (uses_left IS NULL OR uses_left > 0)",
                    (token_hash, now),
                ).fetchone()
                if row is None:
                    return None
                token = _token(row)
                if token.uses_left is not None:
                    conn.execute("UPDATE join_tokens SET uses_left = uses_left - 1"
                                 " WHERE token_hash = ?", (token_hash,))
                stored = attrs.evolve(agent, scope=token.scope)
                self._put_agent(conn, stored)
                return stored

        return await self._run(run)

    # -- bots -------------------------------------------------------------------

    async def create_bot(self, bot: Bot, token: JoinToken) -> None:
        def run(conn: sqlite3.Connection) -> None:
            with _transaction(conn):
                try:
                    conn.execute(
                        f"INSERT INTO bots ({_BOT_COLUMNS}) VALUES (?, ?, ?, ?, ?)",
                        (bot.name, _dump(list(bot.roles)), bot.created, bot.generation,
                         bot.cert_expires))
                except sqlite3.IntegrityError:
                    raise AlreadyExists(f"bot {bot.name} already exists") from None
                self._add_token(conn, token)

        await self._run(run)

    async def get_bot(self, name: str) -> Bot | None:
        def run(conn: sqlite3.Connection) -> Bot | None:
            row = conn.execute(f"SELECT {_BOT_COLUMNS} FROM bots WHERE name = ?",
                               (name,)).fetchone()
            return _bot(row) if row else None

        return await self._run(run)

    async def list_bots(self) -> list[Bot]:
        def run(conn: sqlite3.Connection) -> list[Bot]:
            rows = conn.execute(f"SELECT {_BOT_COLUMNS} FROM bots ORDER BY name").fetchall()
            return [_bot(row) for row in rows]

        return await self._run(run)

    async def delete_bot(self, name: str) -> bool:
        def run(conn: sqlite3.Connection) -> bool:
            with _transaction(conn):
                conn.execute("DELETE FROM join_tokens WHERE kind = 'bot' AND bot = ?", (name,))
                return conn.execute("DELETE FROM bots WHERE name = ?", (name,)).rowcount > 0

        return await self._run(run)

    async def redeem_bot_token(self, token_hash: str, now: float,
                               cert_expires: float) -> Bot | None:
        """Take one use of a live bot token and advance its bot's generation, in one
        transaction. None when the token is unknown, expired, used up, not a bot's, or
        its bot is gone."""
        def run(conn: sqlite3.Connection) -> Bot | None:
            with _transaction(conn):
                row = conn.execute(
                    f"SELECT {_TOKEN_COLUMNS} FROM join_tokens WHERE token_hash = ?"
                    " AND kind = 'bot' AND expires > ? AND (uses_left IS NULL OR uses_left > 0)",
                    (token_hash, now),
                ).fetchone()
                if row is None:
                    return None
                token = _token(row)
                cur = conn.execute("UPDATE bots SET generation = generation + 1,"
                                   " cert_expires = ? WHERE name = ?", (cert_expires, token.bot))
                if cur.rowcount == 0:
                    return None
                if token.uses_left is not None:
                    conn.execute("UPDATE join_tokens SET uses_left = uses_left - 1"
                                 " WHERE token_hash = ?", (token_hash,))
                return _bot(conn.execute(f"SELECT {_BOT_COLUMNS} FROM bots WHERE name = ?",
                                         (token.bot,)).fetchone())

        return await self._run(run)

    async def advance_bot(self, name: str, generation: int,
                          cert_expires: float) -> Bot | None:
        """Generation + 1 if it is ``generation`` now (compare and set); None otherwise."""
        def run(conn: sqlite3.Connection) -> Bot | None:
            with _transaction(conn):
                cur = conn.execute("UPDATE bots SET generation = generation + 1,"
                                   " cert_expires = ? WHERE name = ? AND generation = ?",
                                   (cert_expires, name, generation))
                if cur.rowcount == 0:
                    return None
                return _bot(conn.execute(f"SELECT {_BOT_COLUMNS} FROM bots WHERE name = ?",
                                         (name,)).fetchone())

        return await self._run(run)

    # -- agents -----------------------------------------------------------------

    @staticmethod
    def _put_agent(conn: sqlite3.Connection, a: Agent) -> None:
        conn.execute(
            f"INSERT INTO agents ({_AGENT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (host_id) DO UPDATE SET scope = excluded.scope,"
            " joined = excluded.joined, cert_expires = excluded.cert_expires,"
            " key_pin = excluded.key_pin, last_seen = excluded.last_seen,"
            " connected_since = excluded.connected_since, peer = excluded.peer,"
            " proxy_id = excluded.proxy_id, apps = excluded.apps, draining = excluded.draining,"
            " version = excluded.version",
            (a.host_id, _dump(a.scope.to_json()), a.joined, a.cert_expires, a.key_pin,
             a.last_seen, a.connected_since, a.peer, a.proxy_id, _dump(list(a.apps)),
             int(a.draining), a.version),
        )

    async def put_agent(self, agent: Agent) -> None:
        await self._run(lambda conn: self._put_agent(conn, agent))

    async def get_agent(self, host_id: str) -> Agent | None:
        def run(conn: sqlite3.Connection) -> Agent | None:
            row = conn.execute(f"SELECT {_AGENT_COLUMNS} FROM agents WHERE host_id = ?",
                               (host_id,)).fetchone()
            return _agent(row) if row else None

        return await self._run(run)

    async def list_agents(self) -> list[Agent]:
        def run(conn: sqlite3.Connection) -> list[Agent]:
            rows = conn.execute(f"SELECT {_AGENT_COLUMNS} FROM agents ORDER BY host_id")
            return [_agent(row) for row in rows.fetchall()]

        return await self._run(run)

    async def update_agent(self, host_id: str, **state: Any) -> bool:
        """Set some of the agent's state columns (``AGENT_STATE``); False if unknown.

        ``only_proxy``: change nothing unless the row still names that proxy (a tunnel
        that ends must not mark an agent offline that has reconnected elsewhere)."""
        only_proxy = state.pop("only_proxy", None)
        if not state or not set(state) <= AGENT_STATE:
            raise BackendError(f"update_agent: unknown fields {sorted(set(state) - AGENT_STATE)}")
        names = sorted(state)
        values = [_dump(list(state[n])) if n == "apps" else
                  int(state[n]) if n == "draining" else state[n] for n in names]
        where, params = "host_id = ?", [host_id]
        if only_proxy is not None:
            where += " AND proxy_id = ?"
            params.append(only_proxy)

        def run(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                f"UPDATE agents SET {', '.join(f'{n} = ?' for n in names)} WHERE {where}",
                (*values, *params),
            )
            return cur.rowcount > 0

        return await self._run(run)

    # -- sessions ---------------------------------------------------------------

    async def put_web_session(self, s: WebSession) -> None:
        def run(conn: sqlite3.Connection) -> None:
            conn.execute(
                f"INSERT INTO web_sessions ({_WEB_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (id_hash) DO UPDATE SET user_name = excluded.user_name,"
                " roles = excluded.roles, traits = excluded.traits,"
                " created = excluded.created, expires = excluded.expires,"
                " enroll_only = excluded.enroll_only, requests = excluded.requests,"
                " method = excluded.method",
                (s.id_hash, s.user, _dump(list(s.roles)), _dump(s.traits), s.created,
                 s.expires, int(bool(s.enroll_only)), _dump(list(s.requests)), str(s.method)),
            )

        await self._run(run)

    async def get_web_session(self, id_hash: str) -> WebSession | None:
        def run(conn: sqlite3.Connection) -> WebSession | None:
            row = conn.execute(
                f"SELECT {_WEB_COLUMNS} FROM web_sessions WHERE id_hash = ?",
                (id_hash,),
            ).fetchone()
            return _web_session(row) if row else None

        return await self._run(run)

    async def list_user_web_sessions(self, user: str) -> list[WebSession]:
        """The user's stored web sessions (the account page's "my sessions"), oldest first."""
        def run(conn: sqlite3.Connection) -> list[WebSession]:
            rows = conn.execute(
                f"SELECT {_WEB_COLUMNS} FROM web_sessions WHERE user_name = ?"
                " ORDER BY created LIMIT 1000", (user,),
            ).fetchall()
            return [_web_session(row) for row in rows]

        return await self._run(run)

    async def delete_web_session(self, id_hash: str) -> list[str]:
        """End the web session with its app sessions and hand-offs; return the app hashes."""
        def run(conn: sqlite3.Connection) -> list[str]:
            with _transaction(conn):
                ended = [
                    row[0]
                    for row in conn.execute(
                        "SELECT id_hash FROM app_sessions WHERE web_session = ?", (id_hash,)
                    ).fetchall()
                ]
                conn.execute("DELETE FROM app_sessions WHERE web_session = ?", (id_hash,))
                conn.execute("DELETE FROM auth_codes WHERE web_session = ?", (id_hash,))
                conn.execute("DELETE FROM web_sessions WHERE id_hash = ?", (id_hash,))
                return ended

        return await self._run(run)

    async def put_app_session(self, s: AppSession) -> None:
        def run(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO app_sessions"
                " (id_hash, web_session, user_name, app, created, expires, mfa_verified)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (id_hash) DO UPDATE SET web_session = excluded.web_session,"
                " user_name = excluded.user_name, app = excluded.app,"
                " created = excluded.created, expires = excluded.expires,"
                " mfa_verified = excluded.mfa_verified",
                (s.id_hash, s.web_session, s.user, s.app, s.created, s.expires,
                 int(bool(s.mfa_verified))),
            )

        await self._run(run)

    async def get_app_session(self, id_hash: str) -> AppSession | None:
        def run(conn: sqlite3.Connection) -> AppSession | None:
            row = conn.execute(
                "SELECT id_hash, web_session, user_name, app, created, expires, mfa_verified"
                " FROM app_sessions WHERE id_hash = ?",
                (id_hash,),
            ).fetchone()
            return _app_session(row) if row else None

        return await self._run(run)

    async def delete_app_session(self, id_hash: str) -> bool:
        def run(conn: sqlite3.Connection) -> bool:
            cur = conn.execute("DELETE FROM app_sessions WHERE id_hash = ?", (id_hash,))
            return cur.rowcount > 0

        return await self._run(run)

    async def delete_user_sessions(self, user: str) -> list[str]:
        """End every web session of ``user`` with its app sessions and hand-offs (a lock)."""
        def run(conn: sqlite3.Connection) -> list[str]:
            with _transaction(conn):
                ended = [
                    row[0]
                    for row in conn.execute(
                        "SELECT id_hash FROM app_sessions WHERE user_name = ?", (user,)
                    ).fetchall()
                ]
                conn.execute(
                    "DELETE FROM auth_codes WHERE web_session IN"
                    " (SELECT id_hash FROM web_sessions WHERE user_name = ?)",
                    (user,),
                )
                conn.execute("DELETE FROM app_sessions WHERE user_name = ?", (user,))
                conn.execute("DELETE FROM web_sessions WHERE user_name = ?", (user,))
                return ended

        return await self._run(run)

    async def delete_app_sessions(self, app: str, user: str | None = None) -> list[str]:
        """End the app sessions (and pending hand-offs) on ``app``, of one user or everyone."""
        def run(conn: sqlite3.Connection) -> list[str]:
            if user is None:
                sessions_where, params = "app = ?", (app,)
                codes_where = "app = ?"
            else:
                sessions_where, params = "app = ? AND user_name = ?", (app, user)
                codes_where = ("app = ? AND web_session IN"
                               " (SELECT id_hash FROM web_sessions WHERE user_name = ?)")
            with _transaction(conn):
                ended = [
                    row[0]
                    for row in conn.execute(
                        f"SELECT id_hash FROM app_sessions WHERE {sessions_where}", params
                    ).fetchall()
                ]
                conn.execute(f"DELETE FROM auth_codes WHERE {codes_where}", params)
                conn.execute(f"DELETE FROM app_sessions WHERE {sessions_where}", params)
                return ended

        return await self._run(run)

    # -- invite/reset links, second factors, recovery codes ----------------------

    async def put_user_link(self, link: UserLink) -> None:
        """Store a link; every other link of the same user stops working."""
        def run(conn: sqlite3.Connection) -> None:
            with _transaction(conn):
                conn.execute("DELETE FROM user_links WHERE user_name = ?", (link.user,))
                conn.execute(
                    f"INSERT INTO user_links ({_LINK_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
                    (link.token_hash, link.user, link.kind, link.created, link.expires,
                     link.used),
                )

        await self._run(run)

    async def get_user_link(self, token_hash: str) -> UserLink | None:
        def run(conn: sqlite3.Connection) -> UserLink | None:
            row = conn.execute(f"SELECT {_LINK_COLUMNS} FROM user_links WHERE token_hash = ?",
                               (token_hash,)).fetchone()
            return UserLink(*row) if row else None

        return await self._run(run)

    async def use_user_link(self, token_hash: str, now: float) -> UserLink | None:
        """Mark a live, unused link used and return it; None when it is not (atomic)."""
        def run(conn: sqlite3.Connection) -> UserLink | None:
            with _transaction(conn):
                cur = conn.execute(
                    "UPDATE user_links SET used = ?"
                    " WHERE token_hash = ? AND used IS NULL AND expires > ?",
                    (now, token_hash, now))
                if cur.rowcount == 0:
                    return None
                row = conn.execute(
                    f"SELECT {_LINK_COLUMNS} FROM user_links WHERE token_hash = ?",
                    (token_hash,)).fetchone()
                return UserLink(*row)

        return await self._run(run)

    async def add_mfa_device(self, device: MfaDevice) -> None:
        def run(conn: sqlite3.Connection) -> None:
            try:
                conn.execute(
                    f"INSERT INTO mfa_devices ({_DEVICE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
                    (device.user, device.name, device.kind, device.secret,
                     int(device.counter), device.created))
            except sqlite3.IntegrityError:
                raise AlreadyExists(f"device {device.name!r} already exists") from None

        await self._run(run)

    async def list_mfa_devices(self, user: str) -> list[MfaDevice]:
        def run(conn: sqlite3.Connection) -> list[MfaDevice]:
            rows = conn.execute(
                f"SELECT {_DEVICE_COLUMNS} FROM mfa_devices WHERE user_name = ? ORDER BY name",
                (user,)).fetchall()
            return [MfaDevice(*row) for row in rows]

        return await self._run(run)

    async def delete_mfa_device(self, user: str, name: str) -> bool:
        def run(conn: sqlite3.Connection) -> bool:
            return conn.execute("DELETE FROM mfa_devices WHERE user_name = ? AND name = ?",
                                (user, name)).rowcount > 0

        return await self._run(run)

    async def advance_mfa_counter(self, user: str, name: str, counter: int) -> bool:
        """Raise the device's counter to ``counter`` if it is lower; False otherwise
        (a replayed code or a cloned authenticator). One UPDATE: atomic."""
        def run(conn: sqlite3.Connection) -> bool:
            return conn.execute(
                "UPDATE mfa_devices SET counter = ?"
                " WHERE user_name = ? AND name = ? AND counter < ?",
                (int(counter), user, name, int(counter))).rowcount > 0

        return await self._run(run)

    async def set_recovery_codes(self, user: str, code_hashes: list[str]) -> None:
        """Replace the user's recovery codes."""
        def run(conn: sqlite3.Connection) -> None:
            with _transaction(conn):
                conn.execute("DELETE FROM recovery_codes WHERE user_name = ?", (user,))
                conn.executemany(
                    "INSERT OR IGNORE INTO recovery_codes (user_name, code_hash) VALUES (?, ?)",
                    [(user, h) for h in code_hashes])

        await self._run(run)

    async def use_recovery_code(self, user: str, code_hash: str) -> bool:
        """Delete the code and say whether it was there: each works once."""
        def run(conn: sqlite3.Connection) -> bool:
            return conn.execute(
                "DELETE FROM recovery_codes WHERE user_name = ? AND code_hash = ?",
                (user, code_hash)).rowcount > 0

        return await self._run(run)

    async def count_recovery_codes(self, user: str) -> int:
        def run(conn: sqlite3.Connection) -> int:
            return int(conn.execute("SELECT COUNT(*) FROM recovery_codes WHERE user_name = ?",
                                    (user,)).fetchone()[0])

        return await self._run(run)

    # -- locks ------------------------------------------------------------------

    async def put_lock(self, lock: Lock) -> None:
        """Store a lock (replacing one with the same id)."""
        if lock.user is None and lock.app is None and lock.agent is None:
            raise BackendError("a lock needs a user, an app, or both (or an agent)")

        def run(conn: sqlite3.Connection) -> None:
            conn.execute(
                f"INSERT INTO locks ({_LOCK_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (id) DO UPDATE SET user_name = excluded.user_name,"
                " app = excluded.app, message = excluded.message,"
                " created = excluded.created, expires = excluded.expires,"
                " created_by = excluded.created_by, agent = excluded.agent",
                (lock.id, lock.user, lock.app, lock.message, lock.created, lock.expires,
                 lock.created_by, lock.agent),
            )

        await self._run(run)

    async def list_locks(self, now: float) -> list[Lock]:
        """Locks still in force at ``now``, oldest first."""
        def run(conn: sqlite3.Connection) -> list[Lock]:
            rows = conn.execute(
                f"SELECT {_LOCK_COLUMNS} FROM locks"
                " WHERE expires IS NULL OR expires > ? ORDER BY created, id",
                (now,),
            ).fetchall()
            return [Lock(*row) for row in rows]

        return await self._run(run)

    async def delete_lock(self, id: str) -> bool:
        def run(conn: sqlite3.Connection) -> bool:
            return conn.execute("DELETE FROM locks WHERE id = ?", (id,)).rowcount > 0

        return await self._run(run)

    # -- auth codes -------------------------------------------------------------

    async def put_auth_code(self, c: AuthCode) -> None:
        def run(conn: sqlite3.Connection) -> None:
            try:
                conn.execute(
                    "INSERT INTO auth_codes"
                    " (code_hash, web_session, app, path, state_hash, expires, mfa_verified)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (c.code_hash, c.web_session, c.app, c.path, c.state_hash, c.expires,
                     int(bool(c.mfa_verified))),
                )
            except sqlite3.IntegrityError:
                raise AlreadyExists("auth code already exists") from None

        await self._run(run)

    async def take_auth_code(self, code_hash: str) -> AuthCode | None:
        """Read and delete in one transaction, so a code can be redeemed at most once."""
        def run(conn: sqlite3.Connection) -> AuthCode | None:
            with _transaction(conn):
                row = conn.execute(
                    "SELECT code_hash, web_session, app, path, state_hash, expires,"
                    " mfa_verified FROM auth_codes WHERE code_hash = ?",
                    (code_hash,),
                ).fetchone()
                if row is None:
                    return None
                conn.execute("DELETE FROM auth_codes WHERE code_hash = ?", (code_hash,))
                return AuthCode(*row[:6], mfa_verified=bool(row[6]))

        return await self._run(run)

    # -- outstanding SAML requests ------------------------------------------------

    async def put_saml_request(self, r: SamlRequest) -> None:
        def run(conn: sqlite3.Connection) -> None:
            try:
                conn.execute("INSERT INTO saml_requests (request_id, connector, target, expires,"
                             " cli) VALUES (?, ?, ?, ?, ?)",
                             (r.request_id, r.connector, r.target, r.expires, r.cli))
            except sqlite3.IntegrityError:
                raise AlreadyExists("SAML request already exists") from None

        await self._run(run)

    async def take_saml_request(self, request_id: str, connector: str,
                                now: float) -> SamlRequest | None:
        """Delete and return it if it is the connector's and not expired, in one
        transaction: of two racing takes (or two proxies) only one gets it."""
        def run(conn: sqlite3.Connection) -> SamlRequest | None:
            with _transaction(conn):
                row = conn.execute("SELECT request_id, connector, target, expires, cli"
                                   " FROM saml_requests WHERE request_id = ?",
                                   (request_id,)).fetchone()
                if row is None:
                    return None
                conn.execute("DELETE FROM saml_requests WHERE request_id = ?", (request_id,))
            found = SamlRequest(*row)
            return found if found.connector == connector and found.expires > now else None

        return await self._run(run)

    # -- pending sign-in steps ------------------------------------------------------

    async def put_signin_state(self, s: SignInState, now: float, limit: int) -> None:
        """Store a step; with ``limit`` of its kind already stored, expired ones go first,
        then the oldest (a flood of unfinished sign-ins stays bounded)."""
        def run(conn: sqlite3.Connection) -> None:
            with _transaction(conn):
                count = conn.execute("SELECT COUNT(*) FROM signin_states WHERE kind = ?",
                                     (s.kind,)).fetchone()[0]
                if count >= limit:
                    count -= conn.execute("DELETE FROM signin_states WHERE kind = ? AND"
                                          " expires <= ?", (s.kind, now)).rowcount
                if count >= limit:
                    conn.execute("DELETE FROM signin_states WHERE key_hash IN (SELECT"
                                 " key_hash FROM signin_states WHERE kind = ? ORDER BY"
                                 " expires, key_hash LIMIT ?)", (s.kind, count - limit + 1))
                try:
                    conn.execute("INSERT INTO signin_states (key_hash, kind, body, expires)"
                                 " VALUES (?, ?, ?, ?)", (s.key_hash, s.kind, s.body, s.expires))
                except sqlite3.IntegrityError:
                    raise AlreadyExists("sign-in step already exists") from None

        await self._run(run)

    async def get_signin_state(self, kind: str, key_hash: str,
                               now: float) -> SignInState | None:
        def run(conn: sqlite3.Connection) -> SignInState | None:
            row = conn.execute("SELECT key_hash, kind, body, expires FROM signin_states"
                               " WHERE key_hash = ?", (key_hash,)).fetchone()
            found = SignInState(*row) if row is not None else None
            return found if found is not None and found.kind == kind and found.expires > now \
                else None

        return await self._run(run)

    async def take_signin_state(self, kind: str, key_hash: str,
                                now: float) -> SignInState | None:
        """Delete and return it if it is of ``kind`` and not expired, in one transaction:
        of two racing takes (two proxies) only one gets it."""
        def run(conn: sqlite3.Connection) -> SignInState | None:
            with _transaction(conn):
                row = conn.execute("SELECT key_hash, kind, body, expires FROM signin_states"
                                   " WHERE key_hash = ?", (key_hash,)).fetchone()
                if row is None or row[1] != kind:
                    return None
                conn.execute("DELETE FROM signin_states WHERE key_hash = ?", (key_hash,))
            found = SignInState(*row)
            return found if found.expires > now else None

        return await self._run(run)

    # -- access requests ------------------------------------------------------------

    async def put_access_request(self, r: AccessRequest) -> None:
        def run(conn: sqlite3.Connection) -> None:
            try:
                conn.execute(f"INSERT INTO access_requests ({_REQUEST_COLUMNS})"
                             " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", _request_row(r))
            except sqlite3.IntegrityError:
                raise AlreadyExists("access request already exists") from None

        await self._run(run)

    async def get_access_request(self, id: str) -> AccessRequest | None:
        def run(conn: sqlite3.Connection) -> AccessRequest | None:
            row = conn.execute(f"SELECT {_REQUEST_COLUMNS} FROM access_requests WHERE id = ?",
                               (id,)).fetchone()
            return _access_request(row) if row else None

        return await self._run(run)

    async def list_access_requests(self, user: str | None = None,
                                   states: tuple[str, ...] | None = None
                                   ) -> list[AccessRequest]:
        where, params = [], []
        if user is not None:
            where.append("user_name = ?")
            params.append(user)
        if states is not None:
            where.append(f"state IN ({', '.join('?' * len(states))})" if states else "1 = 0")
            params.extend(states)
        sql = (f"SELECT {_REQUEST_COLUMNS} FROM access_requests"
               + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY created, id")

        def run(conn: sqlite3.Connection) -> list[AccessRequest]:
            return [_access_request(row) for row in conn.execute(sql, params).fetchall()]

        return await self._run(run)

    async def update_access_request(self, r: AccessRequest, state: str, reviews: int) -> bool:
        """Replace the request only if it is still in ``state`` with ``reviews`` reviews."""
        def run(conn: sqlite3.Connection) -> bool:
            with _transaction(conn):
                row = conn.execute("SELECT state, reviews FROM access_requests WHERE id = ?",
                                   (r.id,)).fetchone()
                if row is None or row[0] != state or len(json.loads(row[1])) != reviews:
                    return False
                row = _request_row(r)
                conn.execute("UPDATE access_requests SET roles = ?, apps = ?, reason = ?,"
                             " state = ?, created = ?, ttl = ?, expires = ?, approve = ?,"
                             " deny = ?, reviews = ? WHERE id = ?", (*row[2:], r.id))
                return True

        return await self._run(run)

    # -- audit ------------------------------------------------------------------

    async def append_audit(self, events: list[AuditEvent]) -> None:
        """Store events; ids already stored are skipped, so a batch retried after a lost
        reply or replayed from the journal is stored once."""
        rows = [
            (e.id, e.time, e.type, e.code, e.actor, e.target, e.outcome, e.fields_json,
             e.proxy_id, e.seq if e.proxy_id else None, e.prev, e.digest, e.fields)
            for e in events
        ]
        if not rows:
            return

        def run(conn: sqlite3.Connection) -> None:
            # One multi-row INSERT per chunk rather than executemany: the driver lets go
            # of the GIL around every statement step, and a handoff per row makes the
            # reactor thread wait for the GIL thousands of times a second under load.
            # A chained event brings its fields already encoded (the same text _dump
            # gives): encoding them again here held the GIL for ~4 us per event.
            with _transaction(conn):
                for start in range(0, len(rows), _AUDIT_ROWS_PER_INSERT):
                    chunk = rows[start:start + _AUDIT_ROWS_PER_INSERT]
                    params = [value for row in chunk
                              for value in (*row[:7], row[7] or _dump(row[12]), *row[8:12])]
                    conn.execute(
                        f"INSERT INTO audit_events ({_AUDIT_COLUMNS}) VALUES "
                        + ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"] * len(chunk))
                        + " ON CONFLICT (id) DO NOTHING",   # only a stored id is skipped
                        params,
                    )

        await self._run(run)

    async def search_audit(
        self,
        since: float | None = None,
        until: float | None = None,
        type: str | None = None,
        limit: int = 1000,
        *,
        actor: str | None = None,
        target: str | None = None,
        outcome: str | None = None,
        request_id: str | None = None,
        offset: int = 0,
        newest_first: bool = False,
    ) -> list[AuditEvent]:
        """Events with since <= time < until, oldest first (ties in insertion order; the
        reverse with ``newest_first``); type, actor, target, outcome and the request_id
        field, when given, match exactly (the limit counts matches, after ``offset``)."""
        where: list[str] = []
        params: list[Any] = []
        if since is not None:
            where.append("time >= ?")
            params.append(float(since))
        if until is not None:
            where.append("time < ?")
            params.append(float(until))
        for column, value in (("type", type), ("actor", actor), ("target", target),
                              ("outcome", outcome),
                              ("json_extract(fields, '$.request_id')", request_id)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        params.append(max(0, min(int(limit), MAX_SEARCH_LIMIT)))
        params.append(max(0, int(offset)))
        order = "time DESC, rowid DESC" if newest_first else "time, rowid"
        sql = (
            f"SELECT {_AUDIT_COLUMNS} FROM audit_events"
            + (" WHERE " + " AND ".join(where) if where else "")
            + f" ORDER BY {order} LIMIT ? OFFSET ?"   # rowid: insertion order within a tick
        )

        def run(conn: sqlite3.Connection) -> list[AuditEvent]:
            return [_audit_event(row) for row in conn.execute(sql, params).fetchall()]

        return await self._run(run)

    async def get_audit_event(self, id: str) -> AuditEvent | None:
        def run(conn: sqlite3.Connection) -> AuditEvent | None:
            row = conn.execute(
                f"SELECT {_AUDIT_COLUMNS} FROM audit_events WHERE id = ?", (id,)).fetchone()
            return None if row is None else _audit_event(row)

        return await self._run(run)

    # -- cluster keys -----------------------------------------------------------

    async def add_key(self, key: KeyRecord) -> bool:
        """Insert-if-absent: the unique index on the current key of a kind decides races."""
        def run(conn: sqlite3.Connection) -> bool:
            return conn.execute(
                f"INSERT OR IGNORE INTO keys ({_KEY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                attrs.astuple(key),
            ).rowcount > 0

        return await self._run(run)

    async def list_keys(self, kind: str | None = None) -> list[KeyRecord]:
        def run(conn: sqlite3.Connection) -> list[KeyRecord]:
            where, args = ("WHERE kind = ?", (kind,)) if kind is not None else ("", ())
            rows = conn.execute(
                f"SELECT {_KEY_COLUMNS} FROM keys {where} ORDER BY created, id", args
            ).fetchall()
            return [KeyRecord(*row) for row in rows]

        return await self._run(run)

    async def set_key_states(self, changes: list[tuple[str, KeyRecord]]) -> bool:
        """All or nothing; retiring a current key is listed before its successor's promotion."""
        def run(conn: sqlite3.Connection) -> bool:
            with _transaction(conn):
                for expected, key in changes:
                    done = conn.execute(
                        "UPDATE keys SET state = ?, material = ?, activate_at = ?, retire_at = ?"
                        " WHERE kind = ? AND id = ? AND state = ?",
                        (key.state, key.material, key.activate_at, key.retire_at, key.kind,
                         key.id, expected),
                    ).rowcount
                    if done != 1:
                        raise _Unchanged()
            return True

        try:
            return await self._run(run)
        except _Unchanged:
            return False

    async def delete_key(self, kind: str, id: str) -> bool:
        def run(conn: sqlite3.Connection) -> bool:
            return conn.execute("DELETE FROM keys WHERE kind = ? AND id = ?",
                                (kind, id)).rowcount > 0

        return await self._run(run)

    # -- several proxies --------------------------------------------------------

    async def heartbeat_proxy(self, proxy: ProxyRecord) -> None:
        def run(conn: sqlite3.Connection) -> None:
            with _transaction(conn):
                conn.execute(
                    "INSERT INTO proxies (proxy_id, tunnel_addr, version, started, heartbeat)"
                    " VALUES (?, ?, ?, ?, ?) ON CONFLICT (proxy_id) DO UPDATE SET"
                    " tunnel_addr = excluded.tunnel_addr, version = excluded.version,"
                    " started = excluded.started, heartbeat = excluded.heartbeat",
                    (proxy.proxy_id, proxy.tunnel_addr, proxy.version, proxy.started,
                     proxy.heartbeat))
                # Tunnels an earlier run of this proxy recorded (it was killed) are gone.
                conn.execute("DELETE FROM agent_tunnels WHERE proxy_id = ? AND since < ?",
                             (proxy.proxy_id, proxy.started))

        await self._run(run)

    async def list_proxies(self, since: float) -> list[ProxyRecord]:
        def run(conn: sqlite3.Connection) -> list[ProxyRecord]:
            rows = conn.execute(
                "SELECT proxy_id, tunnel_addr, version, started, heartbeat FROM proxies"
                " WHERE heartbeat >= ? ORDER BY proxy_id", (since,)).fetchall()
            return [ProxyRecord(*row) for row in rows]

        return await self._run(run)

    async def delete_proxy(self, proxy_id: str) -> bool:
        def run(conn: sqlite3.Connection) -> bool:
            with _transaction(conn):
                conn.execute("DELETE FROM agent_tunnels WHERE proxy_id = ?", (proxy_id,))
                return conn.execute("DELETE FROM proxies WHERE proxy_id = ?",
                                    (proxy_id,)).rowcount > 0

        return await self._run(run)

    async def forget_proxies(self, before: float) -> list[str]:
        def run(conn: sqlite3.Connection) -> list[str]:
            with _transaction(conn):
                gone = [row[0] for row in conn.execute(
                    "SELECT proxy_id FROM proxies WHERE heartbeat < ? ORDER BY proxy_id",
                    (before,)).fetchall()]
                for proxy_id in gone:
                    conn.execute("DELETE FROM agent_tunnels WHERE proxy_id = ?", (proxy_id,))
                    conn.execute("DELETE FROM proxies WHERE proxy_id = ?", (proxy_id,))
                return gone

        return await self._run(run)

    async def put_agent_tunnel(self, tunnel: AgentTunnel) -> None:
        def run(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO agent_tunnels (host_id, proxy_id, peer, since) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (host_id, proxy_id) DO UPDATE SET peer = excluded.peer,"
                " since = excluded.since",
                (tunnel.host_id, tunnel.proxy_id, tunnel.peer, tunnel.since))

        await self._run(run)

    async def delete_agent_tunnel(self, host_id: str, proxy_id: str) -> bool:
        return await self._run(lambda conn: conn.execute(
            "DELETE FROM agent_tunnels WHERE host_id = ? AND proxy_id = ?",
            (host_id, proxy_id)).rowcount > 0)

    async def list_agent_tunnels(self) -> list[AgentTunnel]:
        def run(conn: sqlite3.Connection) -> list[AgentTunnel]:
            rows = conn.execute("SELECT host_id, proxy_id, peer, since FROM agent_tunnels"
                                " ORDER BY host_id, proxy_id").fetchall()
            return [AgentTunnel(*row) for row in rows]

        return await self._run(run)

    # -- the audit hash chain -----------------------------------------------------

    async def append_audit_chained(self, chain: str, events: list[AuditEvent],
                                   link: Callable[[AuditEvent, str, int, str], AuditEvent]
                                   ) -> list[AuditEvent]:
        def run(conn: sqlite3.Connection) -> list[AuditEvent]:
            with _transaction(conn):     # BEGIN IMMEDIATE: the write lock, taken up front
                self._lock_chain(conn, chain)
                row = conn.execute(
                    "SELECT chain_seq, chain_digest FROM audit_events WHERE proxy_id = ?"
                    " AND chain_seq IS NOT NULL ORDER BY chain_seq DESC LIMIT 1",
                    (chain,)).fetchone()
                seq, prev = (int(row[0]), row[1]) if row is not None else (0, GENESIS)
                stored: list[AuditEvent] = []
                seen: set[str] = set()
                for e in events:
                    if e.id in seen or conn.execute(
                            "SELECT 1 FROM audit_events WHERE id = ?", (e.id,)).fetchone():
                        continue
                    seen.add(e.id)
                    seq += 1
                    chained = link(e, chain, seq, prev)
                    prev = chained.digest
                    conn.execute(
                        f"INSERT INTO audit_events ({_AUDIT_COLUMNS}) VALUES"
                        " (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (chained.id, chained.time, chained.type, chained.code, chained.actor,
                         chained.target, chained.outcome, _dump(chained.fields),
                         chained.proxy_id, chained.seq, chained.prev, chained.digest))
                    stored.append(chained)
                return stored

        return await self._run(run)

    def _lock_chain(self, conn: Any, chain: str) -> None:
        """Worker thread, in a write transaction: keep other writers of ``chain`` out until
        it ends. SQLite's BEGIN IMMEDIATE already holds the database's one write lock."""

    async def audit_chain_head(self, proxy_id: str) -> AuditEvent | None:
        def run(conn: sqlite3.Connection) -> AuditEvent | None:
            row = conn.execute(
                f"SELECT {_AUDIT_COLUMNS} FROM audit_events WHERE proxy_id = ?"
                " AND chain_seq IS NOT NULL ORDER BY chain_seq DESC LIMIT 1",
                (proxy_id,)).fetchone()
            return None if row is None else _audit_event(row)

        return await self._run(run)

    async def audit_chain(self, proxy_id: str, offset: int = 0, limit: int = 1000,
                          *, seq: int | None = None) -> list[AuditEvent]:
        """One proxy's chained events in storage (insertion) order, or those numbered seq."""
        where, params = "proxy_id = ? AND chain_seq IS NOT NULL", [proxy_id]
        if seq is not None:
            where += " AND chain_seq = ?"
            params.append(int(seq))
        params += [max(0, min(int(limit), MAX_SEARCH_LIMIT)), max(0, int(offset))]
        sql = (f"SELECT {_AUDIT_COLUMNS} FROM audit_events WHERE {where}"
               " ORDER BY rowid LIMIT ? OFFSET ?")

        def run(conn: sqlite3.Connection) -> list[AuditEvent]:
            return [_audit_event(row) for row in conn.execute(sql, params).fetchall()]

        return await self._run(run)

    async def audit_chains(self) -> dict[str, int]:
        """How many events each proxy chained; '' counts the unchained ones."""
        def run(conn: sqlite3.Connection) -> dict[str, int]:
            rows = conn.execute(
                "SELECT CASE WHEN chain_seq IS NULL THEN '' ELSE proxy_id END, count(*)"
                " FROM audit_events GROUP BY 1").fetchall()
            return {name: count for name, count in rows}

        return await self._run(run)

    # -- housekeeping -----------------------------------------------------------

    async def delete_expired(self, now: float) -> int:
        """Drop expired sessions, hand-offs, join tokens and locks; return how many rows went."""
        def run(conn: sqlite3.Connection) -> int:
            removed = 0
            with _transaction(conn):
                for table in ("auth_codes", "app_sessions", "web_sessions", "join_tokens",
                              "saml_requests", "signin_states"):
                    cur = conn.execute(f"DELETE FROM {table} WHERE expires <= ?", (now,))
                    removed += cur.rowcount
                cur = conn.execute(
                    "DELETE FROM locks WHERE expires IS NOT NULL AND expires <= ?", (now,)
                )
                removed += cur.rowcount
                cur = conn.execute("DELETE FROM user_links WHERE expires <= ?",
                                   (now - LINK_KEEP,))
                removed += cur.rowcount
                cur = conn.execute("DELETE FROM access_requests WHERE state IN"
                                   " ('denied', 'expired') AND expires <= ?",
                                   (now - LINK_KEEP,))
                removed += cur.rowcount
            return removed

        return await self._run(run)
