"""Sign-in through an LDAP connector against a real slapd and the installed proxy (issue 10).

One directory (tests/support/slapd.py) and one cluster for the module: a proxy, an agent
and an app whose role is granted by the ``devs`` group and whose label names the user's
``{{external.email}}`` trait, so only alice may open it. Requests come from different
loopback addresses (127.0.0.x) where a test counts failures, so the per-address throttle
of one test does not spill into another.
"""

from __future__ import annotations

import html
import json
import re
import subprocess
import threading
import time

import pytest
import requests
import yaml

from tests.support.cluster import post_from as post
from tests.support.cli_user import ca_pin, user_env
from tests.support.cluster import BIN, Browser, Cluster, app_jwt_claims, audit, free_port, wait_until
from tests.support.localhost import localhost_resolution
from tests.support.slapd import SERVICE_DN, Slapd, group_dn, password
from tests.support.upstream import HttpUpstream

TIMEOUT = 2        # the connectors' timeout, seconds


@pytest.fixture(scope="module")
def slapd():
    directory = Slapd().start()
    yield directory
    directory.stop()


def connector(slapd: Slapd, name: str, url: str, ca: str = "ca.crt", **extra) -> dict:
    spec = {"url": url, "ca_file": slapd.path(ca), "bind_dn": SERVICE_DN,
            "bind_password_file": slapd.path("bind-password"),
            "user_search_base": "ou=people,dc=example,dc=org",
            "user_search_filter": "(&(objectClass=inetOrgPerson)(uid={username}))",
            "groups_to_roles": [{"group": group_dn("devs"), "roles": ["dev-apps"]}],
            "attributes_to_traits": {"mail": "email"}, "timeout": f"{TIMEOUT}s", **extra}
    return {"kind": "ldap", "metadata": {"name": name}, "spec": spec}


@pytest.fixture(scope="module")
def cluster(slapd):
    upstream = HttpUpstream()
    c = Cluster([{"name": "hello", "uri": upstream.uri,
                  "labels": {"owner": "alice@example.org"}}])
    config = yaml.safe_load(c.proxy_config.read_text())
    config["auth"] = {"throttle": {"window": "30s", "max_failures_per_address": 100}}
    c.proxy_config.write_text(yaml.safe_dump(config))
    try:
        c.start_proxy()
        docs = [
            {"kind": "role", "metadata": {"name": "dev-apps"},
             "spec": {"allow": {"app_labels": {"owner": "{{external.email}}"}}}},
            connector(slapd, "corp-ldap", slapd.tls_url),
            connector(slapd, "corp-starttls", slapd.url, start_tls=True),
            connector(slapd, "wrong-ca", slapd.tls_url, ca="wrong-ca.crt"),
            connector(slapd, "down", f"ldaps://localhost:{free_port()}"),
        ]
        path = c.root / "connectors.yaml"
        path.write_text(yaml.safe_dump_all(docs))
        c.cli("create", "-f", str(path))
        c.start_agent()
        yield c
    finally:
        c.stop()
        upstream.stop()


def sign_in(cluster, user, pw, connector="corp-ldap", source="127.0.0.1"):
    body = {"username": user, "password": pw, "connector": connector}
    status, headers, text = post(cluster, "/v1/sessions", body, source)
    return status, headers, json.loads(text) if text.startswith("{") else text


def login_events(cluster) -> list[dict]:
    """user.login events, their fields beside actor and outcome."""
    return [{"actor": e["actor"], "outcome": e["outcome"], **e["fields"]}
            for e in audit(cluster, "user.login")]


def logins(cluster, user: str) -> list[dict]:
    return [e for e in login_events(cluster) if e["actor"] == user]


