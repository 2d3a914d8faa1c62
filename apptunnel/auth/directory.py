"""Who exists now, with which roles and traits: the users table kept in memory.

A certificate or a session names a user and the roles and traits they had when it was
issued. Both live for hours, so on their own they would outlive `apptunnel users rm` and
any role change. Every proxy keeps the current users here (polled like locks, and
refreshed at once by the admin CLI through the control socket) so that each request can
cap what its credential claims by what the user holds now, without touching storage.

`effective_identity` is that rule, and the only place it is written. Bots are principals
here too (``bot:NAME``, auth/bots.py, with their stored roles and no traits), so a bot's
certificate is capped, and a removed bot cut off, by the same rule and the same listeners.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import attrs
from twisted.internet.defer import DeferredLock
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from apptunnel.auth.bots import bot_of, bot_principal
from apptunnel.backend.base import Backend, StorageUnavailable
from apptunnel.backend.records import Bot, User
from apptunnel.polling import Poll

MAX_MISSES = 10_000
MISS_TTL = 1.0            # a name storage did not know is asked again after this long
REMOVED_MESSAGE = "your user account no longer exists"


@attrs.frozen
class Entry:
    """One user as storage holds them now; ``revision`` changes whenever they change."""

    name: str
    roles: tuple[str, ...]
    traits: dict
    revision: int


def effective_identity(
    roles: Iterable[str], traits: Mapping[str, Iterable[str]], current: Entry | None,
    granted: Iterable[str] = (),
) -> tuple[tuple[str, ...], dict[str, tuple[str, ...]]] | None:
    """What a credential issued with ``roles``/``traits`` may act as now.

    A credential never grants more than its user holds now: its roles are those it names
    that the user still has, its trait values those the user still has. A removed user
    (``current`` None) acts as nobody: None. ``granted`` are the roles of the access
    requests the credential assumed that are approved and unexpired now
    (auth/access_requests.py ``granted_roles``): an elevated credential holds them
    besides, and loses them the moment its request ends.
    """
    if current is None:
        return None
    held = set(current.roles)
    capped_roles = tuple(dict.fromkeys(
        [r for r in dict.fromkeys(roles) if r in held] + list(granted)))
    capped_traits: dict[str, tuple[str, ...]] = {}
    for name, values in traits.items():
        if isinstance(values, str):
            values = (values,)
        now = current.traits.get(name)
        if not now:
            continue
        now_set = {now} if isinstance(now, str) else set(now)
        kept = tuple(v for v in values if v in now_set)
        if kept:
            capped_traits[name] = kept
    return capped_roles, capped_traits


UserListener = Callable[[str, "Entry | None"], object]


class UserDirectory:
    """Polls ``backend.list_users`` every ``interval`` seconds of ``clock``.

    Listeners hear ``(name, entry)`` once per change of a known user: ``entry`` None when
    the user was removed, else their new roles and traits. A name the last poll did not
    know (a user created since) is read from storage on first use, so a new user never
    waits for a poll; unknown names are remembered for ``MISS_TTL`` seconds.
    """

    _log = Logger()

    def __init__(self, backend: Backend, clock: IReactorTime, interval: float = 2.0) -> None:
        self._backend = backend
        self._clock = clock
        self._entries: dict[str, Entry] = {}
        self._misses: dict[str, float] = {}
        self._revision = 0
        self._polls = 0                     # successful polls so far
        self._reads = 0                     # polls started so far
        self._looked_up: dict[str, int] = {}  # name -> self._reads when lookup() stored it
        self._listeners: list[UserListener] = []
        self._mutex = DeferredLock()        # one poll at a time, so a change is told once
        self._poll = Poll(self.refresh, clock, interval, "user directory")

    # -- lifecycle --------------------------------------------------------------

    def start(self) -> None:
        """Poll now and then every ``interval`` seconds until `stop`."""
        self._poll.start()

    def stop(self) -> None:
        self._poll.stop()

    # -- queries ----------------------------------------------------------------

    def current(self, name: str) -> Entry | None:
        """The user as last seen, without any I/O (None: removed, or not seen yet)."""
        return self._entries.get(name)

    async def lookup(self, name: str) -> Entry | None:
        """The user now: from memory, else read once from storage (a user created since
        the last poll); None when no such user exists."""
        entry = self._entries.get(name)
        if entry is not None:
            return entry
        now = self._clock.seconds()
        until = self._misses.get(name)
        if until is not None and until > now:
            return None
        polls = self._polls
        try:
            user = await self._read(name)
        except StorageUnavailable:
            raise   # not "no such user": the caller answers 503 (and logs it once)
        except Exception as err:
            self._log.warn("cannot read user {name!r}: {error}", name=name, error=str(err))
            return None
        if self._polls != polls or name in self._entries:
            return self._entries.get(name)   # a poll finished meanwhile: it knows better
        if user is None:
            if len(self._misses) >= MAX_MISSES:
                self._misses.clear()
            self._misses[name] = now + MISS_TTL
            return None
        self._misses.pop(name, None)
        entry = self._entries[name] = self._entry(user)
        self._looked_up[name] = self._reads
        return entry

    async def reread(self, name: str) -> Entry | None:
        """Read one user from storage now and tell listeners if they changed.

        A connector's sign-in has just written the user (their roles from the directory
        or provider as of this sign-in): the new session must act with those at once, not
        after the next poll, and live connections of a user who lost a role are re-checked.
        """
        async with self._mutex:
            try:
                user = await self._read(name)
            except Exception as err:
                self._log.warn("cannot read user {name!r}: {error}", name=name, error=str(err))
                return self._entries.get(name)
            before = self._entries.get(name)
            self._misses.pop(name, None)
            if user is None:
                if before is not None:
                    del self._entries[name]
                    self._notify(name, None)
                return None
            if before is not None and before.roles == tuple(user.roles) \
                    and before.traits == dict(user.traits):
                return before
            entry = self._entries[name] = self._entry(user)
            self._looked_up[name] = self._reads
            if before is not None:
                self._notify(name, entry)
            return entry

    def add_listener(self, fn: UserListener) -> None:
        """Call ``fn(name, entry_or_None)`` for each change seen from now on."""
        self._listeners.append(fn)

    def remove_listener(self, fn: UserListener) -> None:
        if fn in self._listeners:
            self._listeners.remove(fn)

    # -- polling ----------------------------------------------------------------

    async def refresh(self) -> None:
        """Poll storage now; never raises (failures are logged, the last state is kept)."""
        async with self._mutex:
            self._reads += 1
            started = self._reads
            try:
                users = await self._backend.list_users()
                users += [_as_user(bot) for bot in await self._backend.list_bots()]
            except Exception as err:
                self._log.warn("cannot read users (will retry): {error}", error=str(err))
                return
            old, fresh = self._entries, {}
            changed: list[tuple[str, Entry | None]] = []
            for user in users:
                before = old.get(user.name)
                if before is not None and before.roles == tuple(user.roles) \
                        and before.traits == dict(user.traits):
                    fresh[user.name] = before
                    continue
                fresh[user.name] = self._entry(user)
                if before is not None:
                    changed.append((user.name, fresh[user.name]))
            for name in old:
                if name in fresh:
                    continue
                if self._looked_up.get(name, 0) >= started:
                    # Read by lookup() while this poll was reading: newer than our list.
                    fresh[name] = old[name]
                else:
                    changed.append((name, None))
            self._looked_up = {n: r for n, r in self._looked_up.items() if r >= started}
            self._entries = fresh
            self._misses.clear()
            self._polls += 1
            for name, entry in changed:
                self._log.info("user {name} {what}", name=name,
                               what="removed" if entry is None else "changed")
                self._notify(name, entry)

    async def _read(self, name: str) -> User | None:
        """One principal from storage: a user, or a bot (``bot:NAME``) as a user record."""
        bot = bot_of(name)
        if bot is None:
            return await self._backend.get_user(name)
        found = await self._backend.get_bot(bot)
        return None if found is None else _as_user(found)

    def _entry(self, user: User) -> Entry:
        self._revision += 1
        return Entry(user.name, tuple(user.roles), dict(user.traits), self._revision)

    def _notify(self, name: str, entry: Entry | None) -> None:
        for fn in list(self._listeners):
            try:
                fn(name, entry)
            except Exception:
                self._log.failure("user listener {fn!r} failed for {name}", fn=fn, name=name)


def _as_user(bot: Bot) -> User:
    """A bot as the directory holds principals: ``bot:NAME``, its roles, no traits and no
    password (it never signs in; it only presents certificates)."""
    return User(bot_principal(bot.name), None, tuple(bot.roles), {}, bot.created)
