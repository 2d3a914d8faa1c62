"""Dial an app for a tunnel stream and relay bytes both ways.

A stream names an *app*, never an address: the target is looked up in the agent's own
config, so the tunnel cannot be used to reach anything the operator did not list. The
stream is accepted only once the app's socket is connected, so the proxy can answer a
down app with 502 instead of a stream that dies at once.

The bytes go through the one relay (``apptunnel/tunnel/relay.py``): backpressure both
ways, a FIN on one side becomes a half close on the other, a clean end on one side is a
FIN on the other and only a reset or error is an abort (an app never sees a RST for a
client that left cleanly).
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
from apptunnel.tunnel.endpoints import no_delay, write_through
from apptunnel.tunnel.errors import StreamRefused
from apptunnel.tunnel.frames import ErrorCode
from apptunnel.tunnel.relay import Relay
from apptunnel.tunnel.targets import target_port
from apptunnel.metrics import NO_METRICS, NoMetrics

__all__ = ["CONNECT_TIMEOUT", "UpstreamDialer", "target_port"]

log = Logger()

CONNECT_TIMEOUT = 10.0
EARLY_LIMIT = 64 * 1024  # bytes from the app held until the stream is attached
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
                 connect_timeout: float = CONNECT_TIMEOUT, metrics: NoMetrics = NO_METRICS) -> None:
        self._reactor = reactor
        self._metrics = metrics
        self._apps = {app.name: app for app in apps}
        self._timeout = connect_timeout
        self._live: dict[str, set[UpstreamProtocol]] = {}   # app -> its open upstreams

    def set_apps(self, apps: list[AppConfig]) -> None:
        """Serve exactly ``apps`` from now on; the open streams of an app no longer in
        the list end (new ones get "no such app"), those of the others go on."""
        self._apps = {app.name: app for app in apps}
        for name in [n for n in self._live if n not in self._apps]:
            for upstream in list(self._live.pop(name)):
                if upstream.transport is not None:
                    upstream.transport.abortConnection()

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
            if accepted.called or self._apps.get(app.name) != app:
                upstream.transport.abortConnection()   # given up, or the app was removed
                if not accepted.called:
                    accepted.errback(StreamRefused(ErrorCode.UNKNOWN_TARGET,
                                                   "no such app on this agent"))
                return
            live = self._live.setdefault(app.name, set())
            live.add(upstream)
            upstream.on_lost = lambda: live.discard(upstream)
            accepted.callback(upstream.relay.b)

        def failed(failure: Failure) -> None:
            if timer.active():
                timer.cancel()
            if state["cancelled"] or accepted.called:
                return  # Deferred.cancel delivers CancelledError itself
            reason = "connection timed out" if state["timed_out"] else _short(failure)
            log.info("app {app} unreachable: {reason}", app=app.name, reason=reason)
            self._metrics.upstream_error(app.name)
            accepted.errback(StreamRefused(ErrorCode.CONNECT_FAILED, reason))

        d.addCallbacks(connected, failed)
        return accepted


class _UpstreamFactory(Factory):
    noisy = False

    def __init__(self, tls: bool) -> None:
        self._tls = tls

    def buildProtocol(self, addr) -> UpstreamProtocol:
        return TLSUpstreamProtocol() if self._tls else UpstreamProtocol()


@implementer(IHalfCloseableProtocol)
class UpstreamProtocol(Protocol):
    """The app's socket: `ready` once connected (for https: once TLS has verified the app),
    then one end of the relay to the stream (`relay.a`; the stream gets `relay.b`).

    From `ready` on, the relay end holds what the app sends until the stream is attached
    (bounded, with reading paused), passes the app's FIN on as a half close, and ends the
    stream cleanly on a clean close or with a reset on an error (and the other way round).
    """

    def __init__(self) -> None:
        self.ready: defer.Deferred = defer.Deferred(self._give_up)
        self.relay = Relay(EARLY_LIMIT)
        self._end = None
        self.on_lost = lambda: None      # the dialer's bookkeeping of open upstreams

    def connectionMade(self) -> None:
        no_delay(self.transport)
        write_through(self.transport)
        if not IHandshakeListener.providedBy(self):
            self._become_ready()

    def _give_up(self, _: defer.Deferred) -> None:
        """Cancelled or timed out while TLS was still verifying the app."""
        if self.transport is not None:
            self.transport.abortConnection()

    def handshakeCompleted(self) -> None:
        self._become_ready()

    def _become_ready(self) -> None:
        if self.ready.called:
            return
        self._end = self.relay.a
        self._end.makeConnection(self.transport)  # pauses reading until the stream attaches
        self.ready.callback(self)

    def dataReceived(self, data: bytes) -> None:
        if self._end is not None:
            self._end.dataReceived(data)

    def readConnectionLost(self) -> None:
        if self._end is not None:
            self._end.readConnectionLost()
        else:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        if self._end is not None:
            self._end.writeConnectionLost()

    def connectionLost(self, reason: Failure) -> None:
        self.on_lost()
        if not self.ready.called:
            self.ready.errback(reason)
        elif self._end is not None:
            self._end.connectionLost(reason)


@implementer(IHandshakeListener)
class TLSUpstreamProtocol(UpstreamProtocol):
    """An https app: ready only after the handshake (and certificate check) succeeded.

    A separate class because Twisted's endpoint wrapper keeps only the last of the
    optional interfaces a protocol provides, and plain TCP needs IHalfCloseableProtocol.
    TLS cannot half close: the relay closes it (close_notify) when the stream sends FIN.
    """
