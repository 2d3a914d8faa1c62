"""The admin pages under ``/web/admin/`` (mounted by web/routes.py): apps, agents,
users, roles, connectors and locks, as plain HTML forms.

Every page asks the same gate as the JSON API (the caller's rules; a form post must come
from this site) and calls the same admin services as the CLI, so a change made here is
validated, audited (with the signed-in user, ``via: api``) and applied exactly like
one made with ``apptunnel``. A refused change is shown inline on the page it came from
(a role's YAML with its key path), never as a bare error.
"""

from __future__ import annotations

from urllib.parse import quote

from klein import Klein

from apptunnel.admin.context import AdminError
from apptunnel.admin import inventory
from apptunnel.web.admin_api import (
    DEFAULT_LINK_TTL, KIND_OF, agent_view, app_views, bot_view, lock_view, resource_view,
    token_view, user_view,
)
from apptunnel.web.admin_gate import (
    SECTIONS, TITLES, AdminRoutes, actor, duration_field, string_list,
)
from apptunnel.web.http import redirect

MAX_FIELD = 64 * 1024
NEW_APP = """kind: app
metadata:
  name: NAME
  labels: {env: dev}
spec:
  uri: http://127.0.0.1:8080
"""
NEW_ROLE = """kind: role
metadata:
  name: NAME
spec:
  allow:
    app_labels: {env: dev}
"""
NEW_CONNECTOR = """kind: oidc
metadata:
  name: NAME
spec:
  issuer_url: https://idp.example.com
  client_id: apptunnel
  client_secret_file: /etc/apptunnel/oidc-secret
  redirect_url: https://PROXY/v1/webapi/oidc/callback
  claims_to_roles:
    - {claim: groups, value: admins, roles: [admin]}
"""


NEW_DOCUMENT = {"role": NEW_ROLE, "connector": NEW_CONNECTOR, "app": NEW_APP}


def form(request, name: str) -> str:
    """A form field ("" when absent); bad UTF-8 or a huge value is a 400 naming it."""
    values = request.args.get(name.encode("ascii"))
    if not values:
        return ""
    if len(values[0]) > MAX_FIELD:
        raise AdminError("too long", field=name)
    try:
        return values[0].decode("utf-8")
    except UnicodeDecodeError:
        raise AdminError("not valid UTF-8", field=name) from None


