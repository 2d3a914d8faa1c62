"""The dynamic label runner on the real reactor with real processes (agent/labels.py).

Commands are real executables (cat, false, sleep); waits are bounded by tests/support/waiting.
"""

from __future__ import annotations

import pytest_twisted
from twisted.internet import reactor, task

from apptunnel.agent.labels import ERROR_VALUE, DynamicLabels
from apptunnel.config import AppConfig, DynamicLabel
from tests.support.waiting import until


def app(name, **commands):
    """An app whose dynamic labels run ``commands`` (key -> (argv, period, timeout))."""
    labels = tuple(DynamicLabel(key=k, command=tuple(argv), period=period, timeout=timeout)
                   for k, (argv, period, timeout) in commands.items())
    return AppConfig(name=name, uri="http://127.0.0.1:1", labels={"env": "dev"},
                     public_addr=None, dynamic_labels=labels)


@pytest_twisted.ensureDeferred
async def test_values_come_from_the_command_and_follow_it(tmp_path):
    """The app has no labels until each dynamic one ran once; then stdout (stripped) is
    the value, a change is seen within a period and reported once."""
    source = tmp_path / "commit"
    source.write_text("abc123\n")
    changes = []
    runner = DynamicLabels(reactor, lambda: changes.append(1))
    web = app("web", commit=(["cat", str(source)], 0.2, 2.0))
    runner.configure([web])
    assert runner.labels(web) is None
    runner.start()
    try:
        await until(lambda: runner.labels(web), "the first value")
        assert runner.labels(web) == {"env": "dev", "commit": "abc123"}
        assert len(changes) == 1
        source.write_text("def456\n")
        await until(lambda: runner.labels(web)["commit"] == "def456", "the new value")
        assert len(changes) == 2
    finally:
        runner.stop()


@pytest_twisted.ensureDeferred
async def test_failures_and_timeouts_give_the_error_value(tmp_path):
    """Non-zero exit, a command that does not exist and one killed at its timeout all
    give "error"; nothing is raised into the reactor."""
    runner = DynamicLabels(reactor, lambda: None)
    web = app("web", failing=(["false"], 5.0, 2.0),
              missing=([str(tmp_path / "no-such-command")], 5.0, 2.0),
              slow=(["sleep", "30"], 5.0, 0.3))
    runner.configure([web])
    runner.start()
    started = reactor.seconds()
    try:
        labels = await until(lambda: runner.labels(web), "every label's first value")
        assert labels == {"env": "dev", "failing": ERROR_VALUE, "missing": ERROR_VALUE,
                          "slow": ERROR_VALUE}
        assert reactor.seconds() - started < 3.0     # the sleep was killed, not waited for
    finally:
        runner.stop()


@pytest_twisted.ensureDeferred
async def test_a_removed_app_stops_its_labels(tmp_path):
    """configure() without the app: its value is gone and its command no longer runs."""
    count = tmp_path / "runs"
    script = tmp_path / "count.sh"
    script.write_text(f"#!/bin/sh\necho x >> {count}\necho ok\n")
    script.chmod(0o755)
    runner = DynamicLabels(reactor, lambda: None)
    web = app("web", runs=([str(script)], 0.2, 2.0))
    runner.configure([web])
    runner.start()
    try:
        await until(lambda: runner.labels(web), "the first value")
        runner.configure([])
        assert runner.labels(web) is None
        seen = count.read_text().count("x")
        await task.deferLater(reactor, 0.6, lambda: None)   # three periods
        assert count.read_text().count("x") <= seen + 1   # at most a run already started
    finally:
        runner.stop()
