"""The cluster CA: persistence, pins, issuing and checking certificates."""

import datetime
import os
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet.task import Clock
from twisted.internet import reactor as wall_clock

from apptunnel.auth.ca import ClusterCA, load_server_tls, user_identity
from apptunnel.auth.pins import spki_pin
from apptunnel.auth.errors import AuthError
from apptunnel.config import ConfigError

NOW = 1_800_000_000.0
DAY = 86400.0


def clock_at(seconds: float = NOW) -> Clock:
    clock = Clock()
    clock.advance(seconds)
    return clock


@pytest.fixture
def ca(tmp_path) -> ClusterCA:
    return ClusterCA.load_or_create(str(tmp_path / "data"), "acme", clock=clock_at())


def make_csr(common_name: str = "whatever") -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
           .sign(key, hashes.SHA256()))
    return key, csr.public_bytes(serialization.Encoding.PEM)


def load(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_created_files_and_modes(tmp_path, ca):
    """A new CA writes ca.key 0600 and ca.crt, a 10-year EC P-256 CA certificate."""
    data = tmp_path / "data"
    assert mode(data / "ca.key") == 0o600
    assert (data / "ca.crt").read_bytes() == ca.cert_pem
    cert = load(ca.cert_pem)
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    life = cert.not_valid_after_utc - datetime.datetime.fromtimestamp(NOW, datetime.timezone.utc)
    assert 3649 <= life.days <= 3651


def test_pin_stable_across_reload(tmp_path, ca):
    """Reloading the CA keeps its key, certificate and pin; the pin is the SPKI hash."""
    again = ClusterCA.load_or_create(str(tmp_path / "data"), "acme", clock=clock_at())
    assert again.pin == ca.pin == spki_pin(ca.cert_pem)
    assert again.cert_pem == ca.cert_pem
    assert ca.pin.startswith("sha256:") and len(ca.pin) == 7 + 64


def test_half_present_ca_is_config_error(tmp_path, ca):
    """A CA key without its certificate is refused instead of silently replaced."""
    os.unlink(tmp_path / "data" / "ca.crt")
    with pytest.raises(ConfigError, match="ca.crt"):
        ClusterCA.load_or_create(str(tmp_path / "data"), "acme", wall_clock)


def test_corrupt_ca_key_is_config_error(tmp_path, ca):
    """An unreadable CA key is one clear ConfigError."""
    (tmp_path / "data" / "ca.key").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="cannot load the CA key"):
        ClusterCA.load_or_create(str(tmp_path / "data"), "acme", wall_clock)


def test_sign_agent_csr_sets_identity_and_ignores_subject(ca):
    """The agent cert uses the CSR key but our CN/O/OU and the clientAuth usage."""
    key, csr = make_csr("evil-admin")
    cert = load(ca.sign_agent_csr(csr, "host-1", 365 * DAY))
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    subject = {a.oid: a.value for a in cert.subject}
    assert subject == {NameOID.COMMON_NAME: "host-1", NameOID.ORGANIZATION_NAME: "acme",
                       NameOID.ORGANIZATIONAL_UNIT_NAME: "agent"}
    assert ca.verify_peer(cert, NOW) == ("agent", "host-1")


