"""LockWatcher over the in-memory backend, with polling driven by a Clock."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet.task import Clock

from apptunnel.auth.locks import LockWatcher, lock_matches, lock_message
from apptunnel.backend.records import AppSession, Lock, WebSession
from tests.support.memory import MemoryBackend
from tests.support.waiting import wait

NOW = 1_000_000.0


def lock(id="l1", user="alice", app=None, expires=None, message="incident 42"):
    return Lock(id, user, app, message, NOW, expires, "admin")


@pytest.fixture
def clock():
    c = Clock()
    c.advance(NOW)
    return c


@pytest_twisted.async_yield_fixture
async def backend(tmp_path):
    b = MemoryBackend()
    yield b
    await wait(b.close())


@pytest.fixture
def watcher(backend, clock):
    w = LockWatcher(backend, clock, interval=2.0)
    yield w
    w.stop()


def test_matching_rules():
    """User-only locks cover the user everywhere, app-only everyone on the app, both = pair."""
    user_lock, app_lock = lock(user="alice"), lock(user=None, app="grafana")
    pair = lock(user="alice", app="grafana")
    assert lock_matches(user_lock, "alice") and lock_matches(user_lock, "alice", "wiki")
    assert not lock_matches(user_lock, "bob", "wiki")
    assert lock_matches(app_lock, "bob", "grafana") and lock_matches(app_lock, "alice", "grafana")
    assert not lock_matches(app_lock, "bob", "wiki") and not lock_matches(app_lock, "bob")
    assert lock_matches(pair, "alice", "grafana")
    assert not lock_matches(pair, "alice") and not lock_matches(pair, "alice", "wiki")
    assert not lock_matches(pair, "bob", "grafana")
    assert not lock_matches(lock(user=None, app=None), "alice", "grafana")
    assert lock_message(lock()) == "your access is locked: incident 42"
    assert lock_message(lock(message="")) == "your access is locked"


@pytest_twisted.ensureDeferred
async def test_refresh_loads_locks_and_locked_applies_the_rules(backend, watcher):
    """After refresh, locked() returns the matching lock and None for everyone else."""
    assert watcher.locked("alice") is None
    await wait(backend.put_lock(lock("u", user="alice")))
    await wait(backend.put_lock(lock("a", user=None, app="grafana")))
    await wait(backend.put_lock(lock("p", user="bob", app="wiki")))
    await wait(watcher.refresh())
    assert watcher.locked("alice").id == "u"
    assert watcher.locked("carol", "grafana").id == "a"
    assert watcher.locked("bob", "wiki").id == "p"
    assert watcher.locked("bob") is None and watcher.locked("bob", "other") is None
    assert [x.id for x in watcher.locks] == ["a", "p", "u"]


@pytest_twisted.ensureDeferred
async def test_expired_lock_stops_matching_at_once_and_removed_lock_at_next_poll(
        backend, watcher, clock):
    """Expiry is checked against the clock on lookup; a deleted lock is gone after a poll."""
    await wait(backend.put_lock(lock("short", expires=NOW + 60)))
    await wait(backend.put_lock(lock("app", user=None, app="grafana")))
    await wait(watcher.refresh())
    assert watcher.locked("alice").id == "short"
    clock.advance(60)
    assert watcher.locked("alice") is None
    assert watcher.locked("alice", "grafana").id == "app"
    await wait(backend.delete_lock("app"))
    await wait(watcher.refresh())
    assert watcher.locked("alice", "grafana") is None


@pytest_twisted.ensureDeferred
async def test_listener_is_called_once_per_new_lock(backend, watcher):
    """Each lock reaches every listener exactly once, however many polls see it."""
    seen: list[str] = []
    watcher.add_listener(lambda l: seen.append(l.id))
    await wait(backend.put_lock(lock("one")))
    await wait(watcher.refresh())
    await wait(watcher.refresh())
    assert seen == ["one"]
    await wait(backend.put_lock(lock("two", user="bob")))
    await wait(defer.gatherResults([defer.ensureDeferred(watcher.refresh()) for _ in range(3)]))
    assert seen == ["one", "two"]


@pytest_twisted.ensureDeferred
async def test_a_failing_listener_does_not_stop_the_others(backend, watcher):
    """A listener that raises is logged; the next one still hears about the lock."""
    seen: list[str] = []

    def broken(_lock):
        raise RuntimeError("boom")

    watcher.add_listener(broken)
    watcher.add_listener(lambda l: seen.append(l.id))
    await wait(backend.put_lock(lock("one")))
    await wait(watcher.refresh())
    assert seen == ["one"]
    watcher.remove_listener(broken)
    watcher.remove_listener(broken)   # removing twice is harmless


@pytest_twisted.ensureDeferred
async def test_new_user_lock_ends_that_users_stored_sessions(backend, watcher):
    """A user lock deletes the user's web and app sessions from storage; others stay."""
    for web_hash, user in (("w-alice", "alice"), ("w-bob", "bob")):
        await wait(backend.put_web_session(WebSession(web_hash, user, (), {}, NOW, NOW + 3600)))
        await wait(backend.put_app_session(
            AppSession("a-" + user, web_hash, user, "grafana", NOW, NOW + 3600)))
    await wait(backend.put_lock(lock("u", user="alice")))
    await wait(watcher.refresh())
    assert await wait(backend.get_web_session("w-alice")) is None
    assert await wait(backend.get_app_session("a-alice")) is None
    assert await wait(backend.get_web_session("w-bob")) is not None
    assert await wait(backend.get_app_session("a-bob")) is not None


@pytest_twisted.ensureDeferred
async def test_new_app_lock_ends_app_sessions_but_not_web_sessions(backend, watcher):
    """An app lock (optionally for one user) ends app sessions on that app only."""
    await wait(backend.put_web_session(WebSession("w", "alice", (), {}, NOW, NOW + 3600)))
    for app_hash, app in (("a1", "grafana"), ("a2", "wiki")):
        await wait(backend.put_app_session(AppSession(app_hash, "w", "alice", app, NOW, NOW + 3600)))
    await wait(backend.put_lock(lock("p", user="alice", app="grafana")))
    await wait(watcher.refresh())
    assert await wait(backend.get_app_session("a1")) is None
    assert await wait(backend.get_app_session("a2")) is not None
    assert await wait(backend.get_web_session("w")) is not None


@pytest_twisted.ensureDeferred
async def test_start_polls_now_and_on_every_tick_until_stop(backend, watcher, clock):
    """start() polls at once and then every interval of the clock; stop() ends polling."""
    seen: list[str] = []
    watcher.add_listener(lambda l: seen.append(l.id))
    await wait(backend.put_lock(lock("first")))
    watcher.start()
    watcher.start()   # idempotent
    assert seen == ["first"]     # the first poll
    await wait(backend.put_lock(lock("second", user="bob")))
    clock.advance(1.9)
    assert seen == ["first"]
    clock.advance(0.1)
    assert seen == ["first", "second"]     # the tick's poll
    await wait(watcher.refresh())   # let any poll in flight finish before stopping
    watcher.stop()
    await wait(backend.put_lock(lock("third", user="carol")))
    clock.advance(10)
    assert seen == ["first", "second"] and watcher.locked("carol") is None


@pytest_twisted.ensureDeferred
async def test_backend_failure_keeps_the_known_locks_and_never_raises(backend, watcher):
    """When storage fails, refresh logs and keeps the last known locks in force."""
    await wait(backend.put_lock(lock("u")))
    await wait(watcher.refresh())
    await wait(backend.close())
    await wait(watcher.refresh())
    assert watcher.locked("alice").id == "u"
