"""The bot's identity on disk and in memory: its key, its certificate, the cluster CA.

``data_dir`` (0700) holds ``bot.key`` (0600, made once: it never leaves this machine),
``bot.crt`` and ``ca.crt``; each is replaced atomically (apptunnel/files.py), so a crash
never leaves half a certificate. A restart uses what is stored, never the join token
again. An `Identity` is also the credentials the local app proxy presents
(apptunnel/local_proxy.py): the proxy address, pinned trust, certificate and key.
"""

from __future__ import annotations

import os

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from apptunnel.errors import ConfigError
from apptunnel.files import write_file
from apptunnel.local_proxy import TRUST_PINNED

KEY_FILE, CERT_FILE, CA_FILE = "bot.key", "bot.crt", "ca.crt"


@attrs.frozen
class Identity:
    """A bot certificate for ``key_pem``, and the CA that issued it (pinned trust)."""

    proxy: str
    key_pem: bytes
    cert_pem: bytes
    ca_pem: bytes
    trust: str = TRUST_PINNED

    @property
    def not_after(self) -> float:
        return x509.load_pem_x509_certificate(self.cert_pem).not_valid_after_utc.timestamp()

    def expired(self, now: float) -> bool:
        return now >= self.not_after

    def renewed(self, cert_pem: bytes, ca_pem: bytes) -> Identity:
        return attrs.evolve(self, cert_pem=cert_pem, ca_pem=ca_pem)


def load_key(data_dir: str) -> bytes:
    """The bot's private key (PEM), created 0600 on first use; data_dir is made 0700."""
    os.makedirs(data_dir, mode=0o700, exist_ok=True)
    path = os.path.join(data_dir, KEY_FILE)
    if os.path.exists(path):
        with open(path, "rb") as f:
            pem = f.read()
        try:
            serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError):
            raise ConfigError(path, "not a PEM private key (remove it to make a new one; "
                                    "the bot must then join again)") from None
        return pem
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    write_file(path, pem, 0o600)
    return pem


def public_pem(key_pem: bytes) -> str:
    key = serialization.load_pem_private_key(key_pem, password=None)
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def load_identity(data_dir: str, proxy: str) -> Identity | None:
    """The stored identity, or None when the bot has not joined yet."""
    paths = [os.path.join(data_dir, name) for name in (KEY_FILE, CERT_FILE, CA_FILE)]
    if not all(os.path.exists(p) for p in paths):
        return None
    key_pem, cert_pem, ca_pem = (open(p, "rb").read() for p in paths)
    try:
        x509.load_pem_x509_certificate(cert_pem)
        x509.load_pem_x509_certificate(ca_pem)
    except ValueError:
        raise ConfigError(paths[1], "stored certificate unreadable (remove bot.crt and join "
                                    "again with a new token)") from None
    return Identity(proxy, key_pem, cert_pem, ca_pem)


def save_identity(data_dir: str, identity: Identity) -> None:
    write_file(os.path.join(data_dir, CA_FILE), identity.ca_pem, 0o600)
    write_file(os.path.join(data_dir, CERT_FILE), identity.cert_pem, 0o600)
