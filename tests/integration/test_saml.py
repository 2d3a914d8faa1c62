"""Sign-in through a SAML connector against a real pysaml2 IdP and the installed proxy (issue 10).

One IdP process (tests/support/saml_idp.py) and one cluster for the module: a proxy, an
agent and an app whose role is granted by the IdP's ``devs`` group and whose label names
the user's ``{{external.mail}}`` attribute, so only alice may open it. Every response
travels the real way: proxy -> IdP (HTTP-Redirect) -> IdP login -> auto-POST to the ACS.
"""

from __future__ import annotations

import base64
import html
import re
import subprocess
from urllib.parse import parse_qs, urlsplit

import pytest
import pytest_twisted
import requests
import yaml

from tests.support.cli_user import ca_pin, user_env
from tests.support.cluster import BIN, Browser, Cluster, app_jwt_claims, audit, wait_until
from tests.support.localhost import localhost_resolution
from tests.support.saml_idp import SamlIdp
from tests.support.upstream import HttpUpstream
from tests.support.waiting import wait

REFUSED = "the identity provider's answer could not be accepted"


@pytest.fixture(scope="module")
def idp(tmp_path_factory):
    server = SamlIdp(tmp_path_factory.mktemp("saml-idp")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def cluster(idp):
    upstream = HttpUpstream()
    c = Cluster([{"name": "hello", "uri": upstream.uri,
                  "labels": {"owner": "alice@example.org"}}])
    try:
        c.start_proxy()
        acs = c.url(path="/v1/webapi/saml/acs/okta")
        docs = [
            {"kind": "role", "metadata": {"name": "dev-apps"},
             "spec": {"allow": {"app_labels": {"owner": "{{external.mail}}"}}}},
            {"kind": "saml", "metadata": {"name": "okta"},
             "spec": {"acs": acs, "entity_descriptor_url": idp.metadata_url,
                      "display": "Okta",
                      "attributes_to_roles": [
                          {"name": "groups", "value": "devs", "roles": ["dev-apps"]}]}},
        ]
        path = c.root / "connectors.yaml"
        path.write_text(yaml.safe_dump_all(docs))
        c.cli("create", "-f", str(path))
        with localhost_resolution():
            metadata = requests.get(c.url(path="/v1/webapi/saml/metadata/okta"),
                                    verify=c.ca_file, timeout=30)
        assert metadata.status_code == 200, metadata.text
        assert acs in metadata.text and "X509Certificate" in metadata.text
        idp.trust_sp(metadata.text)
        c.start_agent()
        yield c
    finally:
        c.stop()
        upstream.stop()


def idp_answer(cluster, browser: Browser, idp: SamlIdp, user: str, mode: str = "normal",
               url: str | None = None) -> tuple[str, dict]:
    """Start at the sign-in page's button, sign in at the IdP: (ACS URL, the POST form)."""
    page = browser.get(url or cluster.url(path="/web/login"))
    assert page.url.startswith(cluster.url(path="/web/login")), page.url
    button = re.search(r'<a class="button" data-kind="saml" href="([^"]*)"', page.text)
    assert button and "Sign in with Okta" in page.text, page.text
    at_idp = browser.get(cluster.url(path=html.unescape(button.group(1))))
    assert at_idp.url.startswith(idp.base + "/sso/redirect?SAMLRequest="), at_idp.url
    key = re.search(r'name="key" value="([^"]*)"', at_idp.text).group(1)
    answer = browser.post(idp.base + "/login", data={
        "key": key, "username": user, "password": f"{user}-pw", "mode": mode})
    assert answer.status_code == 200, answer.text
    action = html.unescape(re.search(r'action="([^"]*)"', answer.text).group(1))
    form = {name: html.unescape(value) for name, value in
            re.findall(r'name="(SAMLResponse|RelayState)" value="([^"]*)"', answer.text)}
    assert action == cluster.url(path="/v1/webapi/saml/acs/okta")
    return action, form


def edited(form: dict, change) -> dict:
    xml = base64.b64decode(form["SAMLResponse"]).decode()
    changed = change(xml)
    assert changed != xml
    return {**form, "SAMLResponse": base64.b64encode(changed.encode()).decode()}


def saml_logins(cluster) -> list[dict]:
    return [{"actor": e["actor"], "outcome": e["outcome"], **e["fields"]}
            for e in audit(cluster, "user.login") if e["fields"].get("method") == "saml"]


def test_sign_in_maps_attributes_and_opens_the_app_with_external_traits(cluster, idp):
    """From the app through the sign-in page's SAML button and the IdP back to the app:
    alice's ``devs`` group gives the role, her attributes are the JWT's traits."""
    browser = Browser(cluster)
    def online():
        with localhost_resolution():
            r = requests.get(cluster.url("hello", "/echo?x=1"), verify=cluster.ca_file,
                             timeout=5, allow_redirects=False)
        return r.status_code == 302
    wait_until(online, 30, "the agent to register hello")
    action, form = idp_answer(cluster, browser, idp, "alice",
                              url=cluster.url("hello", "/echo?x=1"))
    landed = browser.post(action, data=form)
    assert landed.status_code == 200, landed.text
    echo = landed.json()
    assert echo["path"] == "/echo?x=1"
    claims = app_jwt_claims(cluster, echo)
    assert claims["username"] == "alice" and claims["roles"] == ["dev-apps"]
    assert claims["traits"]["mail"] == ["alice@example.org"]
    assert set(claims["traits"]["groups"]) == {"devs", "admins"}
    events = wait_until(lambda: [e for e in saml_logins(cluster)
                                 if e["actor"] == "alice" and e["outcome"] == "success"],
                        10, "alice's audited SAML sign-in")
    assert events[0]["connector"] == "okta"


def test_a_user_mapping_to_no_role_is_refused_and_audited(cluster, idp):
    """bob's signed answer is genuine but his group maps to nothing: 403 saying so."""
    browser = Browser(cluster)
    action, form = idp_answer(cluster, browser, idp, "bob")
    refused = browser.post(action, data=form)
    assert refused.status_code == 403 and "maps to a role" in html.unescape(refused.text)
    assert browser.get(cluster.url(path="/v1/apps")).status_code == 401
    wait_until(lambda: [e for e in saml_logins(cluster) if e["actor"] == "bob"
                        and e.get("reason") == "no role"], 10, "bob's audited refusal")


@pytest.mark.parametrize("attack", ["tampered", "stripped", "foreign key", "sha1"])
def test_forged_responses_are_refused_and_audited(cluster, idp, attack):
    """A changed attribute, a response without signatures, one signed by another key
    under the IdP's entity id, and one signed with SHA-1 sign nobody in (401, audited)."""
    browser = Browser(cluster)
    mode = {"foreign key": "rogue", "sha1": "sha1"}.get(attack, "normal")
    action, form = idp_answer(cluster, browser, idp, "alice", mode=mode)
    if attack == "tampered":
        form = edited(form, lambda xml: xml.replace(">admins<", ">root<"))
    elif attack == "stripped":
        form = edited(form, lambda xml: re.sub(
            r"<(\w+:)?Signature[ >].*?</(\w+:)?Signature>", "", xml, flags=re.S))
    before = len(saml_logins(cluster))
    refused = browser.post(action, data=form)
    assert refused.status_code == 401 and REFUSED in html.unescape(refused.text), refused.text
    assert browser.get(cluster.url(path="/v1/apps")).status_code == 401
    events = wait_until(lambda: saml_logins(cluster)[before:], 10, "the audited refusal")
    assert events[-1]["outcome"] == "failure" and events[-1]["connector"] == "okta"
    if attack == "sha1":
        assert "rsa-sha1" in events[-1]["reason"], events[-1]
    # One line of ours per refusal; pysaml2's own logging stays out of the proxy's log.
    log = (cluster.root / "proxy.log").read_text()
    assert "Traceback" not in log
    assert all("apptunnel.auth.connectors.saml" in line for line in log.splitlines()
               if "Signature" in line or "saml2" in line), log[-3000:]


def test_a_replayed_response_is_refused_also_after_a_restart(cluster, idp):
    """The request id is taken once from the backend: replaying the same POST (with the
    same request cookie) is refused, and still is after the proxy restarts."""
    browser = Browser(cluster)
    action, form = idp_answer(cluster, browser, idp, "alice")
    cookie = browser.session.cookies.get("__Host-apptunnel_saml")
    assert cookie
    first = browser.post(action, data=form, allow_redirects=False)
    assert first.status_code == 303, first.text

    def replay() -> requests.Response:
        thief = Browser(cluster)
        thief.session.cookies.set("__Host-apptunnel_saml", cookie,
                                  domain="apptunnel.localhost")
        return thief.post(action, data=form, allow_redirects=False)

    assert replay().status_code == 401
    cluster.proxy.stop()
    cluster.start_proxy()
    again = replay()
    assert again.status_code == 401 and REFUSED in html.unescape(again.text)
    wait_until(lambda: sum("already answered" in e.get("reason", "")
                           for e in saml_logins(cluster)) >= 2, 10, "both audited replays")


@pytest_twisted.ensureDeferred
async def test_idp_metadata_is_fetched_bounded():
    """fetch_metadata reads an IdP's metadata with treq; more than 1 MiB is refused, with
    or without a Content-Length, and a non-200 answer is an error."""
    from twisted.internet import reactor
    from twisted.web.resource import Resource as WebResource
    from twisted.web.server import NOT_DONE_YET, Site
    from twisted.web.static import Data

    from apptunnel.auth.connectors.saml import MAX_METADATA, fetch_metadata

    class Chunked(WebResource):
        isLeaf = True

        def render_GET(self, request):
            for _ in range(MAX_METADATA // 65536 + 2):
                request.write(b"x" * 65536)
            request.finish()
            return NOT_DONE_YET

    root = WebResource()
    root.putChild(b"small", Data(b"<EntityDescriptor/>", "application/xml"))
    root.putChild(b"big", Data(b"x" * (MAX_METADATA + 1), "application/xml"))
    root.putChild(b"chunked", Chunked())
    port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
    base = f"http://127.0.0.1:{port.getHost().port}"
    try:
        assert await wait(fetch_metadata(base + "/small")) == b"<EntityDescriptor/>"
        for path, problem in (("/big", "larger than 1 MiB"), ("/chunked", "larger than 1 MiB"),
                              ("/missing", "HTTP 404")):
            with pytest.raises(ValueError, match=problem):
                await wait(fetch_metadata(base + path))
    finally:
        await port.stopListening()


def test_cli_login_with_auth_no_browser_through_the_idp_gets_a_working_certificate(
        cluster, idp, tmp_path):
    """`apptunnel login --auth okta --no-browser` prints the URL; the test signs in at the
    IdP as a browser would; the ACS, seeing a sign-in the CLI started, opens no web
    session but sends the browser to the CLI's listener with a one-time code, which the
    CLI exchanges (with its verifier) for a certificate that lists alice's app. The code
    is spent: a second exchange, even with a verifier, is refused."""
    home = tmp_path / "home"
    cmd = [str(BIN / "apptunnel"), "login", "--proxy", cluster.public_addr, "--auth", "okta",
           "--no-browser", "--ca-pin", ca_pin(cluster)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=user_env(home), cwd=str(tmp_path))
    try:
        lines = [proc.stdout.readline() for _ in range(2)]
        url = lines[1].strip()
        port = int(parse_qs(urlsplit(url).query)["cli_port"][0])
        assert url.startswith(cluster.url(path="/web/sso/okta?")), lines
        browser = Browser(cluster)
        at_idp = browser.get(url)
        assert at_idp.url.startswith(idp.base + "/sso/redirect?SAMLRequest="), at_idp.url
        assert "cli_state" not in at_idp.url and "cli_challenge" not in at_idp.url
        key = re.search(r'name="key" value="([^"]*)"', at_idp.text).group(1)
        answer = browser.post(idp.base + "/login", data={
            "key": key, "username": "alice", "password": "alice-pw", "mode": "normal"})
        assert answer.status_code == 200, answer.text
        action = html.unescape(re.search(r'action="([^"]*)"', answer.text).group(1))
        form = {name: html.unescape(value) for name, value in
                re.findall(r'name="(SAMLResponse|RelayState)" value="([^"]*)"', answer.text)}
        assert "cli_" not in form.get("RelayState", "")
        back = browser.post(action, data=form, allow_redirects=False)
        location = back.headers.get("Location", "")
        assert back.status_code == 302 and \
            location.startswith(f"http://127.0.0.1:{port}/callback?"), (back.status_code,
                                                                        back.text)
        assert not any("session" in c.name for c in browser.session.cookies)
        code = parse_qs(urlsplit(location).query)["code"][0]
        plain = requests.Session()
        plain.trust_env = False
        done = plain.get(location, timeout=5)
        assert done.status_code == 200 and "Signed in" in done.text
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert proc.returncode == 0, err
    assert "as alice (roles: dev-apps)" in out, out
    apps = subprocess.run([str(BIN / "apptunnel"), "apps", "ls"], capture_output=True,
                          text=True, timeout=30, env=user_env(home))
    assert apps.returncode == 0 and "hello" in apps.stdout, (apps.stdout, apps.stderr)
    with localhost_resolution():
        again = requests.post(cluster.url(path="/v1/certs"), verify=cluster.ca_file, timeout=10,
                              json={"sso_code": code, "code_verifier": "x" * 43,
                                    "public_key": _public_pem()})
    assert again.status_code == 401, again.text


def _public_pem() -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
