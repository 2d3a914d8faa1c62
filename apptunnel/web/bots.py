"""The bots' HTTP side: ``POST /v1/bots/join`` and ``POST /v1/bots/renew``.

`WebApp` (web/routes.py) mounts these two routes; the decisions are
`auth/bots.BotEnrolment`'s. A join is authenticated by the one-time token in the body
and nothing else; a renewal by the bot's current certificate on the TLS connection and
nothing else (a token in a renewal body is not even read). Both take a public key (the
bot's own, which never leaves it) and the certificate lifetime the bot asks for, and
answer ``{"cert", "ca", "expires", "bot", "roles"}``. Every outcome is audited as
``bot.join`` / ``bot.renew`` with the actor ``bot:NAME`` when known.
"""

from __future__ import annotations


from cryptography.x509.oid import NameOID
from twisted.logger import Logger

from apptunnel.auth.bots import BotEnrolment, BotIssued, bot_principal
from apptunnel.auth.ca import ROLE_BOT
from apptunnel.auth.callers import peer_certificate
from apptunnel.auth.enrolment import EnrolmentRefused
from apptunnel.auth.errors import AuthError
from apptunnel.web.fields import public_key_field, ttl_field

MAX_TOKEN = 256


class BotRoutes:
    """Reads the request's fields, asks BotEnrolment, audits, shapes the answer."""

    _log = Logger()

    def __init__(self, enrolment: BotEnrolment, audit) -> None:
        self._enrolment = enrolment
        self._audit = audit

    async def join(self, body: dict, client: str) -> dict:
        token = body.get("token")
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN:
            raise AuthError(400, "token (a string) is required")
        key, ttl = public_key_field(body.get("public_key")), ttl_field(body.get("ttl"))
        try:
            issued = await self._enrolment.join(token, key, ttl)
        except EnrolmentRefused as err:
            self._refused("bot.join", "", err, client)
            raise
        self._audit.emit("bot.join", actor=bot_principal(issued.bot), target=issued.bot,
                         client=client, generation=issued.generation,
                         expires=issued.not_after)
        return _answer(issued)

    async def renew(self, body: dict, transport, client: str) -> dict:
        cert = peer_certificate(transport)
        key, ttl = public_key_field(body.get("public_key")), ttl_field(body.get("ttl"))
        try:
            issued = await self._enrolment.renew(cert, key, ttl)
        except EnrolmentRefused as err:
            self._refused("bot.renew", _claimed_bot(cert), err, client)
            raise
        self._audit.emit("bot.renew", actor=bot_principal(issued.bot), target=issued.bot,
                         client=client, generation=issued.generation,
                         expires=issued.not_after)
        return _answer(issued)

    def _refused(self, event: str, who: str, err: EnrolmentRefused, client: str) -> None:
        self._log.info("{event} refused for {client}: {reason}", event=event, client=client,
                       reason=err.reason)
        self._audit.emit(event, actor=who, outcome="failure", reason=err.reason, client=client)


def _claimed_bot(cert) -> str:
    """``bot:NAME`` the refused certificate names (for the audit), '' if it names no bot."""
    if cert is None:
        return ""
    role = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    name = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(role) == 1 and role[0].value == ROLE_BOT and len(name) == 1:
        return bot_principal(str(name[0].value))
    return ""


def _answer(issued: BotIssued) -> dict:
    return {"cert": issued.cert_pem.decode("ascii"), "ca": issued.ca_pem.decode("ascii"),
            "issuer": issued.issuer_pem.decode("ascii"),
            "trusted_cas": list(issued.trusted_cas), "expires": issued.not_after, "bot": issued.bot, "roles": list(issued.roles)}


