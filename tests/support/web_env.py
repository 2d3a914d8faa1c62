"""The web app environment: the proxy's WebApp over the in-memory backend, sessions,
roles, audit, JWT keys and cluster CA, driven in memory through treq's StubTreq on a Clock
set to the real epoch. No thread and no wall clock: storage answers at once and argon2
runs inline, so a request is answered once StubTreq has been flushed.

`running_web_env` yields an Env with the users alice (role dev, password alice-pw) and bob
(no roles, password bob-pw) and the apps grafana, wiki and billing registered.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import AsyncIterator

import attrs
import treq
from treq.testing import StubTreq
from twisted.internet import reactor as wall_clock
from twisted.internet.task import Clock

from apptunnel.audit import AuditLog
from apptunnel.auth.ca import ClusterCA
from apptunnel.auth.directory import UserDirectory
from apptunnel.auth.jwt import KEY_FILE as JWT_KEY_FILE
from apptunnel.auth.jwt import JwtKeys
from apptunnel.auth.locks import LockWatcher
from apptunnel.auth.policy import RoleCache
from apptunnel.auth.sessions import SessionManager
from apptunnel.backend.records import Resource, User
from apptunnel.backend.memory import MemoryBackend
from apptunnel.config import ProxyConfig
from apptunnel.catalog import AppInfo
from apptunnel.proxy.registry import AgentRegistry
from apptunnel.web.routes import SESSION_COOKIE, WebApp
from tests.support.memory import cheap_hash, inline_hashes

BASE = "https://apptunnel.localhost:3080"
COOKIE = SESSION_COOKIE
ROUNDS = 1000   # flushes of the stub and the clock before a request counts as stuck

ROLES = [
    {
        "kind": "role",
        "metadata": {"name": "dev"},
        "spec": {
            "options": {"max_session_ttl": "1h"},
            "allow": {"app_labels": {"env": "staging"}},
            "deny": {"app_labels": {"team": "secret"}},
        },
    },
]


@attrs.define
class Env:
    config: ProxyConfig
    clock: Clock
    backend: MemoryBackend
    sessions: SessionManager
    audit: AuditLog
    jwt_keys: JwtKeys
    ca: ClusterCA
    web: WebApp
    registry: AgentRegistry
    locks: LockWatcher | None = None     # not started: tests call refresh()
    users: UserDirectory | None = None

    async def call(self, method: str, path: str, *, cookie: str | None = None,
                   origin: str | None = BASE, headers: dict | None = None, **kwargs):
        """One request through a fresh client (no cookie jar): (response, body bytes)."""
        stub = StubTreq(self.web.resource())
        sent = dict(headers or {})
        if cookie is not None:
            sent["Cookie"] = f"{COOKIE}={cookie}"
        if origin is not None and method != "GET":
            sent["Origin"] = origin
        d = stub.request(method, BASE + path, headers=sent, allow_redirects=False, **kwargs)
        response = await settle(stub, d, self.clock)
        body = await settle(stub, treq.content(response), self.clock)
        return response, body

    async def login(self, username: str = "alice", password: str = "alice-pw") -> str:
        """Sign in through the form and return the session secret from Set-Cookie."""
        response, _ = await self.call(
            "POST", "/web/login",
            data={"username": username, "password": password, "next": "/"},
        )
        assert response.code == 303
        return session_cookie(response)[0]

    async def events(self, type: str) -> list:
        await self.audit.flush()
        return await self.backend.search_audit(type=type)


async def settle(stub: StubTreq, d, clock: Clock, rounds: int = ROUNDS):
    """Flush the in-memory connection (and calls due now on the clock) until ``d`` fires;
    a request still unanswered after ``rounds`` flushes waits on something nobody drives."""
    done: list[bool] = []

    def finished(result):
        done.append(True)
        return result

    d.addBoth(finished)  # not d.called: a called Deferred may still wait on a chained one
    for _ in range(rounds):
        if done:
            return await d
        stub.flush()
        clock.advance(0)
    d.cancel()
    raise AssertionError(f"no response after {rounds} flushes")


def session_cookie(response) -> tuple[str, list[str]]:
    """(value, attributes) of the one session Set-Cookie header."""
    headers = [
        h.decode() for h in response.headers.getRawHeaders(b"set-cookie", [])
        if h.startswith(COOKIE.encode() + b"=")
    ]
    assert len(headers) == 1, headers
    first, *attributes = [part.strip() for part in headers[0].split(";")]
    return first.split("=", 1)[1], attributes


def header(response, name: str) -> str | None:
    values = response.headers.getRawHeaders(name)
    return values[0] if values else None


def password_hash(password: str) -> str:
    """An argon2id hash of ``password`` at a test's cost (tests/support/memory.py)."""
    return cheap_hash(password)


