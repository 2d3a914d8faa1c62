"""WebAuthn in real Chromium with the DevTools virtual authenticator, against the installed
proxy with ``auth: {second_factor: webauthn}``: a new user is sent to enroll a key, then
signs in with password + key and lands where `next` pointed."""

from __future__ import annotations

import pytest
import yaml

from tests.support.chromium import page_with_authenticator
from tests.support.cluster import Browser, Cluster, audit, wait_until

PASSWORD = "webauthn test password"


@pytest.fixture(scope="module")
def cluster():
    c = Cluster([])
    config = yaml.safe_load(c.proxy_config.read_text())
    config["auth"] = {"second_factor": "webauthn"}
    c.proxy_config.write_text(yaml.safe_dump(config))
    try:
        c.start_proxy()
        c.add_role({"kind": "role", "metadata": {"name": "access"}, "spec": {"allow": {}}})
        c.add_user("erin", ["access"], PASSWORD)
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def page():
    with page_with_authenticator() as page:
        yield page


def sign_in(page, cluster, next_path: str) -> None:
    page.goto(cluster.url(path="/web/login?next=" + next_path), timeout=15_000)
    page.fill("input[name=username]", "erin")
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")


def test_register_a_key_then_sign_in_with_it(cluster, page):
    """Enroll-only session -> account page -> register the virtual key (recovery codes
    shown once) -> sign out -> password, then the key -> lands on `next`."""
    sign_in(page, cluster, "/")
    page.wait_for_url(cluster.url(path="/web/account"), timeout=15_000)
    assert "requires a second factor" in page.content()
    page.click("button[data-webauthn-start]:has-text('Add security key')")
    page.wait_for_selector("text=Recovery codes", timeout=15_000)
    assert page.locator("ul.codes li").count() == 10
    assert page.locator("td.name", has_text="key").count() == 1

    page.click("button:has-text('Sign out')")
    page.wait_for_url(cluster.url(path="/web/login"), timeout=15_000)
    sign_in(page, cluster, "/web/account")
    page.wait_for_selector("text=Use your security key", timeout=15_000)
    page.click("button[data-webauthn-start]")
    page.wait_for_url(cluster.url(path="/web/account"), timeout=15_000)
    assert "requires a second factor" not in page.content()

    # Again: the sign count must grow, and it does.
    page.click("button:has-text('Sign out')")
    sign_in(page, cluster, "/")
    page.click("button[data-webauthn-start]")
    page.wait_for_url(cluster.url(path="/"), timeout=15_000)
    assert "Applications" in page.content()

    def webauthn_logins():
        return [e for e in audit(cluster, "user.login") if e["fields"].get("method") == "webauthn"]

    wait_until(lambda: len(webauthn_logins()) >= 2, 10, "the audit of both key sign-ins")
    assert [e["outcome"] for e in webauthn_logins()] == ["success", "success"]


def test_api_names_webauthn_with_a_fresh_challenge(cluster, page):
    """POST /v1/sessions without a factor: 401 listing webauthn, with sign-in options
    whose challenge is new each time; a made-up assertion is refused."""
    answers = []
    for _ in range(2):
        response = Browser(cluster).post(cluster.url(path="/v1/sessions"),
                                         json={"username": "erin", "password": PASSWORD},
                                         headers={"Origin": cluster.url().rstrip("/")})
        assert response.status_code == 401
        answers.append(response.json())
    assert answers[0]["mfa_required"] == ["webauthn", "recovery_code"]
    assert answers[0]["webauthn"]["rpId"] == "apptunnel.localhost"
    assert answers[0]["webauthn"]["challenge"] != answers[1]["webauthn"]["challenge"]
    forged = {"id": "x", "rawId": "x", "type": "public-key", "response": {
        "clientDataJSON": "e30", "authenticatorData": "", "signature": ""}}
    response = Browser(cluster).post(cluster.url(path="/v1/sessions"),
                                     json={"username": "erin", "password": PASSWORD,
                                           "webauthn": forged},
                                     headers={"Origin": cluster.url().rstrip("/")})
    assert response.status_code == 401 and response.json()["error"] == "invalid second factor"
