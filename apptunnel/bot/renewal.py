"""When the bot renews: pure functions of the certificate's times and the clock.

A certificate is renewed once a third of its lifetime is left (20m certificates at
13m20s), so a proxy that is briefly away costs nothing; a failed renewal is retried with
a doubling delay that never waits past a quarter of what is left, so several attempts
fit before the certificate ends.
"""

from __future__ import annotations

FIRST_RETRY = 1.0
MAX_RETRY = 60.0


def renew_delay(not_after: float, lifetime: float, now: float) -> float:
    """Seconds from ``now`` until the renewal of a certificate ending at ``not_after``."""
    return max(0.0, not_after - lifetime / 3.0 - now)


def backoff(failures: int) -> float:
    """Seconds before attempt ``failures + 1``: 1, 2, 4, ... up to a minute."""
    return min(MAX_RETRY, FIRST_RETRY * 2 ** max(0, min(failures, 16) - 1))


def retry_delay(failures: int, not_after: float, now: float) -> float:
    """`backoff`, but never past a quarter of the certificate's remaining life."""
    backoff_ = backoff(failures)
    left = not_after - now
    if left <= 0:
        return backoff_
    return max(0.2, min(backoff_, left / 4.0))
