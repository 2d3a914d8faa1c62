"""The admin services (apptunnel/admin/) the CLI and the admin API share: validation,
storage, one audit event per change with the actor and the door, and the nudge."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet.task import Clock

from apptunnel.admin.audit import AuditQuery, AuditSearch
from apptunnel.admin.context import CONFLICT, NOT_FOUND, USAGE, Actor, AdminContext, AdminError
from apptunnel.admin.locks import LockAdmin
from apptunnel.admin.resources import HIDDEN, ResourceAdmin
from apptunnel.admin.users import UserAdmin
from apptunnel.backend.memory import MemoryBackend
from apptunnel.backend.records import AuditEvent, Resource, User

ROOT = Actor("root", "api")
CLI = Actor("ops", "cli", (("sudo_user", "alice"),))


class Recorder:
    """An audit log that keeps what was emitted."""

    def __init__(self) -> None:
        self.events = []
        self.nudges = []      # the admin context's nudges, counted here too

    def emit(self, type, **fields):
        self.events.append((type, fields))


@pytest_twisted.async_yield_fixture
async def ctx():
    clock = Clock()
    clock.advance(1_700_000_000)
    backend = MemoryBackend()
    await backend.put_resource(Resource("role", "dev", {"kind": "role",
                                                        "metadata": {"name": "dev"}}))
    audit = Recorder()

    async def nudge():
        audit.nudges.append(True)

    yield AdminContext(backend, audit, clock, "proxy.example:443", nudge)


async def fake_hash(password: str) -> str:
    return "hashed:" + password


@pytest_twisted.ensureDeferred
async def test_user_lifecycle_is_audited_with_actor_and_door(ctx):
    users = UserAdmin(ctx, fake_hash)
    user, link = await users.create(CLI, "carol", ("dev",), {"team": ["a"]}, None, 3600)
    assert link.url.startswith("https://proxy.example:443/web/invite/") and link.ttl == 3600
    assert user.password_hash is None
    await users.update(ROOT, "carol", None, {"team": ("b",)})
    _, reset = await users.reset(ROOT, "carol", 60)
    assert "/web/reset/" in reset.url
    await users.delete(ROOT, "carol")
    kinds = [(t, f["actor"], f["via"]) for t, f in ctx.audit.events]
    assert kinds == [("user.create", "ops", "cli"), ("user.link.issue", "ops", "cli"),
                     ("user.update", "root", "api"), ("user.update", "root", "api"),
                     ("user.link.issue", "root", "api"), ("user.delete", "root", "api")]
    assert ctx.audit.events[0][1]["sudo_user"] == "alice"
    assert len(ctx.audit.nudges) == 3


@pytest.mark.parametrize("name, roles, traits, kind, text", [
    ("-bad", ("dev",), {}, USAGE, "invalid user name '-bad'"),
    ("carol", (), {}, USAGE, "roles: give at least one role name"),
    ("carol", ("dev", "x y"), {}, USAGE, "roles: invalid role name 'x y'"),
    ("carol", ("ghost",), {}, USAGE, "roles: role 'ghost' does not exist"),
    ("carol", ("dev",), {"bad name": ["x"]}, USAGE, "traits: invalid trait name"),
    ("carol", ("dev",), {"t": []}, USAGE, "traits: t: give at least one value"),
    ("alice", ("dev",), {}, CONFLICT, "user 'alice' already exists"),
])
@pytest_twisted.ensureDeferred
async def test_bad_users_are_refused_and_nothing_changes(ctx, name, roles, traits, kind, text):
    await ctx.backend.create_user(User("alice", None, ("dev",), {}, 0.0))
    with pytest.raises(AdminError) as info:
        await UserAdmin(ctx, fake_hash).create(ROOT, name, roles, traits, None, 60)
    assert info.value.kind == kind and info.value.text().startswith(text), info.value.text()
    assert [u.name for u in await ctx.backend.list_users()] == ["alice"]
    assert ctx.audit.events == []


@pytest_twisted.ensureDeferred
async def test_passwords_only_through_links_where_no_hasher_is_given(ctx):
    with pytest.raises(AdminError):
        await UserAdmin(ctx).create(ROOT, "carol", ("dev",), {}, "a-password-here", None)


@pytest_twisted.ensureDeferred
async def test_locks_by_prefix_and_refusals(ctx):
    locks = LockAdmin(ctx)
    lock, warnings = await locks.create(ROOT, user="mallory", ttl=60, message="go away")
    assert warnings and "no local user 'mallory'" in warnings[0]
    assert lock.created_by == "root" and lock.expires == ctx.now() + 60
    for kwargs, text in (({}, "lock: give --user"), ({"user": "a b"}, "user: not a valid"),
                         ({"app": "UPPER"}, "app: not a valid"),
                         ({"agent": "x", "user": "a"}, "lock: --agent goes alone"),
                         ({"user": "a", "message": "\x1b[31m"}, "message: control"),
                         ({"user": "a", "ttl": -1}, "ttl: must be more than 0")):
        with pytest.raises(AdminError) as info:
            await locks.create(ROOT, **kwargs)
        assert info.value.text().startswith(text), info.value.text()
    with pytest.raises(AdminError) as info:
        await locks.remove(ROOT, lock.id[:3])     # too short a prefix
    assert info.value.kind == NOT_FOUND
    assert (await locks.remove(ROOT, lock.id[:8].upper())).id == lock.id
    assert [t for t, _ in ctx.audit.events] == ["lock.create", "lock.delete"]


ROLE = "kind: role\nmetadata: {name: ops}\nspec:\n  allow:\n    app_labels: {env: dev}\n"
OIDC = """kind: oidc
metadata: {name: corp}
spec:
  issuer_url: https://idp.example.com
  client_id: apptunnel
  client_secret: s3cret
  redirect_url: https://proxy.example/v1/webapi/oidc/callback
  claims_to_roles: [{claim: groups, value: admins, roles: [dev]}]
