"""The audit log: every security-relevant act, durable before the response that reports it.

``emit`` chains the event (audit/chain.py), appends it to the local journal
(audit/journal.py: one ``os.write``, in the page cache before the response's bytes leave:
``proxy/app_connection.py`` emits before it writes the bytes that complete a response,
which leave at once) and queues it. A background loop on the injected clock writes the
queue in batches to the backend, trims the journal behind it and fsyncs the journal on a
worker thread. Nothing is dropped: a batch the backend refuses is retried, in order, every
interval; events the journal cannot take (full, ENOSPC) stay queued and are retried into
the journal. When neither the backend nor the journal can take more, ``writable`` is False
and new requests are refused or held (``on_failure``, see ``admitted``).
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
from collections import deque
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThread
from twisted.logger import Logger

from apptunnel.audit.chain import GENESIS, link, link_parts
from apptunnel.audit.journal import Journal, JournalFull, Recovered
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

BATCH_SIZE = 500
FLUSH_INTERVAL = 1.0
ON_FAILURE = ("refuse", "block")
# What a refused request or sign-in is told (audit.on_failure).
UNAVAILABLE = ("This proxy cannot record requests right now (its audit log is not "
               "writable), so it does not serve them. Try again shortly.")
BLOCK_TIMEOUT = 10.0


def code_for(type: str, outcome: str) -> str:
    success, other = CODES.get(type, UNKNOWN_CODES)
    return success if outcome == "success" else other


# An event id must be unique (the store keeps the first event of an id and drops a
# replay), not secret: admins see ids, and nothing takes one as proof of anything. A random
# 64-bit prefix per process and a counter give that for ~0.2 us instead of uuid4's ~2 us.
_ID_PREFIX = secrets.token_hex(8)
_ID_COUNT = itertools.count(1)


def new_event_id() -> str:
    """32 hex digits like uuid4().hex: this process's random prefix, then a counter."""
    return f"{_ID_PREFIX}{next(_ID_COUNT):016x}"


