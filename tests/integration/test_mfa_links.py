"""Invite/reset links and TOTP second factors against the installed proxy and CLI.

The proxy runs with ``auth: {second_factor: on}``: a user without a device gets a session
that can only enroll one; the codes are computed here with pyotp.
"""

from __future__ import annotations

import json
import re
import subprocess
import time

import pyotp
import pytest
import requests
import yaml

from tests.support.cli_user import ca_pin, log_in, user_env
from tests.support.cluster import BIN, Browser, Cluster, audit, wait_until
from tests.support.localhost import localhost_resolution

PASSWORD = "the right password"


@pytest.fixture(scope="module")
def cluster():
    c = Cluster([])
    config = yaml.safe_load(c.proxy_config.read_text())
    config["auth"] = {"second_factor": "on"}
    c.proxy_config.write_text(yaml.safe_dump(config))
    try:
        c.start_proxy()
        c.add_role({"kind": "role", "metadata": {"name": "access"}, "spec": {"allow": {}}})
        c.add_user("alice", ["access"], PASSWORD)
        yield c
    finally:
        c.stop()


def origin(cluster) -> dict:
    return {"Origin": cluster.url().rstrip("/")}


def api(browser: Browser, method: str, path: str, body: dict | None = None):
    with_origin = {"Origin": browser.cluster.url().rstrip("/")}
    if method == "GET":
        response = browser.get(browser.cluster.url(path=path), allow_redirects=False)
    elif method == "DELETE":
        with localhost_resolution():
            response = browser.session.delete(browser.cluster.url(path=path), timeout=30,
                                              headers=with_origin)
    else:
        response = browser.post(browser.cluster.url(path=path), json=body or {},
                                headers=with_origin, allow_redirects=False)
    try:
        return response.status_code, response.json()
    except ValueError:
        return response.status_code, None


def link_of(output: str, kind: str) -> str:
    match = re.search(rf"https://\S+/web/{kind}/\S+", output)
    assert match, output
    return match.group(0)


def set_password(browser: Browser, url: str, password: str) -> requests.Response:
    return browser.post(url, data={"password": password, "confirm": password},
                        headers=origin(browser.cluster))


def test_invite_link_used_reused_and_expired(cluster):
    """users add without a password prints an invite link: it sets the password once, a
    second use says "already used", and a link past its --ttl says "expired"."""
    out = cluster.cli("users", "add", "bob", "--roles", "access").stdout
    url = link_of(out, "invite")
    browser = Browser(cluster)
    page = browser.get(url)
    assert page.status_code == 200 and "bob" in page.text
    done = set_password(browser, url, "bob's new password")
    assert done.status_code == 200 and "Your password is set" in done.text
    again = set_password(browser, url, "mallory's password")
    assert again.status_code == 410 and "already been used" in again.text
    status, answer = api(Browser(cluster), "POST", "/v1/sessions",
                         {"username": "bob", "password": "bob's new password"})
    assert status == 200 and answer["enroll_only"] is True     # second_factor: on
    out = cluster.cli("users", "add", "carol", "--roles", "access", "--ttl", "1s").stdout
    late = link_of(out, "invite")
    wait_until(lambda: Browser(cluster).get(late).status_code == 410, 15, "the link to expire")
    assert "expired" in Browser(cluster).get(late).text
    outcomes = [(e["actor"], e["outcome"]) for e in audit(cluster, "user.link")]
    assert ("bob", "success") in outcomes and ("bob", "failure") in outcomes


