"""A JSON Web Key Set fetched over HTTPS and cached: who signed a token, asked of its issuer.

Two readers verify signatures with someone else's published keys: the sample app checks
the proxy's app JWTs, and the OIDC connector checks an identity provider's ID tokens.
Both need the same care (bounded bodies, one fetch shared by concurrent lookups, a refetch
for an unknown ``kid`` that cannot be used to hammer the issuer, fail closed), so it is
written once, here.
"""

from __future__ import annotations

import json

import jwt
from treq import collect
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()

MAX_JWKS_BYTES = 256 * 1024
JWKS_TIMEOUT = 10.0
MIN_REFETCH_INTERVAL = 10.0        # an unknown kid refetches at most this often
JWKS_MAX_AGE = 300.0               # the proxy serves its JWKS with max-age=300


class JwksError(Exception):
    """The key set could not be fetched or has no key for the token; the message says why."""


def read_limited(response, limit: int) -> Deferred:
    """The whole body, or an error as soon as it grows past `limit` bytes."""
    parts: list[bytes] = []
    size = [0]

    def gather(data: bytes) -> None:
        size[0] += len(data)
        if size[0] > limit:
            raise JwksError(f"JWKS larger than {limit} bytes")
        parts.append(data)

    return collect(response, gather).addCallback(lambda _: b"".join(parts))


def parse_jwks(body: bytes) -> dict[str, jwt.PyJWK]:
    """Signing keys by kid; keys we cannot use are skipped so one odd key breaks nothing."""
    try:
        doc = json.loads(body)
    except ValueError:
        raise JwksError("JWKS is not JSON") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise JwksError("JWKS has no 'keys' list")
    keys: dict[str, jwt.PyJWK] = {}
    for entry in doc["keys"]:
        if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
            continue
        try:
            key = jwt.PyJWK(entry)
        except (jwt.PyJWTError, KeyError, ValueError, TypeError) as err:
            log.warn("skipping unusable JWKS key {kid}: {error}", kid=entry.get("kid"), error=err)
            continue
        if key.key_id:
            keys[key.key_id] = key
    return keys


class JwksCache:
    """The proxy's public keys by kid, fetched on first use and again for an unknown kid.

    Concurrent lookups share one fetch, and refetches are spaced by `min_refetch_interval`
    so tokens with made-up kids cannot make us hammer the proxy. Keys older than `max_age`
    are refetched, so a key the proxy retired stops verifying; a failed fetch empties the
    cache (fail closed) until the next attempt.
    """

    def __init__(self, http, url: str, clock: IReactorTime, *,
                 min_refetch_interval: float = MIN_REFETCH_INTERVAL,
                 max_age: float = JWKS_MAX_AGE, timeout: float = JWKS_TIMEOUT) -> None:
        self._http = http
        self._url = url
        self._clock = clock
        self._min_interval = min_refetch_interval
        self._max_age = max_age
        self._timeout = timeout
        self._keys: dict[str, jwt.PyJWK] = {}
        self._last_fetch: float | None = None
        self._waiters: list[Deferred] = []

    async def key(self, kid: str) -> jwt.PyJWK:
        """The key named `kid`; JwksError when it is not published (or cannot be fetched)."""
        age = None if self._last_fetch is None else self._clock.seconds() - self._last_fetch
        if (age is None or age >= self._max_age or self._waiters
                or (kid not in self._keys and age >= self._min_interval)):
            await self._refresh()
        if kid not in self._keys:
            raise JwksError(f"no key with kid {kid!r} in the proxy's JWKS")
        return self._keys[kid]

    def _refresh(self) -> Deferred:
        waiter: Deferred = Deferred()
        self._waiters.append(waiter)
        if len(self._waiters) == 1:
            self._last_fetch = self._clock.seconds()
            fetch = Deferred.fromCoroutine(self._fetch())
            fetch.addTimeout(self._timeout, self._clock)
            fetch.addBoth(self._release)
        return waiter

    async def _fetch(self) -> None:
        response = await self._http.get(self._url, headers={"Accept": ["application/json"]})
        if response.code != 200:
            await response.text()
            raise JwksError(f"JWKS answered HTTP {response.code}")
        self._keys = parse_jwks(await read_limited(response, MAX_JWKS_BYTES))
        log.info("fetched {count} key(s) from {url}", count=len(self._keys), url=self._url)

    def _release(self, result) -> None:
        waiters, self._waiters = self._waiters, []
        if isinstance(result, Failure):
            self._keys = {}
            error = result.value
            if not isinstance(error, JwksError):
                error = JwksError(f"cannot fetch JWKS from {self._url}: {describe_failure(result)}")
            log.warn("{error}", error=error)
            for waiter in waiters:
                waiter.errback(error)
        else:
            for waiter in waiters:
                waiter.callback(None)


def describe_failure(failure: Failure) -> str:
    """One line for a network failure (TLS errors carry nested tuples)."""
    text = str(failure.value) or failure.type.__name__
    return text.splitlines()[0][:300]
