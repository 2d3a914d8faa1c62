"""Sign-in throttling: the sans-IO throttle, the bounded hash queue, and the routes using them."""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred

from apptunnel.auth.passwords import HashQueue
from apptunnel.auth.throttle import LoginThrottle, Throttled
from tests.support.keys import new_key
from tests.support.web_env import header


def refused(throttle: LoginThrottle, user: str, address: str, now: float) -> int | None:
    """Retry-After seconds if the attempt is refused, None if it was counted."""
    try:
        throttle.attempt(user, address, now)
    except Throttled as err:
        assert err.status == 429
        return err.retry_after
    return None


# -- the throttle ------------------------------------------------------------------------


def test_five_failures_for_a_user_then_429_until_the_window_passes():
    """The sixth attempt on a name within 5 minutes is refused, with the seconds to wait."""
    t = LoginThrottle()
    for i in range(5):
        assert refused(t, "alice", f"10.0.0.{i}", now=100.0 + i) is None
    assert refused(t, "alice", "10.0.0.9", now=110.0) == 290
    assert refused(t, "alice", "10.0.0.9", now=399.5) == 1
    assert refused(t, "alice", "10.0.0.9", now=400.0) is None   # the first attempt left


def test_unknown_and_known_names_are_counted_alike():
    """The throttle knows nothing of which users exist: the same answer for every name."""
    t = LoginThrottle()
    for name in ("alice", "nobody"):
        for _ in range(5):
            refused(t, name, "10.0.0.1", now=0.0)
    assert refused(t, "alice", "10.0.0.2", 1.0) == refused(t, "nobody", "10.0.0.3", 1.0) == 299


def test_case_variants_share_a_count():
    """'Alice' and 'ALICE' buy no extra guesses at alice."""
    t = LoginThrottle()
    for name in ("alice", "Alice", "ALICE", "aLice", "alicE"):
        refused(t, name, "10.0.0.1", 0.0)
    assert refused(t, "alice", "10.0.0.2", 1.0)


def test_twenty_failures_from_one_address_block_every_name():
    """An address spraying many names is stopped after 20 attempts."""
    t = LoginThrottle()
    for i in range(20):
        assert refused(t, f"user{i}", "10.0.0.1", 0.0) is None
    assert refused(t, "someone-else", "10.0.0.1", 1.0) == 299
    assert refused(t, "someone-else", "10.0.0.2", 1.0) is None


def test_ipv6_neighbours_share_an_address_count():
    """Addresses of one /64 count as one client."""
    t = LoginThrottle(max_per_address=2)
    refused(t, "a", "2001:db8::1", 0.0)
    refused(t, "b", "2001:db8::2", 0.0)
    assert refused(t, "c", "2001:db8::3", 0.0)


def test_success_resets_the_user_and_returns_only_its_own_attempt():
    """A right password clears the name's count; the address keeps its earlier failures."""
    t = LoginThrottle(max_per_user=2, max_per_address=3)
    refused(t, "alice", "10.0.0.1", 0.0)           # failure
    refused(t, "bob", "10.0.0.1", 0.0)             # failure
    refused(t, "alice", "10.0.0.1", 0.0)
    t.succeeded("alice", "10.0.0.1")               # alice's name starts afresh
    assert refused(t, "alice", "10.0.0.1", 1.0) is None   # address: 2 failures + this one
    assert refused(t, "carol", "10.0.0.1", 1.0) == 299    # address budget spent by failures


def test_abandoned_attempt_costs_nothing():
    """An attempt that was never checked (the proxy was busy) is taken back."""
    t = LoginThrottle(max_per_user=1)
    refused(t, "alice", "10.0.0.1", 0.0)
    t.abandoned("alice", "10.0.0.1")
    assert refused(t, "alice", "10.0.0.1", 0.0) is None


def test_memory_is_bounded_by_max_tracked():
    """A spray of distinct names and addresses keeps at most max_tracked keys of each."""
    t = LoginThrottle(max_tracked=100)
    for i in range(5000):
        refused(t, f"user{i}", f"10.{i // 256 % 256}.{i % 256}.1", float(i))
    assert t.tracked() <= 2 * 101


def test_expired_keys_are_evicted_before_live_ones():
    """At the key cap, keys whose window has passed go before a user under attack."""
    t = LoginThrottle(max_per_user=2, max_tracked=3, window=10.0)
    refused(t, "old1", "10.0.0.1", 0.0)
    refused(t, "old2", "10.0.0.2", 0.0)
    refused(t, "victim", "10.0.0.3", 20.0)
    refused(t, "victim", "10.0.0.4", 20.0)
    for i in range(2):
        refused(t, f"new{i}", f"10.0.1.{i}", 21.0)   # old1, old2 make room, not the victim
    assert refused(t, "victim", "10.0.0.5", 22.0) == 8


# -- the hash queue -------------------------------------------------------------------------


class FakeThreads:
    """run_in_thread whose work the test finishes: each call is a Deferred we fire."""

    def __init__(self):
        self.calls: list[tuple[Deferred, tuple]] = []

    def __call__(self, f, *args):
        d = Deferred()
        self.calls.append((d, args))
        return d

    def finish(self, index=0, result=False):
        d, args = self.calls.pop(index)
        d.callback(result)
        return args


