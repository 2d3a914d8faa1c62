"""The agent process: join once, then keep one mutual-TLS tunnel to every proxy.

Start-up order: the saved identity is used when it is there, still valid and from the
pinned CA; otherwise the agent joins with its token (retrying with backoff while the
proxy is unreachable, and every 30 s when the proxy refuses, so a fixed config or a new
token heals it without a restart). Then a ``ClientService`` keeps the tunnel up: each
connection sends ``hello``; ``hello_ok`` (which may list apps the proxy refused, one log
line each) makes it up; ``hello_error`` is one log line saying why, then the tunnel
closes. A refused or unanswered hello counts as a failed attempt, so reconnects back off
exponentially (with jitter) until a hello is accepted again.

The hello is deliberately not a ``prepareConnection`` step: ClientService's state machine
has no transition for a connection that is lost while it is being prepared (automat
``NoTransition``), which is exactly what a refused hello is.

The certificate is short-lived: at two thirds of its remaining life the agent sends
``renew`` with a CSR for its own key and saves the answer (``agent.crt``, replaced
atomically). Reconnects always present the current certificate.

Several proxies: the agent dials its configured ``proxy_addr`` (a balancer or one proxy,
the *seed*); each proxy answers the hello with ``proxies``, the live proxies' tunnel
addresses, and the agent keeps one more link (its own ClientService and backoff with
jitter) to each address it does not reach yet. Tunnels are deduplicated by the proxy_id
of ``hello_ok``: a second tunnel to a proxy already held is closed, the seed's first (it
is paused until no tunnel is up, then dials the balancer again). A proxy gone from the
list is forgotten once its tunnel is down. The addresses come only from a proxy that
proved itself with the cluster CA, and every link verifies its proxy the same way.

Shutdown says ``go_away`` on the live tunnel first, so open streams finish (bounded by
``DRAIN_TIMEOUT``) before the connection is closed.
"""

from __future__ import annotations

import datetime
import os
import random
import ssl as stdlib_ssl
from importlib import metadata

import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import MultiService
from twisted.internet import defer, task
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from apptunnel.agent.join import AgentIdentity, JoinError, join, make_csr
from apptunnel.agent.trust import save_trust_set
from apptunnel import messages
from apptunnel.agent.labels import DynamicLabels
from apptunnel.auth.rbac import parse_label_selector, selector_matches
from apptunnel.agent.upstream import UpstreamDialer
from apptunnel.auth.trust_set import TrustSetError, parse_trust_set
from apptunnel.auth.pins import cert_pin, spki_pin
from apptunnel.config import AgentConfig, AppConfig, ConfigError, app_from_resource
from apptunnel.net import loopback_host, split_host_port
from apptunnel.errors import os_error_text
from apptunnel.diag import FAILING, DiagSite, Readiness, diag_endpoint, listener_check
from apptunnel.metrics import AgentMetrics
from apptunnel.startup import Listeners, fatal
from apptunnel.tls.contexts import ClientTls, client_context
from apptunnel.tls.layer import TlsClientEndpoint, client_failure
from apptunnel.tunnel.protocol import TunnelProtocol

__all__ = ["AgentService"]

log = Logger()

CONNECT_TIMEOUT = 10.0
HELLO_TIMEOUT = 15.0
DRAIN_TIMEOUT = 10.0
REFUSED_RETRY = 30.0
RENEW_RETRY_MIN = 6.0
MAX_REFUSALS_LOGGED = 20
ANNOUNCE_RETRY = 5.0
ANNOUNCE_RETRY_MAX = 300.0


def _version() -> str:
    try:
        return metadata.version("apptunnel")
    except metadata.PackageNotFoundError:
        return "0+unknown"


VERSION = _version()


def _jitter() -> float:
    return random.random()


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _line(text: str) -> str:
    """A peer's text for one log line: bounded, no newlines."""
    return " ".join(text[:300].split())


