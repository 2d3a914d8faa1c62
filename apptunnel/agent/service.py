"""The agent process: join once, then keep one mutual-TLS tunnel to the proxy.

Start-up order: the saved identity is used when it is there, still valid and from the
pinned CA; otherwise the agent joins with its token (retrying with backoff while the
proxy is unreachable, and every 30 s when the proxy refuses, so a fixed config or a new
token heals it without a restart). Then a ``ClientService`` keeps the tunnel up: each
connection sends ``hello`` and counts as up only once ``hello_ok`` arrives; a dead peer
(keepalive) or a refused hello ends the connection and the service reconnects with
exponential backoff and jitter.

Shutdown says ``go_away`` on the live tunnel first, so open streams finish (bounded by
``DRAIN_TIMEOUT``) before the connection is closed.
"""

from __future__ import annotations

import random
from importlib import metadata

from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import MultiService
from twisted.internet import defer, ssl, task
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from apptunnel.agent.join import AgentIdentity, JoinError, join
from apptunnel.agent.upstream import UpstreamDialer
from apptunnel.auth.ca import spki_pin
from apptunnel.config import AgentConfig, ConfigError
from apptunnel.net import loopback_host, split_host_port
from apptunnel.tunnel.protocol import TunnelProtocol

__all__ = ["AgentService"]

log = Logger()

CONNECT_TIMEOUT = 10.0
HELLO_TIMEOUT = 15.0
DRAIN_TIMEOUT = 10.0
REFUSED_RETRY = 30.0


def _version() -> str:
    try:
        return metadata.version("apptunnel")
    except metadata.PackageNotFoundError:
        return "0+unknown"


VERSION = _version()


def _jitter() -> float:
    return random.random()


class _AgentTunnel:
    """The agent's TunnelHandler for one connection: hello, then answer streams."""

    def __init__(self, service: AgentService) -> None:
        self._service = service
        self.tunnel: TunnelProtocol | None = None
        self.hello_ok: defer.Deferred = defer.Deferred()

    def tunnel_ready(self, tunnel: TunnelProtocol) -> None:
        # Sent before the handshake finishes, TLS holds it until the proxy is verified
        # against our CA (and the proxy has verified our certificate).
        self.tunnel = tunnel
        self._service._handlers[tunnel.transport] = self
        tunnel.send_control(self._service.hello_message())

    def control_received(self, tunnel: TunnelProtocol, message: dict) -> None:
        kind = message.get("type")
        if kind == "hello_ok" and not self.hello_ok.called:
            self.hello_ok.callback(tunnel)
            log.info("tunnel to {peer} up (proxy {proxy_id}), serving {apps}",
                     peer=tunnel.peer, proxy_id=str(message.get("proxy_id", "?"))[:64],
                     apps=", ".join(a.name for a in self._service.config.apps) or "no apps")
        else:
            log.warn("tunnel to {peer}: ignoring unexpected message {kind!r}",
                     peer=tunnel.peer, kind=str(kind)[:40])

    def stream_requested(self, tunnel: TunnelProtocol, target: dict) -> defer.Deferred:
        return self._service.dialer.stream_requested(tunnel, target)

    def tunnel_lost(self, tunnel: TunnelProtocol, reason: Failure) -> None:
        self._service._handlers.pop(tunnel.transport, None)
        if not self.hello_ok.called:
            self.hello_ok.errback(reason)
            return
        log.info("tunnel to {peer} lost: {reason}", peer=tunnel.peer,
                 reason=reason.getErrorMessage())


class _Closed(Protocol):
    """Stands in for a tunnel when ClientService reconnects during shutdown."""

    def connectionMade(self) -> None:
        self.transport.abortConnection()


class _TunnelFactory(Factory):
    """One TunnelProtocol per connection; none while the service is shutting down."""

    noisy = False

    def __init__(self, service: AgentService) -> None:
        self._service = service

    def buildProtocol(self, addr) -> Protocol:
        if self._service.stopping:
            return _Closed()
        config = self._service.config
        return TunnelProtocol(
            _AgentTunnel(self._service), self._service.reactor, initiator=True,
            keepalive_interval=config.keepalive_interval,
            keepalive_timeout=config.keepalive_timeout,
        )


