"""The web UI as a person uses it, in real Chromium against a real proxy, agent and apps.

One journey (browser tests are slow, so few): sign in (a failed attempt keeps the
username), search and filter the catalogue with the state in the URL, launch an HTTP app
and see its content on its subdomain, open a TCP app's Connect dialog (no Launch), ask
for access and have a reviewer approve it in a SECOND browser context, assume it and open
the app, enroll TOTP, find an app-host error page's request id in the audit, check every
page at 390 px without horizontal scrolling, and sign out so the app asks to sign in
again. Screenshots of each page go to $ARTIFACTS (default: the test's tmp dir).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pyotp
import pytest

from tests.support.chromium import ARGS, CHROMIUM
from tests.support.cluster import Cluster, audit, free_port, wait_until
from tests.support.system import require_program
from tests.support.upstream import HttpUpstream

PASSWORD = "web ui test password"
NO_SIDEWAYS = "document.scrollingElement.scrollWidth <= window.innerWidth"


@pytest.fixture(scope="module")
def cluster():
    upstream = HttpUpstream()
    dead = free_port()   # nothing listens: the app is unreachable
    c = Cluster([
        {"name": "wiki", "uri": upstream.uri, "labels": {"env": "demo", "tier": "docs"},
         "description": "Team handbook"},
        {"name": "grafana", "uri": upstream.uri, "labels": {"env": "demo", "tier": "ops"}},
        {"name": "pg", "uri": f"tcp://127.0.0.1:{free_port()}", "labels": {"env": "demo"},
         "description": "Team database"},
        {"name": "billing", "uri": upstream.uri, "labels": {"env": "prod"}},
        {"name": "broken", "uri": f"http://127.0.0.1:{dead}", "labels": {"env": "demo"}},
    ])
    try:
        c.start_proxy()
        c.add_role({"kind": "role", "metadata": {"name": "demo-apps"}, "spec": {"allow": {
            "app_labels": {"env": "demo"}, "request": {"roles": ["prod-apps"]}}}})
        c.add_role({"kind": "role", "metadata": {"name": "prod-apps"},
                    "spec": {"allow": {"app_labels": {"env": "prod"}}}})
        c.add_role({"kind": "role", "metadata": {"name": "reviewer"}, "spec": {"allow": {
            "review_requests": {"roles": ["prod-apps"]}}}})
        c.add_user("carol", ["demo-apps"], PASSWORD)
        c.add_user("rita", ["reviewer"], PASSWORD)
        c.start_agent()
        yield c
    finally:
        c.stop()
        upstream.stop()


@pytest.fixture
def shots(tmp_path) -> Path:
    out = Path(os.environ.get("ARTIFACTS") or tmp_path) / "web-ui"
    out.mkdir(parents=True, exist_ok=True)
    return out


def sign_in(page, cluster, user, password=PASSWORD):
    page.goto(cluster.url(path="/web/login?next=%2Fweb%2Frequests"), timeout=15_000)
    page.fill("#username", user)
    page.fill("#password", password)
    page.click("form.form button[type=submit]")
    page.wait_for_url(re.compile(r"/web/requests"), timeout=15_000)


def test_a_person_uses_the_web_ui(cluster, shots):
    """The whole journey of a user and a reviewer, desktop and phone width."""
    from playwright.sync_api import sync_playwright

    require_program(CHROMIUM, "chromium")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            run_journey(browser, cluster, shots)
        finally:
            browser.close()


def run_journey(browser, cluster, shots):
    carol_ctx = browser.new_context(ignore_https_errors=True,
                                    viewport={"width": 1280, "height": 900})
    page = carol_ctx.new_page()
    shot = lambda name, pg=page: pg.screenshot(path=str(shots / f"{name}.png"), full_page=True)  # noqa: E731

    # -- sign in: a failure keeps the username, success lands where the user was going
    page.goto(cluster.url(path="/web/apps?q=wik"), timeout=15_000)
    assert "/web/login" in page.url
    page.fill("#username", "carol")
    page.fill("#password", "wrong password")
    page.click("form.form button[type=submit]")
    assert page.locator("p.alert").is_visible()
    assert page.input_value("#username") == "carol"
    assert page.evaluate("document.activeElement.id") == "password"
    shot("login-failed")
    page.fill("#password", PASSWORD)
    page.click("form.form button[type=submit]")
    page.wait_for_url(re.compile(r"/web/apps\?q=wik$"), timeout=15_000)

    # -- the catalogue: wait for the agent, then search and filter (state in the URL)
    def all_online():
        assert cluster.agent.alive(), cluster.agent.log_tail()
        page.goto(cluster.url(path="/web/apps"), timeout=10_000)
        return page.locator(".chip.online").count() >= 4
    wait_until(all_online, 30, "the agent's apps to be online", interval=0.5)
    shot("catalogue")
    page.fill("#q", "wik")
    page.press("#q", "Enter")
    page.wait_for_url(re.compile(r"q=wik"), timeout=10_000)
    names = page.locator("[data-cards] > li:not([hidden])").evaluate_all(
        "els => els.map(e => e.dataset.name)")
    assert names == ["wiki"]
    assert page.locator("[data-name=wiki] .app-desc").inner_text() == "Team handbook"
    page.click("[data-name=wiki] a.chip.label:has-text('tier=docs')")
    page.wait_for_url(re.compile(r"label=tier%3Ddocs"), timeout=10_000)
    query = parse_qs(urlsplit(page.url).query)
    assert query == {"q": ["wik"], "label": ["tier=docs"]}
    page.goto(cluster.url(path="/web/apps?label=tier%3Dops"))      # a shared link
    assert page.locator("[data-cards] > li").evaluate_all(
        "els => els.map(e => e.dataset.name)") == ["grafana"]
    shot("catalogue-filtered")

    # -- launch an HTTP app: a new tab on its subdomain with the app's own content
    page.goto(cluster.url(path="/web/apps?q=wiki"))
    with carol_ctx.expect_page(timeout=15_000) as opened:
        page.click("[data-name=wiki] a:has-text('Launch')")
    tab = opened.value
    tab.wait_for_url(re.compile(r"^https://wiki\."), timeout=15_000)
    tab.wait_for_load_state()
    echo = json.loads(tab.inner_text("body"))
    assert echo["path"] == "/"
    tab.close()

    # -- a TCP app: Connect shows the exact commands, and there is no Launch
    page.goto(cluster.url(path="/web/apps?q=pg"))
    card = page.locator("[data-name=pg]")
    assert card.locator("a:has-text('Launch')").count() == 0
    card.locator("summary:has-text('Connect')").click()
    lines = card.locator(".cmd code").all_inner_texts()
    assert lines[0].startswith(f"apptunnel login --proxy {cluster.public_addr} --user carol "
                               "--ca-pin sha256:")
    assert re.fullmatch(r"apptunnel proxy app pg --port \d+", lines[1])
    assert card.locator("button.copy").count() == 2
    shot("tcp-connect")

    # -- ask for access to billing (only a role carol may request opens it)
    page.goto(cluster.url(path="/web/apps?q=billing"))
    billing = page.locator("[data-name=billing]")
    assert billing.locator("a:has-text('Launch')").count() == 0
    billing.locator("a:has-text('Request access')").click()
    page.wait_for_url(re.compile(r"/web/requests\?app=billing"), timeout=10_000)
    assert page.input_value("#app") == "billing"
    page.fill("#reason", "month-end invoices")
    page.click("text=Send request")
    assert page.locator(".notice").is_visible()
    assert page.locator(".chip.state-pending").count() == 1
    shot("request-sent")

    # -- the reviewer approves it in a second browser context
    rita_ctx = browser.new_context(ignore_https_errors=True)
    rita = rita_ctx.new_page()
    sign_in(rita, cluster, "rita")
    queue = rita.locator("section[aria-labelledby=queue-title] .request")
    assert queue.count() == 1 and "month-end invoices" in queue.inner_text()
    queue.locator("input[name=reason]").fill("ok for this week")
    queue.locator("button:has-text('Approve')").click()
    assert rita.locator(".notice:has-text('Approved')").is_visible()
    rita.screenshot(path=str(shots / "reviewer-approved.png"), full_page=True)
    rita_ctx.close()

    # -- carol assumes it in one click and opens billing
    page.goto(cluster.url(path="/web/requests"))
    page.click("button:has-text('Assume')")
    assert page.locator(".chip:has-text('left')").is_visible()
    shot("request-assumed")
    page.goto(cluster.url(path="/web/apps?q=billing"))
    with carol_ctx.expect_page(timeout=15_000) as opened:
        page.click("[data-name=billing] a:has-text('Launch')")
    tab = opened.value
    tab.wait_for_url(re.compile(r"^https://billing\."), timeout=15_000)
    assert json.loads(tab.inner_text("body"))["path"] == "/"
    tab.close()

    # -- enroll TOTP on the account page
    page.goto(cluster.url(path="/web/account"))
    me = page.inner_text("section[aria-labelledby=me-title]")
    assert "demo-apps" in me and "with password" in me
    secret = page.input_value("input[name=secret]")
    page.fill("#otp", pyotp.TOTP(secret).now())
    page.click("form[action='/web/account/totp'] button[type=submit]")
    assert page.locator("ul.codes li").count() >= 5
    shot("account-totp-enrolled")
    page.goto(cluster.url(path="/web/account"))
    assert page.locator("td.name:has-text('phone')").count() == 1
    shot("account")

    # -- an app-host error page: styled, its request id is in the audit
    page.goto(cluster.url("broken", "/"), timeout=15_000)
    assert page.locator("p.status").inner_text() == "502"
    request_id = page.inner_text("#request-id")
    assert re.fullmatch(r"[0-9a-f]{16}", request_id)
    assert page.evaluate("getComputedStyle(document.querySelector('.card')).borderRadius")\
        == "8px"                                  # the proxy's stylesheet was applied
    assert page.locator("a:has-text('Back to your apps')").get_attribute("href") == \
        cluster.url(path="/web/apps")
    shot("app-error-page")

    def logged():
        found = [e for e in audit(cluster, "app.request")
                 if e["fields"].get("request_id") == request_id]
        return found or None
    event = wait_until(logged, 15, "the app.request event with the page's request id")[0]
    assert event["fields"]["status"] == 502 and event["fields"]["app"] == "broken"
    icon = page.goto(cluster.url(path="/favicon.ico"))
    assert icon.status == 200 and icon.headers["content-type"].startswith("image/svg")

    # -- phone width: nothing scrolls sideways
    phone = carol_ctx.new_page()
    phone.set_viewport_size({"width": 390, "height": 844})
    for path, name in (("/web/apps", "phone-catalogue"), ("/web/requests", "phone-requests"),
                       ("/web/account", "phone-account")):
        phone.goto(cluster.url(path=path))
        assert phone.evaluate(NO_SIDEWAYS), path
        assert phone.locator(".who button").is_visible()
        phone.screenshot(path=str(shots / f"{name}.png"), full_page=True)
    phone.goto(cluster.url("broken", "/"))
    assert phone.evaluate(NO_SIDEWAYS)
    phone.close()

    # -- keyboard: the first Tab reaches the skip link, focus is visible
    page.goto(cluster.url(path="/web/apps"))
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.className") == "skip"

    # -- sign out: the app subdomain asks to sign in again
    page.click(".who button")
    page.wait_for_url(re.compile(r"/web/login"), timeout=10_000)
    page.goto(cluster.url("wiki", "/"), timeout=15_000)
    page.wait_for_url(re.compile(r"/web/login"), timeout=15_000)
    shot("signed-out")
    carol_ctx.close()
