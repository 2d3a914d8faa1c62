"""Sign-in through an OIDC connector against the real npm oidc-provider (issue 10).

One provider (tests/support/oidc_provider.py, behind a forwarding front that can rewrite
id_tokens) and one cluster for the module: a proxy, an agent and an app whose role is
granted by the ``devs`` group claim and whose label names the user's
``{{external.email}}`` trait. Every step goes through the real redirects with requests;
the tests that attack the flow stop at the callback and replay, alter or swap it.
"""

from __future__ import annotations

import base64
import html
import json
import re
import subprocess
import warnings
from urllib.parse import parse_qs, urlencode, urlsplit

import jwt as pyjwt
import pytest
import requests
import yaml
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.support.cli_user import ca_pin, user_env
from tests.support.cluster import BIN, Browser, Cluster, app_jwt_claims, audit, wait_until
from tests.support.localhost import localhost_resolution
from tests.support.oidc_provider import OidcProvider
from tests.support.upstream import HttpUpstream

CLIENT, SECRET = "apptunnel", "apptunnel-client-secret"
OTHER, OTHER_SECRET, OTHER_REDIRECT = "other-app", "other-secret", "http://127.0.0.1:9/cb"
ACCOUNTS = {
    "alice": {"password": "alice-pw", "email": "alice@example.org", "groups": ["devs"]},
    "bob": {"password": "bob-pw", "email": "bob@example.org", "groups": ["staff"]},
    "carol": {"password": "carol-pw", "email": "carol@example.org", "groups": ["devs"]},
}


@pytest.fixture(scope="module")
def cluster():
    upstream = HttpUpstream()
    c = Cluster([{"name": "hello", "uri": upstream.uri,
                  "labels": {"owner": "alice@example.org"}}])
    callback = f"https://{c.public_addr}/v1/webapi/oidc/callback"
    op = OidcProvider([{"client_id": CLIENT, "client_secret": SECRET, "redirect_uri": callback},
                       {"client_id": OTHER, "client_secret": OTHER_SECRET,
                        "redirect_uri": OTHER_REDIRECT}], ACCOUNTS)
    try:
        op.start()
        c.start_proxy()
        docs = [
            {"kind": "role", "metadata": {"name": "dev-apps"},
             "spec": {"allow": {"app_labels": {"owner": "{{external.email}}"}}}},
            {"kind": "oidc", "metadata": {"name": "corp"},
             "spec": {"issuer_url": op.issuer, "client_id": CLIENT, "client_secret": SECRET,
                      "redirect_url": callback, "scope": ["email", "groups"],
                      "claims_to_roles": [{"claim": "groups", "value": "devs",
                                           "roles": ["dev-apps"]}]}},
        ]
        path = c.root / "connectors.yaml"
        path.write_text(yaml.safe_dump_all(docs))
        c.cli("create", "-f", str(path))
        c.start_agent()
        c.op = op
        yield c
    finally:
        c.stop()
        op.stop()
        upstream.stop()


@pytest.fixture(autouse=True)
def _front_passes_tokens_through(cluster):
    cluster.op.front.replace_id_token = None
    yield
    cluster.op.front.replace_id_token = None


def login_events(cluster) -> list[dict]:
    return [{"actor": e["actor"], "outcome": e["outcome"], **e["fields"]}
            for e in audit(cluster, "user.login") if e["fields"].get("method") == "oidc"]


def step(browser: Browser, response: requests.Response, stop: str, form: dict,
         limit: int = 12) -> str:
    """Follow redirects by hand (posting ``form`` to the provider's login page) until a
    Location starts with ``stop``; that URL."""
    for _ in range(limit):
        if response.status_code in (301, 302, 303, 307, 308):
            location = response.headers["Location"]
            if location.startswith(stop):
                return location
            response = browser.get(requests.compat.urljoin(response.url, location),
                                   allow_redirects=False)
        elif response.status_code == 200 and "<form" in response.text:
            action = re.search(r'action="([^"]+)"', response.text).group(1)
            response = browser.post(requests.compat.urljoin(response.url, action), data=form,
                                    allow_redirects=False)
        else:
            raise AssertionError(f"unexpected {response.status_code}: {response.text[:300]}")
    raise AssertionError("too many hops")


