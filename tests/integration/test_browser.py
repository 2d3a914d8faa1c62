"""A real browser (headless Chromium) through the whole path, as a user clicks it.

The browser opens an app's subdomain, is sent to the sign-in page, signs in, and lands on
the page it asked for; the app answers with the identity the proxy vouched for. Chromium
resolves `*.localhost` to loopback by itself; the cluster CA is not installed in it, so
certificate errors are ignored for this profile only (the TLS checks themselves are
covered by the other end-to-end tests).
"""

from __future__ import annotations

import json

import pytest

from tests.support.chromium import ARGS, CHROMIUM
from tests.support.cluster import Cluster, wait_until
from tests.support.system import require_program
from tests.support.upstream import HttpUpstream

PASSWORD = "browser test password"


@pytest.fixture(scope="module")
def cluster():
    upstream = HttpUpstream()
    c = Cluster([{"name": "hello", "uri": upstream.uri, "labels": {"env": "demo"}},
                 {"name": "secret", "uri": upstream.uri, "labels": {"env": "prod"}}])
    try:
        c.start_proxy()
        c.add_role({"kind": "role", "metadata": {"name": "demo-apps"},
                    "spec": {"allow": {"app_labels": {"env": "demo"}}}})
        c.add_user("carol", ["demo-apps"], PASSWORD)
        c.start_agent()
        yield c
    finally:
        c.stop()
        upstream.stop()


@pytest.fixture(scope="module")
def page():
    from playwright.sync_api import sync_playwright

    require_program(CHROMIUM, "chromium")

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        context = browser.new_context(ignore_https_errors=True)
        yield context.new_page()
        context.close()
        browser.close()


def test_browser_signs_in_and_lands_on_the_app_path(cluster, page):
    """Open the app, get the sign-in form, submit it, land on the app's path as carol."""
    app_url = cluster.url("hello", "/echo?from=browser")

    def reachable():
        assert cluster.agent.alive(), cluster.agent.log_tail()
        page.goto(app_url, timeout=10_000)
        return "/web/login" in page.url

    wait_until(reachable, 30, "the app to redirect to sign-in", interval=0.5)
    page.fill("input[name=username]", "carol")
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(app_url, timeout=15_000)
    echo = json.loads(page.inner_text("body"))
    assert echo["path"] == "/echo?from=browser"
    token = [v for k, v in echo["headers"] if k.lower() == "apptunnel-jwt-assertion"]
    assert len(token) == 1

    cookies = {c["name"]: c for c in page.context.cookies(app_url)}
    app_cookie = cookies["__Host-apptunnel_app"]
    assert app_cookie["secure"] and app_cookie["httpOnly"]
    assert app_cookie["domain"] == "hello.apptunnel.localhost"
    assert page.evaluate("document.cookie") == ""  # nothing readable by the app's scripts


def test_browser_sees_the_launcher_and_a_denied_app(cluster, page):
    """The launcher lists only allowed apps; opening a denied app shows a 403 page."""
    page.goto(cluster.url(path="/"))
    assert page.locator("[data-name=hello]").count() == 1      # a card per allowed app
    assert page.locator("[data-name=secret]").count() == 0
    response = page.goto(cluster.url("secret", "/echo"))
    assert response.status == 403
    assert "Access denied" in page.content()
    assert '"headers"' not in page.content()
