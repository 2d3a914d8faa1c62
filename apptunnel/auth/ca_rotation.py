"""CA rotation decisions (issue 13 item 5): pure functions, no I/O, no clock of their own.

The judgements the key store and the proxies' CA watcher (auth/ca_set.py) share, each
made once and tested on its own:

- ``grace_period``: how long the previous CA stays trusted; validated against a floor so an
  operator cannot cut off certificates in flight.
- ``ca_trust``: from one role's stored CA rows and ``now``, the CA that issues and the set
  every verifier must trust (current, next, and retired ones still inside their grace).
- the receivers' side (agents, CLI, bots) judging the host-CA set a proxy sends is in
  auth/trust_set.py, which loads no storage or CA code.
"""

from __future__ import annotations

from typing import Sequence

import attrs

from apptunnel.backend.records import KeyRecord

__all__ = ["DEFAULT_GRACE", "MIN_GRACE", "CaTrust", "ca_trust", "grace_period"]

CURRENT, NEXT, RETIRED = "current", "next", "retired"

DEFAULT_GRACE = 30 * 3600.0
MIN_GRACE = 3600.0          # production floor; tests lower it through ``minimum``


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
