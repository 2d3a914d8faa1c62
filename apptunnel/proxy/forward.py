"""The app edge's shared state: one `AppForwarder` builds an `AppConnection` per client.

The work is split by job: ``proxy/router.py`` decides what a request head gets (with the
access policy of ``auth/access.py``), ``proxy/app_heads.py`` rewrites heads,
``proxy/pool.py`` opens streams to apps, ``proxy/app_connection.py`` does the I/O. What is
left here is what all connections share: the connections themselves (cut live when the
policy says so, let go of draining tunnels) and the settings.
"""

from __future__ import annotations

from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from apptunnel.auth.access import AccessPolicy, LiveRecheck
from apptunnel.auth.callers import Caller
from apptunnel.proxy.app_connection import AppConnection
from apptunnel.proxy.app_heads import app_response_head
from apptunnel.proxy.http1 import ResponseHead
from apptunnel.proxy.pool import ConnectApp, TunnelPool
from apptunnel.catalog import AppInfo
from apptunnel.metrics import NO_METRICS, NoMetrics
from apptunnel.proxy.registry import AgentRegistry
from apptunnel.proxy.router import AppRouter

__all__ = ["AppConnection", "AppForwarder"]


class AppForwarder(Factory):
    """Shared state of the app edge; builds one ``AppConnection`` per client connection."""

    _log = Logger()

    def __init__(
        self,
        *,
        config,
        registry: AgentRegistry,
        sessions,
        roles,
        signer,
        audit,
        clock: IReactorTime,
        connect_app: ConnectApp,
        idle_timeout: float = 120.0,
        head_timeout: float = 30.0,
        upgraded_idle_timeout: float = 3600.0,
        connect_timeout: float = 15.0,
        decision_ttl: float = 5.0,
        max_cached_decisions: int = 10000,
        ca=None,
        locks=None,
        users=None,
        access: AccessPolicy | None = None,
        metrics: NoMetrics = NO_METRICS,
    ) -> None:
        self.config = config
        self.metrics = metrics   # each finished request is counted (apptunnel/metrics.py)
        self.registry = registry
        self.audit = audit
        self.clock = clock
        self.connect_app = connect_app
        self.idle_timeout = idle_timeout
        # Every request head must be whole this long after its first byte: the idle timer
        # alone restarts on each byte, so a head sent a byte a second would never end.
        self.head_timeout = head_timeout
        self.upgraded_idle_timeout = upgraded_idle_timeout
        self.connect_timeout = connect_timeout
        self._max_cached = max_cached_decisions
        # Every "may this caller open this app" goes to the one policy (shared with the
        # TCP access and the web UI when the proxy service hands it in).
        self.access = access or AccessPolicy(roles=roles, audit=audit, clock=clock, locks=locks,
                                             users=users, ttl=decision_ttl,
                                             max_cached=max_cached_decisions)
        self.router = AppRouter(config=config, registry=registry, sessions=sessions,
                                access=self.access, signer=signer, audit=audit, clock=clock)
        # With the cluster CA, app hosts also accept a user certificate (apps config).
        self.ca = ca
        self.connections: set[AppConnection] = set()
        self._cookies_dropped: set[tuple[str, bytes]] = set()  # (app, cookie name) logged once
        # A new lock, a removed user or a role change re-asks the policy for live ones.
        LiveRecheck(self.access, clock, lambda: self.connections, registry.app,
                    locks=locks, users=users, apps=registry)
        registry.add_drain_listener(self._tunnel_draining)

    def buildProtocol(self, addr: IAddress) -> "AppConnection":
        return AppConnection(self)

    def fixed_connection(self, app_name: str, caller: Caller, peer=None) -> "AppConnection":
        """A connection bound to one app and one certificate (``apptunnel proxy app``);
        ``peer`` names the client when the transport is a stream of a multiplexed one."""
        return AppConnection(self, fixed_app=app_name, caller=caller, peer=peer)

    def forget_decisions(self) -> None:
        """Decide every request afresh (roles were edited: ``apptunnel create -f``)."""
        self.access.forget()

    def tunnel_of(self, proto) -> object | None:
        """The tunnel under a stream to an app (None when the connector does not say)."""
        pool = self.connect_app
        return pool.tunnel_of(proto) if isinstance(pool, TunnelPool) else None

    def draining(self, proto) -> bool:
        """Whether the tunnel under a stream to an app is going away."""
        pool = self.connect_app
        return pool.draining(proto) if isinstance(pool, TunnelPool) else False

    def _tunnel_draining(self, tunnel) -> None:
        """An agent is going away: connections idle between requests let go of their
        stream on its tunnel now, so it can close; busy ones finish first."""
        for conn in list(self.connections):
            conn.tunnel_draining(tunnel)

    def _cookie_dropped(self, app: str, name: bytes) -> None:
        """One log line per (app, cookie name), not one per response."""
        if (app, name) in self._cookies_dropped:
            return
        if len(self._cookies_dropped) >= self._max_cached:
            self._cookies_dropped.clear()
        self._cookies_dropped.add((app, name))
        self._log.info("dropped a Set-Cookie with a Domain from app {app}: {name} (only host-only "
                       "cookies reach the browser)", app=app, name=name.decode("latin-1"))

    def response_head(self, head: ResponseHead, app: AppInfo, fixed: bool = False,
                      connection: bytes | None = None) -> ResponseHead:
        """The head the client sees (see ``app_heads.app_response_head``)."""
        return app_response_head(head, app, fixed, self._cookie_dropped, connection)
