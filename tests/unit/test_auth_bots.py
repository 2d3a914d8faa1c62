"""Bots in auth/: BotEnrolment's join and renewal rules on the memory backend and a Clock,
a bot certificate as a Caller (bot:NAME, capped by the directory), and the JWT's bot claim."""

from __future__ import annotations

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet import task

from apptunnel.auth.bots import BotEnrolment, bot_of, bot_principal, ttl_problem
from apptunnel.auth.ca import ClusterCA
from apptunnel.auth.callers import caller_from_certificate
from apptunnel.auth.directory import UserDirectory, effective_identity
from apptunnel.auth.enrolment import AgentEnrolment, EnrolmentRefused
from apptunnel.auth.errors import AuthError
from apptunnel.auth.tokens import secret_hash
from apptunnel.backend.memory import MemoryBackend
from apptunnel.backend.records import Bot, JoinToken, Lock

NOW = 1_800_000_000.0


def public_key() -> str:
    return ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


class Locks:
    def __init__(self):
        self.locks = []

    def locked(self, user, app=None):
        return next((lock for lock in self.locks if lock.user == user), None)


@pytest_twisted.async_yield_fixture
async def world(tmp_path):
    clock = task.Clock()
    clock.advance(NOW)
    backend, locks = MemoryBackend(), Locks()
    ca = ClusterCA.load_or_create(str(tmp_path / "ca"), "unit", clock)
    bots = BotEnrolment(ca=ca, backend=backend, clock=clock, locks=locks, min_ttl=2.0)
    await backend.create_bot(Bot("ci", ("ci-apps",), NOW),
                             JoinToken(secret_hash("tok"), "bot", NOW + 3600, NOW, 1, bot="ci"))
    yield clock, backend, ca, bots, locks
    await backend.close()


def cert(issued) -> x509.Certificate:
    return x509.load_pem_x509_certificate(issued.cert_pem)


@pytest_twisted.ensureDeferred
async def test_join_once_then_only_the_newest_certificate_renews(world):
    """The token joins once (generation 1); a renewal from generation 1 wins once, and the
    copied generation-1 certificate cannot renew again."""
    clock, backend, ca, bots, _ = world
    joined = await bots.join("tok", public_key().encode(), 60)
    assert (joined.bot, joined.roles, joined.generation) == ("ci", ("ci-apps",), 1)
    assert ca.verify_peer(cert(joined), NOW) == ("bot", "ci")
    with pytest.raises(EnrolmentRefused) as again:
        await bots.join("tok", public_key().encode(), 60)
    assert again.value.message == "invalid or expired join token"
    renewed = await bots.renew(cert(joined), public_key().encode(), 60)
    assert renewed.generation == 2
    with pytest.raises(EnrolmentRefused) as replay:
        await bots.renew(cert(joined), public_key().encode(), 60)
    assert "generation 1" in replay.value.reason and "already renewed" in replay.value.message
    assert (await backend.get_bot("ci")).generation == 2


@pytest_twisted.ensureDeferred
async def test_expired_user_and_foreign_certificates_cannot_renew(world, tmp_path):
    """An expired bot certificate, a user certificate, another cluster's bot certificate
    and no certificate at all are refused; nothing advances."""
    clock, backend, ca, bots, _ = world
    joined = await bots.join("tok", public_key().encode(), 2)
    clock.advance(3)
    with pytest.raises(EnrolmentRefused) as expired:
        await bots.renew(cert(joined), public_key().encode(), 60)
    assert "expired" in expired.value.reason and "join the bot again" in expired.value.message
    user = x509.load_pem_x509_certificate(
        ca.issue_user_cert(public_key(), "ci", ("ci-apps",), {}, 60))
    other = ClusterCA.load_or_create(str(tmp_path / "other"), "unit", clock)
    foreign = x509.load_pem_x509_certificate(
        other.issue_bot_cert(public_key(), "ci", ("ci-apps",), 1, 60))
    for bad in (user, foreign, None):
        with pytest.raises(EnrolmentRefused):
            await bots.renew(bad, public_key().encode(), 60)
    assert (await backend.get_bot("ci")).generation == 1


@pytest_twisted.ensureDeferred
async def test_locked_or_removed_bots_neither_join_nor_renew(world):
    """A lock on bot:ci refuses its renewal (and a join); a removed bot renews nothing."""
    clock, backend, ca, bots, locks = world
    joined = await bots.join("tok", public_key().encode(), 60)
    locks.locks.append(Lock("l1", bot_principal("ci"), None, "", NOW, None, "admin"))
    with pytest.raises(EnrolmentRefused) as locked:
        await bots.renew(cert(joined), public_key().encode(), 60)
    assert locked.value.reason == "bot is locked"
    locks.locks.clear()
    await backend.delete_bot("ci")
    with pytest.raises(EnrolmentRefused) as removed:
        await bots.renew(cert(joined), public_key().encode(), 60)
    assert removed.value.reason == "bot removed"