def callback_url(cluster, browser: Browser, user: str, start: str = "/web/sso/corp?next=/"
                 ) -> str:
    """Start the flow at the proxy and sign in at the provider; the callback URL the
    provider sends the browser to (not yet opened)."""
    first = browser.get(cluster.url(path=start), allow_redirects=False)
    assert first.status_code == 302, first.text
    assert first.headers["Location"].startswith(cluster.op.issuer + "/auth?")
    form = {"username": user, "password": ACCOUNTS[user]["password"]}
    return step(browser, first, cluster.url(path="/v1/webapi/oidc/callback"), form)


def _app_online(cluster) -> bool:
    s = Browser(cluster)
    landed = s.get(callback_url(cluster, s, "alice"))
    apps = s.get(cluster.url(path="/v1/apps")).json()
    return landed.ok and any(a["name"] == "hello" and a["online"] for a in apps["apps"])


def test_sign_in_page_button_then_the_app_with_external_traits(cluster):
    """The sign-in page shows the connector's button; through it alice signs in at the
    provider and lands on the app path `next` pointed to (app hand-off included), the
    app's JWT carrying her claims as traits; the sign-in is audited (method oidc)."""
    wait_until(lambda: _app_online(cluster), 30, "the agent to register hello")
    browser = Browser(cluster)
    page = browser.get(cluster.url("hello", "/echo?x=1"))
    assert page.url.startswith(cluster.url(path="/web/login")), page.url
    button = re.search(r'<a class="button" data-kind="oidc" href="([^"]+)"', page.text)
    assert button and "Sign in with corp" in page.text, page.text
    start = browser.get(cluster.url(path=html.unescape(button.group(1))), allow_redirects=False)
    location = start.headers["Location"]
    query = parse_qs(urlsplit(location).query)
    assert query["code_challenge_method"] == ["S256"] and query["nonce"] and query["state"]
    form = {"username": "alice", "password": "alice-pw"}
    landed = browser.get(step(browser, start, cluster.url(path="/v1/webapi/oidc/callback"),
                              form))
    assert landed.status_code == 200, landed.text
    echo = landed.json()
    assert echo["path"] == "/echo?x=1"
    claims = app_jwt_claims(cluster, echo)
    assert claims["username"] == "alice@example.org" and claims["roles"] == ["dev-apps"]
    assert claims["traits"]["groups"] == ["devs"] and claims["traits"]["sub"] == ["alice"]
    events = wait_until(lambda: [e for e in login_events(cluster)
                                 if e["actor"] == "alice@example.org"], 10, "alice's event")
    assert events[-1]["outcome"] == "success" and events[-1]["connector"] == "corp"


def test_claims_that_map_to_no_role_are_refused_with_a_page_and_audited(cluster):
    browser = Browser(cluster)
    refused = browser.get(callback_url(cluster, browser, "bob"))
    assert refused.status_code == 403 and "maps to a role" in html.unescape(refused.text), (refused.url, refused.text[:2000])
    assert "text/html" in refused.headers["Content-Type"]
    [event] = wait_until(lambda: [e for e in login_events(cluster)
                                  if e["actor"] == "bob@example.org"], 10, "bob's event")
    assert event["outcome"] == "failure" and event["reason"] == "no role"


def _refusals(cluster, reason_part: str) -> list[dict]:
    return [e for e in login_events(cluster)
            if e["outcome"] == "failure" and reason_part in e.get("reason", "")]


