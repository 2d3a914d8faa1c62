"""The admin and audit API and pages (/v1/admin, /v1/audit, /web/admin, /web/audit) over
real sessions, roles, storage and audit: each refuses what the caller's rules do not
allow, refuses cross-site changes, and changes go through the CLI's services, audited
with the signed-in user."""

from __future__ import annotations

import json

import pytest
import pytest_twisted

from apptunnel.admin.context import AdminContext
from apptunnel.backend.records import Resource, User
from apptunnel.web.admin_routes import mount_admin
from tests.support.web_env import header, password_hash

ADMIN = {"kind": "role", "metadata": {"name": "admin"},
         "spec": {"allow": {"rules": [{"resources": ["*"], "verbs": ["*"]}]}}}
AUDITOR = {"kind": "role", "metadata": {"name": "auditor"},
           "spec": {"allow": {"rules": [{"resources": ["event"], "verbs": ["list", "read"]}]}}}
JSON = {"Content-Type": "application/json"}


@pytest.fixture
def env(web_env):
    return web_env


@pytest_twisted.async_yield_fixture
async def admin_env(env):
    """The web env with the admin routes mounted, an admin (root) and an auditor (aud)."""
    for doc in (ADMIN, AUDITOR):
        await env.backend.put_resource(Resource("role", doc["metadata"]["name"], doc))
    now = env.clock.seconds()
    await env.backend.create_user(User("root", password_hash("root-pw"), ("admin",), {}, now))
    await env.backend.create_user(User("aud", password_hash("aud-pw"), ("auditor",), {}, now))
    nudged = []

    async def nudge():
        """What the proxy's refresh_now does for sessions: forget the cached ones."""
        nudged.append(True)
        env.sessions.forget_cached()

    mount_admin(env.web, AdminContext(env.backend, env.audit, env.clock,
                                      env.config.public_addr, nudge))
    yield AdminEnv(env, nudged)


class AdminEnv:
    """The web env plus the nudges the admin services made."""

    def __init__(self, env, nudged: list) -> None:
        self._env = env
        self.nudged = nudged

    def __getattr__(self, name):
        return getattr(self._env, name)


async def api(env, method, path, secret, body=None, **kwargs):
    response, raw = await env.call(method, path, cookie=secret, headers=JSON,
                                   data=None if body is None else json.dumps(body), **kwargs)
    return response.code, json.loads(raw) if raw else None


@pytest_twisted.ensureDeferred
async def test_a_user_without_rules_gets_403_everywhere(admin_env):
    """bob (no rules) and the auditor are refused every admin page and API route (403)."""
    env = admin_env
    bob = await env.login("bob", "bob-pw")
    for path in ("/web/admin", "/web/admin/users", "/web/admin/roles", "/web/admin/locks",
                 "/web/audit", "/v1/admin/users", "/v1/admin/locks", "/v1/admin/roles",
                 "/v1/admin/apps", "/v1/admin/agents", "/v1/audit/events"):
        response, body = await env.call("GET", path, cookie=bob)
        assert response.code == 403, path
    aud = await env.login("aud", "aud-pw")
    response, _ = await env.call("GET", "/v1/admin/users", cookie=aud)
    assert response.code == 403
    code, answer = await api(env, "POST", "/v1/admin/locks", aud, {"user": "alice"})
    assert code == 403 and "lock" in answer["error"]
    assert await env.backend.list_locks(env.clock.seconds()) == []
    [denied] = await env.events("admin.denied")
    assert (denied.actor, denied.target, denied.fields["verb"]) == ("aud", "lock", "create")


@pytest_twisted.ensureDeferred
async def test_without_sign_in_401_and_garbage_ids_404(admin_env):
    env = admin_env
    response, _ = await env.call("GET", "/v1/admin/users")
    assert response.code == 401
    root = await env.login("root", "root-pw")
    assert (await api(env, "GET", "/v1/admin/users/nobody", root))[0] == 404
    assert (await api(env, "GET", "/v1/audit/events/" + "x" * 300, root))[0] == 404
    assert (await api(env, "DELETE", "/v1/admin/locks/zzzzzzzz", root))[0] == 404


