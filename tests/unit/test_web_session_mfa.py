"""Per-session MFA (issue 10) through the web app, in memory on a Clock: the launch
prompt, the MFA-verified app session it starts, one-app certificates, and who cannot
answer the prompt."""

from __future__ import annotations

import json
from urllib.parse import parse_qs, urlsplit

import pyotp
import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from apptunnel.auth.access import AccessPolicy, Allow, Facts
from apptunnel.auth.ca import session_mfa_app
from apptunnel.auth.policy import RoleCache
from apptunnel.auth.mfa import NO_SESSION_FACTOR, SESSION_ENROLL_FIRST
from apptunnel.backend.records import Resource, User
from tests.support.web_env import header, password_hash

PROD_MFA = {"kind": "role", "metadata": {"name": "prod-mfa"},
            "spec": {"options": {"require_session_mfa": True},
                     "allow": {"app_labels": {"env": "prod"}}}}
LAUNCH = "/web/launch/billing?path=%2Fd&state=st-1"


@pytest.fixture
def env(web_env):
    return web_env


async def carol(env, connector: str = "") -> str:
    """A user holding prod-mfa (billing asks for a factor per session), signed in."""
    await env.backend.put_resource(Resource("role", "prod-mfa", PROD_MFA))
    await env.backend.create_user(User("carol", password_hash("carol-pw"), ("prod-mfa",), {},
                                       env.clock.seconds(), connector))
    return await env.login("carol", "carol-pw")


async def post_json(env, path, body, cookie):
    response, raw = await env.call("POST", path, cookie=cookie,
                                   headers={"Content-Type": "application/json"},
                                   data=json.dumps(body))
    return response, json.loads(raw) if raw else None


async def enroll(env, cookie) -> tuple[str, list[str]]:
    _, answer = await post_json(env, "/v1/mfa/totp", {}, cookie)
    secret = answer["secret"]
    response, added = await post_json(env, "/v1/mfa/devices", {
        "type": "totp", "name": "phone", "secret": secret,
        "otp": pyotp.TOTP(secret).at(env.clock.seconds())}, cookie)
    assert response.code == 200, added
    env.clock.advance(30)       # the enrollment code's step is used up
    return secret, added["recovery_codes"]


async def answer(env, cookie, **factor):
    return await env.call("POST", "/web/launch/billing", cookie=cookie,
                          data={"path": "/d", "state": "st-1", **factor})


@pytest_twisted.ensureDeferred
async def test_launch_prompts_then_hands_off_an_mfa_verified_app_session(env):
    """GET shows the prompt (no code); a wrong code, a cross-site POST and a replayed code
    are refused; the right fresh code hands off, and the app session it starts is marked
    MFA-verified so the policy allows it; another app session needs a new factor."""
    cookie = await carol(env)
    secret, _ = await enroll(env, cookie)
    response, page = await env.call("GET", LAUNCH, cookie=cookie)
    assert response.code == 200 and header(response, "location") is None
    text = page.decode()
    assert 'name="otp"' in text and 'action="/web/launch/billing"' in text
    assert 'name="state" value="st-1"' in text and "billing asks for a second factor" in text

    wrong, page = await answer(env, cookie, otp="000000")
    assert wrong.code == 401 and "invalid second factor" in page.decode()
    cross, _ = await env.call("POST", "/web/launch/billing", cookie=cookie,
                              origin="https://evil.example",
                              data={"path": "/d", "state": "st-1",
                                    "otp": pyotp.TOTP(secret).at(env.clock.seconds())})
    assert cross.code == 403

    code = pyotp.TOTP(secret).at(env.clock.seconds())
    ok, _ = await answer(env, cookie, otp=code)
    assert ok.code == 303
    location = urlsplit(header(ok, "location"))
    assert location.netloc == "billing.apptunnel.localhost:3080"
    hand_off = parse_qs(location.query)["code"][0]
    replay, _ = await answer(env, cookie, otp=code)
    assert replay.code == 401                      # the same code never counts twice

    app_secret, app_session, path = await env.sessions.redeem_auth_code(
        hand_off, "st-1", "billing")
    assert app_session.mfa_verified and path == "/d"
    caller = await env.sessions.caller(app_session)
    assert caller.mfa_app == "billing"
    policy = AccessPolicy(roles=RoleCache(env.backend, env.clock), audit=env.audit,
                          clock=env.clock, users=env.users)
    decision = await policy.decide(caller, env.registry.app("billing"), Facts(),
                                   env.clock.seconds())
    assert isinstance(decision, Allow)
    events = await env.events("session.mfa")
    assert [e.outcome for e in events] == ["failure", "success", "failure"]
    assert all(e.fields["app"] == "billing" for e in events)


@pytest_twisted.ensureDeferred
async def test_a_recovery_code_answers_the_prompt_once(env):
    cookie = await carol(env)
    _, codes = await enroll(env, cookie)
    ok, _ = await answer(env, cookie, recovery_code=codes[0])
    assert ok.code == 303
    again, _ = await answer(env, cookie, recovery_code=codes[0])
    assert again.code == 401


@pytest_twisted.ensureDeferred
async def test_launch_without_a_device_or_from_a_connector_is_refused_with_a_reason(env):
    """A local user without a device is told to add one; a connector (LDAP) user, who
    holds no device here, is refused with a message saying so: never a silent allow."""
    cookie = await carol(env)
    response, page = await env.call("GET", LAUNCH, cookie=cookie)
    assert response.code == 403 and "add one on your account page" in page.decode()
    assert SESSION_ENROLL_FIRST.startswith("this app requires a second factor")
    await env.backend.create_user(User("dave", None, ("prod-mfa",), {}, env.clock.seconds(),
                                       "corp-ldap"))
    web_secret, _ = await env.sessions.create_web_session(await env.sessions.user("dave"))
    response, page = await env.call("GET", LAUNCH, cookie=web_secret)
    assert response.code == 403 and NO_SESSION_FACTOR in page.decode()
    posted, _ = await answer(env, web_secret, otp="123456")
    assert posted.code == 403


@pytest_twisted.ensureDeferred
async def test_apps_without_the_option_launch_as_before(env):
    """A role without require_session_mfa: the launch redirects at once (no prompt)."""
    cookie = await env.login()
    response, _ = await env.call("GET", "/web/launch/grafana?path=%2F&state=s", cookie=cookie)
    assert response.code == 302 and "/.apptunnel/auth?code=" in header(response, "location")


@pytest_twisted.ensureDeferred
async def test_app_certificate_is_bound_to_one_app_after_a_fresh_factor(env):
    """POST /v1/certs/app: no factor -> 401 naming the kinds; the right code -> a
    one-minute certificate bound to billing; an app that asks nothing -> 400."""
    cookie = await carol(env)
    secret, _ = await enroll(env, cookie)
    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    response, body = await post_json(env, "/v1/certs/app",
                                     {"public_key": public, "app": "billing"}, cookie)
    assert response.code == 401 and "otp" in body["mfa_required"]
    response, body = await post_json(env, "/v1/certs/app", {
        "public_key": public, "app": "billing",
        "otp": pyotp.TOTP(secret).at(env.clock.seconds())}, cookie)
    assert response.code == 200, body
    cert = x509.load_pem_x509_certificate(body["cert"].encode())
    app, _ = session_mfa_app(cert)
    assert app == "billing"
    assert body["expires"] - env.clock.seconds() <= 61
    dev = await env.login()
    response, body = await post_json(env, "/v1/certs/app",
                                     {"public_key": public, "app": "grafana"}, dev)
    assert response.code == 400 and "does not ask for a second factor" in body["error"]