@pytest_twisted.ensureDeferred
async def test_token_kinds_do_not_cross(world):
    """An agent token cannot join a bot; a bot token cannot join an agent (no use taken)."""
    clock, backend, ca, bots, _ = world
    await backend.add_token(JoinToken(secret_hash("agent"), "app", NOW + 60, NOW, 1))
    with pytest.raises(EnrolmentRefused) as wrong:
        await bots.join("agent", public_key().encode(), 60)
    assert wrong.value.message == "this token cannot be used to join a bot"
    agents = AgentEnrolment(ca=ca, backend=backend, clock=clock, proxy_id="p")
    with pytest.raises(EnrolmentRefused) as other:
        await agents.join("tok", "csr", "host-1", "peer")
    assert other.value.message == "this token cannot be used to join an agent"
    assert (await backend.get_token(secret_hash("tok"))).uses_left == 1


@pytest_twisted.ensureDeferred
async def test_certificate_ttl_is_held_to_the_cluster_floor_and_an_hour(world):
    """Below bots.min_certificate_ttl or above 1h is refused before the token is used."""
    clock, backend, ca, bots, _ = world
    for ttl in (1, 3601):
        with pytest.raises(EnrolmentRefused) as refused:
            await bots.join("tok", public_key().encode(), ttl)
        assert "certificate_ttl" in refused.value.message
    assert (await backend.get_token(secret_hash("tok"))).uses_left == 1
    assert ttl_problem(60) is None and ttl_problem(30) is not None
    with pytest.raises(EnrolmentRefused):
        await bots.join("tok", b"not a key", 60)
    assert (await backend.get_token(secret_hash("tok"))).uses_left == 1


@pytest_twisted.ensureDeferred
async def test_a_bot_certificate_is_a_caller_capped_by_the_directory(world):
    """The caller is bot:ci (method bot); the directory knows it and caps its roles by
    what the bot holds now; a removed bot is nobody."""
    clock, backend, ca, bots, _ = world
    joined = await bots.join("tok", public_key().encode(), 60)
    caller = caller_from_certificate(ca, cert(joined), NOW)
    assert (caller.user, caller.roles, caller.is_bot) == ("bot:ci", ("ci-apps",), True)
    assert bot_of(caller.user) == "ci" and bot_of("alice") is None
    users = UserDirectory(backend, clock)
    entry = await users.lookup("bot:ci")
    assert effective_identity(caller.roles, caller.traits, entry) == (("ci-apps",), {})
    await backend.delete_bot("ci")
    await users.refresh()
    assert await users.lookup("bot:ci") is None
    assert effective_identity(caller.roles, caller.traits, None) is None
    with pytest.raises(AuthError):
        caller_from_certificate(ca, cert(joined), NOW + 120)   # expired


def test_jwt_says_bot_whatever_claims_are_selected(tmp_path):
    """A bot's token carries bot: true even when an app selects only some claims."""
    import jwt as pyjwt

    from apptunnel.auth.jwt import JwtKeys, JwtSigner

    clock = task.Clock()
    clock.advance(NOW)
    keys = JwtKeys.load_or_create(str(tmp_path), "ES256")
    signer = JwtSigner(keys, "unit", clock, 60)
    token = signer.token("c", "bot:ci", ("r",), {}, "https://a", claims=("username",), bot=True)
    claims = pyjwt.decode(token, options={"verify_signature": False})
    assert claims["bot"] is True and claims["username"] == "bot:ci"
    person = signer.token("c", "bot:ci", ("r",), {}, "https://a", claims=("username",))
    assert "bot" not in pyjwt.decode(person, options={"verify_signature": False})


class Audit:
    def __init__(self):
        self.events = []

    def emit(self, type, **fields):
        self.events.append((type, fields))


@pytest.mark.parametrize("body", [
    {}, {"token": 7, "public_key": "x"}, {"token": "t" * 300, "public_key": "x"},
    {"token": "tok", "public_key": "garbage"}, {"token": "tok", "public_key": None},
])
@pytest_twisted.ensureDeferred
async def test_bot_routes_refuse_malformed_joins_before_any_token_use(world, body):
    """Garbage in the join body is a 400; the token keeps its one use."""
    from apptunnel.web.bots import BotRoutes

    clock, backend, ca, bots, _ = world
    with pytest.raises(AuthError) as info:
        await BotRoutes(bots, Audit()).join(body, "127.0.0.1:1")
    assert info.value.status == 400
    assert (await backend.get_token(secret_hash("tok"))).uses_left == 1


@pytest_twisted.ensureDeferred
async def test_bot_routes_audit_joins_and_refused_renewals(world):
    """A join is bot.join by bot:ci; a renewal without a certificate is refused and
    audited, and the token in its body is not even read."""
    from apptunnel.web.bots import BotRoutes

    clock, backend, ca, bots, _ = world
    audit = Audit()
    routes = BotRoutes(bots, audit)
    answer = await routes.join({"token": "tok", "public_key": public_key(), "ttl": 60}, "c")
    assert answer["bot"] == "ci" and "BEGIN CERTIFICATE" in answer["cert"]
    with pytest.raises(EnrolmentRefused):
        await routes.renew({"token": "tok", "public_key": public_key()}, object(), "c")
    assert [(t, f["outcome"] if "outcome" in f else "success", f.get("actor"))
            for t, f in audit.events] == [("bot.join", "success", "bot:ci"),
                                          ("bot.renew", "failure", "")]


def test_a_bot_is_never_issued_a_user_certificate(world):
    """bot:NAME is no user name: the CA refuses a user certificate for it."""
    clock, backend, ca, bots, _ = world
    with pytest.raises(AuthError) as info:
        ca.issue_user_cert(public_key(), "bot:ci", ("ci-apps",), {}, 60)
    assert info.value.status == 403
