"""Locks: shut a user, an app, a user on one app, a bot or an agent out, now.

A lock is a row; every proxy's lock watcher (auth/locks.py) ends the matching sessions
and refuses new ones. The nudge makes it hold on this proxy before the answer.
"""

from __future__ import annotations

import datetime
import re
import uuid

from apptunnel.admin.context import CONFLICT, NOT_FOUND, Actor, AdminContext, AdminError
from apptunnel.auth.bots import bot_of, bot_principal
from apptunnel.auth.names import BOT_NAME, USER_NAME
from apptunnel.backend.records import Lock

MAX_MESSAGE = 500
MAX_TTL = 3650 * 86400.0
MIN_ID_PREFIX = 6
_APP_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-")
_AGENT_ID = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,126}[A-Za-z0-9])?\Z")


def _shown(value: object) -> str:
    """A value quoted in an error: control characters escaped (it reaches a terminal)."""
    text = value if isinstance(value, str) else str(value)
    return re.sub(r"[\x00-\x1f\x7f-\x9f]",
                  lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def iso_time(seconds: float | None) -> str | None:
    """``2024-05-01T12:00:00Z`` (what the lock events have always carried)."""
    if seconds is None:
        return None
    moment = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def lock_target(user: str | None, app: str | None, agent: str | None,
                bot: str | None) -> tuple[str | None, str | None]:
    """(user principal, app) a lock names, checked; AdminError on a bad combination."""
    if bot is not None:
        # A bot acts as the principal bot:NAME (auth/bots.py): its lock is on that name.
        if user is not None or agent is not None:
            raise AdminError("lock: --bot goes alone or with --app (not with --user or --agent)")
        if not BOT_NAME.match(bot):
            raise AdminError("not a valid bot name (lowercase letters, digits, '.', '_', "
                             f"'-'): {_shown(bot)!r}")
        return bot_principal(bot), app
    if agent is not None:
        if user is not None or app is not None:
            raise AdminError("lock: --agent goes alone (without --user or --app)")
        if not _AGENT_ID.match(agent):
            raise AdminError(f"not a valid agent id: {_shown(agent)!r}", field="agent")
        return None, None
    if user is None and app is None:
        raise AdminError("lock: give --user NAME, --app NAME, or both (or --agent ID)")
    if user is not None and not USER_NAME.match(user):
        raise AdminError(f"not a valid user name: {_shown(user)!r}", field="user")
    if app is not None and not (0 < len(app) <= 63 and set(app) <= _APP_NAME_CHARS
                                and app[0] != "-" and app[-1] != "-"):
        raise AdminError(f"not a valid app name: {_shown(app)!r}", field="app")
    return user, app


def lock_message(text: str) -> str:
    text = text.strip()
    if len(text) > MAX_MESSAGE:
        raise AdminError(f"at most {MAX_MESSAGE} characters", field="message")
    if any(ord(c) < 32 or 127 <= ord(c) < 160 for c in text):
        raise AdminError("control characters are not allowed", field="message")
    return text


def describe(lock: Lock) -> str:
    if lock.agent:
        return f"agent {lock.agent}"
    who = f"bot {bot_of(lock.user)}" if lock.user and bot_of(lock.user) else f"user {lock.user}"
    if lock.user and lock.app:
        return f"{who} on app {lock.app}"
    return who if lock.user else f"app {lock.app}"


class LockAdmin:
    """Create, list and remove locks, each change audited once."""

    def __init__(self, ctx: AdminContext) -> None:
        self._ctx = ctx

    async def create(self, actor: Actor, *, user: str | None = None, app: str | None = None,
                     agent: str | None = None, bot: str | None = None,
                     ttl: float | None = None, message: str = "") -> tuple[Lock, list[str]]:
        """The lock, and warnings for targets not known (yet): it applies when they come."""
        principal, app = lock_target(user, app, agent, bot)
        if ttl is not None and not 0 < ttl <= MAX_TTL:
            raise AdminError("must be more than 0 and at most 3650d", field="ttl")
        message = lock_message(message)
        backend, warnings = self._ctx.backend, []
        if bot is not None and await backend.get_bot(bot) is None:
            warnings.append(f"no bot {bot!r}; the lock applies if one is added")
        elif principal is not None and bot is None and await backend.get_user(principal) is None:
            warnings.append(f"no local user {principal!r}; the lock still applies if they "
                            "sign in through SSO")
        if agent is not None and await backend.get_agent(agent) is None:
            warnings.append(f"no agent {agent!r} has joined; the lock applies if one does")
        now = self._ctx.now()
        lock = Lock(id=str(uuid.uuid4()), user=principal, app=app, message=message,
                    created=now, expires=now + ttl if ttl is not None else None,
                    created_by=actor.name, agent=agent)
        await backend.put_lock(lock)
        await self._ctx.nudge()   # holds on this machine's proxy before we answer
        self._ctx.emit(actor, "lock.create", lock.id, user=principal, app=app, agent=agent,
                       message=message, expires=iso_time(lock.expires))
        return lock, warnings

    async def list(self) -> list[Lock]:
        return await self._ctx.backend.list_locks(self._ctx.now())

    async def find(self, given: str) -> Lock:
        """The lock in force with id ``given``, or an unambiguous prefix of it."""
        shown, given = given, given.strip().lower()
        locks = await self.list()
        matches = [lock for lock in locks if lock.id == given]
        if not matches and len(given) >= MIN_ID_PREFIX:
            matches = [lock for lock in locks if lock.id.startswith(given)]
        if not matches:
            raise AdminError(f"no lock in force matches {_shown(shown)!r} "
                             "(see `apptunnel locks ls`)", NOT_FOUND)
        if len(matches) > 1:
            raise AdminError(f"{len(matches)} locks start with {_shown(shown)!r}; give more "
                             "characters", CONFLICT)
        return matches[0]

    async def remove(self, actor: Actor, given: str) -> Lock:
        lock = await self.find(given)
        if not await self._ctx.backend.delete_lock(lock.id):
            raise AdminError("the lock was removed by someone else meanwhile", NOT_FOUND)
        await self._ctx.nudge()
        self._ctx.emit(actor, "lock.delete", lock.id, user=lock.user, app=lock.app)
        return lock
