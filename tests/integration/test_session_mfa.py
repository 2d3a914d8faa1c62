"""Per-session MFA (issue 10, a role's ``require_session_mfa``) against the installed
proxy, agent and CLI: a browser launch through the real redirects blocked until a TOTP
code is given (wrong and replayed codes refused), ``apptunnel proxy app`` with and without
``--otp``, and the one-app certificate refused for another app and after its validity.

Each TOTP device accepts a time step once, so each successful code here comes from its
own device (enrolled by the test, codes computed with pyotp); every wait is bounded.
"""

from __future__ import annotations

import html
import json
import re
import socket
import socketserver
import subprocess
import threading
import time

import pyotp
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.support.cli_user import ca_pin, log_in, start, user_env
from tests.support.chromium import page_with_authenticator
from tests.support.cluster import BIN, Browser, Cluster, audit, free_port, wait_until
from tests.support.localhost import localhost_resolution
from tests.support.upstream import HttpUpstream

PASSWORD = "correct horse battery staple"
DEVICES = ("browser", "cli", "cert", "tcp")


class TcpEcho(socketserver.ThreadingTCPServer):
    """A raw TCP app on loopback: echoes what it reads (daemon threads, bounded reads)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self):
        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                self.request.settimeout(20)
                while data := self.request.recv(4096):
                    self.request.sendall(data)

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def cluster():
    upstream, echo = HttpUpstream(), TcpEcho()
    c = Cluster([
        {"name": "hello", "uri": upstream.uri, "labels": {"env": "dev"}},
        {"name": "prodweb", "uri": upstream.uri, "labels": {"env": "prod"}},
        {"name": "proddb", "uri": f"tcp://127.0.0.1:{echo.server_address[1]}",
         "labels": {"env": "prod"}},
    ])
    try:
        c.start_proxy()
        c.add_role({"kind": "role", "metadata": {"name": "dev"},
                    "spec": {"allow": {"app_labels": {"env": "dev"}}}})
        c.add_role({"kind": "role", "metadata": {"name": "prod-mfa"},
                    "spec": {"options": {"require_session_mfa": True},
                             "allow": {"app_labels": {"env": "prod"}}}})
        c.add_user("alice", ["dev", "prod-mfa"], PASSWORD)
        c.start_agent()
        yield c
    finally:
        c.stop()
        upstream.stop()
        echo.shutdown()
        echo.server_close()


def origin(cluster) -> dict:
    return {"Origin": cluster.url().rstrip("/")}


@pytest.fixture(scope="module")
def totps(cluster) -> dict[str, pyotp.TOTP]:
    """alice's TOTP devices, one per test that needs a fresh code (enrolled by the API)."""
    browser = Browser(cluster)
    r = browser.post(cluster.url(path="/v1/sessions"), headers=origin(cluster),
                     json={"username": "alice", "password": PASSWORD})
    assert r.status_code == 200, r.text
    devices = {}
    for name in DEVICES:
        secret = browser.post(cluster.url(path="/v1/mfa/totp"), headers=origin(cluster),
                              json={}).json()["secret"]
        devices[name] = pyotp.TOTP(secret)
        r = browser.post(cluster.url(path="/v1/mfa/devices"), headers=origin(cluster),
                         json={"type": "totp", "name": name, "secret": secret,
                               "otp": devices[name].now()})
        assert r.status_code == 200, r.text
    wait_until(lambda: _online(cluster), 30, "prodweb to be online")
    return devices


def _online(cluster) -> bool:
    if not cluster.agent.alive():
        raise AssertionError("agent exited:\n" + cluster.agent.log_tail())
    browser = Browser(cluster)
    browser.post(cluster.url(path="/v1/sessions"), headers=origin(cluster),
                 json={"username": "alice", "password": PASSWORD})
    apps = browser.get(cluster.url(path="/v1/apps")).json()["apps"]
    return any(a["name"] == "prodweb" and a["online"] for a in apps)


def next_code(totp: pyotp.TOTP) -> str:
    """A code of a step after the one spent at enrollment (inside the ±1 step window)."""
    return totp.at(time.time() + 30)


def prompt_form(page: requests.Response) -> tuple[str, dict]:
    """(action URL, hidden fields) of the per-session MFA prompt."""
    action = re.search(r'<form method="post" action="([^"]+)"', page.text).group(1)
    hidden = dict(re.findall(r'<input type="hidden" name="(\w+)" value="([^"]*)">', page.text))
    return action, {k: html.unescape(v) for k, v in hidden.items()}


