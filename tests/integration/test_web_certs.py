"""POST /v1/certs and user-certificate authentication of the JSON API."""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from twisted.internet import reactor as wall_clock

from apptunnel.auth.ca import ClusterCA, user_identity
from apptunnel.backend.records import User
from apptunnel.cli.context import CliError
from apptunnel.cli.http import ProxyClient, tls_context
from tests.support.keys import key_pem, new_key
from tests.support.tls_listener import listen_tls
from tests.support.waiting import in_thread
from tests.support.web_env import password_hash


@pytest.fixture
def env(web_env):
    """The tests here run against the shared web app environment."""
    return web_env


async def cert_request(env, body, cookie=None):
    return await env.call("POST", "/v1/certs", cookie=cookie, json=body)


def api_client(env, port: int, cert_pem: bytes | None = None, key=None) -> ProxyClient:
    client = (cert_pem, key_pem(key)) if cert_pem is not None else None
    return ProxyClient(f"apptunnel.localhost:{port}", tls_context(env.ca.cert_pem, client=client))


@pytest_twisted.ensureDeferred
async def test_password_gets_a_certificate_for_our_key(env):
    """A right password and a public key yield a user cert from the cluster CA with roles."""
    key, public = new_key()
    response, body = await cert_request(
        env, {"username": "alice", "password": "alice-pw", "public_key": public})
    assert response.code == 200
    data = json.loads(body)
    assert data["user"] == "alice" and data["roles"] == ["dev"]
    assert data["ca"] == env.ca.cert_pem.decode()
    cert = x509.load_pem_x509_certificate(data["cert"].encode())
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    assert env.ca.verify_peer(cert) == ("user", "alice")
    assert user_identity(cert) == (("dev",), {})
    assert data["expires"] == pytest.approx(cert.not_valid_after_utc.timestamp())
    # capped by the dev role's max_session_ttl (1h), not the proxy's 12h
    assert data["expires"] == pytest.approx(env.clock.seconds() + 3600, abs=120)


@pytest_twisted.ensureDeferred
async def test_requested_ttl_only_shortens(env):
    """`ttl` asks for less; asking for more than the roles allow still gets the cap."""
    _, public = new_key()
    _, body = await cert_request(env, {"username": "alice", "password": "alice-pw",
                                       "public_key": public, "ttl": 60})
    assert json.loads(body)["expires"] == pytest.approx(env.clock.seconds() + 60, abs=120)
    _, body = await cert_request(env, {"username": "alice", "password": "alice-pw",
                                       "public_key": public, "ttl": 10 * 86400})
    assert json.loads(body)["expires"] == pytest.approx(env.clock.seconds() + 3600, abs=120)


@pytest_twisted.ensureDeferred
async def test_traits_are_carried(env):
    """The user's traits end up in the certificate."""
    await env.backend.create_user(User("carol", password_hash("carol-pw"), ("dev",),
                                       {"logins": ("root", "ubuntu")}, env.clock.seconds()))
    _, public = new_key()
    response, body = await cert_request(
        env, {"username": "carol", "password": "carol-pw", "public_key": public})
    assert response.code == 200
    cert = x509.load_pem_x509_certificate(json.loads(body)["cert"].encode())
    assert user_identity(cert) == (("dev",), {"logins": ("root", "ubuntu")})


@pytest_twisted.ensureDeferred
async def test_bad_password_is_the_uniform_401(env):
    """Wrong password and unknown user get the same 401 body as /v1/sessions; no cert event."""
    _, public = new_key()
    wrong, wrong_body = await cert_request(
        env, {"username": "alice", "password": "nope", "public_key": public})
    unknown, unknown_body = await cert_request(
        env, {"username": "mallory", "password": "nope", "public_key": public})
    session, session_body = await env.call(
        "POST", "/v1/sessions", json={"username": "alice", "password": "nope"})
    assert wrong.code == unknown.code == session.code == 401
    assert wrong_body == unknown_body == session_body
    assert await env.events("cert.issue") == []
    assert [e.outcome for e in await env.events("user.login")] == ["failure"] * 3


@pytest.mark.parametrize("public_key", [
    "not a key", "", 7, None,
    "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
])
@pytest_twisted.ensureDeferred
async def test_malformed_key_is_400(env, public_key):
    """A missing or malformed public key is a 400, whatever the password."""
    response, body = await cert_request(
        env, {"username": "alice", "password": "alice-pw", "public_key": public_key})
    assert response.code == 400
    assert "public_key" in json.loads(body)["error"]


@pytest.mark.parametrize("ttl", [0, -5, "1h", True])
@pytest_twisted.ensureDeferred
async def test_bad_ttl_is_400(env, ttl):
    """A ttl that is not a positive number of seconds is a 400."""
    _, public = new_key()
    response, _ = await cert_request(
        env, {"username": "alice", "password": "alice-pw", "public_key": public, "ttl": ttl})
    assert response.code == 400


@pytest_twisted.ensureDeferred
async def test_issue_is_audited(env):
    """cert.issue (T5000I) records the user, the ttl and the client address."""
    _, public = new_key()
    await cert_request(env, {"username": "alice", "password": "alice-pw",
                             "public_key": public, "ttl": 120})
    [event] = await env.events("cert.issue")
    assert event.code == "T5000I" and event.actor == "alice" and event.outcome == "success"
    assert event.fields["user"] == "alice" and event.fields["ttl"] == 120
    assert "client" in event.fields


