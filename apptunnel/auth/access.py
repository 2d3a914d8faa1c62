"""The one access decision: may this caller open this app, now.

Every entry point asks `AccessPolicy.decide` and nothing else: a browser request or
WebSocket on an app host, ``apptunnel proxy app`` (HTTP and TCP), the web UI catalogue
and ``/v1/apps``, ``/v1/certs`` (``app`` None: may this user act at all), and the
listeners that re-check live connections when a lock appears or a user changes.

A decision is a plain value: `Allow` (the caller as it may act now, roles capped by what
its user holds), `Deny` (what the user sees, the audit reason, the HTTP status), or
`NeedsMore` (``mfa``: a role that allows the app sets ``require_session_mfa`` and the
credential carries no fresh second factor for this app; the entry point prompts for one
and starts an MFA-verified app session or issues a one-app certificate). The order is
fixed: locks (in memory, every time), the decision cache (a few seconds, keyed by
credential + app + the user's directory revision + the grants' revision + the app's labels
as registered now, so a dynamic label that changes is decided on at once, and a cached
request touches no storage), the user directory (a removed user is nobody; an elevated
credential gains the roles of its approved, unexpired access requests,
auth/request_watch.py), the one-app binding of a per-session MFA certificate, RBAC,
per-session MFA, then the per-request facts (the WebSocket origin result).

The WebSocket origin *rule* stays with the HTTP router (which origin is right depends on
the listener the request came through: the app's public host or a local port); the
router hands its verdict in `Facts.origin_ok` and the refusal is decided and audited here
like every other one.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import attrs
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from apptunnel.auth.access_requests import roles_for_app
from apptunnel.auth.callers import Caller
from apptunnel.auth.directory import REMOVED_MESSAGE, effective_identity
from apptunnel.auth.locks import LockAudit, lock_matches, lock_message
from apptunnel.backend.base import StorageUnavailable

DECISION_TTL = 5.0
MAX_CACHED = 10_000
LIVE = "live connection"


class Facts(NamedTuple):
    """What the entry point knows about this one request (none of it is cached).

    A NamedTuple, not an attrs class: one is built per request on the hot path, and a
    tuple costs a third of a frozen attrs instance.
    """

    client_ip: str = ""
    method: str = ""
    path: str = ""
    port: int | None = None
    upgrade: bool = False
    origin_ok: bool = True     # the router's WebSocket origin verdict (upgrades only)
    where: str = ""            # "live connection" for re-checks; audit context otherwise
    audit: bool = True         # False for listings (the catalogue): no event per app


@attrs.frozen
class Allow:
    """Allowed: ``caller`` is who acts now (roles and traits capped), ``reason`` the rule."""

    caller: Caller
    reason: str = ""

    @property
    def roles(self) -> tuple[str, ...]:
        return self.caller.roles

    @property
    def traits(self) -> dict:
        return self.caller.traits


@attrs.frozen
class Deny:
    """Refused. ``message`` is what the user may see ("" for the default page of
    ``status``), ``reason`` goes to the audit log, ``code`` says which rule refused:
    ``locked``, ``user_removed``, ``rbac``, ``origin``, ``mfa_binding``."""

    status: int
    code: str
    reason: str
    message: str = ""


@attrs.frozen
class NeedsMore:
    """Not yet: the caller must first do ``kind`` (``mfa``, ``access_request``)."""

    kind: Literal["mfa", "access_request"]
    reason: str = ""
    message: str = ""


SESSION_MFA_REASON = "a role requires a second factor for each session of this app"
SESSION_MFA_MESSAGE = "needs a second factor for each session"


Decision = Allow | Deny | NeedsMore


@attrs.frozen
class _Cached:
    until: float
    revision: tuple[int, int]   # the user's directory entry's and the grants' revisions
    decision: Allow | Deny | NeedsMore
    labels: dict | None = None   # of the app: a dynamic label or resource edit re-decides


class AccessPolicy:
    """Locks, the user directory cap, RBAC and the decision cache, with one audit trail.

    ``roles`` is a RoleCache (``role_set(names)``), ``locks`` a LockWatcher, ``users`` a
    UserDirectory (each optional: without one, that check passes), ``requests`` a
    RequestWatcher (without one, no credential is elevated). Time is passed in.
    """

    _log = Logger()

    def __init__(self, *, roles, audit, clock, locks=None, users=None,
                 lock_audit: LockAudit | None = None, ttl: float = DECISION_TTL,
                 max_cached: int = MAX_CACHED, requests=None) -> None:
        self._roles = roles
        self._requests = requests
        self._audit = audit
        self._locks = locks
        self._users = users
        self._lock_audit = lock_audit or LockAudit(audit, clock)
        self._ttl = ttl
        self._max_cached = max_cached
        self._cache: dict[tuple[str, str], _Cached] = {}

    @property
    def access_requests(self):
        """The RequestWatcher whose grants elevate credentials (None: none do)."""
        return self._requests

    # -- the decision -------------------------------------------------------------------

    def recall(self, credential: str, user: str, app, facts: Facts, now: float) -> Decision | None:
        """The decision without any I/O, if locks or the cache give it; None otherwise.

        An entry point holding only a credential (an app session cookie) asks this first,
        so a cached request does not even resolve the session behind it.
        """
        name = app.name if app is not None else None
        lock = self._locks.locked(user, name) if self._locks is not None else None
        if lock is not None:
            if facts.audit and facts.where == LIVE:
                # A cut is an event per connection, not a retry loop: never throttled.
                self._audit.emit("lock.enforced", actor=user, target=name or "",
                                 outcome="failure", lock=lock.id, where=LIVE)
            elif facts.audit:
                self._lock_audit.enforced(lock, user, name, facts.where or "app request")
            return Deny(403, "locked", lock_message(lock), lock_message(lock))
        if name is None:
            return None
        cached = self._cache.get((credential, name))
        if (cached is None or now >= cached.until or cached.revision != self._revision(user)
                or (cached.labels is not app.labels and cached.labels != app.labels)):
            return None
        return self._with_facts(cached.decision, user, name, facts)

    async def decide(self, caller: Caller, app, facts: Facts, now: float) -> Decision:
        """May ``caller`` open ``app`` (an AppInfo; None: may they act at all) now."""
        name = app.name if app is not None else None
        found = self.recall(caller.credential, caller.user, app, facts, now)
        if found is not None:
            return found
        revision = self._revision(caller.user)  # before any await: a change meanwhile re-decides
        granted, grant_ends = ((), None) if self._requests is None or not caller.requests \
            else self._requests.granted(caller.user, caller.requests, name, now)
        who = caller
        if self._users is None:
            who = caller.acting_as(tuple(dict.fromkeys(caller.roles + granted)), caller.traits)
        else:
            capped = effective_identity(caller.roles, caller.traits,
                                        await self._users.lookup(caller.user), granted)
            if capped is None:
                if name is not None:
                    self._cache.pop((caller.credential, name), None)
                denied = Deny(403, "user_removed", "user removed", REMOVED_MESSAGE)
                if facts.audit and name is not None:
                    self._audit_deny(caller.user, name, denied, facts)
                return denied
            who = caller.acting_as(*capped)
        bound = _binding_refusal(caller, name)
        if bound is not None:
            if facts.audit and name is not None:
                self._audit_deny(caller.user, name, bound, facts)
            return bound
        if app is None:
            return Allow(who, "user exists and is not locked")
        role_set = await self._roles.role_set(who.roles)
        checked = role_set.check_app(app.labels, who.traits)
        decision: Allow | Deny | NeedsMore = (Allow(who, checked.reason) if checked.allowed
                                              else Deny(403, "rbac", checked.reason,
                                                        await self._hint(role_set, app, who)))
        if (checked.allowed and caller.mfa_app != name
                and role_set.session_mfa(app.labels, who.traits)):
            decision = NeedsMore("mfa", SESSION_MFA_REASON, f"{name} {SESSION_MFA_MESSAGE}")
        until = min(now + self._ttl, caller.expires)
        if grant_ends is not None:
            until = min(until, grant_ends)      # an elevation's end is decided afresh
        if facts.where != LIVE:
            # A live re-check decides for the caller its connection started with; the
            # credential may name more now (a web session that assumed a request), so
            # only a request's own decision is kept for the requests that follow.
            self._remember((caller.credential, name),
                           _Cached(until, revision, decision, app.labels), now)
        return self._with_facts(decision, caller.user, name, facts)

    def revoked(self, user: str, app: str | None) -> Deny | None:
        """Without I/O: a lock or a removal that refuses ``user`` now. For an entry point
        that decided, then waited (a stream opening) while a live re-check could not see it."""
        lock = self._locks.locked(user, app) if self._locks is not None else None
        if lock is not None:
            return Deny(403, "locked", lock_message(lock), lock_message(lock))
        if self._users is not None and self._users.current(user) is None:
            return Deny(403, "user_removed", "user removed", REMOVED_MESSAGE)
        return None

    async def allowed_apps(self, caller: Caller, apps, now: float) -> list:
        """The apps ``caller`` may open, in the order given (the catalogue); no audit.
        An app that asks for a second factor per session is listed: opening it prompts."""
        quiet = Facts(audit=False)
        return [app for app in apps
                if isinstance(await self.decide(caller, app, quiet, now), (Allow, NeedsMore))]

    def forget(self, credential: str | None = None, app: str | None = None) -> None:
        """Decide afresh: everything (roles edited), or one credential on one app (logout)."""
        if credential is None:
            self._cache.clear()
        else:
            self._cache.pop((credential, app or ""), None)

    # -- helpers ------------------------------------------------------------------------

    async def _hint(self, role_set, app, who: Caller) -> str:
        """What a refused user may do about it: ask for a role that opens the app."""
        requestable = role_set.requestable()
        if not requestable:
            return ""
        candidates = (await self._roles.role_set(requestable)).roles
        if not roles_for_app(candidates, app.labels, who.traits):
            return ""
        return (f"your roles do not allow {app.name}; ask for access with: apptunnel request "
                f"create --app {app.name} --reason ...")

    def _with_facts(self, decision: Decision, user: str, app: str, facts: Facts) -> Decision:
        """Apply this request's own facts to a (possibly cached) decision, and audit a refusal."""
        if isinstance(decision, Allow) and facts.upgrade and not facts.origin_ok:
            decision = Deny(403, "origin", "WebSocket origin mismatch")
        if isinstance(decision, Deny) and facts.audit:
            self._audit_deny(user, app, decision, facts)
        return decision

    def _audit_deny(self, user: str, app: str | None, deny: Deny, facts: Facts) -> None:
        fields: dict = {"reason": deny.reason}
        for key in ("client_ip", "method", "path", "port", "where"):
            value = getattr(facts, key)
            if value not in ("", None):
                fields[key] = value
        self._audit.emit("access.denied", actor=user, target=app or "", outcome="failure",
                         **fields)

    def _revision(self, user: str) -> tuple[int, int]:
        """The directory revision of ``user`` now (-1 when unknown or no directory), and
        the access requests' (a grant given or ended re-decides)."""
        grants = self._requests.revision if self._requests is not None else -1
        if self._users is None:
            return -1, grants
        entry = self._users.current(user)
        return (entry.revision if entry is not None else -1), grants

    def _remember(self, key: tuple[str, str], entry: _Cached, now: float) -> None:
        """Bounded: expired entries go first, then everything (a flood of new credentials)."""
        if len(self._cache) >= self._max_cached:
            self._cache = {k: v for k, v in self._cache.items() if v.until > now}
            if len(self._cache) >= self._max_cached:
                self._cache.clear()
        self._cache[key] = entry