# The mirror's lines are the record's fields, not the store's cached encoding of them.
_RECORD = attrs.filters.exclude(attrs.fields(AuditEvent).fields_json)

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
    """Chain and journal events now, store them soon; ``flush()`` tries to store everything
    queued so far. Without a journal (the CLI, unit tests) events wait in memory only.

    A proxy chains its events here (``proxy_id``: it is the chain's only writer). The admin
    CLI runs are many short-lived writers of one chain (``shared_chain``, CLI_CHAIN): their
    events are chained by the backend as they are stored, the head read and extended in
    one transaction (``append_audit_chained``), so two runs at once cannot fork it."""

    _log = Logger()

    def __init__(
        self,
        backend: Backend,
        clock: IReactorTime,
        json_file: str | None = None,
        *,
        proxy_id: str = "",
        shared_chain: str = "",
        journal: Journal | None = None,
        on_failure: str = "refuse",
        block_timeout: float = BLOCK_TIMEOUT,
        batch_size: int = BATCH_SIZE,
        interval: float = FLUSH_INTERVAL,
        run_in_thread: Callable[..., Deferred] = deferToThread,
    ) -> None:
        self._backend = backend
        self._clock = clock
        self._json_file = json_file
        self._proxy_id = proxy_id
        self._shared_chain = shared_chain
        self._journal = journal
        self._on_failure = on_failure
        self._block_timeout = block_timeout
        self._batch_size = batch_size
        self._interval = interval
        self._run_in_thread = run_in_thread
        self._queue: deque[AuditEvent] = deque()
        self._unjournaled: deque[AuditEvent] = deque()   # queued, not in the journal yet
        self._seq = 0
        self._prev = GENESIS
        # With a proxy id, events emitted before recover() wait here to be chained after
        # the stored head (a chain numbered from 1 again would look reordered).
        # (Their first eight fields, as emit makes them: see link_parts.)
        self._early: list[tuple] | None = [] if proxy_id else None
        self._backend_ok = True
        self._journal_ok = True
        self._journal_down = False      # an error line was logged and no write worked since
        self._refusing = False
        self._waiters: list[Deferred] = []
        self._writing: Deferred | None = None
        self._syncing: Deferred | None = None
        self._loop: LoopingCall | None = None

    # -- read-only state (metrics, /readyz) ---------------------------------------

    @property
    def pending(self) -> int:
        """Events emitted and not yet committed to the backend."""
        return len(self._queue) + len(self._early or ())

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def journal_size(self) -> int:
        """Bytes in the local journal (0 without one)."""
        return self._journal.size if self._journal is not None else 0

    @property
    def writable(self) -> bool:
        """Can a new event be made durable: the backend takes writes, or the journal does."""
        if self._backend_ok or self._journal is None:
            return True
        return self._journal_ok and self._journal.has_room

    # -- start, recovery, stop ------------------------------------------------------

    async def recover(self, recovered: Recovered | None = None) -> None:
        """Before anything is emitted: continue this proxy's chain after the highest of
        the backend's and the journal's last event, and queue the journal's events (those
        already committed are skipped by the backend: ids are unique)."""
        events = recovered.events if recovered is not None else []
        if recovered is not None and recovered.torn:
            self._log.warn("audit journal: ignored a torn last line (a write cut by a crash)")
        if recovered is not None and recovered.bad_lines:
            self._log.error("audit journal: skipped {count} unreadable lines",
                            count=recovered.bad_lines)
        head = None
        if self._proxy_id:
            head = await self._backend.audit_chain_head(self._proxy_id)
        for e in [head, *events]:
            if e is not None and e.proxy_id == self._proxy_id and e.seq > self._seq:
                self._seq, self._prev = e.seq, e.digest
        self._queue.extendleft(reversed(events))
        if events:
            self._log.info("audit journal: replaying {count} events", count=len(events))
        early, self._early = self._early or [], None
        for event in early:
            self._chain(event)

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
        """Stop the loop, write whatever is still queued, close the journal."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        await self.flush()
        if self._syncing is not None:
            await _settled(self._syncing)
        if self._journal is not None:
            self._journal.close()
        if self._queue:
            self._log.warn("audit: {count} events not in the backend at stop; the journal "
                           "replays them at the next start", count=len(self._queue))
        for waiter in self._waiters[:]:
            waiter.callback(False)

    async def flush(self) -> None:
        """Try once to write everything queued before this call."""
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

    # -- emitting ---------------------------------------------------------------------

    def emit(
        self,
        type: str,
        *,
        actor: str = "",
        target: str = "",
        outcome: str = "success",
        **fields: Any,
    ) -> None:
        """Chain, journal and queue one event. Never blocks on the network, never raises."""
        try:
            # AuditEvent's first eight fields; the record is made once, chained (link_parts).
            parts = (new_event_id(),
                     float(self._clock.seconds()),   # as stored: REAL (the digest covers it)
                     type, code_for(type, outcome), str(actor), str(target), str(outcome),
                     _plain(fields))
        except Exception:
            self._log.failure("audit event {type!r} could not be made", type=type)
            return
        if self._early is not None:      # the chain's head is not known yet (recover)
            self._early.append(parts)
            return
        self._chain(parts)

    def _chain(self, parts: tuple) -> None:
        if self._proxy_id:
            event, line = link_parts(parts, self._proxy_id, self._seq + 1, self._prev)
            self._seq, self._prev = event.seq, event.digest
        else:
            event, line = AuditEvent(*parts), b""
        self._queue.append(event)
        self._journal_one(event, line)

    def _journal_one(self, event: AuditEvent, line: bytes) -> None:
        if self._journal is None or not line:
            return
        if self._journal_ok:
            try:
                self._journal.append_line(line, event.seq)
            except (JournalFull, OSError) as err:
                self._journal_failed(err)
            else:
                self._journal_works()
                return
        self._unjournaled.append(event)

    def _journal_failed(self, err: Exception) -> None:
        """One error line per outage of the journal (not one per event or retry)."""
        self._journal_ok = False
        if not self._journal_down:
            self._journal_down = True
            self._log.error("audit journal cannot take more ({error}): events wait in "
                            "memory for the backend", error=str(err))

    def _journal_works(self) -> None:
        if self._journal_down:
            self._journal_down = False
            self._log.info("audit journal takes writes again")

    def _retry_journal(self) -> None:
        """Put events the journal refused into it, in order, once it takes writes again."""
        if self._journal is None or self._journal_ok:
            return
        while self._unjournaled:
            try:
                self._journal.append(self._unjournaled[0])
            except (JournalFull, OSError):
                return
            self._unjournaled.popleft()
        self._journal_ok = True
        self._journal_works()

    # -- admission (audit.on_failure) ---------------------------------------------------

    def admitted(self) -> Deferred:
        """Fires True when a new session/request may start: at once while ``writable``;
        otherwise False at once (``refuse``) or when writable again, False after
        ``block_timeout`` (``block``). Logs one line each time refusing starts."""
        if self.writable:
            return succeed(True)
        if not self._refusing:
            self._refusing = True
            self._log.error("audit is not writable (backend failing, journal full): "
                            "{policy} new sessions and requests", policy=(
                                "refusing" if self._on_failure == "refuse" else "holding"))
        if self._on_failure == "refuse":
            return succeed(False)
        waiter: Deferred = Deferred()
        self._waiters.append(waiter)
        timer = self._clock.callLater(self._block_timeout, self._give_up, waiter)

        def settled(result: object) -> object:
            if timer.active():
                timer.cancel()
            return result

        waiter.addBoth(settled)
        return waiter

    def _give_up(self, waiter: Deferred) -> None:
        if waiter in self._waiters:
            self._waiters.remove(waiter)
            waiter.callback(False)

    def _check_writable(self) -> None:
        if not self.writable:
            return
        if self._refusing:
            self._refusing = False
            self._log.info("audit is writable again: admitting new sessions and requests")
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(True)

    # -- writing ------------------------------------------------------------------------

    def _tick(self) -> None:
        self._retry_journal()
        if self._writing is None and self._queue:
            self._start_writer()
        self._start_sync()
        self._check_writable()

    def _start_sync(self) -> None:
        """fsync what was appended since the last time, on a worker thread, one at a time."""
        if self._journal is None or self._syncing is not None:
            return
        fsync, close, directory = self._journal.sync_plan()
        if not fsync and not close and directory is None:
            return
        d = self._run_in_thread(Journal.run_sync, fsync, close, directory)
        self._syncing = d

        def failed(failure) -> None:
            self._log.error("audit journal fsync failed: {error}",
                            error=failure.getErrorMessage())

        def done(_: object) -> None:
            self._syncing = None

        d.addErrback(failed).addBoth(done)

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
            while self._queue:
                batch = [self._queue[i] for i in range(min(self._batch_size, len(self._queue)))]
                stored = await self._store(batch)
                if stored is None:
                    return
                for _ in batch:
                    self._queue.popleft()
                self._committed(batch)
                await self._mirror(stored)
        except Exception:
            self._log.failure("audit writer failed")
        finally:
            self._check_writable()

    async def _store(self, batch: list[AuditEvent]) -> list[AuditEvent] | None:
        """One attempt: the events as stored, or None (the batch stays at the head of the
        queue for the next attempt)."""
        try:
            if self._shared_chain:
                stored = await self._backend.append_audit_chained(
                    self._shared_chain, batch, link)
            else:
                await self._backend.append_audit(batch)
                stored = batch
        except Exception as err:
            if self._backend_ok:
                self._log.error("audit backend write of {count} events failed; retrying every "
                                "{interval}s, nothing is dropped: {error}",
                                count=len(batch), interval=self._interval, error=str(err))
            self._backend_ok = False
            return None
        if not self._backend_ok:
            self._log.info("audit backend takes writes again")
        self._backend_ok = True
        return stored

    def _committed(self, batch: list[AuditEvent]) -> None:
        if self._journal is None or not self._proxy_id:
            return
        ids = {e.id for e in batch}
        while self._unjournaled and self._unjournaled[0].id in ids:
            self._unjournaled.popleft()
        if not self._unjournaled and not self._journal_ok:
            self._journal_ok = True
        if self._queue:
            self._journal.committed(self._queue[0].seq - 1)
        else:
            self._journal.committed(batch[-1].seq)

    async def _mirror(self, batch: list[AuditEvent]) -> None:
        if self._json_file is None:
            return
        lines = [
            json.dumps(attrs.asdict(e, filter=_RECORD), sort_keys=True,
                       separators=(",", ":")) + "\n"
            for e in batch
        ]
        try:
            await deferToThread(_append_lines, self._json_file, lines)
        except Exception as err:
            self._log.error("audit mirror {path} not written: {error}",
                            path=self._json_file, error=str(err))
