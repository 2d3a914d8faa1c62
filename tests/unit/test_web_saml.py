"""The SAML routes of the web app (issue 10), in memory: buttons, the kind dispatch of
/web/sso/NAME, the request cookie and the ACS's outcomes. `SamlSignIn` is replaced by a
stand-in here; its own decisions are tests/unit/test_auth_saml.py's, the real IdP's are
tests/integration/test_saml.py's."""

from __future__ import annotations

import pytest_twisted

from apptunnel.auth.connectors.store import ConnectorStore
from apptunnel.auth.errors import AuthError
from apptunnel.auth.policy import RoleCache
from apptunnel.backend.records import Resource, User
from apptunnel.web.routes import WebApp
from apptunnel.web.saml import REQUEST_COOKIE, SamlWeb
from tests.support.connector_docs import LDAP_DOC, saml_doc
from tests.support.web_env import header, session_cookie


class StandIn:
    """SamlSignIn's surface: start hands out id-1; acs accepts only id-1's response."""

    def __init__(self) -> None:
        self.acs_calls = []
        self.cli = None

    async def metadata(self, name, address):
        return "<md:EntityDescriptor/>"

    async def start(self, name, target, address, cli=None):
        self.target, self.cli = target, cli
        return "id-1", "https://idp.example.com/sso?SAMLRequest=abc"

    async def acs(self, name, response, request_id, address, client):
        self.acs_calls.append((name, response, request_id))
        if request_id != "id-1" or response != "good":
            raise AuthError(401, "the identity provider's answer could not be accepted")
        return User("alice", None, ("dev",), {"groups": ("devs",)}, 1.0, connector="okta"), \
            "/web/launch/grafana?state=s", self.cli


async def with_saml(env) -> StandIn:
    await env.backend.put_resource(Resource("connector", "okta", {
        **saml_doc(), "spec": {**saml_doc()["spec"], "display": "Okta",
                               "attributes_to_roles": [{"name": "g", "value": "v",
                                                        "roles": ["dev"]}]}}))
    await env.backend.put_resource(Resource("connector", "corp-ldap", LDAP_DOC))
    stand_in = StandIn()
    env.web = WebApp(env.config, env.sessions, RoleCache(env.backend, env.clock), env.registry,
                     env.audit, env.jwt_keys, env.ca, env.clock, locks=env.locks,
                     users=env.users, backend=env.backend,
                     connectors=ConnectorStore(env.backend, env.clock),
                     saml=SamlWeb(stand_in))
    return stand_in


@pytest_twisted.ensureDeferred
async def test_the_sign_in_page_has_one_button_per_sso_connector_keeping_next(web_env):
    """No button without SAML connectors; with one, a button to /web/sso/NAME?next=..."""
    _, page = await web_env.call("GET", "/web/login")
    assert b"/web/sso/" not in page
    await with_saml(web_env)
    _, page = await web_env.call("GET", "/web/login?next=/web/launch/x%3Fstate%3D1")
    text = page.decode()
    assert ('<a class="button" data-kind="saml" href="/web/sso/okta?next='
            '/web/launch/x%3Fstate%3D1">Sign in with Okta</a>') in text
    assert "/web/sso/corp-ldap" not in text


@pytest_twisted.ensureDeferred
async def test_sso_start_dispatches_on_kind_and_sets_the_request_cookie(web_env):
    """SAML: 302 to the IdP, the request id in a __Host- cookie the IdP's POST brings back
    (SameSite=None), `next` made safe; an LDAP or unknown name is 404."""
    stand_in = await with_saml(web_env)
    response, _ = await web_env.call("GET", "/web/sso/okta?next=//evil.example.com")
    assert response.code == 302
    assert header(response, "location") == "https://idp.example.com/sso?SAMLRequest=abc"
    assert stand_in.target == "/"
    [cookie] = response.headers.getRawHeaders(b"set-cookie")
    assert cookie.startswith(f"{REQUEST_COOKIE}=id-1;".encode())
    assert b"SameSite=None" in cookie and b"Secure" in cookie and b"HttpOnly" in cookie
    for name in ("corp-ldap", "nope"):
        response, _ = await web_env.call("GET", f"/web/sso/{name}")
        assert response.code == 404


