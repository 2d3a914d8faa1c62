"""Access requests: who may ask for which roles, who may review, what a review does.

Teleport's model. A user whose roles allow ``request: {roles: [...]}`` asks for some of
those roles (or for one app: the requestable roles that allow it, which then open that
app only), with a reason when a role says ``request_access: reason``. Reviewers whose
roles' ``review_requests.roles`` cover every requested role approve or deny it, once
each, never their own request. The thresholds of the roles that allowed the request
decide (a denial count reached first wins). Once approved, the elevation lasts ``ttl``
(capped by the smallest ``max_duration`` of those roles) and then ends by itself: the
roles count only while `granted_roles` says so (auth/access.py asks it on every decision).

Everything here is a plain function on plain values, time passed in; storage, audit and
HTTP live in auth/request_service.py, auth/request_watch.py and web/access_requests.py.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable, Mapping

import attrs

from apptunnel.auth.errors import AuthError
from apptunnel.auth.rbac import Role, RoleSet, Threshold
from apptunnel.backend.records import AccessRequest, Review

PENDING, APPROVED, DENIED, EXPIRED = "pending", "approved", "denied", "expired"
STATES = (PENDING, APPROVED, DENIED, EXPIRED)
PENDING_TTL = 7 * 86400.0       # a request nobody reviewed lapses after a week
MAX_REASON = 1024
MAX_ROLES = 32
_ID_RE = re.compile(r"[0-9a-f]{32}")


class RequestError(AuthError):
    """A request or review that is not allowed; ``status`` is its HTTP status."""


def new_request_id() -> str:
    """128 random bits: an id is never guessable, never sequential."""
    return secrets.token_hex(16)


def valid_request_id(value: object) -> bool:
    return isinstance(value, str) and _ID_RE.fullmatch(value) is not None


@attrs.frozen
class Plan:
    """What a request will be: its roles, apps, deciding counts and elevation length."""

    roles: tuple[str, ...]
    apps: tuple[str, ...]
    reason: str
    ttl: float
    approve: int
    deny: int


def clean_reason(reason: object) -> str:
    """The reason as stored: a bounded single-line string (400 otherwise)."""
    if reason is None:
        return ""
    if not isinstance(reason, str) or len(reason) > MAX_REASON:
        raise RequestError(400, f"reason must be a string of at most {MAX_REASON} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in reason):
        raise RequestError(400, "reason must be one line of printable text")
    return reason.strip()


def roles_for_app(candidates: Iterable[Role], labels: Mapping[str, str],
                  traits: Mapping) -> tuple[str, ...]:
    """Of the requestable roles, those that would let the user open an app with ``labels``."""
    return tuple(role.name for role in candidates
                 if RoleSet([role]).check_app(labels, traits).allowed)


def plan_request(held: RoleSet, roles: Iterable[str], apps: Iterable[str], reason: object,
                 ttl: float | None, default_ttl: float) -> Plan:
    """Check a new request against the requester's roles (held now) and size it.

    The elevation lasts ``ttl`` (default: as long as allowed), never longer than the
    smallest ``max_duration`` of the roles allowing the request (``default_ttl`` for a
    role without one). It needs the most approvals and the fewest denials any of those
    roles' thresholds name (a role without thresholds counts as one and one).
    """
    wanted = tuple(dict.fromkeys(roles))
    if not wanted:
        raise RequestError(400, "name at least one role to request")
    if len(wanted) > MAX_ROLES:
        raise RequestError(400, f"at most {MAX_ROLES} roles per request")
    requestable = set(held.requestable())
    for name in wanted:
        if name in held.names:
            raise RequestError(400, f"you already hold role {name!r}")
        if name not in requestable:
            raise RequestError(403, f"your roles do not allow requesting role {name!r}")
    text = clean_reason(reason)
    if held.reason_required() and not text:
        raise RequestError(400, "your roles require a reason for each request (--reason)")
    granting = held.granting(wanted)
    cap = min((r.allow_requests.max_duration or default_ttl for r in granting),
              default=default_ttl)
    if ttl is not None:
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not ttl > 0:
            raise RequestError(400, "ttl must be a positive number of seconds")
        cap = min(cap, float(ttl))
    thresholds = [t for r in granting for t in (r.allow_requests.thresholds or (Threshold(),))]
    return Plan(
        roles=wanted,
        apps=tuple(dict.fromkeys(apps)),
        reason=text,
        ttl=cap,
        approve=max((t.approve for t in thresholds), default=1),
        deny=min((t.deny for t in thresholds), default=1),
    )


def new_request(request_id: str, user: str, plan: Plan, now: float) -> AccessRequest:
    return AccessRequest(id=request_id, user=user, roles=plan.roles, apps=plan.apps,
                         reason=plan.reason, state=PENDING, created=now, ttl=plan.ttl,
                         expires=now + PENDING_TTL, approve=plan.approve, deny=plan.deny)


def may_see(request: AccessRequest, user: str, reviewable: frozenset[str]) -> bool:
    """The requester sees their own requests; reviewers those they could review."""
    return request.user == user or set(request.roles) <= reviewable


def review_problem(request: AccessRequest, reviewer: str, reviewable: frozenset[str],
                   now: float) -> RequestError | None:
    """Why ``reviewer`` (whose roles may review ``reviewable``) may not review it now."""
    if request.user == reviewer:
        return RequestError(403, "you cannot review your own request")
    missing = [r for r in request.roles if r not in reviewable]
    if missing:
        return RequestError(403, f"your roles do not allow reviewing requests for role "
                                 f"{missing[0]!r}")
    state = current_state(request, now)
    if state != PENDING:
        return RequestError(409, f"the request is already {state}")
    if any(r.author == reviewer for r in request.reviews):
        return RequestError(409, "you have already reviewed this request")
    return None


def apply_review(request: AccessRequest, review: Review) -> AccessRequest:
    """The request after ``review``: denied once its denials reach the threshold, else
    approved once its approvals do (the elevation starts now), else still pending."""
    reviews = (*request.reviews, review)
    denials = sum(1 for r in reviews if not r.approve)
    approvals = len(reviews) - denials
    if denials >= request.deny:
        return attrs.evolve(request, reviews=reviews, state=DENIED)
    if approvals >= request.approve:
        return attrs.evolve(request, reviews=reviews, state=APPROVED,
                            expires=review.created + request.ttl)
    return attrs.evolve(request, reviews=reviews)


def current_state(request: AccessRequest, now: float) -> str:
    """The state as of ``now``: pending and approved requests lapse at ``expires``."""
    if request.state in (PENDING, APPROVED) and now >= request.expires:
        return EXPIRED
    return request.state


def expired(request: AccessRequest, now: float) -> AccessRequest | None:
    """The request marked expired if it lapsed by ``now``, else None."""
    if current_state(request, now) == EXPIRED and request.state != EXPIRED:
        return attrs.evolve(request, state=EXPIRED)
    return None


def granted_roles(requests: Mapping[str, AccessRequest], user: str, ids: Iterable[str],
                  app: str | None, now: float) -> tuple[tuple[str, ...], float | None]:
    """The roles a credential that assumed ``ids`` gains on ``app`` now, and when the
    first of the requests granting them ends (None: nothing granted).

    Only ``user``'s own approved, unexpired requests count; one made for apps grants its
    roles on those apps only (``app`` None, "may this user act at all", gets none of it).
    """
    roles: list[str] = []
    until: float | None = None
    for request_id in ids:
        request = requests.get(request_id)
        if (request is None or request.user != user
                or current_state(request, now) != APPROVED
                or (request.apps and app not in request.apps)):
            continue
        roles.extend(request.roles)
        until = request.expires if until is None else min(until, request.expires)
    return tuple(dict.fromkeys(roles)), until


def request_json(request: AccessRequest, now: float) -> dict:
    """The request as the API, the CLI and the webhook show it."""
    return {
        "id": request.id,
        "user": request.user,
        "roles": list(request.roles),
        "apps": list(request.apps),
        "state": current_state(request, now),
        "reason": request.reason,
        "created": request.created,
        "ttl": request.ttl,
        "expires": request.expires,
        "approvals_needed": request.approve,
        "denials_needed": request.deny,
        "reviews": [{"author": r.author, "approve": r.approve, "reason": r.reason,
                     "created": r.created} for r in request.reviews],
    }
