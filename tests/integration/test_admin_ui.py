"""The admin pages and the audit viewer in real Chromium against a real proxy and agent.

An admin invites a user and the invite is completed in a second browser context; edits a
role's YAML with a mistake (inline error) and fixes it; creates and removes a lock; finds
a user's app request in the audit viewer and filters it. A user without rules gets 403
from the pages and from the API (session cookie and certificate); a cross-site form post
and a cross-origin fetch to each state-changing admin endpoint are refused. Screenshots
go to $ARTIFACTS/admin_ui (default: the test's tmp_path), never into the source tree.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.support.chromium import ARGS, CHROMIUM
from tests.support.cluster import Browser, Cluster, audit, wait_until
from tests.support.localhost import localhost_resolution
from tests.support.system import require_program
from tests.support.upstream import HttpUpstream

ROOT_PW = "admin browser password"
CAROL_PW = "carol browser password"
DAVE_PW = "dave chose this password"
ADMIN_ROLE = {"kind": "role", "metadata": {"name": "admin"},
              "spec": {"allow": {"rules": [{"resources": ["*"], "verbs": ["*"]}]}}}
APPS_ROLE = {"kind": "role", "metadata": {"name": "demo-apps"},
             "spec": {"allow": {"app_labels": {"env": "demo"}}}}
# (method, path, JSON body) of every state-changing admin endpoint.
CHANGES = [
    ("POST", "/v1/admin/users", {"name": "evil", "roles": ["admin"]}),
    ("PATCH", "/v1/admin/users/carol", {"roles": ["admin"]}),
    ("POST", "/v1/admin/users/carol/reset", {}),
    ("DELETE", "/v1/admin/users/carol", None),
    ("POST", "/v1/admin/roles", {"yaml": "kind: role\nmetadata: {name: evil}\n"}),
    ("PUT", "/v1/admin/roles/demo-apps", {"yaml": "kind: role\nmetadata: {name: demo-apps}\n"}),
    ("DELETE", "/v1/admin/roles/demo-apps", None),
    ("POST", "/v1/admin/connectors", {"yaml": "kind: ldap"}),
    ("DELETE", "/v1/admin/connectors/x", None),
    ("POST", "/v1/admin/locks", {"user": "root"}),
    ("DELETE", "/v1/admin/locks/0123456789", None),
]
FORMS = [
    ("/web/admin/users", {"name": "evil", "roles": "admin"}),
    ("/web/admin/users/carol/roles", {"roles": "admin"}),
    ("/web/admin/users/carol/reset", {}),
    ("/web/admin/users/carol/delete", {}),
    ("/web/admin/roles", {"yaml": "kind: role\nmetadata: {name: evil}\n"}),
    ("/web/admin/roles/demo-apps", {"yaml": "kind: role\nmetadata: {name: demo-apps}\n"}),
    ("/web/admin/roles/demo-apps/delete", {}),
    ("/web/admin/connectors", {"yaml": "kind: ldap"}),
    ("/web/admin/locks", {"user": "root"}),
    ("/web/admin/locks/0123456789/delete", {}),
]


@pytest.fixture(scope="module")
def cluster():
    upstream = HttpUpstream()
    c = Cluster([{"name": "hello", "uri": upstream.uri, "labels": {"env": "demo"}}])
    try:
        c.start_proxy()
        c.add_role(ADMIN_ROLE)
        c.add_role(APPS_ROLE)
        c.add_user("root", ["admin", "demo-apps"], ROOT_PW)
        c.add_user("carol", ["demo-apps"], CAROL_PW)
        c.start_agent()
        yield c
    finally:
        c.stop()
        upstream.stop()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    require_program(CHROMIUM, "chromium")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture
def shots(tmp_path):
    """Where screenshots go: $ARTIFACTS/admin_ui, else this test's tmp_path."""
    root = Path(os.environ["ARTIFACTS"]) / "admin_ui" if os.environ.get("ARTIFACTS") \
        else tmp_path / "admin_ui"
    root.mkdir(parents=True, exist_ok=True)
    return root


def sign_in(page, cluster, user, password):
    page.goto(cluster.url(path="/web/login"), timeout=15_000)
    page.fill("input[name=username]", user)
    page.fill("input[name=password]", password)
    page.click("form[action='/web/login'] button[type=submit]")
    page.wait_for_load_state()
    assert "/web/login" not in page.url, page.content()[:500]


def new_page(browser, width=1200):
    context = browser.new_context(ignore_https_errors=True,
                                  viewport={"width": width, "height": 900})
    return context, context.new_page()


def no_horizontal_scroll(page) -> bool:
    return page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")


