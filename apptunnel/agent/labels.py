"""Dynamic labels: an app label whose value is the output of a command the agent runs.

Each ``dynamic_labels`` entry (``config.DynamicLabel``) runs its argument vector (no
shell) through the reactor's process support every ``period`` seconds, one run at a
time; a run that outlives its ``timeout`` is killed. The value is what the command
printed on stdout, as `label_value` cleans it (printable text, stripped, at most
``MAX_VALUE`` characters). A run that fails (cannot start, exits non-zero, is killed)
gives the visible value ``ERROR_VALUE``, as Teleport does, so a role can match it and an
operator sees it in ``apps ls``; an app is not announced before each of its dynamic
labels has a first value, so a role never decides on a label that is not there yet.

`DynamicLabels` holds the values and calls ``on_change()`` when one changes; the agent
then announces its apps again. Nothing here blocks: output is read as it arrives, at
most ``MAX_OUTPUT`` bytes are kept.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from twisted.internet import error
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from apptunnel.config import AppConfig, DynamicLabel

__all__ = ["ERROR_VALUE", "DynamicLabels", "label_value"]

ERROR_VALUE = "error"
MAX_VALUE = 63
MAX_OUTPUT = 4096

log = Logger()


def label_value(output: bytes) -> str:
    """The label value of a command's stdout: first line, printable, stripped, capped."""
    text = output[:MAX_OUTPUT].decode("utf-8", "replace").strip()
    text = text.splitlines()[0].strip() if text else ""
    return "".join(c for c in text if c.isprintable())[:MAX_VALUE]


class _Run(ProcessProtocol):
    """One run of a command: keeps stdout (bounded), drops stderr, reports the value."""

    def __init__(self, done: Callable[[str], None]) -> None:
        self._out: list[bytes] = []
        self._size = 0
        self._done = done
        self.timer = None

    def connectionMade(self) -> None:
        self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        if self._size < MAX_OUTPUT:
            self._out.append(data[:MAX_OUTPUT - self._size])
            self._size += len(self._out[-1])

    def errReceived(self, data: bytes) -> None:
        pass

    def kill(self) -> None:
        try:
            self.transport.signalProcess("KILL")
        except error.ProcessExitedAlready:
            pass

    def processEnded(self, reason: Failure) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        ok = reason.check(error.ProcessDone) is not None
        self._done(label_value(b"".join(self._out)) if ok else ERROR_VALUE)


class DynamicLabels:
    """The current values of every app's dynamic labels, refreshed on their periods."""

    def __init__(self, reactor, on_change: Callable[[], None]) -> None:
        self._reactor = reactor
        self._on_change = on_change
        self._labels: dict[tuple[str, str], DynamicLabel] = {}
        self._values: dict[tuple[str, str], str] = {}
        self._timers: dict[tuple[str, str], object] = {}
        self._running: dict[tuple[str, str], _Run] = {}
        self._started = self._stopped = False

    def start(self) -> None:
        """Run every configured label now, then on its period."""
        self._started = True
        for key in list(self._labels):
            if key not in self._running and key not in self._timers:
                self._start(key)

    def configure(self, apps: list[AppConfig]) -> None:
        """Run the dynamic labels of ``apps`` from now on; an unchanged label keeps its
        value and schedule, a removed one stops (its command is killed if running)."""
        wanted = {(app.name, label.key): label for app in apps for label in app.dynamic_labels}
        for key in [k for k in self._labels if self._labels[k] != wanted.get(k)]:
            self._forget(key)
        for key, label in wanted.items():
            if key not in self._labels:
                self._labels[key] = label
                if self._started:
                    self._start(key)

    def labels(self, app: AppConfig) -> dict[str, str] | None:
        """``app``'s labels with the dynamic values merged in; None until each has one."""
        labels = dict(app.labels)
        for label in app.dynamic_labels:
            value = self._values.get((app.name, label.key))
            if value is None:
                return None
            labels[label.key] = value
        return labels

    def stop(self) -> None:
        self._stopped = True
        for key in list(self._labels):
            self._forget(key)

    def _forget(self, key: tuple[str, str]) -> None:
        self._labels.pop(key, None)
        self._values.pop(key, None)
        timer = self._timers.pop(key, None)
        if timer is not None and timer.active():
            timer.cancel()
        run = self._running.pop(key, None)
        if run is not None:
            run.kill()

    def _start(self, key: tuple[str, str]) -> None:
        self._timers.pop(key, None)
        label = self._labels.get(key)
        if label is None or self._stopped or not self._started:
            return
        run = _Run(lambda value: self._finished(key, run, value))
        self._running[key] = run
        try:
            self._reactor.spawnProcess(run, label.command[0], list(label.command),
                                       env=dict(os.environ), childFDs={0: "w", 1: "r", 2: "r"})
        except (OSError, ValueError, TypeError) as err:
            log.warn("dynamic label {app}.{key}: cannot run {cmd}: {error}", app=key[0],
                     key=key[1], cmd=label.command[0], error=str(err))
            self._finished(key, run, ERROR_VALUE)
            return
        run.timer = self._reactor.callLater(label.timeout, run.kill)

    def _finished(self, key: tuple[str, str], run: _Run, value: str) -> None:
        if self._running.get(key) is not run:
            return   # forgotten (removed or reconfigured) meanwhile
        del self._running[key]
        label = self._labels[key]
        if value == ERROR_VALUE and self._values.get(key) != ERROR_VALUE:
            log.warn("dynamic label {app}.{key}: {cmd} failed or timed out; value {value!r}",
                     app=key[0], key=key[1], cmd=label.command[0], value=ERROR_VALUE)
        changed = self._values.get(key) != value
        self._values[key] = value
        self._timers[key] = self._reactor.callLater(label.period, self._start, key)
        if changed:
            self._on_change()