def test_right_wrong_empty_and_injected_passwords(cluster):
    """alice signs in with her directory password and gets the devs group's role; a wrong
    or empty password and the filter injection ``*)(uid=*`` are 401, each audited with
    method and connector."""
    status, _, body = sign_in(cluster, "alice", password("alice"), source="127.0.0.10")
    assert status == 200, body
    assert body["user"] == "alice" and body["roles"] == ["dev-apps"]
    for user, pw in (("alice", "wrong"), ("alice", ""), ("*)(uid=*", password("alice")),
                     ("*", password("alice"))):
        status, _, body = sign_in(cluster, user, pw, source="127.0.0.10")
        assert status == 401 and body["error"] == "invalid username or password", (user, body)
    def mine():
        return [e for e in login_events(cluster) if e.get("client", "").startswith("127.0.0.10:")]
    events = wait_until(lambda: len(mine()) >= 5 and mine(), 10, "the audit events")
    assert [e.get("reason") for e in events] == [
        None, "invalid credentials", "empty password", "invalid credentials",
        "invalid credentials"], events
    assert all(e["method"] == "ldap" and e["connector"] == "corp-ldap" for e in events)
    stored = json.loads(cluster.cli("get", "users", "alice", "--format", "json").stdout)
    assert stored["spec"]["roles"] == ["dev-apps"]


def test_a_user_whose_groups_map_to_no_role_is_refused_and_audited(cluster):
    """bob's password is right but his group maps to nothing: 403 saying so, audited."""
    status, _, body = sign_in(cluster, "bob", password("bob"), source="127.0.0.11")
    assert status == 403 and "maps to a role" in body["error"], body
    [event] = wait_until(lambda: logins(cluster, "bob"), 10, "bob's audit event")
    assert event["outcome"] == "failure" and event["reason"] == "no role"
    assert event["method"] == "ldap" and event["connector"] == "corp-ldap"


def test_starttls_works_and_a_wrong_ca_or_a_dead_directory_is_503(cluster):
    """StartTLS with the CA signs in; the wrong CA and nothing listening are 503 naming the
    connector, at once."""
    status, _, body = sign_in(cluster, "dave", password("dave"), "corp-starttls", "127.0.0.12")
    assert status == 200 and body["user"] == "dave", body
    # dave is now corp-starttls's user: another connector does not take the name over
    status, _, body = sign_in(cluster, "dave", password("dave"), "corp-ldap", "127.0.0.12")
    assert status == 403 and "belongs to another account" in body["error"], body
    for name in ("wrong-ca", "down"):
        started = time.monotonic()
        status, _, body = sign_in(cluster, "carol", password("carol"), name, "127.0.0.12")
        assert status == 503 and f"the directory {name} is not answering" in body["error"], body
        assert time.monotonic() - started < TIMEOUT + 1
    assert "wrong-ca" in cluster.proxy.log_tail(200)  # one log line names the connector


def test_a_hung_directory_is_503_within_the_timeout_while_the_proxy_keeps_serving(cluster, slapd):
    """slapd SIGSTOPped: the sign-in answers 503 within the connector's timeout, and
    /healthz answers quickly all the while (the binds run off the reactor)."""
    answer: dict = {}

    def attempt():
        started = time.monotonic()
        answer["result"] = sign_in(cluster, "carol", password("carol"), source="127.0.0.13")
        answer["seconds"] = time.monotonic() - started

    slapd.pause()
    try:
        thread = threading.Thread(target=attempt)
        thread.start()
        session = requests.Session()
        session.trust_env = False
        health = []
        deadline = time.monotonic() + TIMEOUT + 4
        while thread.is_alive() and time.monotonic() < deadline:
            started = time.monotonic()
            with localhost_resolution():
                r = session.get(cluster.url(path="/healthz"), verify=cluster.ca_file, timeout=2)
            health.append((r.status_code, time.monotonic() - started))
            time.sleep(0.1)
        thread.join(TIMEOUT + 5)
    finally:
        slapd.resume()
    status, _, body = answer["result"]
    assert status == 503 and "the directory corp-ldap is not answering" in body["error"], body
    assert answer["seconds"] < TIMEOUT + 1.5, answer
    # A blocked reactor would hold /healthz for the whole timeout (2 s).
    assert len(health) >= 3 and all(code == 200 and took < 1.0 for code, took in health), health


def test_ldap_guesses_are_throttled(cluster):
    """Five wrong passwords for dave (from five addresses), then his right one is 429 with
    Retry-After: the same throttle as local passwords."""
    for i in range(5):
        status = sign_in(cluster, "dave", "guess", "corp-starttls", f"127.0.1.{i + 1}")[0]
        assert status == 401
    status, headers, body = sign_in(cluster, "dave", password("dave"), "corp-starttls",
                                    "127.0.1.9")
    assert status == 429 and int(headers["Retry-After"]) >= 1, body
    wait_until(lambda: logins(cluster, "dave")[-1].get("reason") == "throttled", 10,
               "the throttled sign-in's audit event")