def test_sign_agent_csr_rejects_bad_signature(ca):
    """A CSR whose signature does not match its key (no proof of possession) is refused."""
    _, csr = make_csr()
    der = bytearray(x509.load_pem_x509_csr(csr).public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0x55  # inside the signature
    tampered = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(AuthError, match="signature"):
        ca.sign_agent_csr(tampered, "host-1", DAY)


@pytest.mark.parametrize("csr, host_id", [
    (b"not a csr", "host-1"),
    (None, "bad host id"),
    (None, ""),
    (None, "x" * 200),
])
def test_sign_agent_csr_rejects_bad_input(ca, csr, host_id):
    """Garbage CSRs and unsafe host ids give AuthError(400), not a traceback."""
    csr = csr if csr is not None else make_csr()[1]
    with pytest.raises(AuthError) as info:
        ca.sign_agent_csr(csr, host_id, DAY)
    assert info.value.status == 400


def test_verify_peer_rejects_other_ca(tmp_path, ca):
    """A certificate from another CA with the same cluster name is refused."""
    other = ClusterCA.load_or_create(str(tmp_path / "other"), "acme", clock=clock_at())
    cert = load(other.sign_agent_csr(make_csr()[1], "host-1", DAY))
    with pytest.raises(AuthError, match="not issued by"):
        ca.verify_peer(cert, NOW)


def test_verify_peer_rejects_expired_and_not_yet_valid(ca):
    """Outside its validity window a certificate is refused."""
    cert = load(ca.sign_agent_csr(make_csr()[1], "host-1", DAY))
    assert ca.verify_peer(cert, NOW + DAY - 1) == ("agent", "host-1")
    with pytest.raises(AuthError, match="expired"):
        ca.verify_peer(cert, NOW + DAY + 1)
    with pytest.raises(AuthError, match="expired"):
        ca.verify_peer(cert, NOW - 2 * DAY)


def test_verify_peer_uses_ca_clock_by_default(tmp_path):
    """Without `now`, verify_peer asks the CA's clock."""
    clock = clock_at()
    ca = ClusterCA.load_or_create(str(tmp_path), "acme", clock=clock)
    cert = load(ca.sign_agent_csr(make_csr()[1], "host-1", DAY))
    assert ca.verify_peer(cert) == ("agent", "host-1")
    clock.advance(2 * DAY)
    with pytest.raises(AuthError):
        ca.verify_peer(cert)


def test_verify_peer_rejects_server_cert(ca):
    """The proxy's server certificate cannot be used as a client identity."""
    cert_pem, _ = ca.issue_server_cert(["proxy.localhost"], [], DAY)
    with pytest.raises(AuthError, match="client"):
        ca.verify_peer(load(cert_pem), NOW)


def test_user_cert_carries_roles_and_traits(ca):
    """A user cert names the user (OU=user) and round-trips roles and traits."""
    key = ec.generate_private_key(ec.SECP256R1())
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    traits = {"logins": ["root", "alice"], "team": ["sre"], "big": ["x" * 300]}
    cert = load(ca.issue_user_cert(public_pem, "alice", ["dev", "sre"], traits, 3600))
    assert ca.verify_peer(cert, NOW) == ("user", "alice")
    roles, got = user_identity(cert)
    assert roles == ("dev", "sre")
    assert got == {"logins": ("root", "alice"), "team": ("sre",), "big": ("x" * 300,)}


def test_user_identity_missing_is_auth_error(ca):
    """An agent cert has no user identity extension: AuthError, not KeyError."""
    cert = load(ca.sign_agent_csr(make_csr()[1], "host-1", DAY))
    with pytest.raises(AuthError):
        user_identity(cert)


def test_server_cert_names_and_key(ca):
    """Server certs carry the DNS and IP SANs, serverAuth, and a matching key."""
    cert_pem, key_pem = ca.issue_server_cert(["a.localhost", "*.a.localhost"], ["127.0.0.1"], DAY)
    cert = load(cert_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["a.localhost", "*.a.localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    key = serialization.load_pem_private_key(key_pem, None)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()
    cert.verify_directly_issued_by(load(ca.cert_pem))


def test_load_server_tls_reuses_and_renews(tmp_path):
    """proxy.crt is created 0600-keyed, reused, and renewed near expiry or on new names."""
    clock = clock_at()
    data = str(tmp_path)
    ca = ClusterCA.load_or_create(data, "acme", clock=clock)
    first = load_server_tls(data, ca, ["a.localhost"], ["127.0.0.1"])
    assert mode(tmp_path / "proxy.key") == 0o600
    assert load_server_tls(data, ca, ["a.localhost"], ["127.0.0.1"]) == first
    changed = load_server_tls(data, ca, ["a.localhost", "b.localhost"], ["127.0.0.1"])
    assert changed != first
    assert load_server_tls(data, ca, ["b.localhost"], []) == changed  # subset still covered
    clock.advance(365 * DAY - 6 * DAY)
    renewed = load_server_tls(data, ca, ["b.localhost"], [])
    assert renewed != changed
    assert mode(tmp_path / "proxy.key") == 0o600


def test_load_server_tls_replaces_cert_of_other_ca(tmp_path):
    """A proxy.crt signed by a previous CA is re-issued under the current one."""
    data = tmp_path / "data"
    old = ClusterCA.load_or_create(str(tmp_path / "old"), "acme", clock=clock_at())
    ca = ClusterCA.load_or_create(str(data), "acme", clock=clock_at())
    cert_pem, key_pem = old.issue_server_cert(["a.localhost"], [], 365 * DAY)
    (data / "proxy.crt").write_bytes(cert_pem)
    (data / "proxy.key").write_bytes(key_pem)
    new_cert, _ = load_server_tls(str(data), ca, ["a.localhost"], [])
    load(new_cert).verify_directly_issued_by(load(ca.cert_pem))


def test_the_ca_has_no_clock_of_its_own(tmp_path):
    """Time comes from the reactor the caller passes in: there is no wall-clock fallback."""
    with pytest.raises(TypeError):
        ClusterCA.load_or_create(str(tmp_path / "data"), "acme")