def test_admin_invites_edits_a_role_locks_and_reads_the_audit_log(cluster, browser, shots):
    """The whole admin journey in Chromium, and the audit viewer filtering a user's request."""
    context, page = new_page(browser)
    invited_context, invited = new_page(browser, width=390)
    try:
        sign_in(page, cluster, "root", ROOT_PW)
        page.goto(cluster.url(path="/web/admin"))
        assert page.url.endswith("/web/admin/apps")
        # The app the agent serves, with who serves it (wait for the agent's tunnel).
        wait_until(lambda: (page.reload(), "online" in page.inner_text("table"))[1], 30,
                   "the hello app online in /web/admin/apps", interval=0.5)
        page.screenshot(path=str(shots / "admin_apps.png"), full_page=True)

        # Invite dave; the link is shown once.
        page.goto(cluster.url(path="/web/admin/users"))
        page.fill("#invite-name", "dave")
        page.fill("#invite-roles", "demo-apps")
        page.click("text=Create invite link")
        link = page.inner_text("#one-time-link").strip()
        assert re.fullmatch(rf"{re.escape(cluster.url(path='/web/invite/'))}\S+", link), link
        page.screenshot(path=str(shots / "admin_users_invite.png"), full_page=True)
        # ... and completed in a second browser context, at phone width.
        invited.goto(link)
        invited.fill("#password", DAVE_PW)
        invited.fill("#confirm", DAVE_PW)
        invited.click("button:has-text('Set password')")
        invited.wait_for_selector("text=Your password is set")
        sign_in(invited, cluster, "dave", DAVE_PW)
        [created] = [e for e in audit(cluster, "user.create") if e["target"] == "dave"]
        assert (created["actor"], created["fields"]["via"]) == ("root", "api")

        # A role with a mistake: the key path inline, nothing stored; then fixed.
        page.goto(cluster.url(path="/web/admin/roles/new"))
        page.fill("#yaml", "kind: role\nmetadata: {name: auditors}\nspec:\n  allow:\n"
                           "    rules: [{resources: [events], verbs: [list, read]}]\n")
        page.click("text=Save")
        error = page.inner_text("#form-error")
        assert error.startswith("spec.allow.rules[0].resources[0]: unknown resource 'events'")
        assert page.get_attribute("#yaml", "aria-invalid") == "true"
        page.screenshot(path=str(shots / "admin_role_error.png"), full_page=True)
        page.fill("#yaml", page.input_value("#yaml").replace("[events]", "[event]"))
        page.click("text=Save")
        page.wait_for_selector("text=Saved role auditors.")
        assert "auditors" in cluster.cli("get", "roles").stdout

        # A lock on dave: created, listed, removed.
        page.goto(cluster.url(path="/web/admin/locks"))
        page.fill("#lock-user", "dave")
        page.fill("#lock-message", "incident 7")
        page.click("button:has-text('Lock')")
        page.wait_for_selector("text=Locked user dave.")
        assert json.loads(cluster.cli("locks", "ls", "--format", "json").stdout)[0]["user"] \
            == "dave"
        page.screenshot(path=str(shots / "admin_locks.png"), full_page=True)
        page.click("button[aria-label='Remove the lock on user dave']")
        page.wait_for_selector("text=Removed the lock on user dave.")
        assert json.loads(cluster.cli("locks", "ls", "--format", "json").stdout) == []

        # carol opens the app; her request is in the audit viewer, found by user and app.
        carol = Browser(cluster)
        landed = carol.login_through(cluster.url("hello", "/echo?from=audit"), "carol",
                                     CAROL_PW)
        assert landed.status_code == 200
        wait_until(lambda: any(e["actor"] == "carol" for e in audit(cluster, "app.request")),
                   15, "carol's app.request event")
        page.goto(cluster.url(path="/web/audit"))
        page.fill("#f-user", "carol")
        page.fill("#f-app", "hello")
        page.fill("#f-type", "app.request")
        page.click("text=Filter")
        assert "user=carol" in page.url and "app=hello" in page.url
        rows = page.locator("table tbody tr")
        assert rows.count() >= 1 and "app.request" in rows.first.inner_text()
        assert "carol" in rows.first.inner_text() and "hello" in rows.first.inner_text()
        page.screenshot(path=str(shots / "audit_filtered.png"), full_page=True)
        page.locator("table tbody tr a").first.click()
        page.wait_for_url(re.compile(r".*/web/audit/[^/?]+$"))
        detail = page.inner_text("dl.event")
        assert "carol" in detail and "hello" in detail
        request_id = re.search(r"request_id\s+(\S+)", detail)
        assert request_id, detail       # every app request names its id (error pages show it)
        page.goto(cluster.url(path="/web/audit?request_id=" + request_id.group(1)))
        assert "carol" in page.inner_text("table tbody")
        page.goto(cluster.url(path="/web/audit?request_id=no-such-request"))
        assert "No events match." in page.inner_text("table tbody")
        page.goto(cluster.url(path="/web/audit?request_id=" + request_id.group(1)))
        page.screenshot(path=str(shots / "audit_event.png"), full_page=True)

        # The same pages at 390 px: no sideways scrolling.
        page.set_viewport_size({"width": 390, "height": 844})
        for path in ("/web/admin/users", "/web/admin/locks", "/web/audit",
                     "/web/admin/roles/auditors"):
            page.goto(cluster.url(path=path))
            assert no_horizontal_scroll(page), path
        page.screenshot(path=str(shots / "audit_390.png"), full_page=True)
        # Keyboard: the first Tab stops reach the admin nav's links.
        page.goto(cluster.url(path="/web/admin/users"))
        focused = []
        for _ in range(20):
            page.keyboard.press("Tab")
            focused.append(page.evaluate("document.activeElement.getAttribute('href')"))
        assert "/web/admin/users" in focused and "/web/audit" in focused
    finally:
        context.close()
        invited_context.close()