"""


@pytest_twisted.ensureDeferred
async def test_role_yaml_create_replace_and_errors(ctx):
    resources = ResourceAdmin(ctx)
    created = await resources.put_text(ROOT, "role", ROLE)
    assert created.name == "ops" and created.doc["spec"]["allow"]["app_labels"] == {"env": "dev"}
    for text, kind, start in ((ROLE, CONFLICT, "role 'ops' already exists"),
                              ("kind: role\nkind: role\n", USAGE, "role:"),
                              (ROLE + "---\n" + ROLE, USAGE, "expected exactly one"),
                              ("[1, 2]", USAGE, "role: expected a mapping"),
                              (ROLE.replace("env: dev", "env: 'a*'"), USAGE,
                               "spec.allow.app_labels.env:")):
        with pytest.raises(AdminError) as info:
            await resources.put_text(ROOT, "role", text)
        assert info.value.kind == kind and info.value.text().startswith(start), info.value.text()
    with pytest.raises(AdminError, match="no role named 'nope'"):
        await resources.put_text(ROOT, "role", ROLE.replace("ops", "nope"), "nope", replace=True)
    await resources.put_text(ROOT, "role", ROLE.replace("dev}", "prod}"), "ops", replace=True)
    assert (await resources.get("role", "ops")).doc["spec"]["allow"]["app_labels"] == {
        "env": "prod"}


@pytest_twisted.ensureDeferred
async def test_connector_secrets_are_hidden_and_kept(ctx):
    """A connector is shown with ****; saving what was shown keeps the stored secret."""
    resources = ResourceAdmin(ctx)
    stored = await resources.put_text(ROOT, "connector", OIDC)
    shown = ResourceAdmin.shown(stored)
    assert shown["spec"]["client_secret"] == HIDDEN
    await resources.put_text(ROOT, "connector", OIDC.replace("s3cret", f"'{HIDDEN}'"), "corp",
                             replace=True)
    assert (await resources.get("connector", "corp")).doc["spec"]["client_secret"] == "s3cret"
    with pytest.raises(AdminError, match="role 'ghost' does not exist"):
        await resources.put_text(ROOT, "connector", OIDC.replace("[dev]", "[ghost]"), "corp",
                                 replace=True)


@pytest_twisted.ensureDeferred
async def test_audit_query_from_fields(ctx):
    now = ctx.now()
    query = AuditQuery.from_fields({"since": "1h", "user": " alice ", "offset": "50",
                                    "limit": "", "type": ""}, now)
    assert (query.since, query.user, query.offset, query.type) == (now - 3600, "alice", 50, None)
    for fields, start in (({"outcome": "maybe"}, "outcome:"), ({"limit": "0"}, "limit:"),
                          ({"offset": "-1"}, "offset:"), ({"since": "soon"}, "since:"),
                          ({"since": "1h", "until": "2h"}, "since must be before"),
                          ({"user": "x" * 201}, "user: at most")):
        with pytest.raises(AdminError) as info:
            AuditQuery.from_fields(fields, now)
        assert info.value.text().startswith(start), info.value.text()
    await ctx.backend.append_audit([AuditEvent(f"e{i}", now + i, "app.request", "c", "alice",
                                               "wiki", "success", {}) for i in range(3)])
    events, more = await AuditSearch(ctx.backend).search(AuditQuery(limit=2))
    assert [e.id for e in events] == ["e2", "e1"] and more
    with pytest.raises(AdminError):
        await AuditSearch(ctx.backend).event("")


@pytest_twisted.ensureDeferred
async def test_the_web_revokes_tokens_by_hash_only(ctx):
    """A token's secret never has to travel in a URL: the web removes by hash prefix."""
    from apptunnel.admin.tokens import TokenAdmin

    tokens = TokenAdmin(ctx)
    secret, token = await tokens.create(ROOT, 3600, 1, ["wiki"], {"env": "dev"})
    with pytest.raises(AdminError):
        await tokens.remove(ROOT, secret, by_secret=False)
    assert (await tokens.remove(CLI, secret)).token_hash == token.token_hash
    with pytest.raises(AdminError, match="uses"):
        await tokens.create(ROOT, 3600, 0)
