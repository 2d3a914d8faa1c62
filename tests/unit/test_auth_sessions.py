"""SessionManager, passwords and secrets over a real SQLite backend and a Clock."""

from __future__ import annotations

import attrs
import pytest
import pytest_twisted
from twisted.internet.task import Clock

from apptunnel.auth.errors import AuthError
from apptunnel.auth.passwords import hash_password, verify_password
from apptunnel.auth.sessions import AUTH_CODE_TTL, SessionManager
from apptunnel.auth.tokens import constant_time_equal, new_secret, secret_hash
from apptunnel.backend.records import AuthCode, User
from tests.support.memory import MemoryBackend, inline_hashes
from tests.support.waiting import wait

TTL = 3600.0
PASSWORD = "correct horse battery staple"
HASH = hash_password(PASSWORD)


@pytest_twisted.async_yield_fixture
async def backend(tmp_path):
    b = MemoryBackend()
    await wait(b.create_user(User("alice", HASH, ("dev",), {"team": ("sre",)}, 0.0)))
    await wait(b.create_user(User("sso-bob", None, ("dev",), {}, 0.0)))
    yield b
    await wait(b.close())


@pytest.fixture
def clock():
    c = Clock()
    c.advance(1_000_000)
    return c


@pytest.fixture
def sessions(backend, clock):
    return SessionManager(backend, clock, TTL, hashes=inline_hashes())


async def alice_session(sessions):
    user = await wait(sessions.login("alice", PASSWORD))
    return await wait(sessions.create_web_session(user))


# -- secrets and passwords -------------------------------------------------------


def test_secrets_are_random_and_hashed():
    """new_secret is 43 url-safe chars, unique; secret_hash is hex SHA-256."""
    a, b = new_secret(), new_secret()
    assert a != b and len(a) == 43 and all(c.isalnum() or c in "-_" for c in a)
    assert len(secret_hash(a)) == 64 and secret_hash(a) == secret_hash(a)
    assert constant_time_equal(a, a) and not constant_time_equal(a, b)
    assert constant_time_equal(b"x", "x")


def test_password_hash_is_argon2id_and_verify_never_raises():
    """Hashes are argon2id; verify is False (not an exception) for every bad input."""
    assert HASH.startswith("$argon2id$")
    assert verify_password(HASH, PASSWORD)
    assert not verify_password(HASH, PASSWORD + "x")
    assert not verify_password(None, PASSWORD)
    assert not verify_password("not-a-hash", PASSWORD)
    assert not verify_password("", "")
    assert not verify_password(HASH, None)
    assert not verify_password(HASH, "x" * 5000)
    with pytest.raises(ValueError):
        hash_password("x" * 5000)


# -- login -----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_login_success(sessions):
    """The right password returns the user record."""
    user = await wait(sessions.login("alice", PASSWORD))
    assert user.name == "alice" and user.roles == ("dev",)


@pytest.mark.parametrize("username,password", [
    ("alice", "wrong"),
    ("alice", ""),
    ("nobody", PASSWORD),
    ("sso-bob", PASSWORD),
    ("sso-bob", ""),
    ("", PASSWORD),
    ("a" * 1000, PASSWORD),
])
@pytest_twisted.ensureDeferred
async def test_login_failure_is_uniform(sessions, username, password):
    """Wrong password, unknown user and password-less user all give the same 401."""
    with pytest.raises(AuthError) as info:
        await wait(sessions.login(username, password))
    assert (info.value.status, info.value.message) == (401, "invalid username or password")


# -- web sessions ----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_web_session_lifetime(sessions, clock, backend):
    """A web session is found by its secret until its ttl passes on the clock."""
    secret, record = await alice_session(sessions)
    assert record.expires == clock.seconds() + TTL and record.id_hash == secret_hash(secret)
    assert await wait(backend.get_web_session(record.id_hash)) == record
    assert await wait(sessions.web_session(secret)) == record
    clock.advance(TTL - 1)
    assert await wait(sessions.web_session(secret)) == record
    clock.advance(1)
    assert await wait(sessions.web_session(secret)) is None