@pytest_twisted.ensureDeferred
async def test_session_cookie_gets_a_certificate(env):
    """A signed-in browser session can get a cert without the password; no cookie is a 401."""
    secret = await env.login()
    _, public = new_key()
    response, body = await cert_request(env, {"public_key": public}, cookie=secret)
    assert response.code == 200
    assert json.loads(body)["user"] == "alice"
    response, _ = await cert_request(env, {"public_key": public})
    assert response.code == 401


@pytest_twisted.ensureDeferred
async def test_api_accepts_user_certificate_over_tls(env):
    """Over real TLS, /v1/apps takes a valid user cert as identity; no cert is a 401."""
    port = await listen_tls(env)
    try:
        key, public = new_key()
        cert_pem = env.ca.issue_user_cert(public, "alice", ["dev"], {}, 600)
        code, data = await in_thread(
            lambda: api_client(env, port.getHost().port, cert_pem, key).call("GET", "/v1/apps"))
        assert code == 200
        assert data == {"apps": [{
            "name": "grafana", "type": "http", "labels": {"env": "staging"},
            "public_addr": "grafana.apptunnel.localhost:3080", "online": True, "description": "", "requestable": False,
        }]}
        code, _ = await in_thread(
            lambda: api_client(env, port.getHost().port).call("GET", "/v1/apps"))
        assert code == 401  # a client without a certificate still completes the handshake
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_expired_or_agent_certificate_is_refused(env):
    """An expired user cert and an agent cert do not authenticate the API."""
    port = await listen_tls(env)
    try:
        key, public = new_key()
        short = env.ca.issue_user_cert(public, "alice", ["dev"], {}, 30)
        env.clock.advance(60)
        code, _ = await in_thread(
            lambda: api_client(env, port.getHost().port, short, key).call("GET", "/v1/apps"))
        assert code == 401
        csr = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([]))
               .sign(key, hashes.SHA256()))
        agent = env.ca.sign_agent_csr(csr.public_bytes(serialization.Encoding.PEM), "host-1")
        code, _ = await in_thread(
            lambda: api_client(env, port.getHost().port, agent, key).call("GET", "/v1/apps"))
        assert code == 401
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_certificate_of_another_ca_fails_the_handshake(env, tmp_path):
    """A client cert from a foreign CA is refused by TLS itself."""
    port = await listen_tls(env)
    try:
        other = ClusterCA.load_or_create(str(tmp_path / "other"), env.config.cluster_name, wall_clock)
        key, public = new_key()
        foreign = other.issue_user_cert(public, "alice", ["dev"], {}, 600)
        with pytest.raises(CliError):
            await in_thread(lambda: api_client(env, port.getHost().port, foreign, key)
                            .call("GET", "/v1/apps"))
    finally:
        await port.stopListening()



async def apps_with_cert(env, port, user: str, roles) -> tuple[int, dict]:
    key, public = new_key()
    cert_pem = env.ca.issue_user_cert(public, user, list(roles), {}, 600)
    return await in_thread(
        lambda: api_client(env, port.getHost().port, cert_pem, key).call("GET", "/v1/apps"))


@pytest_twisted.ensureDeferred
async def test_locked_users_certificate_gets_403_with_the_lock_message(env):
    """/v1/apps with the certificate of a locked user is 403 + the lock message, not a list."""
    from apptunnel.backend.records import Lock

    port = await listen_tls(env)
    try:
        assert (await apps_with_cert(env, port, "alice", ["dev"]))[0] == 200
        await env.backend.put_lock(Lock("l1", "alice", None, "incident 9", env.clock.seconds(),
                                        None, "admin"))
        await env.locks.refresh()
        code, data = await apps_with_cert(env, port, "alice", ["dev"])
        assert (code, data) == (403, {"error": "your access is locked: incident 9"})
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_removed_users_certificate_gets_403(env):
    """After the user is deleted, their still-valid certificate lists nothing: 403."""
    port = await listen_tls(env)
    try:
        await env.users.refresh()
        await env.backend.delete_user("alice")
        await env.users.refresh()
        code, data = await apps_with_cert(env, port, "alice", ["dev"])
        assert (code, data) == (403, {"error": "your user account no longer exists"})
        code, _ = await apps_with_cert(env, port, "mallory", ["dev"])   # never existed
        assert code == 403
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_certificate_roles_are_capped_by_the_users_roles_now(env):
    """bob holds no roles: a certificate naming him with role dev lists no app."""
    port = await listen_tls(env)
    try:
        code, data = await apps_with_cert(env, port, "bob", ["dev"])
        assert (code, data) == (200, {"apps": []})
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_cookie_certificate_carries_only_the_roles_held_now(env):
    """A session started with role dev, after dev is taken away, gets a cert with no roles."""
    secret = await env.login()
    await env.users.refresh()
    user = await env.backend.get_user("alice")
    await env.backend.update_user(User("alice", user.password_hash, (), {}, user.created))
    await env.users.refresh()
    _, public = new_key()
    response, body = await cert_request(env, {"public_key": public}, cookie=secret)
    assert response.code == 200 and json.loads(body)["roles"] == []