@pytest_twisted.ensureDeferred
async def test_admin_invites_and_edits_a_user_through_the_cli_service(admin_env):
    """An invite answers a one-time link; the change is audited as root via the API and the
    proxy is nudged; roles that do not exist are refused (400) and nothing is created."""
    env = admin_env
    root = await env.login("root", "root-pw")
    code, answer = await api(env, "POST", "/v1/admin/users", root,
                             {"name": "carol", "roles": ["nosuch"]})
    assert code == 400 and "roles: role 'nosuch' does not exist" in answer["error"]
    assert await env.backend.get_user("carol") is None
    code, answer = await api(env, "POST", "/v1/admin/users", root,
                             {"name": "carol", "roles": ["dev"], "invite_ttl": "2h"})
    assert code == 201
    assert answer["invite_url"].startswith("https://apptunnel.localhost:3080/web/invite/")
    assert answer["user"]["password"] is False
    [created] = await env.events("user.create")
    assert (created.actor, created.target, created.fields["via"]) == ("root", "carol", "api")
    code, answer = await api(env, "PATCH", "/v1/admin/users/carol", root,
                             {"roles": ["dev", "auditor"]})
    assert code == 200 and answer["user"]["roles"] == ["dev", "auditor"]
    assert env.nudged
    code, answer = await api(env, "POST", "/v1/admin/users/carol/reset", root, {})
    assert code == 200 and "/web/reset/" in answer["reset_url"]
    assert (await api(env, "POST", "/v1/admin/users", root, {"name": "carol",
                                                              "roles": ["dev"]}))[0] == 409
    assert (await api(env, "DELETE", "/v1/admin/users/carol", root))[0] == 200
    assert await env.backend.get_user("carol") is None


@pytest_twisted.ensureDeferred
async def test_role_yaml_errors_come_back_with_the_key_path(admin_env):
    env = admin_env
    root = await env.login("root", "root-pw")
    bad = "kind: role\nmetadata: {name: ops}\nspec:\n  allow:\n    rules: [{resources: [events], verbs: [list]}]\n"
    code, answer = await api(env, "POST", "/v1/admin/roles", root, {"yaml": bad})
    assert code == 400
    assert answer["error"].startswith("spec.allow.rules[0].resources[0]: unknown resource")
    code, answer = await api(env, "POST", "/v1/admin/roles", root,
                             {"yaml": "kind: role\nmetadata: {name: ops\n"})
    assert code == 400 and "invalid YAML" in answer["error"]
    code, answer = await api(env, "POST", "/v1/admin/roles", root,
                             {"yaml": bad.replace("events", "event")})
    assert code == 201 and answer["name"] == "ops"
    code, answer = await api(env, "PUT", "/v1/admin/roles/ops", root,
                             {"yaml": bad.replace("events", "event").replace("ops", "other")})
    assert code == 400 and answer["error"].startswith("metadata.name:")
    [event] = await env.events("resource.create")
    assert (event.actor, event.target) == ("root", "role/ops")


@pytest_twisted.ensureDeferred
async def test_cross_site_changes_are_refused(admin_env):
    """A foreign Origin on a JSON change and a form post without our Origin: 403, no change."""
    env = admin_env
    root = await env.login("root", "root-pw")
    for method, path, body in (("POST", "/v1/admin/locks", {"user": "alice"}),
                               ("POST", "/v1/admin/users", {"name": "x", "roles": ["dev"]}),
                               ("PATCH", "/v1/admin/users/alice", {"roles": ["admin"]}),
                               ("DELETE", "/v1/admin/users/alice", None),
                               ("POST", "/v1/admin/roles", {"yaml": "kind: role"}),
                               ("DELETE", "/v1/admin/roles/dev", None)):
        code, _ = await api(env, method, path, root, body, origin="https://evil.example")
        assert code == 403, (method, path)
    for path, data in (("/web/admin/locks", {"user": "alice"}),
                       ("/web/admin/users", {"name": "x", "roles": "dev"}),
                       ("/web/admin/users/alice/delete", {}),
                       ("/web/admin/roles/dev", {"yaml": "x"})):
        for origin in ("https://evil.example", None):
            response, _ = await env.call("POST", path, cookie=root, data=data, origin=origin)
            assert response.code == 403, (path, origin)
    assert await env.backend.get_user("alice") is not None
    assert await env.backend.list_locks(env.clock.seconds()) == []


