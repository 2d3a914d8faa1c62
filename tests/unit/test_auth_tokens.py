"""Join token scopes and secrets (issue 8, finding 1): the decisions, without storage.
The stored side (uses, atomic redemption) is in test_backend_contract.py."""

from __future__ import annotations

from apptunnel.auth.tokens import describe_scope, scope_refusal
from apptunnel.backend.records import Scope

SCOPE = Scope(apps=("a", "b"), labels=(("team", "x"),))


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