@pytest_twisted.ensureDeferred
async def test_web_session_custom_ttl(sessions, clock):
    """create_web_session honours an explicit ttl (e.g. a role's max_session_ttl)."""
    user = await wait(sessions.login("alice", PASSWORD))
    secret, record = await wait(sessions.create_web_session(user, ttl=60))
    assert record.expires == clock.seconds() + 60
    clock.advance(60)
    assert await wait(sessions.web_session(secret)) is None


@pytest.mark.parametrize("secret", [None, "", "nope", "x" * 10_000])
@pytest_twisted.ensureDeferred
async def test_unknown_or_bogus_secrets(sessions, secret):
    """Missing, unknown or oversized cookies are simply no session."""
    assert await wait(sessions.web_session(secret)) is None
    assert await wait(sessions.app_session(secret, "grafana")) is None


@pytest_twisted.ensureDeferred
async def test_cache_expires_for_changes_made_elsewhere(sessions, clock, backend):
    """A session deleted by another proxy stops working once the short cache lapses."""
    secret, record = await alice_session(sessions)
    await wait(backend.delete_web_session(record.id_hash))
    assert await wait(sessions.web_session(secret)) == record     # still cached
    clock.advance(10)
    assert await wait(sessions.web_session(secret)) is None


@pytest_twisted.ensureDeferred
async def test_negative_cache_is_brief(sessions, clock, backend):
    """A miss is remembered for seconds only, then a session created elsewhere is seen."""
    other = SessionManager(backend, clock, TTL, hashes=inline_hashes())
    secret = new_secret()
    assert await wait(sessions.web_session(secret)) is None
    user = await wait(backend.get_user("alice"))
    # Simulate another proxy creating a session with this very secret.
    _, record = await wait(other.create_web_session(user))
    record = attrs.evolve(record, id_hash=secret_hash(secret))
    await wait(backend.put_web_session(record))
    assert await wait(sessions.web_session(secret)) is None
    clock.advance(2)
    assert await wait(sessions.web_session(secret)) == record


# -- hand-off and app sessions ---------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_auth_code_round_trip(sessions, clock):
    """A code redeems once for an app session carrying the path and the web session."""
    secret, web = await alice_session(sessions)
    code = await wait(sessions.create_auth_code(web, "grafana", "/d/home", "state-1"))
    app_secret, app, path = await wait(sessions.redeem_auth_code(code, "state-1", "grafana"))
    assert path == "/d/home"
    assert (app.user, app.app, app.web_session) == ("alice", "grafana", web.id_hash)
    assert await wait(sessions.app_session(app_secret, "grafana")) == app
    assert await wait(sessions.app_session(app_secret, "kibana")) is None
    assert await wait(sessions.app_session(secret, "grafana")) is None


async def assert_code_refused(sessions, code, state, app):
    with pytest.raises(AuthError) as info:
        await wait(sessions.redeem_auth_code(code, state, app))
    assert info.value.status == 400


@pytest_twisted.ensureDeferred
async def test_auth_code_is_one_time(sessions):
    """A redeemed code cannot be redeemed again."""
    _, web = await alice_session(sessions)
    code = await wait(sessions.create_auth_code(web, "grafana", "/", "s"))
    await wait(sessions.redeem_auth_code(code, "s", "grafana"))
    await assert_code_refused(sessions, code, "s", "grafana")


@pytest_twisted.ensureDeferred
async def test_auth_code_expires(sessions, clock):
    """A code older than 60 s is refused."""
    _, web = await alice_session(sessions)
    code = await wait(sessions.create_auth_code(web, "grafana", "/", "s"))
    clock.advance(AUTH_CODE_TTL)
    await assert_code_refused(sessions, code, "s", "grafana")


@pytest.mark.parametrize("state,app", [
    ("other-state", "grafana"),
    (None, "grafana"),
    ("", "grafana"),
    ("s", "kibana"),
])
@pytest_twisted.ensureDeferred
async def test_auth_code_bound_to_state_and_app(sessions, state, app):
    """A wrong state or app is refused and burns the code for the right one too."""
    _, web = await alice_session(sessions)
    code = await wait(sessions.create_auth_code(web, "grafana", "/", "s"))
    await assert_code_refused(sessions, code, state, app)
    await assert_code_refused(sessions, code, "s", "grafana")