def _binding_refusal(caller: Caller, app: str | None) -> Deny | None:
    """A one-app MFA certificate opens its app and nothing else (no other app, no API)."""
    if caller.method != "certificate" or caller.mfa_app is None or caller.mfa_app == app:
        return None
    return Deny(403, "mfa_binding", f"certificate is bound to app {caller.mfa_app!r}",
                f"this certificate only opens {caller.mfa_app}")


class LiveRecheck:
    """Live connections asked about again when a lock appears, a user changes or an
    app's definition changes (its labels: a dynamic label, an edited app resource) or an
    access request's grant changes (an elevation ends).

    A lock or a removed user must end connections already open (keep-alive, upgraded,
    TCP), not only the next request. Each entry point hands in ``connections()`` (what is
    live now: objects with ``caller``, ``app_name`` and ``refused(deny)``) and
    ``find_app(name)``; the policy decides, exactly as for a new request, and a refusal
    cuts the connection. One listener for every kind of connection.
    """

    _log = Logger()

    def __init__(self, policy: AccessPolicy, clock, connections, find_app, *,
                 locks=None, users=None, apps=None) -> None:
        self._policy = policy
        self._clock = clock
        self._connections = connections
        self._find_app = find_app
        if locks is not None:
            locks.add_listener(self._lock_added)
        if users is not None:
            users.add_listener(self._user_changed)
        if apps is not None:   # the registry: an app's labels changed
            apps.add_change_listener(self._app_changed)
        if policy.access_requests is not None:
            policy.access_requests.add_listener(lambda name: self._user_changed(name, None))

    def _app_changed(self, name: str) -> None:
        for conn in list(self._connections()):
            if conn.caller is not None and conn.app_name == name:
                self._recheck(conn)

    def _lock_added(self, lock) -> None:
        for conn in list(self._connections()):
            if conn.caller is not None and lock_matches(lock, conn.caller.user, conn.app_name):
                self._recheck(conn)

    def _user_changed(self, name: str, entry) -> None:
        for conn in list(self._connections()):
            if conn.caller is not None and conn.caller.user == name:
                self._recheck(conn)

    def _recheck(self, conn) -> None:
        d = Deferred.fromCoroutine(self._ask(conn))
        d.addErrback(self._recheck_failed)

    def _recheck_failed(self, failure) -> None:
        """Storage down mid re-check: one line; the connection stays as last decided."""
        if failure.check(StorageUnavailable):
            self._log.warn("re-checking a live connection: storage unavailable: {error}",
                           error=failure.value.one_line())
            return
        self._log.failure("re-checking a live connection failed", failure)

    async def _ask(self, conn) -> None:
        caller, app = conn.caller, self._find_app(conn.app_name) if conn.app_name else None
        if app is None:
            return
        decision = await self._policy.decide(caller, app, Facts(where=LIVE),
                                             self._clock.seconds())
        # NeedsMore is not a cut: a session already started keeps running when a role
        # starts asking for a second factor (as in Teleport); only a refusal ends it.
        if isinstance(decision, Deny) and conn.caller is caller:
            conn.refused(decision)
