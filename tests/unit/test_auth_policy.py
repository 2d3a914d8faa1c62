"""RoleCache: roles from the backend, parsed once, refreshed after a short TTL."""

from __future__ import annotations

import pytest_twisted
from twisted.internet.task import Clock
from twisted.logger import Logger

from apptunnel.auth.policy import RoleCache
from apptunnel.backend.records import Resource
from tests.support.memory import MemoryBackend
from tests.support.waiting import wait


def role_doc(name, allow=None, deny=None):
    spec = {}
    if allow is not None:
        spec["allow"] = {"app_labels": allow}
    if deny is not None:
        spec["deny"] = {"app_labels": deny}
    return {"kind": "role", "metadata": {"name": name}, "spec": spec}


@pytest_twisted.async_yield_fixture
async def backend(tmp_path):
    b = MemoryBackend()
    await wait(b.put_resource(Resource("role", "dev", role_doc("dev", allow={"env": "dev"}))))
    await wait(b.put_resource(Resource("role", "all", role_doc("all", allow={"*": "*"}))))
    yield b
    await wait(b.close())


@pytest_twisted.ensureDeferred
async def test_role_set_from_backend(backend):
    """role_set loads and combines the named roles, ignoring unknown names."""
    cache = RoleCache(backend, Clock())
    logged = []
    cache._log = Logger(observer=logged.append)
    roles = await wait(cache.role_set(["dev", "ghost", "dev"]))
    assert roles.names == ("dev",)
    assert roles.check_app({"env": "dev"}, {}).allowed
    assert not roles.check_app({"env": "prod"}, {}).allowed
    assert any(e.get("role") == "ghost" for e in logged)


@pytest_twisted.ensureDeferred
async def test_changes_visible_after_ttl(backend):
    """An edited role is used once the cache TTL has passed on the clock, or on invalidate."""
    clock = Clock()
    cache = RoleCache(backend, clock, ttl=5.0)
    assert (await wait(cache.role_set(["dev"]))).check_app({"env": "dev"}, {}).allowed
    await wait(backend.put_resource(Resource("role", "dev", role_doc("dev", allow={"env": "x"}))))
    assert (await wait(cache.role_set(["dev"]))).check_app({"env": "dev"}, {}).allowed
    clock.advance(5)
    assert not (await wait(cache.role_set(["dev"]))).check_app({"env": "dev"}, {}).allowed
    await wait(backend.put_resource(Resource("role", "dev", role_doc("dev", allow={"env": "dev"}))))
    cache.invalidate("dev")
    assert (await wait(cache.role_set(["dev"]))).check_app({"env": "dev"}, {}).allowed


@pytest_twisted.ensureDeferred
async def test_broken_role_fails_closed(backend):
    """A stored role that no longer parses denies everything instead of vanishing."""
    broken = role_doc("no-prod", deny={"env": "^(prod$"})
    await wait(backend.put_resource(Resource("role", "no-prod", broken)))
    cache = RoleCache(backend, Clock())
    cache._log = Logger(observer=lambda e: None)
    decision = (await wait(cache.role_set(["all", "no-prod"]))).check_app({"env": "dev"}, {})
    assert decision.allowed is False and "no-prod" in decision.reason


@pytest_twisted.ensureDeferred
async def test_misnamed_role_fails_closed(backend):
    """A document stored under one name but naming another role denies everything."""
    await wait(backend.put_resource(Resource("role", "ops", role_doc("all", allow={"*": "*"}))))
    cache = RoleCache(backend, Clock())
    cache._log = Logger(observer=lambda e: None)
    assert not (await wait(cache.role_set(["ops"]))).check_app({}, {}).allowed


@pytest_twisted.ensureDeferred
async def test_stored_role_with_session_mfa_loads_and_asks_for_it(backend):
    """Issue 10: a stored role asking for per-session MFA (refused until the feature
    existed) now loads: it allows its apps and says they need a second factor."""
    doc = role_doc("prod-apps", allow={"env": "prod"})
    doc["spec"]["options"] = {"require_session_mfa": True}
    await wait(backend.put_resource(Resource("role", "prod-apps", doc)))
    cache = RoleCache(backend, Clock(), ttl=5.0)
    logged = []
    cache._log = Logger(observer=logged.append)
    roles = await wait(cache.role_set(["prod-apps"]))
    assert roles.check_app({"env": "prod"}, {}).allowed
    assert roles.session_mfa({"env": "prod"}, {})
    assert not [e for e in logged if "require_session_mfa" in str(e.get("problem", ""))]
