"""Invite/reset links and second factors through the web app, on memory and a Clock."""

from __future__ import annotations

import json
import re

import attrs
import pyotp
import pytest
import pytest_twisted

from apptunnel.auth import totp
from apptunnel.auth.links import issue_link
from apptunnel.auth.mfa import factors_needed
from apptunnel.auth.policy import RoleCache
from apptunnel.web.routes import MFA_COOKIE, WebApp
from tests.support.web_env import session_cookie


@pytest.fixture
def env(web_env):
    return web_env


def require(env, setting: str) -> None:
    """Rebuild the web app with ``auth.second_factor: setting``."""
    config = attrs.evolve(env.config, second_factor=setting)
    env.web = WebApp(config, env.sessions, RoleCache(env.backend, env.clock), env.registry,
                     env.audit, env.jwt_keys, env.ca, env.clock, locks=env.locks,
                     users=env.users, backend=env.backend)


async def api_login(env, user="alice", password="alice-pw", **factors):
    response, body = await env.call(
        "POST", "/v1/sessions", headers={"Content-Type": "application/json"},
        data=json.dumps({"username": user, "password": password, **factors}))
    return response, json.loads(body)


async def post_json(env, path, body, cookie):
    response, raw = await env.call("POST", path, cookie=cookie,
                                   headers={"Content-Type": "application/json"},
                                   data=json.dumps(body))
    return response, json.loads(raw) if raw else None


def code_at(secret: str, t: float) -> str:
    return pyotp.TOTP(secret).at(t)


async def enroll(env, cookie, name="phone"):
    """Enroll a TOTP device through the API; (secret, recovery codes)."""
    response, answer = await post_json(env, "/v1/mfa/totp", {}, cookie)
    assert response.code == 200, answer
    secret = answer["secret"]
    assert answer["uri"].startswith("otpauth://totp/") and secret in answer["uri"]
    response, answer = await post_json(env, "/v1/mfa/devices", {
        "type": "totp", "name": name, "secret": secret,
        "otp": code_at(secret, env.clock.seconds())}, cookie)
    assert response.code == 200, answer
    return secret, answer["recovery_codes"]


# -- pure rules ---------------------------------------------------------------------------


