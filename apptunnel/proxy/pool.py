"""The tunnels serving each app, as one object the HTTP and TCP paths open streams through.

`TunnelPool` picks a tunnel for the registration a decision was made on (never another
definition of the app), opens a stream on it, and retries on another tunnel when the
open crossed the agent's GOAWAY, the tunnel died under it, or the agent refused the open
because it could not dial the app (failover: the agent accepts a stream only once the
app's socket is connected, so no byte of the request or response has moved yet). It remembers which tunnel each stream's protocol rides on, so a connection keeping
a stream between requests can let go of it when that tunnel starts draining.

`AppEndpoint` is the per-app ``IStreamClientEndpoint`` over any `ConnectApp` (the pool in
production, a plain function in tests): HTTP forwarding and TCP access both connect
through it, failures arrive as errbacks, and it never raises.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.python.failure import Failure
from zope.interface import implementer

from apptunnel.catalog import AppInfo
from apptunnel.proxy.registry import AgentRegistry
from apptunnel.tunnel.errors import StreamRefused, TunnelLost
from apptunnel.tunnel.frames import ErrorCode

# (app, stream target, factory) -> Deferred firing with the protocol built for the stream.
ConnectApp = Callable[[AppInfo, dict, IProtocolFactory], defer.Deferred]


_TRY_ELSEWHERE = (ErrorCode.GOING_AWAY, ErrorCode.CONNECT_FAILED)


class NoAgent(Exception):
    """No live tunnel serves the app right now."""


class TunnelPool:
    """Streams to apps over their agents' tunnels; a `ConnectApp` (call it)."""

    def __init__(self, registry: AgentRegistry) -> None:
        self._registry = registry
        self._riding: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __call__(self, app: AppInfo, target: dict, factory: IProtocolFactory) -> defer.Deferred:
        return self._connect(app, target, factory, frozenset())

    def endpoint(self, app: AppInfo, target: dict) -> AppEndpoint:
        return AppEndpoint(self, app, target)

    def tunnel_of(self, proto: IProtocol) -> Any | None:
        """The tunnel a protocol's stream rides on (None: not one of ours, or gone)."""
        return self._riding.get(proto)

    def draining(self, proto: IProtocol) -> bool:
        """Whether the tunnel under this stream is going away (keep it no longer than needed)."""
        tunnel = self._riding.get(proto)
        return tunnel is not None and tunnel.going_away

    def add_drain_listener(self, listener: Callable[[Any], None]) -> None:
        """``listener(tunnel)`` whenever a tunnel starts going away."""
        self._registry.add_drain_listener(listener)

    def _connect(self, app: AppInfo, target: dict, factory: IProtocolFactory,
                 tried: frozenset) -> defer.Deferred:
        # The checked registration, on a tunnel not going away and not tried yet.
        tunnel = self._registry.pick(app.name, app, exclude=tried)
        if tunnel is None:
            return defer.fail(NoAgent(app.name))

        def connected(proto):
            try:
                self._riding[proto] = tunnel
            except TypeError:
                pass  # a protocol that cannot be weakly referenced is simply not tracked
            return proto

        def elsewhere(failure: Failure):
            # Nothing of the request has gone out yet (an agent accepts a stream only once
            # it has dialed the app), so another tunnel may be tried: when the open crossed
            # the agent's GOAWAY, the tunnel died under it, or that agent could not reach
            # the app (failover). UNKNOWN_TARGET (a port the app does not declare) would be
            # refused by every agent of that definition alike.
            err = failure.value
            if isinstance(err, TunnelLost) or (
                    isinstance(err, StreamRefused) and err.code in _TRY_ELSEWHERE):
                again = self._connect(app, target, factory, tried | {tunnel})
                if isinstance(err, StreamRefused) and err.code == ErrorCode.CONNECT_FAILED:
                    # The app is down behind every agent: a 502 with the reason, not a 503.
                    again.addErrback(lambda f: failure if f.check(NoAgent) else f)
                return again
            return failure

        try:
            d = tunnel.connect_stream(target, factory)
        except Exception as err:  # never raise: callers expect an errback
            return defer.fail(err)
        return d.addCallbacks(connected, elsewhere)


def tunnel_connector(registry: AgentRegistry) -> TunnelPool:
    """Production ``connect_app``: the pool over ``registry`` (kept for existing callers)."""
    return TunnelPool(registry)


@implementer(IStreamClientEndpoint)
class AppEndpoint:
    """Each connect() opens one stream to ``app`` (as ``target`` says) via ``connect_app``."""

    def __init__(self, connect_app: ConnectApp, app: AppInfo, target: dict) -> None:
        self._connect_app = connect_app
        self._app = app
        self._target = target

    def connect(self, factory: IProtocolFactory) -> defer.Deferred:
        """Failures (NoAgent, StreamRefused, TunnelLost) arrive as errbacks, never raised."""
        return defer.maybeDeferred(self._connect_app, self._app, self._target, factory)
