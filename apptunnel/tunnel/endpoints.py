"""Streams as Twisted client endpoints, so HTTP clients and relays run over a tunnel unchanged.

Also the one socket option every apptunnel connection wants (``no_delay``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from zope.interface import implementer

if TYPE_CHECKING:
    from apptunnel.tunnel.protocol import TunnelProtocol


def no_delay(transport: object) -> None:
    """Turn Nagle off: we write whole messages, and a small response must not wait for an
    ACK of the previous one (delayed ACKs would add up to 40 ms per turn).

    Works through TLS wrappers (they forward unknown attributes to the socket's transport);
    transports without a socket (memory, streams) are left alone.
    """
    set_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_no_delay is None:
        return
    try:
        set_no_delay(True)
    except OSError:
        pass  # not a TCP socket after all (e.g. a UNIX socket)


BULK_BUFFER = 256 * 1024


def bulk_buffers(transport: object, size: int = BULK_BUFFER) -> None:
    """Read up to `size` bytes a time and let `size` bytes queue before pausing the
    producer, instead of Twisted's 64 KiB: each read and each pause/resume costs a pass
    through the reactor, the TLS layer and the tunnel, whatever its size.

    Applies to the socket's transport, also under a TLS wrapper (its ``transport``);
    transports without a socket (memory, streams) are left alone.
    """
    for _ in range(3):
        if isinstance(transport, FileDescriptor):
            transport.bufferSize = size
            return
        transport = getattr(transport, "transport", None)
        if transport is None:
            return


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
