"""The proxy process: wires auth, storage, the web UI, the app edge and the tunnel listener.

Everything that can fail on bad files (config, certificates) is built in the constructor,
so `twistd` reports it as one line before anything listens. The cluster's keys are in the
backend (auth/keystore.py), which is async: they are read in the start step, before any
listener, and what holds them is built then (`_assemble`); keys it cannot use end the
process with one line, like a busy port. Listening, the audit writer
and the expiry sweep start with the service and stop with it, in reverse order. A port
that cannot be bound or a backend that cannot be read at start ends the process with one
line and exit 1 (`apptunnel.startup.fatal`); "serving" is logged only after both worked.
"""

from __future__ import annotations

import os
from importlib import metadata
from ssl import TLSVersion

import attrs
from OpenSSL import crypto
from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from apptunnel.admin.context import AdminContext
from apptunnel.audit import AuditLog
from apptunnel.audit.journal import Journal
from apptunnel.auth.access import AccessPolicy
from apptunnel.auth.bots import BotEnrolment
from apptunnel.auth.ca import load_server_tls, publish_ca_cert
from apptunnel.auth.ca_set import CaLoader, CaSet, CaWatcher
from apptunnel.auth.connectors.ldap import CONCURRENT_CHECKS, LdapSignIn
from apptunnel.auth.connectors.saml import CONCURRENT_CHECKS as SAML_CHECKS
from apptunnel.auth.connectors.saml import SamlSignIn, SpKeys, fetch_metadata
from apptunnel.auth.connectors.oidc import OidcSignIn, http_clients
from apptunnel.auth.connectors.signin import ExternalSignIn
from apptunnel.auth.connectors.store import ConnectorStore
from apptunnel.auth.directory import UserDirectory
from apptunnel.auth.enrolment import AgentEnrolment
from apptunnel.auth.jwt import JwtKeyRing, JwtSigner
from apptunnel.auth.keystore import (ClusterKeys, JwtKeyWatcher, KeyStore, KeyStoreError,
                                     ring_entries, sealer_from_file)
from apptunnel.auth.locks import LockAudit, LockWatcher
from apptunnel.auth.passwords import HashQueue
from apptunnel.auth.policy import RoleCache
from apptunnel.auth.request_service import AccessRequestService, RequestNotices
from apptunnel.auth.request_watch import RequestWatcher
from apptunnel.auth.request_webhook import RequestWebhook, treq_post
from apptunnel.auth.sessions import SessionManager
from apptunnel.auth.throttle import LoginThrottle
from apptunnel.backend import BackendError, open_backend
from apptunnel.config import ConfigError, ProxyConfig
from apptunnel.diag import FAILING, DiagSite, Readiness, diag_endpoint, listener_check
from apptunnel.metrics import CountedAudit, ProxyMetrics, TimedBackend
from apptunnel.net import is_ip
from apptunnel.proxy.app_resources import AppResources
from apptunnel.proxy.control import ControlFactory, ask_refresh, control_endpoint, control_path
from apptunnel.proxy.edge import EdgeFactory
from apptunnel.proxy.forward import AppForwarder
from apptunnel.proxy.identity import ProxyIdError, load_or_create_proxy_id
from apptunnel.proxy.peers import Peers
from apptunnel.proxy.limits import ConnectionTracker, LimitedFactory, raise_fd_limit
from apptunnel.proxy.pool import TunnelPool
from apptunnel.proxy.registry import AgentRegistry
from apptunnel.proxy.tcp_access import TcpAccess
from apptunnel.proxy.tls_switch import SwitchableTls, replace_together
from apptunnel.proxy.tunnel_server import TunnelServerFactory, tunnel_tls_options
from apptunnel.proxy.web_channel import WebSite
from apptunnel.proxy.workers import (WorkerSupervisor, control_name, public_endpoint, share,
                                     watch_parent, worker_place)
from apptunnel.startup import CannotStart, Listeners, fatal
from apptunnel.tls.contexts import ServerTls, server_context
from apptunnel.tls.layer import TlsServerEndpoint
from apptunnel.web.bots import BotRoutes
from apptunnel.web.access_requests import AccessRequestApi
from apptunnel.web.admin_routes import mount_admin
from apptunnel.web.routes import WebApp
from apptunnel.web.saml import SamlWeb

log = Logger()

_SWEEP_INTERVAL = 600.0
WORKER_REFRESH_WAIT = 1.5   # below the CLI's own 2 s wait for worker 0's answer


