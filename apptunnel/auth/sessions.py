"""Web sessions, app sessions and the one-time hand-off between them.

A browser signs in on the proxy host and gets a web session. To open an app on its own
subdomain, the proxy mints a one-time auth code bound to that app and to a state secret
only the browser holds (a host-only cookie on the app host); the app host redeems the
code for an app session. No session secret ever travels in a URL.

Only hashes of secrets reach the backend. Valid sessions are cached briefly in memory so
the request path rarely touches storage; the cache lifetime is short so a logout or a
deleted user on another proxy takes effect within seconds. Locks (``auth/locks.py``) are
checked on every lookup, after the cache, so a lock wins as soon as the watcher knows it.
So is the user directory (``auth/directory.py``): a session of a removed user is no
session, and a session acts with the roles and traits its user still holds, not the ones
they had at sign-in.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from apptunnel.auth.directory import UserDirectory, effective_identity
from apptunnel.auth.errors import AuthError
from apptunnel.auth.callers import Caller, caller_from_session
from apptunnel.auth.locks import LOCK_AUDIT_INTERVAL, LockAudit, LockWatcher, lock_message  # noqa: F401
from apptunnel.audit import UNAVAILABLE as AUDIT_UNAVAILABLE
from apptunnel.auth.passwords import HashQueue
from apptunnel.auth.throttle import LoginThrottle, Throttled
from apptunnel.auth.tokens import constant_time_equal, new_secret, secret_hash
from apptunnel.backend.base import Backend, StorageUnavailable
from apptunnel.backend.records import AppSession, AuthCode, Lock, User, WebSession

if TYPE_CHECKING:
    from apptunnel.audit import AuditLog

PROXY_COOKIE_PREFIX = "__Host-apptunnel_"
AUTH_CODE_TTL = 60.0
MAX_SECRET_LENGTH = 256
MAX_USERNAME_LENGTH = 256
MAX_CACHE_ENTRIES = 10_000
MAX_ASSUMED = 16          # access requests one web session keeps (the newest)

LOGIN_FAILED = "invalid username or password"
CODE_INVALID = "invalid or expired sign-in link; open the app again"


class _Cache:
    """A bounded map of hash -> (record or None, valid until); oldest entries go first."""

    def __init__(self, limit: int = MAX_CACHE_ENTRIES) -> None:
        self._limit = limit
        self._entries: OrderedDict[str, tuple[object, float]] = OrderedDict()

    def get(self, key: str, now: float) -> tuple[bool, object]:
        entry = self._entries.get(key)
        if entry is None:
            return False, None
        if entry[1] <= now:
            del self._entries[key]
            return False, None
        return True, entry[0]

    def put(self, key: str, value: object, until: float) -> None:
        self._entries[key] = (value, until)
        self._entries.move_to_end(key)
        while len(self._entries) > self._limit:
            self._entries.popitem(last=False)

    def drop(self, key: str) -> None:
        self._entries.pop(key, None)


class SessionManager:
    """Login, sessions and hand-off codes over a Backend, with time from ``clock``."""

    _log = Logger()

    def __init__(
        self,
        backend: Backend,
        clock: IReactorTime,
        ttl: float,
        *,
        cache_ttl: float = 10.0,
        negative_cache_ttl: float = 2.0,
        locks: LockWatcher | None = None,
        audit: AuditLog | None = None,
        users: UserDirectory | None = None,
        throttle: LoginThrottle | None = None,
        hashes: HashQueue | None = None,
        lock_audit: LockAudit | None = None,
    ) -> None:
        self._backend = backend
        self._clock = clock
        self._ttl = ttl
        self._cache_ttl = cache_ttl
        self._negative_ttl = negative_cache_ttl
        self._web = _Cache()
        self._app = _Cache()
        self._locks = locks
        self._audit = audit
        self._users = users
        # Shared with the access policy in the proxy: one throttle for lock.enforced.
        self._lock_audit = lock_audit or LockAudit(audit, clock)
        self._throttle = throttle or LoginThrottle()
        self._hashes = hashes or HashQueue()

    # -- login ------------------------------------------------------------------

    async def login(self, username: str, password: str, address: str = "") -> User:
        """The user if the password matches; one uniform 401 for every other case.

        Throttled (429) before any work when the name or the client ``address`` has used up
        its attempts, known user or not; Throttled (503) when too many checks are waiting.
        """
        self._throttle.attempt(username, address, self._clock.seconds())
        user = None
        if isinstance(username, str) and 0 < len(username) <= MAX_USERNAME_LENGTH:
            try:
                user = await self._backend.get_user(username)
            except StorageUnavailable:
                # No password was checked: an outage must not use up the user's attempts.
                self._throttle.abandoned(username, address)
                raise
        stored = user.password_hash if user is not None else None
        # Always run argon2 (a dummy hash for unknown users) so timing reveals nothing.
        try:
            ok = await self._hashes.verify(address, stored, password)
        except Throttled:
            self._throttle.abandoned(username, address)
            raise
        if not ok or user is None:
            raise AuthError(401, LOGIN_FAILED)
        self._throttle.succeeded(username, address)
        # Only after the password matched, so a lock message tells a stranger nothing.
        self._refuse_if_locked(user.name, None, "login")
        return user

    # -- web sessions -----------------------------------------------------------

    async def user(self, name: str) -> User | None:
        """The stored user: a sign-in finished in two steps (password, then a second
        factor) reads them again for the second."""
        return await self._backend.get_user(name)

    @property
    def hashes(self) -> HashQueue:
        """The argon2 queue, shared with passwords set through links (auth/links.py)."""
        return self._hashes

    @property
    def throttle(self) -> LoginThrottle:
        """The sign-in throttle, shared with every other way in (links, second factors)."""
        return self._throttle

    def forget_cached(self) -> None:
        """Storage changed under us (an admin ended sessions): read it again from now on."""
        self._web = _Cache()
        self._app = _Cache()

    async def create_web_session(
        self, user: User, ttl: float | None = None, *, enroll_only: bool = False,
        method: str = "",
    ) -> tuple[str, WebSession]:
        """Start a web session for user; returns (secret for the cookie, record).
        ``enroll_only``: it may enroll a second factor and nothing else (auth/mfa.py);
        ``method``: how the user signed in (shown on the account page)."""
        self._refuse_if_locked(user.name, None, "web session")
        await self._audit_admits()
        now = self._clock.seconds()
        secret = new_secret()
        record = WebSession(
            id_hash=secret_hash(secret),
            user=user.name,
            roles=tuple(user.roles),
            traits=dict(user.traits),
            created=now,
            expires=now + (ttl if ttl is not None else self._ttl),
            enroll_only=enroll_only,
            method=method,
        )
        await self._backend.put_web_session(record)
        self._web.put(record.id_hash, record, self._cache_until(record.expires, now))
        return secret, record

    async def _audit_admits(self) -> None:
        """audit.on_failure: no new session while its events could not be kept."""
        audit = self._audit
        if audit is not None and not audit.writable and not await audit.admitted():
            raise AuthError(503, AUDIT_UNAVAILABLE)

    async def web_session(self, secret: str | None) -> WebSession | None:
        """The live web session for this cookie value, or None."""
        key = self._key(secret)
        if key is None:
            return None
        web = await self._live_web_session(key)
        if web is None or self._lock_for(web.user, None, "web session") is not None:
            return None
        return await self._as_now(web)

    async def end_web_session(self, secret: str) -> None:
        """Log out: end the web session and every app session started from it."""
        key = self._key(secret)
        if key is None:
            return
        ended = await self._backend.delete_web_session(key)
        self._web.drop(key)
        for app_key in ended:
            self._app.drop(app_key)

    async def user_web_sessions(self, user: str) -> list[WebSession]:
        """``user``'s live web sessions (stored, unexpired), oldest first."""
        now = self._clock.seconds()
        return [s for s in await self._backend.list_user_web_sessions(user) if s.expires > now]

    async def end_user_sessions(self, user: str) -> int:
        """Sign ``user`` out everywhere: every web session with its app sessions; how many
        web sessions ended. Other proxies drop theirs when their cache entry lapses."""
        webs = await self._backend.list_user_web_sessions(user)
        ended = await self._backend.delete_user_sessions(user)
        for web in webs:
            self._web.drop(web.id_hash)
        for app_key in ended:
            self._app.drop(app_key)
        return len(webs)

    async def assume(self, secret: str, request_id: str) -> WebSession | None:
        """Add an approved access request to the web session (the access policy grants its
        roles while it lasts); app sessions started from it see them on their next request.
        None when the session has ended."""
        key = self._key(secret)
        web = None if key is None else await self._live_web_session(key)
        if web is None:
            return None
        if request_id not in web.requests:
            web = attrs.evolve(web, requests=(*web.requests, request_id)[-MAX_ASSUMED:])
            await self._backend.put_web_session(web)
            self._web.put(key, web, self._cache_until(web.expires, self._clock.seconds()))
        return web

    # -- hand-off ---------------------------------------------------------------

    async def create_auth_code(self, web: WebSession, app: str, path: str, state: str,
                               mfa_verified: bool = False) -> str:
        """A one-time code (60 s) for ``app`` that only the holder of ``state`` can redeem;
        ``mfa_verified`` when the launch passed the per-session MFA prompt."""
        if not state:
            raise AuthError(400, "missing state")
        self._refuse_if_locked(web.user, app, "launch")
        code = new_secret()
        await self._backend.put_auth_code(
            AuthCode(
                code_hash=secret_hash(code),
                web_session=web.id_hash,
                app=app,
                path=path,
                state_hash=secret_hash(state),
                expires=self._clock.seconds() + AUTH_CODE_TTL,
                mfa_verified=mfa_verified,
            )
        )
        return code

    async def redeem_auth_code(
        self, code: str, state: str | None, app: str
    ) -> tuple[str, AppSession, str]:
        """Trade a code for an app session: (secret, record, path). Any misuse burns it."""
        key = self._key(code)
        if key is None:
            raise AuthError(400, CODE_INVALID)
        # Taking the code deletes it, so a wrong state or app cannot be retried.
        taken = await self._backend.take_auth_code(key)
        now = self._clock.seconds()
        if taken is None or taken.expires <= now:
            raise AuthError(400, CODE_INVALID)
        if not constant_time_equal(taken.app, app):
            self._log.warn("auth code for app {expected!r} presented on {app!r}",
                           expected=taken.app, app=app)
            raise AuthError(400, CODE_INVALID)
        if not state or len(state) > MAX_SECRET_LENGTH or not constant_time_equal(
            taken.state_hash, secret_hash(state)
        ):
            raise AuthError(400, CODE_INVALID)
        web = await self._backend.get_web_session(taken.web_session)
        if web is None or web.expires <= now:
            raise AuthError(400, CODE_INVALID)
        self._refuse_if_locked(web.user, app, "app session")
        secret = new_secret()
        record = AppSession(
            id_hash=secret_hash(secret),
            web_session=web.id_hash,
            user=web.user,
            app=app,
            created=now,
            expires=min(now + self._ttl, web.expires),   # never outlives its web session
            mfa_verified=taken.mfa_verified,
        )
        await self._backend.put_app_session(record)
        self._app.put(record.id_hash, record, self._cache_until(record.expires, now))
        return secret, record, taken.path

    # -- app sessions -----------------------------------------------------------

    async def app_session(self, secret: str | None, app: str) -> AppSession | None:
        """The live app session for this cookie value on this app, or None."""
        key = self._key(secret)
        if key is None:
            return None
        now = self._clock.seconds()
        hit, cached = self._app.get(key, now)
        record = cached if hit else await self._load(self._app, key, now,
                                                     self._backend.get_app_session)
        if record is None or record.expires <= now or record.app != app:
            return None
        if self._lock_for(record.user, app, "app session") is not None:
            return None
        return record

    async def end_app_session(self, secret: str) -> None:
        key = self._key(secret)
        if key is None:
            return
        await self._backend.delete_app_session(key)
        self._app.drop(key)

    async def identity(self, app_session: AppSession) -> WebSession | None:
        """The live parent web session (user, roles, traits) of an app session, or None."""
        web = await self._parent(app_session)
        return None if web is None else await self._as_now(web)

    async def caller(self, app_session: AppSession) -> Caller | None:
        """The caller behind an app session: its live web session's user, roles and traits
        as claimed at sign-in (the access policy caps them by what the user holds now),
        keyed by the app session; None when the web session ended or the user is locked."""
        web = await self._parent(app_session)
        if web is None:
            return None
        return caller_from_session(web, app_session.id_hash, app_session.expires,
                                   app_session.app if app_session.mfa_verified else None)

    async def _parent(self, app_session: AppSession) -> WebSession | None:
        web = await self._live_web_session(app_session.web_session)
        if web is None or web.user != app_session.user:
            return None
        if self._lock_for(web.user, app_session.app, "app session") is not None:
            return None
        return web

    async def _as_now(self, web: WebSession) -> WebSession | None:
        """The session with what its user holds now; None when the user is gone."""
        if self._users is None:
            return web
        found = effective_identity(web.roles, web.traits, await self._users.lookup(web.user))
        if found is None:
            return None
        roles, traits = found
        if roles == tuple(web.roles) and traits == web.traits:
            return web
        return attrs.evolve(web, roles=roles, traits=traits)

    # -- locks ------------------------------------------------------------------

    def _lock_for(self, user: str, app: str | None, where: str) -> Lock | None:
        """The lock refusing (user, app), audited at most once per LOCK_AUDIT_INTERVAL."""
        if self._locks is None:
            return None
        lock = self._locks.locked(user, app)
        if lock is not None:
            self._lock_audit.enforced(lock, user, app, where)
        return lock

    def _refuse_if_locked(self, user: str, app: str | None, where: str) -> None:
        lock = self._lock_for(user, app, where)
        if lock is not None:
            raise AuthError(403, lock_message(lock))

    # -- helpers ----------------------------------------------------------------

    @staticmethod
    def _key(secret: str | None) -> str | None:
        if not secret or not isinstance(secret, str) or len(secret) > MAX_SECRET_LENGTH:
            return None
        return secret_hash(secret)

    async def _live_web_session(self, key: str) -> WebSession | None:
        now = self._clock.seconds()
        hit, cached = self._web.get(key, now)
        record = cached if hit else await self._load(self._web, key, now,
                                                     self._backend.get_web_session)
        if record is None or record.expires <= now:
            return None
        return record

    def _cache_until(self, expires: float, now: float) -> float:
        return min(expires, now + self._cache_ttl)

    async def _load(
        self, cache: _Cache, key: str, now: float, fetch: Callable[[str], Awaitable]
    ):
        """Read through to the backend; misses are remembered only briefly."""
        record = await fetch(key)
        if record is None or record.expires <= now:
            cache.put(key, None, now + self._negative_ttl)
            return None
        cache.put(key, record, self._cache_until(record.expires, now))
        return record
