"""Who may use the admin and audit API and pages: the caller's role rules, asked now.

The caller is resolved by the web app (session cookie or user certificate; bots are
refused as on every route that acts for a person) and capped by the access decision, so
a role removed or a lock placed a moment ago counts. `RoleSet.allows` decides
(auth/rbac.py). A state-changing request must come from this site: a JSON call is
refused when Origin/Referer name another site (the existing API's rule, and its
``application/json`` body needs a CORS preflight we never answer); a form post must
name this site outright.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
from twisted.logger import Logger
from werkzeug.exceptions import HTTPException

from apptunnel.admin.context import Actor, AdminError
from apptunnel.auth.callers import Caller
from apptunnel.auth.errors import AuthError
from apptunnel.config import parse_duration

CROSS_SITE = "cross-origin request refused"
FORM_CROSS_SITE = "This form was not submitted from this site."


@attrs.frozen
class WebHooks:
    """What the web app lends the admin routes (it owns cookies, pages and bodies)."""

    caller: Callable[[Any], Awaitable[Caller | None]]   # acting now; AuthError 403 for bots
    same_origin: Callable[[Any], bool | None]
    json_body: Callable[[Any], dict]
    page: Callable[[Any, int, str, dict], bytes]
    error_page: Callable[[Any, int, str], bytes]


class AdminGate:
    """The one check in front of every admin and audit route."""

    _log = Logger()

    def __init__(self, hooks: WebHooks, roles, audit) -> None:
        self.hooks = hooks
        self._roles = roles
        self._audit = audit

    async def caller(self, request) -> Caller:
        caller = await self.hooks.caller(request)
        if caller is None:
            raise AuthError(401, "sign in required")
        return caller

    async def require(self, request, kind: str, verb: str, *, form: bool = False) -> Caller:
        """The caller, if their rules allow ``verb`` on ``kind``; 401/403 otherwise.
        A change (anything but list/read) must come from this site."""
        changing = verb not in ("list", "read")
        if changing:
            origin = self.hooks.same_origin(request)
            if (origin is not True) if form else (origin is False):
                raise AuthError(403, FORM_CROSS_SITE if form else CROSS_SITE)
        caller = await self.caller(request)
        if not await self.allows(caller, kind, verb):
            if changing:
                self._audit.emit("admin.denied", actor=caller.user, target=kind,
                                 outcome="failure", verb=verb)
            raise AuthError(403, f"your roles do not allow {verb} on {kind}")
        return caller

    async def allows(self, caller: Caller, kind: str, verb: str) -> bool:
        return (await self._roles.role_set(caller.roles)).allows(kind, verb)

    async def allowed_kinds(self, caller: Caller, kinds, verb: str = "list") -> list[str]:
        role_set = await self._roles.role_set(caller.roles)
        return [kind for kind in kinds if role_set.allows(kind, verb)]


def actor(caller: Caller) -> Actor:
    """The signed-in person an API or page change is recorded for."""
    return Actor(caller.user, "api")


def error_answer(failure) -> tuple[int, str] | None:
    """(status, message) of an expected failure; None for a bug (logged by the caller)."""
    err = failure.value
    if isinstance(err, AdminError):
        return err.status, err.text()
    if isinstance(err, AuthError):
        return err.status, err.message
    if isinstance(err, HTTPException):
        return (err.code or 404), (err.description or "request failed").split("\n")[0]
    return None


def json_answer(request, status: int, body: Any) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    return json.dumps(body).encode("utf-8")


def duration_field(name: str, value: Any, default: float | None = None) -> float | None:
    """``"24h"`` or seconds -> seconds; AdminError naming ``name`` otherwise."""
    if value is None or value == "":
        return default
    try:
        seconds = parse_duration(value)
    except ValueError as err:
        raise AdminError(str(err), field=name) from None
    if seconds <= 0:
        raise AdminError("must be more than 0", field=name)
    return seconds


def string_list(name: str, value: Any) -> list[str]:
    """A JSON list of strings, or a comma-separated string (a form field)."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise AdminError("expected a list of strings", field=name)
    return value


def optional_string(name: str, value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise AdminError("expected a string", field=name)
    return value