def _iso(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).isoformat(
        timespec="seconds")


class _AgentTunnel:
    """The agent's TunnelHandler for one connection: hello, then answer streams."""

    def __init__(self, service: AgentService, link: _ProxyLink) -> None:
        self._service = service
        self.link = link
        self.proxy_id = ""                   # from hello_ok
        self.tunnel: TunnelProtocol | None = None
        self.up = False
        self._timer = None
        self.announced: list | None = None   # the apps this tunnel's proxy last heard
        self._retry = None                   # sends a refused announcement again
        self._retries = 0

    def tunnel_ready(self, tunnel: TunnelProtocol) -> None:
        # Sent before the handshake finishes, TLS holds it until the proxy is verified
        # against our CA (and the proxy has verified our certificate).
        self.tunnel = tunnel
        self._service.handlers.add(self)
        hello = self._service.hello_message()
        self.announced = hello["apps"]
        tunnel.send_control(hello)
        self._timer = self._service.reactor.callLater(HELLO_TIMEOUT, self._unanswered)

    def control_received(self, tunnel: TunnelProtocol, message: dict) -> None:
        try:
            answer = messages.parse(message)
        except messages.MessageError as err:
            log.warn("tunnel to {peer}: ignoring a malformed message: {reason}",
                     peer=tunnel.peer, reason=_line(str(err)))
            return
        if isinstance(answer, messages.HelloOk) and not self.up:
            self._cancel_timer()
            self.up = True
            self.proxy_id = answer.proxy_id[:64]
            for app, reason in answer.refused[:1000]:
                log.error("the proxy refused app {app}: {reason}", app=app[:64],
                          reason=_line(reason))
            names = {app for app, _ in answer.refused}
            serving = [a["name"] for a in self.announced or () if a["name"] not in names]
            log.info("tunnel to {peer} up (proxy {proxy_id}), serving {apps}",
                     peer=tunnel.peer, proxy_id=answer.proxy_id[:64] or "?",
                     apps=", ".join(serving) or "no apps")
            self._service.tunnel_up(self)
        elif isinstance(answer, messages.Proxies) and self.up:
            self._service.proxies_received(answer)
        elif isinstance(answer, messages.HelloRefused) and not self.up:
            self._cancel_timer()
            log.error("the proxy at {addr} refused this agent: {reason}",
                      addr=self.link.addr, reason=_line(answer.message))
            self._service.refused = True
            self._service.rejoin_wanted = answer.rejoin
            tunnel.close()
        elif isinstance(answer, (messages.RenewOk, messages.RenewRefused)) and self.up:
            self._service.renewal_answered(answer)
        elif isinstance(answer, messages.Trust) and self.up:
            self._service.trust_received(answer)
        elif isinstance(answer, messages.AppResources) and self.up:
            self._service.resources_received(answer)
        elif isinstance(answer, messages.AnnounceOk) and self.up:
            for app, reason in answer.refused[:MAX_REFUSALS_LOGGED]:
                log.error("the proxy refused app {app}: {reason}", app=app[:64],
                          reason=_line(reason))
            self._announce_again(bool(answer.refused))
        else:
            log.warn("tunnel to {peer}: ignoring unexpected message {kind}",
                     peer=tunnel.peer, kind=messages.kind_of(message))

    def stream_requested(self, tunnel: TunnelProtocol, target: dict) -> defer.Deferred:
        return self._service.dialer.stream_requested(tunnel, target)

    def _announce_again(self, refused: bool) -> None:
        """A refused announcement is sent again later (5 s, doubling up to 5 min): an app
        shared with other agents whose dynamic label changed first is refused until the
        others' values agree, and would otherwise wait for its own next change."""
        self._cancel_retry()
        if not refused:
            self._retries = 0
            return
        delay = min(ANNOUNCE_RETRY_MAX, ANNOUNCE_RETRY * 2 ** self._retries)
        self._retries = min(self._retries + 1, 16)
        self._retry = self._service.reactor.callLater(delay, self._resend)

    def _resend(self) -> None:
        self._retry = None
        self.announced = None
        self._service.apps_changed()

    def _cancel_retry(self) -> None:
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None

    def tunnel_lost(self, tunnel: TunnelProtocol, reason: Failure) -> None:
        self._cancel_timer()
        self._cancel_retry()
        self._service.handlers.discard(self)
        if self.up:
            log.info("tunnel to {peer} lost: {reason}", peer=tunnel.peer,
                     reason=reason.getErrorMessage())
            self._service.tunnel_down(self)
            return
        self._service.hello_failed(self, reason)

    def _unanswered(self) -> None:
        self._timer = None
        log.warn("the proxy at {addr} did not answer our hello within {s:.0f}s",
                 addr=self.link.addr, s=HELLO_TIMEOUT)
        if self.tunnel is not None:
            self.tunnel.close()

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


