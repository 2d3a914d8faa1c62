"""Local users: create (with an invite link), reset, change roles and traits, delete.

Every role named must exist (a typo would make a user who opens nothing). Removing a
user or changing their roles reaches their sessions and certificates through the user
directory (auth/directory.py); the nudge makes it hold before the answer.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import attrs

from apptunnel.admin.context import CONFLICT, NOT_FOUND, Actor, AdminContext, AdminError
from apptunnel.auth.links import issue_link, link_url
from apptunnel.auth.names import ROLE_NAME, TRAIT_NAME, USER_NAME
from apptunnel.backend import AlreadyExists
from apptunnel.backend.records import User

MAX_LINK_TTL = 30 * 86400.0


@attrs.frozen
class Link:
    """A one-time invite or reset link just issued (shown once, never stored in clear)."""

    kind: str
    ttl: float
    url: str


def check_user_name(name: object) -> str:
    if not isinstance(name, str) or not USER_NAME.match(name):
        raise AdminError(f"invalid user name {name!r} (letters, digits and . _ @ + -, "
                         "starting with a letter or digit)")
    return name


def check_roles(names: Iterable[object], field: str = "roles") -> tuple[str, ...]:
    """Valid role names, duplicates dropped; at least one."""
    names = list(names)
    if not names:
        raise AdminError("give at least one role name", field=field)
    for name in names:
        if not isinstance(name, str) or not ROLE_NAME.match(name):
            raise AdminError(f"invalid role name {name!r}", field=field)
    return tuple(dict.fromkeys(names))


def check_traits(traits: Mapping[object, object]) -> dict[str, tuple[str, ...]]:
    """``{"logins": ["alice"]}`` checked: valid names, a non-empty list of strings each."""
    checked: dict[str, tuple[str, ...]] = {}
    for key, values in traits.items():
        if not isinstance(key, str) or not TRAIT_NAME.match(key):
            raise AdminError(f"invalid trait name {key!r}", field="traits")
        if isinstance(values, str):
            values = [values]
        if not isinstance(values, (list, tuple)) or not values \
                or not all(isinstance(v, str) and v for v in values):
            raise AdminError(f"{key}: give at least one value", field="traits")
        checked[key] = tuple(dict.fromkeys(values))
    return checked


class UserAdmin:
    """The changes to local users, each audited once."""

    def __init__(self, ctx: AdminContext, hash_password=None) -> None:
        self._ctx = ctx
        # async (password) -> argon2 hash, off the reactor; None where passwords are only
        # ever chosen by their user through a link (the admin API and pages).
        self._hash = hash_password

    async def require_roles(self, roles: tuple[str, ...], field: str = "roles") -> None:
        missing = await self._ctx.missing_role(roles)
        if missing is not None:
            raise AdminError(f"role {missing!r} does not exist (create it first with "
                             "`apptunnel create -f ROLE.yaml`; `apptunnel get roles` lists "
                             "them); nothing was changed", field=field)

    async def existing(self, name: str) -> User:
        user = await self._ctx.backend.get_user(check_user_name(name))
        if user is None:
            raise AdminError(f"no user named {name!r}", NOT_FOUND)
        return user

    async def list(self) -> list[User]:
        return sorted(await self._ctx.backend.list_users(), key=lambda u: u.name)

    async def create(self, actor: Actor, name: str, roles: tuple[str, ...],
                     traits: dict, password: str | None, invite_ttl: float | None
                     ) -> tuple[User, Link | None]:
        """A new user: with ``password`` set now, else an invite link (``invite_ttl``)."""
        name = check_user_name(name)
        roles = check_roles(roles)
        traits = check_traits(traits)
        await self.require_roles(roles)
        if password is not None and self._hash is None:
            raise AdminError("passwords are chosen by their user through an invite link")
        password_hash = None if password is None else await self._hash(password)
        user = User(name=name, password_hash=password_hash, roles=roles, traits=traits,
                    created=self._ctx.now())
        try:
            await self._ctx.backend.create_user(user)
        except AlreadyExists:
            raise AdminError(f"user {name!r} already exists (see `apptunnel users update` "
                             "and `apptunnel users set-password`)", CONFLICT) from None
        self._ctx.emit(actor, "user.create", name, roles=list(roles), traits=sorted(traits))
        link = None
        if password is None and invite_ttl is not None:
            link = await self.link(actor, name, "invite", invite_ttl)
        return user, link

    async def link(self, actor: Actor, name: str, kind: str, ttl: float) -> Link:
        token = await issue_link(self._ctx.backend, name, kind, ttl, self._ctx.now())
        self._ctx.emit(actor, "user.link.issue", name, method=kind, ttl=ttl)
        return Link(kind, ttl, link_url(self._ctx.public_addr, kind, token))

    async def reset(self, actor: Actor, name: str, ttl: float) -> tuple[User, Link]:
        """Take the password away, end every session now, issue a reset link."""
        user = await self.existing(name)
        await self._ctx.backend.update_user(attrs.evolve(user, password_hash=None))
        ended = await self._ctx.backend.delete_user_sessions(user.name)
        self._ctx.emit(actor, "user.update", user.name, changed=["password"], reset=True,
                       app_sessions_ended=len(ended))
        await self._ctx.nudge()   # the proxy forgets cached sessions now
        return user, await self.link(actor, user.name, "reset", ttl)

    async def set_password(self, actor: Actor, name: str, password: str) -> User:
        if self._hash is None:
            raise AdminError("passwords are chosen by their user through a reset link")
        user = await self.existing(name)
        await self._ctx.backend.update_user(attrs.evolve(
            user, password_hash=await self._hash(password)))
        self._ctx.emit(actor, "user.update", user.name, changed=["password"])
        return user

    async def update(self, actor: Actor, name: str, roles: tuple[str, ...] | None,
                     traits: dict | None) -> tuple[User, list[str]]:
        """New roles and/or traits (each replaces the old); live connections re-checked."""
        if roles is None and traits is None:
            raise AdminError("users update: nothing to change (give --roles and/or --traits)")
        roles = check_roles(roles) if roles is not None else None
        traits = check_traits(traits) if traits is not None else None
        user = await self.existing(name)
        if roles is not None:
            await self.require_roles(roles)
        changed = [what for what, value in (("roles", roles), ("traits", traits))
                   if value is not None]
        updated = attrs.evolve(user, roles=roles if roles is not None else user.roles,
                               traits=traits if traits is not None else user.traits)
        await self._ctx.backend.update_user(updated)
        self._ctx.emit(actor, "user.update", user.name, changed=changed,
                       roles=list(updated.roles))
        await self._ctx.nudge()   # live connections are re-checked now
        return updated, changed

    async def sessions(self, name: str) -> list:
        """``name``'s live web sessions, oldest first."""
        user = await self.existing(name)
        now = self._ctx.now()
        found = await self._ctx.backend.list_user_web_sessions(user.name)
        return sorted((s for s in found if s.expires > now), key=lambda s: s.created)

    async def end_sessions(self, actor: Actor, name: str) -> int:
        """Sign ``name`` out everywhere (web and app sessions) now; how many ended."""
        user = await self.existing(name)
        webs = await self._ctx.backend.list_user_web_sessions(user.name)
        ended = await self._ctx.backend.delete_user_sessions(user.name)
        self._ctx.emit(actor, "session.web.end", user.name, user=user.name, everywhere=True,
                       web_sessions_ended=len(webs), app_sessions_ended=len(ended))
        await self._ctx.nudge()   # the proxy forgets its cached sessions now
        return len(webs)

    async def delete(self, actor: Actor, name: str) -> None:
        name = check_user_name(name)
        if not await self._ctx.backend.delete_user(name):
            raise AdminError(f"no user named {name!r}", NOT_FOUND)
        self._ctx.emit(actor, "user.delete", name)
        await self._ctx.nudge()   # their certificates and live connections end now