def _app_online(cluster) -> bool:
    if not cluster.agent.alive():
        raise AssertionError("agent exited:\n" + cluster.agent.log_tail())
    s = requests.Session()
    s.trust_env = False
    with localhost_resolution():
        r = s.post(cluster.url(path="/v1/sessions"), verify=cluster.ca_file, timeout=5,
                   json={"username": "alice", "password": password("alice"),
                         "connector": "corp-ldap"},
                   headers={"Origin": cluster.url().rstrip("/")})
        r.raise_for_status()
        apps = s.get(cluster.url(path="/v1/apps"), verify=cluster.ca_file, timeout=5).json()
    return any(a["name"] == "hello" and a["online"] for a in apps["apps"])


def _form_sign_in(cluster, browser: Browser, url: str, user: str) -> requests.Response:
    page = browser.get(url)
    assert page.url.startswith(cluster.url(path="/web/login")), page.url
    assert re.search(r'<select id="connector" name="connector">', page.text), page.text
    assert '<option value="corp-ldap">corp-ldap</option>' in page.text
    target = html.unescape(re.search(r'name="next" value="([^"]*)"', page.text).group(1))
    form = {"username": user, "password": password(user), "connector": "corp-ldap",
            "next": target}
    return browser.post(cluster.url(path="/web/login"), data=form,
                        headers={"Origin": cluster.url().rstrip("/")})


def test_browser_form_with_the_connector_choice_opens_the_app_with_external_traits(cluster):
    """The sign-in page offers the LDAP connectors; signing in there lands on the app path
    `next` pointed to, and the app's JWT carries the directory's groups and mail as traits
    (the role's {{external.email}} template let alice in, and keeps carol out)."""
    wait_until(lambda: _app_online(cluster), 30, "the agent to register hello")
    browser = Browser(cluster)
    landed = _form_sign_in(cluster, browser, cluster.url("hello", "/echo?x=1"), "alice")
    assert landed.status_code == 200, landed.text
    echo = landed.json()
    assert echo["path"] == "/echo?x=1"
    claims = app_jwt_claims(cluster, echo)
    assert claims["username"] == "alice" and claims["roles"] == ["dev-apps"]
    assert claims["traits"]["email"] == ["alice@example.org"]
    assert set(claims["traits"]["groups"]) == {group_dn("devs"), group_dn("admins")}

    carol = Browser(cluster)
    refused = _form_sign_in(cluster, carol, cluster.url("hello", "/echo"), "carol")
    assert refused.status_code == 403, refused.text


def test_cli_login_with_auth_and_password_stdin(cluster, tmp_path):
    """`apptunnel login --auth corp-ldap --password-stdin` writes the certificate as a
    password login does; a wrong password is the usual one-line refusal."""
    home = tmp_path / "home"
    base = [str(BIN / "apptunnel"), "login", "--proxy", cluster.public_addr, "--user", "carol",
            "--auth", "corp-ldap", "--password-stdin", "--ca-pin", ca_pin(cluster)]
    run = dict(capture_output=True, text=True, timeout=60, env=user_env(home), cwd=str(tmp_path))
    wrong = subprocess.run(base, input="nope\n", **run)
    assert wrong.returncode == 1 and "invalid username or password" in wrong.stderr
    done = subprocess.run(base, input=password("carol") + "\n", **run)
    assert done.returncode == 0, done.stderr
    assert "logged in to" in done.stdout and "as carol (roles: dev-apps)" in done.stdout
    status = json.loads(subprocess.run([str(BIN / "apptunnel"), "status", "--format", "json"],
                                       **run).stdout)
    assert status["user"] == "carol" and status["traits"]["email"] == ["carol@example.org"]


def test_locks_hold_for_ldap_users_by_name(cluster):
    """`apptunnel lock --user carol` refuses her LDAP sign-in (after the password matched)."""
    lock_id = cluster.cli("lock", "--user", "carol", "--message", "incident 7").stdout.split()[0]
    try:
        status, _, body = sign_in(cluster, "carol", password("carol"), source="127.0.0.14")
        assert status == 403 and "incident 7" in body["error"], body
    finally:
        cluster.cli("locks", "rm", lock_id)
