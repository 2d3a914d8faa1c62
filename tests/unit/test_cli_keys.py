"""`apptunnel auth rotate` and `apptunnel auth status` against a real SQLite backend."""

from __future__ import annotations

import json

import pytest_twisted

from tests.support.cli_admin import (  # noqa: F401 - config_path is the proxy.yaml fixture
    cli, config_path, one_error, stored,
)


@pytest_twisted.ensureDeferred
async def test_rotate_jwt_says_when_and_is_audited_and_shown_by_status(config_path):
    shown = await cli(config_path, "auth", "status", "--format", "json")
    assert shown.code == 0, shown
    before = json.loads(shown.out)
    assert sorted(k["kind"] for k in before) == ["ca", "host_ca", "jwt", "saml-sp", "user_ca"]
    [old] = [k["id"] for k in before if k["kind"] == "jwt"]
    done = await cli(config_path, "auth", "rotate", "--type", "jwt")
    assert done.code == 0, done
    assert "published in the JWKS of every proxy" in done.out
    assert "signs every new token" in done.out and f"old key {old} leaves the JWKS" in done.out
    after = json.loads((await cli(config_path, "auth", "ls", "--format", "json")).out)
    states = sorted((k["state"], k["id"] == old) for k in after if k["kind"] == "jwt")
    assert states == [("current", True), ("next", False)]
    assert all(k["encrypted"] is False for k in after)
    again = await cli(config_path, "auth", "rotate", "--type", "jwt")
    assert "a rotation is under way" in one_error(again, 1)
    events = await stored(config_path, lambda b: b.search_audit(type="auth.rotate"))
    assert [(e.outcome, e.code) for e in events] == [("success", "T5200I"),
                                                     ("failure", "T5200W")]
    assert events[0].fields["old_key"] == old


@pytest_twisted.ensureDeferred
async def test_user_ca_rotation_keeps_the_old_ca_for_the_grace_and_is_audited(config_path):
    """--type user-ca: a new CA next, the old one retiring after the grace; a grace under
    ca_min_grace_period and a second rotation during the grace are refused."""
    short = await cli(config_path, "auth", "rotate", "--type", "user-ca", "--grace-period", "30m")
    assert "--grace-period: must be at least 3600s" in one_error(short, 2)
    done = await cli(config_path, "auth", "rotate", "--type", "user-ca", "--format", "json")
    assert done.code == 0, done
    plan = json.loads(done.out)
    status = json.loads((await cli(config_path, "auth", "status", "--format", "json")).out)
    users = {k["id"]: k for k in status if k["kind"] == "user_ca"}
    assert users[plan["old_key"]]["state"] == "current"
    assert users[plan["old_key"]]["retire_at"] == plan["retire_at"]
    assert users[plan["new_key"]]["state"] == "next"
    # The host CA and the legacy kind are untouched.
    assert [k["id"] for k in status if k["kind"] == "host_ca"] == [plan["old_key"]]
    assert [k["id"] for k in status if k["kind"] == "ca"] == [plan["old_key"]]
    again = await cli(config_path, "auth", "rotate", "--type", "user-ca")
    assert "rotation is under way" in one_error(again, 1)
    jwt_grace = await cli(config_path, "auth", "rotate", "--type", "jwt", "--grace-period", "2h")
    assert "--grace-period: only for" in one_error(jwt_grace, 2)
    events = await stored(config_path, lambda b: b.search_audit(type="auth.rotate"))
    assert [(e.outcome, e.target) for e in events] == [("success", "user-ca"),
                                                       ("failure", "user-ca")]
    assert events[0].fields["new_key"] == plan["new_key"]


@pytest_twisted.ensureDeferred
async def test_host_ca_rotation_is_its_own_role(config_path):
    """--type host-ca rotates the host CA only; the user CA and the old pin stay."""
    done = await cli(config_path, "auth", "rotate", "--type", "host-ca", "--format", "json")
    assert done.code == 0, done
    plan = json.loads(done.out)
    status = json.loads((await cli(config_path, "auth", "status", "--format", "json")).out)
    assert sorted((k["id"] == plan["new_key"], k["state"]) for k in status
                  if k["kind"] == "host_ca") == [(False, "current"), (True, "next")]
    assert [k["id"] for k in status if k["kind"] == "user_ca"] == [plan["old_key"]]
    text = await cli(config_path, "auth", "rotate", "--type", "host-ca")
    assert "rotation is under way" in one_error(text, 1)