def _web_tls_options(cert_pem: bytes, key_pem: bytes, chain: list[bytes],
                     client_ca_pem: bytes | None = None,
                     also_trusted: tuple[bytes, ...] = ()) -> ServerTls:
    """TLS for browsers: our certificate (plus the CA, so clients can pin it), TLS 1.2+.

    ALPN is pinned to HTTP/1.1: the edge speaks HTTP/1.1, and clients that offer h2 as
    well (curl, browsers) must be answered with http/1.1.

    With `client_ca_pem` (the cluster CA) a client certificate is *requested*, not
    required: the CLI presents its user certificate, browsers present nothing and are
    served as before. A certificate that is offered must chain to the cluster CA, or the
    handshake fails; who it names is decided per request by the web routes.
    ``also_trusted``: further CAs a client certificate may chain to (the other side of a
    CA rotation, auth/ca_rotation.py).
    """
    client_cas = () if client_ca_pem is None else (client_ca_pem, *also_trusted)
    return ServerTls(cert_pem, key_pem, chain=tuple(chain), client_cas=client_cas,
                     alpn=("http/1.1",), minimum_version=TLSVersion.TLSv1_2)


def _read_tls_files(config: ProxyConfig) -> tuple[bytes, bytes]:
    """The operator's own certificate, checked now so a bad file is one clear line."""
    try:
        with open(config.tls_cert_file, "rb") as f:
            cert_pem = f.read()
        with open(config.tls_key_file, "rb") as f:
            key_pem = f.read()
    except OSError as err:
        raise ConfigError(f"{config.path}: tls: cannot read {err.filename}: {err.strerror}") from None
    try:
        crypto.load_certificate(crypto.FILETYPE_PEM, cert_pem)
        crypto.load_privatekey(crypto.FILETYPE_PEM, key_pem)
    except crypto.Error:
        raise ConfigError(f"{config.path}: tls: cert_file/key_file is not a PEM certificate/key") from None
    try:
        server_context(ServerTls(cert_pem, key_pem))
    except (OSError, ValueError) as err:   # ssl.SSLError: the key does not fit the certificate
        raise ConfigError(f"{config.path}: tls: cert_file/key_file cannot be used: {err}") from None
    return cert_pem, key_pem


