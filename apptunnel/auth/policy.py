"""Roles loaded from the backend and kept for a few seconds.

Every proxied request needs the caller's RoleSet; reading and parsing roles each time
would put the backend on the hot path. A short TTL keeps changes made with the CLI (or on
another proxy) visible within seconds.
"""

from __future__ import annotations

from collections.abc import Iterable

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from apptunnel.auth.rbac import LabelValue, Role, RoleError, RoleSet, parse_role
from apptunnel.backend.base import Backend

MAX_CACHED_ROLES = 10_000


def _deny_all(name: str) -> Role:
    """Stand-in for a role that cannot be parsed: fail closed, it might have been a deny."""
    return Role(
        name=name,
        allow_labels={},
        deny_labels={"*": (LabelValue("*", "any"),)},
        max_session_ttl=None,
    )


class RoleCache:
    """Parsed roles by name, each cached until ``ttl`` seconds after it was read."""

    _log = Logger()

    def __init__(self, backend: Backend, clock: IReactorTime, ttl: float = 5.0) -> None:
        self._backend = backend
        self._clock = clock
        self._ttl = ttl
        self._cache: dict[str, tuple[float, Role | None]] = {}
        self._reported: set[tuple[str, str]] = set()   # (role, problem) already logged

    async def role_set(self, names: Iterable[str]) -> RoleSet:
        """The RoleSet for these role names; unknown names are logged and ignored."""
        roles = []
        for name in dict.fromkeys(names):    # de-duplicate, keep order
            role = await self._role(name)
            if role is not None:
                roles.append(role)
        return RoleSet(roles)

    def invalidate(self, name: str | None = None) -> None:
        """Forget one role (or all) so the next lookup reads the backend."""
        if name is None:
            self._cache.clear()
        else:
            self._cache.pop(name, None)

    async def _role(self, name: str) -> Role | None:
        now = self._clock.seconds()
        cached = self._cache.get(name)
        if cached is not None and cached[0] > now:
            return cached[1]
        resource = await self._backend.get_resource("role", name)
        role: Role | None
        if resource is None:
            self._log.warn("role {role!r} is assigned but does not exist; ignored", role=name)
            role = None
        else:
            try:
                role = parse_role(resource.doc)
            except RoleError as err:
                self._report(name, f"role {name!r} is invalid and now denies everything "
                                   f"to its holders: {err}")
                role = _deny_all(name)
            else:
                if role.name != name:
                    self._report(name, f"role stored as {name!r} names itself "
                                       f"{role.name!r}; denying everything")
                    role = _deny_all(name)
        if len(self._cache) >= MAX_CACHED_ROLES:
            self._cache.clear()
        self._cache[name] = (now + self._ttl, role)
        return role

    def _report(self, name: str, problem: str) -> None:
        """Log a broken stored role once, not on every re-read of the cache."""
        if (name, problem) in self._reported:
            return
        if len(self._reported) >= MAX_CACHED_ROLES:
            self._reported.clear()
        self._reported.add((name, problem))
        self._log.error("{problem}", problem=problem)