def test_browser_launch_is_blocked_until_the_totp_code(cluster, totps):
    """Opening the app signs in, then stops at the prompt (the app is not reached); a
    wrong code and a cross-site POST are refused; the right code hands off to the app;
    the next request of that app session needs nothing; a new app session (another
    browser) asks again and the code already used is refused as a replay."""
    browser = Browser(cluster)
    page = browser.login_through(cluster.url("prodweb", "/echo?x=1"), "alice", PASSWORD)
    assert page.status_code == 200 and 'name="otp"' in page.text, page.text[:500]
    assert page.url.startswith(cluster.url(path="/web/launch/prodweb"))
    assert '"headers"' not in page.text                 # the app was not reached
    action, hidden = prompt_form(page)
    url = cluster.url(path=html.unescape(action))
    wrong = browser.post(url, data={**hidden, "otp": "000000"}, headers=origin(cluster))
    assert wrong.status_code == 401 and "invalid second factor" in wrong.text
    code = next_code(totps["browser"])
    cross = browser.post(url, data={**hidden, "otp": code},
                         headers={"Origin": "https://evil.example"})
    assert cross.status_code == 403
    landed = browser.post(url, data={**hidden, "otp": code}, headers=origin(cluster))
    assert landed.status_code == 200, landed.text[:500]
    assert landed.json()["path"] == "/echo?x=1"
    again = browser.get(cluster.url("prodweb", "/echo?x=2"))
    assert again.status_code == 200 and again.json()["path"] == "/echo?x=2"

    other = Browser(cluster)
    page = other.login_through(cluster.url("prodweb", "/echo"), "alice", PASSWORD)
    action, hidden = prompt_form(page)
    replay = other.post(cluster.url(path=html.unescape(action)), data={**hidden, "otp": code},
                        headers=origin(cluster))
    assert replay.status_code == 401 and '"headers"' not in replay.text
    # An app no MFA role covers launches as before.
    plain = other.get(cluster.url("hello", "/echo"))
    assert plain.status_code == 200 and plain.json()["path"] == "/echo"

    def refused_reasons():
        return {e["fields"].get("reason") for e in audit(cluster, "session.mfa")
                if e["outcome"] == "failure"} >= {"wrong code", "replayed code"}

    wait_until(refused_reasons, 10, "the audit of the wrong and replayed codes", interval=0.5)


def proxy_app(home, *args: str) -> subprocess.CompletedProcess:
    """`apptunnel proxy app` without a terminal (a new session has no /dev/tty)."""
    return subprocess.run([str(BIN / "apptunnel"), "proxy", "app", *args], capture_output=True,
                          text=True, timeout=30, env=user_env(home), start_new_session=True)


def test_proxy_app_asks_for_a_code_and_uses_a_one_app_certificate(cluster, totps,
                                                                   tmp_path):
    """Without --otp (and no terminal) proxy app exits with one line naming --otp; with a
    wrong code it exits with one line; with the right code it listens and curl reaches
    the app through the one-app certificate."""
    home = tmp_path / ".apptunnel"
    log_in(cluster, "alice", home, PASSWORD, ca_pin(cluster))
    port = free_port()
    missing = proxy_app(home, "prodweb", "--port", str(port))
    assert missing.returncode != 0
    lines = missing.stderr.strip().splitlines()
    assert len(lines) == 1 and "--otp" in lines[0] and "second factor" in lines[0], lines
    wrong = proxy_app(home, "prodweb", "--port", str(port), "--otp", "000000")
    lines = wrong.stderr.strip().splitlines()
    assert wrong.returncode == 1 and len(lines) == 1 and "invalid second factor" in lines[0]

    running = _start_with_otp(home, "prodweb", str(port), next_code(totps["cli"]))
    try:
        r = subprocess.run(["curl", "-sS", "--max-time", "20", f"http://127.0.0.1:{port}/echo"],
                           capture_output=True, text=True, timeout=30)
    finally:
        running.stop()
    assert r.returncode == 0, r.stderr + running.log()
    assert json.loads(r.stdout)["path"] == "/echo"


def test_proxy_app_for_a_tcp_app_needs_the_code_too(cluster, totps, tmp_path):
    """A raw TCP app under an MFA role: without --otp one line and no listener; with
    the code, bytes go through to the app and back."""
    home = tmp_path / ".apptunnel"
    log_in(cluster, "alice", home, PASSWORD, ca_pin(cluster))
    port = free_port()
    missing = proxy_app(home, "proddb", "--port", str(port))
    lines = missing.stderr.strip().splitlines()
    assert missing.returncode != 0 and len(lines) == 1 and "--otp" in lines[0], lines
    running = _start_with_otp(home, "proddb", str(port), next_code(totps["tcp"]))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=20) as conn:
            conn.sendall(b"ping through mfa\n")
            got = b""
            while len(got) < 17:
                chunk = conn.recv(100)
                if not chunk:
                    break
                got += chunk
    finally:
        running.stop()
    assert got == b"ping through mfa\n", running.log()


