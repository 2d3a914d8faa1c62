"""Sign-in throttling: how many password guesses a user name and a client address get.

Sans-IO: every method takes ``now``. An attempt is counted when it *starts* (before the
password hash runs), so a burst of parallel guesses is cut off at the limit instead of
all being hashed before the first failure is known; a successful or abandoned attempt is
taken back. Over a limit, an attempt is refused with the seconds until the oldest counted
attempt leaves the window, the same answer whether or not the user exists.

A success clears its user name's count, not its address's: otherwise an attacker holding
one valid account could sign in every few guesses to keep guessing other accounts from
the same address. A success does take back its own attempt, so honest users behind one
address (NAT) only spend the address's budget on their mistakes.

Memory is bounded: each key keeps at most its limit of timestamps, and at most
``max_tracked`` keys are kept (the least recently tried go first, which puts expired ones
first).
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque

from apptunnel.auth.errors import AuthError
from apptunnel.metrics import NO_METRICS, NoMetrics
from apptunnel.net import client_key

MAX_FAILURES_PER_USER = 5
MAX_FAILURES_PER_ADDRESS = 20
WINDOW = 300.0
MAX_TRACKED = 10_000
MAX_KEY_LENGTH = 256


class Throttled(AuthError):
    """Not now (429 by default): ``retry_after`` whole seconds until the next may be tried."""

    def __init__(self, retry_after: int, status: int = 429,
                 why: str = "too many sign-in attempts", reason: str = "throttled") -> None:
        super().__init__(status, f"{why}; try again in {retry_after} s")
        self.retry_after = retry_after
        self.reason = reason


class _Window:
    """Timestamps of the last ``limit`` attempts per key, for keys seen recently."""

    def __init__(self, limit: int, window: float, max_keys: int) -> None:
        self._limit = limit
        self._window = window
        self._max_keys = max_keys
        self._keys: OrderedDict[str, deque[float]] = OrderedDict()

    def wait(self, key: str, now: float) -> float:
        """Seconds until ``key`` may try again; 0 when it may now."""
        times = self._keys.get(key)
        if times is None:
            return 0.0
        while times and times[0] + self._window <= now:
            times.popleft()
        if len(times) < self._limit:
            return 0.0
        return times[0] + self._window - now

    def count(self, key: str, now: float) -> None:
        times = self._keys.get(key)
        if times is None:
            # Keys are kept in the order of their latest attempt, so the first ones are the
            # expired ones, then the least recently tried: the ones to forget.
            while len(self._keys) >= self._max_keys:
                self._keys.popitem(last=False)
            times = self._keys[key] = deque(maxlen=self._limit)
        self._keys.move_to_end(key)
        times.append(now)

    def take_back(self, key: str) -> None:
        """Forget the newest attempt of ``key`` (it succeeded or never ran)."""
        times = self._keys.get(key)
        if times:
            times.pop()

    def clear(self, key: str) -> None:
        self._keys.pop(key, None)

    def __len__(self) -> int:
        return len(self._keys)


class LoginThrottle:
    """Per user name and per client address limits on sign-in attempts within a window."""

    def __init__(self, max_per_user: int = MAX_FAILURES_PER_USER,
                 max_per_address: int = MAX_FAILURES_PER_ADDRESS, window: float = WINDOW,
                 max_tracked: int = MAX_TRACKED, metrics: NoMetrics = NO_METRICS) -> None:
        self._metrics = metrics
        self._users = _Window(max_per_user, window, max_tracked)
        self._addresses = _Window(max_per_address, window, max_tracked)

    def attempt(self, user: str, address: str, now: float) -> None:
        """Count an attempt that is about to check a password; Throttled if over a limit."""
        user_key, address_key = _user_key(user), client_key(address)
        wait = max(self._users.wait(user_key, now), self._addresses.wait(address_key, now))
        if wait > 0:
            self._metrics.refused("login_attempts")
            raise Throttled(max(1, math.ceil(wait)))
        self._users.count(user_key, now)
        self._addresses.count(address_key, now)

    def succeeded(self, user: str, address: str) -> None:
        """The password was right: the user starts afresh, the address gets its attempt back."""
        self._users.clear(_user_key(user))
        self._addresses.take_back(client_key(address))

    def abandoned(self, user: str, address: str) -> None:
        """The attempt never checked the password (the proxy was busy): take it back."""
        self._users.take_back(_user_key(user))
        self._addresses.take_back(client_key(address))

    def tracked(self) -> int:
        """How many keys are held (for tests of the memory bound)."""
        return len(self._users) + len(self._addresses)


def _user_key(user: str) -> str:
    """Names differing only in case share a count, so case tricks buy no extra guesses."""
    return user[:MAX_KEY_LENGTH].casefold() if isinstance(user, str) else ""
