"""The user's CLI against a real proxy and agent: login with the pin, status, apps ls, logout.

The commands are the installed ones, run as subprocesses with ``APPTUNNEL_HOME`` in a temp
dir. Tests run in file order and share one cluster.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
import time

import pytest

from tests.support.cli_user import ca_pin, user_env
from tests.support.cluster import BIN, Cluster, audit, free_port, wait_until
from tests.support.upstream import HttpUpstream

PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="module")
def upstream():
    http = HttpUpstream()
    yield http
    http.stop()


@pytest.fixture(scope="module")
def cluster(upstream):
    apps = [
        {"name": "hello", "uri": upstream.uri, "labels": {"team": "sre", "env": "staging"}},
        {"name": "prod-db", "uri": upstream.uri, "labels": {"team": "sre", "env": "prod"}},
    ]
    c = Cluster(apps)
    try:
        c.start_proxy()
        c.add_role({
            "kind": "role", "metadata": {"name": "sre-apps"},
            "spec": {"options": {"max_session_ttl": "2h"},
                     "allow": {"app_labels": {"team": "sre"}},
                     "deny": {"app_labels": {"env": "prod"}}},
        })
        c.add_user("alice", ["sre-apps"], PASSWORD, traits=["logins=alice,root"])
        c.start_agent()
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("user") / ".apptunnel"


@pytest.fixture(scope="module")
def pin(cluster):
    return ca_pin(cluster)


def user(home, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """`apptunnel ARGS` as the user runs it: no --config, profile in `home`."""
    return subprocess.run([str(BIN / "apptunnel"), *args], input=stdin, capture_output=True,
                          text=True, timeout=60, env=user_env(home), cwd=str(home.parent))


def login(cluster, home, *extra: str, password: str = PASSWORD) -> subprocess.CompletedProcess:
    return user(home, "login", "--proxy", cluster.public_addr, "--user", "alice",
                "--password-stdin", *extra, stdin=password + "\n")


def test_wrong_pin_is_refused_before_the_password(cluster, home):
    """A pin of some other CA stops login before the password is sent; no profile is saved."""
    result = login(cluster, home, "--ca-pin", "sha256:" + "ab" * 32)
    assert result.returncode == 1
    assert result.stderr.startswith(f"apptunnel: error: refusing the proxy at {cluster.public_addr}")
    assert "the password was not sent" in result.stderr and "Traceback" not in result.stderr
    assert not (home / "profile.json").exists()


def test_bad_password(cluster, home, pin):
    """A wrong password is one line and exit 1."""
    result = login(cluster, home, "--ca-pin", pin, password="not it")
    assert result.returncode == 1
    assert result.stderr == (f"apptunnel: error: login to {cluster.public_addr} failed: "
                             "invalid username or password\n")


def test_login_with_pin(cluster, home, pin):
    """login --ca-pin gets a certificate; the proxy audits cert.issue, and only our logins."""
    result = login(cluster, home, "--ca-pin", pin)
    assert result.returncode == 0, result.stderr
    assert "logged in to" in result.stdout and "alice" in result.stdout
    assert oct(os.stat(home / "user.key").st_mode & 0o777) == "0o600"
    events = wait_until(lambda: audit(cluster, "cert.issue"), 15, "the cert.issue event")
    assert events[0]["code"] == "T5000I" and events[0]["actor"] == "alice"
    logins = audit(cluster, "user.login")
    # the wrong-pin attempt never reached the proxy: one failure (bad password), one success
    assert sorted(e["outcome"] for e in logins) == ["failure", "success"]


def test_status(cluster, home):
    """status shows user, proxy, roles, traits and expiry; JSON carries the same facts."""
    result = user(home, "status")
    assert result.returncode == 0, result.stderr
    assert "Logged in as: alice" in result.stdout
    assert f"Proxy:        {cluster.public_addr}" in result.stdout
    assert "Roles:        sre-apps" in result.stdout
    assert "Traits:       logins=alice,root" in result.stdout
    data = json.loads(user(home, "status", "--format", "json").stdout)
    assert data["user"] == "alice" and data["expired"] is False
    # capped by the role's max_session_ttl (2h), not the proxy's 12h default
    # an ISO time like every time the CLI prints (issue 9), not epoch seconds
    expires = datetime.datetime.fromisoformat(data["expires"].replace("Z", "+00:00"))
    assert expires.timestamp() - time.time() == pytest.approx(7200, abs=120)


def test_apps_ls_with_the_certificate(cluster, home):
    """apps ls authenticates with the user cert through the real edge and lists allowed apps."""

    def listed():
        result = user(home, "apps", "ls", "--format", "json")
        assert result.returncode == 0, result.stderr
        apps = json.loads(result.stdout)["apps"]
        return apps if apps and all(app["online"] for app in apps) else None

    apps = wait_until(listed, 30, "the agent to register hello")
    assert apps == [{
        "name": "hello", "type": "http", "labels": {"team": "sre", "env": "staging"},
        "public_addr": f"hello.{cluster.public_addr}", "online": True, "description": "", "requestable": False,
    }]
    text = user(home, "apps", "ls")
    assert text.returncode == 0
    assert text.stdout.splitlines()[1].split() == [
        "hello", "http", "env=staging,team=sre", f"hello.{cluster.public_addr}", "online"]


def test_expired_certificate(cluster, home, pin):
    """A certificate asked for 2 s is expired 3 s later: status and apps ls say log in again."""
    result = login(cluster, home, "--ca-pin", pin, "--ttl", "2s")
    assert result.returncode == 0, result.stderr
    time.sleep(3)
    status = user(home, "status")
    assert status.returncode == 1 and "expired: run apptunnel login" in status.stdout
    listed = user(home, "apps", "ls")
    assert listed.returncode == 1
    assert listed.stderr.startswith("apptunnel: error: ") and "run apptunnel login" in listed.stderr


def test_logout(cluster, home):
    """logout removes the profile; afterwards the user is told to log in."""
    result = user(home, "logout")
    assert result.returncode == 0 and "logged out" in result.stdout
    assert not (home / "user.key").exists()
    status = user(home, "status")
    assert status.returncode == 1
    assert status.stderr == "apptunnel: error: not logged in: run apptunnel login\n"


def test_unreachable_proxy(home):
    """A proxy that is not listening is one 'cannot reach' line."""
    result = user(home, "login", "--proxy", f"apptunnel.localhost:{free_port()}",
                  "--user", "alice", "--password-stdin", "--ca-pin", "sha256:" + "ab" * 32,
                  stdin="x\n")
    assert result.returncode == 1
    assert result.stderr.startswith("apptunnel: error: cannot reach the proxy at")


def test_login_without_pin_names_ca_pin_and_where_it_is(cluster, tmp_path):
    """Against the cluster's own CA without --ca-pin: one line naming --ca-pin and where
    the pin is shown, not a cut-off `certificate verify failed (_ssl.c:1006`."""
    result = user(tmp_path / ".apptunnel", "login", "--proxy", cluster.public_addr,
                  "--user", "alice", "--password-stdin", stdin=PASSWORD + "\n")
    assert result.returncode == 1, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("apptunnel: error: "), result.stderr
    assert "certificate verify failed" in lines[0] and "_ssl.c" not in lines[0]
    assert "--ca-pin" in lines[0] and "CA pin" in lines[0] and "make demo" in lines[0]
    # the pin the hint points at really is in the proxy's start-up line
    assert "CA pin sha256:" in cluster.proxy.log_path.read_text()


def test_login_without_terminal_and_without_stdin_password(cluster, tmp_path):
    """No tty, nothing on stdin, no --password-stdin: one clear line, exit 2, no
    GetPassWarning and nothing sent."""
    result = subprocess.run(
        [str(BIN / "apptunnel"), "login", "--proxy", cluster.public_addr, "--user", "alice"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
        env=user_env(tmp_path / ".apptunnel"), start_new_session=True)  # no controlling tty
    assert result.returncode == 2, result
    assert "GetPassWarning" not in result.stderr and "Warning" not in result.stderr
    assert result.stderr.splitlines() == [result.stderr.strip()]
    assert "--password-stdin" in result.stderr and "no terminal" in result.stderr


def test_audit_search_by_user_app_and_outcome(cluster):
    """audit search --user/--app/--outcome against the real proxy's store; ISO times only."""
    def alices_failures():
        return json.loads(cluster.cli("audit", "search", "--user", "alice", "--outcome",
                                      "failure", "--format", "json").stdout)
    failures = wait_until(alices_failures, 15, "alice's failed login in the audit log")
    assert failures and {e["actor"] for e in failures} == {"alice"}
    assert {e["outcome"] for e in failures} == {"failure"}
    everything = cluster.cli("audit", "search", "--format", "json").stdout
    assert not re.search(r"\b1[0-9]{9}(\.[0-9]+)?\b", everything), everything
    text = cluster.cli("audit", "search", "--user", "alice").stdout
    assert text and all(line.split()[3] == "alice" for line in text.splitlines())
    assert not re.search(r"\b1[0-9]{9}(\.[0-9]+)?\b", text), text
    for app_event in json.loads(cluster.cli("audit", "search", "--app", "hello",
                                            "--format", "json").stdout):
        assert app_event["target"] == "hello"
