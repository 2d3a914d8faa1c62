"""CA pins: how an agent joining and a user logging in trust a proxy they have never met.

A pin is ``sha256:`` + the hex SHA-256 of a certificate's SubjectPublicKeyInfo (DER), so
it survives re-issuing the CA certificate with the same key. ``check_chain`` is the one
judgement of a presented chain against a pin, made before any secret (join token,
password) is sent. Small on purpose: the CLI and the agent need this, not the whole CA.
"""

from __future__ import annotations

import hashlib
import re

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

__all__ = ["cert_pin", "check_chain", "is_pin", "parse_pin", "spki_pin"]

_PIN = re.compile(r"sha256:[0-9a-f]{64}\Z")
PIN_FORM = "sha256: followed by 64 hex digits"


def is_pin(text: object) -> bool:
    """Whether ``text`` is a pin exactly as we print it (lower-case hex)."""
    return isinstance(text, str) and _PIN.match(text) is not None


def parse_pin(text: str) -> str:
    """A pin as a user may paste it (surrounding space, upper-case hex) in our form;
    ValueError naming the expected form otherwise."""
    pin = text.strip().lower() if isinstance(text, str) else ""
    if not is_pin(pin):
        raise ValueError(f"expected {PIN_FORM}")
    return pin


def cert_pin(cert: x509.Certificate) -> str:
    """The pin of a loaded certificate's public key."""
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "sha256:" + hashlib.sha256(spki).hexdigest()


def spki_pin(cert_pem: bytes) -> str:
    """:func:`cert_pin` of a PEM certificate."""
    return cert_pin(x509.load_pem_x509_certificate(cert_pem))


def check_chain(chain: list[x509.Certificate], pin: str, now: float) -> str | None:
    """Why this presented chain is not our proxy, or None if it is.

    Some certificate of the chain must have `pin`; the leaf must be directly issued by it,
    valid at `now` and meant for a TLS server.
    """
    if not chain:
        return "the proxy presented no certificate"
    anchors = [cert for cert in chain if cert_pin(cert) == pin]
    if not anchors:
        return f"no certificate presented by the proxy matches ca_pin {pin}"
    leaf = chain[0]
    try:
        leaf.verify_directly_issued_by(anchors[0])
    except (ValueError, TypeError, InvalidSignature):
        return "the proxy's certificate is not issued by the pinned CA"
    if not leaf.not_valid_before_utc.timestamp() <= now <= leaf.not_valid_after_utc.timestamp():
        return "the proxy's certificate is expired or not yet valid"
    try:
        usages = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usages = []
    if ExtendedKeyUsageOID.SERVER_AUTH not in usages:
        return "the proxy's certificate is not a server certificate"
    return None
