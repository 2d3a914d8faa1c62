"""Stand-ins for what AccessPolicy asks, answering at once: `Roles` (the roles dev, ops and
no-prod, made by `role`; counts role_set calls), `Users` (a directory of entries with a
revision, set per test) and `Locks`; `cert` makes a certificate caller valid at `NOW`, and
`run` drives a decision that never really waits. Shared by the unit tests of the policy, the router and app
connections; no storage, no reactor."""

from __future__ import annotations

from twisted.internet.defer import Deferred

from apptunnel.auth.callers import Caller
from apptunnel.auth.directory import Entry
from apptunnel.auth.locks import lock_matches
from apptunnel.auth.rbac import RoleSet, parse_role
from apptunnel.backend.records import Lock


def role(name, allow=None, deny=None):
    spec = {}
    if allow:
        spec["allow"] = {"app_labels": allow}
    if deny:
        spec["deny"] = {"app_labels": deny}
    return parse_role({"kind": "role", "metadata": {"name": name}, "spec": spec})


class Roles:
    def __init__(self):
        self.roles = {"dev": role("dev", {"env": "dev"}), "ops": role("ops", {"env": "*"}),
                      "no-prod": role("no-prod", deny={"env": "prod"})}
        self.calls = 0

    async def role_set(self, names):
        self.calls += 1
        return RoleSet([self.roles[n] for n in names if n in self.roles])


class Users:
    def __init__(self, **entries):
        self.revision = 0
        self.entries = {}
        self.lookups = 0
        for name, roles in entries.items():
            self.set(name, roles)

    def set(self, name, roles, traits=None):
        self.revision += 1
        self.entries[name] = Entry(name, tuple(roles), traits or {}, self.revision)

    def current(self, name):
        return self.entries.get(name)

    async def lookup(self, name):
        self.lookups += 1
        return self.entries.get(name)

    def add_listener(self, fn):
        self.listener = fn


NOW = 1_000_000.0


class Locks:
    def __init__(self):
        self.all: list[Lock] = []

    def locked(self, user, app=None):
        return next((lock for lock in self.all if lock_matches(lock, user, app)), None)

    def add_listener(self, fn):
        self.listener = fn


def run(coro):
    """Drive a coroutine that never really waits (the fakes answer at once)."""
    out = []
    Deferred.fromCoroutine(coro).addBoth(out.append)
    assert out, "the decision waited on something"
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


def cert(user="alice", roles=("dev",), credential="fp-1", expires=NOW + 3600):
    return Caller(user, roles, {}, "certificate", credential, expires)