def test_wrong_state_replayed_callback_and_another_browser_are_refused(cluster):
    """A made-up state, the same callback twice, and a callback opened in a browser that
    did not start the flow: each a clear page, each audited."""
    browser = Browser(cluster)
    url = callback_url(cluster, browser, "carol")
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    wrong = browser.get(cluster.url(path=parts.path + "?" + urlencode(
        {"code": query["code"][0], "state": "x" * 43})))
    assert wrong.status_code == 400 and "unknown, used or expired" in wrong.text
    done = browser.get(url, allow_redirects=False)
    assert done.status_code == 303 and "__Host-apptunnel_session" in done.headers["Set-Cookie"]
    again = browser.get(url, allow_redirects=False)
    assert again.status_code == 400 and "unknown, used or expired" in again.text

    other_url = callback_url(cluster, Browser(cluster), "carol")
    stranger = Browser(cluster).get(other_url)
    assert stranger.status_code == 400 and "another browser" in stranger.text
    wait_until(lambda: len(_refusals(cluster, "unknown or used state")) >= 2
               and _refusals(cluster, "wrong browser"), 10, "the refusals' audit events")


def _b64(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def _tampered(token: str) -> str:
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["groups"] = ["devs", "admins"]
    return ".".join([header, _b64(claims), signature])


def _foreign_key(token: str) -> str:
    claims = pyjwt.decode(token, options={"verify_signature": False})
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return pyjwt.encode(claims, key, algorithm="RS256", headers={"kid": "k1"})


def _alg_none(token: str) -> str:
    claims = pyjwt.decode(token, options={"verify_signature": False})
    return ".".join([_b64({"alg": "none", "typ": "JWT", "kid": "k1"}), _b64(claims), ""])


def _hs256(token: str) -> str:
    claims = pyjwt.decode(token, options={"verify_signature": False})
    with warnings.catch_warnings():   # the client secret is short for HMAC: that is the point
        warnings.simplefilter("ignore")
        return pyjwt.encode(claims, SECRET, algorithm="HS256", headers={"kid": "k1"})


@pytest.mark.parametrize("change,reason", [
    (_tampered, "Signature verification failed"),
    (_foreign_key, "Signature verification failed"),
    (_alg_none, "algorithm 'none' is not accepted"),
    (_hs256, "algorithm 'HS256' is not accepted"),
])
def test_a_tampered_or_forged_id_token_is_refused(cluster, change, reason):
    """The provider's real token with its payload altered, re-signed by another key, as
    ``alg: none`` or HMAC-signed with the client secret: refused (401 page), audited."""
    cluster.op.front.replace_id_token = change
    browser = Browser(cluster)
    refused = browser.get(callback_url(cluster, browser, "carol"))
    assert refused.status_code == 401 and "could not be completed" in refused.text
    wait_until(lambda: _refusals(cluster, reason), 10, f"the audit event ({reason})")


def test_a_token_for_another_audience_is_refused(cluster):
    """A real id_token of the same provider, minted for another client with this flow's
    nonce: the signature, issuer and nonce are right, the audience is not."""
    browser = Browser(cluster)
    first = browser.get(cluster.url(path="/web/sso/corp?next=/"), allow_redirects=False)
    nonce = parse_qs(urlsplit(first.headers["Location"]).query)["nonce"][0]
    other = Browser(cluster)
    verifier = "v" * 64
    challenge = base64.urlsafe_b64encode(
        __import__("hashlib").sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    start = other.get(cluster.op.issuer + "/auth?" + urlencode({
        "response_type": "code", "client_id": OTHER, "redirect_uri": OTHER_REDIRECT,
        "scope": "openid email groups", "state": "s" * 20, "nonce": nonce,
        "code_challenge": challenge, "code_challenge_method": "S256"}), allow_redirects=False)
    back = step(other, start, OTHER_REDIRECT, {"username": "carol", "password": "carol-pw"})
    code = parse_qs(urlsplit(back).query)["code"][0]
    session = requests.Session()
    session.trust_env = False
    foreign = session.post(cluster.op.issuer + "/token", auth=(OTHER, OTHER_SECRET), timeout=10,
                           data={"grant_type": "authorization_code", "code": code,
                                 "redirect_uri": OTHER_REDIRECT,
                                 "code_verifier": verifier}).json()["id_token"]
    assert pyjwt.decode(foreign, options={"verify_signature": False})["aud"] == OTHER
    cluster.op.front.replace_id_token = lambda _: foreign
    form = {"username": "carol", "password": "carol-pw"}
    refused = browser.get(step(browser, first, cluster.url(path="/v1/webapi/oidc/callback"),
                               form))
    assert refused.status_code == 401 and "could not be completed" in refused.text
    wait_until(lambda: _refusals(cluster, "Audience doesn't match"), 10, "the audit event")


def test_cli_login_with_auth_no_browser_completed_by_driving_the_printed_url(cluster, tmp_path):
    """`apptunnel login --auth corp --no-browser` prints the URL; the test signs in there
    as a browser would; the one-shot listener on 127.0.0.1 refuses a callback with another
    state, takes the real one, and the CLI exchanges its code for the certificate. The
    code cannot be used a second time, nor without the CLI's verifier."""
    home = tmp_path / "home"
    cmd = [str(BIN / "apptunnel"), "login", "--proxy", cluster.public_addr, "--auth", "corp",
           "--no-browser", "--ca-pin", ca_pin(cluster)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=user_env(home), cwd=str(tmp_path))
    try:
        lines = [proc.stdout.readline() for _ in range(2)]
        url = lines[1].strip()
        query = parse_qs(urlsplit(url).query)
        port = int(query["cli_port"][0])
        assert url.startswith(cluster.url(path="/web/sso/corp?")), lines
        session = requests.Session()
        session.trust_env = False
        wrong = session.get(f"http://127.0.0.1:{port}/callback?code=x&state=wrong", timeout=5)
        assert wrong.status_code == 400
        browser = Browser(cluster)
        first = browser.get(url, allow_redirects=False)
        back = step(browser, first, f"http://127.0.0.1:{port}/callback",
                    {"username": "carol", "password": "carol-pw"})
        assert "cert" not in back and "session" not in back
        code = parse_qs(urlsplit(back).query)["code"][0]
        done = session.get(back, timeout=5)
        assert done.status_code == 200 and "Signed in" in done.text
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert proc.returncode == 0, err
    assert "as carol@example.org (roles: dev-apps)" in out, out
    status = json.loads(subprocess.run([str(BIN / "apptunnel"), "status", "--format", "json"],
                                       capture_output=True, text=True, timeout=30,
                                       env=user_env(home)).stdout)
    assert status["user"] == "carol@example.org" and status["traits"]["groups"] == ["devs"]
    with localhost_resolution():
        again = requests.post(cluster.url(path="/v1/certs"), verify=cluster.ca_file, timeout=10,
                              json={"sso_code": code, "code_verifier": "x" * 43,
                                    "public_key": _public_pem()})
    assert again.status_code == 401, again.text


def test_cli_code_needs_the_cli_verifier(cluster):
    """A code taken from the callback URL by someone else (a browser's history, another
    local process) is worthless without the verifier the CLI kept."""
    browser = Browser(cluster)
    verifier = "w" * 43
    challenge = base64.urlsafe_b64encode(
        __import__("hashlib").sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    start = browser.get(cluster.url(path=f"/web/sso/corp?cli_port=9&cli_state={'s' * 20}"
                                          f"&cli_challenge={challenge}"), allow_redirects=False)
    assert start.status_code == 400      # port below 1024: refused
    start = browser.get(cluster.url(path=f"/web/sso/corp?cli_port=40000&cli_state={'s' * 20}"
                                          f"&cli_challenge={challenge}"), allow_redirects=False)
    back = step(browser, start, "http://127.0.0.1:40000/callback",
                {"username": "carol", "password": "carol-pw"})
    code = parse_qs(urlsplit(back).query)["code"][0]
    with localhost_resolution():
        stolen = requests.post(cluster.url(path="/v1/certs"), verify=cluster.ca_file, timeout=10,
                               json={"sso_code": code, "code_verifier": "y" * 43,
                                     "public_key": _public_pem()})
        assert stolen.status_code == 401, stolen.text
        # and spent: the right verifier no longer helps either
        late = requests.post(cluster.url(path="/v1/certs"), verify=cluster.ca_file, timeout=10,
                             json={"sso_code": code, "code_verifier": verifier,
                                   "public_key": _public_pem()})
        assert late.status_code == 401, late.text


def _public_pem() -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    return ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
