"""The CLI's side of a browser sign-in (``apptunnel login --auth NAME``), for every
browser connector kind (OIDC, SAML): where the CLI waits and the one-time codes it
exchanges for its certificate.

The CLI starts a connector's flow with its loopback port, its own state and the
SHA-256 (`digest`) of a verifier only it knows (`CliReturn`); the connector keeps them
server-side with its outstanding flow. At the end the browser is sent to
``http://127.0.0.1:PORT/callback`` with a one-time code (`CliCodes`) that the CLI
exchanges at ``POST /v1/certs`` together with the verifier: no certificate or session
secret ever travels in a URL, and a code seen by anyone else is worth nothing.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections import OrderedDict

import attrs
from twisted.internet.interfaces import IReactorTime

CLI_CODE_TTL = 60.0         # from the end of the browser flow to the CLI's exchange
MAX_CODES = 10_000


def random_token() -> str:
    return secrets.token_urlsafe(32)


def digest(value: str) -> str:
    """base64url(SHA-256(value)) without padding: PKCE's S256, and how secrets are kept."""
    raw = hashlib.sha256(value.encode("ascii", "replace")).digest()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def same_secret(value: str | None, kept_digest: str) -> bool:
    return isinstance(value, str) and hmac.compare_digest(digest(value), kept_digest)


@attrs.frozen
class CliReturn:
    """Where the CLI waits: its loopback port, its state, the digest of its verifier."""

    port: int
    state: str
    challenge: str

    def text(self) -> str:
        """As kept in a backend row (the SAML request's ``cli`` column)."""
        return f"{self.port} {self.state} {self.challenge}"

    @classmethod
    def from_text(cls, text: str) -> CliReturn | None:
        """The inverse of `text`; None for '' (a browser's own sign-in) or garbage."""
        parts = text.split(" ")
        if len(parts) != 3 or not parts[0].isdigit():
            return None
        return cls(int(parts[0]), parts[1], parts[2])


class CliCodes:
    """One-time codes the CLI exchanges for a certificate: user, challenge, expiry."""

    def __init__(self, clock: IReactorTime, max_codes: int = MAX_CODES) -> None:
        self._clock = clock
        self._max = max_codes
        self._codes: OrderedDict[str, tuple[str, str, float]] = OrderedDict()

    def issue(self, user: str, challenge: str) -> str:
        code = random_token()
        while len(self._codes) >= self._max:
            self._codes.popitem(last=False)
        self._codes[digest(code)] = (user, challenge, self._clock.seconds() + CLI_CODE_TTL)
        return code

    def redeem(self, code: str, verifier: str) -> str | None:
        """The user name if ``code`` is live and ``verifier`` is the one it was made for;
        the code is spent either way."""
        entry = self._codes.pop(digest(code), None)
        if entry is None or entry[2] <= self._clock.seconds():
            return None
        user, challenge, _ = entry
        return user if same_secret(verifier, challenge) else None
