"""`apptunnel request ...` and `login --request-id` refuse bad usage with one line and
exit 2 before talking to any proxy, and say "log in" without a saved login."""

from __future__ import annotations

import io

import pytest

from apptunnel.cli.context import Io
from apptunnel.cli.main import prepare


def run(argv, home):
    out, err = io.StringIO(), io.StringIO()
    streams = Io(stdin=io.StringIO(""), stdout=out, stderr=err,
                 environ={"APPTUNNEL_HOME": str(home), "USER": "tester"})
    code = prepare(argv, streams)
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("argv,code,message", [
    (["request", "create"], 2, "one of the arguments --roles --app is required"),
    (["request", "create", "--roles", "a", "--app", "b"], 2, "not allowed with argument"),
    (["request", "review", "0" * 32], 2, "one of the arguments --approve --deny"),
    (["request", "show", "../etc/passwd"], 1, "not logged in"),
    (["request", "ls"], 1, "not logged in"),
    (["login"], 2, "--proxy"),
    (["login", "--request-id", "0" * 32], 1, "not logged in"),
])
def test_bad_usage_is_one_line(tmp_path, argv, code, message):
    got, out, err = run(argv, tmp_path / "home")
    assert got == code, (out, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("apptunnel: error: "), err
    assert message in err.lower() or message in err


def test_request_ids_are_checked_before_any_call(tmp_path, monkeypatch):
    """A malformed id is a usage error even with a login (no request reaches the proxy)."""
    from apptunnel.cli import requests as verbs

    monkeypatch.setattr(verbs, "require_profile", lambda environ, now: object())
    code, _, err = run(["request", "show", "../etc/passwd"], tmp_path)
    assert code == 2 and "not an access request id" in err
