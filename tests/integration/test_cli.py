"""The `apptunnel` command as a real process (python -m apptunnel.cli.main): exit statuses
and one-line errors. (The verbs in-process: tests/unit/test_cli.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from apptunnel.auth.tokens import secret_hash
from tests.support.cli_admin import (  # noqa: F401 - config_path is the proxy.yaml fixture
    REPO, TIMEOUT, Result, config_path, one_error,
)


def subprocess_cli(config: str, *argv: str, stdin: str = "") -> Result:
    env = {k: v for k, v in os.environ.items() if k != "APPTUNNEL_CONFIG"}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run(
        [sys.executable, "-m", "apptunnel.cli.main", "--config", config, *argv],
        input=stdin, capture_output=True, text=True, timeout=TIMEOUT, cwd=REPO, env=env,
    )
    result = Result(proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in result.out + result.err
    return result


def test_subprocess_tokens_users_and_audit(config_path):
    """The real process: tokens add/ls, users add from stdin, audit search, exit statuses."""
    token = json.loads(subprocess_cli(config_path, "tokens", "add", "--format", "json").out)
    assert set(token) >= {"token", "expires", "ca_pin"}
    listing = subprocess_cli(config_path, "tokens", "ls")
    assert listing.code == 0 and secret_hash(token["token"])[:12] in listing.out
    role = Path(config_path).parent / "viewer.yaml"
    role.write_text("kind: role\nmetadata: {name: viewer}\nspec: {allow: {}}\n")
    assert subprocess_cli(config_path, "create", "-f", str(role)).code == 0
    added = subprocess_cli(config_path, "users", "add", "ivy", "--roles", "viewer",
                           "--password-stdin", stdin="ivy's password\n")
    assert added.code == 0, added
    audit = subprocess_cli(config_path, "audit", "search")
    assert " token.create " in audit.out and " user.create " in audit.out
    assert audit.code == 0


def test_subprocess_errors_are_one_line(config_path, tmp_path):
    """The real process exits 2 with one line for a bad verb and a missing config."""
    bad_verb = subprocess_cli(config_path, "bogus")
    assert "invalid choice: 'bogus'" in one_error(bad_verb, 2)
    missing = subprocess_cli(str(tmp_path / "missing.yaml"), "users", "ls")
    assert "cannot read file" in one_error(missing, 2)
    gone = subprocess_cli(config_path, "users", "rm", "nobody")
    assert "no user named 'nobody'" in one_error(gone, 1)



def test_unknown_role_is_an_error_in_the_real_process(config_path):
    """`users add --roles no-such-role` exits 2 naming the role (as tctl does)."""
    real = subprocess_cli(config_path, "users", "add", "dave", "--roles", "no-such-role")
    assert "role 'no-such-role' does not exist" in one_error(real, 2)
