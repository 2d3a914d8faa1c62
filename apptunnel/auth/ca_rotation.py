"""CA rotation decisions (issue 13 item 5): pure functions, no I/O, no clock of their own.

Not wired in yet: ``apptunnel auth rotate --type user-ca|host-ca`` is still refused (half a
rotation is worse than none). These are the judgements the key store, the proxies' TLS
contexts and the agents will share, so each is made once and tested on its own:

- ``grace_period``: how long the previous CA stays trusted; validated against a floor so an
  operator cannot cut off certificates in flight.
- ``ca_trust``: from one role's stored CA rows and ``now``, the CA that issues and the set
  every verifier must trust (current, next, and retired ones still inside their grace).
- ``parse_trust_set``: the trusted host-CA set a proxy sends to an agent or CLI, judged as
  hostile input: bounded in count and size, every entry a CA certificate, and refused
  unless it still holds the CA the receiver was pinned to (a proxy cannot swap the root).
"""

from __future__ import annotations

from typing import Sequence

import attrs
from cryptography import x509

from apptunnel.auth.pins import cert_pin
from apptunnel.backend.records import KeyRecord

__all__ = ["DEFAULT_GRACE", "MAX_TRUST_BYTES", "MAX_TRUST_CAS", "MIN_GRACE", "CaTrust",
           "TrustSetError", "ca_trust", "grace_period", "parse_trust_set"]

CURRENT, NEXT, RETIRED = "current", "next", "retired"

DEFAULT_GRACE = 30 * 3600.0
MIN_GRACE = 3600.0          # production floor; tests lower it through ``minimum``
MAX_TRUST_CAS = 8           # current + next + a few retired in grace; more is an attack
MAX_TRUST_BYTES = 64 * 1024


class TrustSetError(ValueError):
    """A trust-set message we refuse; the text is one log line."""


def grace_period(value: float | None, minimum: float = MIN_GRACE) -> float:
    """The grace period for a rotation: ``value`` (seconds) or the default, never below
    ``minimum``. ValueError saying the floor otherwise."""
    grace = DEFAULT_GRACE if value is None else value
    if not grace >= minimum:  # also refuses NaN
        raise ValueError(f"must be at least {minimum:g}s, got {grace:g}s")
    return grace


@attrs.frozen
class CaTrust:
    """One CA role at one moment: who signs new certificates, and whom verifiers trust."""

    issuing: KeyRecord
    trusted: tuple[KeyRecord, ...]
    expired: tuple[KeyRecord, ...]   # retired rows past their grace: to delete


def ca_trust(records: Sequence[KeyRecord], now: float) -> CaTrust:
    """Decide one role's CA set at ``now``.

    A ``next`` CA whose ``activate_at`` has come issues (it is trusted from the moment it
    is stored, so verifiers learn it before anything it signs is shown to them); otherwise
    the ``current`` one does. A retired CA stays trusted until its ``retire_at`` passes.
    ValueError when there is no CA to issue with (storage is broken: deny)."""
    current = [r for r in records if r.state == CURRENT]
    ready = [r for r in records if r.state == NEXT and r.activate_at is not None
             and r.activate_at <= now]
    issuing = (ready or current or [None])[0]
    if issuing is None:
        raise ValueError("no current CA")
    trusted, expired = [], []
    for record in records:
        if record.state == RETIRED and (record.retire_at is None or record.retire_at <= now):
            expired.append(record)
        elif record.state in (CURRENT, NEXT, RETIRED):
            trusted.append(record)
    return CaTrust(issuing, tuple(trusted), tuple(expired))


def parse_trust_set(value: object, pinned: str) -> tuple[x509.Certificate, ...]:
    """The host-CA set from a hello / renewal answer: a list of PEM strings.

    Refused (TrustSetError) unless it is a non-empty list of at most MAX_TRUST_CAS
    distinct CA certificates, MAX_TRUST_BYTES in all, one of which has the ``pinned``
    public key: the receiver's trust root may grow, never be replaced by a peer."""
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
    if pinned not in pins:
        raise TrustSetError("trusted_cas: does not hold the CA we are pinned to")
    return tuple(certs)
