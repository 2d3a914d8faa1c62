"""Caller construction: one function per way a user arrives (certificate, session)."""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from OpenSSL import crypto
from twisted.internet.task import Clock

from cryptography.x509.oid import ExtendedKeyUsageOID

from apptunnel.auth.ca import IDENTITY_OID, ROLE_USER, SESSION_MFA_OID, ClusterCA, _der_utf8
from apptunnel.auth.callers import (
    Caller, caller_from_certificate, caller_from_session, certificate_caller, peer_certificate,
)
from apptunnel.auth.errors import AuthError
from apptunnel.backend.records import WebSession

NOW = 1_800_000_000.0


@pytest.fixture
def ca(tmp_path):
    clock = Clock()
    clock.advance(NOW)
    return ClusterCA.load_or_create(str(tmp_path / "data"), "acme", clock=clock)


def user_cert(ca, name="alice", roles=("dev",), traits=None, ttl=3600.0) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return x509.load_pem_x509_certificate(
        ca.issue_user_cert(pem, name, roles, traits or {"team": ["a"]}, ttl))


def test_a_user_certificate_becomes_a_caller_keyed_by_its_fingerprint(ca):
    """User, roles and traits from the certificate; credential = SHA-256 hex; its expiry."""
    cert = user_cert(ca)
    caller = caller_from_certificate(ca, cert, NOW)
    assert (caller.user, caller.roles, caller.traits, caller.method) == (
        "alice", ("dev",), {"team": ("a",)}, "certificate")
    assert caller.credential == cert.fingerprint(hashes.SHA256()).hex()
    assert caller.expires == cert.not_valid_after_utc.timestamp()


def test_an_expired_or_foreign_certificate_is_refused(ca, tmp_path):
    """Outside its validity, or from another CA: AuthError 401."""
    cert = user_cert(ca, ttl=60)
    with pytest.raises(AuthError) as err:
        caller_from_certificate(ca, cert, NOW + 3600)
    assert err.value.status == 401
    other = ClusterCA.load_or_create(str(tmp_path / "other"), "acme", clock=ca.clock)
    with pytest.raises(AuthError):
        caller_from_certificate(other, cert, NOW)


def test_a_session_becomes_a_caller_keyed_by_the_session_presented():
    """An app host keys by the app session and ends with whichever session ends first."""
    web = WebSession("web-hash", "bob", ("dev",), {"t": ("x",)}, NOW, NOW + 100)
    assert caller_from_session(web) == Caller("bob", ("dev",), {"t": ("x",)}, "session",
                                              "web-hash", NOW + 100)
    app = caller_from_session(web, "app-hash", NOW + 50)
    assert (app.credential, app.expires) == ("app-hash", NOW + 50)
    assert caller_from_session(web, "app-hash", NOW + 500).expires == NOW + 100


def test_acting_as_keeps_the_credential():
    """Capping roles never changes which credential the caller holds."""
    caller = Caller("bob", ("dev", "ops"), {}, "certificate", "fp", NOW)
    assert caller.acting_as(("dev", "ops"), {}) is caller
    capped = caller.acting_as(("dev",), {})
    assert (capped.roles, capped.credential, capped.expires) == (("dev",), "fp", NOW)


class _Transport:
    def __init__(self, peer):
        self._peer = peer

    def getPeerCertificate(self):
        if isinstance(self._peer, Exception):
            raise self._peer
        return self._peer


def test_peer_certificate_reads_any_tls_transport(ca):
    """pyOpenSSL or cryptography certificates; None without TLS, without one, or on error."""
    cert = user_cert(ca)
    assert peer_certificate(_Transport(cert)) == cert
    assert peer_certificate(_Transport(crypto.X509.from_cryptography(cert))) == cert
    assert peer_certificate(_Transport(None)) is None
    assert peer_certificate(_Transport(ValueError("no TLS state"))) is None
    assert peer_certificate(object()) is None


def test_certificate_caller_never_raises(ca, tmp_path):
    """No CA, no certificate, or an invalid one: None (the request falls back to sign-in)."""
    cert = user_cert(ca)
    assert certificate_caller(ca, _Transport(cert), NOW).user == "alice"
    assert certificate_caller(None, _Transport(cert), NOW) is None
    assert certificate_caller(ca, _Transport(None), NOW) is None
    assert certificate_caller(ca, _Transport(cert), NOW + 10 * 86400) is None


def bound_cert(ca, app="prod", until=NOW + 3600, ttl=60.0) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return x509.load_pem_x509_certificate(ca.issue_user_cert(
        pem, "alice", ("dev",), {}, ttl, mfa_app=app, sessions_until=until))


def test_a_one_app_mfa_certificate_names_its_app_and_starts_sessions_for_a_minute(ca):
    """Per-session MFA: the caller carries the bound app; its sessions may run until the
    asking credential ends; after its minute the certificate starts nothing."""
    cert = bound_cert(ca)
    caller = caller_from_certificate(ca, cert, NOW + 30)
    assert caller.mfa_app == "prod" and caller.expires == NOW + 3600
    assert caller_from_certificate(ca, user_cert(ca), NOW).mfa_app is None
    with pytest.raises(AuthError):
        caller_from_certificate(ca, cert, NOW + 61)


def test_a_malformed_app_binding_is_refused_not_ignored(ca):
    """A binding that does not parse never reads as "no binding" (an all-apps cert)."""
    key = ec.generate_private_key(ec.SECP256R1())
    builder = ca._leaf(key.public_key(), ROLE_USER, "alice", 60.0,
                       ExtendedKeyUsageOID.CLIENT_AUTH)
    for bad in ('{"app": "prod"}', '{"app": "", "mfa": true, "until": 1}', "garbage"):
        b = builder.add_extension(x509.UnrecognizedExtension(
            SESSION_MFA_OID, _der_utf8(bad)), critical=False)
        b = b.add_extension(x509.UnrecognizedExtension(
            IDENTITY_OID, _der_utf8('{"roles":[],"traits":{}}')), critical=False)
        cert = x509.load_pem_x509_certificate(ca._sign(b))
        with pytest.raises(AuthError, match="app binding"):
            caller_from_certificate(ca, cert, NOW)