class _TunnelContexts:
    """The tunnels' client TLS context, made from the identity current at each dial (so a
    reconnect presents a renewed certificate and trusts the host CAs of a rotation), and
    made again only when that identity changed."""

    def __init__(self, service: AgentService) -> None:
        self._service = service
        self._made: tuple[ClientTls, stdlib_ssl.SSLContext] | None = None

    def __call__(self) -> stdlib_ssl.SSLContext:
        tls = self._service.identity.tunnel_tls()
        if self._made is None or self._made[0] != tls:
            self._made = (tls, client_context(tls))
        return self._made[1]


class _Closed(Protocol):
    """Stands in for a tunnel when ClientService reconnects during shutdown."""

    def connectionMade(self) -> None:
        self.transport.abortConnection()


class _TunnelFactory(Factory):
    """One TunnelProtocol per connection; none while the service is shutting down."""

    noisy = False

    def __init__(self, service: AgentService, link: _ProxyLink) -> None:
        self._service = service
        self._link = link

    def buildProtocol(self, addr) -> Protocol:
        if self._service.stopping:
            return _Closed()
        config = self._service.config
        return TunnelProtocol(
            _AgentTunnel(self._service, self._link), self._service.reactor, initiator=True,
            keepalive_interval=config.keepalive_interval,
            keepalive_timeout=config.keepalive_timeout,
        )


class _ProxyLink:
    """One proxy address the agent keeps a tunnel to: its ClientService and its own count
    of failed attempts (so one unreachable proxy backs off alone)."""

    def __init__(self, service: AgentService, addr: str, seed: bool) -> None:
        self._service = service
        self.addr = addr
        self.seed = seed
        self.host, self.port = split_host_port(addr)
        self.failures = 0              # tunnels in a row that ended without hello_ok
        self.paused = False            # the seed, while other tunnels reach every proxy
        self.client: ClientService | None = None
        self._backoff = backoffPolicy(initialDelay=0.5, maxDelay=30.0, factor=2.0,
                                      jitter=_jitter)

    @property
    def running(self) -> bool:
        return self.client is not None

    def start(self) -> None:
        self.paused = False
        if self.client is not None:
            return
        service = self._service
        # TLS on ssl.SSLObject (apptunnel/tls); the proxy's certificate must chain to our
        # host CAs and name the host dialled. A turn's frames leave in one run of records.
        endpoint = TlsClientEndpoint(
            HostnameEndpoint(service.reactor, loopback_host(self.host), self.port,
                             timeout=CONNECT_TIMEOUT),
            service.tunnel_contexts, self.host, batch_clock=service.reactor,
        )
        self.client = ClientService(endpoint, _TunnelFactory(service, self),
                                    retryPolicy=self._retry_delay, clock=service.reactor)
        self.client.setServiceParent(service)

    def stop(self) -> None:
        """Stop dialling; a live tunnel of this link is closed by ClientService."""
        client, self.client = self.client, None
        if client is not None:
            client.disownServiceParent()

    def _retry_delay(self, attempt: int) -> float:
        """ClientService counts failed connects; we also count refused/unanswered hellos,
        which ClientService sees as connections that were made."""
        return self._backoff(max(attempt, self.failures))


