"""Stand-ins for what AccessPolicy asks, answering at once: `Roles` (the roles dev, ops and
no-prod, made by `role`; counts role_set calls) and `Users` (a directory of entries with a
revision, set per test). Shared by the unit tests of the policy, the router and app
connections; no storage, no reactor."""

from __future__ import annotations

from apptunnel.auth.directory import Entry
from apptunnel.auth.rbac import RoleSet, parse_role


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
