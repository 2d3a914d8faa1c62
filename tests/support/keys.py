"""Fresh P-256 keys in the PEM shapes the CA and the CLI profile take."""

from __future__ import annotations

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec


def public_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """The private key as unencrypted PKCS#8 PEM, as a profile stores it."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def new_key() -> tuple[ec.EllipticCurvePrivateKey, str]:
    """A key and its public PEM as text, the shape POST /v1/certs takes."""
    key = ec.generate_private_key(ec.SECP256R1())
    return key, public_pem(key).decode("ascii")


def key_pair() -> tuple[bytes, bytes]:
    """(public PEM, private PKCS#8 PEM) of a fresh key, for issue_user_cert and a Profile."""
    key = ec.generate_private_key(ec.SECP256R1())
    return public_pem(key), key_pem(key)
