"""SessionManager refusing locked users and apps, over a real SQLite backend and a Clock."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet.task import Clock

from apptunnel.audit import AuditLog, code_for
from apptunnel.auth.errors import AuthError
from apptunnel.auth.locks import LockWatcher
from apptunnel.auth.sessions import LOCK_AUDIT_INTERVAL, SessionManager
from apptunnel.backend.records import Lock, User
from tests.support.memory import MemoryBackend, cheap_hash, inline_hashes
from tests.support.waiting import wait

PASSWORD = "correct horse battery staple"
HASH = cheap_hash(PASSWORD)


@pytest.fixture
def clock():
    c = Clock()
    c.advance(1_000_000)
    return c


@pytest_twisted.async_yield_fixture
async def backend(tmp_path):
    b = MemoryBackend()
    await wait(b.create_user(User("alice", HASH, ("dev",), {}, 0.0)))
    await wait(b.create_user(User("bob", HASH, ("dev",), {}, 0.0)))
    yield b
    await wait(b.close())


@pytest.fixture
def locks(backend, clock):
    return LockWatcher(backend, clock)


@pytest.fixture
def audit(backend, clock):
    return AuditLog(backend, clock)


@pytest.fixture
def sessions(backend, clock, locks, audit):
    return SessionManager(backend, clock, 3600.0, locks=locks, audit=audit, hashes=inline_hashes())


async def add_lock(backend, locks, clock, id="l1", user="alice", app=None, message="incident 42"):
    await wait(backend.put_lock(Lock(id, user, app, message, clock.seconds(), None, "admin")))
    await wait(locks.refresh())


async def open_app(sessions, user="alice", app="grafana"):
    """Sign in and redeem a hand-off: (web secret, app secret, app session)."""
    secret, web = await wait(sessions.create_web_session(await wait(sessions.login(user, PASSWORD))))
    code = await wait(sessions.create_auth_code(web, app, "/", "state"))
    app_secret, app_session, _ = await wait(sessions.redeem_auth_code(code, "state", app))
    return secret, app_secret, app_session


async def enforced(audit) -> list:
    return await wait(audit.search(type="lock.enforced"))


@pytest_twisted.ensureDeferred
async def test_locked_user_login_gets_403_with_the_message_after_the_password(
        sessions, backend, locks, clock):
    """A locked user with the right password gets 403 + message; a wrong one still 401."""
    await add_lock(backend, locks, clock)
    with pytest.raises(AuthError) as err:
        await wait(sessions.login("alice", PASSWORD))
    assert (err.value.status, err.value.message) == (403, "your access is locked: incident 42")
    with pytest.raises(AuthError) as err:
        await wait(sessions.login("alice", "wrong password"))
    assert (err.value.status, err.value.message) == (401, "invalid username or password")
    assert (await wait(sessions.login("bob", PASSWORD))).name == "bob"


@pytest_twisted.ensureDeferred
async def test_user_lock_wins_over_cached_sessions_at_once(sessions, backend, locks, clock):
    """Cached web/app sessions and identity are None as soon as the watcher has the lock."""
    secret, app_secret, app_session = await open_app(sessions)
    assert await wait(sessions.web_session(secret)) is not None
    await wait(backend.put_lock(Lock("l1", "alice", None, "", clock.seconds(), None, "admin")))
    assert await wait(sessions.web_session(secret)) is not None   # not polled yet
    await wait(locks.refresh())
    assert await wait(sessions.web_session(secret)) is None
    assert await wait(sessions.app_session(app_secret, "grafana")) is None
    assert await wait(sessions.identity(app_session)) is None
    with pytest.raises(AuthError) as err:
        await wait(sessions.create_web_session(User("alice", HASH, (), {}, 0.0)))
    assert (err.value.status, err.value.message) == (403, "your access is locked")


@pytest_twisted.ensureDeferred
async def test_app_lock_refuses_that_app_only(sessions, backend, locks, clock):
    """An app lock refuses app sessions, identity, launch and hand-off on that app only."""
    secret, app_secret, app_session = await open_app(sessions, app="grafana")
    _, wiki_secret, wiki_session = await open_app(sessions, app="wiki")
    _, web = await wait(sessions.create_web_session(await wait(sessions.login("alice", PASSWORD))))
    await add_lock(backend, locks, clock, user=None, app="grafana", message="maintenance")
    # A proxy that has not polled the lock yet can still mint a code; redeeming it here fails.
    unaware = SessionManager(backend, clock, 3600.0, hashes=inline_hashes())
    code = await wait(unaware.create_auth_code(web, "grafana", "/", "s2"))
    assert await wait(sessions.app_session(app_secret, "grafana")) is None
    assert await wait(sessions.identity(app_session)) is None
    for attempt in (sessions.create_auth_code(web, "grafana", "/", "s3"),
                    sessions.redeem_auth_code(code, "s2", "grafana")):
        with pytest.raises(AuthError) as err:
            await wait(attempt)
        assert (err.value.status, err.value.message) == (403, "your access is locked: maintenance")
    assert await wait(sessions.web_session(secret)) is not None
    assert await wait(sessions.app_session(wiki_secret, "wiki")) is not None
    assert await wait(sessions.identity(wiki_session)) is not None


@pytest_twisted.ensureDeferred
async def test_user_on_app_lock_leaves_other_users_and_apps(sessions, backend, locks, clock):
    """A lock naming user and app refuses that pair only."""
    _, alice_app, _ = await open_app(sessions, "alice", "grafana")
    alice_web, alice_wiki, _ = await open_app(sessions, "alice", "wiki")
    _, bob_app, _ = await open_app(sessions, "bob", "grafana")
    await add_lock(backend, locks, clock, user="alice", app="grafana")
    assert await wait(sessions.app_session(alice_app, "grafana")) is None
    assert await wait(sessions.app_session(alice_wiki, "wiki")) is not None
    assert await wait(sessions.app_session(bob_app, "grafana")) is not None
    assert await wait(sessions.web_session(alice_web)) is not None
    assert (await wait(sessions.login("alice", PASSWORD))).name == "alice"


@pytest_twisted.ensureDeferred
async def test_removed_lock_lets_the_user_sign_in_again(sessions, backend, locks, clock):
    """After the lock is deleted and polled, login works again."""
    await add_lock(backend, locks, clock)
    with pytest.raises(AuthError):
        await wait(sessions.login("alice", PASSWORD))
    await wait(backend.delete_lock("l1"))
    await wait(locks.refresh())
    assert (await wait(sessions.login("alice", PASSWORD))).name == "alice"


@pytest_twisted.ensureDeferred
async def test_lock_enforced_is_audited_once_per_user_and_app_per_interval(
        sessions, backend, locks, clock, audit):
    """Refusals emit lock.enforced (T6002W, failure), at most once per (user, app) per 10 s."""
    secret, app_secret, _ = await open_app(sessions)
    await add_lock(backend, locks, clock)
    for _ in range(3):
        assert await wait(sessions.web_session(secret)) is None
        assert await wait(sessions.app_session(app_secret, "grafana")) is None
    events = await enforced(audit)
    assert [(e.actor, e.target, e.code, e.outcome, e.fields["lock"]) for e in events] == [
        ("alice", "", "T6002W", "failure", "l1"),
        ("alice", "grafana", "T6002W", "failure", "l1"),
    ]
    clock.advance(LOCK_AUDIT_INTERVAL - 1)
    with pytest.raises(AuthError):
        await wait(sessions.login("alice", PASSWORD))
    assert len(await enforced(audit)) == 2
    clock.advance(1)
    with pytest.raises(AuthError):
        await wait(sessions.login("alice", PASSWORD))
    assert [e.fields["where"] for e in await enforced(audit)][2:] == ["login"]


def test_lock_audit_codes():
    """Lock events carry the documented codes."""
    assert code_for("lock.create", "success") == "T6000I"
    assert code_for("lock.delete", "success") == "T6001I"
    assert code_for("lock.enforced", "failure") == "T6002W"


@pytest_twisted.ensureDeferred
async def test_without_a_watcher_nothing_is_locked(backend, clock):
    """SessionManager without locks behaves as before (locks are optional)."""
    sessions = SessionManager(backend, clock, 3600.0, hashes=inline_hashes())
    await wait(backend.put_lock(Lock("l1", "alice", None, "", clock.seconds(), None, "admin")))
    assert (await wait(sessions.login("alice", PASSWORD))).name == "alice"


@pytest_twisted.ensureDeferred
async def test_no_new_web_session_while_audit_is_not_writable(backend, clock, locks):
    """audit.on_failure (issue 13): a sign-in whose session could not be audited is refused
    503 with the reason; nothing is stored; admitted again, it works."""
    from tests.support.audit_fake import Audit
    audit = Audit()
    audit.writable = False
    sessions = SessionManager(backend, clock, 3600.0, locks=locks, audit=audit,
                              hashes=inline_hashes())
    user = await wait(sessions.login("alice", PASSWORD))
    with pytest.raises(AuthError) as err:
        await wait(sessions.create_web_session(user))
    assert err.value.status == 503 and "audit log is not writable" in err.value.message
    assert await wait(backend.list_user_web_sessions("alice")) == []
    audit.admit = True
    secret, web = await wait(sessions.create_web_session(user))
    assert web.user == "alice"
