"""Second factors of local users: which are needed, checking one, enrolling and removing.

The proxy setting ``auth.second_factor`` says what a sign-in needs after the password:

- ``off`` (default): nothing, devices or not;
- ``otp`` / ``webauthn``: a factor of that kind; ``on``: either kind;
- ``optional``: users with a device must use one, others sign in with the password.

`factors_needed` is that rule, a pure function. A user who must present a factor but has
no usable device gets an *enroll-only* session (it may add a device and nothing else).
Recovery codes (ten, shown once at the first enrollment, stored hashed) stand in for
any factor, once each.

Per-session MFA (a role's ``require_session_mfa``, decided in auth/access.py) asks
`SecondFactors.check_session` for a fresh factor before each app session, whatever the
sign-in setting: any TOTP device, security key or recovery code of the user. Users of a
connector (LDAP, ...) hold no devices here and are refused with `NO_SESSION_FACTOR`,
never let through; a local user without a device is told to add one.

Checks are throttled like passwords (`auth/throttle.py`) under a key of their own per
user, so a right password does not clear the count of wrong codes. Each TOTP time step
works once per device (`Backend.advance_mfa_counter`), so a code seen over a shoulder or
in a log cannot be replayed. Secrets are never logged and never returned after enrollment.
"""

from __future__ import annotations

import re
import secrets
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet.interfaces import IReactorTime

from apptunnel.auth import totp
from apptunnel.auth.errors import AuthError
from apptunnel.auth.signin_states import MAX_PER_KIND, SignInStates
from apptunnel.auth.throttle import LoginThrottle
from apptunnel.auth.tokens import new_secret, secret_hash
from apptunnel.auth.webauthn_devices import WebAuthnKeys
from apptunnel.backend.base import AlreadyExists, Backend
from apptunnel.backend.records import MfaDevice

if TYPE_CHECKING:
    from apptunnel.audit import AuditLog

SETTINGS = ("off", "otp", "webauthn", "on", "optional")
OTP, WEBAUTHN, RECOVERY = "otp", "webauthn", "recovery_code"
FACTOR_OF_KIND = {"totp": OTP, "webauthn": WEBAUTHN}
_ALLOWED = {"otp": {OTP}, "webauthn": {WEBAUTHN}, "on": {OTP, WEBAUTHN},
            "optional": {OTP, WEBAUTHN}}

RECOVERY_CODES = 10
MAX_DEVICES = 20
MAX_FACTOR_LENGTH = 64
DEVICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}\Z")
_RECOVERY_ALPHABET = "abcdefghjkmnpqrstuvwxyz23456789"   # no look-alikes (0/o, 1/l/i)

FACTOR_REQUIRED = "a second factor is required"
FACTOR_INVALID = "invalid second factor"
ENROLL_FIRST = ("this sign-in requires a second factor and you have none yet: add one on "
                "your account page (/web/account) first")


NO_SESSION_FACTOR = "this app requires a second factor your account cannot provide here"
SESSION_ENROLL_FIRST = ("this app requires a second factor for each session and you have "
                        "none yet: add one on your account page (/web/account) first")


class SecondFactorRequired(AuthError):
    """401 naming the factors this user can present (``mfa_required`` in the JSON)."""

    def __init__(self, factors: tuple[str, ...], message: str = FACTOR_REQUIRED,
                 webauthn: dict | None = None) -> None:
        super().__init__(401, message)
        self.mfa_required = list(factors)
        self.webauthn = webauthn          # fresh sign-in options when a key may answer


@attrs.frozen
class Need:
    """What a sign-in of one user needs after the password."""

    factors: tuple[str, ...] = ()       # present one of these ("otp", "webauthn", ...)
    enroll_only: bool = False           # required, but the user has no usable device


@attrs.frozen
class Given:
    """The second factor a sign-in request carries (at most one is used)."""

    otp: str | None = None
    recovery_code: str | None = None
    webauthn: dict | str | None = None       # an assertion (cred.toJSON()), dict or JSON

    @property
    def empty(self) -> bool:
        return not self.otp and not self.recovery_code and not self.webauthn


def factors_needed(setting: str, kinds: set[str], recovery_left: bool) -> Need:
    """The rule: the factors a user holding devices of ``kinds`` must present one of."""
    if setting not in _ALLOWED:
        return Need()
    usable = sorted(_ALLOWED[setting] & {FACTOR_OF_KIND.get(k, k) for k in kinds})
    if not usable:
        return Need(enroll_only=setting != "optional")
    if recovery_left:
        usable.append(RECOVERY)
    return Need(tuple(usable))