@pytest_twisted.ensureDeferred
async def test_the_acs_opens_a_session_and_goes_to_the_target_or_shows_the_refusal(web_env):
    """A good answer: a web session of the connector user and 303 to the stored target,
    the request cookie cleared; a refused one: 401 on the sign-in page, no session. The
    ACS takes no Origin check (the IdP posts from its own site)."""
    stand_in = await with_saml(web_env)
    headers = {"Cookie": f"{REQUEST_COOKIE}=id-1"}
    response, page = await web_env.call("POST", "/v1/webapi/saml/acs/okta", origin=None,
                                        headers=headers, data={"SAMLResponse": "bad"})
    assert response.code == 401 and b"could not be accepted" in page
    assert not [h for h in response.headers.getRawHeaders(b"set-cookie", [])
                if h.startswith(b"__Host-apptunnel_session=") and b"Max-Age=0" not in h]
    response, _ = await web_env.call("POST", "/v1/webapi/saml/acs/okta",
                                     origin="https://idp.example.com", headers=headers,
                                     data={"SAMLResponse": "good"})
    assert response.code == 303
    assert header(response, "location") == "/web/launch/grafana?state=s"
    web = await web_env.sessions.web_session(session_cookie(response)[0])
    assert web.user == "alice" and web.roles == ("dev",)
    assert any(h.startswith(f"{REQUEST_COOKIE}=;".encode()) and b"Max-Age=0" in h
               for h in response.headers.getRawHeaders(b"set-cookie"))
    assert stand_in.acs_calls == [("okta", "bad", "id-1"), ("okta", "good", "id-1")]
    response, body = await web_env.call("GET", "/v1/webapi/saml/metadata/okta")
    assert response.code == 200 and body == b"<md:EntityDescriptor/>"
    assert header(response, "content-type") == "application/samlmetadata+xml"


@pytest_twisted.ensureDeferred
async def test_a_cli_started_sign_in_carries_its_return_and_ends_at_the_clis_listener(web_env):
    """`apptunnel login --auth okta`: /web/sso hands the CLI's port, state and challenge to
    the SAML start (malformed: 400, nothing started); the ACS then opens no web session
    but sends the browser to 127.0.0.1:PORT with a one-time code, which /v1/certs takes
    once and only with the verifier whose digest the CLI gave."""
    import json
    from urllib.parse import parse_qs, urlsplit

    from apptunnel.auth.connectors.cli_codes import CliReturn, digest
    from tests.support.keys import new_key

    stand_in = await with_saml(web_env)
    verifier = "v" * 43
    state, challenge = "s" * 24, digest(verifier)
    response, _ = await web_env.call(
        "GET", f"/web/sso/okta?cli_port=80&cli_state={state}&cli_challenge={challenge}")
    assert response.code == 400 and stand_in.cli is None
    response, _ = await web_env.call(
        "GET", f"/web/sso/okta?next=/x&cli_port=40000&cli_state={state}"
               f"&cli_challenge={challenge}")
    assert response.code == 302 and stand_in.cli == CliReturn(40000, state, challenge)
    assert state not in header(response, "location")
    response, _ = await web_env.call("POST", "/v1/webapi/saml/acs/okta", origin=None,
                                     headers={"Cookie": f"{REQUEST_COOKIE}=id-1"},
                                     data={"SAMLResponse": "good"})
    location = header(response, "location")
    assert response.code == 302 and location.startswith("http://127.0.0.1:40000/callback?")
    assert not [h for h in response.headers.getRawHeaders(b"set-cookie", [])
                if h.startswith(b"__Host-apptunnel_session=")]
    query = parse_qs(urlsplit(location).query)
    assert query["state"] == [state]
    code = query["code"][0]
    _, public = new_key()
    for wrong in ("w" * 43, verifier):     # a wrong verifier spends the code: no retry
        response, _ = await web_env.call("POST", "/v1/certs", json={
            "sso_code": code, "code_verifier": wrong, "public_key": public})
        assert response.code == 401
    response, _ = await web_env.call(
        "GET", f"/web/sso/okta?cli_port=40000&cli_state={state}&cli_challenge={challenge}")
    response, _ = await web_env.call("POST", "/v1/webapi/saml/acs/okta", origin=None,
                                     headers={"Cookie": f"{REQUEST_COOKIE}=id-1"},
                                     data={"SAMLResponse": "good"})
    code = parse_qs(urlsplit(header(response, "location")).query)["code"][0]
    response, body = await web_env.call("POST", "/v1/certs", json={
        "sso_code": code, "code_verifier": verifier, "public_key": public})
    assert response.code == 200, body
    assert "cert" in json.loads(body)
    response, _ = await web_env.call("POST", "/v1/certs", json={
        "sso_code": code, "code_verifier": verifier, "public_key": public})
    assert response.code == 401                                     # replay