@pytest_twisted.ensureDeferred
async def test_pages_create_and_remove_a_lock_and_show_yaml_errors_inline(admin_env):
    env = admin_env
    root = await env.login("root", "root-pw")
    response, body = await env.call("POST", "/web/admin/locks", cookie=root,
                                    data={"user": "alice", "ttl": "1h", "message": "incident"})
    assert response.code == 200 and b"Locked user alice." in body
    [lock] = await env.backend.list_locks(env.clock.seconds())
    response, body = await env.call("POST", f"/web/admin/locks/{lock.id}/delete", cookie=root)
    assert response.code == 200 and b"Removed the lock on user alice." in body
    response, body = await env.call("POST", "/web/admin/roles/dev", cookie=root,
                                    data={"yaml": "kind: role\nmetadata: {name: dev}\n"
                                                  "spec: {allow: {app_labelz: {}}}\n"})
    assert response.code == 400
    assert b"spec.allow.app_labelz: unknown key" in body and b'aria-invalid="true"' in body
    response, body = await env.call("GET", "/web/admin", cookie=root)
    assert response.code == 302 and header(response, "location") == "/web/admin/apps"
    for section in ("apps", "agents", "users", "roles", "connectors", "locks"):
        response, body = await env.call("GET", f"/web/admin/{section}", cookie=root)
        assert response.code == 200, section
        assert b'href="/web/audit"' in body


@pytest_twisted.ensureDeferred
async def test_auditor_searches_filters_pages_and_reads_events(admin_env):
    env = admin_env
    for i in range(7):
        env.audit.emit("app.request", actor="alice" if i % 2 else "bob", target="grafana",
                       request_id=f"req-{i}")
        env.clock.advance(1)
    await env.audit.flush()
    aud = await env.login("aud", "aud-pw")
    code, answer = await api(env, "GET", "/v1/audit/events?type=app.request&user=alice&limit=2",
                             aud)
    assert code == 200 and [e["request_id"] for e in answer["events"]] == ["req-5", "req-3"]
    assert answer["next_offset"] == 2
    code, answer = await api(env, "GET", "/v1/audit/events?request_id=req-4", aud)
    [event] = answer["events"]
    code, one = await api(env, "GET", f"/v1/audit/events/{event['id']}", aud)
    assert code == 200 and one["user"] == "bob" and one["fields"]["request_id"] == "req-4"
    assert (await api(env, "GET", "/v1/audit/events?outcome=maybe", aud))[0] == 400
    response, body = await env.call("GET", "/web/audit?app=grafana&user=alice&limit=2",
                                    cookie=aud)
    assert response.code == 200 and b'rel="next"' in body and b"app.request" in body
    response, body = await env.call("GET", f"/web/audit/{event['id']}", cookie=aud)
    assert response.code == 200 and b"req-4" in body
    response, body = await env.call("GET", "/web/audit?since=yesterday", cookie=aud)
    assert response.code == 400 and b"since: expected a duration" in body


@pytest_twisted.ensureDeferred
async def test_a_role_taken_away_counts_at_once(admin_env):
    """The rules come from the roles the user holds now, not those of their session."""
    env = admin_env
    root = await env.login("root", "root-pw")
    assert (await api(env, "GET", "/v1/admin/users", root))[0] == 200
    user = await env.backend.get_user("root")
    await env.backend.update_user(User(user.name, user.password_hash, ("dev",), {},
                                       user.created))
    await env.users.refresh()
    env.web.context.access.forget()
    assert (await api(env, "GET", "/v1/admin/users", root))[0] == 403