def given_factors(fields: dict[str, Any]) -> Given:
    """The factor fields of a JSON body or form, bounded; wrong types count as absent."""
    def text(name: str) -> str | None:
        value = fields.get(name)
        if not isinstance(value, str) or not value or len(value) > MAX_FACTOR_LENGTH:
            return None
        return value
    assertion = fields.get(WEBAUTHN)
    if not isinstance(assertion, (dict, str)) or not assertion:
        assertion = None
    return Given(otp=text(OTP), recovery_code=text(RECOVERY), webauthn=assertion)


def new_recovery_codes(n: int = RECOVERY_CODES) -> list[str]:
    """``n`` codes of 16 letters/digits (~79 bits) shown as xxxx-xxxx-xxxx-xxxx."""
    codes = []
    for _ in range(n):
        raw = "".join(secrets.choice(_RECOVERY_ALPHABET) for _ in range(16))
        codes.append("-".join(raw[i:i + 4] for i in range(0, 16, 4)))
    return codes


def recovery_hash(code: str) -> str:
    """The stored form of a recovery code, as typed in any case, with or without dashes."""
    return secret_hash(re.sub(r"[\s-]", "", code).lower())


class SecondFactors:
    """Checks, enrolls and removes second factors over a Backend, with time from ``clock``."""

    def __init__(self, backend: Backend, clock: IReactorTime, setting: str,
                 throttle: LoginThrottle, audit: AuditLog | None = None,
                 issuer: str = "apptunnel", webauthn: WebAuthnKeys | None = None) -> None:
        self._backend = backend
        self._clock = clock
        self._setting = setting
        self._throttle = throttle
        self._audit = audit
        self._issuer = issuer
        self._webauthn = webauthn

    @property
    def setting(self) -> str:
        return self._setting

    async def needed(self, user: str) -> Need:
        if self._setting == "off":
            return Need()
        devices = await self._backend.list_mfa_devices(user)
        left = await self._backend.count_recovery_codes(user) > 0
        return factors_needed(self._setting, {d.kind for d in devices}, left)

    async def check(self, user: str, given: Given, address: str) -> Need:
        """Pass when the sign-in of ``user`` has what it needs; SecondFactorRequired (401)
        naming the usable factors otherwise; Throttled (429) after too many wrong codes.
        Returns the Need (``enroll_only`` for a user who must enroll first)."""
        need = await self.needed(user)
        if not need.factors:
            return need
        await self._present(user, need, given, address, "user.login", {})
        return need

    async def session_needed(self, user: str) -> Need:
        """What a per-session MFA check of ``user`` takes: any factor the user holds.
        AuthError(403) for a connector's user or a user without any device."""
        account = await self._backend.get_user(user)
        if account is None or account.connector:
            raise AuthError(403, NO_SESSION_FACTOR)
        devices = await self._backend.list_mfa_devices(user)
        kinds = {d.kind for d in devices}
        if self._webauthn is None:
            kinds.discard("webauthn")
        left = await self._backend.count_recovery_codes(user) > 0
        need = factors_needed("on", kinds, left)
        if not need.factors:
            raise AuthError(403, SESSION_ENROLL_FIRST)
        return need

    async def check_session(self, user: str, app: str, given: Given, address: str) -> None:
        """A fresh factor of ``user`` before an app session of ``app`` (per-session MFA);
        SecondFactorRequired (401), AuthError(403) or Throttled (429) otherwise."""
        need = await self.session_needed(user)
        await self._present(user, need, given, address, "session.mfa", {"app": app})

    async def _present(self, user: str, need: Need, given: Given, address: str,
                       event: str, fields: dict) -> None:
        """Verify ``given`` against ``need``: throttled, audited as ``event``."""
        if given.empty:
            raise SecondFactorRequired(need.factors, webauthn=await self.sign_in_options(user))
        key = _throttle_key(user)
        try:
            self._throttle.attempt(key, address, self._clock.seconds())
        except AuthError as err:
            self._emit(event, user, "failure", method=_method(given), client=address,
                       reason="throttled", **fields)
            raise err
        try:
            method, reason = await self._verify(user, given, need)
        except AuthError as err:    # a malformed or stale security-key answer
            method, reason = WEBAUTHN, err.message
        if reason is not None:
            self._emit(event, user, "failure", method=method, client=address, reason=reason,
                       **fields)
            raise SecondFactorRequired(need.factors, FACTOR_INVALID,
                                       webauthn=await self.sign_in_options(user))
        self._throttle.succeeded(key, address)
        self._emit(event, user, "success", method=method, client=address, **fields)

    async def _verify(self, user: str, given: Given, need: Need) -> tuple[str, str | None]:
        """(method, None) when ``given`` is right, else (method, why not)."""
        if given.otp and OTP in need.factors:
            now = self._clock.seconds()
            for device in await self._backend.list_mfa_devices(user):
                if device.kind != "totp":
                    continue
                step = totp.matching_step(device.secret, given.otp, now)
                if step is None:
                    continue
                if await self._backend.advance_mfa_counter(user, device.name, step):
                    return OTP, None
                return OTP, "replayed code"
            return OTP, "wrong code"
        if given.webauthn and WEBAUTHN in need.factors and self._webauthn is not None:
            devices = await self._backend.list_mfa_devices(user)
            found = await self._webauthn.verify_assertion(user, given.webauthn, devices)
            if found is None:
                return WEBAUTHN, "wrong security key answer"
            device, count = found
            if count == 0 and device.counter == 0:
                return WEBAUTHN, None           # an authenticator without a counter
            if await self._backend.advance_mfa_counter(user, device.name, count):
                return WEBAUTHN, None
            return WEBAUTHN, "sign count did not grow (cloned key?)"
        if given.recovery_code and RECOVERY in need.factors:
            if await self._backend.use_recovery_code(user, recovery_hash(given.recovery_code)):
                return RECOVERY, None
            return RECOVERY, "wrong recovery code"
        return _method(given), "factor not usable"

    async def sign_in_options(self, user: str) -> dict | None:
        """Fresh WebAuthn options for a sign-in of ``user``; None without a key."""
        if self._webauthn is None:
            return None
        return await self._webauthn.authentication_options(
            user, await self._backend.list_mfa_devices(user))

    # -- devices ----------------------------------------------------------------

    @property
    def webauthn_enabled(self) -> bool:
        return self._webauthn is not None

    async def registration_options(self, user: str) -> dict | None:
        if self._webauthn is None:
            return None
        return await self._webauthn.registration_options(
            user, await self._backend.list_mfa_devices(user))

    async def add_webauthn(self, user: str, name: Any, credential: Any) -> list[str]:
        """Store a security key the browser registered; the recovery codes to show."""
        if self._webauthn is None:
            raise AuthError(404, "security keys are not enabled")
        _check_name(name)
        devices = await self._backend.list_mfa_devices(user)
        if len(devices) >= MAX_DEVICES:
            raise AuthError(409, f"at most {MAX_DEVICES} devices per user")
        try:
            secret, count = await self._webauthn.verify_registration(user, credential)
        except AuthError:
            self._emit("user.mfa.add", user, "failure", device=name, kind="webauthn",
                       reason="registration refused")
            raise
        return await self._store(MfaDevice(user, name, "webauthn", secret, count,
                                           self._clock.seconds()), devices)

    async def _store(self, device: MfaDevice, devices_before: list[MfaDevice]) -> list[str]:
        """Keep a proven device, audited; the recovery codes to show (first one only)."""
        try:
            await self._backend.add_mfa_device(device)
        except AlreadyExists:
            raise AuthError(409, f"you already have a device named {device.name!r}") from None
        codes = await self._first_codes(device.user, devices_before)
        self._emit("user.mfa.add", device.user, "success", device=device.name,
                   kind=device.kind, recovery_codes=len(codes))
        return codes

    async def _first_codes(self, user: str, devices_before: list[MfaDevice]) -> list[str]:
        """Ten recovery codes at the first enrollment (stored hashed), else none."""
        if devices_before or await self._backend.count_recovery_codes(user):
            return []
        codes = new_recovery_codes()
        await self._backend.set_recovery_codes(user, [recovery_hash(c) for c in codes])
        return codes

    def new_totp(self, user: str) -> tuple[str, str]:
        """A fresh secret and its otpauth:// URI (nothing stored until confirmed)."""
        secret = totp.new_secret()
        return secret, totp.provisioning_uri(secret, user, self._issuer)

    async def add_totp(self, user: str, name: str, secret: Any, code: Any) -> list[str]:
        """Store the device once ``code`` proves the user's app has ``secret``. Returns the
        recovery codes to show (made at the first enrollment only, else [])."""
        _check_name(name)
        if not totp.valid_secret(secret):
            raise AuthError(400, "invalid TOTP secret")
        devices = await self._backend.list_mfa_devices(user)
        if len(devices) >= MAX_DEVICES:
            raise AuthError(409, f"at most {MAX_DEVICES} devices per user")
        step = totp.matching_step(secret, code, self._clock.seconds()) \
            if isinstance(code, str) else None
        if step is None:
            self._emit("user.mfa.add", user, "failure", device=name, kind="totp",
                       reason="wrong code")
            raise AuthError(400, "the code does not match: check the time on your device "
                                 "and enter the code it shows now")
        # The confirming code's step is spent: it cannot sign in afterwards.
        return await self._store(MfaDevice(user, name, "totp", secret, step,
                                           self._clock.seconds()), devices)

    async def devices(self, user: str) -> list[MfaDevice]:
        return await self._backend.list_mfa_devices(user)

    async def remove(self, user: str, name: str) -> None:
        """Remove a device; never the last one a required second factor depends on."""
        devices = await self._backend.list_mfa_devices(user)
        if not any(d.name == name for d in devices):
            raise AuthError(404, f"no device named {name!r}")
        rest = {d.kind for d in devices if d.name != name}
        if self._setting != "off" and factors_needed(self._setting, rest, False).enroll_only:
            self._emit("user.mfa.delete", user, "failure", device=name, reason="last device")
            raise AuthError(409, f"{name!r} is your last device and sign-in requires a "
                                 "second factor: add another device first")
        await self._backend.delete_mfa_device(user, name)
        self._emit("user.mfa.delete", user, "success", device=name)

    async def renew_recovery_codes(self, user: str, given: Given, address: str) -> list[str]:
        """Ten new recovery codes, replacing the old ones, after a fresh factor (a stolen
        session alone cannot mint codes that outlive it)."""
        need = await self.session_needed(user)
        await self._present(user, need, given, address, "user.mfa.recovery_codes", {})
        codes = new_recovery_codes()
        await self._backend.set_recovery_codes(user, [recovery_hash(c) for c in codes])
        return codes

    async def recovery_codes_left(self, user: str) -> int:
        return await self._backend.count_recovery_codes(user)

    # -- audit ------------------------------------------------------------------

    def _emit(self, type: str, user: str, outcome: str, **fields: Any) -> None:
        if self._audit is not None:
            self._audit.emit(type, actor=user, target=user, outcome=outcome, **fields)


