"""The admin JSON API under ``/v1/admin/`` (mounted by web/routes.py).

Each route asks the gate first (the caller's role rules: kind x verb, deny wins; changes
only from this site), then calls the same admin service as the CLI (apptunnel/admin/),
so validation, storage, the audit event (with the acting user, ``via: api``) and the
nudge that makes a change hold at once are the CLI's. Errors are JSON ``{"error": ...}``
with the status the service gave (400 with the key path for a bad role or connector).
"""

from __future__ import annotations

from typing import Any

import yaml
from klein import Klein

from apptunnel.admin.context import AdminContext, AdminError
from apptunnel.admin import inventory
from apptunnel.admin.locks import describe
from apptunnel.admin.resources import ResourceAdmin
from apptunnel.auth.bots import BOT_PREFIX
from apptunnel.backend.records import Agent, Bot, JoinToken, Lock, Resource, User
from apptunnel.web.admin_gate import (
    AdminRoutes, actor, duration_field, optional_string, string_list,
)
from apptunnel.web.http import json_body, json_response

DEFAULT_LINK_TTL = 24 * 3600.0
# The YAML document kinds under /v1/admin/<plural> and the rule kind of each.
KIND_OF = {"roles": "role", "connectors": "connector", "app_resources": "app"}
MAX_LINK_TTL = 30 * 86400.0


def user_view(user: User) -> dict:
    return {"name": user.name, "roles": list(user.roles),
            "traits": {k: list(v) for k, v in user.traits.items()},
            "password": user.password_hash is not None, "connector": user.connector,
            "created": user.created}


def lock_view(lock: Lock) -> dict:
    return {"id": lock.id, "user": lock.user, "app": lock.app, "agent": lock.agent,
            "message": lock.message, "created": lock.created, "created_by": lock.created_by,
            "expires": lock.expires, "target": describe(lock)}


def token_view(token: JoinToken, now: float) -> dict:
    return {"hash": token.token_hash[:12], "type": token.kind, "created": token.created,
            "expires": token.expires, "expired": token.expires <= now,
            "uses_left": token.uses_left, "scope": token.scope.to_json(), "bot": token.bot}


def bot_view(bot: Bot, now: float) -> dict:
    return {"name": bot.name, "principal": BOT_PREFIX + bot.name, "roles": list(bot.roles),
            "created": bot.created, "joined": bot.cert_expires is not None,
            "cert_expires": bot.cert_expires,
            "cert_valid": bot.cert_expires is not None and bot.cert_expires > now}


def agent_view(agent: Agent, now: float, locked: bool = False) -> dict:
    connected = agent.connected_since
    return {"host_id": agent.host_id, "locked": locked, "state": inventory.agent_state(agent),
            "peer": agent.peer, "proxy": agent.proxy_id, "version": agent.version,
            "apps": list(agent.apps), "joined": agent.joined, "last_seen": agent.last_seen,
            "connected_since": connected, "online": connected is not None,
            "tunnel_uptime": None if connected is None else max(0.0, now - connected),
            "cert_expires": agent.cert_expires, "draining": agent.draining}


async def app_views(registry, ctx: AdminContext) -> list[dict]:
    """Every app this proxy's registry knows or storage records (``apps ls --admin``),
    with the connected agents serving it and whether it is online here."""
    stored = {row["name"]: row for row in await inventory.apps(ctx)}
    known = {app.name: app for app in registry.apps(include_offline=True)}
    views = []
    for name in sorted(set(stored) | set(known)):
        app, row = known.get(name), stored.get(name, {})
        views.append({
            "name": name, "type": app.kind if app is not None else "",
            "labels": dict(app.labels) if app is not None else row.get("labels", {}),
            "resource": row.get("resource", False), "online": registry.is_online(name),
            "agents": sorted(a.host_id for a in row.get("agents", ())
                             if a.connected_since is not None)})
    return views


def resource_view(resource: Resource) -> dict:
    doc = ResourceAdmin.shown(resource)
    return {"kind": resource.kind, "name": resource.name, "doc": doc,
            "yaml": yaml.safe_dump(doc, sort_keys=False, default_flow_style=False,
                                   allow_unicode=True)}


