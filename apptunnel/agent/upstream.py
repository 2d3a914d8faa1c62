"""Dial an app for a tunnel stream and relay bytes both ways.

A stream names an *app*, never an address: the target is looked up in the agent's own
config, so the tunnel cannot be used to reach anything the operator did not list. The
stream is accepted only once the app's socket is connected, so the proxy can answer a
down app with 502 instead of a stream that dies at once.

The relay is two small protocols, one on each side, that hand each other their
transports: each side registers the other as its push producer, so a slow reader on one
side pauses reading on the other (backpressure both ways with no buffer of our own), and a
FIN on one side becomes a half close on the other.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from OpenSSL import SSL
from twisted.internet import defer, error, ssl
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from apptunnel.config import AppConfig
from apptunnel.net import loopback_host
from apptunnel.tunnel.endpoints import no_delay
from apptunnel.tunnel.errors import StreamRefused
from apptunnel.tunnel.frames import ErrorCode

__all__ = ["CONNECT_TIMEOUT", "UpstreamDialer", "target_port"]

log = Logger()

CONNECT_TIMEOUT = 10.0
EARLY_LIMIT = 64 * 1024
_MAX_REASON = 200


@implementer(IOpenSSLClientConnectionCreator)
class _UnverifiedTLS:
    """TLS to an app with a self-signed certificate (``insecure_skip_verify``), still with SNI."""

    def __init__(self, hostname: str) -> None:
        self._hostname = hostname.encode("idna")
        self._options = ssl.CertificateOptions(verify=False, raiseMinimumTo=ssl.TLSVersion.TLSv1_2)

    def clientConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        connection = SSL.Connection(self._options.getContext(), None)
        connection.set_app_data(tlsProtocol)
        connection.set_tlsext_host_name(self._hostname)
        return connection


def _short(failure: Failure) -> str:
    """One line naming the socket error, for the proxy's 502 page and logs."""
    value = failure.value
    if isinstance(value, (defer.TimeoutError, error.TimeoutError)):
        text = "connection timed out"
    elif isinstance(value, error.ConnectionRefusedError):
        text = "connection refused"
    elif isinstance(value, error.DNSLookupError):
        text = "DNS lookup failed"
    elif isinstance(value, SSL.Error):
        reasons = [r[-1] for r in (value.args[0] if value.args else []) if isinstance(r, tuple)]
        text = "TLS handshake failed: " + (", ".join(str(r) for r in reasons if r) or "error")
    else:
        text = str(value) or value.__class__.__name__
    return " ".join(text.split())[:_MAX_REASON]


