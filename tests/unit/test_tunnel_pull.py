"""PullAsPush: a pull producer driven by a cooperative task on a Clock."""

from __future__ import annotations

from twisted.internet.task import Clock, Cooperator

from apptunnel.tunnel.pull import PullAsPush


class Pull:
    def __init__(self, fail_at: int | None = None):
        self.pulls = 0
        self.stopped = False
        self.fail_at = fail_at

    def resumeProducing(self):
        self.pulls += 1
        if self.pulls == self.fail_at:
            raise ValueError("broken producer")

    def stopProducing(self):
        self.stopped = True


class Consumer:
    unregistered = 0

    def unregisterProducer(self):
        self.unregistered += 1


def clocked():
    """A cooperator that runs one turn per clock tick, so a test counts turns exactly."""
    clock = Clock()
    coop = Cooperator(scheduler=lambda f: clock.callLater(1, f),
                      terminationPredicateFactory=lambda: (lambda: True))
    return clock, coop.cooperate


def test_turns_pull_until_paused_and_again_after_resume():
    clock, cooperate = clocked()
    pull = Pull()
    push = PullAsPush(pull, Consumer(), cooperate)
    clock.pump([1, 1, 1])
    assert pull.pulls == 3
    push.pauseProducing()
    clock.pump([1, 1])
    assert pull.pulls == 3
    push.resumeProducing()
    clock.pump([1, 1])
    assert pull.pulls == 5


def test_stop_streaming_ends_turns_and_leaves_the_producer_alone():
    clock, cooperate = clocked()
    pull = Pull()
    push = PullAsPush(pull, Consumer(), cooperate)
    clock.pump([1])
    push.stop_streaming()
    push.stop_streaming()        # twice is harmless (the consumer may unregister twice)
    push.pauseProducing()
    push.resumeProducing()
    clock.pump([1, 1])
    assert (pull.pulls, pull.stopped) == (1, False)


def test_stop_producing_stops_the_pull_producer():
    clock, cooperate = clocked()
    pull = Pull()
    PullAsPush(pull, Consumer(), cooperate).stopProducing()
    clock.pump([1, 1])
    assert (pull.pulls, pull.stopped) == (0, True)


def test_a_raising_producer_is_unregistered_once_and_not_pulled_again():
    clock, cooperate = clocked()
    pull, consumer = Pull(fail_at=2), Consumer()
    PullAsPush(pull, consumer, cooperate)
    clock.pump([1, 1, 1, 1])
    assert (pull.pulls, consumer.unregistered) == (2, 1)
