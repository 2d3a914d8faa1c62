"""The `apptunnel` command: admin verbs against a real SQLite backend, one-line errors."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import pytest_twisted
import yaml
from twisted.internet import reactor as wall_clock

from apptunnel.auth.ca import ClusterCA
from apptunnel.auth.passwords import verify_password
from apptunnel.auth.tokens import secret_hash
from apptunnel.cli.main import main
from apptunnel.cli.output import clean
from apptunnel.config import load_agent_config
from tests.support.cli_admin import (  # noqa: F401 - config_path is the proxy.yaml fixture
    ACCOUNT, REPO, Result, cli, config_path, one_error, stored,
)

ROLE_FILE = REPO / "etc" / "roles" / "sre-apps.yaml"


# -- tokens ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_tokens_add_prints_token_pin_and_a_join_snippet_that_loads(config_path, tmp_path):
    """tokens add prints the secret once, the CA pin and a join snippet agent.yaml accepts."""
    result = await cli(config_path, "tokens", "add", "--type", "app", "--ttl", "1h")
    assert result.code == 0, result
    token = result.out.split("Token:", 1)[1].split()[0]
    # The CA lives in the backend (auth/keystore.py); no CA file is made in data_dir.
    cas = await stored(config_path, lambda b: b.list_keys("ca"))
    pin = ClusterCA.from_pem("test-cluster", cas[0].material.encode(), cas[0].public.encode(),
                             wall_clock).pin
    assert not (tmp_path / "data" / "ca.key").exists()
    assert f"CA pin:  {pin}" in result.out
    assert "(in 1h)" in result.out
    snippet = result.out[result.out.index("join:"):]
    agent = tmp_path / "agent.yaml"
    agent.write_text("data_dir: agent\nproxy_addr: 127.0.0.1:3024\n" + snippet)
    config = load_agent_config(str(agent))
    assert (config.join_token, config.ca_pin) == (token, pin)

    tokens = await stored(config_path, lambda b: b.list_tokens())
    assert [t.token_hash for t in tokens] == [secret_hash(token)]
    assert tokens[0].kind == "app"
    assert 3590 < tokens[0].expires - tokens[0].created <= 3600
    database = (tmp_path / "data" / "apptunnel.db").read_bytes()
    assert token.encode() not in database


@pytest_twisted.ensureDeferred
async def test_tokens_add_json_ls_and_rm_by_hash_prefix(config_path):
    """JSON output has token/expires/ca_pin (and uses/scope); ls shows a hash prefix that
    rm accepts."""
    result = await cli(config_path, "tokens", "add", "--ttl", "15m", "--format", "json")
    assert result.code == 0, result
    data = json.loads(result.out)
    assert set(data) == {"token", "expires", "ca_pin", "uses_left", "scope"}
    assert data["uses_left"] == 1 and data["scope"] == {"apps": None, "labels": {}}
    assert data["ca_pin"].startswith("sha256:") and len(data["ca_pin"]) == 71
    prefix = secret_hash(data["token"])[:12]

    listing = await cli(config_path, "tokens", "ls")
    assert listing.code == 0 and prefix in listing.out and "valid 15m" in listing.out
    assert data["token"] not in listing.out

    removed = await cli(config_path, "tokens", "rm", prefix[:8])
    assert removed.code == 0 and prefix in removed.out
    assert await stored(config_path, lambda b: b.list_tokens()) == []
    assert "No join tokens." in (await cli(config_path, "tokens", "ls")).out


@pytest_twisted.ensureDeferred
async def test_tokens_add_scope_and_uses_shown_by_ls_json(config_path):
    """--apps, repeatable --labels and --uses are stored and listed; bad values are usage
    errors that store nothing."""
    result = await cli(config_path, "tokens", "add", "--apps", "a,b", "--labels", "team=x",
                       "--labels", "env=dev", "--uses", "3", "--format", "json")
    assert result.code == 0, result
    [listed] = json.loads((await cli(config_path, "tokens", "ls", "--format", "json")).out)
    assert listed["uses_left"] == 3
    assert listed["scope"] == {"apps": ["a", "b"], "labels": {"env": "dev", "team": "x"}}
    text = (await cli(config_path, "tokens", "ls")).out
    assert "apps a,b; labels env=dev,team=x" in text
    for bad in (["--uses", "0"], ["--uses", "x"], ["--apps", "Bad_Name"], ["--labels", "nokv"]):
        one_error(await cli(config_path, "tokens", "add", *bad), 2)
    assert len(await stored(config_path, lambda b: b.list_tokens())) == 1


@pytest_twisted.ensureDeferred
async def test_tokens_rm_by_secret_and_unknown_token(config_path):
    """rm accepts the secret itself; an unknown token is one error line and exit 1."""
    data = json.loads((await cli(config_path, "tokens", "add", "--format", "json")).out)
    assert (await cli(config_path, "tokens", "rm", data["token"])).code == 0
    assert "no join token matches" in one_error(await cli(config_path, "tokens", "rm", data["token"]), 1)
    assert "no join token matches" in one_error(await cli(config_path, "tokens", "rm", "abc"), 1)


@pytest_twisted.ensureDeferred
async def test_tokens_add_rejects_bad_ttl_and_type(config_path):
    """A bad --ttl or --type is a usage error (exit 2) and stores nothing."""
    assert "--ttl" in one_error(await cli(config_path, "tokens", "add", "--ttl", "soon"), 2)
    assert "--ttl" in one_error(await cli(config_path, "tokens", "add", "--ttl", "90d"), 2)
    assert "invalid choice" in one_error(await cli(config_path, "tokens", "add", "--type", "x"), 2)
    assert await stored(config_path, lambda b: b.list_tokens()) == []


# -- users -------------------------------------------------------------------------------


async def make_roles(config_path: str, *names: str) -> None:
    """Roles that users may name (issue 9: naming a role that does not exist is an error)."""
    path = Path(config_path).parent / "made-roles.yaml"
    path.write_text(yaml.safe_dump_all(
        [{"kind": "role", "metadata": {"name": name}, "spec": {"allow": {}}} for name in names]))
    made = await cli(config_path, "create", "-f", str(path), "--force")
    assert made.code == 0, made


@pytest_twisted.ensureDeferred
async def test_users_add_with_password_stdin_stores_a_verifying_hash(config_path):
    """users add --password-stdin stores an argon2id hash of exactly that password."""
    await make_roles(config_path, "sre-apps", "viewer")
    result = await cli(config_path, "users", "add", "alice", "--roles", "sre-apps,viewer",
                       "--traits", "logins=alice,root", "--traits", "team=sre",
                       "--password-stdin", stdin="correct horse\n")
    assert result.code == 0, result
    assert "correct horse" not in result.out + result.err
    user = await stored(config_path, lambda b: b.get_user("alice"))
    assert user.roles == ("sre-apps", "viewer")
    assert user.traits == {"logins": ("alice", "root"), "team": ("sre",)}
    assert user.password_hash.startswith("$argon2id$")
    assert verify_password(user.password_hash, "correct horse")
    assert not verify_password(user.password_hash, "correct horse\n")

    again = await cli(config_path, "users", "add", "alice", "--roles", "viewer", "--password-stdin",
                      stdin="another password")
    assert "already exists" in one_error(again, 1)

    listing = await cli(config_path, "users", "ls")
    assert "alice" in listing.out and "sre-apps,viewer" in listing.out
    assert "$argon2" not in listing.out


@pytest_twisted.ensureDeferred
async def test_users_add_without_password_prints_an_invite_link(config_path):
    """Issue 10: without --password-stdin the user gets no password but a one-time invite
    link (24 h by default) whose token is stored only as a hash."""
    await make_roles(config_path, "viewer")
    result = await cli(config_path, "users", "add", "bob", "--roles", "viewer")
    assert result.code == 0, result
    match = re.search(r"https://([^/]+)/web/invite/(\S+)", result.out)
    assert match, result.out
    assert "works once, for 1d" in result.out
    token = match.group(2)
    user = await stored(config_path, lambda b: b.get_user("bob"))
    assert user.password_hash is None
    link = await stored(config_path, lambda b: b.get_user_link(secret_hash(token)))
    assert link.user == "bob" and link.kind == "invite" and link.used is None
    assert 86390 < link.expires - link.created <= 86400


@pytest_twisted.ensureDeferred
async def test_users_reset_ends_password_and_sessions_and_prints_a_link(config_path):
    """users reset: the old password stops working and every session ends at once; the
    printed reset link (--ttl in seconds) replaces any earlier link."""
    await make_roles(config_path, "viewer")
    await cli(config_path, "users", "add", "dana", "--roles", "viewer", "--password-stdin",
              stdin="dana password")
    from apptunnel.backend.records import WebSession
    await stored(config_path, lambda b: b.put_web_session(
        WebSession("w", "dana", (), {}, 1.0, 9e12)))
    result = await cli(config_path, "users", "reset", "dana", "--ttl", "5s")
    assert result.code == 0, result
    token = re.search(r"/web/reset/(\S+)", result.out).group(1)
    user = await stored(config_path, lambda b: b.get_user("dana"))
    assert user.password_hash is None
    assert await stored(config_path, lambda b: b.get_web_session("w")) is None
    link = await stored(config_path, lambda b: b.get_user_link(secret_hash(token)))
    assert link.kind == "reset" and link.expires - link.created == 5.0
    bad = await cli(config_path, "users", "reset", "dana", "--ttl", "0s")
    assert bad.code == 2 and "--ttl" in bad.err


@pytest_twisted.ensureDeferred
async def test_users_set_password_update_and_rm(config_path):
    """set-password replaces the hash; update replaces roles/traits; rm deletes."""
    await make_roles(config_path, "a", "b", "c")
    await cli(config_path, "users", "add", "carol", "--roles", "a", "--password-stdin",
              stdin="first password")
    changed = await cli(config_path, "users", "set-password", "carol", "--password-stdin",
                        stdin="second password\r\n")
    assert changed.code == 0, changed
    user = await stored(config_path, lambda b: b.get_user("carol"))
    assert verify_password(user.password_hash, "second password")
    assert not verify_password(user.password_hash, "first password")

    updated = await cli(config_path, "users", "update", "carol", "--roles", "b,c",
                        "--traits", "env=dev")
    assert updated.code == 0, updated
    user2 = await stored(config_path, lambda b: b.get_user("carol"))
    assert (user2.roles, user2.traits) == (("b", "c"), {"env": ("dev",)})
    assert user2.password_hash == user.password_hash and user2.created == user.created

    assert "nothing to change" in one_error(await cli(config_path, "users", "update", "carol"), 2)
    assert (await cli(config_path, "users", "rm", "carol")).code == 0
    assert await stored(config_path, lambda b: b.get_user("carol")) is None
    assert "no user named 'carol'" in one_error(await cli(config_path, "users", "rm", "carol"), 1)


@pytest_twisted.ensureDeferred
async def test_users_naming_an_unknown_role_is_an_error(config_path, tmp_path):
    """users add/update and create -f refuse a role that does not exist (exit 2, naming
    it) and store nothing, as tctl does; a role created in the same file is fine."""
    line = one_error(await cli(config_path, "users", "add", "bob", "--roles", "no-such-role"), 2)
    assert "role 'no-such-role' does not exist" in line
    assert await stored(config_path, lambda b: b.get_user("bob")) is None

    await make_roles(config_path, "viewer")
    assert (await cli(config_path, "users", "add", "bob", "--roles", "viewer")).code == 0
    line = one_error(await cli(config_path, "users", "update", "bob", "--roles",
                               "viewer,typo-role"), 2)
    assert "role 'typo-role' does not exist" in line
    assert (await stored(config_path, lambda b: b.get_user("bob"))).roles == ("viewer",)

    path = tmp_path / "carol.yaml"
    path.write_text("kind: user\nmetadata: {name: carol}\nspec: {roles: [later]}\n")
    line = one_error(await cli(config_path, "create", "-f", str(path)), 2)
    assert "spec.roles: role 'later' does not exist" in line
    assert await stored(config_path, lambda b: b.get_user("carol")) is None
    path.write_text(path.read_text() + "---\nkind: role\nmetadata: {name: later}\nspec: {}\n")
    assert (await cli(config_path, "create", "-f", str(path))).code == 0


@pytest.mark.parametrize("argv,stdin,fragment", [
    (["users", "add", "dave", "--roles", "a", "--password-stdin"], "short\n", "shorter than 8"),
    (["users", "add", "dave", "--roles", "a", "--password-stdin"], "two\nlines\n", "single line"),
    (["users", "add", "dave", "--roles", " , ", "--password-stdin"], "long enough", "--roles"),
    (["users", "add", "-bad", "--roles", "a"], "", "required: NAME"),
    (["users", "add", "bad name", "--roles", "a"], "", "invalid user name"),
    (["users", "add", "dave", "--roles", "a", "--traits", "novalue"], "", "KEY=VALUE"),
    (["users", "add", "dave", "--roles", "bad role!"], "", "invalid role name"),
    (["users", "add", "dave"], "", "--roles"),
])
@pytest_twisted.ensureDeferred
async def test_users_add_bad_input_is_one_usage_line(config_path, argv, stdin, fragment):
    """Bad names, roles, traits or passwords: one error line, exit 2, no user stored."""
    await make_roles(config_path, "a")
    assert fragment in one_error(await cli(config_path, *argv, stdin=stdin), 2)
    assert await stored(config_path, lambda b: b.list_users()) == []


# -- create / get / rm -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_create_role_and_get_round_trip(config_path, tmp_path):
    """create -f stores the role; get roles prints YAML that create -f reads back as is."""
    created = await cli(config_path, "create", "-f", str(ROLE_FILE))
    assert created.code == 0 and "role 'sre-apps' created" in created.out, created
    original = yaml.safe_load(ROLE_FILE.read_text())

    got = await cli(config_path, "get", "roles")
    assert got.code == 0, got
    assert list(yaml.safe_load_all(got.out)) == [original]

    again = tmp_path / "again.yaml"
    again.write_text(got.out)
    refused = await cli(config_path, "create", "-f", str(again))
    assert "already exists (use --force" in one_error(refused, 1)
    replaced = await cli(config_path, "create", "-f", str(again), "--force")
    assert replaced.code == 0 and "replaced" in replaced.out

    single = json.loads((await cli(config_path, "get", "roles", "sre-apps", "--format", "json")).out)
    assert single == original
    text = await cli(config_path, "get", "roles", "--format", "text")
    assert "sre-apps" in text.out and "env=prod" in text.out
    assert "no role named 'nope'" in one_error(await cli(config_path, "get", "roles", "nope"), 1)


@pytest_twisted.ensureDeferred
async def test_every_example_role_file_is_accepted(config_path):
    """Each etc/roles/*.yaml example passes create -f and reads back unchanged."""
    files = sorted((REPO / "etc" / "roles").glob("*.yaml"))
    assert len(files) >= 2
    for path in files:
        assert (await cli(config_path, "create", "-f", str(path))).code == 0, path
    got = await cli(config_path, "get", "roles")
    by_name = {d["metadata"]["name"]: d for d in yaml.safe_load_all(got.out)}
    for path in files:
        doc = yaml.safe_load(path.read_text())
        assert by_name[doc["metadata"]["name"]] == doc


@pytest_twisted.ensureDeferred
async def test_bad_role_is_one_line_with_key_path_and_nothing_written(config_path, tmp_path):
    """A bad document names file, doc number and key path; no document of the file is stored."""
    path = tmp_path / "roles.yaml"
    path.write_text(
        "kind: role\nmetadata: {name: good}\nspec: {allow: {app_labels: {team: sre}}}\n"
        "---\n"
        "kind: role\nmetadata: {name: bad}\nspec: {allow: {app_labels: {env: 'dev*'}}}\n"
    )
    line = one_error(await cli(config_path, "create", "-f", str(path)), 2)
    assert line.startswith(f"apptunnel: error: {path}: doc 2: spec.allow.app_labels.env: ")
    assert await stored(config_path, lambda b: b.list_resources("role")) == []


@pytest.mark.parametrize("text,fragment", [
    ("kind: role\nmetadata: {name: r}\nspec: {alow: {}}\n", "doc 1: spec.alow: unknown key"),
    ("kind: rolle\nmetadata: {name: r}\n", "doc 1: kind: expected role, user, app or ldap, oidc, saml, got 'rolle'"),
    ("- just\n- a list\n", "doc 1: expected a mapping"),
    ("kind: role\nmetadata: {name: r}\nspec:\n  deny: {}\n  deny: {}\n", ":5: invalid YAML: duplicate key"),
    ("kind: role\nmetadata: {name: [r\n", "invalid YAML"),
    ("", "no documents"),
    ("kind: user\nmetadata: {name: u}\nspec: {roles: [a], password: x}\n",
     "doc 1: spec.password: unknown key"),
    ("kind: user\nmetadata: {name: u}\n---\nkind: user\nmetadata: {name: u}\n", "appears twice"),
])
@pytest_twisted.ensureDeferred
async def test_create_rejects_bad_files(config_path, tmp_path, text, fragment):
    """Every kind of bad resource file is one error line with exit 2."""
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    line = one_error(await cli(config_path, "create", "-f", str(path)), 2)
    assert str(path) in line and fragment in line


@pytest_twisted.ensureDeferred
async def test_create_missing_file(config_path, tmp_path):
    """create -f of a missing file names it in one line."""
    line = one_error(await cli(config_path, "create", "-f", str(tmp_path / "none.yaml")), 2)
    assert "none.yaml: cannot read file" in line


@pytest_twisted.ensureDeferred
async def test_create_user_documents_and_get_users(config_path, tmp_path):
    """kind: user documents create password-less users, and --force keeps a password."""
    await make_roles(config_path, "old", "new", "viewer")
    await cli(config_path, "users", "add", "erin", "--roles", "old", "--password-stdin",
              stdin="erin's password")
    path = tmp_path / "users.yaml"
    path.write_text(
        "kind: user\nmetadata: {name: frank}\nspec: {roles: [viewer], traits: {team: ops}}\n"
        "---\n"
        "kind: user\nmetadata: {name: erin}\nspec: {roles: [new]}\n"
    )
    result = await cli(config_path, "create", "-f", str(path), "--force")
    assert result.code == 0, result
    assert "user 'frank' has no password" in result.err
    frank = await stored(config_path, lambda b: b.get_user("frank"))
    assert (frank.password_hash, frank.roles, frank.traits) == (None, ("viewer",), {"team": ("ops",)})
    erin = await stored(config_path, lambda b: b.get_user("erin"))
    assert erin.roles == ("new",) and verify_password(erin.password_hash, "erin's password")

    docs = json.loads((await cli(config_path, "get", "users", "--format", "json")).out)
    assert docs == [
        {"kind": "user", "metadata": {"name": "erin"}, "spec": {"roles": ["new"], "traits": {}}},
        {"kind": "user", "metadata": {"name": "frank"},
         "spec": {"roles": ["viewer"], "traits": {"team": ["ops"]}}},
    ]
    assert "password" not in json.dumps(docs)


@pytest_twisted.ensureDeferred
async def test_rm_role_and_user(config_path):
    """rm role/NAME and rm user/NAME delete; a bad reference is a usage error."""
    await cli(config_path, "create", "-f", str(ROLE_FILE))
    await cli(config_path, "users", "add", "gina", "--roles", "sre-apps")
    removed = await cli(config_path, "rm", "role/sre-apps")
    assert removed.code == 0, removed
    assert "users still listing role 'sre-apps': gina" in removed.err
    assert await stored(config_path, lambda b: b.get_resource("role", "sre-apps")) is None
    assert (await cli(config_path, "rm", "user/gina")).code == 0
    assert "no role named" in one_error(await cli(config_path, "rm", "role/sre-apps"), 1)
    assert "expected role/NAME" in one_error(await cli(config_path, "rm", "sre-apps"), 2)
    assert "expected role/NAME" in one_error(await cli(config_path, "rm", "token/x"), 2)


@pytest_twisted.ensureDeferred
async def test_get_and_rm_accept_kind_slash_name_and_kind_name(config_path):
    """`rm role NAME` works like `get roles NAME` (issue 9): KIND/NAME or KIND NAME,
    singular or plural, in get and rm alike."""
    await make_roles(config_path, "r1", "r2", "r3")
    for ref in (["roles", "r1"], ["role", "r1"], ["role/r1"], ["roles/r1"]):
        got = await cli(config_path, "get", *ref, "--format", "json")
        assert got.code == 0 and json.loads(got.out)["metadata"]["name"] == "r1", (ref, got)
    await cli(config_path, "users", "add", "u1", "--roles", "r1")
    for ref in (["users", "u1"], ["user/u1"]):
        got = await cli(config_path, "get", *ref, "--format", "json")
        assert json.loads(got.out)["metadata"]["name"] == "u1", (ref, got)
    for ref, name in ((["role", "r1"], "r1"), (["roles", "r2"], "r2"), (["roles/r3"], "r3")):
        removed = await cli(config_path, "rm", *ref)
        assert removed.code == 0, (ref, removed)
        assert await stored(config_path, lambda b: b.get_resource("role", name)) is None
    assert (await cli(config_path, "rm", "user", "u1")).code == 0
    assert "not both" in one_error(await cli(config_path, "rm", "role/x", "y"), 2)
    assert "expected role/NAME" in one_error(await cli(config_path, "rm", "role"), 2)


# -- audit -------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_audit_search_filters_and_prints_iso_times(config_path):
    """--user, --app and --outcome filter (in storage); every time, in text and JSON,
    including an `expires` stored as epoch seconds, is ISO 8601 UTC."""
    from apptunnel.backend.records import AuditEvent

    now = time.time()
    events = [
        AuditEvent("e1", now - 30, "session.web.start", "T2000I", "bob", "", "success",
                   {"expires": now + 3600, "client": "127.0.0.1"}),
        AuditEvent("e2", now - 20, "app.request", "T2100I", "bob", "grafana", "success",
                   {"status": 200}),
        AuditEvent("e3", now - 10, "access.denied", "T2200W", "bob", "wiki", "failure", {}),
        AuditEvent("e4", now - 5, "app.request", "T2100I", "carol", "grafana", "success", {}),
    ]
    await stored(config_path, lambda b: b.append_audit(events))

    async def ids(*argv):
        result = await cli(config_path, "audit", "search", "--format", "json", *argv)
        assert result.code == 0, result
        return [e["id"] for e in json.loads(result.out)]

    assert await ids("--user", "bob") == ["e1", "e2", "e3"]
    assert await ids("--app", "grafana") == ["e2", "e4"]
    assert await ids("--user", "bob", "--outcome", "failure") == ["e3"]
    assert await ids("--user", "nobody") == []
    assert "invalid choice" in one_error(
        await cli(config_path, "audit", "search", "--outcome", "maybe"), 2)

    epoch = re.compile(r"\b1[0-9]{9}(\.[0-9]+)?\b")
    as_json = (await cli(config_path, "audit", "search", "--user", "bob", "--format", "json")).out
    assert not epoch.search(as_json), as_json
    first = json.loads(as_json)[0]
    assert first["time"].endswith("Z") and first["fields"]["expires"].endswith("Z")
    as_text = (await cli(config_path, "audit", "search", "--user", "bob")).out
    assert not epoch.search(as_text), as_text
    assert "expires=20" in as_text


@pytest_twisted.ensureDeferred
async def test_audit_search_shows_admin_events(config_path, tmp_path):
    """Every admin change is audited (actor = invoking user) and found by audit search."""
    token = json.loads((await cli(config_path, "tokens", "add", "--format", "json")).out)["token"]
    await cli(config_path, "tokens", "rm", token)
    await cli(config_path, "create", "-f", str(ROLE_FILE))
    await cli(config_path, "users", "add", "hank", "--roles", "sre-apps")
    await cli(config_path, "rm", "role/sre-apps")
    await cli(config_path, "rm", "user/hank")

    result = await cli(config_path, "audit", "search", "--since", "1h")
    assert result.code == 0, result
    lines = result.out.splitlines()
    assert [line.split()[1] for line in lines] == [
        "token.create", "token.delete", "resource.create", "user.create", "user.link.issue",
        "resource.delete", "user.delete",
    ]  # issue 9: the role exists before a user may name it; issue 10: an invite link
    assert lines[0].split()[2] == "T3000I" and lines[0].split()[3] == ACCOUNT  # not $USER (tester)
    assert "role/sre-apps" in lines[2] and "success" in lines[2]
    assert token not in result.out

    events = json.loads((await cli(config_path, "audit", "search", "--type", "user.create",
                                   "--format", "json")).out)
    assert [(e["type"], e["code"], e["target"]) for e in events] == [
        ("user.create", "T4000I", "hank")]
    limited = await cli(config_path, "audit", "search", "--limit", "2")
    assert len(limited.out.splitlines()) == 2 and "showing the first 2" in limited.err
    future = await cli(config_path, "audit", "search", "--since", "2999-01-01T00:00:00Z")
    assert future.out == "" and future.code == 0

    mirror = (tmp_path / "audit.jsonl").read_text()
    assert "token.create" in mirror and token not in mirror


@pytest.mark.parametrize("argv,fragment", [
    (["audit", "search", "--since", "yesterday"], "--since"),
    (["audit", "search", "--limit", "0"], "--limit"),
    (["audit", "search", "--since", "1h", "--until", "2h"], "before --until"),
    (["audit", "find"], "invalid choice"),
])
@pytest_twisted.ensureDeferred
async def test_audit_search_bad_arguments(config_path, argv, fragment):
    """Bad audit search arguments are one usage line, exit 2."""
    assert fragment in one_error(await cli(config_path, *argv), 2)


# -- main(): usage errors and the console script --------------------------------------------


def run_main(argv, capsys, monkeypatch, env=None) -> Result:
    """Call main() in-process the way the console script does; it always exits."""
    for key in ("APPTUNNEL_CONFIG",):
        monkeypatch.delenv(key, raising=False)
    for key, value in (env or {}).items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit) as info:
        main(argv)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    return Result(info.value.code, captured.out, captured.err)


def test_bare_apptunnel_prints_the_help(capsys, monkeypatch):
    """`apptunnel` alone prints the help on stdout (no argparse error line), exit 2."""
    for argv in ([], ["--config", "x.yaml"]):
        result = run_main(argv, capsys, monkeypatch)
        assert result.code == 2 and result.err == "", result
        assert result.out.startswith("usage: apptunnel") and "login" in result.out, result


@pytest.mark.parametrize("argv,fragment", [
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["tokens"], "required: ACTION"),
    (["tokens", "add", "--bogus"], "unrecognized arguments: --bogus"),
    (["get", "widgets"], "invalid choice: 'widgets'"),
    (["--config"], "expected one argument"),
])
def test_main_usage_errors_are_one_line_exit_2(argv, fragment, capsys, monkeypatch):
    """Bad arguments and unknown verbs give one stderr line and exit 2."""
    result = run_main(argv, capsys, monkeypatch)
    assert fragment in one_error(result, 2)
    assert result.out == ""


def test_main_missing_and_bad_config_exit_2(tmp_path, capsys, monkeypatch):
    """A missing or invalid config is one line naming the file, exit 2."""
    missing = str(tmp_path / "nope.yaml")
    line = one_error(run_main(["--config", missing, "tokens", "ls"], capsys, monkeypatch), 2)
    assert f"{missing}: cannot read file" in line
    bad = tmp_path / "bad.yaml"
    bad.write_text("data_dir: x\npublic_addr: h:1\nweb_listen_addr: abc\n")
    line = one_error(run_main(["tokens", "ls", "--config", str(bad)], capsys, monkeypatch), 2)
    assert line == f"apptunnel: error: {bad}:3: web_listen_addr: expected host:port, got 'abc'"
    line = one_error(run_main(["users", "ls"], capsys, monkeypatch,
                              env={"APPTUNNEL_CONFIG": missing}), 2)
    assert missing in line


def test_main_version_and_help(capsys, monkeypatch):
    """version prints one line; --help prints usage and exits 0."""
    result = run_main(["version"], capsys, monkeypatch)
    assert result.code == 0 and result.out.startswith("apptunnel ") and result.err == ""
    result = run_main(["--help"], capsys, monkeypatch)
    assert result.code == 0 and "tokens" in result.out and "audit" in result.out


def test_clean_escapes_control_characters():
    """Text from the network cannot put escape sequences on the operator's terminal."""
    assert clean("a\x1b[31mred\nline\x7f") == "a\\x1b[31mred\\nline\\x7f"


# -- the admin CLI's own audit chain (issue 13) -------------------------------------------


@pytest_twisted.ensureDeferred
async def test_cli_events_are_chained_and_verify_names_a_tampered_one(config_path):
    """Admin commands run against storage directly chain their events (chain `cli`,
    continued by each run); `audit verify` vouches for them, and names an altered CLI
    event by id and seq with exit 3."""
    import sqlite3

    from apptunnel.audit.chain import CLI_CHAIN

    for _ in range(3):
        assert (await cli(config_path, "tokens", "add", "--type", "app", "--ttl", "1h")).code == 0
    events = await stored(config_path, lambda b: b.audit_chain(CLI_CHAIN))
    assert [e.seq for e in events] == [1, 2, 3] and {e.type for e in events} == {"token.create"}
    assert events[1].prev == events[0].digest
    verified = await cli(config_path, "audit", "verify")
    assert verified.code == 0 and "admin CLI: 3 events, chain intact" in verified.out
    assert "unchained" not in verified.out

    data = yaml.safe_load(Path(config_path).read_text())["data_dir"]
    db = sqlite3.connect(str(Path(config_path).parent / data / "apptunnel.db"),
                         isolation_level=None)
    db.execute("UPDATE audit_events SET actor = 'someone-else' WHERE proxy_id = ? "
               "AND chain_seq = 2", (CLI_CHAIN,))
    db.close()
    broken = await cli(config_path, "audit", "verify")
    assert broken.code == 3
    assert f"altered: admin CLI event {events[1].id} seq 2" in broken.out, broken.out
    only = await cli(config_path, "audit", "verify", "--proxy", CLI_CHAIN)
    assert only.code == 3


@pytest_twisted.ensureDeferred
async def test_cli_runs_at_once_extend_one_chain_without_forking(config_path):
    """Four admin runs at once (each its own SQLite connection and thread, as four
    processes): their events land as seq 1..4 of the one CLI chain, which verifies."""
    from twisted.internet import defer

    from apptunnel.audit.chain import CLI_CHAIN

    assert (await cli(config_path, "tokens", "ls")).code == 0    # the file exists first
    runs = [defer.ensureDeferred(cli(config_path, "tokens", "add", "--type", "app",
                                     "--ttl", "1h")) for _ in range(4)]
    results = await defer.gatherResults(runs, consumeErrors=True)
    assert [r.code for r in results] == [0, 0, 0, 0]
    events = await stored(config_path, lambda b: b.audit_chain(CLI_CHAIN))
    assert sorted(e.seq for e in events) == [1, 2, 3, 4]
    verified = await cli(config_path, "audit", "verify")
    assert verified.code == 0 and "admin CLI: 4 events, chain intact" in verified.out