class UpstreamDialer:
    """The agent's `stream_requested`: app name -> connected relay, or a refusal."""

    def __init__(self, reactor, apps: tuple[AppConfig, ...],
                 connect_timeout: float = CONNECT_TIMEOUT) -> None:
        self._reactor = reactor
        self._apps = {app.name: app for app in apps}
        self._timeout = connect_timeout

    def endpoint(self, app: AppConfig, port: int | None = None) -> IStreamClientEndpoint:
        """The endpoint that reaches `app.uri` (TCP for http and tcp, TLS for https);
        `port` (already allowed by `target_port`) overrides the uri's for tcp apps."""
        parts = urlsplit(app.uri)
        host = parts.hostname or ""
        if port is None:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        tcp = HostnameEndpoint(self._reactor, loopback_host(host), port, timeout=self._timeout)
        if parts.scheme != "https":
            return tcp
        if app.insecure_skip_verify:
            creator = _UnverifiedTLS(host)
        else:
            creator = ssl.optionsForClientTLS(host)
        return wrapClientTLS(creator, tcp)

    def stream_requested(self, tunnel, target: dict) -> defer.Deferred:
        """Fire with the stream's protocol once the app is connected; StreamRefused otherwise."""
        name = target.get("app") if isinstance(target, dict) else None
        app = self._apps.get(name) if isinstance(name, str) else None
        if app is None:
            return defer.fail(StreamRefused(ErrorCode.UNKNOWN_TARGET, "no such app on this agent"))
        try:
            port = target_port(app, target.get("port"))
        except StreamRefused as refused:
            log.info("stream to {app} refused: {reason}", app=app.name, reason=refused.reason)
            return defer.fail(refused)
        try:
            endpoint = self.endpoint(app, port)
        except (ValueError, UnicodeError) as err:
            return defer.fail(StreamRefused(ErrorCode.CONNECT_FAILED, f"bad app URI: {err}"))

        connecting = endpoint.connect(_UpstreamFactory(tls=urlsplit(app.uri).scheme == "https"))
        d = connecting.addCallback(lambda upstream: upstream.ready)
        # HostnameEndpoint bounds each attempt; this timer bounds resolution and all attempts.
        # `accepted` is what the tunnel sees: cancelling it (the tunnel gave up) cancels
        # the dial, and a connection that wins that race is closed, never leaked.
        state = {"timed_out": False, "cancelled": False}

        def give_up() -> None:
            state["timed_out"] = True
            d.cancel()

        def cancel(_: defer.Deferred) -> None:
            state["cancelled"] = True
            d.cancel()

        timer = self._reactor.callLater(self._timeout, give_up)
        accepted: defer.Deferred = defer.Deferred(cancel)

        def connected(upstream: UpstreamProtocol) -> None:
            if timer.active():
                timer.cancel()
            if accepted.called:
                upstream.transport.abortConnection()
                return
            accepted.callback(StreamSide(upstream))

        def failed(failure: Failure) -> None:
            if timer.active():
                timer.cancel()
            if state["cancelled"] or accepted.called:
                return  # Deferred.cancel delivers CancelledError itself
            reason = "connection timed out" if state["timed_out"] else _short(failure)
            log.info("app {app} unreachable: {reason}", app=app.name, reason=reason)
            accepted.errback(StreamRefused(ErrorCode.CONNECT_FAILED, reason))

        d.addCallbacks(connected, failed)
        return accepted


def target_port(app: AppConfig, requested) -> int | None:
    """The port a stream may dial: only the uri's port or a declared tcp_ports range.

    HTTP apps take no port (None = the uri's). A refusal is ``UNKNOWN_TARGET``, the same
    code as an unknown app: the tunnel can never be aimed at an undeclared port.
    """
    if app.kind != "tcp":
        if requested is not None:
            raise StreamRefused(ErrorCode.UNKNOWN_TARGET, f"{app.name} is an HTTP app: no port")
        return None
    uri_port = urlsplit(app.uri).port
    if requested is None:
        if uri_port is None:
            raise StreamRefused(ErrorCode.UNKNOWN_TARGET,
                                f"{app.name} serves several ports: name one")
        return uri_port
    if type(requested) is not int:
        raise StreamRefused(ErrorCode.UNKNOWN_TARGET, "port must be a number")
    if requested == uri_port or any(low <= requested <= high for low, high in app.tcp_ports):
        return requested
    raise StreamRefused(ErrorCode.UNKNOWN_TARGET, f"port {requested} is not served by {app.name}")


class _UpstreamFactory(Factory):
    noisy = False

    def __init__(self, tls: bool) -> None:
        self._tls = tls

    def buildProtocol(self, addr) -> UpstreamProtocol:
        return TLSUpstreamProtocol(True) if self._tls else UpstreamProtocol(False)


