"""The web UI's HTTP channel: twisted.web's, plus a deadline on every request head.

twisted.web's ``HTTPChannel`` has one idle timer that restarts on every byte received, so
a client that sends a head a byte a second keeps its connection (and a slot) for ever.
Here every head must be whole within ``head_timeout`` of its first byte, as on app
hosts; between requests only the idle timeout applies. The Host of every head is also
checked, as the edge checks the first.
"""

from __future__ import annotations

from twisted.logger import Logger
from twisted.web.http import HTTPChannel
from twisted.web.server import Site

from apptunnel.proxy import pages
from apptunnel.proxy.headers import valid_host

HEAD_TIMEOUT = 30.0


class HeadDeadlineChannel(HTTPChannel):
    """An ``HTTPChannel`` that closes a connection whose request head arrives too slowly.

    A head starts with its first byte after the previous request's body; it ends at
    ``allHeadersReceived``. Bytes that arrive while a request is answered are buffered by
    the channel and read afterwards: if they leave a partial head, its deadline starts
    when the answer is done.
    """

    _log = Logger()
    head_timeout = HEAD_TIMEOUT

    def __init__(self) -> None:
        super().__init__()
        self._head_call = None
        self._awaiting_head = True   # the next bytes read belong to a request head
        self._head_started = False   # ... and some of them have arrived
        self._answering = False      # a whole request is being answered
        self._abort_call = None

    def dataReceived(self, data: bytes) -> None:
        if data and self._awaiting_head:
            self._head_started = True
            if not self._answering:  # else the channel buffers them until the answer is done
                self._start_head_deadline()
        super().dataReceived(data)

    def headerReceived(self, line: bytes) -> bool:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"host" and not valid_host(value.strip(b" \t")):
            self._log.info("web request with a malformed Host from {peer}", peer=self.transport.getPeer())
            self.transport.write(pages.error_response(400, close=True))
            self.loseConnection()
            return False
        return super().headerReceived(line)

    def allHeadersReceived(self) -> None:
        self._awaiting_head = self._head_started = False
        self._stop_head_deadline()
        super().allHeadersReceived()

    def allContentReceived(self) -> None:
        self._awaiting_head = True
        self._answering = True
        super().allContentReceived()

    def requestDone(self, request) -> None:
        self._answering = False
        # Replays the bytes buffered meanwhile: they may hold (part of) the next head.
        super().requestDone(request)
        if self._awaiting_head and self._head_started and not self._answering:
            self._start_head_deadline()

    def is_idle(self) -> bool:
        """Between requests (or still in a head): the connection limits may shed it."""
        return self._awaiting_head and not self._answering

    def connectionLost(self, reason) -> None:
        self._stop_head_deadline()
        if self._abort_call is not None and self._abort_call.active():
            self._abort_call.cancel()
        self._abort_call = None
        super().connectionLost(reason)

    def _start_head_deadline(self) -> None:
        if self._head_call is None:
            self._head_call = self.callLater(self.head_timeout, self._head_late)

    def _stop_head_deadline(self) -> None:
        if self._head_call is not None and self._head_call.active():
            self._head_call.cancel()
        self._head_call = None

    def _head_late(self) -> None:
        self._head_call = None
        if not self._awaiting_head or self._answering:
            return
        self._log.info("request head from {peer} not complete in time; closing",
                       peer=self.transport.getPeer())
        self.transport.write(pages.error_response(408, close=True))
        self.loseConnection()
        # A peer that does not read the 408 must not hold the connection open either.
        self._abort_call = self.callLater(self.abortTimeout or 15.0, self.transport.abortConnection)


class WebSite(Site):
    """The web UI's ``Site``: channels with a per-head deadline of ``head_timeout``."""

    protocol = HeadDeadlineChannel

    def __init__(self, resource, head_timeout: float = HEAD_TIMEOUT, **kwargs) -> None:
        super().__init__(resource, **kwargs)
        self.head_timeout = head_timeout

    def buildProtocol(self, addr):
        channel = super().buildProtocol(addr)
        channel.head_timeout = self.head_timeout
        return channel