@pytest_twisted.ensureDeferred
async def test_tokens_bots_app_resources_and_access_requests(admin_env):
    """Join tokens (secret once, revoked by hash prefix), bots, app resources as YAML and
    every user's access requests, each under its own rule."""
    env = admin_env
    root = await env.login("root", "root-pw")
    code, made = await api(env, "POST", "/v1/admin/tokens", root,
                           {"ttl": "2h", "uses": 2, "apps": ["grafana"],
                            "labels": {"env": "dev"}})
    assert code == 201 and made["token"] and made["ca_pin"] == env.ca.pin
    assert made["scope"] == {"apps": ["grafana"], "labels": {"env": "dev"}}
    code, listed = await api(env, "GET", "/v1/admin/tokens", root)
    assert [t["hash"] for t in listed["tokens"]] == [made["hash"]]
    assert made["token"] not in json.dumps(listed)
    for bad in ({"ttl": "31d"}, {"uses": 0}, {"apps": ["Bad_Name"]}, {"labels": ["x"]}):
        assert (await api(env, "POST", "/v1/admin/tokens", root, bad))[0] == 400, bad
    assert (await api(env, "DELETE", f"/v1/admin/tokens/{made['hash'][:8]}", root))[0] == 200
    code, bot = await api(env, "POST", "/v1/admin/bots", root, {"name": "ci", "roles": ["dev"]})
    assert code == 201 and bot["token"]
    assert (await api(env, "POST", "/v1/admin/bots", root, {"name": "ci",
                                                            "roles": ["dev"]}))[0] == 409
    code, bots = await api(env, "GET", "/v1/admin/bots", root)
    assert [b["principal"] for b in bots["bots"]] == ["bot:ci"]
    assert (await api(env, "DELETE", "/v1/admin/bots/ci", root))[0] == 200
    app_doc = ("kind: app\nmetadata: {name: docs, labels: {env: dev}}\n"
               "spec: {uri: 'http://127.0.0.1:8080'}\n")
    code, created = await api(env, "POST", "/v1/admin/app_resources", root, {"yaml": app_doc})
    assert code == 201 and created["name"] == "docs"
    code, answer = await api(env, "POST", "/v1/admin/app_resources", root,
                             {"yaml": app_doc.replace("docs", "other").replace("uri", "url")})
    assert code == 400 and "spec" in answer["error"]
    assert (await api(env, "DELETE", "/v1/admin/app_resources/docs", root))[0] == 200
    code, requests = await api(env, "GET", "/v1/admin/access_requests", root)
    assert code == 200 and requests == {"access_requests": []}
    await env.audit.flush()
    types = [e.type for e in await env.backend.search_audit()
             if e.fields.get("via") == "api"]
    assert types == ["token.create", "token.delete", "bot.create", "token.create",
                     "bot.delete", "resource.create", "resource.delete"]
    aud = await env.login("aud", "aud-pw")
    for path in ("/v1/admin/tokens", "/v1/admin/bots", "/v1/admin/app_resources",
                 "/v1/admin/access_requests"):
        assert (await api(env, "GET", path, aud))[0] == 403, path


@pytest_twisted.ensureDeferred
async def test_token_and_bot_pages_show_the_secret_once(admin_env):
    env = admin_env
    root = await env.login("root", "root-pw")
    response, body = await env.call("POST", "/web/admin/tokens", cookie=root,
                                    data={"ttl": "2h", "uses": "3", "apps": "grafana",
                                          "labels": "env=dev"})
    assert response.code == 200 and b'id="one-time-secret"' in body
    [token] = await env.backend.list_tokens()
    assert (token.uses_left, token.scope.apps, token.scope.labels) == (
        3, ("grafana",), (("env", "dev"),))
    response, body = await env.call("GET", "/web/admin/tokens", cookie=root)
    assert b"one-time-secret" not in body and token.token_hash[:12].encode() in body
    response, body = await env.call("POST", "/web/admin/tokens", cookie=root,
                                    data={"labels": "env"})
    assert response.code == 400 and b"labels: expected KEY=VALUE" in body
    response, _ = await env.call("POST", f"/web/admin/tokens/{token.token_hash[:12]}/delete",
                                 cookie=root)
    assert response.code == 200 and await env.backend.list_tokens() == []
    response, body = await env.call("POST", "/web/admin/bots", cookie=root,
                                    data={"name": "ci", "roles": "dev"})
    assert response.code == 200 and b'id="one-time-secret"' in body
    response, body = await env.call("POST", "/web/admin/bots/ci/delete", cookie=root)
    assert response.code == 200 and await env.backend.list_bots() == []
    for section in ("tokens", "bots", "app_resources"):
        response, _ = await env.call("GET", f"/web/admin/{section}", cookie=root)
        assert response.code == 200, section
    response, body = await env.call("GET", "/web/admin/app_resources/new", cookie=root)
    assert response.code == 200 and b"kind: app" in body


