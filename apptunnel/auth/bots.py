"""Machine identity: bots join once with a token, then renew with their own certificate.

`apptunnel bots add NAME --roles ...` stores a bot and one single-use join token of kind
``bot``. The bot (``twistd apptunnel-bot``) trades the token once for a short-lived
certificate (``OU=bot``, ``CN=NAME``, its roles and a *generation* in the identity
extension) and from then on renews with that certificate, never the token again.

A bot acts as the principal ``bot:NAME``: the user directory knows it under that name
(its roles as stored now cap what any certificate claims, like a user's), locks name it
(``apptunnel lock --bot NAME`` is a lock on that principal), and the audit and the app's
JWT say it. ``:`` is not allowed in user names, so no user can be taken for a bot.

The generation (Teleport's renewal counter): each issue advances the bot's stored
generation with a compare-and-set, and only a certificate of the current generation may
renew. A copied certificate is useless for renewal once its bot has renewed, and if the
copy renews first, the real bot's next renewal fails loudly (audited) and it must be
joined again with a new token.

Refusals are `EnrolmentRefused` (auth/enrolment.py), as for agents: ``reason`` for the
log and audit, ``message`` for the bot.
"""

from __future__ import annotations

import attrs
from cryptography import x509
from twisted.internet.interfaces import IReactorTime

from apptunnel.auth.ca import ROLE_BOT, ClusterCA, bot_identity, client_public_key
from apptunnel.auth.enrolment import EnrolmentRefused, live_token
from apptunnel.auth.errors import AuthError

BOT_PREFIX = "bot:"
DEFAULT_CERT_TTL = 20 * 60.0
MIN_CERT_TTL = 60.0
MAX_CERT_TTL = 3600.0


def bot_principal(name: str) -> str:
    """The name a bot acts under everywhere a user name would go: ``bot:NAME``."""
    return BOT_PREFIX + name


def bot_of(principal: str) -> str | None:
    """The bot's name when ``principal`` is a bot's, else None."""
    return principal[len(BOT_PREFIX):] if principal.startswith(BOT_PREFIX) else None


def ttl_problem(ttl: float, floor: float = MIN_CERT_TTL) -> str | None:
    """Why a bot may not have certificates of ``ttl`` seconds here, or None."""
    if not floor <= ttl <= MAX_CERT_TTL:
        return (f"certificate_ttl must be from {floor:g}s to {MAX_CERT_TTL:g}s "
                f"(this cluster's bots.min_certificate_ttl is {floor:g}s), got {ttl:g}s")
    return None


@attrs.frozen
class BotIssued:
    """A bot certificate and what the bot needs with it."""

    bot: str
    roles: tuple[str, ...]
    cert_pem: bytes
    ca_pem: bytes
    not_after: float
    generation: int
    issuer_pem: bytes = b""   # the user CA that signed cert_pem (not ca_pem after a rotation)
    trusted_cas: tuple[str, ...] = ()   # the host CAs to trust (a new one in a host-CA rotation)


class BotEnrolment:
    """Join and renew decisions for bots, over the backend's ``bots`` rows and tokens.

    ``min_ttl`` is the cluster's floor for certificate lifetimes (``bots:
    min_certificate_ttl`` in proxy.yaml, default 1m); ``locks`` a LockWatcher.
    """

    def __init__(self, *, ca: ClusterCA, backend, clock: IReactorTime, locks=None,
                 min_ttl: float = MIN_CERT_TTL) -> None:
        self.ca = ca
        self.backend = backend
        self.clock = clock
        self.locks = locks
        self.min_ttl = min_ttl

    def _ttl(self, wanted: float | None) -> float:
        ttl = DEFAULT_CERT_TTL if wanted is None else float(wanted)
        problem = ttl_problem(ttl, self.min_ttl)
        if problem is not None:
            raise EnrolmentRefused(problem)
        return ttl

    def _refuse_locked(self, name: str) -> None:
        lock = None if self.locks is None else self.locks.locked(bot_principal(name))
        if lock is not None:
            raise EnrolmentRefused("bot is locked", f"bot {name} is locked")

    async def join(self, token: str, public_key_pem: bytes, ttl: float | None) -> BotIssued:
        """One use of a bot token for a certificate of generation 1 + the bot's last."""
        now = self.clock.seconds()
        ttl = self._ttl(ttl)
        record = await live_token(self.backend, token, "bot", now)
        self._refuse_locked(record.bot)
        bot = await self.backend.get_bot(record.bot)
        if bot is None:
            raise EnrolmentRefused("bot removed", "invalid or expired join token")
        self._check_key(public_key_pem)
        joined = await self.backend.redeem_bot_token(record.token_hash, now, now + ttl)
        if joined is None:
            raise EnrolmentRefused("token used up", "invalid or expired join token")
        return self._issue(joined, public_key_pem, ttl)

    async def renew(self, cert: x509.Certificate | None, public_key_pem: bytes,
                    ttl: float | None) -> BotIssued:
        """A new certificate for the holder of the bot's current one (valid now, newest
        generation, bot still there and not locked); never for a token."""
        if cert is None:
            raise EnrolmentRefused("no certificate", "renewal needs the bot's certificate")
        now = self.clock.seconds()
        try:
            role, name = self.ca.verify_peer(cert, now)
            if role != ROLE_BOT:
                raise AuthError(401, "not a bot certificate")
            _, generation = bot_identity(cert)
        except AuthError as err:
            raise EnrolmentRefused(err.message, f"{err.message}: join the bot again with a "
                                                "new token (apptunnel bots add)") from None
        ttl = self._ttl(ttl)
        self._refuse_locked(name)
        bot = await self.backend.get_bot(name)
        if bot is None:
            raise EnrolmentRefused("bot removed", f"bot {name} no longer exists")
        if bot.generation != generation:
            raise EnrolmentRefused(
                f"certificate generation {generation} is not the bot's current "
                f"{bot.generation} (a copy renewed, or a renewal answer was lost)",
                "this certificate was already renewed: join the bot again with a new token")
        self._check_key(public_key_pem)
        advanced = await self.backend.advance_bot(name, generation, now + ttl)
        if advanced is None:
            raise EnrolmentRefused("certificate generation renewed concurrently",
                                   "this certificate was already renewed")
        return self._issue(advanced, public_key_pem, ttl)

    def _check_key(self, public_key_pem: bytes) -> None:
        """Refuse a bad key before a token use or a generation is spent on it."""
        try:
            client_public_key(public_key_pem)
        except AuthError as err:
            raise EnrolmentRefused(err.message) from None

    def _issue(self, bot, public_key_pem: bytes, ttl: float) -> BotIssued:
        cert_pem = self.ca.issue_bot_cert(public_key_pem, bot.name, bot.roles, bot.generation,
                                          ttl)
        not_after = x509.load_pem_x509_certificate(cert_pem).not_valid_after_utc.timestamp()
        return BotIssued(bot.name, tuple(bot.roles), cert_pem, self.ca.cert_pem, not_after,
                         bot.generation, self.ca.user_issuer_pem, self.ca.host_trust())