class AdminPages(AdminRoutes):
    """``/web/admin``, ``/web/admin/<section>`` and their forms."""

    app = Klein()
    app.handle_errors(AdminRoutes.on_error)

    @app.route("/web/admin", methods=["GET"])
    async def index(self, request):
        caller = await self.gate.caller(request)
        kinds = await self.gate.allowed_kinds(caller, [k for _, _, k in SECTIONS])
        if not kinds:
            raise AdminError("your roles do not allow any admin page", "forbidden")
        first = next(path for path, _, kind in SECTIONS if kind in kinds)
        return redirect(request, 302, f"/web/admin/{first}")

    # -- apps and agents ----------------------------------------------------------------

    @app.route("/web/admin/apps", methods=["GET"])
    async def apps(self, request):
        caller = await self.gate.require(request, "app", "list")
        return await self.render(request, caller, "apps", "admin_apps.html", {
            "apps": await app_views(self._registry, self._ctx)})

    @app.route("/web/admin/agents", methods=["GET"])
    async def agents(self, request):
        caller = await self.gate.require(request, "agent", "list")
        now = self._ctx.now()
        listed = sorted(await inventory.agents(self._ctx), key=lambda pair: pair[0].host_id)
        return await self.render(request, caller, "agents", "admin_agents.html", {
            "agents": [agent_view(a, now, locked) for a, locked in listed]})

    # -- users --------------------------------------------------------------------------

    async def _users_page(self, request, caller, status: int = 200, **extra) -> bytes:
        can = {verb: await self.gate.allows(caller, "user", verb)
               for verb in ("create", "update", "delete")}
        can["sign_out"] = await self.gate.allows(caller, "session", "delete")
        return await self.render(request, caller, "users", "admin_users.html", {
            "users": [user_view(u) for u in await self._users.list()], "can": can,
            "link": None, **extra}, status)

    @app.route("/web/admin/users", methods=["GET"])
    async def users(self, request):
        caller = await self.gate.require(request, "user", "list")
        return await self._users_page(request, caller)

    @app.route("/web/admin/users", methods=["POST"])
    async def invite(self, request):
        caller = await self.gate.require(request, "user", "create", form=True)
        try:
            ttl = duration_field("ttl", form(request, "ttl"), DEFAULT_LINK_TTL)
            user, link = await self._users.create(
                actor(caller), form(request, "name").strip(),
                tuple(string_list("roles", form(request, "roles"))), {}, None, ttl)
        except AdminError as err:
            return await self._users_page(request, caller, err.status, error=err.text())
        return await self._users_page(
            request, caller, notice=f"Invited {user.name}. Send them this link (it works "
            "once and is not shown again):", link=link.url)

    @app.route("/web/admin/users/<string:name>/roles", methods=["POST"])
    async def edit_roles(self, request, name: str):
        caller = await self.gate.require(request, "user", "update", form=True)
        try:
            user, _ = await self._users.update(
                actor(caller), name, tuple(string_list("roles", form(request, "roles"))), None)
        except AdminError as err:
            return await self._users_page(request, caller, err.status, error=err.text())
        return await self._users_page(request, caller,
                                      notice=f"Roles of {user.name}: {', '.join(user.roles)}.")

    @app.route("/web/admin/users/<string:name>/reset", methods=["POST"])
    async def reset(self, request, name: str):
        caller = await self.gate.require(request, "user", "update", form=True)
        try:
            user, link = await self._users.reset(actor(caller), name, DEFAULT_LINK_TTL)
        except AdminError as err:
            return await self._users_page(request, caller, err.status, error=err.text())
        return await self._users_page(
            request, caller, notice=f"Reset {user.name}: their password and sessions are "
            "gone. Send them this link (works once, not shown again):", link=link.url)

    @app.route("/web/admin/users/<string:name>/sessions/delete", methods=["POST"])
    async def end_sessions(self, request, name: str):
        caller = await self.gate.require(request, "session", "delete", form=True)
        try:
            count = await self._users.end_sessions(actor(caller), name)
        except AdminError as err:
            return await self._users_page(request, caller, err.status, error=err.text())
        return await self._users_page(
            request, caller, notice=f"Signed {name} out everywhere ({count} web sessions).")

    @app.route("/web/admin/users/<string:name>/delete", methods=["POST"])
    async def delete_user(self, request, name: str):
        caller = await self.gate.require(request, "user", "delete", form=True)
        try:
            await self._users.delete(actor(caller), name)
        except AdminError as err:
            return await self._users_page(request, caller, err.status, error=err.text())
        return await self._users_page(request, caller, notice=f"Removed user {name}.")

    # -- roles and connectors -----------------------------------------------------------

    @app.route("/web/admin/<any(roles, connectors, app_resources):kinds>", methods=["GET"])
    async def resources(self, request, kinds: str):
        kind = KIND_OF[kinds]
        caller = await self.gate.require(request, kind, "list")
        return await self._resources_page(request, caller, kinds)

    async def _resources_page(self, request, caller, kinds: str, status: int = 200,
                              **extra) -> bytes:
        kind = KIND_OF[kinds]
        return await self.render(request, caller, kinds, "admin_resources.html", {
            "kind": kind, "kinds": kinds, "title": TITLES[kinds],
            "items": [resource_view(r) for r in await self._resources.list(kind)],
            "can_create": await self.gate.allows(caller, kind, "create"), **extra}, status)

    @app.route("/web/admin/<any(roles, connectors, app_resources):kinds>/new", methods=["GET"])
    async def new_resource(self, request, kinds: str):
        kind = KIND_OF[kinds]
        caller = await self.gate.require(request, kind, "create")
        return await self._editor(request, caller, kinds, None, NEW_DOCUMENT[kind])

    @app.route("/web/admin/<any(roles, connectors, app_resources):kinds>/<string:name>", methods=["GET"])
    async def edit_resource(self, request, kinds: str, name: str):
        kind = KIND_OF[kinds]
        caller = await self.gate.require(request, kind, "read")
        found = resource_view(await self._resources.get(kind, name))
        return await self._editor(request, caller, kinds, name, found["yaml"])

    async def _editor(self, request, caller, kinds: str, name: str | None, text: str,
                      status: int = 200, **extra) -> bytes:
        kind = KIND_OF[kinds]
        verb = "create" if name is None else "update"
        return await self.render(request, caller, kinds, "admin_resource.html", {
            "kind": kind, "kinds": kinds, "title": TITLES[kinds], "name": name, "yaml": text,
            "action": f"/web/admin/{kinds}" + ("" if name is None else f"/{quote(name)}"),
            "can_save": await self.gate.allows(caller, kind, verb),
            "can_delete": name is not None and await self.gate.allows(caller, kind, "delete"),
            **extra}, status)

    @app.route("/web/admin/<any(roles, connectors, app_resources):kinds>", methods=["POST"])
    async def create_resource(self, request, kinds: str):
        return await self._save(request, kinds, None)

    @app.route("/web/admin/<any(roles, connectors, app_resources):kinds>/<string:name>", methods=["POST"])
    async def save_resource(self, request, kinds: str, name: str):
        return await self._save(request, kinds, name)

    async def _save(self, request, kinds: str, name: str | None) -> bytes:
        kind = KIND_OF[kinds]
        caller = await self.gate.require(request, kind, "create" if name is None else "update",
                                          form=True)
        text = form(request, "yaml")
        try:
            saved = await self._resources.put_text(actor(caller), kind, text, name,
                                                   replace=name is not None)
        except AdminError as err:
            return await self._editor(request, caller, kinds, name, text, err.status,
                                      error=err.text())
        return await self._editor(request, caller, kinds, saved.name,
                                  resource_view(saved)["yaml"],
                                  notice=f"Saved {kind} {saved.name}.")

    @app.route("/web/admin/<any(roles, connectors, app_resources):kinds>/<string:name>/delete", methods=["POST"])
    async def delete_resource(self, request, kinds: str, name: str):
        kind = KIND_OF[kinds]
        caller = await self.gate.require(request, kind, "delete", form=True)
        try:
            await self._resources.delete(actor(caller), kind, name)
        except AdminError as err:
            return await self._resources_page(request, caller, kinds, err.status,
                                              error=err.text())
        return await self._resources_page(request, caller, kinds,
                                          notice=f"Removed {kind} {name}.")

    # -- join tokens and bots -----------------------------------------------------------

    async def _tokens_page(self, request, caller, status: int = 200, **extra) -> bytes:
        now = self._ctx.now()
        return await self.render(request, caller, "tokens", "admin_tokens.html", {
            "tokens": [token_view(t, now) for t in await self._tokens.list()],
            "can_create": await self.gate.allows(caller, "token", "create"),
            "can_delete": await self.gate.allows(caller, "token", "delete"),
            "secret": None, "ca_pin": self.ctx.ca.pin, **extra}, status)

    @app.route("/web/admin/tokens", methods=["GET"])
    async def tokens(self, request):
        caller = await self.gate.require(request, "token", "list")
        return await self._tokens_page(request, caller)

    @app.route("/web/admin/tokens", methods=["POST"])
    async def create_token(self, request):
        caller = await self.gate.require(request, "token", "create", form=True)
        try:
            uses = form(request, "uses").strip() or "1"
            if not (uses.isascii() and uses.isdigit()):
                raise AdminError("expected a number", field="uses")
            secret, _ = await self._tokens.create(
                actor(caller), duration_field("ttl", form(request, "ttl"), 3600.0),
                int(uses), string_list("apps", form(request, "apps")),
                _label_pairs(form(request, "labels")))
        except AdminError as err:
            return await self._tokens_page(request, caller, err.status, error=err.text())
        return await self._tokens_page(
            request, caller, secret=secret,
            notice="Join token created. Put it and the CA pin in the agent's join: section "
                   "(it is shown only now):")

    @app.route("/web/admin/tokens/<string:given>/delete", methods=["POST"])
    async def delete_token(self, request, given: str):
        caller = await self.gate.require(request, "token", "delete", form=True)
        try:
            token = await self._tokens.remove(actor(caller), given, by_secret=False)
        except AdminError as err:
            return await self._tokens_page(request, caller, err.status, error=err.text())
        return await self._tokens_page(request, caller,
                                       notice=f"Removed join token {token.token_hash[:12]}.")

    async def _bots_page(self, request, caller, status: int = 200, **extra) -> bytes:
        now = self._ctx.now()
        return await self.render(request, caller, "bots", "admin_bots.html", {
            "bots": [bot_view(b, now) for b in await self._bots.list()],
            "can_create": await self.gate.allows(caller, "bot", "create"),
            "can_delete": await self.gate.allows(caller, "bot", "delete"),
            "secret": None, "ca_pin": self.ctx.ca.pin, **extra}, status)

    @app.route("/web/admin/bots", methods=["GET"])
    async def bots(self, request):
        caller = await self.gate.require(request, "bot", "list")
        return await self._bots_page(request, caller)

    @app.route("/web/admin/bots", methods=["POST"])
    async def add_bot(self, request):
        caller = await self.gate.require(request, "bot", "create", form=True)
        try:
            secret, token = await self._bots.add(
                actor(caller), form(request, "name").strip(),
                string_list("roles", form(request, "roles")),
                duration_field("ttl", form(request, "ttl"), 3600.0))
        except AdminError as err:
            return await self._bots_page(request, caller, err.status, error=err.text())
        return await self._bots_page(
            request, caller, secret=secret,
            notice=f"Bot {token.bot} added. Its one-time join token (shown only now):")

    @app.route("/web/admin/bots/<string:name>/delete", methods=["POST"])
    async def remove_bot(self, request, name: str):
        caller = await self.gate.require(request, "bot", "delete", form=True)
        try:
            await self._bots.remove(actor(caller), name)
        except AdminError as err:
            return await self._bots_page(request, caller, err.status, error=err.text())
        return await self._bots_page(request, caller, notice=f"Removed bot {name}.")

    # -- locks --------------------------------------------------------------------------

    async def _locks_page(self, request, caller, status: int = 200, **extra) -> bytes:
        return await self.render(request, caller, "locks", "admin_locks.html", {
            "locks": [lock_view(x) for x in await self._locks.list()],
            "can_create": await self.gate.allows(caller, "lock", "create"),
            "can_delete": await self.gate.allows(caller, "lock", "delete"), **extra}, status)

    @app.route("/web/admin/locks", methods=["GET"])
    async def locks(self, request):
        caller = await self.gate.require(request, "lock", "list")
        return await self._locks_page(request, caller)

    @app.route("/web/admin/locks", methods=["POST"])
    async def create_lock(self, request):
        caller = await self.gate.require(request, "lock", "create", form=True)
        try:
            lock, warnings = await self._locks.create(
                actor(caller), user=form(request, "user").strip() or None,
                app=form(request, "app").strip() or None,
                ttl=duration_field("ttl", form(request, "ttl").strip() or None),
                message=form(request, "message"))
        except AdminError as err:
            return await self._locks_page(request, caller, err.status, error=err.text())
        return await self._locks_page(request, caller,
                                      notice=" ".join([f"Locked {lock_view(lock)['target']}.",
                                                       *warnings]))

    @app.route("/web/admin/locks/<string:lock_id>/delete", methods=["POST"])
    async def delete_lock(self, request, lock_id: str):
        caller = await self.gate.require(request, "lock", "delete", form=True)
        try:
            lock = await self._locks.remove(actor(caller), lock_id)
        except AdminError as err:
            return await self._locks_page(request, caller, err.status, error=err.text())
        return await self._locks_page(request, caller,
                                      notice=f"Removed the lock on {lock_view(lock)['target']}.")


def _label_pairs(text: str) -> dict[str, str]:
    """``env=dev, team=sre`` (a form field) -> {"env": "dev", "team": "sre"}."""
    pairs: dict[str, str] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or key.strip() in pairs:
            raise AdminError(f"expected KEY=VALUE (each key once), got {item!r}",
                             field="labels")
        pairs[key.strip()] = value.strip()
    return pairs
