"""Password hashing with argon2id.

Both functions are CPU-heavy on purpose: callers on the reactor run them in a thread, and
sign-in runs its checks through a ``HashQueue`` so only a few run at once.
verify_password costs the same for unknown users (it checks a dummy hash), so response
time does not reveal which usernames exist.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Callable

from argon2 import PasswordHasher, Type
from twisted.internet.defer import Deferred, fail
from twisted.python.failure import Failure
from twisted.internet.threads import deferToThread

from apptunnel.auth.throttle import Throttled

MAX_PASSWORD_LENGTH = 1024
MIN_PASSWORD_LENGTH = 8          # for passwords people choose (CLI, invite and reset links)

_hasher = PasswordHasher(type=Type.ID)
_dummy_hash: str | None = None
_dummy_lock = threading.Lock()


def hash_password(pw: str) -> str:
    """Return an argon2id PHC string; ValueError for an over-long password."""
    if len(pw) > MAX_PASSWORD_LENGTH:
        raise ValueError(f"password longer than {MAX_PASSWORD_LENGTH} characters")
    return _hasher.hash(pw)


def _dummy() -> str:
    global _dummy_hash
    with _dummy_lock:
        if _dummy_hash is None:
            _dummy_hash = _hasher.hash("apptunnel dummy password")
        return _dummy_hash


def verify_password(stored: str | None, pw: str) -> bool:
    """True only when pw matches stored; never raises, and None still costs one check."""
    try:
        candidate = pw if isinstance(pw, str) and len(pw) <= MAX_PASSWORD_LENGTH else ""
        ok = _hasher.verify(stored if stored is not None else _dummy(), candidate)
        return bool(ok) and stored is not None and candidate == pw
    except Exception:
        return False


class HashQueue:
    """Runs password checks a few at a time, with a bounded, fair queue in front.

    Each argon2 check holds its memory cost (64 MiB by default) while it runs, so running
    every request's check at once lets a flood of guesses take the proxy's memory. At most
    ``concurrent`` run at once; at most ``queued`` wait, grouped by ``key`` (the client
    address), and the next check comes from the address that has started the fewest
    while it had checks running or waiting (round-robin among equals), so a newcomer goes before a
    burst that has been waiting, and a flood cannot delay a real user by more than a
    check or two. When the
    queue is full, the address with the most waiting gives up its newest place to an
    address with fewer; failing that, the check fails at once with ``Throttled`` (503),
    costing nothing.
    ``run_in_thread(f, *args)`` returns a Deferred (``deferToThread`` when not given).
    """

    def __init__(self, concurrent: int = 2, queued: int = 32,
                 run_in_thread: Callable[..., Deferred] | None = None) -> None:
        self._concurrent = concurrent
        self._queued = queued
        self._run = run_in_thread or deferToThread
        self._running = 0
        self._waiting: OrderedDict[str, deque[tuple[Deferred, tuple]]] = OrderedDict()
        self._waiting_count = 0
        # Per key with checks running or waiting: [running, started]. Bounded by
        # concurrent + queued keys; a key that goes quiet is forgotten.
        self._keys: dict[str, list[int]] = {}

    def verify(self, key: str, stored: str | None, pw: str) -> Deferred:
        """A Deferred firing with verify_password(stored, pw), or failing with Throttled."""
        return self.run(key, verify_password, stored, pw)

    def hash(self, key: str, pw: str) -> Deferred:
        """A Deferred firing with hash_password(pw) (a password set through a link), in
        the same queue, so setting passwords cannot take more memory than checking them."""
        return self.run(key, hash_password, pw)

    def run(self, key: str, fn: Callable, *args) -> Deferred:
        """``fn(*args)`` in a thread under the same bounds (an LDAP bind is a check too).

        Each caller gets a fresh Deferred it may cancel (a deadline): a call still waiting
        is dropped from the queue and never runs; a running one finishes in its thread and
        keeps its place in ``concurrent`` until it does, so a hung peer cannot make more
        threads pile up than the bound allows.
        """
        if self._running < self._concurrent:
            return self._start(key, (fn, args))
        if self._waiting_count >= self._queued and not self._make_room(key):
            return fail(_busy())
        d: Deferred = Deferred(lambda cancelled: self._forget(key, cancelled))
        self._waiting.setdefault(key, deque()).append((d, (fn, args)))
        self._keys.setdefault(key, [0, 0])
        self._waiting_count += 1
        return d

    def _forget(self, key: str, waiter: Deferred) -> None:
        """A waiting caller gave up: take its place out of the queue."""
        queue = self._waiting.get(key)
        if not queue:
            return
        for entry in queue:
            if entry[0] is waiter:
                queue.remove(entry)
                self._waiting_count -= 1
                break
        if not queue:
            del self._waiting[key]
            counts = self._keys.get(key)
            if counts is not None and not counts[0]:
                del self._keys[key]

    def _make_room(self, key: str) -> bool:
        """Full: turn away the newest waiter of the address with the most waiting, if it
        has more than ``key`` would after queueing; so a flood cannot crowd a newcomer out."""
        mine = len(self._waiting.get(key, ()))
        biggest = max(self._waiting, key=lambda k: len(self._waiting[k]))
        if len(self._waiting[biggest]) <= mine + 1:
            return False
        waiter, _ = self._waiting[biggest].pop()
        self._waiting_count -= 1
        waiter.errback(_busy())
        return True

    def _start(self, key: str, work: tuple) -> Deferred:
        self._running += 1
        counts = self._keys.setdefault(key, [0, 0])
        counts[0] += 1
        counts[1] += 1
        fn, args = work
        running = self._run(fn, *args)
        running.addBoth(self._done, key)
        result: Deferred = Deferred()   # the caller's: cancelling it leaves `running` be

        def answer(outcome) -> None:
            if result.called:        # cancelled: nobody waits for this outcome any more
                return
            if isinstance(outcome, Failure):
                result.errback(outcome)
            else:
                result.callback(outcome)
        running.addBoth(answer)
        return result

    def _done(self, result, key: str):
        self._running -= 1
        counts = self._keys[key]
        counts[0] -= 1
        if not counts[0] and key not in self._waiting:
            del self._keys[key]
        if self._waiting:
            # The address that has started the fewest checks lately goes next.
            nxt = min(self._waiting, key=lambda k: self._keys[k][1])
            queue = self._waiting[nxt]
            waiter, work = queue.popleft()
            self._waiting_count -= 1
            if queue:
                self._waiting.move_to_end(nxt)   # round-robin among equals
            else:
                del self._waiting[nxt]
            self._start(nxt, work).chainDeferred(waiter)
        return result


def _busy() -> Throttled:
    return Throttled(1, 503, "sign-in is busy", reason="busy")
