"""`apptunnel.startup`: explicit listening and the one-line fatal exit, on memory reactors."""

from __future__ import annotations

from twisted.internet import defer, error
from twisted.internet.protocol import Factory
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.testing import MemoryReactorClock
from zope.interface import implementer

from apptunnel.startup import CannotStart, Listeners, fatal


@implementer(IStreamServerEndpoint)
class _Endpoint:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.stopped = 0

    def listen(self, factory):
        if self.fail:
            return defer.fail(error.CannotListenError(
                "127.0.0.1", 3080, OSError(98, "Address already in use")))
        endpoint = self

        class Port:
            def stopListening(self):
                endpoint.stopped += 1

        return defer.succeed(Port())


def test_listen_names_the_address_and_releases_what_was_bound():
    """The second port is busy: CannotStart names it; the first is released again."""
    first, busy = _Endpoint(), _Endpoint(fail=True)
    listeners = Listeners()
    listeners.add("web_listen_addr 127.0.0.1:3080", first, Factory())
    listeners.add("tunnel_listen_addr 127.0.0.1:3024", busy, Factory())
    failure = []
    listeners.listen().addErrback(failure.append)
    (f,) = failure
    assert f.check(CannotStart)
    assert str(f.value) == "cannot listen on tunnel_listen_addr 127.0.0.1:3024: address already in use"
    assert first.stopped == 1


def test_listen_then_stop_releases_every_port():
    """stop() releases each bound port once."""
    a, b = _Endpoint(), _Endpoint()
    listeners = Listeners()
    listeners.add("a", a, Factory())
    listeners.add("b", b, Factory())
    done = []
    listeners.listen().addCallback(done.append)
    assert done == [None]
    listeners.stop()
    listeners.stop()
    assert (a.stopped, b.stopped) == (1, 1)


def test_fatal_stops_the_reactor_and_exits_after_shutdown():
    """fatal() before the reactor runs: stop once running, exit status after shutdown."""
    reactor = MemoryReactorClock()
    fatal(reactor, "apptunnel proxy: cannot listen on x")
    ((_, args, _),) = reactor.triggers["after"]["shutdown"]
    assert args == (1,)
    assert reactor.whenRunningHooks and reactor.whenRunningHooks[0][0] == reactor.stop
