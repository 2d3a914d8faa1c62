"""The public HTTPS listener: one port for the web UI and every app subdomain.

The edge reads only the first request head of a connection, picks its owner by Host and
then steps out of the way: the owner (the twisted.web ``Site`` for the proxy's own host,
the app forwarder for app hosts) gets the transport and the bytes read so far, and the
transport is re-pointed at it so later bytes skip the edge. Later requests on the same
connection stay with that owner, which checks their Host itself.
"""

from __future__ import annotations

from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Site

from apptunnel.proxy import pages
from apptunnel.proxy.headers import valid_host
from apptunnel.proxy.handover import hand_over
from apptunnel.proxy.http1 import HttpError, RequestHeadPeek
from apptunnel.net import host_only
from apptunnel.proxy.tcp_access import is_tcp_request
from apptunnel.tunnel.endpoints import no_delay, write_through

HEAD_TIMEOUT = 30.0


class EdgeProtocol(Protocol):
    """Holds a connection until its first head names a host, then hands it over."""

    _log = Logger()

    def __init__(self, factory: "EdgeFactory", addr: IAddress) -> None:
        self._factory = factory
        self._addr = addr
        self._held: RequestHeadPeek | None = RequestHeadPeek()  # None once refused
        self._inner: Protocol | None = None
        self._timer = None

    def connectionMade(self) -> None:
        no_delay(self.transport)
        write_through(self.transport)
        clock = self._factory.forwarder.clock
        self._timer = clock.callLater(self._factory.head_timeout, self._head_timed_out)

    def dataReceived(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.dataReceived(data)
            return
        if self._held is None:
            return  # refused; closing
        try:
            # Resumes where the last read stopped: a head sent a byte at a time is searched
            # once, not once per byte (the held bytes are bounded by MAX_HEAD there).
            head = self._held.receive(data)
        except HttpError as err:
            self._refuse(err.status, str(err))
            return
        if head is None:
            return
        host_raw = head.headers.get(b"host")
        if host_raw is not None and not valid_host(host_raw):
            self._refuse(400, "malformed Host")
            return
        host = host_only(host_raw.decode("latin-1")) if host_raw is not None else None
        if host is None or host == self._factory.public_host:
            tcp_access = self._factory.tcp_access
            if tcp_access is not None and is_tcp_request(head):
                self._hand_over(tcp_access.buildProtocol(self._addr))
            else:
                self._hand_over(self._factory.web_site.buildProtocol(self._addr))
        elif self._factory.serves(host):
            self._hand_over(self._factory.forwarder.buildProtocol(self._addr))
        else:
            self._refuse(421, f"host {host!r} is not served here")

    def is_idle(self) -> bool:
        """Still waiting for the first head: the connection limits may shed it."""
        return self._inner is None

    def connectionLost(self, reason: Failure) -> None:
        self._cancel_timer()
        if self._inner is not None:
            self._inner.connectionLost(reason)

    def _hand_over(self, inner: Protocol) -> None:
        self._cancel_timer()
        data = self._held.data
        self._held = None
        self._inner = inner
        # Where the transport cannot be re-pointed, dataReceived/connectionLost above forward.
        hand_over(self.transport, self, inner, data)

    def _refuse(self, status: int, why: str) -> None:
        self._cancel_timer()
        self._log.info("edge refused {peer}: {why}", peer=self._addr, why=why)
        self._held = None
        self.transport.write(pages.error_response(status, close=True))
        self.transport.loseConnection()

    def _head_timed_out(self) -> None:
        self._timer = None
        if self._inner is None and self._held is not None:
            self._refuse(408, "no request head in time")

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


class EdgeFactory(Factory):
    """Builds edge connections; ``public_host`` is the proxy's own host, without port."""

    def __init__(self, public_host: str, web_site: Site, forwarder, head_timeout: float = HEAD_TIMEOUT,
                 tcp_access: Factory | None = None) -> None:
        self.public_host = host_only(public_host)
        self.web_site = web_site
        self.forwarder = forwarder
        self.head_timeout = head_timeout
        # `apptunnel proxy app` upgrades on the proxy's own host (see tcp_access.py).
        self.tcp_access = tcp_access

    def serves(self, host: str) -> bool:
        """App hosts, and any name under ours (unknown apps get the forwarder's 404)."""
        return (
            self.forwarder.registry.app_by_host(host) is not None
            or host.endswith("." + self.public_host)
        )

    def buildProtocol(self, addr: IAddress) -> EdgeProtocol:
        return EdgeProtocol(self, addr)
