"""The proxy's tunnel listener: agents join here, then keep their tunnels here.

Every connection is TLS 1.3. The client certificate is *requested* and, when present,
verified against the cluster CA by OpenSSL, but not required, because an agent that has
not joined yet has none. What a connection may do depends on that certificate:

* no certificate: exactly one ``join`` message (token + CSR), answered with the signed
  certificate or an error, then the connection is closed;
* an agent certificate of this cluster: a ``hello`` listing its apps, after which the
  apps are online in the registry for as long as the tunnel lives (and the certificate:
  the tunnel is cut when it expires unless the agent renewed it with ``renew``).

This module only speaks the protocol: messages are the typed records of
``apptunnel.messages``, and every decision with storage behind it (redeem a token, admit
an agent, renew its certificate) is asked of ``auth.enrolment.AgentEnrolment``.

What an agent may claim: it must be enrolled (an ``agents`` row written at join,
carrying its join token's scope), not locked, and every app it announces must fit
that scope, have its public address under ``*.PUBLIC_HOST`` (or in the operator's
``allowed_public_addrs``) and match the registry's definition of that name. An app that
fails is refused alone (listed in ``hello_ok.refused`` and audited); a hello that cannot
be accepted at all gets ``hello_error`` with the reason, then the connection closes.

Anything else (another first message, a malformed message, silence) gets one log line
and a closed connection. Streams only ever go proxy -> agent: the proxy refuses every
stream an agent tries to open.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from ssl import TLSVersion

from cryptography import x509
from OpenSSL import crypto
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

from apptunnel.auth.enrolment import AgentEnrolment, EnrolmentRefused
from apptunnel.auth.errors import AuthError
from apptunnel.auth.rbac import RoleError, parse_label_selector
from apptunnel.auth.tokens import scope_refusal
from apptunnel.catalog import AppInfo
from apptunnel.config import UNREWRITABLE_HEADERS
from apptunnel.messages import (
    Announce,
    AnnounceOk,
    AppAnnouncement,
    AppResources,
    Hello,
    HelloOk,
    HelloRefused,
    Join,
    JoinOk,
    JoinRefused,
    MessageError,
    Proxies,
    Trust,
    Renew,
    RenewOk,
    RenewRefused,
    kind_of,
)
from apptunnel.net import host_only
from apptunnel.proxy.app_resources import resource_refusal
from apptunnel.proxy.errors import ProxyError
from apptunnel.tls.contexts import ServerTls
from apptunnel.tunnel.errors import StreamRefused
from apptunnel.tunnel.frames import ErrorCode
from apptunnel.tunnel.protocol import TunnelProtocol

__all__ = ["TunnelServerFactory", "public_addr_refusal", "tunnel_tls_options"]

log = Logger()

RENEW_MIN_INTERVAL = 5.0
ANNOUNCE_MIN_INTERVAL = 0.5   # announcements closer than this are coalesced (latest wins)
MAX_REFUSALS_LOGGED = 20    # per hello: an agent cannot flood the log and the audit
FIRST_MESSAGE_TIMEOUT = 30.0

_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")
_HOSTNAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*\Z")


def tunnel_tls_options(ca_cert_pem: bytes, cert_pem: bytes, key_pem: bytes,
                       also_trusted: Sequence[bytes] = ()) -> ServerTls:
    """TLS 1.3 only; our cert plus the CA in the chain (so agents can check the pin);
    client certificates requested and verified against the cluster CA, not required (a
    joining agent has none yet). ``also_trusted``: further CA certificates client
    certificates may chain to (the other side of a CA rotation, auth/ca_rotation.py);
    empty outside a rotation."""
    return ServerTls(cert_pem, key_pem, chain=(ca_cert_pem,),
                     client_cas=(ca_cert_pem, *also_trusted), require_client_cert=False,
                     minimum_version=TLSVersion.TLSv1_3)


class TunnelServerFactory(ServerFactory):
    """Builds one TunnelProtocol (responder side) and one handler per agent connection.

    What an agent may do is decided by ``enrolment`` (join tokens, agent records, locks,
    certificates); this factory and its sessions only speak the protocol, check what an
    agent announces against the public-address rule and the registry, and cut tunnels.
    """

    def __init__(self, enrolment: AgentEnrolment, registry, audit, clock: IReactorTime,
                 proxy_id: str, public_host: str, public_port: int,
                 keepalive_interval: float = 5.0, keepalive_timeout: float = 15.0,
                 locks=None, allowed_public_addrs: tuple[str, ...] = (),
                 resources=None, peers=None,
                 trusted_cas: Callable[[], tuple[str, ...]] | None = None) -> None:
        self.enrolment = enrolment
        # The host CAs agents are to trust (issuing first; auth/ca_set.py), sent as
        # ``trust`` after hello_ok and renew_ok and to every agent when they change.
        self.trusted_cas = trusted_cas
        self.peers = peers           # proxy.peers.Peers: the live proxies agents are told of
        self.resources = resources   # proxy.app_resources.AppResources, or None
        self.registry = registry
        self.audit = audit
        self.clock = clock
        self.proxy_id = proxy_id
        self.public_host = public_host.lower().rstrip(".")
        self.public_port = public_port
        self.keepalive_interval = keepalive_interval
        self.keepalive_timeout = keepalive_timeout
        self.allowed_public_addrs = tuple(allowed_public_addrs)
        # host_id -> its registered sessions here, so a lock can cut them all.
        self.sessions: dict[str, set[TunnelSession]] = {}
        if locks is not None:
            locks.add_listener(self.lock_added)

    def lock_added(self, lock) -> None:
        """A new agent lock cuts that agent's tunnels here."""
        if lock.agent is None:
            return
        for session in list(self.sessions.get(lock.agent, ())):
            self.audit.emit("lock.enforced", actor=lock.agent, target=self.proxy_id,
                            outcome="failure", lock=lock.id, where="agent tunnel")
            session.cut(f"agent {lock.agent} is locked")

    def trust_changed(self) -> None:
        """The host CAs changed (a host-CA rotation): tell every registered agent."""
        for sessions in list(self.sessions.values()):
            for session in list(sessions):
                session.push_trust()

    def buildProtocol(self, addr) -> TunnelProtocol:
        return TunnelProtocol(
            TunnelSession(self), self.clock, initiator=False,
            keepalive_interval=self.keepalive_interval,
            keepalive_timeout=self.keepalive_timeout,
        )

    def default_public_addr(self, name: str) -> str:
        host = f"{name}.{self.public_host}"
        return host if self.public_port == 443 else f"{host}:{self.public_port}"

    def app_info(self, app: AppAnnouncement, host_id: str, where: str) -> AppInfo:
        """The registration an announcement asks for; HelloError when its public address
        would take the proxy's own host or header rewrites would break framing."""
        public_addr = app.public_addr or self.default_public_addr(app.name)
        if not self._valid_public_addr(public_addr):
            raise HelloError(f"{where}.public_addr is not a usable app address: "
                             f"{public_addr!r}")
        framing = [n for n, _ in app.rewrite_headers if n.lower() in UNREWRITABLE_HEADERS]
        if framing:
            raise HelloError(f"{where}.rewrite_headers may not set {framing[0]!r}")
        return AppInfo(
            name=app.name,
            uri=app.uri,
            labels=dict(app.labels),
            public_addr=public_addr.lower(),
            rewrite_headers=app.rewrite_headers,
            jwt_claims=app.jwt_claims,
            agent_id=host_id,
            tcp_ports=app.tcp_ports,
            description=app.description,
        )

    def _valid_public_addr(self, addr: str) -> bool:
        """A host[:port] that is not the proxy's own host (that would hijack the web UI)."""
        host, _, port = addr.lower().partition(":")
        if port and not (port.isdigit() and port.isascii() and 0 < int(port) < 65536):
            return False
        return bool(_HOSTNAME.match(host)) and host.rstrip(".") != self.public_host


