"""Streams as Twisted client endpoints, so HTTP clients and relays run over a tunnel unchanged."""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from zope.interface import implementer

if TYPE_CHECKING:
    from apptunnel.tunnel.protocol import TunnelProtocol


@implementer(IStreamClientEndpoint)
class StreamEndpoint:
    """Each connect() opens one stream to ``target`` over ``tunnel``."""

    def __init__(self, tunnel: TunnelProtocol, target: dict) -> None:
        self._tunnel = tunnel
        self._target = target

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        """Open a stream; failures arrive as errbacks, cancel() before acceptance resets it."""
        try:
            return self._tunnel.connect_stream(self._target, factory)
        except Exception as e:  # an endpoint never raises
            return fail(e)
