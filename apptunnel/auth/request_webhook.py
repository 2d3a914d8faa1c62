"""The access-request webhook: one JSON POST per state change, off the request path.

A reviewer's click must not wait for the operator's chat bot, and a dead bot must not
grow memory: `send` only queues (bounded), deliveries run on the reactor, each attempt
has a timeout, failures are retried with exponential backoff a bounded number of times,
and giving up is one log line naming the request (the URL is logged without its path and
query, which is where a secret would be).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

ATTEMPTS = 6
FIRST_DELAY = 1.0
MAX_DELAY = 30.0
TIMEOUT = 10.0
MAX_IN_FLIGHT = 1000

Post = Callable[[str, bytes], Awaitable[int]]    # (url, body) -> HTTP status


def safe_url(url: str) -> str:
    """scheme://host[:port]/... : what a log line may say about the URL."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}/..."


def backoff(attempt: int, first: float = FIRST_DELAY, most: float = MAX_DELAY) -> float:
    """Seconds to wait before retry ``attempt`` (1, 2, ...): doubling, capped."""
    return min(most, first * (2 ** (attempt - 1)))


class RequestWebhook:
    """POSTs documents to ``url`` with ``post`` (treq in the proxy, a fake in tests)."""

    _log = Logger()

    def __init__(self, url: str, clock: IReactorTime, post: Post, *,
                 attempts: int = ATTEMPTS, first_delay: float = FIRST_DELAY,
                 timeout: float = TIMEOUT, max_in_flight: int = MAX_IN_FLIGHT) -> None:
        self._url = url
        self._clock = clock
        self._post = post
        self._attempts = attempts
        self._first_delay = first_delay
        self._timeout = timeout
        self._max = max_in_flight
        self._in_flight = 0
        self._dropping = False

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def send(self, doc: dict) -> None:
        """Queue one delivery and return at once; never raises."""
        if self._in_flight >= self._max:
            if not self._dropping:
                self._dropping = True
                self._log.warn("access request webhook {url}: {n} deliveries pending; "
                               "dropping new ones until it answers",
                               url=safe_url(self._url), n=self._in_flight)
            return
        self._in_flight += 1
        d = Deferred.fromCoroutine(self._deliver(doc))
        d.addErrback(lambda f: self._log.failure("access request webhook failed", f))
        d.addBoth(self._done)

    def _done(self, _: object) -> None:
        self._in_flight -= 1
        if self._in_flight < self._max:
            self._dropping = False

    async def _deliver(self, doc: dict) -> None:
        body = json.dumps(doc, sort_keys=True).encode("utf-8")
        why = ""
        for attempt in range(1, self._attempts + 1):
            try:
                status = await Deferred.fromCoroutine(self._once(body))
            except Exception as err:  # noqa: BLE001 - any failure is a retry
                why = type(err).__name__ if not str(err) else str(err)[:200]
            else:
                if 200 <= status < 300:
                    return
                why = f"HTTP {status}"
            if attempt < self._attempts:
                await deferLater(self._clock, backoff(attempt, self._first_delay), lambda: None)
        self._log.warn("access request webhook {url} gave up on request {id} ({state}) after "
                       "{n} attempts: {why}", url=safe_url(self._url), id=doc.get("id", ""),
                       state=doc.get("state", ""), n=self._attempts, why=why)

    async def _once(self, body: bytes) -> int:
        d = Deferred.fromCoroutine(_awaited(self._post(self._url, body)))
        d.addTimeout(self._timeout, self._clock)
        return await d


async def _awaited(value: Awaitable[int]) -> int:
    return await value


def treq_post(reactor, ca_file: str | None = None) -> Post:
    """A `Post` over treq: the system's CAs, or only ``ca_file``'s; the answer discarded."""
    import treq
    from twisted.internet.ssl import Certificate
    from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool

    if ca_file is not None:
        with open(ca_file, "rb") as f:
            trust = Certificate.loadPEM(f.read())
        policy = BrowserLikePolicyForHTTPS(trustRoot=trust)
    else:
        policy = BrowserLikePolicyForHTTPS()
    pool = HTTPConnectionPool(reactor, persistent=True)   # one connection, reused
    pool.maxPersistentPerHost = 2
    client = treq.client.HTTPClient(Agent(reactor, contextFactory=policy, pool=pool))

    async def post(url: str, body: bytes) -> int:
        response = await client.post(url, data=body,
                                     headers={b"Content-Type": [b"application/json"]})
        await treq.collect(response, lambda chunk: None)
        return response.code

    return post
