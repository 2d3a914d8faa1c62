"""Pending sign-in steps in storage, so any proxy or worker can finish what another began.

A sign-in with a second factor, a WebAuthn challenge or an OIDC round trip spans several
requests; behind a balancer (several proxies) or with ``workers`` the next request may reach
another process than the first. Each step is stored by the hash of its secret (the ticket in
the browser's cookie, the challenge, the OIDC state), never the secret itself, with its
expiry; it is taken at most once (of two proxies racing, one wins), and each kind is
bounded, so a flood of sign-ins that are never finished cannot grow the store.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.interfaces import IReactorTime

from apptunnel.auth.tokens import secret_hash
from apptunnel.backend.base import Backend
from apptunnel.backend.records import SignInState

__all__ = ["MAX_PER_KIND", "SignInStates"]

MAX_PER_KIND = 10_000   # unfinished steps of one kind kept at once (oldest go first)
MAX_KEY = 2048          # a longer key is nobody's: refused without a storage round trip


class SignInStates:
    """Put, read and take the JSON body of one kind of pending step, by its secret."""

    def __init__(self, backend: Backend, clock: IReactorTime, kind: str,
                 limit: int = MAX_PER_KIND) -> None:
        self._backend = backend
        self._clock = clock
        self._kind = kind
        self._limit = limit

    async def put(self, key: str, body: dict[str, Any], ttl: float) -> None:
        now = self._clock.seconds()
        await self._backend.put_signin_state(
            SignInState(secret_hash(key), self._kind, json.dumps(body), now + ttl),
            now, self._limit)

    async def peek(self, key: str | None) -> dict[str, Any] | None:
        """The live step of ``key``, left in place (a second factor may be retried)."""
        if not _usable(key):
            return None
        found = await self._backend.get_signin_state(self._kind, secret_hash(key),
                                                     self._clock.seconds())
        return json.loads(found.body) if found is not None else None

    async def take(self, key: str | None) -> dict[str, Any] | None:
        """The live step of ``key``, gone afterwards (expired ones are gone too)."""
        if not _usable(key):
            return None
        found = await self._backend.take_signin_state(self._kind, secret_hash(key),
                                                      self._clock.seconds())
        return json.loads(found.body) if found is not None else None


def _usable(key: str | None) -> bool:
    return isinstance(key, str) and 0 < len(key) <= MAX_KEY
