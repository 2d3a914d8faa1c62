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

import datetime
from typing import TYPE_CHECKING, Any

from twisted.python.failure import Failure

from apptunnel.admin.bots import BotAdmin
from apptunnel.admin.context import Actor, AdminContext, AdminError
from apptunnel.admin.locks import LockAdmin
from apptunnel.admin.resources import ResourceAdmin
from apptunnel.admin.tokens import TokenAdmin
from apptunnel.admin.users import UserAdmin
from apptunnel.auth.callers import Caller, caller_from_session
from apptunnel.auth.errors import AuthError
from apptunnel.auth.rbac import RESOURCE_KINDS
from apptunnel.config import parse_duration
from apptunnel.web.context import Routes
from apptunnel.web.http import WebError

if TYPE_CHECKING:
    from apptunnel.web.context import WebContext

# The sections of the admin pages, in the nav's order: (path, title, kind).
SECTIONS = (("apps", "Apps", "app"), ("app_resources", "App resources", "app"),
            ("agents", "Agents", "agent"), ("tokens", "Join tokens", "token"),
            ("users", "Users", "user"), ("roles", "Roles", "role"),
            ("connectors", "Connectors", "connector"), ("locks", "Locks", "lock"),
            ("bots", "Bots", "bot"))
TITLES = {path: title for path, title, _ in SECTIONS}
CROSS_SITE = "cross-origin request refused"
FORM_CROSS_SITE = "This form was not submitted from this site."


class AdminGate:
    """The one check in front of every admin and audit route."""

    def __init__(self, ctx: WebContext) -> None:
        self.ctx = ctx
        self._roles = ctx.roles
        self._audit = ctx.audit

    async def caller(self, request) -> Caller:
        """The session's or certificate's person with the roles they hold now."""
        caller = await self.ctx.caller(request)
        if caller is None:
            raise AuthError(401, "sign in required")
        return await self.ctx.acting(caller, "admin")

    async def require(self, request, kind: str, verb: str, *, form: bool = False) -> Caller:
        """The caller, if their rules allow ``verb`` on ``kind``; 401/403 otherwise.
        A change (anything but list/read) must come from this site."""
        changing = verb not in ("list", "read")
        if changing:
            origin = self.ctx.same_origin(request)
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

    async def nav_links(self, web) -> list[tuple[str, str, str]]:
        """The header's Admin and Audit links, for a user whose rules allow them (the web
        context's nav hook; a locked or removed user gets none)."""
        try:
            caller = await self.ctx.acting(caller_from_session(web), "nav")
        except AuthError:
            return []
        kinds = await self.allowed_kinds(caller, RESOURCE_KINDS)
        links = []
        if any(kind in kinds for _, _, kind in SECTIONS):
            links.append(("Admin", "/web/admin", "admin"))
        if "event" in kinds:
            links.append(("Audit", "/web/audit", "audit"))
        return links


def actor(caller: Caller) -> Actor:
    """The signed-in person an API or page change is recorded for."""
    return Actor(caller.user, "api")


class AdminServices:
    """The admin services (apptunnel/admin/) one mount shares: the API and the pages act
    through the same objects, as the CLI does through its own."""

    def __init__(self, admin: AdminContext) -> None:
        self.ctx = admin
        self.users = UserAdmin(admin)
        self.locks = LockAdmin(admin)
        self.tokens = TokenAdmin(admin)
        self.bots = BotAdmin(admin)
        self.resources = ResourceAdmin(admin)


class AdminRoutes(Routes):
    """Base of the admin and audit route modules: an admin service's refusal becomes the
    uniform error answer (JSON under /v1/, the error page elsewhere) with its status."""

    def __init__(self, gate: AdminGate, services: AdminServices | None = None) -> None:
        super().__init__(gate.ctx)
        self.gate = gate
        self._registry = gate.ctx.registry
        if services is not None:
            self._ctx = services.ctx
            self._users, self._locks, self._tokens = services.users, services.locks, services.tokens
            self._bots, self._resources = services.bots, services.resources

    async def render(self, request, caller: Caller, section: str, template: str,
                     context: dict, status: int = 200) -> bytes:
        """A page of the admin layout: the nav shows only the sections the caller's rules
        let them list (and the audit log if they may read it)."""
        kinds = await self.gate.allowed_kinds(caller, RESOURCE_KINDS)
        sections = [(path, title, path == section) for path, title, kind in SECTIONS
                    if kind in kinds]
        _, web = await self.ctx.web_session(request)
        return self.ctx.page(request, status, template, {
            "user": caller.user, "admin_nav": sections, "audit": "event" in kinds,
            "section": section, "iso": iso, "notice": None, "error": None,
            "nav": "audit" if section == "audit" else "admin",
            "extra_nav": await self.ctx.extra_nav(web), **context})

    def on_error(self, request, failure: Failure) -> bytes:
        if isinstance(failure.value, AdminError):
            failure = Failure(WebError(failure.value.status, failure.value.text()))
        return self.ctx.on_error(request, failure)


def iso(seconds: float) -> str:
    """UTC time as ``2024-05-01T12:00:00Z``, as the CLI prints it."""
    moment = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


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
