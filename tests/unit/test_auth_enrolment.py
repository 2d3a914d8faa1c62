"""AgentEnrolment: join tokens, agent records and renewals decided in auth/, without the
tunnel protocol (the tunnel server tests cover the same rules over a tunnel)."""

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import task

from apptunnel.auth.ca import ClusterCA
from apptunnel.auth.enrolment import AgentEnrolment, EnrolmentRefused
from apptunnel.auth.pins import cert_pin
from apptunnel.auth.tokens import secret_hash
from apptunnel.backend.records import JoinToken, Scope
from apptunnel.backend.memory import MemoryBackend

NOW = 1_800_000_000.0


def csr(key) -> str:
    built = (x509.CertificateSigningRequestBuilder()
             .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
             .sign(key, hashes.SHA256()))
    return built.public_bytes(serialization.Encoding.PEM).decode()


@pytest_twisted.async_yield_fixture
async def world(tmp_path):
    clock = task.Clock()
    clock.advance(NOW)
    backend = MemoryBackend()
    ca = ClusterCA.load_or_create(str(tmp_path / "ca"), "unit", clock)
    enrolment = AgentEnrolment(ca=ca, backend=backend, clock=clock, proxy_id="p-1")
    await backend.add_token(JoinToken(secret_hash("once"), "app", NOW + 3600, NOW, uses_left=1,
                                      scope=Scope(apps=("grafana",))))
    yield enrolment
    await backend.close()


@pytest_twisted.ensureDeferred
async def test_join_redeems_one_use_and_records_the_scope(world):
    """A join returns a certificate for the CSR's key; the token's one use is gone; hello
    then admits that certificate with the token's scope."""
    key = ec.generate_private_key(ec.SECP256R1())
    joined = await world.join("once", csr(key), "host-1", "127.0.0.1:1")
    cert = x509.load_pem_x509_certificate(joined.cert_pem)
    assert joined.ca_pem == world.ca_pem
    assert world.verify_peer(cert) == ("agent", "host-1")
    assert (await world.hello("host-1", cert)).apps == ("grafana",)
    with pytest.raises(EnrolmentRefused) as again:
        await world.join("once", csr(ec.generate_private_key(ec.SECP256R1())), "host-2", "x")
    assert again.value.reason == "token used up"
    assert again.value.message == "invalid or expired join token"


@pytest.mark.parametrize("token, reason", [("nope", "unknown token"), ("once", "expired token")])
@pytest_twisted.ensureDeferred
async def test_unknown_and_expired_tokens_are_refused_alike(world, token, reason):
    """The agent hears the same text for an unknown and an expired token; the log knows why."""
    world.clock.advance(7200)
    with pytest.raises(EnrolmentRefused) as refused:
        await world.join(token, csr(ec.generate_private_key(ec.SECP256R1())), "h", "x")
    assert (refused.value.reason, refused.value.message) == (
        reason, "invalid or expired join token")


@pytest_twisted.ensureDeferred
async def test_hello_with_another_key_or_unknown_agent_wants_a_rejoin(world):
    """A certificate of the cluster that is not the recorded key's, or of an agent that has
    no record, is refused with rejoin set."""
    key = ec.generate_private_key(ec.SECP256R1())
    await world.join("once", csr(key), "host-1", "x")
    other = x509.load_pem_x509_certificate(
        world.ca.sign_agent_csr(csr(ec.generate_private_key(ec.SECP256R1())), "host-1", 600))
    for host_id, cert in (("host-1", other), ("host-9", other), ("host-1", None)):
        with pytest.raises(EnrolmentRefused) as refused:
            await world.hello(host_id, cert)
        assert refused.value.rejoin


@pytest_twisted.ensureDeferred
async def test_renew_keeps_the_key(world):
    """renew signs a CSR of the recorded key only."""
    key = ec.generate_private_key(ec.SECP256R1())
    joined = await world.join("once", csr(key), "host-1", "x")
    world.clock.advance(60)
    issued = await world.renew("host-1", csr(key))
    renewed = x509.load_pem_x509_certificate(issued.cert_pem)
    assert cert_pin(renewed) == cert_pin(x509.load_pem_x509_certificate(joined.cert_pem))
    assert issued.not_after == renewed.not_valid_after_utc.timestamp()
    with pytest.raises(EnrolmentRefused, match="must keep the agent's key"):
        await world.renew("host-1", csr(ec.generate_private_key(ec.SECP256R1())))
    with pytest.raises(EnrolmentRefused, match="no longer known"):
        await world.renew("host-2", csr(key))


def test_the_tunnel_server_holds_no_backend():
    """proxy/tunnel_server.py speaks the protocol only: no storage import, no backend
    argument; enrolment decisions are AgentEnrolment's."""
    import ast
    import inspect

    from apptunnel.proxy import tunnel_server

    tree = ast.parse(inspect.getsource(tunnel_server))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not [m for m in imported if m and m.startswith("apptunnel.backend")]
    assert "backend" not in inspect.signature(tunnel_server.TunnelServerFactory).parameters
