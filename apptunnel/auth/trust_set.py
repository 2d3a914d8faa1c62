"""The host-CA set a proxy sends to agents, the CLI and bots, judged as hostile input.

During a host-CA rotation (auth/ca_set.py) the proxies name the host CAs they are trusted
under: in the ``trust`` tunnel message (agent/trust.py keeps it) and as ``trusted_cas`` in
certificate answers (the CLI profile's and the bot's ``ca.crt``). A receiver accepts it
only bounded in count and size, every entry a CA certificate, and still holding the CA it
is pinned to: a peer may add to a trust root, never swap it. Loads no storage or CA code,
so the agent and the CLI stay small.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from apptunnel.auth.pins import cert_pin

__all__ = ["MAX_TRUST_BYTES", "MAX_TRUST_CAS", "TrustSetError", "parse_trust_set",
           "pinned_with_trusted"]

MAX_TRUST_CAS = 8           # current + next + a few retired in grace; more is an attack
MAX_TRUST_BYTES = 64 * 1024


class TrustSetError(ValueError):
    """A trust set we refuse; the text is one log line."""


def parse_trust_set(value: object, pinned: str | x509.Certificate) -> tuple[x509.Certificate, ...]:
    """The host-CA set from a ``trust`` message: a list of PEM strings.

    Refused (TrustSetError) unless it is a non-empty list of at most MAX_TRUST_CAS
    distinct CA certificates, MAX_TRUST_BYTES in all, one of which has the ``pinned``
    public key (or, given the receiver's own certificate, issued it): the receiver's
    trust root may grow, never be replaced by a peer."""
    if not isinstance(value, list) or not value:
        raise TrustSetError("trusted_cas: expected a non-empty list of PEM certificates")
    if len(value) > MAX_TRUST_CAS:
        raise TrustSetError(f"trusted_cas: {len(value)} entries, at most {MAX_TRUST_CAS}")
    if not all(isinstance(pem, str) for pem in value):
        raise TrustSetError("trusted_cas: every entry must be a PEM string")
    if sum(len(pem) for pem in value) > MAX_TRUST_BYTES:
        raise TrustSetError(f"trusted_cas: more than {MAX_TRUST_BYTES} bytes")
    certs, pins = [], set()
    for index, pem in enumerate(value):
        try:
            cert = x509.load_pem_x509_certificate(pem.encode("ascii"))
            constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
        except (ValueError, UnicodeEncodeError, x509.ExtensionNotFound):
            raise TrustSetError(f"trusted_cas[{index}]: not a CA certificate") from None
        if not constraints.value.ca:
            raise TrustSetError(f"trusted_cas[{index}]: not a CA certificate")
        pin = cert_pin(cert)
        if pin in pins:
            raise TrustSetError(f"trusted_cas[{index}]: duplicate CA")
        pins.add(pin)
        certs.append(cert)
    if isinstance(pinned, x509.Certificate):
        if not any(_issued(pinned, cert) for cert in certs):
            raise TrustSetError("trusted_cas: does not hold the CA we are pinned to (the "
                                "issuer of our certificate)")
    elif pinned not in pins:
        raise TrustSetError("trusted_cas: does not hold the CA we are pinned to")
    return tuple(certs)


def pinned_with_trusted(ca_pem: bytes, trusted: object, pinned: str) -> bytes:
    """The ``ca.crt`` a pinned client (CLI profile, bot) keeps: the pinned CA first, then
    the other host CAs a proxy's answer named in ``trusted_cas`` (judged as above,
    TrustSetError), so it still trusts the proxies once they present a new host CA. An
    answer without the field (an older proxy) keeps ``ca_pem`` alone."""
    if trusted is None:
        return ca_pem
    others = [cert for cert in parse_trust_set(trusted, pinned) if cert_pin(cert) != pinned]
    head = ca_pem if ca_pem.endswith(b"\n") else ca_pem + b"\n"
    return head + b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in others)


def _issued(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True