def test_totp_enroll_login_replay_recovery_and_last_device(cluster):
    """Enroll through an enroll-only session; then login needs a code (401 mfa_required);
    the CLI logs in with --otp; a replayed code and a used recovery code are refused; the
    last device cannot be removed."""
    browser = Browser(cluster)
    status, answer = api(browser, "POST", "/v1/sessions",
                         {"username": "alice", "password": PASSWORD})
    assert status == 200 and answer["enroll_only"] is True
    status, answer = api(browser, "GET", "/v1/apps")
    assert status == 403 and "second factor" in answer["error"]
    status, answer = api(browser, "POST", "/v1/mfa/totp")
    secret = answer["secret"]
    totp = pyotp.TOTP(secret)
    status, answer = api(browser, "POST", "/v1/mfa/devices",
                         {"type": "totp", "name": "phone", "secret": secret, "otp": totp.now()})
    assert status == 200, answer
    recovery = answer["recovery_codes"]
    assert len(recovery) == 10

    status, answer = api(Browser(cluster), "POST", "/v1/sessions",
                         {"username": "alice", "password": PASSWORD})
    assert status == 401
    assert answer["mfa_required"] == ["otp", "recovery_code"]

    home = cluster.root / "alice-home"
    pin = ca_pin(cluster)
    code = totp.at(time.time() + 30)       # the next step: this one went to enrollment
    log_in(cluster, "alice", home, PASSWORD, pin, "--otp", code)
    replay = subprocess.run(
        [str(BIN / "apptunnel"), "login", "--proxy", cluster.public_addr, "--user", "alice",
         "--password-stdin", "--ca-pin", pin, "--otp", code], input=PASSWORD + "\n",
        capture_output=True, text=True, timeout=60, env=user_env(home))
    assert replay.returncode != 0 and "invalid second factor" in replay.stderr
    log_in(cluster, "alice", home, PASSWORD, pin, "--otp", recovery[0])
    status, _ = api(Browser(cluster), "POST", "/v1/sessions",
                    {"username": "alice", "password": PASSWORD, "recovery_code": recovery[0]})
    assert status == 401

    def user_cli(*args: str, stdin: str | None = None):
        return subprocess.run([str(BIN / "apptunnel"), *args], input=stdin,
                              capture_output=True, text=True, timeout=60, env=user_env(home))

    listing = user_cli("mfa", "ls", "--format", "json")
    assert listing.returncode == 0, listing.stderr
    assert [d["name"] for d in json.loads(listing.stdout)["devices"]] == ["phone"]
    assert secret not in listing.stdout
    refused = user_cli("mfa", "rm", "phone")
    assert refused.returncode == 1 and "last device" in refused.stderr

    # `mfa add` on the CLI: QR and URI, then the code from stdin (computed from the URI).
    proc = subprocess.Popen([str(BIN / "apptunnel"), "mfa", "add", "--type", "totp",
                             "--name", "tablet"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=user_env(home))
    try:
        seen = ""
        while "key: " not in seen:
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
            seen += line
        tablet = re.search(r"key: ([A-Z2-7]+)", seen).group(1)
        assert "otpauth://totp/" in seen
        out, err = proc.communicate(pyotp.TOTP(tablet).now() + "\n", timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "Added totp device tablet" in out and "Recovery codes" not in out
    removed = user_cli("mfa", "rm", "phone")
    assert removed.returncode == 0, removed.stderr
    events = audit(cluster, "user.login")
    reasons = {e["fields"].get("reason") for e in events if e["actor"] == "alice"}
    assert {"replayed code", "wrong recovery code"} <= reasons


def test_reset_link_ends_sessions_and_the_old_password(cluster):
    """users reset: the live session stops working and the old password is refused at
    once; the reset link sets a new one."""
    cluster.add_user("dave", ["access"], PASSWORD)
    browser = Browser(cluster)
    status, _ = api(browser, "POST", "/v1/sessions", {"username": "dave", "password": PASSWORD})
    assert status == 200
    assert api(browser, "GET", "/v1/mfa/devices")[0] == 200
    out = cluster.cli("users", "reset", "dave", "--ttl", "1m").stdout
    assert api(browser, "GET", "/v1/mfa/devices")[0] == 401
    status, _ = api(Browser(cluster), "POST", "/v1/sessions",
                    {"username": "dave", "password": PASSWORD})
    assert status == 401
    url = link_of(out, "reset")
    assert set_password(Browser(cluster), url, "dave's new password").status_code == 200
    status, _ = api(Browser(cluster), "POST", "/v1/sessions",
                    {"username": "dave", "password": "dave's new password"})
    assert status == 200


def test_otp_guesses_are_throttled_by_the_proxy(cluster):
    """Five wrong codes with the right password, then even the right code gets 429 with
    Retry-After, and each refusal is audited with its method."""
    cluster.add_user("gina", ["access"], PASSWORD)
    browser = Browser(cluster)
    api(browser, "POST", "/v1/sessions", {"username": "gina", "password": PASSWORD})
    secret = api(browser, "POST", "/v1/mfa/totp")[1]["secret"]
    totp = pyotp.TOTP(secret)
    status, _ = api(browser, "POST", "/v1/mfa/devices",
                    {"type": "totp", "name": "phone", "secret": secret, "otp": totp.now()})
    assert status == 200
    for _ in range(5):
        status, answer = api(Browser(cluster), "POST", "/v1/sessions",
                             {"username": "gina", "password": PASSWORD, "otp": "000000"})
        assert status == 401 and answer["error"] == "invalid second factor"
    response = Browser(cluster).post(
        cluster.url(path="/v1/sessions"), headers=origin(cluster),
        json={"username": "gina", "password": PASSWORD, "otp": totp.at(time.time() + 30)})
    assert response.status_code == 429 and int(response.headers["Retry-After"]) >= 1
    wait_until(lambda: sum(1 for e in audit(cluster, "user.login")
                           if e["actor"] == "gina" and e["fields"].get("method") == "otp"
                           and e["outcome"] == "failure") >= 6, 10, "the audit of the guesses")
