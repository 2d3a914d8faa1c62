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
from tests.support.web_env import header, session_cookie
from tests.unit.test_auth_saml import saml_doc
from tests.unit.test_web_connectors import DOC as LDAP_DOC


class StandIn:
    """SamlSignIn's surface: start hands out id-1; acs accepts only id-1's response."""

    def __init__(self) -> None:
        self.acs_calls = []

    async def metadata(self, name, address):
        return "<md:EntityDescriptor/>"

    async def start(self, name, target, address):
        self.target = target
        return "id-1", "https://idp.example.com/sso?SAMLRequest=abc"

    async def acs(self, name, response, request_id, address, client):
        self.acs_calls.append((name, response, request_id))
        if request_id != "id-1" or response != "good":
            raise AuthError(401, "the identity provider's answer could not be accepted")
        return User("alice", None, ("dev",), {"groups": ("devs",)}, 1.0, connector="okta"), \
            "/web/launch/grafana?state=s"


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