class AgentService(MultiService):
    """Joins when needed, keeps the tunnel to the proxy, dials apps for its streams."""

    def __init__(self, config: AgentConfig, reactor) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.dialer = UpstreamDialer(reactor, config.apps)
        self.identity = AgentIdentity.load(config.data_dir)
        if self.identity is None and not config.join_token:
            raise ConfigError(config.path, f"no saved identity in {config.data_dir}: set "
                                           "join.token and join.ca_pin to join the cluster",
                              key="join")
        self.host, self.port = split_host_port(config.proxy_addr)
        self.client: ClientService | None = None
        # Keyed by transport: ClientService hands prepareConnection a proxy of our protocol.
        self._handlers: dict[object, _AgentTunnel] = {}
        self._joining: defer.Deferred | None = None
        self.stopping = False

    # -- lifecycle ---------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        if self._identity_usable():
            self._start_tunnel()
        else:
            self._joining = defer.ensureDeferred(self._join_until_done())
            self._joining.addErrback(lambda f: f.trap(defer.CancelledError))

    @defer.inlineCallbacks
    def stopService(self):
        self.stopping = True  # no new tunnel while the old one drains
        if self._joining is not None:
            self._joining.cancel()
            self._joining = None
        draining = []
        for handler in list(self._handlers.values()):
            draining.append(handler.tunnel.go_away("agent shutting down"))
        if draining:
            done = defer.DeferredList(draining, consumeErrors=True)
            done.addTimeout(DRAIN_TIMEOUT, self.reactor)
            try:
                yield done
            except defer.TimeoutError:
                log.warn("streams still open after {s:.0f}s; closing the tunnel", s=DRAIN_TIMEOUT)
            # go_away fires inside the tunnel's connectionLost; let ClientService see the
            # disconnect before it is told to stop.
            yield task.deferLater(self.reactor, 0, lambda: None)
        yield super().stopService()

    # -- join --------------------------------------------------------------------------

    def _identity_usable(self) -> bool:
        """A saved identity is reused unless a configured token can replace a stale one."""
        identity = self.identity
        if identity is None:
            return False
        if not self.config.join_token:
            return True
        if identity.not_after <= self.reactor.seconds():
            log.warn("agent certificate expired; joining again with the configured token")
            return False
        if self.config.ca_pin and spki_pin(identity.ca_pem) != self.config.ca_pin:
            log.warn("saved CA does not match join.ca_pin; joining again")
            return False
        return True

    async def _join_until_done(self) -> None:
        delay = backoffPolicy(initialDelay=0.5, maxDelay=30.0, factor=2.0, jitter=_jitter)
        attempt = 0
        while True:
            try:
                self.identity = await join(self.reactor, self.config)
                break
            except JoinError as err:
                wait = delay(attempt) if err.retry else REFUSED_RETRY
                attempt += 1
                log.error("cannot join the cluster: {error}; retrying in {wait:.0f}s",
                          error=str(err), wait=wait)
            await task.deferLater(self.reactor, wait)
        self._joining = None
        self._start_tunnel()

    # -- tunnel ------------------------------------------------------------------------

    def hello_message(self) -> dict:
        hello = {
            "type": "hello",
            "host_id": self.identity.host_id,
            "version": VERSION,
            "apps": [
                {
                    "name": app.name,
                    "uri": app.uri,
                    "labels": dict(app.labels),
                    "public_addr": app.public_addr,
                    "rewrite_headers": [list(pair) for pair in app.rewrite_headers],
                    "jwt_claims": list(app.jwt_claims) if app.jwt_claims is not None else None,
                }
                for app in self.config.apps
            ],
        }
        # Multi-port TCP apps only, so HTTP apps' entries stay as they were.
        for entry, app in zip(hello["apps"], self.config.apps):
            if app.tcp_ports:
                entry["tcp_ports"] = [list(r) for r in app.tcp_ports]
        return hello

    def _start_tunnel(self) -> None:
        identity = self.identity
        tls = ssl.optionsForClientTLS(
            self.host,
            trustRoot=identity.trust_root(),
            clientCertificate=identity.client_certificate(),
        )
        endpoint = wrapClientTLS(
            tls, HostnameEndpoint(self.reactor, loopback_host(self.host), self.port,
                                  timeout=CONNECT_TIMEOUT),
        )
        self.client = ClientService(
            endpoint, _TunnelFactory(self),
            retryPolicy=backoffPolicy(initialDelay=0.5, maxDelay=30.0, factor=2.0,
                                      jitter=_jitter),
            clock=self.reactor,
            prepareConnection=self._await_hello,
        )
        self.client.setServiceParent(self)

    def _await_hello(self, tunnel) -> defer.Deferred:
        """The connection counts as up once the proxy accepted our hello."""
        handler = self._handlers.get(tunnel.transport)
        if handler is None:
            return defer.fail(ConnectionError("no tunnel on this connection"))
        d = handler.hello_ok
        d.addTimeout(HELLO_TIMEOUT, self.reactor)

        def failed(failure: Failure) -> Failure:
            log.warn("tunnel to {addr} not established: {reason}", addr=self.config.proxy_addr,
                     reason=failure.getErrorMessage())
            return failure

        return d.addErrback(failed)
