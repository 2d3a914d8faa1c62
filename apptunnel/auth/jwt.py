"""The cluster's JWT signing key and the identity tokens the proxy stamps on requests.

Apps learn who is calling from a short-lived JWT (minutes), verified against the keys
published at ``/.well-known/jwks.json``. Signing is cached per (app session, app) and
redone once less than a third of a token's life is left, so no request pays for an RSA
signature and no app ever holds a token that is valid for hours.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

import attrs
import jwt as pyjwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from twisted.internet.interfaces import IReactorTime

from apptunnel.auth.errors import AuthError

ALGORITHMS = ("RS256", "ES256", "EdDSA")
KEY_FILE = "jwt.key"
# Every claim a token can carry, in the order of DESIGN.md.
JWT_CLAIMS = ("iss", "sub", "username", "aud", "iat", "nbf", "exp", "roles", "traits", "jti")
# Claims that keep a token verifiable and bounded in time; never filtered out.
REQUIRED_CLAIMS = frozenset({"iss", "sub", "aud", "iat", "nbf", "exp", "jti"})
MAX_CACHED_SESSIONS = 10_000
MAX_SLOTS_PER_SESSION = 256

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


class JwtKeyError(AuthError, ValueError):
    """The key file cannot be used with the configured algorithm."""

    def __init__(self, message: str) -> None:
        super().__init__(500, message)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _int_bytes(n: int, length: int | None = None) -> bytes:
    return n.to_bytes(length or max(1, (n.bit_length() + 7) // 8), "big")


def _generate(algorithm: str) -> PrivateKey:
    if algorithm == "RS256":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if algorithm == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    return ed25519.Ed25519PrivateKey.generate()


def _fits(algorithm: str, key: Any) -> bool:
    if algorithm == "RS256":
        return isinstance(key, rsa.RSAPrivateKey) and key.key_size >= 2048
    if algorithm == "ES256":
        return isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(
            key.curve, ec.SECP256R1
        )
    return isinstance(key, ed25519.Ed25519PrivateKey)


def _public_jwk(key: PrivateKey) -> dict[str, str]:
    """The RFC 7517 members that identify the public key (also the RFC 7638 input)."""
    public = key.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        numbers = public.public_numbers()
        return {"kty": "RSA", "n": _b64(_int_bytes(numbers.n)), "e": _b64(_int_bytes(numbers.e))}
    if isinstance(public, ec.EllipticCurvePublicKey):
        numbers = public.public_numbers()
        return {
            "kty": "EC",
            "crv": "P-256",
            "x": _b64(_int_bytes(numbers.x, 32)),
            "y": _b64(_int_bytes(numbers.y, 32)),
        }
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return {"kty": "OKP", "crv": "Ed25519", "x": _b64(raw)}


def _thumbprint(jwk: Mapping[str, str]) -> str:
    """RFC 7638: SHA-256 over the required members, sorted, without whitespace."""
    canonical = json.dumps(dict(jwk), sort_keys=True, separators=(",", ":"))
    return _b64(hashlib.sha256(canonical.encode("ascii")).digest())


def _pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def new_key_pem(algorithm: str) -> bytes:
    """A new private key for `algorithm`, PEM (for the key store, auth/keystore.py)."""
    if algorithm not in ALGORITHMS:
        raise JwtKeyError(
            f"unsupported JWT algorithm {algorithm!r} (use one of {', '.join(ALGORITHMS)})"
        )
    return _pem(_generate(algorithm))


def _write_new_key(path: str, key: PrivateKey) -> None:
    """Write 0600 to a temp name, then link into place so a racing process never sees half."""
    pem = _pem(key)
    tmp = f"{path}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)          # FileExistsError if another process won the race
    finally:
        os.unlink(tmp)


class JwtKeys:
    """The cluster's signing key pair, its kid, and the public JWKS."""

    def __init__(self, algorithm: str, private_key: PrivateKey) -> None:
        if algorithm not in ALGORITHMS:
            raise JwtKeyError(
                f"unsupported JWT algorithm {algorithm!r} (use one of {', '.join(ALGORITHMS)})"
            )
        if not _fits(algorithm, private_key):
            raise JwtKeyError(f"key does not fit algorithm {algorithm}")
        self.algorithm = algorithm
        self.private_key = private_key
        self.public_key = private_key.public_key()
        self._public_jwk = _public_jwk(private_key)
        self.kid = _thumbprint(self._public_jwk)[:16]

    @classmethod
    def from_pem(cls, algorithm: str, pem: bytes) -> "JwtKeys":
        """The key pair from stored material; JwtKeyError if it cannot sign `algorithm`."""
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError) as err:
            raise JwtKeyError(f"not an unencrypted PEM private key ({err})") from None
        if not _fits(algorithm, key):
            raise JwtKeyError(f"a {type(key).__name__.lstrip('_')} cannot sign {algorithm}")
        return cls(algorithm, key)

    @classmethod
    def load_or_create(cls, data_dir: str, algorithm: str) -> "JwtKeys":
        """Load ``data_dir/jwt.key`` or create it (0600). Blocking: call at startup only."""
        if algorithm not in ALGORITHMS:
            raise JwtKeyError(
                f"unsupported JWT algorithm {algorithm!r} (use one of {', '.join(ALGORITHMS)})"
            )
        path = os.path.join(data_dir, KEY_FILE)
        if not os.path.exists(path):
            os.makedirs(data_dir, mode=0o700, exist_ok=True)
            try:
                _write_new_key(path, _generate(algorithm))
            except FileExistsError:
                pass
        with open(path, "rb") as f:
            pem = f.read()
        os.chmod(path, 0o600)
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError) as err:
            raise JwtKeyError(f"{path}: not an unencrypted PEM private key ({err})") from None
        if not _fits(algorithm, key):
            raise JwtKeyError(
                f"{path}: holds a {type(key).__name__.lstrip('_')} that cannot sign "
                f"{algorithm}; move the file away to create a new key"
            )
        return cls(algorithm, key)

    def jwk(self) -> dict[str, str]:
        return {**self._public_jwk, "kid": self.kid, "alg": self.algorithm, "use": "sig"}

    def jwks(self) -> dict:
        """The document served at /.well-known/jwks.json."""
        return {"keys": [self.jwk()]}

    def sign(self, claims: Mapping[str, Any]) -> str:
        return pyjwt.encode(
            dict(claims), self.private_key, algorithm=self.algorithm, headers={"kid": self.kid}
        )


