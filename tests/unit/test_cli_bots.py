"""`apptunnel bots add|ls|rm`, `lock --bot` and `tokens add --type bot`, in-process
against a real SQLite backend."""

from __future__ import annotations

import json

import pytest
import pytest_twisted

from apptunnel.auth.tokens import secret_hash
from apptunnel.backend.records import Resource
from tests.support.cli_admin import cli, one_error, stored


@pytest.fixture
def config_path(tmp_path) -> str:
    path = tmp_path / "proxy.yaml"
    path.write_text(
        "cluster_name: test-cluster\n"
        "data_dir: data\n"
        "public_addr: apptunnel.localhost:3080\n"
        "web_listen_addr: 127.0.0.1:0\n"
        "tunnel_listen_addr: 127.0.0.1:3024\n"
    )
    return str(path)


async def with_role(config: str, name: str = "ci-apps") -> None:
    await stored(config, lambda b: b.put_resource(Resource("role", name, {
        "kind": "role", "metadata": {"name": name}, "spec": {"allow": {}}})))


@pytest_twisted.ensureDeferred
async def test_bots_add_prints_a_one_time_bot_token_and_the_pin(config_path):
    """The token is stored hashed, kind bot, one use, naming the bot; text output has the
    bot.yaml lines; bot.create and token.create are audited."""
    await with_role(config_path)
    result = await cli(config_path, "bots", "add", "ci", "--roles", "ci-apps", "--format",
                       "json")
    assert result.code == 0, result
    data = json.loads(result.out)
    assert data["name"] == "ci" and data["ca_pin"].startswith("sha256:")
    token = await stored(config_path, lambda b: b.get_token(secret_hash(data["token"])))
    assert (token.kind, token.uses_left, token.bot) == ("bot", 1, "ci")
    bot = await stored(config_path, lambda b: b.get_bot("ci"))
    assert bot.roles == ("ci-apps",) and bot.cert_expires is None
    events = await stored(config_path, lambda b: b.search_audit(type="bot.create"))
    assert [e.target for e in events] == ["bot:ci"]
    text = await cli(config_path, "bots", "add", "other", "--roles", "ci-apps")
    assert "join:\n  token: " in text.out and "proxy_addr: apptunnel.localhost:3080" in text.out
    again = await cli(config_path, "bots", "add", "ci", "--roles", "ci-apps")
    assert "already exists" in one_error(again, 1)


@pytest.mark.parametrize("argv, code, words", [
    (("bots", "add", "ci", "--roles", "missing"), 2, "does not exist"),
    (("bots", "add", "Bad:Name", "--roles", "ci-apps"), 2, "not a valid bot name"),
    (("bots", "add", "ci", "--roles", "ci-apps", "--ttl", "90d"), 2, "--ttl"),
    (("bots", "rm", "nobody"), 1, "no bot named"),
    (("tokens", "add", "--type", "bot"), 2, "bots add"),
    (("lock", "--bot", "ci", "--user", "alice"), 2, "--bot goes alone"),
    (("lock", "--bot", "x y"), 2, "not a valid bot name"),
])
@pytest_twisted.ensureDeferred
async def test_refusals_are_one_line(config_path, argv, code, words):
    await with_role(config_path)
    assert words in one_error(await cli(config_path, *argv), code)


@pytest_twisted.ensureDeferred
async def test_ls_rm_and_lock(config_path):
    """bots ls lists it (json and text); lock --bot locks bot:NAME; bots rm removes the
    bot and its unused token."""
    await with_role(config_path)
    data = json.loads((await cli(config_path, "bots", "add", "ci", "--roles", "ci-apps",
                                 "--format", "json")).out)
    listed = json.loads((await cli(config_path, "bots", "ls", "--format", "json")).out)
    assert [(b["name"], b["principal"], b["roles"], b["joined"]) for b in listed] == [
        ("ci", "bot:ci", ["ci-apps"], False)]
    assert "not joined" in (await cli(config_path, "bots", "ls")).out
    locked = await cli(config_path, "lock", "--bot", "ci", "--format", "json")
    assert locked.code == 0 and json.loads(locked.out)["user"] == "bot:ci"
    removed = await cli(config_path, "bots", "rm", "ci", "--format", "json")
    assert removed.code == 0 and json.loads(removed.out) == {"name": "ci", "removed": True}
    assert await stored(config_path, lambda b: b.get_token(secret_hash(data["token"]))) is None
    assert "No bots." in (await cli(config_path, "bots", "ls")).out


@pytest_twisted.ensureDeferred
async def test_no_user_can_be_named_like_a_bot(config_path):
    """bot:NAME is a bot's principal only: `users add bot:ci` is refused."""
    await with_role(config_path)
    result = await cli(config_path, "users", "add", "bot:ci", "--roles", "ci-apps",
                       "--password-stdin", stdin="correct horse battery staple\n")
    assert result.code == 2, result
