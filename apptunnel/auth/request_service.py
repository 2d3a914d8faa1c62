"""Access requests as operations: create, review, show, list, and what may be assumed.

The rules are auth/access_requests.py's; this object reads and writes storage, asks the
user directory and the role cache what the caller holds NOW (never what a credential
claims: an elevated credential cannot ask for or review more), and tells the audit log,
the webhook and the watcher of every change. The web API (web/access_requests.py) is
its only caller.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IReactorTime

from apptunnel.auth.access_requests import (
    APPROVED,
    PENDING,
    RequestError,
    apply_review,
    clean_reason,
    current_state,
    may_see,
    new_request,
    new_request_id,
    plan_request,
    request_json,
    review_problem,
    roles_for_app,
    valid_request_id,
)
from apptunnel.auth.callers import Caller
from apptunnel.auth.rbac import RoleSet
from apptunnel.backend.records import AccessRequest, Review

NOT_FOUND = "no such access request"
MAX_PENDING_PER_USER = 20     # storage a user can fill with requests nobody reviews
MAX_LISTED = 500              # the newest requests a listing shows


class RequestNotices:
    """One audit event per step, and one webhook POST per state change."""

    def __init__(self, audit, clock: IReactorTime, webhook=None) -> None:
        self._audit = audit
        self._clock = clock
        self._webhook = webhook

    def announce(self, type: str, request: AccessRequest, actor: str,
                 state_changed: bool = True, **fields) -> None:
        self._audit.emit(type, actor=actor, target=request.id, user=request.user,
                         id=request.id, roles=list(request.roles), apps=list(request.apps),
                         reason=request.reason, state=request.state, **fields)
        if self._webhook is not None and state_changed:
            doc = request_json(request, self._clock.seconds())
            self._webhook.send({key: doc[key] for key in
                                ("id", "user", "roles", "apps", "state", "reason", "reviews")})

    def expired(self, request: AccessRequest) -> None:
        self.announce("access_request.expire", request, actor=request.user)


class AccessRequestService:
    """``roles`` a RoleCache, ``users`` a UserDirectory (None: the caller's roles are
    taken as held), ``find_app(name)`` the catalogue, ``watcher`` a RequestWatcher."""

    def __init__(self, *, backend, roles, notices: RequestNotices, watcher, clock: IReactorTime,
                 find_app: Callable, default_ttl: float, users=None) -> None:
        self._backend = backend
        self._roles = roles
        self._notices = notices
        self._watcher = watcher
        self._clock = clock
        self._find_app = find_app
        self._default_ttl = default_ttl
        self._users = users

    async def create(self, caller: Caller, roles: list[str], app: str | None, reason: object,
                     ttl: float | None) -> AccessRequest:
        """A new pending request of ``caller`` for ``roles``, or for the roles that open
        ``app`` (which the elevation then opens alone)."""
        held, traits = await self._held(caller)
        apps: tuple[str, ...] = ()
        if app is not None:
            if roles:
                raise RequestError(400, "ask for roles or for an app, not both")
            info = self._find_app(app)
            if info is None:
                raise RequestError(404, f"no app named {app!r}")
            candidates = (await self._roles.role_set(held.requestable())).roles
            roles = list(roles_for_app(candidates, info.labels, traits))
            if not roles:
                raise RequestError(403, f"no role you may request opens {app}")
            apps = (info.name,)
        plan = plan_request(held, roles, apps, reason, ttl, self._default_ttl)
        waiting = await self._backend.list_access_requests(user=caller.user,
                                                           states=(PENDING,))
        if len(waiting) >= MAX_PENDING_PER_USER:
            raise RequestError(429, f"you have {len(waiting)} pending requests; wait for "
                                    "their review or their expiry")
        request = new_request(new_request_id(), caller.user, plan, self._clock.seconds())
        await self._backend.put_access_request(request)
        self._notices.announce("access_request.create", request, actor=caller.user)
        return request

    async def review(self, caller: Caller, request_id: str, approve: bool,
                     reason: object) -> AccessRequest:
        """One review of someone else's pending request; its state follows the counts."""
        request = await self.show(caller, request_id)
        held, _ = await self._held(caller)
        now = self._clock.seconds()
        problem = review_problem(request, caller.user, held.reviewable(), now)
        if problem is not None:
            raise problem
        after = apply_review(request, Review(caller.user, approve, clean_reason(reason), now))
        if not await self._backend.update_access_request(after, request.state,
                                                         len(request.reviews)):
            raise RequestError(409, "the request changed meanwhile; look again and retry")
        self._notices.announce("access_request.review", after, actor=caller.user,
                               state_changed=after.state != request.state,
                               approve=approve, review_reason=clean_reason(reason))
        if after.state == APPROVED:
            self._watcher.note(after)
        return after

    async def show(self, caller: Caller, request_id: str) -> AccessRequest:
        """The request if the caller may see it (theirs, or one they may review); the same
        404 otherwise, so ids of others' requests cannot be probed."""
        request = (await self._backend.get_access_request(request_id)
                   if valid_request_id(request_id) else None)
        if request is not None:
            held, _ = await self._held(caller)
            if may_see(request, caller.user, held.reviewable()):
                return request
        raise RequestError(404, NOT_FOUND)

    async def list(self, caller: Caller) -> list[AccessRequest]:
        """The caller's own requests and those they may review, oldest first (the newest
        MAX_LISTED of them)."""
        held, _ = await self._held(caller)
        reviewable = held.reviewable()
        if not reviewable:
            return (await self._backend.list_access_requests(user=caller.user))[-MAX_LISTED:]
        return [r for r in await self._backend.list_access_requests()
                if may_see(r, caller.user, reviewable)][-MAX_LISTED:]

    async def assumable(self, caller: Caller, request_id: str) -> AccessRequest:
        """The caller's own approved, unexpired request; 404 for anyone else's."""
        request = (await self._backend.get_access_request(request_id)
                   if valid_request_id(request_id) else None)
        if request is None or request.user != caller.user:
            raise RequestError(404, NOT_FOUND)
        state = current_state(request, self._clock.seconds())
        if state != APPROVED:
            raise RequestError(409, f"the request is {state}, not approved")
        return request

    def assumed(self, caller: Caller, request: AccessRequest, how: str) -> None:
        """Audit an assumption and let cached decisions see the new roles at once."""
        self._notices.announce("access_request.assume", request, actor=caller.user,
                               state_changed=False, how=how)
        self._watcher.note(request)

    async def _held(self, caller: Caller) -> tuple[RoleSet, dict]:
        """The caller's roles and traits as storage holds them now."""
        names, traits = caller.roles, caller.traits
        if self._users is not None:
            entry = await self._users.lookup(caller.user)
            if entry is None:
                raise RequestError(403, "your user account no longer exists")
            names, traits = entry.roles, entry.traits
        return await self._roles.role_set(names), traits