@attrs.frozen
class RingKey:
    """One published key: it signs from ``activate_at``; it is published until
    ``retire_at`` (None: for as long as it is stored)."""

    keys: JwtKeys
    activate_at: float = 0.0
    retire_at: float | None = None


class JwtKeyRing:
    """Every published signing key and the one that signs now (rotation, auth/keystore.py).

    The signing key is the newest whose ``activate_at`` has come, decided on each call from
    the clock, so every proxy switches at the same moment without waiting for a poll; a
    key is in the JWKS from the moment this proxy reads it until its ``retire_at``.
    """

    def __init__(self, clock: IReactorTime, entries: Iterable[RingKey]) -> None:
        self._clock = clock
        self._entries: tuple[RingKey, ...] = ()
        self.replace(entries)

    def replace(self, entries: Iterable[RingKey]) -> None:
        """A fresh read of the store; refused (ValueError) without any key that can sign."""
        entries = tuple(sorted(entries, key=lambda e: e.activate_at))
        if not entries:
            raise ValueError("no JWT signing key")
        self._entries = entries

    def _live(self, now: float) -> list[RingKey]:
        return [e for e in self._entries if e.retire_at is None or now < e.retire_at]

    def signing(self) -> JwtKeys:
        now = self._clock.seconds()
        ready = [e for e in self._live(now) if e.activate_at <= now] or list(self._entries[:1])
        return ready[-1].keys

    @property
    def kid(self) -> str:
        return self.signing().kid

    def jwks(self) -> dict:
        """The document served at /.well-known/jwks.json: every key not yet retired."""
        return {"keys": [e.keys.jwk() for e in self._live(self._clock.seconds())]}

    def sign(self, claims: Mapping[str, Any]) -> str:
        return self.signing().sign(claims)


@attrs.frozen
class _Cached:
    token: str
    refresh_at: float
    who: tuple = ()      # (username, roles, traits) the token says: reused only for the same
    kid: str = ""        # the key that signed it: a rotation re-signs at once


class JwtSigner:
    """Signs identity tokens and reuses each until a third of its lifetime is left."""

    def __init__(self, keys: JwtKeys | JwtKeyRing, issuer: str, clock: IReactorTime,
                 ttl: float) -> None:
        if ttl < 1:
            raise ValueError("jwt ttl must be at least 1 second")
        self._keys = keys
        self._issuer = issuer
        self._clock = clock
        self._ttl = ttl
        # cache_key -> {(audience, claims): token}; oldest cache_key first, bounded.
        self._cache: OrderedDict[str, dict[tuple, _Cached]] = OrderedDict()

    def token(
        self,
        cache_key: str,
        username: str,
        roles: Iterable[str],
        traits: Mapping[str, Iterable[str]],
        audience: str,
        claims: tuple[str, ...] | None = None,
        bot: bool = False,
    ) -> str:
        """A signed token for this caller and app; ``claims`` selects the optional ones.
        A bot's token says ``"bot": true`` whatever ``claims`` selects (an app must be
        able to tell a machine from a person)."""
        now = self._clock.seconds()
        slot = (audience, claims)
        roles = tuple(roles)
        who = (username, roles, traits, bot)
        kid = self._keys.kid
        per_session = self._cache.get(cache_key)
        if per_session is not None:
            self._cache.move_to_end(cache_key)
            cached = per_session.get(slot)
            # A role change caps a live session's roles: never hand out the old token.
            if (cached is not None and now < cached.refresh_at and cached.who == who
                    and cached.kid == kid):
                return cached.token
        issued = int(now)
        expires = issued + int(self._ttl)
        payload: dict[str, Any] = {
            "iss": self._issuer,
            "sub": username,
            "username": username,
            "aud": audience,
            "iat": issued,
            "nbf": issued,
            "exp": expires,
            "roles": list(roles),
            "traits": {name: list(values) for name, values in traits.items()},
            "jti": secrets.token_hex(16),
        }
        if claims is not None:
            payload = {k: v for k, v in payload.items() if k in REQUIRED_CLAIMS or k in claims}
        if bot:
            payload["bot"] = True
        token = self._keys.sign(payload)
        if per_session is None:
            per_session = self._cache[cache_key] = {}
        elif len(per_session) >= MAX_SLOTS_PER_SESSION:
            per_session.clear()
        while len(self._cache) > MAX_CACHED_SESSIONS:
            self._cache.popitem(last=False)
        per_session[slot] = _Cached(token, expires - self._ttl / 3, who, kid)
        return token

    def forget(self, cache_key: str) -> None:
        """Drop the cached tokens of an ended session."""
        self._cache.pop(cache_key, None)
