"""Invite and reset links: a local user sets their own password once, through a URL.

`apptunnel users add` (without a password) and `apptunnel users reset` issue a link; the
proxy's web page `/web/invite/TOKEN` or `/web/reset/TOKEN` redeems it. Only the token's
hash is stored; a link works once and until it expires; a user has at most one live link
(a new one replaces the old). A reset also takes the old password away at once and ends
the user's sessions (done by the CLI when it issues the link).

Every look at a link, good or bad, is an attempt for the sign-in throttle of the client
address (`auth/throttle.py`), and every redemption is audited.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs
from twisted.internet.interfaces import IReactorTime

from apptunnel.auth.errors import AuthError
from apptunnel.auth.passwords import MAX_PASSWORD_LENGTH, MIN_PASSWORD_LENGTH, HashQueue
from apptunnel.auth.throttle import LoginThrottle
from apptunnel.auth.tokens import new_secret, secret_hash
from apptunnel.backend.base import Backend, NotFound
from apptunnel.backend.records import User, UserLink

if TYPE_CHECKING:
    from apptunnel.audit import AuditLog

KINDS = ("invite", "reset")
DEFAULT_TTL = 86400.0
MAX_TOKEN_LENGTH = 256

LINK_UNKNOWN = "This link is not valid. Ask your administrator for a new one."
LINK_USED = "This link has already been used. Ask your administrator for a new one."
LINK_EXPIRED = "This link has expired. Ask your administrator for a new one."


def link_url(public_addr: str, kind: str, token: str) -> str:
    return f"https://{public_addr}/web/{kind}/{token}"


def link_problem(link: UserLink | None, kind: str, now: float) -> str | None:
    """Why this link cannot be used now (a message for its holder), or None."""
    if link is None or link.kind != kind:
        return LINK_UNKNOWN
    if link.used is not None:
        return LINK_USED
    if not link.expires > now:
        return LINK_EXPIRED
    return None


def password_problem(password: object, confirm: object) -> str | None:
    """The same rules as `apptunnel users add --password-stdin`."""
    if not isinstance(password, str) or not isinstance(confirm, str):
        return "Give the new password twice."
    if password != confirm:
        return "The two passwords differ."
    if len(password) < MIN_PASSWORD_LENGTH:
        return f"The password must have at least {MIN_PASSWORD_LENGTH} characters."
    if len(password) > MAX_PASSWORD_LENGTH:
        return f"The password must have at most {MAX_PASSWORD_LENGTH} characters."
    if "\n" in password or "\r" in password:
        return "The password must be a single line."
    return None


async def issue_link(backend: Backend, user: str, kind: str, ttl: float, now: float) -> str:
    """Store a fresh link for ``user`` (replacing their others) and return its token."""
    if kind not in KINDS:
        raise ValueError(f"unknown link kind {kind!r}")
    token = new_secret()
    await backend.put_user_link(UserLink(secret_hash(token), user, kind, now, now + ttl))
    return token


class LinkRedeemer:
    """The proxy's side: look at a link, and set a password through it (once)."""

    def __init__(self, backend: Backend, clock: IReactorTime, throttle: LoginThrottle,
                 hashes: HashQueue, audit: AuditLog | None = None) -> None:
        self._backend = backend
        self._clock = clock
        self._throttle = throttle
        self._hashes = hashes
        self._audit = audit

    async def look(self, kind: str, token: str, address: str) -> UserLink:
        """The live link, or AuthError(410/404) saying why not (throttled per address)."""
        key = _throttle_key(address)
        self._throttle.attempt(key, address, self._clock.seconds())
        link = await self._find(token)
        problem = link_problem(link, kind, self._clock.seconds())
        if problem is not None:
            self._emit(kind, link, address, "failure", reason=_reason(problem))
            raise AuthError(404 if problem == LINK_UNKNOWN else 410, problem)
        self._throttle.abandoned(key, address)   # looking at a good link costs nothing
        return link

    async def redeem(self, kind: str, token: str, password: str, address: str) -> User:
        """Burn the link and give its user ``password``; AuthError if the link is not good."""
        link = await self.look(kind, token, address)
        hashed = await self._hashes.hash(address, password)
        used = await self._backend.use_user_link(link.token_hash, self._clock.seconds())
        if used is None:   # another request took it meanwhile
            self._emit(kind, link, address, "failure", reason="used")
            raise AuthError(410, LINK_USED)
        user = await self._backend.get_user(used.user)
        if user is None:
            self._emit(kind, used, address, "failure", reason="no such user")
            raise AuthError(404, LINK_UNKNOWN)
        user = attrs.evolve(user, password_hash=hashed)
        try:
            await self._backend.update_user(user)
        except NotFound:
            raise AuthError(404, LINK_UNKNOWN) from None
        self._emit(kind, used, address, "success")
        return user

    async def _find(self, token: str) -> UserLink | None:
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_LENGTH:
            return None
        return await self._backend.get_user_link(secret_hash(token))

    def _emit(self, kind: str, link: UserLink | None, address: str, outcome: str,
              **fields) -> None:
        if self._audit is not None:
            user = link.user if link is not None else ""
            self._audit.emit("user.link", actor=user, target=user, outcome=outcome,
                             method=kind, client=address, **fields)


def _throttle_key(address: str) -> str:
    """Links name no user until found: their attempts count for the address alone."""
    return "\x00link:" + address


def _reason(problem: str) -> str:
    return {LINK_USED: "used", LINK_EXPIRED: "expired"}.get(problem, "unknown")