class AdminApi(AdminRoutes):
    """``/v1/admin/{users,roles,connectors,locks,apps,agents}``."""

    app = Klein()
    app.handle_errors(AdminRoutes.on_error)

    # -- users --------------------------------------------------------------------------

    @app.route("/v1/admin/users", methods=["GET"])
    async def list_users(self, request):
        await self.gate.require(request, "user", "list")
        return json_response(request, 200, {"users": [user_view(u) for u in await self._users.list()]})

    @app.route("/v1/admin/users", methods=["POST"])
    async def create_user(self, request):
        """An invite: the new user chooses a password at the link (shown once, here)."""
        caller = await self.gate.require(request, "user", "create")
        body = json_body(request)
        ttl = _link_ttl(body.get("invite_ttl"))
        user, link = await self._users.create(
            actor(caller), body.get("name"), tuple(string_list("roles", body.get("roles", []))),
            _traits(body.get("traits")), None, ttl)
        return json_response(request, 201, {"user": user_view(user),
                                    "invite_url": link.url if link else None})

    @app.route("/v1/admin/users/<string:name>", methods=["GET"])
    async def read_user(self, request, name: str):
        await self.gate.require(request, "user", "read")
        return json_response(request, 200, user_view(await self._users.existing(name)))

    @app.route("/v1/admin/users/<string:name>", methods=["PATCH"])
    async def update_user(self, request, name: str):
        caller = await self.gate.require(request, "user", "update")
        body = json_body(request)
        roles = body.get("roles")
        user, changed = await self._users.update(
            actor(caller), name,
            None if roles is None else tuple(string_list("roles", roles)),
            None if body.get("traits") is None else _traits(body.get("traits")))
        return json_response(request, 200, {"user": user_view(user), "changed": changed})

    @app.route("/v1/admin/users/<string:name>/reset", methods=["POST"])
    async def reset_user(self, request, name: str):
        caller = await self.gate.require(request, "user", "update")
        body = json_body(request)
        user, link = await self._users.reset(actor(caller), name, _link_ttl(body.get("ttl")))
        return json_response(request, 200, {"user": user_view(user), "reset_url": link.url})

    @app.route("/v1/admin/users/<string:name>", methods=["DELETE"])
    async def delete_user(self, request, name: str):
        caller = await self.gate.require(request, "user", "delete")
        await self._users.delete(actor(caller), name)
        return json_response(request, 200, {"deleted": name})

    @app.route("/v1/admin/users/<string:name>/sessions", methods=["GET"])
    async def list_sessions(self, request, name: str):
        await self.gate.require(request, "session", "list")
        return json_response(request, 200, {"sessions": [
            {"created": s.created, "expires": s.expires, "enroll_only": s.enroll_only,
             "requests": list(s.requests)} for s in await self._users.sessions(name)]})

    @app.route("/v1/admin/users/<string:name>/sessions", methods=["DELETE"])
    async def end_sessions(self, request, name: str):
        caller = await self.gate.require(request, "session", "delete")
        return json_response(request, 200,
                             {"ended": await self._users.end_sessions(actor(caller), name)})

    # -- roles and connectors (YAML in, key paths back) ---------------------------------

    @app.route("/v1/admin/<any(roles, connectors, app_resources):kinds>", methods=["GET"])
    async def list_resources(self, request, kinds: str):
        kind = KIND_OF[kinds]
        await self.gate.require(request, kind, "list")
        return json_response(request, 200, {kinds: [resource_view(r)
                                            for r in await self._resources.list(kind)]})

    @app.route("/v1/admin/<any(roles, connectors, app_resources):kinds>/<string:name>", methods=["GET"])
    async def read_resource(self, request, kinds: str, name: str):
        kind = KIND_OF[kinds]
        await self.gate.require(request, kind, "read")
        return json_response(request, 200, resource_view(await self._resources.get(kind, name)))

    @app.route("/v1/admin/<any(roles, connectors, app_resources):kinds>", methods=["POST"])
    async def create_resource(self, request, kinds: str):
        kind = KIND_OF[kinds]
        caller = await self.gate.require(request, kind, "create")
        text = optional_string("yaml", json_body(request).get("yaml")) or ""
        found = await self._resources.put_text(actor(caller), kind, text)
        return json_response(request, 201, resource_view(found))

    @app.route("/v1/admin/<any(roles, connectors, app_resources):kinds>/<string:name>", methods=["PUT"])
    async def replace_resource(self, request, kinds: str, name: str):
        kind = KIND_OF[kinds]
        caller = await self.gate.require(request, kind, "update")
        text = optional_string("yaml", json_body(request).get("yaml")) or ""
        found = await self._resources.put_text(actor(caller), kind, text, name, replace=True)
        return json_response(request, 200, resource_view(found))

    @app.route("/v1/admin/<any(roles, connectors, app_resources):kinds>/<string:name>", methods=["DELETE"])
    async def delete_resource(self, request, kinds: str, name: str):
        kind = KIND_OF[kinds]
        caller = await self.gate.require(request, kind, "delete")
        await self._resources.delete(actor(caller), kind, name)
        return json_response(request, 200, {"deleted": name})

    # -- locks --------------------------------------------------------------------------

    @app.route("/v1/admin/locks", methods=["GET"])
    async def list_locks(self, request):
        await self.gate.require(request, "lock", "list")
        return json_response(request, 200, {"locks": [lock_view(x) for x in await self._locks.list()]})

    @app.route("/v1/admin/locks", methods=["POST"])
    async def create_lock(self, request):
        caller = await self.gate.require(request, "lock", "create")
        body = json_body(request)
        lock, warnings = await self._locks.create(
            actor(caller), user=optional_string("user", body.get("user")),
            app=optional_string("app", body.get("app")),
            agent=optional_string("agent", body.get("agent")),
            bot=optional_string("bot", body.get("bot")),
            ttl=duration_field("ttl", body.get("ttl")),
            message=optional_string("message", body.get("message")) or "")
        return json_response(request, 201, {"lock": lock_view(lock), "warnings": warnings})

    @app.route("/v1/admin/locks/<string:lock_id>", methods=["DELETE"])
    async def delete_lock(self, request, lock_id: str):
        caller = await self.gate.require(request, "lock", "delete")
        lock = await self._locks.remove(actor(caller), lock_id)
        return json_response(request, 200, {"deleted": lock.id})

    # -- apps and agents (read only here) -----------------------------------------------

    @app.route("/v1/admin/apps", methods=["GET"])
    async def list_apps(self, request):
        await self.gate.require(request, "app", "list")
        return json_response(request, 200, {"apps": await app_views(self._registry, self._ctx)})

    # -- join tokens and bots -----------------------------------------------------------

    @app.route("/v1/admin/tokens", methods=["GET"])
    async def list_tokens(self, request):
        await self.gate.require(request, "token", "list")
        now = self._ctx.now()
        return json_response(request, 200, {"tokens": [token_view(t, now)
                                                       for t in await self._tokens.list()]})

    @app.route("/v1/admin/tokens", methods=["POST"])
    async def create_token(self, request):
        """An agent's join token: the secret is in this answer only."""
        caller = await self.gate.require(request, "token", "create")
        body = json_body(request)
        uses = body.get("uses", 1)
        secret, token = await self._tokens.create(
            actor(caller), duration_field("ttl", body.get("ttl"), 3600.0), uses,
            string_list("apps", body.get("apps") or []), _labels(body.get("labels")))
        return json_response(request, 201, {"token": secret, "ca_pin": self.ctx.ca.pin,
                                            **token_view(token, self._ctx.now())})

    @app.route("/v1/admin/tokens/<string:given>", methods=["DELETE"])
    async def delete_token(self, request, given: str):
        caller = await self.gate.require(request, "token", "delete")
        token = await self._tokens.remove(actor(caller), given, by_secret=False)
        return json_response(request, 200, {"deleted": token.token_hash[:12]})

    @app.route("/v1/admin/bots", methods=["GET"])
    async def list_bots(self, request):
        await self.gate.require(request, "bot", "list")
        now = self._ctx.now()
        return json_response(request, 200, {"bots": [bot_view(b, now)
                                                     for b in await self._bots.list()]})

    @app.route("/v1/admin/bots", methods=["POST"])
    async def add_bot(self, request):
        caller = await self.gate.require(request, "bot", "create")
        body = json_body(request)
        secret, token = await self._bots.add(
            actor(caller), body.get("name"), string_list("roles", body.get("roles", [])),
            duration_field("ttl", body.get("ttl"), 3600.0))
        return json_response(request, 201, {"name": token.bot, "token": secret,
                                            "ca_pin": self.ctx.ca.pin,
                                            "expires": token.expires})

    @app.route("/v1/admin/bots/<string:name>", methods=["DELETE"])
    async def remove_bot(self, request, name: str):
        caller = await self.gate.require(request, "bot", "delete")
        await self._bots.remove(actor(caller), name)
        return json_response(request, 200, {"deleted": name})

    # -- access requests (every user's: for auditors and admins) ------------------------

    @app.route("/v1/admin/access_requests", methods=["GET"])
    async def list_access_requests(self, request):
        await self.gate.require(request, "access_request", "list")
        found = await self._ctx.backend.list_access_requests()
        return json_response(request, 200, {"access_requests": [
            {"id": r.id, "user": r.user, "roles": list(r.roles), "apps": list(r.apps),
             "reason": r.reason, "state": r.state, "created": r.created,
             "expires": r.expires} for r in found]})

    @app.route("/v1/admin/agents", methods=["GET"])
    async def list_agents(self, request):
        await self.gate.require(request, "agent", "list")
        now = self._ctx.now()
        listed = sorted(await inventory.agents(self._ctx), key=lambda pair: pair[0].host_id)
        return json_response(request, 200, {"agents": [agent_view(a, now, locked)
                                                       for a, locked in listed]})


def _link_ttl(value: Any) -> float:
    ttl = duration_field("ttl", value, DEFAULT_LINK_TTL)
    if ttl > MAX_LINK_TTL:
        raise AdminError("at most 30d", field="ttl")
    return ttl


def _labels(value: Any) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise AdminError("expected a mapping of label names to values", field="labels")
    return value


def _traits(value: Any) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise AdminError("expected a mapping of trait names to lists of values", field="traits")
    return value