def public_addr_refusal(addr: str, public_host: str, allowed: tuple[str, ...]) -> str | None:
    """Why an agent may not put an app at ``addr``, or None.

    Apps live at ``NAME.PUBLIC_HOST`` (one label, what the proxy's ``*.`` certificate
    covers). Anything else (``localhost:PORT``, another domain) would let an agent take
    requests for a name the operator never gave to apps, so it needs an entry in
    ``allowed_public_addrs``: ``host``, ``host:port`` or ``*.domain``.
    """
    addr = addr.lower()
    host = host_only(addr)
    label, dot, rest = host.partition(".")
    if dot and rest == public_host and _DNS_LABEL.match(label):
        return None
    for entry in allowed:
        if entry.startswith("*."):
            if host.endswith(entry[1:]) and len(host) > len(entry) - 1:
                return None
        elif entry == addr or entry == host:
            return None
    return (f"public address {addr} is outside *.{public_host} and not in the proxy's "
            "allowed_public_addrs")


class HelloError(ProxyError):
    """A hello message we will not register; the text is the logged reason."""


class TunnelSession:
    """The handler of one agent connection: join, or hello and then registered.

    States: ``waiting`` (no message yet), ``joining`` (join in progress, nothing else
    accepted), ``hello`` (hello being checked), ``registered`` (hello accepted; ``renew``
    is the one message it takes), ``closing``.
    """

    def __init__(self, factory: TunnelServerFactory) -> None:
        self._factory = factory
        self._enrolment = factory.enrolment
        self._state = "waiting"
        self._timer = None
        self._tunnel: TunnelProtocol | None = None
        self._peer = "?"
        self._host_id = ""
        self._expiry = None          # closes the tunnel when the agent certificate expires
        self._cert = None            # ... the certificate its hello was authenticated with
        self._renewing = False
        self._last_renew = float("-inf")
        self._scope = None           # the agent's token scope, checked on every announcement
        self._selectors: tuple = ()  # its ``resources`` selectors (parsed)
        self._pushed: list | None = None     # the app resources last sent to it
        self._announced: list[AppInfo] = []  # what it last announced (before the checks)
        self._serving: list[str] = []        # ... and what of it is registered
        self._last_announce = float("-inf")
        self._pending_announce: dict | None = None
        self._announce_call = None

    # -- TunnelHandler -----------------------------------------------------------------

    def tunnel_ready(self, tunnel: TunnelProtocol) -> None:
        self._tunnel = tunnel
        try:
            address = tunnel.transport.getPeer()
            self._peer = f"{address.host}:{address.port}"
        except AttributeError:
            pass
        self._timer = self._factory.clock.callLater(FIRST_MESSAGE_TIMEOUT, self._silent)

    def control_received(self, tunnel: TunnelProtocol, message: dict) -> None:
        self._tunnel = tunnel
        kind = message.get("type") if isinstance(message, dict) else None
        if self._state == "waiting":
            self._cancel_timer()
            try:
                role, name = self._peer_identity(tunnel)
            except AuthError as err:
                self._close(tunnel, f"client certificate refused: {err.message}")
                return
            if role is None and kind == Join.TYPE:
                self._state = "joining"
                self._start_join(tunnel, message)
                return
            if role == "agent" and kind == Hello.TYPE:
                self._state = "hello"
                d = defer.ensureDeferred(self._hello(tunnel, name, message))
                d.addErrback(self._hello_crashed, tunnel)
                return
            who = "unauthenticated connection" if role is None else f"{role} {name}"
            self._close(tunnel, f"unexpected first message {kind_of(message)} from {who}")
            return
        if self._state == "registered" and kind == Renew.TYPE:
            self._start_renew(tunnel, message)
            return
        if self._state == "registered" and kind == Announce.TYPE:
            self._announce_received(tunnel, message)
            return
        self._close(tunnel, f"unexpected message {kind_of(message)} in state {self._state}")

    def stream_requested(self, tunnel: TunnelProtocol, target: dict) -> defer.Deferred:
        return defer.fail(StreamRefused(ErrorCode.REFUSED, "the proxy accepts no streams"))

    def tunnel_going_away(self, tunnel: TunnelProtocol) -> None:
        """The agent is draining: no new streams here; idle keep-alive streams are let go
        so the tunnel can finish closing (registry listeners do that). Apps stay known."""
        if self._state == "registered":
            self._factory.registry.drain(tunnel)
            self._enrolment.draining(self._host_id)
            log.info("agent {host_id} ({peer}) is going away", host_id=self._host_id,
                     peer=self._peer)

    def tunnel_lost(self, tunnel: TunnelProtocol, reason: Failure) -> None:
        self._cancel_timer()
        if self._state == "registered":
            self._unregister(tunnel)
            log.info("agent {host_id} ({peer}) disconnected: {reason}", host_id=self._host_id,
                     peer=self._peer, reason=reason.getErrorMessage())
        self._state = "closing"

    def cut(self, reason: str) -> None:
        """End this agent's tunnel now (a lock, an expired certificate)."""
        if self._tunnel is not None and self._state != "closing":
            self._close(self._tunnel, reason)

    # -- join --------------------------------------------------------------------------

    def _start_join(self, tunnel: TunnelProtocol, message: dict) -> None:
        d = defer.ensureDeferred(self._join(tunnel, message))
        d.addErrback(self._join_crashed, tunnel)

    async def _join(self, tunnel: TunnelProtocol, message: dict) -> None:
        try:
            join = Join.parse(message)
        except MessageError:
            self._refuse_join(tunnel, str(message.get("host_id"))[:64], EnrolmentRefused(
                "malformed join message", "join message needs token, csr and host_id strings"))
            return
        try:
            joined = await self._enrolment.join(join.token, join.csr, join.host_id, self._peer)
        except EnrolmentRefused as err:
            if self._state != "closing":
                self._refuse_join(tunnel, join.host_id, err)
            return
        if self._state == "closing":
            return  # the agent went away meanwhile
        f = self._factory
        self._send(tunnel, JoinOk(cert=joined.cert_pem.decode("ascii"),
                                  ca=joined.ca_pem.decode("ascii")))
        f.audit.emit("agent.join", actor=join.host_id, target=f.proxy_id, outcome="success",
                     peer=self._peer)
        log.info("agent {host_id} joined from {peer}", host_id=join.host_id, peer=self._peer)
        self._finish(tunnel)

    def _refuse_join(self, tunnel: TunnelProtocol, host_id: str, err: EnrolmentRefused) -> None:
        """Tell the agent why (without detail that helps guessing) and log/audit the rest."""
        self._send(tunnel, JoinRefused(err.message))
        self._factory.audit.emit("agent.join", actor=host_id, target=self._factory.proxy_id,
                                 outcome="failure", peer=self._peer, reason=err.reason)
        log.warn("agent join from {peer} refused: {reason}", peer=self._peer, reason=err.reason)
        self._finish(tunnel)

    def _join_crashed(self, failure: Failure, tunnel: TunnelProtocol) -> None:
        log.failure("join from {peer} failed", failure, peer=self._peer)
        self._send(tunnel, JoinRefused("internal error, try again"))
        self._finish(tunnel)

    # -- hello -------------------------------------------------------------------------

    async def _hello(self, tunnel: TunnelProtocol, host_id: str, message: dict) -> None:
        f = self._factory
        try:
            hello = Hello.parse(message)
            if hello.host_id != host_id:
                raise HelloError(f"host_id {hello.host_id!r} does not match its certificate "
                                 f"({host_id})")
            apps = [f.app_info(app, host_id, f"apps[{index}]")
                    for index, app in enumerate(hello.apps)]
            selectors = tuple(parse_label_selector(f"resources[{index}].labels", raw)
                              for index, raw in enumerate(hello.resources))
        except RoleError as err:
            self._refuse_hello(tunnel, host_id, f"bad hello: {err.message}")
            return
        except (MessageError, HelloError) as err:
            self._refuse_hello(tunnel, host_id, f"bad hello: {err}")
            return
        cert = self._certificate(tunnel)
        try:
            scope = await self._enrolment.hello(host_id, cert)
        except EnrolmentRefused as err:
            if self._state == "hello":
                self._refuse_hello(tunnel, host_id, err.message, rejoin=err.rejoin)
            return
        if self._state != "hello":
            return  # the tunnel went away meanwhile
        self._scope, self._selectors = scope, selectors
        self._host_id = host_id
        serving, refused = self._register(tunnel, apps, [])
        self._state = "registered"
        f.sessions.setdefault(host_id, set()).add(self)
        self._cert = cert
        self._watch_expiry(cert.not_valid_after_utc.timestamp())
        self._send(tunnel, HelloOk(proxy_id=f.proxy_id, refused=tuple(refused)))
        self.push_trust()
        log.info("agent {host_id} connected from {peer} with apps {apps}", host_id=host_id,
                 peer=self._peer, apps=", ".join(serving) or "(none)")
        self._enrolment.connected(host_id, self._peer, tuple(serving), hello.version)
        if f.resources is not None:
            f.resources.add_listener(self._resources_changed)
            self._push_resources()
        if f.peers is not None:
            f.peers.add_listener(self._peers_changed)
            self._peers_changed(f.peers.live())

    def push_trust(self) -> None:
        """Send the agent the host CAs to trust (nothing without a provider)."""
        f = self._factory
        if f.trusted_cas is not None and self._state == "registered" and self._tunnel is not None:
            self._send(self._tunnel, Trust(trusted_cas=f.trusted_cas()))

    def _peers_changed(self, live) -> None:
        """Tell the agent every live proxy (after hello_ok and on each change), so it keeps
        a tunnel to each; an empty set (this proxy is not registered) is not sent."""
        if live and self._state == "registered" and self._tunnel is not None:
            self._send(self._tunnel, Proxies(proxies=tuple(live)))

    def _register(self, tunnel: TunnelProtocol, apps: list[AppInfo],
                  refused: list[tuple[str, str]]) -> tuple[list[str], list[tuple[str, str]]]:
        """Check each announced app (token scope, public address, app resources) and put
        what passes in the registry for this tunnel, replacing what it served before.
        Returns (serving names, refusals); refusals are logged and audited (bounded)."""
        f, host_id = self._factory, self._host_id
        self._announced = list(apps)
        accepted = []
        for app in apps:
            resource = f.resources.app(app.name) if f.resources is not None else None
            reason = (scope_refusal(self._scope, app.name, app.labels)
                      or public_addr_refusal(app.public_addr, f.public_host,
                                             f.allowed_public_addrs)
                      or (resource_refusal(resource, app, resource.public_addr
                                           or f.default_public_addr(app.name))
                          if resource is not None else None))
            if reason is None:
                accepted.append(app)
            else:
                refused.append((app.name, reason))
        refused += f.registry.add(tunnel, host_id, accepted)
        refused_names = {name for name, _ in refused}
        serving = self._serving = [a.name for a in accepted if a.name not in refused_names]
        for name, reason in refused[:MAX_REFUSALS_LOGGED]:
            log.warn("agent {host_id} ({peer}): app {app} refused: {reason}", host_id=host_id,
                     peer=self._peer, app=name, reason=reason)
            f.audit.emit("agent.app.refused", actor=host_id, target=name, outcome="failure",
                         reason=reason, peer=self._peer)
        if len(refused) > MAX_REFUSALS_LOGGED:
            log.warn("agent {host_id} ({peer}): {count} more apps refused", host_id=host_id,
                     peer=self._peer, count=len(refused) - MAX_REFUSALS_LOGGED)
        return serving, refused

    # -- app resources and announcements ----------------------------------------------

    def _resources_changed(self) -> None:
        """The app resources changed: an app this agent serves that a resource now defines
        otherwise is taken away (the resource's definition is THE definition), and an
        agent with selectors is sent those it matches, when that set changed."""
        if self._state != "registered" or self._tunnel is None:
            return
        if any(self._factory.resources.app(app.name) is not None for app in self._announced):
            before = self._serving
            serving, _ = self._register(self._tunnel, self._announced, [])
            if serving != before:
                self._enrolment.serving(self._host_id, tuple(serving))
        self._push_resources()

    def _push_resources(self) -> None:
        """Send an agent with selectors the resources they match, when that set changed."""
        if not self._selectors or self._state != "registered" or self._tunnel is None:
            return
        docs = self._factory.resources.matching(self._selectors)
        if docs == self._pushed:
            return
        self._pushed = docs
        self._send(self._tunnel, AppResources(resources=tuple(docs)))

    def _announce_received(self, tunnel: TunnelProtocol, message: dict) -> None:
        """At most one announcement per ANNOUNCE_MIN_INTERVAL; a burst keeps the latest."""
        now = self._factory.clock.seconds()
        self._pending_announce = message
        if self._announce_call is not None:
            return
        wait = self._last_announce + ANNOUNCE_MIN_INTERVAL - now
        if wait > 0:
            self._announce_call = self._factory.clock.callLater(wait, self._announce_now, tunnel)
        else:
            self._announce_now(tunnel)

    def _announce_now(self, tunnel: TunnelProtocol) -> None:
        self._announce_call = None
        message, self._pending_announce = self._pending_announce, None
        if message is None or self._state != "registered":
            return
        self._last_announce = self._factory.clock.seconds()
        f = self._factory
        try:
            announce = Announce.parse(message)
        except MessageError as err:
            self._close(tunnel, f"bad announce: {err}")
            return
        apps, refused = [], []
        for index, announced in enumerate(announce.apps):
            try:
                apps.append(f.app_info(announced, self._host_id, f"apps[{index}]"))
            except HelloError as err:
                refused.append((announced.name, str(err)))
        serving, refused = self._register(tunnel, apps, refused)
        self._send(tunnel, AnnounceOk(refused=tuple(refused)))
        log.info("agent {host_id} ({peer}) now serves {apps}", host_id=self._host_id,
                 peer=self._peer, apps=", ".join(serving) or "(none)")
        self._enrolment.serving(self._host_id, tuple(serving))

    def _refuse_hello(self, tunnel: TunnelProtocol, host_id: str, reason: str,
                      rejoin: bool = False) -> None:
        """One line for the agent (why), one for our log, an audit event, then close.
        ``rejoin``: the agent's certificate is no good here, a new join could help."""
        log.warn("agent {host_id} ({peer}) refused: {reason}", host_id=host_id,
                 peer=self._peer, reason=reason)
        self._factory.audit.emit("agent.hello", actor=host_id, target=self._factory.proxy_id,
                                 outcome="failure", reason=reason, peer=self._peer)
        self._send(tunnel, HelloRefused(reason, rejoin=rejoin))
        self._finish(tunnel)

    def _hello_crashed(self, failure: Failure, tunnel: TunnelProtocol) -> None:
        log.failure("hello from {peer} failed", failure, peer=self._peer)
        if self._state == "registered":
            self._unregister(tunnel)
        self._send(tunnel, HelloRefused("internal error, try again"))
        self._finish(tunnel)

    def _unregister(self, tunnel: TunnelProtocol) -> None:
        """Out of the registry; the enrolment hears it was the agent's last tunnel here."""
        f = self._factory
        f.registry.remove(tunnel)
        self._cancel_expiry()
        if f.resources is not None:
            f.resources.remove_listener(self._resources_changed)
        if f.peers is not None:
            f.peers.remove_listener(self._peers_changed)
        if self._announce_call is not None and self._announce_call.active():
            self._announce_call.cancel()
        self._announce_call = None
        mine = f.sessions.get(self._host_id, set())
        mine.discard(self)
        if not mine:
            f.sessions.pop(self._host_id, None)
            self._enrolment.disconnected(self._host_id)

    # -- certificate lifetime ----------------------------------------------------------

    def _watch_expiry(self, not_after: float) -> None:
        self._cancel_expiry()
        delay = max(0.0, not_after - self._factory.clock.seconds())
        self._expiry = self._factory.clock.callLater(delay, self._expired)

    def _cancel_expiry(self) -> None:
        if self._expiry is not None and self._expiry.active():
            self._expiry.cancel()
        self._expiry = None

    def _expired(self) -> None:
        """The certificate of the hello (or of the last renewal here) expired: the tunnel
        lives on only if the agent renewed it over another proxy, for the same key, and
        is not locked (several proxies); else, or when storage cannot say, it is cut."""
        self._expiry = None
        d = defer.ensureDeferred(self._enrolment.renewed_until(self._host_id, self._cert))
        d.addErrback(lambda f: log.warn("cannot check the renewal of agent {host_id}: {error}",
                                        host_id=self._host_id, error=f.getErrorMessage()))
        d.addCallback(self._renewed_until)

    def _renewed_until(self, until: float | None) -> None:
        if self._state != "registered" or self._expiry is not None:
            return
        if until is None or until <= self._factory.clock.seconds():
            self.cut(f"the certificate of agent {self._host_id} expired")
            return
        self._watch_expiry(until)

    def _start_renew(self, tunnel: TunnelProtocol, message: dict) -> None:
        now = self._factory.clock.seconds()
        if self._renewing or now - self._last_renew < RENEW_MIN_INTERVAL:
            self._send(tunnel, RenewRefused("renewal too soon"))
            return
        self._renewing, self._last_renew = True, now
        d = defer.ensureDeferred(self._renew(tunnel, message))
        d.addErrback(self._renew_crashed, tunnel)
        d.addBoth(lambda _: setattr(self, "_renewing", False))

    def _renew_crashed(self, failure: Failure, tunnel: TunnelProtocol) -> None:
        """The agent still gets an answer, so it tries again later."""
        log.warn("renewal for agent {host_id} failed: {error}", host_id=self._host_id,
                 error=failure.getErrorMessage())
        if self._state == "registered":
            self._send(tunnel, RenewRefused("internal error, try again"))

    async def _renew(self, tunnel: TunnelProtocol, message: dict) -> None:
        """A new certificate for the same key, while the agent is known and not locked."""
        f, host_id = self._factory, self._host_id
        try:
            renew = Renew.parse(message)
            issued = await self._enrolment.renew(host_id, renew.csr)
        except (MessageError, EnrolmentRefused) as err:
            if self._state != "registered":
                return
            reason = err.reason if isinstance(err, EnrolmentRefused) else str(err)
            log.warn("renewal for agent {host_id} refused: {reason}", host_id=host_id,
                     reason=reason)
            f.audit.emit("agent.renew", actor=host_id, target=f.proxy_id, outcome="failure",
                         reason=reason, peer=self._peer)
            self._send(tunnel, RenewRefused(reason))
            return
        if self._state != "registered":
            return
        self._watch_expiry(issued.not_after)
        self._send(tunnel, RenewOk(cert=issued.cert_pem.decode("ascii")))
        self.push_trust()
        f.audit.emit("agent.renew", actor=host_id, target=f.proxy_id, outcome="success",
                     peer=self._peer)
        log.info("renewed the certificate of agent {host_id}", host_id=host_id)

    # -- helpers -----------------------------------------------------------------------

    def _peer_identity(self, tunnel: TunnelProtocol) -> tuple[str | None, str | None]:
        """(role, name) from the client certificate, (None, None) without one; AuthError
        when the certificate is not a valid agent/user certificate of this cluster now."""
        cert = self._certificate(tunnel)
        if cert is None:
            return None, None
        return self._enrolment.verify_peer(cert)

    @staticmethod
    def _certificate(tunnel: TunnelProtocol) -> x509.Certificate | None:
        cert = getattr(tunnel, "peer_certificate", None)
        if isinstance(cert, crypto.X509):
            cert = cert.to_cryptography()
        return cert if isinstance(cert, x509.Certificate) else None

    def _send(self, tunnel: TunnelProtocol, message) -> None:
        """Send one typed control message (see apptunnel.messages), unless closing."""
        if self._state != "closing":
            tunnel.send_control(message.to_dict())

    def _finish(self, tunnel: TunnelProtocol) -> None:
        """Close after the answer has been written (go_away flushes first)."""
        if self._state == "closing":
            return
        self._state = "closing"
        tunnel.go_away("join finished").addErrback(lambda _: None)

    def _close(self, tunnel: TunnelProtocol, reason: str) -> None:
        log.warn("tunnel {peer} closed: {reason}", peer=self._peer, reason=reason)
        if self._state == "registered":
            self._unregister(tunnel)
        self._state = "closing"
        tunnel.close()

    def _silent(self) -> None:
        self._timer = None
        if self._tunnel is not None and self._state == "waiting":
            self._close(self._tunnel, f"no join or hello within {FIRST_MESSAGE_TIMEOUT:.0f}s")

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
