"""The cluster certificate authority: the root of trust between agents, proxies and users.

One EC P-256 key signs the proxy's server certificates, each agent's client certificate
(issued at join from the agent's own CSR, so the agent key never leaves the agent) and
users' short-lived certificates for TCP access. Agents verify the proxy against the CA's
*pin* (SHA-256 of its SubjectPublicKeyInfo) before they trust anything it says.

Who a certificate belongs to is written in its subject: ``O`` = cluster name,
``OU`` = role (``agent``, ``user`` or ``proxy``), ``CN`` = the host id or user name.
A user certificate also carries its roles and traits as JSON in a private, non-critical
extension (:data:`IDENTITY_OID`, value a DER UTF8String of
``{"roles": [...], "traits": {name: [values]}}``); :func:`user_identity` reads it back.

Key files are created 0600 through ``os.open`` so there is no moment where they are
readable by others; files are replaced atomically (write a temp file, then rename).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import re
from typing import Iterable

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from apptunnel.auth.errors import AuthError
from apptunnel.auth.names import USER_NAME
from apptunnel.auth.pins import cert_pin
from apptunnel.errors import ConfigError
from apptunnel.files import write_file

__all__ = [
    "IDENTITY_OID",
    "SESSION_MFA_OID",
    "ClusterCA",
    "bot_identity",
    "client_public_key",
    "load_server_tls",
    "new_ca_pem",
    "publish_ca_cert",
    "session_mfa_app",
    "user_identity",
]

log = Logger()

CA_TTL = 10 * 365 * 86400.0
SERVER_CERT_TTL = 365 * 86400.0
RENEW_BEFORE = 7 * 86400.0
# Certificates start an hour in the past so a peer whose clock is a little behind accepts them.
_BACKDATE = 3600.0

# A private OID minted under the UUID arc (ITU-T X.667: 2.25.<uuid as integer>), so it
# cannot collide with anyone's registered OID and needs no registration.
IDENTITY_OID = x509.ObjectIdentifier("2.25.229081768957101467911925960359637934571")
# Per-session MFA: a certificate with this extension (a DER UTF8String of
# {"app": NAME, "mfa": true, "until": T}) was issued after a fresh second factor, for that
# one app only (auth/access.py refuses it for any other app and for everything else). It
# is valid (notAfter) for a minute, to START sessions; a session started with it may run
# until T, the end of the credential that asked for it.
SESSION_MFA_OID = x509.ObjectIdentifier("2.25.229081768957101467911925960359637934572")

ROLE_AGENT = "agent"
ROLE_USER = "user"
ROLE_PROXY = "proxy"
ROLE_BOT = "bot"

_HOST_ID = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,126}[A-Za-z0-9])?\Z")
_MAX_CSR_BYTES = 16 * 1024
_MAX_IDENTITY_BYTES = 32 * 1024


def _when(seconds: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(seconds, tz=datetime.timezone.utc)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _der_utf8(text: str) -> bytes:
    """DER UTF8String (tag 12) with a definite length."""
    body = text.encode("utf-8")
    n = len(body)
    if n < 0x80:
        length = bytes([n])
    else:
        raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(raw)]) + raw
    return b"\x0c" + length + body


def _parse_der_utf8(data: bytes) -> str:
    if len(data) < 2 or data[0] != 0x0C:
        raise ValueError("not a UTF8String")
    first = data[1]
    if first < 0x80:
        n, start = first, 2
    else:
        count = first & 0x7F
        if count == 0 or count > 4 or len(data) < 2 + count:
            raise ValueError("bad length")
        n, start = int.from_bytes(data[2:2 + count], "big"), 2 + count
    if start + n != len(data):
        raise ValueError("length mismatch")
    return data[start:].decode("utf-8")


def session_mfa_app(cert: x509.Certificate) -> tuple[str, float] | None:
    """(app, sessions end) of a per-session MFA certificate; None for an ordinary one.
    AuthError(401) for a malformed binding: never read as "no binding"."""
    try:
        ext = cert.extensions.get_extension_for_oid(SESSION_MFA_OID)
    except x509.ExtensionNotFound:
        return None
    try:
        doc = json.loads(_parse_der_utf8(ext.value.value))
        app, mfa, until = doc["app"], doc["mfa"], doc["until"]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise AuthError(401, "certificate carries an invalid app binding") from None
    if (not isinstance(app, str) or not app or mfa is not True
            or not isinstance(until, (int, float)) or isinstance(until, bool)):
        raise AuthError(401, "certificate carries an invalid app binding")
    return app, float(until)


def user_identity(cert: x509.Certificate) -> tuple[tuple[str, ...], dict[str, tuple[str, ...]]]:
    """(roles, traits) written into a user certificate by :meth:`ClusterCA.issue_user_cert`.

    Call only on a certificate that :meth:`ClusterCA.verify_peer` accepted as a user.
    """
    try:
        ext = cert.extensions.get_extension_for_oid(IDENTITY_OID)
        doc = json.loads(_parse_der_utf8(ext.value.value))
        roles = tuple(str(r) for r in doc["roles"])
        traits = {str(k): tuple(str(v) for v in vs) for k, vs in doc["traits"].items()}
    except (x509.ExtensionNotFound, ValueError, KeyError, TypeError, AttributeError):
        raise AuthError(401, "certificate carries no valid identity") from None
    return roles, traits


def bot_identity(cert: x509.Certificate) -> tuple[tuple[str, ...], int]:
    """(roles, generation) written into a bot certificate by :meth:`ClusterCA.issue_bot_cert`.

    Call only on a certificate that :meth:`ClusterCA.verify_peer` accepted as a bot.
    """
    roles, _ = user_identity(cert)
    try:
        ext = cert.extensions.get_extension_for_oid(IDENTITY_OID)
        generation = json.loads(_parse_der_utf8(ext.value.value))["generation"]
    except (x509.ExtensionNotFound, ValueError, KeyError, TypeError):
        raise AuthError(401, "certificate carries no valid bot identity") from None
    if not isinstance(generation, int) or isinstance(generation, bool) or generation < 1:
        raise AuthError(401, "certificate carries no valid bot identity")
    return roles, generation


def assumed_requests(cert: x509.Certificate) -> tuple[str, ...]:
    """The access request ids a user certificate assumed (none for most)."""
    try:
        ext = cert.extensions.get_extension_for_oid(IDENTITY_OID)
        found = json.loads(_parse_der_utf8(ext.value.value)).get("requests") or []
        return tuple(str(r) for r in found)
    except (x509.ExtensionNotFound, ValueError, TypeError, AttributeError):
        return ()


def new_ca_pem(cluster_name: str, now: float) -> tuple[bytes, bytes]:
    """A new CA as (key_pem, cert_pem), for the key store to keep."""
    key, cert = _new_ca(cluster_name, now)
    return _key_pem(key), cert.public_bytes(serialization.Encoding.PEM)


def _new_ca(cluster_name: str, now: float) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, cluster_name),
        x509.NameAttribute(NameOID.COMMON_NAME, f"{cluster_name} apptunnel CA"),
    ])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_when(now - _BACKDATE))
        .not_valid_after(_when(now + CA_TTL))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True,
            crl_sign=True, encipher_only=False, decipher_only=False,
        ), critical=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


class ClusterCA:
    """Issues and checks the cluster's certificates. Holds the CA key in memory only."""

    def __init__(self, cluster_name: str, key: ec.EllipticCurvePrivateKey,
                 cert: x509.Certificate, clock: IReactorTime) -> None:
        self.cluster_name = cluster_name
        self._key = key
        self.cert = cert
        self.cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        self.pin = cert_pin(cert)
        self.clock = clock

    @property
    def user_issuer_pem(self) -> bytes:
        """The CA that signs user and bot certificates (this one; auth/ca_set.py splits)."""
        return self.cert_pem

    def host_trust(self) -> tuple[str, ...]:
        """The host CAs clients are to trust (this one; auth/ca_set.py has more in a rotation)."""
        return (self.cert_pem.decode("ascii"),)

    @classmethod
    def from_pem(cls, cluster_name: str, key_pem: bytes, cert_pem: bytes,
                 clock: IReactorTime) -> ClusterCA:
        """The CA from stored material (auth/keystore.py); ValueError if it is unusable."""
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
            cert = x509.load_pem_x509_certificate(cert_pem)
        except (ValueError, TypeError) as err:
            raise ValueError(f"not a PEM key and certificate ({err})") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or (
            key.public_key().public_numbers() != cert.public_key().public_numbers()
        ):
            raise ValueError("CA key does not match its certificate")
        return cls(cluster_name, key, cert, clock)

    @classmethod
    def load_or_create(cls, data_dir: str, cluster_name: str, clock: IReactorTime) -> ClusterCA:
        """Load ``ca.key``/``ca.crt`` from `data_dir`, creating them on first start.

        ``clock`` (the caller's reactor) dates everything the CA issues and checks.

        A half-present or unreadable pair is a ConfigError: silently making a new CA
        would orphan every agent that joined with the old pin.
        """
        key_path = os.path.join(data_dir, "ca.key")
        cert_path = os.path.join(data_dir, "ca.crt")
        have_key, have_cert = os.path.exists(key_path), os.path.exists(cert_path)
        if have_key and have_cert:
            return cls._load(key_path, cert_path, cluster_name, clock)
        if have_key or have_cert:
            missing = cert_path if have_key else key_path
            raise ConfigError(missing, "CA file missing while its pair exists; restore it "
                                       "or remove both to create a new CA (agents must rejoin)")
        os.makedirs(data_dir, mode=0o700, exist_ok=True)
        ca = cls._create(cluster_name, clock)
        write_file(key_path, _key_pem(ca._key), 0o600)
        write_file(cert_path, ca.cert_pem, 0o644)
        log.info("created cluster CA for {cluster} (pin {pin})", cluster=cluster_name, pin=ca.pin)
        return ca

    @classmethod
    def _load(cls, key_path: str, cert_path: str, cluster_name: str,
              clock: IReactorTime) -> ClusterCA:
        try:
            with open(key_path, "rb") as f:
                key = serialization.load_pem_private_key(f.read(), password=None)
        except (OSError, ValueError, TypeError) as err:
            raise ConfigError(key_path, f"cannot load the CA key: {err}") from None
        try:
            with open(cert_path, "rb") as f:
                cert = x509.load_pem_x509_certificate(f.read())
        except (OSError, ValueError) as err:
            raise ConfigError(cert_path, f"cannot load the CA certificate: {err}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or (
            key.public_key().public_numbers() != cert.public_key().public_numbers()
        ):
            raise ConfigError(key_path, "CA key does not match ca.crt")
        if os.stat(key_path).st_mode & 0o077:
            log.warn("{path} is readable by group or others; it should be mode 0600",
                     path=key_path)
        return cls(cluster_name, key, cert, clock)

    @classmethod
    def _create(cls, cluster_name: str, clock: IReactorTime) -> ClusterCA:
        key, cert = _new_ca(cluster_name, clock.seconds())
        return cls(cluster_name, key, cert, clock)

    # -- issuing ---------------------------------------------------------------------

    def _leaf(self, public_key, role: str, name: str, ttl: float,
              usage: x509.ObjectIdentifier) -> x509.CertificateBuilder:
        now = self.clock.seconds()
        subject = x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, self.cluster_name),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ])
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(_when(now - _BACKDATE))
            .not_valid_after(_when(now + ttl))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self._key.public_key()), critical=False)
        )

    def _sign(self, builder: x509.CertificateBuilder) -> bytes:
        return builder.sign(self._key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    def issue_server_cert(self, dns_names: Iterable[str], ip_addresses: Iterable[str],
                          ttl: float = SERVER_CERT_TTL) -> tuple[bytes, bytes]:
        """A fresh key and a serverAuth certificate for the proxy's names: (cert_pem, key_pem)."""
        dns_names, ips = list(dns_names), [ipaddress.ip_address(ip) for ip in ip_addresses]
        if not dns_names and not ips:
            raise ValueError("a server certificate needs at least one name or address")
        key = ec.generate_private_key(ec.SECP256R1())
        san = [x509.DNSName(n) for n in dns_names] + [x509.IPAddress(ip) for ip in ips]
        common = dns_names[0] if dns_names else str(ips[0])
        builder = self._leaf(key.public_key(), ROLE_PROXY, common, ttl,
                             ExtendedKeyUsageOID.SERVER_AUTH)
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return self._sign(builder), _key_pem(key)

    def sign_agent_csr(self, csr_pem: bytes | str, host_id: str,
                       ttl: float = SERVER_CERT_TTL) -> bytes:
        """An agent client certificate for the key in `csr_pem`.

        Only the CSR's key is used (after checking the CSR is signed by it, i.e. the agent
        holds the private key); its subject is ignored, the identity comes from us.
        """
        if isinstance(csr_pem, str):
            csr_pem = csr_pem.encode("utf-8", "replace")
        if not isinstance(host_id, str) or not _HOST_ID.match(host_id):
            raise AuthError(400, "invalid host_id")
        if len(csr_pem) > _MAX_CSR_BYTES:
            raise AuthError(400, "CSR too large")
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
            valid = csr.is_signature_valid
            public_key = csr.public_key()
        except (ValueError, TypeError, x509.UnsupportedGeneralNameType):
            raise AuthError(400, "invalid CSR") from None
        if not valid:
            raise AuthError(400, "CSR signature is invalid")
        _check_key_strength(public_key)
        builder = self._leaf(public_key, ROLE_AGENT, host_id, ttl,
                             ExtendedKeyUsageOID.CLIENT_AUTH)
        return self._sign(builder)

    def issue_user_cert(self, public_key_pem: bytes | str, username: str, roles: Iterable[str],
                        traits: dict, ttl: float, mfa_app: str | None = None,
                        sessions_until: float = 0.0, requests: Iterable[str] = ()) -> bytes:
        """A short-lived clientAuth certificate naming the user, their roles and traits;
        with ``mfa_app``, bound to that app after a fresh second factor (per-session MFA:
        sessions it starts may run until ``sessions_until``); with ``requests``, the
        access requests it assumed (their roles count only while each is approved). Never
        for a bot (``bot:NAME`` is no user name): a bot's certificate cannot be traded for
        a user's."""
        if not isinstance(username, str) or not USER_NAME.match(username):
            raise AuthError(403, "user certificates are issued to users only")
        public_key = client_public_key(public_key_pem)
        doc = {
            "roles": list(roles),
            "traits": {str(k): [str(v) for v in (vs if isinstance(vs, (list, tuple)) else [vs])]
                       for k, vs in (traits or {}).items()},
        }
        if requests:
            doc["requests"] = [str(r) for r in requests]
        identity = json.dumps(doc, sort_keys=True, separators=(",", ":"))
        if len(identity) > _MAX_IDENTITY_BYTES:
            raise AuthError(400, "roles and traits too large for a certificate")
        builder = self._leaf(public_key, ROLE_USER, username, ttl,
                             ExtendedKeyUsageOID.CLIENT_AUTH)
        builder = builder.add_extension(
            x509.UnrecognizedExtension(IDENTITY_OID, _der_utf8(identity)), critical=False
        )
        if mfa_app is not None:
            binding = json.dumps({"app": mfa_app, "mfa": True, "until": sessions_until},
                                 sort_keys=True)
            builder = builder.add_extension(
                x509.UnrecognizedExtension(SESSION_MFA_OID, _der_utf8(binding)), critical=False
            )
        return self._sign(builder)

    def issue_bot_cert(self, public_key_pem: bytes | str, bot: str, roles: Iterable[str],
                       generation: int, ttl: float) -> bytes:
        """A short-lived clientAuth certificate for bot ``bot`` (``OU=bot``): its roles and
        the generation that lets only the newest certificate renew (auth/bots.py)."""
        public_key = client_public_key(public_key_pem)
        identity = json.dumps({"roles": list(roles), "traits": {}, "generation": generation},
                              sort_keys=True, separators=(",", ":"))
        if len(identity) > _MAX_IDENTITY_BYTES:
            raise AuthError(400, "roles too large for a certificate")
        builder = self._leaf(public_key, ROLE_BOT, bot, ttl, ExtendedKeyUsageOID.CLIENT_AUTH)
        builder = builder.add_extension(
            x509.UnrecognizedExtension(IDENTITY_OID, _der_utf8(identity)), critical=False)
        return self._sign(builder)

    # -- checking --------------------------------------------------------------------

    def verify_peer(self, cert: x509.Certificate, now: float | None = None) -> tuple[str, str]:
        """(role, name) of a client certificate issued by this CA and valid at `now`.

        Raises AuthError(401) for anything else: another CA, outside its validity window,
        not a client certificate, or an unknown role.
        """
        if now is None:
            now = self.clock.seconds()
        try:
            cert.verify_directly_issued_by(self.cert)
        except (ValueError, TypeError, InvalidSignature):
            raise AuthError(401, "certificate is not issued by this cluster's CA") from None
        if not (cert.not_valid_before_utc.timestamp() <= now
                <= cert.not_valid_after_utc.timestamp()):
            raise AuthError(401, "certificate is expired or not yet valid")
        try:
            usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            usages = []
        if ExtendedKeyUsageOID.CLIENT_AUTH not in usages:
            raise AuthError(401, "certificate is not a client certificate")
        roles = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        orgs = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
        if (len(roles) != 1 or len(names) != 1 or len(orgs) != 1
                or roles[0].value not in (ROLE_AGENT, ROLE_USER, ROLE_BOT)
                or orgs[0].value != self.cluster_name):
            raise AuthError(401, "certificate does not name an agent, user or bot of this "
                                 "cluster")
        return str(roles[0].value), str(names[0].value)


def client_public_key(public_key_pem: bytes | str):
    """The public key a client asks a certificate for; AuthError(400) if bad or weak."""
    if isinstance(public_key_pem, str):
        public_key_pem = public_key_pem.encode("utf-8", "replace")
    try:
        public_key = serialization.load_pem_public_key(public_key_pem)
    except (ValueError, TypeError):
        raise AuthError(400, "invalid public key") from None
    _check_key_strength(public_key)
    return public_key


def _check_key_strength(public_key) -> None:
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if public_key.curve.key_size >= 256:
            return
    elif isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size >= 2048:
            return
    elif isinstance(public_key, ed25519.Ed25519PublicKey):
        return
    raise AuthError(400, "unsupported or weak key (use EC P-256+, RSA 2048+ or Ed25519)")


def publish_ca_cert(data_dir: str, cert_pem: bytes) -> None:
    """Write the CA certificate (public) to ``data_dir/ca.crt`` for ``curl --cacert`` and
    the demo; the key stays in the backend (auth/keystore.py)."""
    path = os.path.join(data_dir, "ca.crt")
    try:
        with open(path, "rb") as f:
            if f.read() == cert_pem:
                return
    except OSError:
        pass
    write_file(path, cert_pem, 0o644)


def load_server_tls(data_dir: str, ca: ClusterCA, names: Iterable[str],
                    ips: Iterable[str]) -> tuple[bytes, bytes]:
    """The proxy's own (cert_pem, key_pem), re-issued when missing, stale or not covering.

    Re-issued when the files are absent or unreadable, not signed by `ca`, expiring
    within 7 days, or when their SANs do not include every one of `names` and `ips`.
    """
    names, ips = list(names), list(ips)
    cert_path = os.path.join(data_dir, "proxy.crt")
    key_path = os.path.join(data_dir, "proxy.key")
    reason = _server_cert_problem(cert_path, key_path, ca, names, ips)
    if reason is None:
        with open(cert_path, "rb") as f:
            cert_pem = f.read()
        with open(key_path, "rb") as f:
            key_pem = f.read()
        return cert_pem, key_pem
    cert_pem, key_pem = ca.issue_server_cert(names, ips)
    write_file(key_path, key_pem, 0o600)
    write_file(cert_path, cert_pem, 0o644)
    log.info("issued proxy certificate for {names} ({reason})",
             names=", ".join(names + ips), reason=reason)
    return cert_pem, key_pem


def _server_cert_problem(cert_path: str, key_path: str, ca: ClusterCA, names: list[str],
                         ips: list[str]) -> str | None:
    """Why the stored server certificate cannot be used, or None when it is fine."""
    if not (os.path.exists(cert_path) and os.path.exists(key_path)):
        return "none yet"
    try:
        with open(cert_path, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
        with open(key_path, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
    except (OSError, ValueError, TypeError):
        return "stored files unreadable"
    if not isinstance(key, ec.EllipticCurvePrivateKey) or (
        key.public_key().public_numbers() != cert.public_key().public_numbers()
    ):
        return "key does not match"
    try:
        cert.verify_directly_issued_by(ca.cert)
    except (ValueError, TypeError, InvalidSignature):
        return "issued by another CA"
    if cert.not_valid_after_utc.timestamp() - ca.clock.seconds() < RENEW_BEFORE:
        return "expiring"
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return "no names"
    have_names = set(san.get_values_for_type(x509.DNSName))
    have_ips = {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    if not set(names) <= have_names or not {str(ipaddress.ip_address(i)) for i in ips} <= have_ips:
        return "names changed"
    return None