def _check_name(name: Any) -> None:
    if not isinstance(name, str) or not DEVICE_NAME.match(name):
        raise AuthError(400, "invalid device name (letters, digits and . _ @ + -, up to 64)")


def _method(given: Given) -> str:
    return OTP if given.otp else WEBAUTHN if given.webauthn else RECOVERY


def _throttle_key(user: str) -> str:
    """Wrong codes count apart from wrong passwords: the right password clears only its own."""
    return user + "\x00second-factor"


class PendingSignIns:
    """Browsers that passed the password and owe a second factor: ticket -> user.

    The ticket lives in a host-only cookie for ``ttl`` seconds; its hash is kept in storage
    (auth/signin_states.py), so the second step works on whichever proxy or worker it
    reaches. Bounded: past ``limit`` unfinished sign-ins the oldest go first.
    """

    def __init__(self, backend: Backend, clock: IReactorTime, ttl: float = 300.0,
                 limit: int = MAX_PER_KIND) -> None:
        self._states = SignInStates(backend, clock, "mfa", limit)
        self._ttl = ttl

    @property
    def ttl(self) -> float:
        return self._ttl

    async def start(self, user: str) -> str:
        ticket = new_secret()
        await self._states.put(ticket, {"user": user}, self._ttl)
        return ticket

    async def user(self, ticket: str | None) -> str | None:
        body = await self._states.peek(ticket)
        user = body.get("user") if body is not None else None
        return user if isinstance(user, str) else None

    async def finish(self, ticket: str | None) -> None:
        await self._states.take(ticket)