@pytest_twisted.ensureDeferred
async def test_header_links_only_for_users_whose_rules_allow_them(admin_env):
    """The header (web context nav hook) offers Admin and Audit by the user's rules."""
    env = admin_env
    seen = {}
    for user in ("root", "aud", "bob"):
        secret = await env.login(user, f"{user}-pw")
        response, body = await env.call("GET", "/web/account", cookie=secret)
        assert response.code == 200
        seen[user] = (b'href="/web/admin"' in body, b'href="/web/audit"' in body)
    assert seen == {"root": (True, True), "aud": (False, True), "bob": (False, False)}


@pytest_twisted.ensureDeferred
async def test_admin_lists_and_ends_a_users_sessions(admin_env):
    """session rules: list a user's web sessions and sign them out everywhere, at once."""
    env = admin_env
    root = await env.login("root", "root-pw")
    alice = await env.login()
    code, answer = await api(env, "GET", "/v1/admin/users/alice/sessions", root)
    assert code == 200 and len(answer["sessions"]) == 1
    assert alice not in json.dumps(answer)
    code, answer = await api(env, "DELETE", "/v1/admin/users/alice/sessions", root)
    assert code == 200 and answer == {"ended": 1}
    response, _ = await env.call("GET", "/web/account", cookie=alice)
    assert response.code in (302, 303, 401)
    [ended] = [e for e in await env.events("session.web.end") if e.fields.get("everywhere")]
    assert (ended.actor, ended.target, ended.fields["via"]) == ("root", "alice", "api")
    aud = await env.login("aud", "aud-pw")
    assert (await api(env, "DELETE", "/v1/admin/users/alice/sessions", aud))[0] == 403
    alice = await env.login()
    response, body = await env.call("POST", "/web/admin/users/alice/sessions/delete",
                                    cookie=root)
    assert response.code == 200 and b"Signed alice out everywhere (1 web sessions)." in body


@pytest_twisted.ensureDeferred
async def test_apps_and_agents_show_who_serves_what_and_locks(admin_env):
    """/v1/admin/apps: the registry's apps with their serving agents and online state;
    /v1/admin/agents: the stored agents, a locked one marked (as `agents ls` does)."""
    from apptunnel.backend.records import Agent, Lock, Scope

    env = admin_env
    now = env.clock.seconds()
    await env.backend.put_agent(Agent("agent-1", Scope(), now, now + 3600, last_seen=now,
                                      connected_since=now - 120, peer="10.0.0.5:4000",
                                      apps=("grafana", "wiki")))
    await env.backend.put_lock(Lock("l1", None, None, "", now, None, "root", "agent-1"))
    root = await env.login("root", "root-pw")
    code, answer = await api(env, "GET", "/v1/admin/apps", root)
    apps = {a["name"]: a for a in answer["apps"]}
    assert apps["grafana"]["agents"] == ["agent-1"] and apps["grafana"]["online"] is True
    assert apps["billing"]["agents"] == []
    code, answer = await api(env, "GET", "/v1/admin/agents", root)
    [agent] = answer["agents"]
    assert (agent["locked"], agent["state"], agent["tunnel_uptime"]) == (True, "connected", 120)
    response, body = await env.call("GET", "/web/admin/agents", cookie=root)
    assert b"10.0.0.5:4000" in body and b"locked" in body