class ProxyService(MultiService):
    """One proxy: web edge on `web_listen_addr`, agents' tunnels on `tunnel_listen_addr`."""

    def __init__(self, config: ProxyConfig, reactor, worker: int = 0) -> None:
        super().__init__()
        self.reactor = reactor
        os.makedirs(config.data_dir, mode=0o700, exist_ok=True)
        try:
            base_id = load_or_create_proxy_id(config.data_dir)
        except ProxyIdError as err:
            raise ConfigError(str(err)) from None
        # workers: N (proxy/workers.py): this worker's id, journal, diag and tunnel ports.
        self.place = worker_place(config, worker, base_id)
        self.config = config = self.place.config
        self.proxy_id = self.place.proxy_id
        self.workers = (WorkerSupervisor(reactor, config, refresh_child=self._refresh_worker)
                        if worker == 0 and config.workers > 1 else None)

        if config.tls_cert_file:
            self._operator_tls = _read_tls_files(config)

        # Metrics: counters moved by the request path, gauges read at scrape time.
        self.metrics = ProxyMetrics(
            tunnels=self._tunnel_stats, audit_pending=lambda: self.audit.pending,
            journal_bytes=lambda: self.audit.journal_size,
            tcp_sessions=lambda: [session.app_name for session in self.tcp_access.sessions])
        self.backend = TimedBackend(open_backend(config, reactor), self.metrics, reactor)
        try:
            sealer = sealer_from_file(config.backend_encryption_key_file)
        except KeyStoreError as err:
            raise ConfigError(f"{config.path}: {err}") from None
        self.jwt_watcher: JwtKeyWatcher | None = None
        self.ca_watcher: CaWatcher | None = None
        self.keystore = KeyStore(self.backend, reactor, data_dir=config.data_dir,
                                 cluster_name=config.cluster_name,
                                 jwt_algorithm=config.jwt_algorithm, sealer=sealer)
        # The audit journal (audit/journal.py) is read now; recover() replays it.
        try:
            journal, self._journal_held = Journal.open(
                self.place.journal_dir, config.audit.journal_max_bytes)
        except OSError as err:
            raise ConfigError(f"{config.path}: audit: journal in {config.data_dir}: {err.strerror}") from None
        self.audit = AuditLog(self.backend, reactor, json_file=config.audit_file,
                              proxy_id=self.proxy_id, journal=journal,
                              on_failure=config.audit.on_failure,
                              block_timeout=config.audit.block_timeout)
        self.audit = CountedAudit(self.audit, self.metrics)   # apptunnel_logins_total
        self.locks = LockWatcher(self.backend, reactor)
        self.users = UserDirectory(self.backend, reactor)
        throttle = config.throttle
        lock_audit = LockAudit(self.audit, reactor)  # one lock.enforced throttle for all paths
        # One sign-in throttle for every way in (local passwords, LDAP connectors); with
        # several workers each counts its share, so the machine admits about the limit.
        login_throttle = LoginThrottle(share(throttle.max_failures_per_user, config.workers),
                                       share(throttle.max_failures_per_address, config.workers),
                                       throttle.window, throttle.max_tracked,
                                       metrics=self.metrics)
        self.sessions = SessionManager(
            self.backend, reactor, config.session_ttl, locks=self.locks, audit=self.audit,
            users=self.users, lock_audit=lock_audit, throttle=login_throttle,
            hashes=HashQueue(throttle.concurrent_hashes, throttle.queued_hashes),
        )
        # LDAP binds block: their own small pool, so a hung directory holds a few threads
        # of its own and never the reactor's pool (SQLite, argon2) nor the reactor.
        self.connectors = ConnectorStore(self.backend, reactor)
        self.ldap_threads = ThreadPool(0, CONCURRENT_CHECKS, "apptunnel-ldap")
        self.ldap = LdapSignIn(
            connectors=self.connectors,
            signin=ExternalSignIn(self.backend, self.audit, reactor, users=self.users,
                                  locks=self.locks),
            throttle=login_throttle, audit=self.audit, clock=reactor,
            run_in_thread=lambda f, *args: deferToThreadPool(reactor, self.ldap_threads, f, *args),
        )
        # SAML: pysaml2 and xmlsec1 block too, so they get a small pool of their own.
        self.saml_threads = ThreadPool(0, SAML_CHECKS, "apptunnel-saml")
        self._login_throttle = login_throttle
        self.oidc = OidcSignIn(
            connectors=self.connectors,
            signin=ExternalSignIn(self.backend, self.audit, reactor, users=self.users,
                                  locks=self.locks),
            throttle=login_throttle, audit=self.audit, clock=reactor,
            http_for=http_clients(reactor), backend=self.backend,
        )
        self.roles = RoleCache(self.backend, reactor)
        # Access requests: notices (audit, webhook), the grants every decision asks.
        notices = RequestNotices(self.audit, reactor, _request_webhook(config, reactor))
        self.requests = RequestWatcher(self.backend, reactor, on_expired=notices.expired)
        self.access = AccessPolicy(roles=self.roles, audit=self.audit, clock=reactor,
                                   locks=self.locks, users=self.users, lock_audit=lock_audit,
                                   requests=self.requests)
        self.registry = AgentRegistry(reactor, grace=config.app_grace_period)
        self.app_resources = AppResources(self.backend, reactor)   # `kind: app`, for agents
        self.connections = _connection_tracker(config, reactor, self.metrics)
        self.listeners = Listeners()
        # /readyz (diag listener and web port): what a balancer needs before sending users.
        self.readiness = Readiness(reactor, {
            "backend": self._backend_answers,
            "listeners": listener_check(self.listeners),
            "audit": lambda: None if self.audit.writable else FAILING,
        })
        self._notices = notices
        # Several proxies: our row in the backend and the live set agents are told of.
        self.peers = Peers(self.backend, reactor, self.proxy_id, config.advertise_tunnel_addr,
                           _version())
        TimerService(_SWEEP_INTERVAL, self._sweep).setServiceParent(self)
        # PostgreSQL: changes made anywhere act here at once (polling stays behind it).
        self.change_listener = _change_listener(config, reactor, self.refresh_now)

    def _assemble(self, keys: ClusterKeys) -> None:
        """The parts that hold the cluster's keys, built once the key store is read (start)."""
        config, reactor, notices = self.config, self.reactor, self._notices
        loader = CaLoader(config.cluster_name, reactor)
        try:
            # The user and host CA roles (auth/ca_set.py); both start as the cluster CA.
            self.ca = CaSet(*loader.roles(keys.user_ca, keys.host_ca))
            self.jwt_keys = JwtKeyRing(reactor, ring_entries(keys.jwt))
        except (ValueError, KeyStoreError) as err:
            raise CannotStart(f"stored cluster key unusable: {err}") from None
        if self.jwt_keys.signing().algorithm != config.jwt_algorithm:
            log.warn("jwt.algorithm is {wanted} but the signing key is {have}; "
                     "`apptunnel auth rotate --type jwt` makes a {wanted} key",
                     wanted=config.jwt_algorithm, have=self.jwt_keys.signing().algorithm)
        # A rotation (`apptunnel auth rotate`) anywhere reaches this proxy's JWKS in a poll.
        self.jwt_watcher = JwtKeyWatcher(self.keystore, self.jwt_keys, reactor)
        # A CA rotation anywhere: the CAs issue and verify anew, and new connections get
        # TLS contexts that trust the new sets (and, after a host-CA grace, show the new
        # server certificate); connections already open keep theirs.
        web_tls, tunnel_tls = self._tls_options()
        self.web_tls, self.tunnel_tls = SwitchableTls(web_tls), SwitchableTls(tunnel_tls)
        self.ca_watcher = CaWatcher(self.keystore, self.ca, loader, reactor,
                                    on_change=self._cas_changed)
        self.saml = SamlSignIn(
            connectors=self.connectors,
            signin=ExternalSignIn(self.backend, self.audit, reactor, users=self.users,
                                  locks=self.locks),
            backend=self.backend, throttle=self._login_throttle, audit=self.audit,
            clock=reactor,
            keys=SpKeys(config.data_dir, config.cluster_name, reactor.seconds(),
                        material=(keys.saml.private_pem, keys.saml.record.public.encode())),
            fetch=fetch_metadata,
            run_in_thread=lambda f, *args: deferToThreadPool(reactor, self.saml_threads, f, *args),
        )
        self.signer = JwtSigner(self.jwt_keys, config.cluster_name, reactor, config.jwt_ttl)
        request_api = AccessRequestApi(
            AccessRequestService(backend=self.backend, roles=self.roles, notices=notices,
                                 watcher=self.requests, clock=reactor,
                                 find_app=self.registry.app, default_ttl=config.session_ttl,
                                 users=self.users),
            self.sessions, self.ca, self.audit, reactor)

        self.web = WebApp(
            config, self.sessions, self.roles, self.registry, self.audit,
            self.jwt_keys, self.ca, reactor, locks=self.locks, users=self.users,
            access=self.access, backend=self.backend, ldap=self.ldap,
            connectors=self.connectors, saml=SamlWeb(self.saml), oidc=self.oidc,
            bots=BotRoutes(BotEnrolment(ca=self.ca, backend=self.backend, clock=reactor,
                                        locks=self.locks,
                                        min_ttl=config.bot_min_certificate_ttl), self.audit),
            access_requests=request_api,
            readiness=self.readiness,
        )
        # The admin and audit API and pages (web/admin_routes.py): the CLI's services,
        # made to hold on this proxy at once by re-reading what they changed.
        mount_admin(self.web, AdminContext(self.backend, self.audit, reactor,
                                           config.public_addr, self._refresh_all))
        site = WebSite(self.web.resource())  # a deadline on every request head
        site.displayTracebacks = False
        self.pool = TunnelPool(self.registry)  # one pool: HTTP and TCP streams alike
        self.forwarder = AppForwarder(
            config=config,
            registry=self.registry,
            sessions=self.sessions,
            roles=self.roles,
            signer=self.signer,
            audit=self.audit,
            clock=reactor,
            connect_app=self.pool,
            ca=self.ca,
            locks=self.locks,
            users=self.users,
            access=self.access,
            metrics=self.metrics,
        )
        self.tcp_access = TcpAccess(
            ca=self.ca, registry=self.registry, roles=self.roles, audit=self.audit,
            clock=reactor, connect_app=self.pool, locks=self.locks,
            forwarder=self.forwarder, users=self.users, access=self.access,
        )
        edge = EdgeFactory(config.public_host, site, self.forwarder, tcp_access=self.tcp_access)
        web_endpoint = public_endpoint(reactor, config.workers, config.web_listen_port,
                                       config.web_listen_host, self.web_tls.context)
        self.listeners.add(f"web_listen_addr {config.web_listen_addr}", web_endpoint,
                           LimitedFactory(edge, self.connections))

        proxy_id = self.proxy_id
        enrolment = AgentEnrolment(ca=self.ca, backend=self.backend, clock=reactor,
                                   proxy_id=proxy_id, locks=self.locks,
                                   agent_cert_ttl=config.agent_cert_ttl)
        tunnel_factory = TunnelServerFactory(
            enrolment=enrolment,
            registry=self.registry,
            audit=self.audit,
            clock=reactor,
            proxy_id=proxy_id,
            public_host=config.public_host,
            public_port=config.public_port,
            keepalive_interval=config.keepalive_interval,
            keepalive_timeout=config.keepalive_timeout,
            locks=self.locks,
            allowed_public_addrs=config.allowed_public_addrs,
            resources=self.app_resources,
            peers=self.peers,
            trusted_cas=self.ca.host_trust,
        )
        self._tunnel_factory = tunnel_factory
        # A tunnel carries many requests' frames: a turn's writes leave as one (batch_writes).
        tunnel_endpoint = public_endpoint(reactor, config.workers, config.tunnel_listen_port,
                                          config.tunnel_listen_host, self.tunnel_tls.context,
                                          batch_writes=True)
        # The same limits as the web port: an agent's port is just as reachable.
        self.listeners.add(f"tunnel_listen_addr {config.tunnel_listen_addr}", tunnel_endpoint,
                           LimitedFactory(tunnel_factory, self.connections))
        if self.place.private_tunnel is not None:   # what agents told of this worker dial
            host, port = self.place.private_tunnel
            self.listeners.add(f"worker {self.place.index}'s tunnel port {port}",
                               TlsServerEndpoint(TCP4ServerEndpoint(reactor, port, interface=host),
                                                 self.tunnel_tls.context, reactor),
                               LimitedFactory(tunnel_factory, self.connections))
        if config.diag_addr is not None:
            self.listeners.add(f"diag_addr {config.diag_addr}",
                               diag_endpoint(reactor, config.diag_addr),
                               LimitedFactory(DiagSite(self.metrics.registry, self.readiness),
                                              self.connections, tls=False))
        # The admin CLI on this machine asks here so its changes hold before it returns.
        name = self.place.control_name
        control = control_endpoint(reactor, config.data_dir, name)
        if control is None:
            log.warn("data_dir path too long for the control socket: admin changes apply "
                     "at the next poll (about 2 s) instead of at once")
        else:
            self.listeners.add(f"the control socket {control_path(config.data_dir, name)}",
                               control, ControlFactory(self._refresh_control, reactor))

    def _tls_options(self):
        """(web, tunnel) TLS options for the CAs of now: the web port asks for client
        certificates of the trusted user CAs, the tunnel port of the trusted host CAs;
        both show a server certificate of the presented host CA (issued when needed)."""
        config, host = self.config, self.ca.host
        publish_ca_cert(config.data_dir, self.ca.cert_pem)
        # advertise_tunnel_addr's host too: agents sent here by other proxies verify it.
        advertise = config.advertise_tunnel_addr.rpartition(":")[0].strip("[]").lower()
        names = [config.public_host, "*." + config.public_host, "localhost"]
        if not is_ip(advertise) and advertise not in names:
            names.append(advertise)
        ips = sorted({"127.0.0.1", *_ip_hosts(config.web_listen_host, config.tunnel_listen_host,
                                              advertise)})
        own_cert, own_key = load_server_tls(config.data_dir, self.ca, names, ips)
        if config.tls_cert_file:
            web_cert, web_key = self._operator_tls
            web_chain: list[bytes] = []
        else:
            web_cert, web_key, web_chain = own_cert, own_key, [self.ca.cert_pem]
        [user_first, *user_more] = self.ca.user.trusted_pems()
        web = _web_tls_options(web_cert, web_key, web_chain, user_first, tuple(user_more))
        others = tuple(pem for pem in host.trusted_pems() if pem != self.ca.cert_pem)
        tunnel = tunnel_tls_options(self.ca.cert_pem, own_cert, own_key, also_trusted=others)
        return web, tunnel

    def _cas_changed(self) -> None:
        try:
            web, tunnel = self._tls_options()
            replace_together((self.web_tls, web), (self.tunnel_tls, tunnel))
            self._tunnel_factory.trust_changed()
        except (OSError, ValueError, crypto.Error) as err:   # ssl.SSLError is an OSError
            log.warn("cannot rebuild TLS for the new cluster CAs (new connections keep the "
                     "old ones): {error}", error=err)

    def startService(self) -> None:
        if self.place.index > 0:
            watch_parent(self.reactor)   # worker 0 gone (even kill -9): this one stops too
        self.audit.start()
        self.ldap_threads.start()
        self.saml_threads.start()
        self.locks.start()
        self.users.start()
        self.app_resources.start()
        self.requests.start()
        super().startService()
        # Bound here, not by StreamServerEndpointService: a busy port or a store it cannot
        # open must end the process (one line, exit 1) instead of an "Unhandled Error" and
        # a proxy that never serves; "serving" is said only once all of it works.
        starting = defer.ensureDeferred(self._start_serving())
        starting.addCallbacks(self._serving, self._cannot_serve)

    async def _start_serving(self) -> None:
        try:   # the audit chain continues, and the journal is replayed, before any request
            await self.audit.recover(self._journal_held)
        except BackendError as err:
            raise CannotStart(f"cannot use the backend: {err}") from None
        self._journal_held = None
        # The keys come from the backend (auth/keystore.py): read (or made) before anything
        # listens, so a proxy without usable keys never serves.
        try:
            keys = await self.keystore.load()
        except KeyStoreError as err:
            raise CannotStart(str(err)) from None
        except BackendError as err:
            raise CannotStart(f"cannot use the backend: {err}") from None
        if self.config.backend_type == "postgres" and self.config.backend_encryption_key_file is None:
            log.warn("the cluster's CA and signing keys are stored unencrypted in PostgreSQL: "
                     "set backend.encryption_key_file (docs/operator.rst, Keys and rotation)")
        self._assemble(keys)
        self.jwt_watcher.start()
        self.ca_watcher.start()
        await self.listeners.listen()
        try:
            await self.backend.list_locks(self.reactor.seconds())  # the store opens and reads
        except BackendError as err:
            raise CannotStart(f"cannot use the backend: {err}") from None

    def _serving(self, _: object) -> None:
        self.peers.start()   # registered once we listen: agents may be sent here now
        if self.change_listener is not None:
            self.change_listener.start()
        log.info(
            "apptunnel proxy {cluster} serving https://{public} (web {web}, tunnels {tunnel}); "
            "CA pin {pin}{worker}",
            cluster=self.config.cluster_name, public=self.config.public_addr,
            web=self.config.web_listen_addr, tunnel=self.config.tunnel_listen_addr,
            pin=self.ca.pin, worker=(f"; worker {self.place.index} of {self.place.count}, "
                                     f"proxy {self.proxy_id}" if self.place.count > 1 else ""),
        )
        if self.workers is not None:   # keys made and schema migrated: nothing races now
            self.workers.startService()

    def _cannot_serve(self, failure) -> None:
        fatal(self.reactor, f"apptunnel proxy: {failure.getErrorMessage()}")

    @defer.inlineCallbacks
    def stopService(self):
        workers = (self.workers.stopService() if self.workers is not None and self.workers.running
                   else None)
        yield self.listeners.stop()
        if self.change_listener is not None:
            self.change_listener.stop()
        yield super().stopService()
        self.locks.stop()
        self.users.stop()
        self.app_resources.stop()
        self.requests.stop()
        if self.jwt_watcher is not None:   # built at start, once the keys were read
            self.jwt_watcher.stop()
        if self.ca_watcher is not None:
            self.ca_watcher.stop()
        self.ldap_threads.stop()   # waits for binds in flight: each ends within its timeout
        self.saml_threads.stop()
        try:
            yield defer.ensureDeferred(self.peers.stop())
        except BackendError as err:
            log.warn("cannot remove this proxy's registration: {error}", error=err)
        yield defer.ensureDeferred(self.audit.stop())
        yield defer.ensureDeferred(self.backend.close())
        if workers is not None:
            yield workers

    def refresh_now(self) -> defer.Deferred:
        """Re-read locks, users, roles and app resources now (the control socket's ``refresh``)."""
        self.roles.invalidate()
        self.connectors.invalidate()
        self.access.forget()
        self.sessions.forget_cached()   # `users reset` ended sessions in storage
        keys = ([defer.ensureDeferred(self.jwt_watcher.refresh()),
                 defer.ensureDeferred(self.ca_watcher.refresh())]
                if self.jwt_watcher is not None else [])
        return defer.gatherResults([*keys, defer.ensureDeferred(self.locks.refresh()),
                                    defer.ensureDeferred(self.users.refresh()),
                                    defer.ensureDeferred(self.app_resources.refresh()),
                                    defer.ensureDeferred(self.requests.refresh())],
                                   consumeErrors=True)

    def _refresh_control(self) -> defer.Deferred:
        """The control socket: worker 0's is the CLI's and reaches every worker; another
        worker's is asked by worker 0 and refreshes that worker only."""
        return self._refresh_all() if self.place.index == 0 else self.refresh_now()

    def _refresh_all(self) -> defer.Deferred:
        """An admin change made here holds on every worker before it is answered: worker 0
        asks each other worker; another worker asks worker 0, which asks them all."""
        d = self.refresh_now()
        if self.workers is not None:
            d.addCallback(lambda _: self.workers.refresh())
        elif self.place.index > 0:
            d.addCallback(lambda _: self._refresh_worker(0, 2 * WORKER_REFRESH_WAIT))
            d.addErrback(lambda f: log.info("worker 0 did not confirm refresh ({error}): "
                                            "the others see the change at their next poll",
                                            error=f.getErrorMessage()))
        return d

    def _refresh_worker(self, index: int, wait: float = WORKER_REFRESH_WAIT) -> defer.Deferred:
        path = control_path(self.config.data_dir, control_name(index))
        return defer.ensureDeferred(ask_refresh(self.reactor, path, wait))

    async def _backend_answers(self) -> None:
        """Readiness: the store answers a small query (errors and timeouts are failures)."""
        await self.backend.list_locks(self.reactor.seconds())

    def _tunnel_stats(self):
        """(agent, open streams, keepalive round trip) per live tunnel, for /metrics."""
        return [(agent, tunnel.stream_count, getattr(tunnel, "rtt", None))
                for agent, tunnel in self.registry.tunnels()]

    def _sweep(self):
        """Drop expired sessions, codes and tokens so the store does not grow forever."""
        d = defer.ensureDeferred(self.backend.delete_expired(self.reactor.seconds()))
        d.addErrback(lambda f: log.warn("expiry sweep failed (will retry): {error}",
                                        error=f.getErrorMessage()))
        return d