class AgentService(MultiService):
    """Joins when needed, keeps the tunnel to the proxy, dials apps for its streams."""

    def __init__(self, config: AgentConfig, reactor) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.metrics = AgentMetrics(tunnels=self._tunnel_stats)
        self.dialer = UpstreamDialer(reactor, config.apps, metrics=self.metrics)
        self.dynamic = DynamicLabels(reactor, self.apps_changed)
        self.dynamic.configure(list(config.apps))
        self.resource_apps: list[AppConfig] = []   # app resources the proxy sent us
        self._selectors = tuple(parse_label_selector("resources", raw) for raw in config.resources)
        os.makedirs(config.data_dir, mode=0o700, exist_ok=True)  # OSError: one line in tap.py
        self.identity = AgentIdentity.load(config.data_dir)
        self.tunnel_contexts = _TunnelContexts(self)
        if self.identity is None and not config.join_token:
            raise ConfigError(config.path, f"no saved identity in {config.data_dir}: set "
                                           "join.token and join.ca_pin to join the cluster",
                              key="join")
        if (self.identity is not None and not config.join_token
                and self.identity.not_after <= reactor.seconds()):
            raise JoinError(f"the agent certificate in {config.data_dir} expired at "
                            f"{_iso(self.identity.not_after)}: join again with a new token "
                            f"(set join.token and join.ca_pin in {config.path})")
        self.links: dict[str, _ProxyLink] = {}    # address -> link; the seed is proxy_addr
        self._peer_addrs: set[str] = set()        # the addresses of the last ``proxies``
        self.handlers: set[_AgentTunnel] = set()
        self._joining: defer.Deferred | None = None
        self.stopping = False
        self.refused = False           # the last hello was refused (hello_error)
        self.rejoin_wanted = False     # ... because our certificate is no longer good
        self._renew_call = None
        self._renew_sent = False
        # /metrics, /healthz, /readyz on diag_addr (apptunnel/diag.py); ready = a tunnel is up.
        self.listeners = Listeners()
        self.readiness = Readiness(reactor, {
            "listeners": listener_check(self.listeners),
            "tunnel": lambda: None if any(h.up for h in self.handlers) else FAILING,
        })
        if config.diag_addr is not None:
            self.listeners.add(f"diag_addr {config.diag_addr}",
                               diag_endpoint(reactor, config.diag_addr),
                               DiagSite(self.metrics.registry, self.readiness))

    def _tunnel_stats(self):
        """(proxy address, open streams, keepalive round trip) per live tunnel, for /metrics."""
        return [(h.tunnel.peer, h.tunnel.stream_count, h.tunnel.rtt)
                for h in self.handlers if h.up and h.tunnel is not None]

    # -- lifecycle ---------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.listeners.listen().addErrback(
            lambda f: fatal(self.reactor, f"apptunnel-agent: {f.getErrorMessage()}"))
        self.dynamic.start()
        if self._identity_usable():
            self._start_tunnel()
        else:
            self._joining = defer.ensureDeferred(self._join_until_done())
            self._joining.addErrback(self._join_failed)

    def _join_failed(self, failure: Failure) -> None:
        """Cancelled by stopService, or a failure no retry heals (e.g. data_dir not
        writable): then one line and exit 1, not a traceback and an idle agent."""
        if failure.check(defer.CancelledError):
            return
        if failure.check(OSError):
            reason = f"cannot save the agent identity: {os_error_text(failure.value)}"
        else:
            reason = f"cannot join the cluster: {failure.getErrorMessage()}"
        fatal(self.reactor, f"apptunnel-agent: {reason}")

    @defer.inlineCallbacks
    def stopService(self):
        self.stopping = True  # no new tunnel while the old one drains
        self.dynamic.stop()
        if self._joining is not None:
            self._joining.cancel()
            self._joining = None
        self._cancel_renewal()
        draining = []
        for handler in list(self.handlers):
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
        yield self.listeners.stop()

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
        """Our hello: the host id, the configured apps (those whose dynamic labels all
        have a value) and our ``resources`` selectors. App resources are announced only
        after this proxy sent them (``announce``), never from an earlier tunnel's list."""
        return messages.Hello(
            host_id=self.identity.host_id,
            version=VERSION,
            apps=self._announcements(self.config.apps),
            resources=self.config.resources,
        ).to_dict()

    def _announcements(self, apps) -> tuple[messages.AppAnnouncement, ...]:
        out = []
        for app in apps:
            labels = self.dynamic.labels(app)
            if labels is None:
                continue   # a dynamic label has no value yet: announced once it has
            out.append(messages.AppAnnouncement(
                name=app.name,
                uri=app.uri,
                labels=labels,
                public_addr=app.public_addr,
                rewrite_headers=tuple(app.rewrite_headers),
                jwt_claims=app.jwt_claims,
                tcp_ports=app.tcp_ports,
                description=app.description,
            ))
        return tuple(out)

    # -- app resources and dynamic labels ----------------------------------------------

    def resources_received(self, answer: messages.AppResources) -> None:
        """The app resources our selectors match now: serve exactly those (with the
        static apps), each read by our own config parser and checked against our own
        selectors (none: nothing is served); a static app keeps its name."""
        static = {app.name for app in self.config.apps}
        apps = []
        for doc in answer.resources:
            name = doc["metadata"]["name"]
            try:
                app = app_from_resource(f"app resource {name}", doc)
            except ConfigError as err:
                log.error("ignoring {error}", error=_line(err.one_line()))
                continue
            if app.name in static:
                log.error("ignoring app resource {app}: a configured app has that name",
                          app=app.name)
                continue
            if not any(selector_matches(sel, app.labels) for sel in self._selectors):
                # Deny by default: only what our own selectors ask for, whatever we are sent.
                log.error("ignoring app resource {app}: our resources selectors do not "
                          "match its labels", app=app.name)
                continue
            apps.append(app)
        if apps != self.resource_apps:
            added = sorted({a.name for a in apps} - {a.name for a in self.resource_apps})
            gone = sorted({a.name for a in self.resource_apps} - {a.name for a in apps})
            log.info("app resources: serving {apps}{added}{gone}",
                     apps=", ".join(a.name for a in apps) or "none",
                     added=f"; new {', '.join(added)}" if added else "",
                     gone=f"; removed {', '.join(gone)}" if gone else "")
        self.resource_apps = apps
        every = list(self.config.apps) + apps
        self.dialer.set_apps(every)
        self.dynamic.configure(every)
        self.apps_changed()

    def apps_changed(self) -> None:
        """Tell every proxy what we serve now, where that differs from what it heard."""
        message = messages.Announce(
            apps=self._announcements(list(self.config.apps) + self.resource_apps)).to_dict()
        for handler in list(self.handlers):
            if handler.up and handler.announced != message["apps"] and handler.tunnel is not None:
                handler.announced = message["apps"]
                handler.tunnel.send_control(message)

    def _start_tunnel(self) -> None:
        seed = self.links[self.config.proxy_addr] = _ProxyLink(self, self.config.proxy_addr,
                                                               seed=True)
        seed.start()

    def tunnel_up(self, handler: _AgentTunnel) -> None:
        handler.link.failures = 0
        self.refused = False
        if self._dedupe(handler):
            return
        if self._renew_call is None:
            self._renew_sent = False   # an answer lost with an earlier tunnel never comes
            self._schedule_renewal((self.identity.not_after - self.reactor.seconds()) * 2 / 3)

    def _dedupe(self, handler: _AgentTunnel) -> bool:
        """One tunnel per proxy: when ``handler`` reached a proxy another live tunnel holds,
        close the seed's (pausing the seed) or else the newer one; True if ``handler``
        was closed."""
        other = next((h for h in self.handlers if h is not handler and h.up
                      and h.proxy_id and h.proxy_id == handler.proxy_id), None)
        if other is None:
            return False
        doomed = other if other.link.seed and not handler.link.seed else handler
        log.info("tunnel to {addr} reaches proxy {proxy_id}, already held: closing it",
                 addr=doomed.link.addr, proxy_id=doomed.proxy_id)
        if doomed.link.seed:
            # Paused until no tunnel is up; streams already on it finish first (go_away),
            # then tunnel_down stops its ClientService instead of reconnecting.
            doomed.link.paused = True
            doomed.tunnel.go_away("duplicate tunnel").addErrback(lambda _: None)
        else:
            self._forget(doomed.link)
        return doomed is handler

    def proxies_received(self, answer: messages.Proxies) -> None:
        """Keep a link to every live proxy we do not reach yet; forget links to proxies
        gone from the list whose tunnel is down."""
        self._peer_addrs = {addr for _, addr in answer.proxies}
        held = {h.proxy_id for h in self.handlers if h.up and not h.link.seed}
        for proxy_id, addr in answer.proxies:
            if self.stopping or addr in self.links or proxy_id in held:
                continue
            log.info("learned proxy {proxy_id} at {addr}", proxy_id=proxy_id, addr=addr)
            link = self.links[addr] = _ProxyLink(self, addr, seed=False)
            link.start()
        for link in list(self.links.values()):
            if not link.seed and link.addr not in self._peer_addrs and not self._up(link):
                self._forget(link)

    def _up(self, link: _ProxyLink) -> bool:
        return any(h.up and h.link is link for h in self.handlers)

    def _forget(self, link: _ProxyLink) -> None:
        if not link.seed:
            log.info("forgetting proxy address {addr}", addr=link.addr)
            self.links.pop(link.addr, None)
        link.stop()

    def tunnel_down(self, handler: _AgentTunnel) -> None:
        """A live tunnel ended: forget its proxy if it left the list; with no tunnel up,
        dial the seed again (the balancer finds whichever proxy lives)."""
        link = handler.link
        if link.paused:
            link.stop()
        elif not link.seed and link.addr not in self._peer_addrs:
            self._forget(link)
        if self.stopping or any(h.up for h in self.handlers):
            return
        seed = self.links.get(self.config.proxy_addr)
        if seed is not None and not seed.running:
            seed.start()

    def hello_failed(self, handler: _AgentTunnel, reason: Failure) -> None:
        """The tunnel ended before hello_ok: one line saying why (the refusal itself was
        logged already), and a longer wait before the next attempt."""
        handler.link.failures += 1
        if handler.link.paused:
            handler.link.stop()
        expired = self.identity.not_after <= self.reactor.seconds()
        if (self.rejoin_wanted or expired) and self.config.join_token and not self.stopping:
            # Next turn: ClientService must first see this disconnect in its own state.
            self.rejoin_wanted = self.refused = False
            self.reactor.callLater(0, self._rejoin)
            return
        if self.refused:
            return
        if expired:
            log.error("the agent certificate expired at {when}: join again with a new token "
                      "(set join.token and join.ca_pin in {path} and restart)",
                      when=_iso(self.identity.not_after), path=self.config.path)
            return
        log.warn("tunnel to {addr} not established: {reason}", addr=handler.link.addr,
                 reason=client_failure(reason.value, "the proxy") or reason.getErrorMessage())

    def _rejoin(self) -> None:
        """Our certificate is expired or unknown to the proxy and a token is configured:
        stop reconnecting with it and join again (the token may still have a use)."""
        if self.stopping or not self.links:
            return
        log.warn("joining again with the configured token")
        links, self.links = list(self.links.values()), {}
        for link in links:
            link.stop()
        self._cancel_renewal()
        self._joining = defer.ensureDeferred(self._join_until_done())
        self._joining.addErrback(lambda f: f.trap(defer.CancelledError))

    # -- host CAs (a host-CA rotation, auth/ca_set.py) ----------------------------------

    def trust_received(self, answer: messages.Trust) -> None:
        """A proxy's host CAs, issuing one first: kept (agent/trust.py) and trusted for
        every proxy from the next connection on; when our certificate is from another
        CA than the issuing one, renew soon, well inside the rotation's grace."""
        identity = self.identity
        cert = x509.load_pem_x509_certificate(identity.cert_pem)
        try:
            certs = parse_trust_set(list(answer.trusted_cas), cert)
            pems = tuple(c.public_bytes(serialization.Encoding.PEM) for c in certs)
            if pems != identity.trusted_pems:
                save_trust_set(self.config.data_dir, list(answer.trusted_cas), cert)
                self.identity = attrs.evolve(identity, trusted=pems)
                log.info("trusting {count} host CA(s) for proxies now (issuing: {pin})",
                         count=len(pems), pin=cert_pin(certs[0]))
        except (TrustSetError, OSError) as err:
            log.warn("ignoring the host CAs a proxy sent: {error}", error=_line(str(err)))
            return
        if not _issued_by(cert, certs[0]) and not self._renew_sent:
            log.info("the cluster issues agent certificates from a new host CA; renewing")
            self._schedule_renewal(1.0 + 4.0 * _jitter())

    # -- certificate renewal -----------------------------------------------------------

    def _schedule_renewal(self, delay: float) -> None:
        self._cancel_renewal()
        self._renew_call = self.reactor.callLater(max(1.0, delay), self._renew)

    def _cancel_renewal(self) -> None:
        if self._renew_call is not None and self._renew_call.active():
            self._renew_call.cancel()
        self._renew_call = None

    def _renew(self) -> None:
        """Ask a live tunnel for a new certificate; without one, the next hello_ok will."""
        self._renew_call = None
        handler = next((h for h in self.handlers if h.up), None)
        if handler is None or self.stopping:
            return
        csr = make_csr(self.identity.key_pem, self.identity.host_id)
        self._renew_sent = True
        handler.tunnel.send_control(messages.Renew(csr=csr).to_dict())

    def renewal_answered(self, answer: messages.RenewOk | messages.RenewRefused) -> None:
        self._renew_sent = False
        remaining = self.identity.not_after - self.reactor.seconds()
        if isinstance(answer, messages.RenewRefused):
            log.error("certificate renewal refused: {reason} (certificate valid until {when})",
                      reason=_line(answer.message), when=_iso(self.identity.not_after))
            self.metrics.renewal("refused")
            self._schedule_renewal(max(RENEW_RETRY_MIN, remaining / 4))
            return
        try:
            renewed = attrs.evolve(self.identity, cert_pem=answer.cert.encode("ascii"))
            renewed.check()
            if renewed.cert_host_id != self.identity.host_id:
                raise ValueError("the certificate names another agent")
            renewed.save_cert(self.config.data_dir)
        except (ValueError, TypeError, UnicodeError, OSError) as err:
            log.error("cannot use the renewed certificate: {error}", error=str(err))
            self.metrics.renewal("failed")
            self._schedule_renewal(max(RENEW_RETRY_MIN, remaining / 4))
            return
        self.identity = renewed
        self.metrics.renewal("success")
        log.info("agent certificate renewed, valid until {when}", when=_iso(renewed.not_after))
        self._schedule_renewal((renewed.not_after - self.reactor.seconds()) * 2 / 3)
