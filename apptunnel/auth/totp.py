"""TOTP (RFC 6238) codes: which time step a code belongs to, and nothing else.

Pure: time is passed in. A code matches one of the steps within ``drift`` of now (clocks
on phones wander); the caller stores the step it matched and refuses any step not above
the last one used, so each code works once (``Backend.advance_mfa_counter``). Every
candidate is compared in constant time, and all of them are compared, so timing does not
say which step was close.
"""

from __future__ import annotations

import re
from urllib.parse import quote

import pyotp

from apptunnel.auth.tokens import constant_time_equal

STEP = 30
DIGITS = 6
DRIFT = 1                                  # steps either side of now
SECRET = re.compile(r"[A-Z2-7]{26,64}\Z")   # base32, at least 128 bits
CODE = re.compile(r"[0-9]{6}\Z")


def new_secret() -> str:
    """A fresh 160-bit base32 secret."""
    return pyotp.random_base32(32)


def valid_secret(secret: object) -> bool:
    return isinstance(secret, str) and SECRET.match(secret) is not None


def normal_code(code: object) -> str | None:
    """The six digits of a code as typed (spaces allowed), or None for anything else."""
    if not isinstance(code, str) or len(code) > 16:
        return None
    digits = code.replace(" ", "")
    return digits if CODE.match(digits) else None


def matching_step(secret: str, code: str, now: float, drift: int = DRIFT) -> int | None:
    """The time step within ``drift`` of ``now`` whose code is ``code``, or None."""
    digits = normal_code(code)
    if digits is None or not valid_secret(secret):
        return None
    totp = pyotp.TOTP(secret, digits=DIGITS, interval=STEP)
    here = int(now // STEP)
    found = None
    for step in range(here - drift, here + drift + 1):
        if constant_time_equal(totp.at(step * STEP), digits) and found is None:
            found = step
    return found


def provisioning_uri(secret: str, user: str, issuer: str) -> str:
    """The otpauth:// URI an authenticator app reads (from the QR code)."""
    return (f"otpauth://totp/{quote(issuer, safe='')}:{quote(user, safe='')}"
            f"?secret={secret}&issuer={quote(issuer, safe='')}&algorithm=SHA1"
            f"&digits={DIGITS}&period={STEP}")
