"""The audit log: every security-relevant act, written off the request path.

``emit`` only appends to a bounded in-memory queue, so a slow or broken backend can never
stall a request. A background loop on the injected clock writes the queue in batches to
the backend (and, optionally, to a JSON-lines mirror file in a worker thread). If the
queue overflows, the oldest events are dropped and the drop is counted in the log.
"""

from __future__ import annotations

import json
import os
import uuid
from collections import deque
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThread
from twisted.logger import Logger

from apptunnel.backend.base import Backend
from apptunnel.backend.records import AuditEvent

# type -> (code on success, code on any other outcome)
CODES: dict[str, tuple[str, str]] = {
    "user.login": ("T1000I", "T1000W"),
    "user.link": ("T1010I", "T1010W"),          # an invite or reset link looked at / used
    "user.link.issue": ("T1011I", "T1011W"),
    "user.mfa.add": ("T1020I", "T1020W"),
    "user.mfa.delete": ("T1021I", "T1021W"),
    "user.mfa.recovery_codes": ("T1022I", "T1022W"),   # new recovery codes (account page)
    "session.mfa": ("T1030I", "T1030W"),        # a per-session MFA check (auth/mfa.py)
    "session.web.start": ("T2000I", "T2000W"),
    "session.web.end": ("T2001I", "T2001W"),
    "session.app.start": ("T2010I", "T2010W"),
    "session.app.end": ("T2011I", "T2011W"),
    "app.request": ("T2100I", "T2100W"),
    "access.denied": ("T2200W", "T2200W"),
    "tcp.session.start": ("T2300I", "T2300W"),
    "tcp.session.end": ("T2301I", "T2301W"),
    "token.create": ("T3000I", "T3000W"),
    "token.delete": ("T3001I", "T3001W"),
    "agent.join": ("T3100I", "T3100W"),
    "agent.hello": ("T3101I", "T3101W"),
    "agent.app.refused": ("T3102W", "T3102W"),
    "agent.renew": ("T3103I", "T3103W"),
    "bot.join": ("T3200I", "T3200W"),
    "bot.renew": ("T3201I", "T3201W"),
    "user.create": ("T4000I", "T4000W"),
    "user.delete": ("T4001I", "T4001W"),
    "user.update": ("T4002I", "T4002W"),
    "resource.create": ("T4100I", "T4100W"),
    "resource.delete": ("T4101I", "T4101W"),
    "bot.create": ("T4200I", "T4200W"),
    "bot.delete": ("T4201I", "T4201W"),
    "admin.denied": ("T4300W", "T4300W"),       # a change the caller's rules refuse
    "lock.create": ("T6000I", "T6000W"),
    "lock.delete": ("T6001I", "T6001W"),
    "lock.enforced": ("T6002W", "T6002W"),
    "cert.issue": ("T5000I", "T5000W"),
    "auth.rotate": ("T5200I", "T5200W"),        # a cluster key rotated (cli/rotate.py)
    "access_request.create": ("T5100I", "T5100W"),     # auth/access_requests.py
    "access_request.review": ("T5101I", "T5101W"),
    "access_request.assume": ("T5102I", "T5102W"),
    "access_request.expire": ("T5103I", "T5103I"),
}
UNKNOWN_CODES = ("T0000I", "T0000W")

MAX_QUEUE = 100_000
BATCH_SIZE = 500
FLUSH_INTERVAL = 1.0
MAX_ATTEMPTS = 3


def code_for(type: str, outcome: str) -> str:
    success, other = CODES.get(type, UNKNOWN_CODES)
    return success if outcome == "success" else other


_SCALARS = frozenset([str, int, float, bool, type(None)])


def _plain(fields: dict[str, Any]) -> dict[str, Any]:
    """Fields as JSON values; anything exotic becomes its str() so storage never fails.

    Scalar-only fields (every per-request event) are copied as they are: the JSON round
    trip would give back the same dict, at a cost paid on every request.
    """
    if all(type(v) in _SCALARS for v in fields.values()):
        return dict(fields)
    return json.loads(json.dumps(fields, default=str))


async def _settled(d: Deferred) -> None:
    """Wait for a shared Deferred without taking its result from other waiters."""
    waiter: Deferred = Deferred()

    def done(result: object) -> object:
        waiter.callback(None)
        return result

    d.addBoth(done)
    await waiter