def _certificate(cluster, tmp_path, user, password) -> tuple[str, str]:
    """A user certificate from POST /v1/certs for a key of ours: (cert file, key file)."""
    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    with localhost_resolution():
        answer = requests.post(cluster.url(path="/v1/certs"), verify=cluster.ca_file, timeout=30,
                               json={"username": user, "password": password,
                                     "public_key": public.decode()})
    assert answer.status_code == 200, answer.text
    cert, key_file = tmp_path / f"{user}.crt", tmp_path / f"{user}.key"
    cert.write_text(answer.json()["cert"])
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert), str(key_file)


def test_a_user_without_rules_is_refused_by_pages_and_api(cluster, browser, tmp_path, shots):
    """carol (an app role, no rules) gets 403 from /web/admin, /web/audit and the API, with
    her session cookie and with her certificate; nothing changes."""
    context, page = new_page(browser)
    try:
        sign_in(page, cluster, "carol", CAROL_PW)
        for path in ("/web/admin", "/web/admin/users", "/web/audit"):
            response = page.goto(cluster.url(path=path))
            assert response.status == 403, path
            assert "Access denied" in page.content()
        page.screenshot(path=str(shots / "admin_403.png"), full_page=True)
        cookies = {c["name"]: c["value"] for c in context.cookies()}
    finally:
        context.close()
    cert = _certificate(cluster, tmp_path, "carol", CAROL_PW)
    origin = {"Origin": cluster.url().rstrip("/")}
    with localhost_resolution():
        for kwargs in ({"cookies": cookies}, {"cert": cert}):
            for path in ("/v1/admin/users", "/v1/admin/locks", "/v1/audit/events"):
                r = requests.get(cluster.url(path=path), verify=cluster.ca_file, timeout=30,
                                 **kwargs)
                assert r.status_code == 403, (path, kwargs.keys(), r.text)
            for method, path, body in CHANGES:
                r = requests.request(method, cluster.url(path=path), verify=cluster.ca_file,
                                     timeout=30, json=body, headers=origin, **kwargs)
                assert r.status_code == 403, (method, path, r.text)
    assert "carol" in cluster.cli("users", "ls").stdout
    assert json.loads(cluster.cli("locks", "ls", "--format", "json").stdout) == []


def test_cross_site_posts_and_fetches_are_refused(cluster, browser):
    """Signed in as the admin: a form posted from another site and a cross-origin fetch
    (from the app's own subdomain) to every state-changing admin endpoint are refused."""
    context, page = new_page(browser)
    try:
        sign_in(page, cluster, "root", ROOT_PW)
        proxy = cluster.url().rstrip("/")
        for path, fields in FORMS:
            inputs = "".join(f'<input name="{k}" value="{v}">' for k, v in fields.items())
            page.goto("about:blank")
            page.set_content(f'<form method="post" action="{proxy}{path}">{inputs}'
                             '<button>go</button></form>')
            with page.expect_navigation():
                page.click("button")
            assert "This form was not submitted from this site." in page.content(), path
        # A sibling origin (the app host) fetching with the admin's cookies.
        page.goto(cluster.url("hello", "/echo"), timeout=15_000)
        for method, path, body in CHANGES:
            outcome = page.evaluate(
                """async ([url, method, body]) => {
                    try {
                        const r = await fetch(url, {method, credentials: 'include',
                            headers: {'Content-Type': 'application/json'},
                            body: body === null ? undefined : JSON.stringify(body)});
                        return 'status ' + r.status;
                    } catch (e) { return 'blocked'; }
                }""", [proxy + path, method, body])
            assert outcome in ("blocked", "status 403"), (method, path, outcome)
    finally:
        context.close()
    users = cluster.cli("users", "ls").stdout
    assert "evil" not in users and "carol" in users
    assert "evil" not in cluster.cli("get", "roles").stdout
    assert json.loads(cluster.cli("locks", "ls", "--format", "json").stdout) == []
