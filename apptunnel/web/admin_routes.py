"""Mounts the admin and audit modules on the proxy host's web app (web/routes.py).

    /v1/admin/...   JSON: users, roles, connectors, locks, apps, agents (web/admin_api.py)
    /v1/audit/...   JSON: event search and one event (web/audit_web.py)
    /web/admin/...  pages (web/admin_pages.py)
    /web/audit/...  the audit viewer (web/audit_web.py)

All four share one gate (the caller's role rules) and the admin services (apptunnel/admin/)
the CLI uses, built on ``admin``: the proxy's storage, audit log and its own re-read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from apptunnel.admin.audit import AuditSearch
from apptunnel.admin.context import AdminContext
from apptunnel.web.admin_api import AdminApi
from apptunnel.web.admin_gate import AdminGate, AdminServices
from apptunnel.web.admin_pages import AdminPages
from apptunnel.web.audit_web import AuditApi, AuditPages

if TYPE_CHECKING:
    from apptunnel.web.routes import WebApp

TEMPLATES = ("admin_apps.html", "admin_agents.html", "admin_users.html",
             "admin_resources.html", "admin_resource.html", "admin_locks.html",
             "admin_tokens.html", "admin_bots.html", "audit.html", "audit_event.html")


def mount_admin(web: WebApp, admin: AdminContext) -> None:
    """Answer the admin and audit paths of ``web`` (before its ``resource()``)."""
    gate, services = AdminGate(web.context), AdminServices(admin)
    web.context.load(*TEMPLATES)
    web.context.nav_hooks.append(gate.nav_links)   # "Admin" / "Audit" in the header
    web.mount(("/v1/admin",), AdminApi(gate, services))
    web.mount(("/web/admin",), AdminPages(gate, services))
    search = AuditSearch(admin.backend)
    web.mount(("/v1/audit",), AuditApi(gate, search))
    web.mount(("/web/audit",), AuditPages(gate, search))
