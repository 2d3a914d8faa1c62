"""The user directory (auth/directory.py) and sessions capped by it, over real SQLite and a
Clock: removed users act as nobody, changed roles cap what old credentials claim."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet.task import Clock

from apptunnel.auth.directory import Entry, UserDirectory, effective_identity
from apptunnel.auth.sessions import SessionManager
from apptunnel.backend.records import User
from tests.support.memory import MemoryBackend, cheap_hash, inline_hashes
from tests.support.waiting import wait

PASSWORD = "correct horse battery staple"
HASH = cheap_hash(PASSWORD)
NOW = 1_000_000.0


def entry(roles=("a",), traits=None, revision=1):
    return Entry("bob", tuple(roles), traits or {}, revision)


def test_effective_identity_caps_roles_and_traits_by_what_the_user_holds_now():
    """[a,b] for a user now holding [a] acts as [a]; trait values likewise; order kept."""
    assert effective_identity(("b", "a", "b"), {}, entry(("a", "b", "c"))) == (("b", "a"), {})
    assert effective_identity(("a", "b"), {}, entry(("a",))) == (("a",), {})
    assert effective_identity(("admin",), {}, entry(("a",))) == ((), {})
    traits = {"team": ("sre", "dba"), "login": ["root"], "gone": ("x",), "one": "v"}
    now = {"team": ("sre",), "login": ("root", "alice"), "one": ("v",)}
    assert effective_identity((), traits, entry((), now)) == (
        (), {"team": ("sre",), "login": ("root",), "one": ("v",)})


def test_a_removed_user_acts_as_nobody():
    """No current entry: None, whatever the credential claims."""
    assert effective_identity(("a",), {"team": ("sre",)}, None) is None


@pytest.fixture
def clock():
    c = Clock()
    c.advance(NOW)
    return c


@pytest_twisted.async_yield_fixture
async def backend(tmp_path):
    b = MemoryBackend()
    await wait(b.create_user(User("alice", HASH, ("dev",), {}, 0.0)))
    await wait(b.create_user(User("bob", HASH, ("dev", "ops"), {"team": ("sre",)}, 0.0)))
    yield b
    await wait(b.close())


@pytest.fixture
def users(backend, clock):
    d = UserDirectory(backend, clock)
    yield d
    d.stop()


async def set_roles(backend, name, roles, traits=None):
    user = await wait(backend.get_user(name))
    await wait(backend.update_user(User(name, user.password_hash, tuple(roles),
                                        traits if traits is not None else user.traits, 0.0)))


@pytest_twisted.ensureDeferred
async def test_poll_tells_listeners_of_removed_and_changed_users_once(backend, users):
    """After a poll, current() knows everyone; listeners hear each change exactly once."""
    heard = []
    users.add_listener(lambda name, e: heard.append((name, e and e.roles)))
    await wait(users.refresh())
    assert users.current("bob").roles == ("dev", "ops") and heard == []
    before = users.current("bob").revision
    await set_roles(backend, "bob", ["dev"])
    await wait(backend.delete_user("alice"))
    await wait(users.refresh())
    await wait(users.refresh())
    assert sorted(heard) == [("alice", None), ("bob", ("dev",))]
    assert users.current("alice") is None and users.current("bob").revision != before


@pytest_twisted.ensureDeferred
async def test_unchanged_users_keep_their_revision(backend, users):
    """A poll that finds nothing new changes no revision (decision caches stay valid)."""
    await wait(users.refresh())
    rev = users.current("bob").revision
    await wait(users.refresh())
    assert users.current("bob").revision == rev


@pytest_twisted.ensureDeferred
async def test_a_user_created_after_the_last_poll_is_read_on_first_use(backend, users, clock):
    """lookup() reads a name the poll did not know; unknown names are cached briefly."""
    await wait(users.refresh())
    await wait(backend.create_user(User("carol", HASH, ("dev",), {}, 0.0)))
    assert users.current("carol") is None
    assert (await wait(users.lookup("carol"))).roles == ("dev",)
    assert await wait(users.lookup("nobody")) is None
    await wait(backend.create_user(User("nobody", HASH, ("dev",), {}, 0.0)))
    assert await wait(users.lookup("nobody")) is None        # the miss is remembered
    clock.advance(1.5)
    assert (await wait(users.lookup("nobody"))).roles == ("dev",)


@pytest_twisted.ensureDeferred
async def test_backend_failure_keeps_the_known_users(backend, users):
    """When storage fails, refresh logs and keeps the last known users; never raises."""
    await wait(users.refresh())
    await wait(backend.close())
    await wait(users.refresh())
    assert users.current("bob") is not None
    assert await wait(users.lookup("zed")) is None


@pytest_twisted.ensureDeferred
async def test_sessions_of_a_removed_user_end_at_the_next_poll(backend, users, clock):
    """Cached web session and identity are None once the directory knows the user is gone."""
    sessions = SessionManager(backend, clock, 3600.0, users=users, hashes=inline_hashes())
    await wait(users.refresh())
    user = await wait(sessions.login("alice", PASSWORD))
    secret, web = await wait(sessions.create_web_session(user))
    code = await wait(sessions.create_auth_code(web, "grafana", "/", "state"))
    _, app_session, _ = await wait(sessions.redeem_auth_code(code, "state", "grafana"))
    assert (await wait(sessions.web_session(secret))).roles == ("dev",)
    await wait(backend.delete_user("alice"))
    await wait(users.refresh())
    assert await wait(sessions.web_session(secret)) is None
    assert await wait(sessions.identity(app_session)) is None


@pytest_twisted.ensureDeferred
async def test_sessions_act_with_the_roles_the_user_holds_now(backend, users, clock):
    """A session started with [dev, ops] acts as [dev] once ops is taken away."""
    sessions = SessionManager(backend, clock, 3600.0, users=users, hashes=inline_hashes())
    await wait(users.refresh())
    secret, web = await wait(sessions.create_web_session(await wait(sessions.login("bob", PASSWORD))))
    assert web.roles == ("dev", "ops")
    await set_roles(backend, "bob", ["dev", "new"], traits={})
    await wait(users.refresh())
    now = await wait(sessions.web_session(secret))
    assert now.roles == ("dev",) and now.traits == {}


@pytest_twisted.ensureDeferred
async def test_a_poll_that_read_before_a_lookup_does_not_remove_its_user(backend, users):
    """A user created and looked up while a poll was reading is not reported removed by
    that poll (its list is older); the next poll is authoritative."""
    from twisted.internet import defer

    await wait(users.refresh())
    gate, real = defer.Deferred(), backend.list_users
    stale = await wait(real())

    async def slow_list():
        await gate
        return stale

    backend.list_users = slow_list
    heard = []
    users.add_listener(lambda name, e: heard.append((name, e)))
    polling = defer.ensureDeferred(users.refresh())
    await wait(backend.create_user(User("carol", HASH, ("dev",), {}, 0.0)))
    assert (await wait(users.lookup("carol"))).roles == ("dev",)
    gate.callback(None)
    await wait(polling)
    assert heard == [] and users.current("carol") is not None
    backend.list_users = real
    await wait(users.refresh())
    assert heard == [] and users.current("carol") is not None
