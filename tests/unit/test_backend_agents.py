"""Join token uses and scopes, and agent records, in the SQLite backend (issue 8, finding 1)."""

from __future__ import annotations

import sqlite3

import pytest_twisted
from twisted.internet import defer, reactor

from apptunnel.auth.tokens import describe_scope, scope_refusal
from apptunnel.backend.records import Agent, JoinToken, Scope
from apptunnel.backend.sqlite import _MIGRATIONS, SqliteBackend
from tests.support.waiting import wait

SCOPE = Scope(apps=("a", "b"), labels=(("team", "x"),))


@pytest_twisted.async_yield_fixture
async def backend(tmp_path):
    b = SqliteBackend(str(tmp_path / "apptunnel.db"), reactor)
    yield b
    await wait(b.close())


def agent(host_id="h1", **kw) -> Agent:
    return Agent(host_id=host_id, scope=Scope(), joined=10.0, cert_expires=100.0,
                 key_pin="sha256:k", **kw)


@pytest_twisted.ensureDeferred
async def test_single_use_token_has_one_winner_among_concurrent_joins(backend):
    """Two joins racing for a single-use token: exactly one gets it, with the token's scope."""
    await wait(backend.add_token(JoinToken("t", "app", 1000.0, 1.0, uses_left=1, scope=SCOPE)))
    results = await wait(defer.gatherResults([
        defer.ensureDeferred(backend.redeem_token("t", 5.0, agent("h1"))),
        defer.ensureDeferred(backend.redeem_token("t", 5.0, agent("h2"))),
    ]))
    winners = [r for r in results if r is not None]
    assert len(winners) == 1 and winners[0].scope == SCOPE
    assert (await wait(backend.get_token("t"))).uses_left == 0
    assert [a.host_id for a in await wait(backend.list_agents())] == [winners[0].host_id]


@pytest_twisted.ensureDeferred
async def test_expired_unknown_and_unlimited_tokens(backend):
    """Expired or unknown tokens redeem nothing; a token without a limit keeps working."""
    await wait(backend.add_token(JoinToken("old", "app", 10.0, 1.0)))
    await wait(backend.add_token(JoinToken("open", "app", 1000.0, 1.0)))
    assert await wait(backend.redeem_token("old", 10.0, agent())) is None
    assert await wait(backend.redeem_token("nope", 5.0, agent())) is None
    for host in ("h1", "h2", "h3"):
        assert (await wait(backend.redeem_token("open", 5.0, agent(host)))).scope == Scope()
    assert (await wait(backend.get_token("open"))).uses_left is None


@pytest_twisted.ensureDeferred
async def test_agent_state_updates_and_only_proxy(backend):
    """Connection state is written per field; only_proxy leaves a row another proxy owns."""
    await wait(backend.put_agent(agent(proxy_id="p1")))
    assert await wait(backend.update_agent("h1", connected_since=20.0, apps=("a",), peer="x:1"))
    assert not await wait(backend.update_agent("h1", connected_since=None, only_proxy="p2"))
    stored = await wait(backend.get_agent("h1"))
    assert (stored.connected_since, stored.apps, stored.peer) == (20.0, ("a",), "x:1")
    assert not await wait(backend.update_agent("ghost", last_seen=1.0))


@pytest_twisted.ensureDeferred
async def test_version_2_database_keeps_its_tokens_unlimited(tmp_path):
    """A schema-2 file gains uses and scope; its old tokens stay unlimited in both."""
    path = str(tmp_path / "old.db")
    conn = sqlite3.connect(path)
    for statements in _MIGRATIONS[:2]:
        for statement in statements:
            conn.execute(statement)
    conn.execute("INSERT INTO join_tokens VALUES ('t', 'app', 1000.0, 1.0)")
    conn.execute("PRAGMA user_version = 2")
    conn.commit()
    conn.close()
    b = SqliteBackend(path, reactor)
    try:
        assert await wait(b.get_token("t")) == JoinToken("t", "app", 1000.0, 1.0, None, Scope())
        assert await wait(b.list_agents()) == []
    finally:
        await wait(b.close())


def test_scope_decisions():
    """Names and labels must both fit; the default scope allows anything."""
    assert scope_refusal(Scope(), "x", {}) is None
    assert scope_refusal(SCOPE, "a", {"team": "x", "env": "dev"}) is None
    assert "only apps a, b" in scope_refusal(SCOPE, "c", {"team": "x"})
    assert "team=x" in scope_refusal(SCOPE, "a", {"team": "y"})
    assert scope_refusal(Scope(labels=(("team", "x"),)), "any", {}) is not None
    assert describe_scope(SCOPE) == "apps a,b; labels team=x"
    assert describe_scope(Scope()) == "any app"
    assert Scope.from_json(SCOPE.to_json()) == SCOPE


def test_secrets_never_look_like_options(monkeypatch):
    """A token starting with '-' would be an unknown option to `tokens rm`: never made."""
    import secrets

    from apptunnel.auth import tokens

    made = iter(["-starts-with-dash", "fine-secret"])
    monkeypatch.setattr(secrets, "token_urlsafe", lambda n: next(made))
    assert tokens.new_secret() == "fine-secret"
