"""Poll: storage read now and every interval on a Clock; a failed read never ends it."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from apptunnel.polling import Poll


def test_refreshes_now_then_every_interval_until_stopped():
    clock, calls = Clock(), []

    async def refresh():
        calls.append(clock.seconds())

    poll = Poll(refresh, clock, 2.0, "test watcher")
    poll.start()
    poll.start()                      # a second start is harmless
    clock.pump([1, 1, 2])
    assert calls == [0.0, 2.0, 4.0]
    poll.stop()
    poll.stop()
    clock.pump([2, 2])
    assert calls == [0.0, 2.0, 4.0]


def test_a_failing_refresh_is_logged_and_retried_on_the_next_tick():
    clock, calls, logged = Clock(), [], []

    async def refresh():
        calls.append(clock.seconds())
        if len(calls) == 1:
            raise RuntimeError("storage is down")

    globalLogPublisher.addObserver(logged.append)
    try:
        Poll(refresh, clock, 1.0, "test watcher").start()
        clock.pump([1, 1])
    finally:
        globalLogPublisher.removeObserver(logged.append)
    assert calls == [0.0, 1.0, 2.0]
    assert [e.get("what") for e in logged if e.get("log_failure")] == ["test watcher"]


def test_a_storage_outage_is_one_line_when_it_starts_and_one_when_it_ends():
    """Storage unreachable (StorageUnavailable) for three ticks: one warning, no traceback,
    then one line when a refresh works again; the loop never stops."""
    from apptunnel.backend.base import StorageUnavailable

    clock, calls, logged = Clock(), [], []

    async def refresh():
        calls.append(clock.seconds())
        if len(calls) <= 3:
            raise StorageUnavailable("postgres host=db: connection refused")

    globalLogPublisher.addObserver(logged.append)
    try:
        Poll(refresh, clock, 1.0, "test watcher").start()
        clock.pump([1, 1, 1, 1])
    finally:
        globalLogPublisher.removeObserver(logged.append)
    assert calls == [0.0, 1.0, 2.0, 3.0, 4.0]
    ours = [e for e in logged if e.get("what") == "test watcher"]
    assert [e for e in ours if e.get("log_failure")] == []
    assert ["unavailable" in e["log_format"] for e in ours] == [True, False]
    assert "answers again" in ours[1]["log_format"]
