"""Start-up of the twistd processes: listen for real, or exit non-zero with one line.

twistd's own way (``StreamServerEndpointService``) logs a port it cannot bind as an
``Unhandled Error`` traceback and keeps the process running without it, so systemd's
``Restart=on-failure`` never fires. Here a service listens explicitly (`Listeners`), says
"serving" only once every port is bound, and a failure it cannot recover from (a busy
port, a file it cannot read or write) goes through `fatal`: one log line naming the
address or file, a normal shutdown, then exit status 1.
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn

import attrs
from twisted.internet import defer, error
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger

__all__ = ["CannotStart", "Listeners", "fatal", "startup_error"]

log = Logger()

EXIT_FAILURE = 1


class CannotStart(Exception):
    """The process cannot do its job; the message is the one line an operator reads."""


def _listen_reason(err: Exception) -> str:
    if isinstance(err, error.CannotListenError) and isinstance(err.socketError, OSError):
        return (err.socketError.strerror or str(err.socketError)).lower()
    if isinstance(err, OSError):
        return (err.strerror or err.__class__.__name__).lower()
    return str(err) or err.__class__.__name__


@attrs.frozen
class _Listener:
    what: str
    endpoint: IStreamServerEndpoint
    factory: Factory


class Listeners:
    """The ports of one process: all bound by `listen`, all released by `stop`."""

    def __init__(self) -> None:
        self._wanted: list[_Listener] = []
        self._ports: list[IListeningPort] = []

    def add(self, what: str, endpoint: IStreamServerEndpoint, factory: Factory) -> None:
        """`what` names the address in the error, e.g. ``web_listen_addr 127.0.0.1:3080``."""
        self._wanted.append(_Listener(what, endpoint, factory))

    def listen(self) -> defer.Deferred:
        """Bind every endpoint in order; fails with CannotStart naming the first that failed
        (the ones already bound are released again)."""
        return defer.ensureDeferred(self._listen())

    async def _listen(self) -> None:
        for wanted in self._wanted:
            try:
                port = await wanted.endpoint.listen(wanted.factory)
            except Exception as err:  # noqa: BLE001 - any reason becomes the one line
                await self.stop()
                raise CannotStart(f"cannot listen on {wanted.what}: {_listen_reason(err)}") \
                    from None
            self._ports.append(port)

    @property
    def up(self) -> bool:
        """Every port added is bound (readiness: ``/readyz``)."""
        return bool(self._wanted) and len(self._ports) == len(self._wanted)

    def stop(self) -> defer.Deferred:
        ports, self._ports = self._ports, []
        return defer.gatherResults(
            [defer.maybeDeferred(port.stopListening) for port in ports], consumeErrors=True)


def fatal(reactor, message: str, status: int = EXIT_FAILURE) -> None:
    """Log `message` as one line, shut down cleanly, then exit with `status`.

    twistd gives a service no exit status of its own (it returns 0 after any clean reactor
    stop), so the status is set by ``os._exit`` once the shutdown triggers (the services'
    ``stopService``) have run. Works before the reactor runs (the usual case: a port is
    bound in ``startService``) and after.
    """
    log.critical("{message}", message=message)
    reactor.addSystemEventTrigger("after", "shutdown", _exit_now, status)
    if reactor.running:
        reactor.stop()
    else:
        reactor.callWhenRunning(reactor.stop)


def _exit_now(status: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


def startup_error(prog: str, message: str) -> NoReturn:
    """Before the reactor runs (options, config, files): ``PROG: error: message``, exit 1.

    A SystemExit, not twistd's UsageError, which prints the whole ``Options:`` block first.
    """
    raise SystemExit(f"{prog}: error: {message}")
