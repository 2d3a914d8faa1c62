"""The agent's trusted host-CA set on disk (issue 13 item 5, host-CA rotation).

Proxies send the host CAs they are trusted under (the ``trust`` message, judged by
auth/trust_set.parse_trust_set); the agent keeps the latest accepted set in
``data_dir/trusted_cas.pem`` (0600, one atomic rename) so a restart during or after the
grace still trusts a proxy whose certificate the new CA signed. The set must always hold
the CA that issued the agent's own certificate (the join CA, ``ca.crt``, until the agent
renews onto a new host CA): a proxy may add to the agent's trust root and move it along
with the agent's certificate, never swap it for a root the agent has no part in.
"""

from __future__ import annotations

import os
import re

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from apptunnel.auth.trust_set import TrustSetError, parse_trust_set
from apptunnel.files import write_file

__all__ = ["TRUST_FILE", "forget_trust_set", "load_trust_set", "save_trust_set"]

TRUST_FILE = "trusted_cas.pem"
_PEM = re.compile(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----\n?", re.S)


def save_trust_set(data_dir: str, value: object,
                   pinned: str | x509.Certificate) -> tuple[x509.Certificate, ...]:
    """Check a received set (TrustSetError, one line) and store it; the accepted certs."""
    certs = parse_trust_set(value, pinned)
    data = b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in certs)
    write_file(os.path.join(data_dir, TRUST_FILE), data, 0o600)
    return certs


def forget_trust_set(data_dir: str) -> None:
    """A new join starts from its own CA: a set kept from an earlier identity is removed."""
    try:
        os.unlink(os.path.join(data_dir, TRUST_FILE))
    except FileNotFoundError:
        pass


def load_trust_set(data_dir: str, ca_pem: bytes,
                   pinned: str | x509.Certificate) -> tuple[x509.Certificate, ...]:
    """The stored set, or just ``ca_pem`` (the join CA) when none was received yet.
    TrustSetError when the file is damaged or no longer holds the pinned CA."""
    path = os.path.join(data_dir, TRUST_FILE)
    try:
        with open(path, encoding="ascii") as f:
            text = f.read(1 << 20)
    except FileNotFoundError:
        return parse_trust_set([ca_pem.decode("ascii")], pinned)
    except (OSError, UnicodeDecodeError) as err:
        raise TrustSetError(f"{path}: unreadable ({err})") from None
    try:
        return parse_trust_set(_PEM.findall(text), pinned)
    except TrustSetError as err:
        raise TrustSetError(f"{path}: {err}") from None
