"""Who is calling: one record for every way a user reaches the proxy.

A browser arrives with a session, ``apptunnel proxy app`` and the CLI with a user
certificate, a bot (``apptunnel-bot``) with a bot certificate. Each becomes a `Caller`
here, in one place each, so the access decision (``auth/access.py``) never cares how the
caller got in. The record holds what the credential *claims* (roles and traits at issue
time); the decision caps them by what the user (or bot) holds now.
"""

from __future__ import annotations

from typing import Literal

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from OpenSSL import crypto

from apptunnel.auth.bots import bot_principal
from apptunnel.auth.ca import (
    ROLE_BOT, assumed_requests, bot_identity, session_mfa_app, user_identity,
)
from apptunnel.auth.errors import AuthError

# sso: an OIDC or SAML sign-in; bot: a bot certificate (auth/bots.py)
Method = Literal["session", "certificate", "password", "sso", "bot"]


@attrs.frozen
class Caller:
    """One authenticated caller.

    ``credential`` names the credential, not the user: the web or app session's
    ``id_hash``, or the SHA-256 hex fingerprint of the certificate. It keys the decision
    and JWT caches, so a renewed certificate (new roles) or a new session never reuses
    an old one's entries. A bot's ``method`` is ``bot`` and its ``user`` ``bot:NAME``.

    ``mfa_app`` names the one app this credential carries a fresh second factor for (an
    app session started after the per-session MFA prompt, or a one-app certificate);
    a certificate with it opens that app only (auth/access.py).

    ``requests`` are the access requests the credential assumed: their roles are added
    by the access policy only while each request is approved and unexpired.
    """

    user: str
    roles: tuple[str, ...]
    traits: dict
    method: Method
    credential: str
    expires: float
    mfa_app: str | None = None
    requests: tuple[str, ...] = ()

    @property
    def is_bot(self) -> bool:
        """A bot's certificate: ``user`` is ``bot:NAME`` (what the audit and JWT say)."""
        return self.method == "bot"

    def acting_as(self, roles: tuple[str, ...], traits: dict) -> Caller:
        """The same caller with capped roles and traits (same credential, same expiry)."""
        if roles == self.roles and traits == self.traits:
            return self
        return attrs.evolve(self, roles=roles, traits=traits)


def caller_from_certificate(ca, cert: x509.Certificate, now: float) -> Caller:
    """The caller a user or bot certificate of this cluster names; AuthError(401) otherwise.

    ``ca.verify_peer`` checks issuer, validity at ``now`` and role; agents' certificates
    are refused here: they are never callers. A bot acts as ``bot:NAME`` (auth/bots.py).
    """
    role, name = ca.verify_peer(cert, now)
    if role == ROLE_BOT:
        roles, _ = bot_identity(cert)
        return Caller(bot_principal(name), roles, {}, "bot",
                      cert.fingerprint(hashes.SHA256()).hex(),
                      cert.not_valid_after_utc.timestamp())
    if role != "user":
        raise AuthError(401, "not a user certificate")
    roles, traits = user_identity(cert)
    expires, binding = cert.not_valid_after_utc.timestamp(), session_mfa_app(cert)
    if binding is not None:
        # A one-app MFA certificate starts sessions while valid (checked above); the
        # sessions it started run until the end of the credential that asked for it.
        return Caller(name, roles, traits, "certificate",
                      cert.fingerprint(hashes.SHA256()).hex(), binding[1], binding[0],
                      assumed_requests(cert))
    return Caller(name, roles, traits, "certificate", cert.fingerprint(hashes.SHA256()).hex(),
                  expires, requests=assumed_requests(cert))


def caller_from_session(session, credential: str | None = None,
                        expires: float | None = None, mfa_app: str | None = None) -> Caller:
    """The caller a web session (user, roles, traits, expiry) names.

    ``credential``/``expires`` default to the web session's own; an app host passes its
    app session's, which is what the browser presents there and what ends first, and
    ``mfa_app`` when that app session was started after a fresh second factor.
    """
    until = session.expires if expires is None else min(expires, session.expires)
    return Caller(session.user, tuple(session.roles), dict(session.traits), "session",
                  credential or session.id_hash, until, mfa_app,
                  tuple(getattr(session, "requests", ())))


def peer_certificate(transport) -> x509.Certificate | None:
    """The client certificate on a TLS transport; None without TLS or without one."""
    get_peer = getattr(transport, "getPeerCertificate", None)
    if get_peer is None:
        return None
    try:
        peer = get_peer()
    except Exception:  # noqa: BLE001 - no TLS state: no certificate
        return None
    if isinstance(peer, crypto.X509):
        peer = peer.to_cryptography()
    return peer if isinstance(peer, x509.Certificate) else None


def certificate_caller(ca, transport, now: float) -> Caller | None:
    """The verified user certificate on ``transport`` as a caller, or None (no CA, no
    certificate, or one that is not a valid user certificate of this cluster)."""
    if ca is None:
        return None
    cert = peer_certificate(transport)
    if cert is None:
        return None
    try:
        return caller_from_certificate(ca, cert, now)
    except AuthError:
        return None
