"""Streams as Twisted client endpoints, so HTTP clients and relays run over a tunnel unchanged.

Also the socket options of apptunnel connections (``no_delay``, ``bulk_buffers``).
"""

from __future__ import annotations

import ipaddress
import socket
from typing import TYPE_CHECKING

from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.tcp import Connection
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

# SO_RCVBUF of a tunnel socket whose peer is on this machine (Linux doubles it: 256 KiB),
# instead of receive autotuning. Over loopback (64 KiB segments) autotuning grows a busy
# tunnel's buffer to 8-16 MiB; once the machine's TCP memory passes tcp_mem's pressure
# threshold the kernel lets each socket hold about tcp_mem[2] / sockets (~570 KiB at 4,000
# sockets) and drops what arrives beyond it, and the one socket carrying every stream is the
# first over: retransmission timeouts stalled 1,000 busy streams. Across a network the
# round trip needs autotuning, and segments are small: left alone there.
# docs/performance.rst, "Bulk throughput and fairness at 1,000 busy streams".
LOCAL_RECEIVE_BUFFER = 128 * 1024


def on_this_host(host: str, peer: str) -> bool:
    """Whether a connection between these two IP addresses stays on this machine: the
    peer is a loopback address or our own end's. Anything that is not an IP address
    (a UNIX socket's path) is not."""
    try:
        ours, theirs = ipaddress.ip_address(host), ipaddress.ip_address(peer)
    except ValueError:
        return False
    mapped = getattr(theirs, "ipv4_mapped", None)
    if mapped is not None:
        theirs = mapped
    mapped = getattr(ours, "ipv4_mapped", None)
    if mapped is not None:
        ours = mapped
    return theirs.is_loopback or theirs == ours


def receive_buffer(host: str, peer: str) -> int | None:
    """The SO_RCVBUF a tunnel socket between `host` and `peer` gets; None keeps autotuning."""
    return LOCAL_RECEIVE_BUFFER if on_this_host(host, peer) else None


def bulk_buffers(transport: object, size: int = BULK_BUFFER) -> None:
    """Read up to `size` bytes a time and let `size` bytes queue before pausing the
    producer, instead of Twisted's 64 KiB: each read and each pause/resume costs a pass
    through the reactor, the TLS layer and the tunnel, whatever its size. A peer on this
    host also gets a bounded kernel receive buffer (``receive_buffer``).

    Applies to the socket's transport, also under a TLS wrapper (its ``transport``);
    transports without a socket (memory, streams) are left alone.
    """
    for _ in range(3):
        if isinstance(transport, FileDescriptor):
            transport.bufferSize = size
            _bound_receive_buffer(transport)
            return
        transport = getattr(transport, "transport", None)
        if transport is None:
            return


def _bound_receive_buffer(transport: FileDescriptor) -> None:
    sock = getattr(transport, "socket", None)
    if sock is None:
        return
    try:
        host = getattr(transport.getHost(), "host", "")
        peer = getattr(transport.getPeer(), "host", "")
    except (NotImplementedError, OSError):
        return  # no addresses to judge by: keep the default
    size = receive_buffer(str(host), str(peer))
    if size is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
    except OSError:
        pass  # not a socket that takes it: keep the default


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



class _WriteThrough:
    """Mixed into a TCP connection's class: ``write`` calls ``send()`` at once when nothing
    is queued.

    Twisted's ``FileDescriptor.write`` always queues: it registers the socket for
    writability (an ``epoll_ctl``), waits for the reactor's next poll to call ``doWrite``
    (a dispatch through the logging context, then ``send()``) and unregisters it once the
    queue is empty (another ``epoll_ctl``): three Python passes and two system calls around
    the one ``send()`` that matters, for every response and every relayed request. Here a
    write to an idle socket is sent right away; what ``send()`` does not take (a full
    socket) and every write while something is queued go through Twisted's ``write`` as
    before, so order, backpressure (producers), half close and errors keep Twisted's
    rules. A closing, half-closed, aborted or TLS-started connection always takes
    Twisted's path.
    """

    _wt_queued = False   # registered for writing: Twisted's queue holds bytes
    _wt_done = False     # aborted or our side closed: nothing is sent directly any more

    def startWriting(self) -> None:
        self._wt_queued = True
        super().startWriting()

    def stopWriting(self) -> None:
        self._wt_queued = False
        super().stopWriting()

    def loseWriteConnection(self) -> None:
        self._wt_done = True
        super().loseWriteConnection()

    def abortConnection(self) -> None:
        self._wt_done = True
        super().abortConnection()

    def write(self, data: bytes) -> None:
        if (self._wt_queued or self._wt_done or self.disconnecting or not self.connected
                or self.TLS or type(data) is not bytes or not data):
            super().write(data)
            return
        sent = self.writeSomeData(data)
        if type(sent) is not int:
            super().write(data)   # an error: Twisted's doWrite meets it again and reports it
        elif sent < len(data):
            super().write(data[sent:])


_write_through_classes: dict[type, type] = {}


def write_through(transport: object) -> None:
    """Send writes to an idle socket at once instead of on the reactor's next turn
    (``_WriteThrough``). Applies to a TCP connection's transport, also under a TLS wrapper
    (whose records then leave at once); memory transports and streams are left alone."""
    for _ in range(3):
        if isinstance(transport, FileDescriptor):
            cls = type(transport)
            if isinstance(transport, Connection) and not issubclass(cls, _WriteThrough):
                sub = _write_through_classes.get(cls)
                if sub is None:
                    sub = _write_through_classes[cls] = type(
                        cls.__name__, (_WriteThrough, cls), {"__module__": __name__})
                transport.__class__ = sub
            return
        transport = getattr(transport, "transport", None)
        if transport is None:
            return