def _append_lines(path: str, lines: list[str]) -> None:
    """Worker thread: append to the mirror (created 0600), reopened per batch for logrotate."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        f.write("".join(lines))


class AuditLog:
    """Queue events now, store them soon; ``flush()`` stores everything queued so far."""

    _log = Logger()

    def __init__(
        self,
        backend: Backend,
        clock: IReactorTime,
        json_file: str | None = None,
        *,
        max_queue: int = MAX_QUEUE,
        batch_size: int = BATCH_SIZE,
        interval: float = FLUSH_INTERVAL,
    ) -> None:
        self._backend = backend
        self._clock = clock
        self._json_file = json_file
        self._max_queue = max_queue
        self._batch_size = batch_size
        self._interval = interval
        self._queue: deque[AuditEvent] = deque()
        self._dropped = 0
        # A batch the backend refused, retried before newer events (mirror already has it).
        self._failed: tuple[list[AuditEvent], int] | None = None
        self._writing: Deferred | None = None
        self._loop: LoopingCall | None = None

    @property
    def pending(self) -> int:
        return len(self._queue) + (len(self._failed[0]) if self._failed else 0)

    @property
    def writable(self) -> bool:
        """The last write reached the backend (readiness: ``/readyz``)."""
        return self._failed is None

    def emit(
        self,
        type: str,
        *,
        actor: str = "",
        target: str = "",
        outcome: str = "success",
        **fields: Any,
    ) -> None:
        """Queue one event. Never blocks, never raises."""
        try:
            event = AuditEvent(
                id=uuid.uuid4().hex,
                time=self._clock.seconds(),
                type=type,
                code=code_for(type, outcome),
                actor=str(actor),
                target=str(target),
                outcome=str(outcome),
                fields=_plain(fields),
            )
            if len(self._queue) >= self._max_queue:
                self._queue.popleft()
                self._dropped += 1
            self._queue.append(event)
        except Exception:
            self._log.failure("audit event {type!r} could not be queued", type=type)

    def start(self) -> None:
        """Begin writing batches every ``interval`` seconds of the clock."""
        if self._loop is not None:
            return
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self._clock
        self._loop.start(self._interval, now=False).addErrback(
            lambda f: self._log.failure("audit loop stopped", f)
        )

    async def stop(self) -> None:
        """Stop the loop and write whatever is still queued."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        await self.flush()

    async def flush(self) -> None:
        """Write everything queued before this call (one more attempt for a failed batch)."""
        while self._writing is not None:
            await _settled(self._writing)
        await _settled(self._start_writer())

    async def search(
        self,
        since: float | None = None,
        until: float | None = None,
        type: str | None = None,
        limit: int = 1000,
    ) -> list[AuditEvent]:
        """Search stored events (after writing the queue, so recent events show)."""
        await self.flush()
        return await self._backend.search_audit(since=since, until=until, type=type,
                                                limit=limit)

    # -- writing ----------------------------------------------------------------

    def _tick(self) -> None:
        if self._writing is None and (self._queue or self._failed or self._dropped):
            self._start_writer()

    def _start_writer(self) -> Deferred:
        """Run one drain; at most one is in flight so batches stay in order."""
        d = Deferred.fromCoroutine(self._drain())
        if not d.called:
            self._writing = d
            d.addBoth(self._writer_done)
        return d

    def _writer_done(self, result: object) -> object:
        self._writing = None
        return result

    async def _drain(self) -> None:
        try:
            if self._dropped:
                self._log.warn("audit queue full: dropped {count} oldest events",
                               count=self._dropped)
                self._dropped = 0
            if self._failed is not None:
                batch, attempts = self._failed
                self._failed = None
                await self._store(batch, attempts)
            while self._queue and self._failed is None:
                batch = [self._queue.popleft()
                         for _ in range(min(self._batch_size, len(self._queue)))]
                await self._mirror(batch)
                await self._store(batch, 0)
        except Exception:
            self._log.failure("audit writer failed")

    async def _store(self, batch: list[AuditEvent], attempts: int) -> None:
        try:
            await self._backend.append_audit(batch)
        except Exception as err:
            attempts += 1
            if attempts >= MAX_ATTEMPTS:
                self._log.error(
                    "audit backend refused {count} events {attempts} times; dropped: {error}",
                    count=len(batch), attempts=attempts, error=str(err),
                )
            else:
                self._log.warn(
                    "audit backend write of {count} events failed (will retry): {error}",
                    count=len(batch), error=str(err),
                )
                self._failed = (batch, attempts)

    async def _mirror(self, batch: list[AuditEvent]) -> None:
        if self._json_file is None:
            return
        lines = [
            json.dumps(attrs.asdict(e), sort_keys=True, separators=(",", ":")) + "\n"
            for e in batch
        ]
        try:
            await deferToThread(_append_lines, self._json_file, lines)
        except Exception as err:
            self._log.error("audit mirror {path} not written: {error}",
                            path=self._json_file, error=str(err))