def _change_listener(config: ProxyConfig, reactor, refresh):
    """On PostgreSQL, a LISTEN thread whose notices run ``refresh`` (debounced); else None."""
    if config.backend_type != "postgres":
        return None
    from apptunnel.backend.notify import ChangeListener, Debounced
    from apptunnel.backend.postgres import read_password_file

    password = (read_password_file(config.backend_password_file)
                if config.backend_password_file else None)
    return ChangeListener(config.backend_dsn, password, reactor,
                          Debounced(refresh, reactor).poke)


def _request_webhook(config: ProxyConfig, reactor) -> RequestWebhook | None:
    """The access-request webhook of ``access_requests:``, if configured."""
    wanted = config.access_requests
    if wanted is None:
        return None
    try:
        post = treq_post(reactor, wanted.ca_file)
    except Exception as err:  # noqa: BLE001 - unreadable or not a PEM certificate
        raise ConfigError(f"{config.path}: access_requests: ca_file: cannot load "
                          f"{wanted.ca_file}: {getattr(err, 'strerror', None) or err}") from None
    return RequestWebhook(wanted.webhook_url, reactor, post)


def _connection_tracker(config: ProxyConfig, reactor, metrics) -> ConnectionTracker:
    """One count for both listeners (they share the descriptor table), fitted into it."""
    wanted = config.limits
    budget = raise_fd_limit(wanted.max_connections)
    if budget < wanted.max_connections:
        log.warn("limits.max_connections {wanted} does not fit the open-file limit; using {budget} "
                 "(raise LimitNOFILE / ulimit -n)", wanted=wanted.max_connections, budget=budget)
    limits = attrs.evolve(wanted, max_connections=budget,
                          max_connections_per_ip=min(wanted.max_connections_per_ip, budget))
    return ConnectionTracker(limits, reactor, metrics)


def _version() -> str:
    try:
        return metadata.version("apptunnel")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def _ip_hosts(*hosts: str) -> list[str]:
    return [host for host in hosts if is_ip(host) and host not in ("0.0.0.0", "::")]