def test_totp_window_is_one_step_either_side():
    """A code matches its own step and the neighbours, nothing further (Clock-free)."""
    secret = totp.new_secret()
    now = 1_700_000_015.0
    here = int(now // 30)
    for delta, found in ((-60, None), (-30, here - 1), (0, here), (30, here + 1), (60, None)):
        assert totp.matching_step(secret, code_at(secret, now + delta), now) == found
    assert totp.matching_step(secret, "12345", now) is None
    assert totp.matching_step(secret, "abcdef", now) is None
    assert totp.matching_step("not base32!", "123456", now) is None


def test_factors_needed_by_setting():
    """off needs nothing; optional only from users with a device; otp/on require one."""
    assert factors_needed("off", {"totp"}, True).factors == ()
    assert factors_needed("optional", set(), False) == factors_needed("off", set(), False)
    assert factors_needed("optional", {"totp"}, True).factors == ("otp", "recovery_code")
    assert factors_needed("otp", set(), False).enroll_only
    assert factors_needed("on", {"totp"}, False).factors == ("otp",)


# -- links ----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_invite_link_sets_the_password_once(env):
    """The invite page sets a password once; a second visit says the link was used."""
    token = await issue_link(env.backend, "bob", "invite", 60, env.clock.seconds())
    response, body = await env.call("GET", f"/web/invite/{token}")
    assert response.code == 200 and b"bob" in body and b'name="confirm"' in body
    response, body = await env.call("POST", f"/web/invite/{token}",
                                    data={"password": "new password", "confirm": "other"})
    assert response.code == 400 and b"differ" in body
    response, body = await env.call("POST", f"/web/invite/{token}",
                                    data={"password": "short", "confirm": "short"})
    assert response.code == 400 and b"at least 8" in body
    response, _ = await env.call("POST", f"/web/invite/{token}", origin="https://evil.example",
                                 data={"password": "new password", "confirm": "new password"})
    assert response.code == 403
    response, body = await env.call("POST", f"/web/invite/{token}",
                                    data={"password": "new password", "confirm": "new password"})
    assert response.code == 200 and b"Your password is set" in body
    assert await env.login("bob", "new password")
    response, body = await env.call("GET", f"/web/invite/{token}")
    assert response.code == 410 and b"already been used" in body
    response, body = await env.call("POST", f"/web/invite/{token}",
                                    data={"password": "other password", "confirm": "other password"})
    assert response.code == 410
    events = [e for e in await env.events("user.link")]
    assert [e.outcome for e in events][-1] == "failure"
    assert any(e.outcome == "success" and e.actor == "bob" for e in events)
    assert token not in json.dumps([e.fields for e in events])


@pytest_twisted.ensureDeferred
async def test_expired_unknown_and_wrong_kind_links_say_so(env):
    """An expired link says expired (Clock), an unknown one not valid, and an invite
    token is no reset link."""
    token = await issue_link(env.backend, "bob", "reset", 5, env.clock.seconds())
    response, _ = await env.call("GET", f"/web/invite/{token}")
    assert response.code == 404
    env.clock.advance(5)
    response, body = await env.call("GET", f"/web/reset/{token}")
    assert response.code == 410 and b"expired" in body
    response, body = await env.call("GET", "/web/reset/nonsense")
    assert response.code == 404 and b"not valid" in body


@pytest_twisted.ensureDeferred
async def test_link_guessing_is_throttled_per_address(env):
    """Every look at a bad link counts: the sixth from one address is 429."""
    for i in range(5):
        response, _ = await env.call("GET", f"/web/reset/guess{i}")
        assert response.code == 404
    response, body = await env.call("GET", "/web/reset/guess9")
    assert response.code == 429 and response.headers.getRawHeaders(b"retry-after")


# -- second factors -------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_required_otp_enroll_only_then_codes_once_each(env):
    """second_factor: otp. Without a device a sign-in only enrolls; then a sign-in needs a
    code (401 mfa_required), each code works once, a recovery code once."""
    require(env, "otp")
    response, answer = await api_login(env)
    assert response.code == 200 and answer["enroll_only"] is True
    cookie = session_cookie(response)[0]
    response, raw = await env.call("GET", "/v1/apps", cookie=cookie)
    assert response.code == 403 and b"second factor" in raw
    response, _ = await env.call("GET", "/", cookie=cookie)
    assert response.code == 302 and response.headers.getRawHeaders(b"location") == [b"/web/account"]
    secret, codes = await enroll(env, cookie)
    assert len(codes) == 10 and len(set(codes)) == 10
    events = await env.events("user.mfa.add")
    assert secret not in json.dumps([e.fields for e in events])

    response, answer = await api_login(env)
    assert response.code == 401
    assert answer["mfa_required"] == ["otp", "recovery_code"]
    now = env.clock.seconds()
    # The confirming code's step is spent.
    response, answer = await api_login(env, otp=code_at(secret, now))
    assert response.code == 401 and answer["error"] == "invalid second factor"
    env.clock.advance(30)
    fresh = code_at(secret, env.clock.seconds())
    response, answer = await api_login(env, otp=fresh)
    assert response.code == 200 and "enroll_only" not in answer
    response, answer = await api_login(env, otp=fresh)
    assert response.code == 401                                  # replay
    response, _ = await api_login(env, recovery_code=codes[0].upper())
    assert response.code == 200
    response, _ = await api_login(env, recovery_code=codes[0])
    assert response.code == 401
    reasons = [e.fields.get("reason") for e in await env.events("user.login")
               if e.fields.get("method") in ("otp", "recovery_code")]
    assert "replayed code" in reasons and "wrong recovery code" in reasons


@pytest_twisted.ensureDeferred
async def test_otp_guesses_are_throttled_even_with_the_right_password(env):
    """Five wrong codes and the sixth try is 429, right code included."""
    require(env, "otp")
    response, _ = await api_login(env)
    secret, _ = await enroll(env, session_cookie(response)[0])
    env.clock.advance(30)
    for _ in range(5):
        response, _ = await api_login(env, otp="000000")
        assert response.code == 401
    response, answer = await api_login(env, otp=code_at(secret, env.clock.seconds()))
    assert response.code == 429, answer


@pytest_twisted.ensureDeferred
async def test_last_device_cannot_be_removed_while_required(env):
    """mfa rm of the last device is refused under otp; a second device makes it possible."""
    require(env, "otp")
    response, _ = await api_login(env)
    cookie = session_cookie(response)[0]
    await enroll(env, cookie, "phone")
    response, raw = await env.call("DELETE", "/v1/mfa/devices/phone", cookie=cookie)
    assert response.code == 409 and b"last device" in raw
    env.clock.advance(30)
    _, codes = await enroll(env, cookie, "tablet")
    assert codes == []                      # recovery codes only at the first enrollment
    response, _ = await env.call("DELETE", "/v1/mfa/devices/phone", cookie=cookie)
    assert response.code == 204
    response, raw = await env.call("GET", "/v1/mfa/devices", cookie=cookie)
    listing = json.loads(raw)
    assert [d["name"] for d in listing["devices"]] == ["tablet"]
    assert "secret" not in raw.decode().lower().replace("recovery", "")


@pytest_twisted.ensureDeferred
async def test_browser_second_step_keeps_next(env):
    """The sign-in form asks for the code after the password, then lands on `next`."""
    require(env, "optional")
    cookie = await env.login()
    secret, _ = await enroll(env, cookie)
    env.clock.advance(30)
    response, body = await env.call("POST", "/web/login", data={
        "username": "alice", "password": "alice-pw", "next": "/web/launch/grafana?state=s"})
    assert response.code == 200 and b'name="otp"' in body
    assert b'value="/web/launch/grafana?state=s"' in body
    ticket = [h.decode() for h in response.headers.getRawHeaders(b"set-cookie")
              if h.startswith(MFA_COOKIE.encode())][0].split(";")[0].split("=", 1)[1]
    headers = {"Cookie": f"{MFA_COOKIE}={ticket}"}
    response, body = await env.call("POST", "/web/login/mfa", headers=headers, data={
        "otp": "000000", "next": "/web/launch/grafana?state=s"})
    assert response.code == 401 and b"invalid second factor" in body
    response, _ = await env.call("POST", "/web/login/mfa", headers=headers, data={
        "otp": code_at(secret, env.clock.seconds()), "next": "/web/launch/grafana?state=s"})
    assert response.code == 303
    assert response.headers.getRawHeaders(b"location") == [b"/web/launch/grafana?state=s"]
    assert session_cookie(response)[0]
    response, _ = await env.call("POST", "/web/login/mfa", headers=headers, data={
        "otp": code_at(secret, env.clock.seconds()), "next": "/"})
    assert response.code == 401                               # the ticket is spent


@pytest_twisted.ensureDeferred
async def test_account_page_shows_a_qr_code_and_enrolls(env):
    """The account page shows a fresh secret as inline SVG QR and otpauth URI; adding a
    device there shows the recovery codes once."""
    cookie = await env.login()
    response, body = await env.call("GET", "/web/account", cookie=cookie)
    page = body.decode()
    assert response.code == 200 and "<svg" in page and "otpauth://totp/" in page
    secret = re.search(r'name="secret" value="([A-Z2-7]+)"', page).group(1)
    response, body = await env.call("POST", "/web/account/totp", cookie=cookie, data={
        "name": "phone", "secret": secret, "otp": code_at(secret, env.clock.seconds())})
    assert response.code == 200 and body.count(b"<li><code>") == 10
    response, body = await env.call("GET", "/web/account", cookie=cookie)
    assert b"phone" in body and b"<li><code>" not in body and secret.encode() not in body


# -- WebAuthn challenges ----------------------------------------------------------------------


def _answer(challenge: str) -> dict:
    import base64
    client_data = json.dumps({"type": "webauthn.create", "challenge": challenge,
                              "origin": "https://apptunnel.localhost:3080"}).encode()
    return {"id": "x", "rawId": "x", "type": "public-key", "response": {
        "clientDataJSON": base64.urlsafe_b64encode(client_data).rstrip(b"=").decode(),
        "attestationObject": "AA"}}


@pytest_twisted.ensureDeferred
async def test_webauthn_challenges_are_single_use_short_lived_and_per_user():
    """A challenge answers once, for its user only, within CHALLENGE_TTL (Clock), on any
    proxy sharing the store (a second WebAuthnKeys on the same backend)."""
    from twisted.internet.task import Clock

    from apptunnel.auth.errors import AuthError
    from apptunnel.auth.webauthn_devices import CHALLENGE_TTL, WebAuthnKeys
    from apptunnel.backend.memory import MemoryBackend

    clock, backend = Clock(), MemoryBackend()
    keys, other_proxy = (WebAuthnKeys("apptunnel.localhost", "https://apptunnel.localhost:3080",
                                      "t", clock, backend) for _ in range(2))
    challenge = (await keys.registration_options("alice", []))["challenge"]
    with pytest.raises(AuthError) as bad:    # a bad attestation burns the challenge, everywhere
        await other_proxy.verify_registration("alice", _answer(challenge))
    assert bad.value.status == 400
    for proxy in (keys, other_proxy):
        with pytest.raises(AuthError, match="unknown, used or expired"):
            await proxy.verify_registration("alice", _answer(challenge))
    other = (await keys.registration_options("alice", []))["challenge"]
    with pytest.raises(AuthError, match="unknown, used or expired"):
        await keys.verify_registration("bob", _answer(other))
    late = (await keys.registration_options("alice", []))["challenge"]
    clock.advance(CHALLENGE_TTL)
    with pytest.raises(AuthError, match="unknown, used or expired"):
        await keys.verify_registration("alice", _answer(late))
    with pytest.raises(AuthError):
        await keys.verify_registration("alice", "x" * 10_000)


@pytest_twisted.ensureDeferred
async def test_enroll_only_session_gets_no_certificate_no_launch_and_no_apps(env):
    """Hostile use of an enroll-only session: no certificate (cookie or password), no
    launch hand-off, no app list; the password path without a device is refused too."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    require(env, "on")
    response, answer = await api_login(env)
    cookie = session_cookie(response)[0]
    key = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    response, raw = await env.call("POST", "/v1/certs", cookie=cookie,
                                   headers={"Content-Type": "application/json"},
                                   data=json.dumps({"public_key": key}))
    assert response.code == 403 and b"second factor" in raw
    response, raw = await env.call("POST", "/v1/certs",
                                   headers={"Content-Type": "application/json"},
                                   data=json.dumps({"public_key": key, "username": "alice",
                                                    "password": "alice-pw"}))
    assert response.code == 403 and b"second factor" in raw
    response, _ = await env.call("GET", "/web/launch/grafana?state=s", cookie=cookie)
    assert response.code == 302
    assert response.headers.getRawHeaders(b"location") == [b"/web/account"]
    response, _ = await env.call("GET", "/v1/apps", cookie=cookie)
    assert response.code == 403
    # Spoofed factors of the wrong shape are no factor at all.
    response, answer = await api_login(env, otp=123456, recovery_code=["x"], webauthn=7)
    assert response.code == 200 and answer["enroll_only"] is True


@pytest_twisted.ensureDeferred
async def test_cross_origin_posts_and_garbage_are_refused(env):
    """Account and second-step forms refuse other origins; garbage tokens, device names
    and secrets are plain 4xx answers."""
    cookie = await env.login()
    for path in ("/web/account/totp", "/web/account/webauthn", "/web/account/devices/remove",
                 "/web/login/mfa"):
        response, _ = await env.call("POST", path, cookie=cookie, origin="https://evil.example",
                                     data={"name": "x"})
        assert response.code == 403, path
    response, _ = await env.call("GET", "/web/invite/" + "A" * 5000)
    assert response.code == 404
    response, answer = await post_json(env, "/v1/mfa/devices", {
        "type": "totp", "name": "../../etc", "secret": "AAAA", "otp": "1"}, cookie)
    assert response.code == 400 and "device name" in answer["error"]
    response, answer = await post_json(env, "/v1/mfa/devices", {
        "type": "totp", "name": "ok", "secret": "not base32", "otp": "1"}, cookie)
    assert response.code == 400 and "secret" in answer["error"]
    response, answer = await post_json(env, "/v1/mfa/devices", {"type": "sms"}, cookie)
    assert response.code == 400
    response, _ = await env.call("GET", "/v1/mfa/devices")
    assert response.code == 401
