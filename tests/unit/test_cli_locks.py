"""`apptunnel lock` and `apptunnel locks ls|rm`, in-process against a real SQLite backend."""

from __future__ import annotations

import json

import pytest
import pytest_twisted

from tests.support.cli_admin import ACCOUNT, cli, one_error, stored


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


async def audit_of(config: str, type: str) -> list:
    return await stored(config, lambda b: b.search_audit(type=type))


@pytest_twisted.ensureDeferred
async def test_lock_user_prints_id_stores_the_lock_and_audits(config_path):
    """lock --user prints the id first, stores user/message/ttl/actor, audits lock.create."""
    result = await cli(config_path, "lock", "--user", "alice", "--ttl", "1h",
                       "--message", "incident 42")
    assert result.code == 0, result
    lock_id = result.out.splitlines()[0]
    assert "Locked user alice, expires" in result.out and "(in 1h)" in result.out
    assert "no local user 'alice'" in result.err      # a warning, not an error
    (lock,) = await stored(config_path, lambda b: b.list_locks(0.0))
    assert (lock.id, lock.user, lock.app, lock.message, lock.created_by) == (
        lock_id, "alice", None, "incident 42", ACCOUNT)
    assert lock.expires - lock.created == pytest.approx(3600)
    (event,) = await audit_of(config_path, "lock.create")
    assert (event.code, event.actor, event.target) == ("T6000I", ACCOUNT, lock_id)
    assert event.fields["user"] == "alice" and event.fields["via"] == "cli"


@pytest_twisted.ensureDeferred
async def test_lock_app_and_pair_without_ttl_last_until_removed(config_path):
    """--app alone and --user with --app store locks with no expiry; JSON shows them."""
    first = await cli(config_path, "lock", "--app", "grafana", "--format", "json")
    assert first.code == 0, first
    data = json.loads(first.out)
    assert (data["user"], data["app"], data["expires"]) == (None, "grafana", None)
    pair = await cli(config_path, "lock", "--user", "bob", "--app", "wiki")
    assert pair.code == 0 and "user bob on app wiki, until removed" in pair.out
    listing = await cli(config_path, "locks", "ls", "--format", "json")
    assert [(x["user"], x["app"]) for x in json.loads(listing.out)] == [
        (None, "grafana"), ("bob", "wiki")]
    text = await cli(config_path, "locks", "ls")
    assert text.code == 0 and "grafana" in text.out and "never" in text.out
    assert text.out.splitlines()[0].split() == ["ID", "USER", "APP", "EXPIRES", "BY", "MESSAGE"]


@pytest_twisted.ensureDeferred
async def test_locks_rm_by_id_or_prefix_and_audits(config_path):
    """locks rm takes the id or a 6+ character prefix, removes it and audits lock.delete."""
    first = (await cli(config_path, "lock", "--user", "alice")).out.splitlines()[0]
    second = (await cli(config_path, "lock", "--app", "grafana")).out.splitlines()[0]
    removed = await cli(config_path, "locks", "rm", first)
    assert removed.code == 0 and f"Removed lock {first}" in removed.out
    assert (await cli(config_path, "locks", "rm", second[:8])).code == 0
    assert await stored(config_path, lambda b: b.list_locks(0.0)) == []
    assert (await cli(config_path, "locks", "ls")).out == "No locks.\n"
    events = await audit_of(config_path, "lock.delete")
    assert [(e.code, e.target) for e in events] == [("T6001I", first), ("T6001I", second)]
    assert "no lock in force matches" in one_error(await cli(config_path, "locks", "rm", first), 1)


@pytest.mark.parametrize("argv, fragment", [
    (["lock"], "give --user NAME, --app NAME, or both"),
    (["lock", "--app", "Bad_App"], "--app: not a valid app name"),
    (["lock", "--user", "-x y"], "--user: not a valid user name"),
    (["lock", "--user", "alice", "--ttl", "soon"], "--ttl:"),
    (["lock", "--user", "alice", "--ttl", "0s"], "--ttl: must be more than 0"),
    (["lock", "--user", "alice", "--message", "x" * 501], "--message: at most 500"),
    (["lock", "--user", "alice", "--message", "a\x1b[2Jb"], "control characters"),
    (["locks"], "required"),
    (["locks", "rm"], "required"),
])
@pytest_twisted.ensureDeferred
async def test_bad_arguments_are_one_line_and_exit_2(config_path, argv, fragment):
    """Every malformed lock command is one error line, exit 2, and stores nothing."""
    line = one_error(await cli(config_path, *argv), 2)
    assert fragment in line
    assert await stored(config_path, lambda b: b.list_locks(0.0)) == []
