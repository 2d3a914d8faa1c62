"""A multiplexed ``apptunnel proxy app`` connection: one TLS connection, one stream per
local connection.

The local proxy sends the same upgrade as for one connection (``GET /v1/tcp/<app>``,
apptunnel/proxy/tcp_access.py) but asks for ``Upgrade: apptunnel-mux``. The caller, the
app and the port are decided there, once, from the client certificate; after the ``101``
the connection speaks the tunnel protocol (docs/protocol.rst) with the local proxy as the
side that opens streams. Each stream is one local connection, with an empty target: it
can name nothing the upgrade did not. Each is decided again (the policy's cache makes that
cheap, and a lock or an ended elevation refuses the next stream), then relayed to a new
stream to the app (a TCP app, audited as a ``tcp.session`` like an unmultiplexed one) or
served by the app forwarder (an HTTP app: every request authorized, signed and audited).

Why: one TLS connection per local connection costs the proxy about 45 KiB each (TLS
buffers, a socket, a protocol stack); a stream costs a few hundred bytes, and no TLS
handshake per connection. A refusal resets the stream with a reason that carries the
status the local client should see (``tunnel.errors.with_status``). The whole connection
ends when the certificate it was opened with expires, as an unmultiplexed session does.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.interfaces import IAddress, IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from apptunnel.auth.callers import Caller
from apptunnel.proxy.errors import Refusal
from apptunnel.tunnel.errors import StreamRefused, with_status
from apptunnel.tunnel.frames import ErrorCode
from apptunnel.tunnel.protocol import TunnelProtocol
from apptunnel.tunnel.relay import EARLY_LIMIT, Relay

__all__ = ["MAX_STREAMS", "MuxSession"]

MAX_STREAMS = 10_000        # concurrent local connections one `proxy app` run may carry
KEEPALIVE_INTERVAL = 15.0   # a silent local proxy is pinged; one that never answers goes
KEEPALIVE_TIMEOUT = 45.0


class MuxSession:
    """The proxy's side of one multiplexed connection (a `TunnelHandler`)."""

    _log = Logger()

    def __init__(self, access, caller: Caller, app: str, port: int | None, client: str,
                 peer: IAddress) -> None:
        self._access = access          # the TcpAccess that decided the upgrade
        self.caller = caller
        self.app = app
        self.port = port
        self.client = client
        self._peer = peer
        self._tunnel: TunnelProtocol | None = None
        self._expiry = None

    def protocol(self) -> TunnelProtocol:
        return TunnelProtocol(self, self._access.clock, initiator=False,
                              keepalive_interval=KEEPALIVE_INTERVAL,
                              keepalive_timeout=KEEPALIVE_TIMEOUT, max_streams=MAX_STREAMS)

    # -- TunnelHandler -------------------------------------------------------------------

    def tunnel_ready(self, tunnel: TunnelProtocol) -> None:
        self._tunnel = tunnel
        clock = self._access.clock
        delay = max(0.0, self.caller.expires - clock.seconds())
        self._expiry = clock.callLater(delay, self._expired)

    def control_received(self, tunnel: TunnelProtocol, message: dict) -> None:
        self._log.info("multiplexed tcp access from {client}: unexpected control message; "
                       "closing", client=self.client)
        tunnel.close()

    def stream_requested(self, tunnel: TunnelProtocol, target: dict) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(self._open(target))

    def tunnel_lost(self, tunnel: TunnelProtocol, reason: Failure) -> None:
        if self._expiry is not None and self._expiry.active():
            self._expiry.cancel()
        self._expiry = None
        self._log.info("multiplexed tcp access {user} -> {app} from {client} ended",
                       user=self.caller.user, app=self.app, client=self.client)

    # -- streams ---------------------------------------------------------------------------

    async def _open(self, target: dict) -> Protocol:
        """The protocol for one local connection's stream; StreamRefused with a status."""
        access = self._access
        try:
            if target:
                raise Refusal(400, "a stream of a multiplexed connection names nothing")
            if access.clock.seconds() >= self.caller.expires:
                raise Refusal(401, "certificate expired: run apptunnel login")
            app = await access.authorize(self.caller, self.app, self.port, self.client)
            if app.kind != "tcp":
                return access.forwarder.fixed_connection(self.app, self.caller, peer=self._peer)
            stream = MuxTcpStream(access, self)
            await access.open_stream(app, self.caller, self.port, self.client, stream.relay.b)
            return stream
        except Refusal as refusal:
            self._log.info("tcp access refused {client} {user} {app}: {status} {message}",
                           client=self.client, user=self.caller.user, app=self.app,
                           status=refusal.status, message=refusal.message)
            raise StreamRefused(ErrorCode.REFUSED,
                                with_status(refusal.status, refusal.message)) from None

    def _expired(self) -> None:
        self._expiry = None
        self._log.info("multiplexed tcp access {user} -> {app} ended: certificate expired",
                       user=self.caller.user, app=self.app)
        if self._tunnel is not None:
            self._tunnel.close()


@implementer(IHalfCloseableProtocol)
class MuxTcpStream(Protocol):
    """One local connection of a multiplexed run, relayed to its own stream to the app.

    A TCP session for the audit and the live re-check, like an unmultiplexed one; both
    sides are tunnel streams, so a FIN travels as a half close each way.
    """

    _log = Logger()

    def __init__(self, access, session: MuxSession) -> None:
        self._access = access
        self.caller = session.caller
        self.user = session.caller.user
        self.app = session.app
        self.port = session.port
        self.client = session.client
        self.relay = Relay(EARLY_LIMIT)    # a: the local connection's stream, b: the app's
        self._started = 0.0
        self._live = False

    @property
    def app_name(self) -> str:
        return self.app

    @property
    def bytes_in(self) -> int:
        return self.relay.a.received

    @property
    def bytes_out(self) -> int:
        return self.relay.b.received

    def connectionMade(self) -> None:
        self._started = self._access.clock.seconds()
        self._live = True
        self._access.session_started(self)
        self.relay.a.makeConnection(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self.relay.a.dataReceived(data)

    def readConnectionLost(self) -> None:
        self.relay.a.readConnectionLost()

    def writeConnectionLost(self) -> None:
        self.relay.a.writeConnectionLost()

    def connectionLost(self, reason: Failure) -> None:
        self.relay.a.connectionLost(reason)
        if self._live:
            self._live = False
            self._access.session_ended(self, self._started)

    def refused(self, deny) -> None:
        """The policy no longer allows this session (a lock, a removed user, roles)."""
        self._log.info("tcp session {user} -> {app} ended: {why}", user=self.user, app=self.app,
                       why=getattr(deny, "message", "") or "no longer allowed")
        if self._live:
            self.transport.abortConnection()
