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
import attrs
from twisted.internet.interfaces import IReactorTime

from apptunnel.backend.records import AuthCode

CLI_CODE_TTL = 60.0         # from the end of the browser flow to the CLI's exchange
CLI_CODE_APP = "cli:sso"    # the ``app`` of a CLI code's row: never an app's name


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
    """One-time codes the CLI exchanges for a certificate: user, challenge, expiry.

    Kept in the backend's one-time hand-off codes (``auth_codes``, read and deleted in one
    transaction), so the code a browser got from one proxy or worker is redeemed at
    whichever one the CLI's own connection reaches (several proxies, ``workers: N``).
    ``app`` is ``CLI_CODE_APP``, which no app name can be (app names are DNS labels), so a
    CLI code never opens an app and an app's hand-off code is never a CLI code."""

    def __init__(self, clock: IReactorTime, backend=None) -> None:
        if backend is None:   # the web routes alone, in tests: a private store
            from apptunnel.backend.memory import MemoryBackend
            backend = MemoryBackend()
        self._clock = clock
        self._backend = backend

    async def issue(self, user: str, challenge: str) -> str:
        code = random_token()
        await self._backend.put_auth_code(AuthCode(
            code_hash=digest(code), web_session="", app=CLI_CODE_APP, path=user,
            state_hash=challenge, expires=self._clock.seconds() + CLI_CODE_TTL))
        return code

    async def redeem(self, code: str, verifier: str) -> str | None:
        """The user name if ``code`` is live and ``verifier`` is the one it was made for;
        the code is spent either way."""
        taken = await self._backend.take_auth_code(digest(code))
        if (taken is None or taken.expires <= self._clock.seconds()
                or not hmac.compare_digest(taken.app, CLI_CODE_APP)):
            return None
        return taken.path if same_secret(verifier, taken.state_hash) else None
