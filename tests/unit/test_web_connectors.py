"""The sign-in form and API with LDAP connectors (issue 10), in memory: the web app of
tests/support/web_env.py with an LdapSignIn whose directory the test answers."""

from __future__ import annotations

import json

import attrs

import pytest
import pytest_twisted
from cryptography import x509
from twisted.internet.defer import succeed

from apptunnel.auth.ca import user_identity
from apptunnel.auth.connectors.ldap import LdapSignIn
from apptunnel.auth.connectors.signin import ExternalIdentity, ExternalSignIn
from apptunnel.auth.connectors.store import ConnectorStore
from apptunnel.auth.policy import RoleCache
from apptunnel.auth.throttle import LoginThrottle
from apptunnel.backend.records import Resource
from apptunnel.web.routes import WebApp
from tests.support.connector_docs import DEVS, LDAP_DOC
from tests.support.keys import new_key
from tests.support.web_env import header, session_cookie


class Directory:
    """Answers check_password: the right password is NAME-pw."""

    def __call__(self, fn, spec, username, password):
        if password != f"{username}-pw":
            return succeed(None)
        return succeed(ExternalIdentity(spec.name, "ldap", username.lower(),
                                        {"groups": (DEVS,), "email": (f"{username}@x.org",)}))


@pytest.fixture
def env(web_env):
    return web_env


async def with_ldap(env, throttle: LoginThrottle | None = None, second_factor: str = "off"):
    """The env's web app again, with the connector stored and an LdapSignIn handed in."""
    await env.backend.put_resource(Resource("connector", "corp-ldap", LDAP_DOC))
    ldap = LdapSignIn(connectors=ConnectorStore(env.backend, env.clock),
                      signin=ExternalSignIn(env.backend, env.audit, env.clock, users=env.users),
                      throttle=throttle or LoginThrottle(), audit=env.audit, clock=env.clock,
                      run_in_thread=Directory())
    config = attrs.evolve(env.config, second_factor=second_factor)
    env.web = WebApp(config, env.sessions, RoleCache(env.backend, env.clock), env.registry,
                     env.audit, env.jwt_keys, env.ca, env.clock, locks=env.locks,
                     users=env.users, ldap=ldap, backend=env.backend)
    return env


@pytest_twisted.ensureDeferred
async def test_the_form_offers_ldap_connectors_only_when_there_are_some(env):
    """No connector: no choice on the page; with one: a select, local account first."""
    _, page = await env.call("GET", "/web/login")
    assert b'name="connector"' not in page
    await with_ldap(env)
    _, page = await env.call("GET", "/web/login")
    text = page.decode()
    assert '<select id="connector" name="connector">' in text
    assert text.index('<option value="">Local account</option>') < \
        text.index('<option value="corp-ldap">corp-ldap</option>')


@pytest_twisted.ensureDeferred
async def test_form_sign_in_through_ldap_lands_on_next(env):
    """The right directory password: 303 to `next` with a session of the connector user;
    a wrong one: the form again (401) with the connector still chosen."""
    await with_ldap(env)
    response, page = await env.call("POST", "/web/login", data={
        "username": "carol", "password": "wrong", "connector": "corp-ldap",
        "next": "/web/launch/grafana"})
    assert response.code == 401 and b"invalid username or password" in page
    assert b'<option value="corp-ldap" selected>' in page
    response, _ = await env.call("POST", "/web/login", data={
        "username": "carol", "password": "carol-pw", "connector": "corp-ldap",
        "next": "/web/launch/grafana"})
    assert response.code == 303 and header(response, "location") == "/web/launch/grafana"
    web = await env.sessions.web_session(session_cookie(response)[0])
    assert web.user == "carol" and web.roles == ("dev",)
    assert web.traits == {"groups": (DEVS,), "email": ("carol@x.org",)}
    [ok] = [e for e in await env.events("user.login") if e.outcome == "success"]
    assert ok.fields["method"] == "ldap" and ok.fields["connector"] == "corp-ldap"


@pytest_twisted.ensureDeferred
async def test_api_sessions_and_certs_take_a_connector(env):
    """POST /v1/sessions and /v1/certs sign in through the connector; the certificate names
    the connector user's roles and traits."""
    await with_ldap(env)
    response, body = await env.call("POST", "/v1/sessions", json={
        "username": "dave", "password": "dave-pw", "connector": "corp-ldap"})
    assert response.code == 200 and json.loads(body)["roles"] == ["dev"]
    _, public = new_key()
    response, body = await env.call("POST", "/v1/certs", json={
        "username": "dave", "password": "dave-pw", "connector": "corp-ldap",
        "public_key": public})
    assert response.code == 200, body
    cert = x509.load_pem_x509_certificate(json.loads(body)["cert"].encode())
    assert user_identity(cert) == (("dev",), {"email": ("dave@x.org",), "groups": (DEVS,)})
    response, _ = await env.call("POST", "/v1/certs", json={
        "username": "dave", "password": "nope", "connector": "corp-ldap",
        "public_key": public})
    assert response.code == 401


@pytest.mark.parametrize("connector,status", [
    (7, 400), ("", 400), (["corp-ldap"], 400), ("x" * 65, 400), ("../corp-ldap", 400),
])
@pytest_twisted.ensureDeferred
async def test_garbage_connectors_are_400(env, connector, status):
    await with_ldap(env)
    response, body = await env.call("POST", "/v1/sessions", json={
        "username": "dave", "password": "dave-pw", "connector": connector})
    assert response.code == status, body


@pytest_twisted.ensureDeferred
async def test_a_connector_without_ldap_sign_in_is_400_and_throttling_says_when(env):
    """A proxy without connectors answers 400; a throttled connector sign-in gets
    Retry-After like a local one."""
    response, _ = await env.call("POST", "/v1/sessions", json={
        "username": "dave", "password": "dave-pw", "connector": "corp-ldap"})
    assert response.code == 400
    await with_ldap(env, LoginThrottle(max_per_user=1))
    await env.call("POST", "/v1/sessions", json={
        "username": "erin", "password": "wrong", "connector": "corp-ldap"})
    response, body = await env.call("POST", "/v1/sessions", json={
        "username": "erin", "password": "erin-pw", "connector": "corp-ldap"})
    assert response.code == 429 and int(header(response, "retry-after")) >= 1, body


@pytest_twisted.ensureDeferred
async def test_second_factors_are_for_local_accounts_not_connector_users(env):
    """Under second_factor: on, a local user without a device gets an enroll-only session,
    while a directory user signs in with the directory's password alone (their directory's
    policy applies; the proxy keeps no devices for them)."""
    await with_ldap(env, second_factor="on")
    response, body = await env.call("POST", "/v1/sessions", json={
        "username": "dave", "password": "dave-pw", "connector": "corp-ldap"})
    answer = json.loads(body)
    assert response.code == 200 and "enroll_only" not in answer, answer
    response, body = await env.call("POST", "/v1/sessions", json={
        "username": "alice", "password": "alice-pw"})
    assert response.code == 200 and json.loads(body).get("enroll_only") is True
