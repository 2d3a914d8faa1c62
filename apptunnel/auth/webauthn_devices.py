"""WebAuthn security keys and passkeys as second factors (py_webauthn, keyword arguments).

The relying party id is the proxy's public host and the expected origin its public
address with the port, so a key registered here answers nowhere else. Challenges are
made here, kept in storage for ``CHALLENGE_TTL`` seconds (auth/signin_states.py: any
proxy or worker can check the answer) and taken out on first use (single use). An assertion names its
challenge in its client data, which is how it finds it. Sign counts must grow (an
authenticator that always reports 0 may stay at 0): a cloned key shows up as a count
that did not.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.interfaces import IReactorTime
from webauthn import (
    generate_authentication_options,
    generate_registration_options,
    options_to_json,
    verify_authentication_response,
    verify_registration_response,
)
from webauthn.helpers import base64url_to_bytes, bytes_to_base64url
from webauthn.helpers.structs import (
    AuthenticatorSelectionCriteria,
    PublicKeyCredentialDescriptor,
    ResidentKeyRequirement,
    UserVerificationRequirement,
)

from apptunnel.auth.errors import AuthError
from apptunnel.auth.signin_states import SignInStates
from apptunnel.backend.base import Backend
from apptunnel.backend.records import MfaDevice

CHALLENGE_TTL = 120.0
MAX_CHALLENGES = 10_000
MAX_CREDENTIAL_JSON = 8 * 1024
REGISTER, SIGN_IN = "register", "sign-in"
INVALID = "the security key's answer was not accepted"


def credential_of(device: MfaDevice) -> dict:
    """The stored credential of a WebAuthn device: {"id", "public_key"} (base64url)."""
    return json.loads(device.secret)


class WebAuthnKeys:
    """Options to send to the browser and checks of what it sends back."""

    def __init__(self, rp_id: str, origin: str, rp_name: str, clock: IReactorTime,
                 backend: Backend) -> None:
        self._rp_id = rp_id
        self._origin = origin
        self._rp_name = rp_name
        self._challenges = SignInStates(backend, clock, "webauthn", MAX_CHALLENGES)

    # -- challenges -------------------------------------------------------------

    async def _remember(self, challenge: bytes, user: str, purpose: str) -> None:
        await self._challenges.put(bytes_to_base64url(challenge),
                                   {"user": user, "purpose": purpose}, CHALLENGE_TTL)

    async def _take(self, credential: dict, user: str, purpose: str) -> bytes:
        """The challenge this credential answers, taken out; AuthError if not ours now."""
        try:
            client_data = json.loads(base64url_to_bytes(credential["response"]["clientDataJSON"]))
            key = client_data["challenge"]
        except (KeyError, TypeError, ValueError):
            raise AuthError(400, INVALID) from None
        found = await self._challenges.take(key) if isinstance(key, str) else None
        if found is None or found.get("user") != user or found.get("purpose") != purpose:
            raise AuthError(401, "the security key challenge is unknown, used or expired")
        return base64url_to_bytes(key)

    # -- registration -----------------------------------------------------------

    async def registration_options(self, user: str, devices: list[MfaDevice]) -> dict:
        options = generate_registration_options(
            rp_id=self._rp_id, rp_name=self._rp_name, user_name=user,
            user_id=user.encode("utf-8"),
            exclude_credentials=[
                PublicKeyCredentialDescriptor(id=base64url_to_bytes(credential_of(d)["id"]))
                for d in devices if d.kind == "webauthn"],
            authenticator_selection=AuthenticatorSelectionCriteria(
                resident_key=ResidentKeyRequirement.PREFERRED,
                user_verification=UserVerificationRequirement.PREFERRED),
        )
        await self._remember(options.challenge, user, REGISTER)
        return json.loads(options_to_json(options))

    async def verify_registration(self, user: str, credential: Any) -> tuple[str, int]:
        """(secret to store, sign count) for a registration the user's browser made."""
        credential = _bounded(credential)
        challenge = await self._take(credential, user, REGISTER)
        try:
            verified = verify_registration_response(
                credential=credential, expected_challenge=challenge,
                expected_rp_id=self._rp_id, expected_origin=self._origin)
        except Exception:   # py_webauthn raises several types for bad input
            raise AuthError(400, INVALID) from None
        secret = json.dumps({"id": bytes_to_base64url(verified.credential_id),
                             "public_key": bytes_to_base64url(verified.credential_public_key)})
        return secret, int(verified.sign_count)

    # -- sign-in ----------------------------------------------------------------

    async def authentication_options(self, user: str, devices: list[MfaDevice]) -> dict | None:
        keys = [d for d in devices if d.kind == "webauthn"]
        if not keys:
            return None
        options = generate_authentication_options(
            rp_id=self._rp_id,
            allow_credentials=[
                PublicKeyCredentialDescriptor(id=base64url_to_bytes(credential_of(d)["id"]))
                for d in keys],
            user_verification=UserVerificationRequirement.PREFERRED)
        await self._remember(options.challenge, user, SIGN_IN)
        return json.loads(options_to_json(options))

    async def verify_assertion(self, user: str, credential: Any, devices: list[MfaDevice]
                         ) -> tuple[MfaDevice, int] | None:
        """(device, new sign count) when the assertion is good, else None."""
        credential = _bounded(credential)
        challenge = await self._take(credential, user, SIGN_IN)
        device = next((d for d in devices if d.kind == "webauthn"
                       and credential_of(d)["id"] == credential.get("id")), None)
        if device is None:
            return None
        try:
            verified = verify_authentication_response(
                credential=credential, expected_challenge=challenge,
                expected_rp_id=self._rp_id, expected_origin=self._origin,
                credential_public_key=base64url_to_bytes(credential_of(device)["public_key"]),
                credential_current_sign_count=device.counter)
        except Exception:
            return None
        return device, int(verified.new_sign_count)


def _bounded(credential: Any) -> dict:
    """A credential as a dict: JSON text (a form field) is parsed, bounded in size."""
    if isinstance(credential, str):
        if len(credential) > MAX_CREDENTIAL_JSON:
            raise AuthError(413, "security key answer too large")
        try:
            credential = json.loads(credential)
        except ValueError:
            raise AuthError(400, INVALID) from None
    if not isinstance(credential, dict) or len(json.dumps(credential)) > MAX_CREDENTIAL_JSON:
        raise AuthError(400, INVALID)
    return credential