@pytest.mark.parametrize("code", ["", "garbage", "x" * 1000])
@pytest_twisted.ensureDeferred
async def test_unknown_code_refused(sessions, code):
    """Unknown or malformed codes are a 400."""
    await assert_code_refused(sessions, code, "s", "grafana")


@pytest_twisted.ensureDeferred
async def test_create_auth_code_requires_state(sessions):
    """A hand-off without a browser state is refused up front."""
    _, web = await alice_session(sessions)
    with pytest.raises(AuthError) as info:
        await wait(sessions.create_auth_code(web, "grafana", "/", ""))
    assert info.value.status == 400


@pytest_twisted.ensureDeferred
async def test_app_session_never_outlives_web_session(sessions, clock):
    """An app session expires with its web session even if started late in it."""
    user = await wait(sessions.login("alice", PASSWORD))
    _, web = await wait(sessions.create_web_session(user, ttl=100))
    clock.advance(90)
    code = await wait(sessions.create_auth_code(web, "grafana", "/", "s"))
    app_secret, app, _ = await wait(sessions.redeem_auth_code(code, "s", "grafana"))
    assert app.expires == web.expires
    clock.advance(10)
    assert await wait(sessions.app_session(app_secret, "grafana")) is None


@pytest_twisted.ensureDeferred
async def test_end_web_session_ends_app_sessions(sessions, backend):
    """Logout ends the web session and its app sessions at once, cache included."""
    secret, web = await alice_session(sessions)
    code = await wait(sessions.create_auth_code(web, "grafana", "/", "s"))
    app_secret, app, _ = await wait(sessions.redeem_auth_code(code, "s", "grafana"))
    pending = await wait(sessions.create_auth_code(web, "kibana", "/", "s2"))
    assert await wait(sessions.app_session(app_secret, "grafana")) is not None

    await wait(sessions.end_web_session(secret))
    assert await wait(sessions.web_session(secret)) is None
    assert await wait(sessions.app_session(app_secret, "grafana")) is None
    assert await wait(backend.get_app_session(app.id_hash)) is None
    await assert_code_refused(sessions, pending, "s2", "kibana")


@pytest_twisted.ensureDeferred
async def test_redeem_without_live_web_session_refused(sessions, clock, backend):
    """A code whose web session is gone or expired yields no app session."""
    code = new_secret()
    await wait(backend.put_auth_code(AuthCode(
        secret_hash(code), "no-such-web-session", "grafana", "/", secret_hash("s"),
        clock.seconds() + 30)))
    await assert_code_refused(sessions, code, "s", "grafana")

    user = await wait(sessions.login("alice", PASSWORD))
    _, web = await wait(sessions.create_web_session(user, ttl=10))
    code = await wait(sessions.create_auth_code(web, "grafana", "/", "s"))
    clock.advance(10)
    await assert_code_refused(sessions, code, "s", "grafana")


@pytest_twisted.ensureDeferred
async def test_end_app_session(sessions, backend):
    """end_app_session ends one app session and leaves the web session alone."""
    secret, web = await alice_session(sessions)
    code = await wait(sessions.create_auth_code(web, "grafana", "/", "s"))
    app_secret, app, _ = await wait(sessions.redeem_auth_code(code, "s", "grafana"))
    await wait(sessions.end_app_session(app_secret))
    assert await wait(sessions.app_session(app_secret, "grafana")) is None
    assert await wait(backend.get_app_session(app.id_hash)) is None
    assert await wait(sessions.web_session(secret)) == web
    await wait(sessions.end_app_session(None))
    await wait(sessions.end_web_session(""))


@pytest_twisted.ensureDeferred
async def test_identity_follows_the_web_session(sessions, clock):
    """identity() gives the parent web session while it lives, then None."""
    secret, web = await alice_session(sessions)
    code = await wait(sessions.create_auth_code(web, "grafana", "/", "s"))
    _, app, _ = await wait(sessions.redeem_auth_code(code, "s", "grafana"))
    assert await wait(sessions.identity(app)) == web
    assert await wait(sessions.identity(attrs.evolve(app, user="mallory"))) is None
    await wait(sessions.end_web_session(secret))
    assert await wait(sessions.identity(app)) is None
    clock.advance(TTL)
    assert await wait(sessions.identity(attrs.evolve(app, web_session="unknown"))) is None