def _start_with_otp(home, name: str, port: str, code: str):
    """A running `proxy app NAME --port PORT --otp CODE` (cli_user.start takes no flags)."""
    return start(home, name, f"{port}", wait=True, extra=("--otp", code))


def test_one_app_certificate_opens_its_app_only_and_only_while_valid(cluster, totps,
                                                                     tmp_path):
    """POST /v1/certs/app after a fresh code: the certificate opens prodweb, is refused
    on hello (another app) and, once its validity (asked down to 3 s) has passed, starts
    nothing; the login certificate alone is told prodweb needs a second factor."""
    home = tmp_path / ".apptunnel"
    log_in(cluster, "alice", home, PASSWORD, ca_pin(cluster))
    profile_cert, profile_key = _profile(home)
    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    with localhost_resolution():
        r = requests.post(cluster.url(path="/v1/certs/app"), verify=cluster.ca_file,
                          cert=(profile_cert, profile_key), timeout=30,
                          json={"public_key": public.decode(), "app": "prodweb", "ttl": 3,
                                "otp": next_code(totps["cert"])})
    assert r.status_code == 200, r.text
    bound_cert, bound_key = tmp_path / "bound.crt", tmp_path / "bound.key"
    bound_cert.write_text(r.json()["cert"])
    bound_key.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                            serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
    bound = (str(bound_cert), str(bound_key))
    ok = _get(cluster, "prodweb", bound)
    assert ok.status_code == 200 and ok.json()["path"] == "/echo"
    other = _get(cluster, "hello", bound)
    assert other.status_code == 403 and "this certificate only opens prodweb" in other.text
    plain = _get(cluster, "prodweb", (profile_cert, profile_key))
    assert plain.status_code == 403 and "needs a second factor" in plain.text
    # A one-app certificate cannot mint certificates or list apps.
    with localhost_resolution():
        listing = requests.get(cluster.url(path="/v1/apps"), verify=cluster.ca_file,
                               cert=bound, timeout=30)
    assert listing.status_code == 403
    deadline = r.json()["expires"] + 1
    time.sleep(max(0.0, deadline - time.time()))      # its own validity, bounded (3 s)
    try:
        late = _get(cluster, "prodweb", bound)
    except requests.exceptions.SSLError:
        return                                          # refused at the handshake
    assert late.status_code != 200 and '"headers"' not in late.text


def _profile(home) -> tuple[str, str]:
    """The login certificate and key files of a profile (cli/profile.py)."""
    return str(home / "user.crt"), str(home / "user.key")


def _get(cluster, app: str, cert) -> requests.Response:
    with localhost_resolution():
        return requests.get(cluster.url(app, "/echo"), verify=cluster.ca_file, cert=cert,
                            timeout=30, allow_redirects=False)


def test_security_key_answers_the_prompt_in_chromium(cluster, totps, chromium_page):
    """Real Chromium with the DevTools virtual authenticator: alice adds a security key on
    her account page, then opening prodweb stops at the prompt and the key (through
    /static/webauthn.js) hands off to the app."""
    page = chromium_page
    page.goto(cluster.url(path="/web/login?next=%2Fweb%2Faccount"), timeout=15_000)
    page.fill("input[name=username]", "alice")
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(cluster.url(path="/web/account"), timeout=15_000)
    page.click("button[data-webauthn-start]:has-text('Add security key')")
    page.wait_for_selector("td.name:has-text('key')", timeout=15_000)
    page.goto(cluster.url("prodweb", "/echo?via=key"), timeout=15_000)
    page.wait_for_selector("text=Use your security key", timeout=15_000)
    assert "prodweb asks for a second factor" in page.content()
    page.click("button[data-webauthn-start]")
    page.wait_for_url(cluster.url("prodweb", "/echo?via=key"), timeout=15_000)
    assert "/echo?via=key" in page.content()

    def key_checks():
        return [e for e in audit(cluster, "session.mfa")
                if e["outcome"] == "success" and e["fields"].get("method") == "webauthn"]

    wait_until(key_checks, 10, "the audit of the security-key check", interval=0.5)


@pytest.fixture(scope="module")
def chromium_page():
    with page_with_authenticator() as page:
        yield page
