"""The user's CLI verbs (login, status, logout, apps ls) against an in-process TLS web app."""

from __future__ import annotations

import json
import os
import stat

import pytest
import pytest_twisted
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet import reactor as wall_clock

from apptunnel.auth.ca import ClusterCA
from apptunnel.cli.output import iso
from apptunnel.cli.profile import TRUST_PINNED, Profile, home_dir
from tests.support.cli_in_process import cli, login, serve
from tests.support.cluster import free_port
from tests.support.keys import key_pair
from tests.support.waiting import in_thread


@pytest.fixture
def env(web_env):
    """The tests here run against the shared web app environment."""
    return web_env


@pytest_twisted.ensureDeferred
async def test_login_with_pin_saves_a_private_profile(env, home):
    """login --ca-pin stores key (0600), cert and CA in a 0700 APPTUNNEL_HOME."""
    port, proxy = await serve(env)
    try:
        run = await login(env, home, proxy, "--ca-pin", env.ca.pin)
    finally:
        await port.stopListening()
    assert run.code == 0, run.err
    assert "logged in to" in run.out and "alice" in run.out and run.err == ""
    assert stat.S_IMODE(os.stat(home).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(home / "user.key").st_mode) == 0o600
    profile = Profile.load(str(home))
    assert profile.user == "alice" and profile.trust == TRUST_PINNED
    assert profile.ca_pem == env.ca.cert_pem and profile.proxy == proxy
    key = serialization.load_pem_private_key(profile.key_pem, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    assert profile.cert.public_key().public_numbers() == key.public_key().public_numbers()
    [event] = await env.events("cert.issue")
    assert event.actor == "alice"


@pytest_twisted.ensureDeferred
async def test_wrong_pin_is_refused_before_the_password(env, home, tmp_path):
    """A pin of another CA stops login before any request: no login attempt is audited."""
    other = ClusterCA.load_or_create(str(tmp_path / "other"), "other", wall_clock)
    port, proxy = await serve(env)
    try:
        run = await login(env, home, proxy, "--ca-pin", other.pin)
    finally:
        await port.stopListening()
    assert run.code == 1
    assert run.err.startswith("apptunnel: error: refusing the proxy at")
    assert "the password was not sent" in run.err and "Traceback" not in run.err
    assert await env.events("user.login") == []
    assert Profile.load(str(home)) is None


@pytest_twisted.ensureDeferred
async def test_bad_password_is_one_line(env, home):
    """A wrong password is one error line, exit 1, and no profile."""
    port, proxy = await serve(env)
    try:
        run = await login(env, home, proxy, "--ca-pin", env.ca.pin, password="wrong")
    finally:
        await port.stopListening()
    assert run.code == 1
    assert run.err == f"apptunnel: error: login to {proxy} failed: invalid username or password\n"
    assert Profile.load(str(home)) is None


@pytest_twisted.ensureDeferred
async def test_without_pin_the_system_store_rejects_a_private_ca(env, home):
    """No pin: the proxy must be publicly trusted, so our self-issued cert fails verification."""
    port, proxy = await serve(env)
    try:
        run = await login(env, home, proxy)
    finally:
        await port.stopListening()
    assert run.code == 1
    assert "TLS verification of the proxy" in run.err
    assert await env.events("user.login") == []
    # issue 9: one whole line that says what to do, not a cut-off "(_ssl.c:1006"
    assert run.err.count("\n") == 1 and "_ssl.c" not in run.err
    assert "--ca-pin" in run.err and "CA pin" in run.err


@pytest_twisted.ensureDeferred
async def test_insecure_warns_and_works(env, home):
    """--insecure skips verification with a loud warning naming what is skipped."""
    port, proxy = await serve(env)
    try:
        run = await login(env, home, proxy, "--insecure")
        listed = await in_thread(cli, home, "apps", "ls", "--format", "json")
    finally:
        await port.stopListening()
    assert run.code == 0, run.err
    assert run.err.startswith("apptunnel: warning: --insecure: NOT verifying")
    assert "CA pin" in run.err and "trust store" in run.err and "hostname" in run.err
    assert listed.code == 0 and json.loads(listed.out)["apps"][0]["name"] == "grafana"


@pytest_twisted.ensureDeferred
async def test_apps_ls_with_certificate(env, home):
    """apps ls lists the allowed apps (text and JSON) using the profile's certificate."""
    port, proxy = await serve(env)
    try:
        assert (await login(env, home, proxy, "--ca-pin", env.ca.pin)).code == 0
        text = await in_thread(cli, home, "apps", "ls")
        data = await in_thread(cli, home, "apps", "ls", "--format", "json")
    finally:
        await port.stopListening()
    assert text.code == 0, text.err
    lines = text.out.splitlines()
    assert lines[0].split() == ["NAME", "TYPE", "LABELS", "ADDRESS", "STATUS"]
    assert lines[1].split() == ["grafana", "http", "env=staging",
                                "grafana.apptunnel.localhost:3080", "online"]
    assert len(lines) == 2  # billing (prod) and wiki (denied) are not shown
    assert json.loads(data.out) == {"apps": [{
        "name": "grafana", "type": "http", "labels": {"env": "staging"},
        "public_addr": "grafana.apptunnel.localhost:3080", "online": True, "description": "", "requestable": False,
    }]}


@pytest_twisted.ensureDeferred
async def test_unreachable_proxy(env, home):
    """A closed port is a one-line 'cannot reach' error, before and after login."""
    proxy = f"apptunnel.localhost:{free_port()}"
    run = await in_thread(cli, home, "login", "--proxy", proxy, "--user", "alice",
                          "--password-stdin", "--ca-pin", env.ca.pin, stdin="pw\n")
    assert run.code == 1 and run.err.startswith(f"apptunnel: error: cannot reach the proxy at {proxy}")
    _save_profile(env, home, proxy, ttl=600)
    run = await in_thread(cli, home, "apps", "ls")
    assert run.code == 1 and run.err.startswith(f"apptunnel: error: cannot reach the proxy at {proxy}")


def _save_profile(env, home, proxy: str, ttl: float, roles=("dev",), traits=None) -> Profile:
    public, private = key_pair()
    cert = env.ca.issue_user_cert(public, "alice", roles, traits or {}, ttl)
    profile = Profile(proxy=proxy, trust=TRUST_PINNED, cert_pem=cert, key_pem=private,
                      ca_pem=env.ca.cert_pem)
    profile.save(str(home))
    return profile


def test_status_text_and_json(env, home):
    """status shows user, proxy, roles, traits, expiry and trust; JSON has the same facts."""
    profile = _save_profile(env, home, "apptunnel.localhost:3080", 3600,
                            traits={"logins": ["root", "ubuntu"]})
    run = cli(home, "status")
    assert run.code == 0, run.err
    assert "Logged in as: alice" in run.out
    assert "Proxy:        apptunnel.localhost:3080" in run.out
    assert "Roles:        dev" in run.out and "Traits:       logins=root,ubuntu" in run.out
    assert f"cluster CA {env.ca.pin}" in run.out
    assert "Valid until:  " in run.out
    assert "(in 1h)" in run.out or "(in 59m" in run.out
    data = json.loads(cli(home, "status", "--format", "json").out)
    assert data == {"user": "alice", "proxy": "apptunnel.localhost:3080", "roles": ["dev"],
                    "traits": {"logins": ["root", "ubuntu"]},
                    "expires": iso(profile.expires),  # issue 9: ISO, not epoch seconds
                    "expired": False, "trust": "pinned"}


def test_expired_certificate(env, home):
    """An expired cert: status says to log in again (exit 1); apps ls refuses to try."""
    _save_profile(env, home, "apptunnel.localhost:3080", -10)
    run = cli(home, "status")
    assert run.code == 1 and "Valid until:  expired: run apptunnel login" in run.out
    assert json.loads(cli(home, "status", "--format", "json").out)["expired"] is True
    run = cli(home, "apps", "ls")
    assert run.code == 1
    assert run.err == ("apptunnel: error: your certificate for apptunnel.localhost:3080 "
                       "expired: run apptunnel login\n")


def test_not_logged_in(home):
    """Without a profile, status and apps ls say so in one line; logout is a no-op."""
    for argv in (["status"], ["apps", "ls"]):
        run = cli(home, *argv)
        assert run.code == 1
        assert run.err == "apptunnel: error: not logged in: run apptunnel login\n"
    run = cli(home, "logout")
    assert run.code == 0 and run.out == "not logged in\n"


def test_logout_removes_the_profile(env, home):
    """logout deletes key, cert and CA, even when the profile is damaged."""
    _save_profile(env, home, "apptunnel.localhost:3080", 600)
    run = cli(home, "logout")
    assert run.code == 0 and run.out == "logged out of apptunnel.localhost:3080\n"
    assert os.listdir(home) == []
    _save_profile(env, home, "apptunnel.localhost:3080", 600)
    (home / "user.crt").write_text("garbage")
    assert cli(home, "status").err.startswith("apptunnel: error: ")
    assert cli(home, "logout").code == 0 and os.listdir(home) == []


@pytest.mark.parametrize("argv, message", [
    (["--proxy", "apptunnel.localhost:1", "--ca-pin", "sha256:abc"], "--ca-pin: expected sha256:"),
    (["--proxy", "apptunnel.localhost:1", "--ttl", "soon"], "--ttl:"),
    (["--proxy", "apptunnel.localhost:1", "--insecure", "--ca-pin", "sha256:" + "0" * 64],
     "exclude each other"),
    (["--proxy", "apptunnel.localhost:99999"], "--proxy:"),
])
def test_usage_errors(home, argv, message):
    """Bad flags are exit 2 with one line, before any connection."""
    run = cli(home, "login", "--user", "alice", "--password-stdin", *argv, stdin="pw\n")
    assert run.code == 2, run.err
    assert run.err.startswith("apptunnel: error: ") and message in run.err

def test_home_dir_defaults_to_dot_apptunnel():
    """APPTUNNEL_HOME wins; otherwise ~/.apptunnel."""
    assert home_dir({"APPTUNNEL_HOME": "/x/y", "HOME": "/h"}) == "/x/y"
    assert home_dir({"HOME": "/h"}) == "/h/.apptunnel"

