"""Headless Chromium for browser tests (TESTBED §3): Debian's binary, the flags a closed
network needs, and a page with a virtual WebAuthn authenticator."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from tests.support.system import require_program

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@contextlib.contextmanager
def page_with_authenticator() -> Iterator:
    """A Playwright page whose browser has a user-verifying platform authenticator."""
    from playwright.sync_api import sync_playwright

    require_program(CHROMIUM, "chromium")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        context = browser.new_context(ignore_https_errors=True)
        page = context.new_page()
        cdp = context.new_cdp_session(page)
        cdp.send("WebAuthn.enable", {"enableUI": False})
        cdp.send("WebAuthn.addVirtualAuthenticator", {"options": {
            "protocol": "ctap2", "transport": "internal", "hasResidentKey": True,
            "hasUserVerification": True, "isUserVerified": True,
            "automaticPresenceSimulation": True}})
        try:
            yield page
        finally:
            context.close()
            browser.close()