@implementer(IHalfCloseableProtocol)
class UpstreamProtocol(Protocol):
    """The app's socket: `ready` once connected (for https: once TLS has verified the app).

    Until its stream side is attached it reads nothing more; bytes TLS had already
    decrypted are kept (at most ``EARLY_LIMIT``) and handed over on attach.
    """

    def __init__(self, tls: bool = False) -> None:
        self._tls = tls
        self.ready: defer.Deferred = defer.Deferred(self._give_up)
        self.peer: StreamSide | None = None
        self.lost: Failure | None = None
        self._early: list[bytes] = []
        self._early_size = 0
        self._read_done = False
        self._write_done = False

    def connectionMade(self) -> None:
        no_delay(self.transport)
        if not self._tls:
            self._become_ready()

    def _give_up(self, _: defer.Deferred) -> None:
        """Cancelled or timed out while TLS was still verifying the app."""
        if self.transport is not None:
            self.transport.abortConnection()

    def handshakeCompleted(self) -> None:
        self._become_ready()

    def _become_ready(self) -> None:
        # Nothing more may be read before there is a stream to write it to.
        self.transport.pauseProducing()
        if not self.ready.called:
            self.ready.callback(self)

    def attach(self, peer: StreamSide) -> None:
        self.peer = peer
        early, self._early = self._early, []
        for chunk in early:
            peer.transport.write(chunk)
        if self.lost is not None:
            peer.upstream_lost(self.lost)
            return
        if self._read_done:
            peer.transport.loseWriteConnection()
        # Backpressure: when the app's socket buffer fills, stop reading from the stream.
        self.transport.registerProducer(peer.transport, True)
        self.transport.resumeProducing()

    def dataReceived(self, data: bytes) -> None:
        if self.peer is not None:
            self.peer.transport.write(data)
            return
        self._early_size += len(data)
        if self._early_size > EARLY_LIMIT:
            self.transport.abortConnection()
            return
        self._early.append(data)

    def readConnectionLost(self) -> None:
        """The app sent FIN: pass it on to the stream, keep sending the app what comes."""
        self._read_done = True
        if self.peer is not None:
            self.peer.transport.loseWriteConnection()
        self._close_if_done()

    def writeConnectionLost(self) -> None:
        self._write_done = True
        self._close_if_done()

    def half_close(self) -> None:
        """The stream sent FIN: half close the app's socket (TCP only: TLS has no half
        close, a bare FIN would truncate the session, so there the app decides)."""
        if not self._tls:
            self.transport.loseWriteConnection()

    def _close_if_done(self) -> None:
        if self._read_done and self._write_done:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure) -> None:
        self.lost = reason
        if not self.ready.called:
            self.ready.errback(reason)
            return
        peer, self.peer = self.peer, None
        if peer is not None and peer.transport is not None:
            peer.upstream_lost(reason)


@implementer(IHandshakeListener)
class TLSUpstreamProtocol(UpstreamProtocol):
    """An https app: ready only after the handshake (and certificate check) succeeded.

    A separate class because Twisted's endpoint wrapper keeps only the last of the
    optional interfaces a protocol provides, and plain TCP needs IHalfCloseableProtocol.
    """


@implementer(IHalfCloseableProtocol)
class StreamSide(Protocol):
    """The tunnel stream's end of the relay; owns nothing but a link to the app's socket."""

    def __init__(self, upstream: UpstreamProtocol) -> None:
        self._upstream: UpstreamProtocol | None = upstream
        self._closed = False
        self._registered = False

    def connectionMade(self) -> None:
        upstream = self._upstream
        if upstream is None or upstream.peer is not None:
            self.transport.abortConnection()
            return
        if upstream.lost is None:
            # Backpressure: when the tunnel window is spent, stop reading from the app.
            self.transport.registerProducer(upstream.transport, True)
            self._registered = True
        upstream.attach(self)

    def dataReceived(self, data: bytes) -> None:
        if self._upstream is not None:
            self._upstream.transport.write(data)

    def readConnectionLost(self) -> None:
        if self._upstream is not None:
            self._upstream.half_close()

    def writeConnectionLost(self) -> None:
        """Our FIN went out; the stream closes itself when the peer's FIN arrives too."""

    def upstream_lost(self, reason: Failure) -> None:
        """The app's socket closed: finish the stream cleanly, or reset it on an error."""
        self._upstream = None
        if self._closed:
            return
        if self._registered:
            self._registered = False
            self.transport.unregisterProducer()
        if reason.check(error.ConnectionDone):
            self.transport.loseConnection()
        else:
            self.transport.abortConnection()

    def connectionLost(self, reason: Failure) -> None:
        self._closed = True
        upstream, self._upstream = self._upstream, None
        if upstream is None or upstream.lost is not None:
            return
        upstream.peer = None
        upstream.transport.unregisterProducer()
        if reason.check(error.ConnectionDone):
            upstream.transport.loseConnection()
        else:
            upstream.transport.abortConnection()