def test_hash_queue_runs_a_few_at_once_and_refuses_beyond_the_queue():
    """Two run, two wait, the fifth is refused at once with 503 and costs no hash."""
    threads = FakeThreads()
    q = HashQueue(concurrent=2, queued=2, run_in_thread=threads)
    results = [q.verify("10.0.0.1", None, f"pw{i}") for i in range(5)]
    assert len(threads.calls) == 2
    failure = []
    results[4].addErrback(failure.append)
    assert failure and isinstance(failure[0].value, Throttled) and failure[0].value.status == 503
    got = []
    results[0].addCallback(got.append)
    threads.finish(result=True)
    assert got == [True] and len(threads.calls) == 2
    threads.finish()
    threads.finish()
    threads.finish()
    assert threads.calls == []


def test_hash_queue_is_fair_between_addresses():
    """A burst from one address does not push another address's check to the back."""
    threads = FakeThreads()
    q = HashQueue(concurrent=1, queued=10, run_in_thread=threads)
    q.verify("attacker", None, "guess0")
    for i in range(1, 6):
        q.verify("attacker", None, f"guess{i}")
    q.verify("alice-ip", None, "alice-pw")
    threads.finish()
    assert threads.calls[0][1] == (None, "alice-pw")
    threads.finish()
    assert threads.calls[0][1] == (None, "guess1")


# -- the routes -------------------------------------------------------------------------------


async def _form(env, username, password):
    return await env.call("POST", "/web/login",
                          data={"username": username, "password": password, "next": "/"})


@pytest_twisted.ensureDeferred
async def test_form_answers_429_after_five_failures_even_for_the_right_password(web_env):
    """Five wrong passwords, then 429 with Retry-After, also for the right password."""
    for _ in range(5):
        response, _ = await _form(web_env, "alice", "wrong")
        assert response.code == 401
    response, body = await _form(web_env, "alice", "alice-pw")
    assert response.code == 429
    assert header(response, "retry-after") == "300"
    assert b"too many sign-in attempts; try again in 300 s" in body
    assert b'name="username"' in body          # still the login form
    assert response.headers.getRawHeaders(b"set-cookie") is None
    web_env.clock.advance(301)
    response, _ = await _form(web_env, "alice", "alice-pw")
    assert response.code == 303


@pytest_twisted.ensureDeferred
async def test_json_login_and_certs_share_the_throttle_and_unknown_users_look_alike(web_env):
    """The JSON API (/v1/sessions, /v1/certs) is throttled the same way, known user or not."""
    for name in ("alice", "mallory"):
        for _ in range(5):
            response, _ = await web_env.call("POST", "/v1/sessions",
                                             json={"username": name, "password": "wrong"})
            assert response.code == 401
    answers = []
    for name in ("alice", "mallory"):
        response, body = await web_env.call("POST", "/v1/sessions",
                                            json={"username": name, "password": "wrong"})
        answers.append((response.code, header(response, "retry-after"), json.loads(body)))
    assert answers[0] == answers[1]
    assert answers[0][0] == 429 and answers[0][1] == "300"
    assert answers[0][2] == {"error": "too many sign-in attempts; try again in 300 s"}
    response, body = await web_env.call("POST", "/v1/certs", json={
        "username": "alice", "password": "alice-pw", "public_key": new_key()[1]})
    assert response.code == 429 and header(response, "retry-after") == "300"
    assert b"cert" not in body


@pytest_twisted.ensureDeferred
async def test_throttled_attempts_are_audited_with_a_reason(web_env):
    """Failures are audited as login failures, with why: bad credentials or throttled."""
    for _ in range(6):
        await _form(web_env, "bob", "wrong")
    events = await web_env.events("user.login")
    reasons = [e.fields.get("reason") for e in events]
    assert reasons.count("invalid credentials") == 5 and reasons.count("throttled") == 1
    assert all(e.outcome == "failure" for e in events)


@pytest.mark.parametrize("status", [429, 503])
def test_throttled_carries_status_and_message(status):
    """Both refusals say how long to wait, in the message and in retry_after."""
    err = Throttled(3, status)
    assert err.status == status and err.retry_after == 3 and err.message.endswith("in 3 s")


def test_full_queue_makes_room_for_an_address_with_nothing_waiting():
    """When one address fills the queue, a newcomer from elsewhere takes its newest place."""
    threads = FakeThreads()
    q = HashQueue(concurrent=1, queued=3, run_in_thread=threads)
    flood = [q.verify("attacker", None, f"guess{i}") for i in range(4)]
    mine = q.verify("alice-ip", None, "alice-pw")
    bounced = []
    flood[3].addErrback(bounced.append)
    assert bounced and bounced[0].value.status == 503
    threads.finish()
    assert threads.calls[0][1] == (None, "alice-pw")
    got = []
    mine.addCallback(got.append)
    threads.finish(result=True)
    assert got == [True]
    threads.finish()        # guess1 runs; guess2 waits
    # An address that already has its share waiting gets no more room.
    more = [q.verify("attacker", None, "x") for _ in range(4)]   # 3 fill the queue
    refused_now = []
    more[-1].addErrback(refused_now.append)
    assert refused_now and refused_now[0].value.status == 503


def test_newcomer_goes_before_a_burst_that_has_been_served():
    """Several flooding addresses: a newcomer's check is the next to run, not one per address."""
    threads = FakeThreads()
    q = HashQueue(concurrent=1, queued=30, run_in_thread=threads)
    q.verify("a", None, "first")
    for i in range(5):
        for who in ("a", "b", "c"):
            q.verify(who, None, f"{who}{i}")
    threads.finish()
    threads.finish()
    threads.finish()
    threads.finish()      # a, b, c have each had a turn
    q.verify("alice-ip", None, "alice-pw")
    threads.finish()
    assert threads.calls[0][1] == (None, "alice-pw")
