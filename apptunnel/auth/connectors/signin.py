"""One path for "an external identity signed in", whatever the connector.

A connector (LDAP today; OIDC and SAML later) proves who someone is and hands over an
`ExternalIdentity`: the connector, the user name and every claim or attribute. From
there the path is the same for all: the connector's rules give the roles (none: refused,
with a message that says so, and audited), the claims become traits, and the user is
stored as a *connector user*.

Why store them. Every credential is capped by what its user holds now
(``auth/directory.py``): a session or certificate of a user the directory does not know
acts as nobody. So a connector's sign-in writes the user record (``User.connector`` set,
no password) with the roles and traits of *this* sign-in, like Teleport's users created
by SSO, and re-reads it into the directory at once. Consequences, on purpose:

* locks name users, so ``apptunnel lock --user alice`` holds for an LDAP alice too;
* ``apptunnel users rm alice`` ends her sessions and certificates now (her next sign-in
  makes the record again: to keep someone out, lock them or fix the directory);
* a later sign-in with fewer groups lowers the roles of her older sessions too (they are
  capped by the record), and her live connections are re-checked;
* a connector never takes over a name it did not make: a local user (or another
  connector's) of the same name refuses the sign-in, so a directory entry ``admin`` is
  not the local ``admin``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from apptunnel.auth.connectors.mapping import RoleRule, claims_to_traits, roles_for
from apptunnel.auth.errors import AuthError
from apptunnel.auth.locks import lock_message
from apptunnel.backend.base import AlreadyExists, Backend
from apptunnel.backend.records import User

if TYPE_CHECKING:
    from apptunnel.audit import AuditLog
    from apptunnel.auth.directory import UserDirectory
    from apptunnel.auth.locks import LockWatcher

NAME_TAKEN = "the user name {user!r} belongs to another account here; ask an administrator"
NO_ROLE = ("you signed in as {user!r} through {connector}, but none of your groups or claims "
           "maps to a role here; ask an administrator to map one")


@attrs.frozen
class ExternalIdentity:
    """Who a connector says signed in: ``claims`` are its attributes, each a tuple."""

    connector: str
    kind: str                     # ldap | oidc | saml: the audit's ``method``
    username: str
    claims: Mapping[str, tuple[str, ...]]


def audit_login(audit: AuditLog, user: str, kind: str, connector: str, client: str,
                reason: str | None = None) -> None:
    """``user.login`` of a connector sign-in: success, or failure with ``reason``."""
    fields = {"method": kind, "connector": connector, "client": client}
    if reason is None:
        audit.emit("user.login", actor=user, **fields)
    else:
        audit.emit("user.login", actor=user, outcome="failure", reason=reason, **fields)


class ExternalSignIn:
    """Identity -> roles -> the stored connector user, audited; time from ``clock``."""

    _log = Logger()

    def __init__(self, backend: Backend, audit: AuditLog, clock: IReactorTime,
                 users: UserDirectory | None = None, locks: LockWatcher | None = None) -> None:
        self._backend = backend
        self._audit = audit
        self._clock = clock
        self._users = users
        self._locks = locks

    async def sign_in(self, identity: ExternalIdentity, rules: Iterable[RoleRule],
                      client: str = "") -> User:
        """The user record to open a session for; AuthError(403) for a locked user, no
        role or a name that belongs to another account (each audited)."""
        lock = self._locks.locked(identity.username) if self._locks is not None else None
        if lock is not None:   # as for local users: said only once the password matched
            self._refuse(identity, client, "locked", lock_message(lock))
        roles = roles_for(rules, identity.claims)
        if not roles:
            self._refuse(identity, client, "no role",
                         NO_ROLE.format(user=identity.username, connector=identity.connector))
        traits = claims_to_traits(identity.claims)
        user = await self._store(identity, roles, traits, client)
        if self._users is not None:
            await self._users.reread(user.name)
        audit_login(self._audit, user.name, identity.kind, identity.connector, client)
        return user

    async def _store(self, identity: ExternalIdentity, roles: tuple[str, ...],
                     traits: dict, client: str) -> User:
        name = identity.username
        for _ in range(2):   # a second try only when a racing sign-in created it first
            existing = await self._backend.get_user(name)
            if existing is None:
                user = User(name, None, roles, traits, self._clock.seconds(),
                            connector=identity.connector)
                try:
                    await self._backend.create_user(user)
                except AlreadyExists:
                    continue
                return user
            if existing.connector != identity.connector:
                self._log.warn("{connector} sign-in of {user!r} refused: the name belongs to "
                               "a {what}", connector=identity.connector, user=name,
                               what=f"user of connector {existing.connector}"
                               if existing.connector else "local user")
                self._refuse(identity, client, "name taken", NAME_TAKEN.format(user=name))
            user = attrs.evolve(existing, roles=roles, traits=traits)
            if user != existing:
                await self._backend.update_user(user)
            return user
        raise AuthError(503, "sign-in is busy; try again")

    def _refuse(self, identity: ExternalIdentity, client: str, reason: str, message: str):
        audit_login(self._audit, identity.username, identity.kind, identity.connector,
                    client, reason)
        raise AuthError(403, message)
