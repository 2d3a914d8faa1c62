"""A pull producer driven as a push producer, so a stream has one producer kind to serve.

A consumer handed a pull producer (``registerProducer(p, False)``) must ask it for data
itself. A stream only knows pause/resume, so it wraps the pull producer here: a cooperative
task calls ``resumeProducing`` once per turn while the stream is not paused. Twisted has
the same adapter, but as a private class (``_producer_helpers``), which an upgrade may
change without notice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import CooperativeTask, NotPaused, TaskFinished, cooperate
from twisted.logger import Logger
from zope.interface import implementer


@implementer(IPushProducer)
class PullAsPush:
    """Calls ``pull.resumeProducing()`` on every turn of ``cooperate`` until stopped.

    A pull producer that raises is unregistered from ``consumer`` (logged once), as it
    cannot be asked again safely.
    """

    _log = Logger()

    def __init__(self, pull, consumer,
                 cooperate: Callable[[Iterator[None]], CooperativeTask] = cooperate) -> None:
        self._pull = pull
        self._consumer = consumer
        self._task = cooperate(self._turns())

    def _turns(self) -> Iterator[None]:
        while True:
            try:
                self._pull.resumeProducing()
            except Exception:  # noqa: BLE001 - a broken producer must not stop the reactor
                self._log.failure("pull producer {producer} failed", producer=self._pull)
                self._consumer.unregisterProducer()
                return
            yield None

    def stop_streaming(self) -> None:
        """The consumer unregistered us: no more turns (the pull producer stays as it is)."""
        try:
            self._task.stop()
        except TaskFinished:   # done, stopped or failed: nothing left to steer
            pass

    def pauseProducing(self) -> None:
        try:
            self._task.pause()
        except TaskFinished:   # done, stopped or failed: nothing left to steer
            pass

    def resumeProducing(self) -> None:
        try:
            self._task.resume()
        except (TaskFinished, NotPaused):   # nothing to steer, or not paused: no-op
            pass

    def stopProducing(self) -> None:
        self.stop_streaming()
        self._pull.stopProducing()