def app_info(name: str, labels: dict[str, str]) -> AppInfo:
    return AppInfo(
        name=name, uri=f"http://127.0.0.1:9/{name}", labels=labels,
        public_addr=f"{name}.apptunnel.localhost:3080", rewrite_headers=(),
        jwt_claims=None, agent_id="agent-1",
    )


# Key files of the first env of the run (JWT key and cluster CA), copied into the data
# dir of every later one: an RSA key and a CA per test cost more than the test itself.
_KEY_FILES = (JWT_KEY_FILE, "ca.key", "ca.crt")
_seed: dict[str, bytes] = {}


def _seed_keys(data_dir: str) -> None:
    for name, data in _seed.items():
        path = os.path.join(data_dir, name)
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
            f.write(data)


def _keep_keys(data_dir: str) -> None:
    if not _seed:
        for name in _KEY_FILES:
            with open(os.path.join(data_dir, name), "rb") as f:
                _seed[name] = f.read()


@contextlib.asynccontextmanager
async def running_web_env(tmp_path) -> AsyncIterator[Env]:
    clock = Clock()
    clock.advance(time.time())  # real epoch, so PyJWT accepts the signed tokens
    config = ProxyConfig(
        path=str(tmp_path / "proxy.yaml"), cluster_name="test-cluster",
        data_dir=str(tmp_path), public_addr="apptunnel.localhost:3080",
        web_listen_addr="127.0.0.1:3080", tunnel_listen_addr="127.0.0.1:3024",
        backend_type="sqlite", backend_path=str(tmp_path / "apptunnel.db"),
        tls_cert_file=None, tls_key_file=None, session_ttl=43200.0,
    )
    backend = MemoryBackend()
    for doc in ROLES:
        await backend.put_resource(Resource("role", doc["metadata"]["name"], doc))
    now = clock.seconds()
    await backend.create_user(User("alice", password_hash("alice-pw"), ("dev",), {}, now))
    await backend.create_user(User("bob", password_hash("bob-pw"), (), {}, now))
    registry = AgentRegistry()
    registry.add(object(), "agent-1", [
        app_info("grafana", {"env": "staging"}),
        app_info("wiki", {"env": "staging", "team": "secret"}),
        app_info("billing", {"env": "prod"}),
    ])
    audit = AuditLog(backend, clock)
    audit.start()
    locks, users = LockWatcher(backend, clock), UserDirectory(backend, clock)
    sessions = SessionManager(backend, clock, config.session_ttl, locks=locks, users=users,
                              hashes=inline_hashes())
    _seed_keys(str(tmp_path))
    jwt_keys = JwtKeys.load_or_create(str(tmp_path), "RS256")
    ca = ClusterCA.load_or_create(str(tmp_path), config.cluster_name, wall_clock)
    _keep_keys(str(tmp_path))
    web = WebApp(config, sessions, RoleCache(backend, clock), registry, audit, jwt_keys, ca,
                 clock, locks=locks, users=users, backend=backend)
    yield Env(config, clock, backend, sessions, audit, jwt_keys, ca, web, registry, locks, users)
    await audit.stop()
    await backend.close()
