"""Connection limits for the TLS listeners: a handshake deadline and caps that shed idle first.

A socket costs a file descriptor whatever its peer does, so a peer that connects and then
says nothing (or half a ClientHello, or a whole one and then nothing) must not keep it:
``LimitedProtocol`` aborts a connection whose TLS handshake has not finished in time, and
turns any close before the handshake into an abort (a TLS close that waits for a
handshake that never comes never ends, and bytes written before it never leave).

``ConnectionTracker`` counts the live connections of every listener of the process (they
share one descriptor table) and admits a new one only within ``max_connections`` and
``max_connections_per_ip``. At a cap it sheds the oldest *idle* connection rather than
refuse the newcomer, so whoever holds idle sockets cannot lock others out; connections
that relay something are never shed for a newcomer. ``plan_admission`` is that decision,
pure; the classes only count and act.

Idle means: TLS handshake not finished, or the protocol behind it says so through an
optional ``is_idle()`` (the edge before the first head, an app connection between
requests). A protocol without ``is_idle`` is busy once its handshake is done.
"""

from __future__ import annotations

import resource
from collections.abc import Iterable, Iterator

import attrs
from twisted.internet.interfaces import IHandshakeListener, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from zope.interface import directlyProvides, implementer, providedBy

from apptunnel.config import LimitsConfig
from apptunnel.metrics import NO_METRICS, NoMetrics
from apptunnel.net import client_key

# Descriptors kept free for what is not a client connection: the backend, log and audit
# files, the CA and key files read at start, the resolver, the thread pool's pipes.
FD_RESERVE = 64

_log = Logger()


@attrs.frozen
class Seen:
    """One live connection as the admission decision sees it."""

    client: str
    idle: bool


@attrs.frozen
class Admission:
    """Admit the newcomer after shedding ``shed`` (indexes into the list given), or refuse."""

    admit: bool
    shed: tuple[int, ...] = ()


def plan_admission(live: Iterable[Seen], total: int, same: int, client: str,
                   limits: LimitsConfig) -> Admission:
    """Whether a new connection from ``client`` may join, and which live ones go for it.

    ``live`` is every live connection, oldest first (read lazily, only as far as needed);
    ``total`` its length and ``same`` how many are ``client``'s. Over the per-address cap,
    the oldest idle connection *of that address* goes (another address's never go for
    it); over the total cap, the oldest idle one of anybody. If shedding idle connections
    cannot meet a cap, the newcomer is refused and nobody is shed.
    """
    need_same = max(0, same - limits.max_connections_per_ip + 1)
    need_any = max(0, total - limits.max_connections + 1 - need_same)
    shed: list[int] = []
    for index, seen in enumerate(live):
        if not (need_same or need_any):
            break
        if not seen.idle:
            continue
        if need_same and seen.client == client:
            need_same -= 1
        elif need_any:
            need_any -= 1
        else:
            continue
        shed.append(index)
    if need_same or need_any:
        return Admission(False)
    return Admission(True, tuple(shed))


def connection_budget(wanted: int, soft_limit: int, reserve: int = FD_RESERVE) -> int:
    """How many connections fit in ``soft_limit`` descriptors next to what the process needs."""
    if soft_limit == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, soft_limit - reserve))


def raise_fd_limit(wanted: int) -> int:
    """Raise the soft descriptor limit towards the hard one if ``wanted`` needs it; the budget.

    A limit set by systemd (``LimitNOFILE``) or ``ulimit -n`` wins: the soft limit only goes
    up to the hard one, and the connection cap comes down to what fits.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = wanted + FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return connection_budget(wanted, soft)


class ConnectionTracker:
    """Every live connection of the process's listeners, oldest first, and the caps on them."""

    def __init__(self, limits: LimitsConfig, clock: IReactorTime,
                 metrics: NoMetrics = NO_METRICS) -> None:
        self.limits = limits
        self.clock = clock
        self.metrics = metrics   # refusals and sheddings are counted
        # Insertion order is age, in both; a client's entry goes with its last connection.
        self._live: dict[LimitedProtocol, None] = {}
        self._by_client: dict[str, dict[LimitedProtocol, None]] = {}

    def __len__(self) -> int:
        return len(self._live)

    def admit(self, conn: LimitedProtocol) -> bool:
        """Track ``conn`` if the caps allow it, shedding the idle connections that must go."""
        mine = self._by_client.get(conn.client, {})
        # Only at the total cap can anybody's connection go; otherwise look at this
        # client's alone. Either way the candidates are read lazily, oldest first.
        candidates = self._live if len(self._live) >= self.limits.max_connections else mine
        read: list[LimitedProtocol] = []
        plan = plan_admission(_seen(candidates, read), len(self._live), len(mine),
                              conn.client, self.limits)
        if not plan.admit:
            return False
        for index in plan.shed:
            victim = read[index]
            self.forget(victim)
            victim.shed()
        self._live[conn] = None
        self._by_client.setdefault(conn.client, {})[conn] = None
        return True

    def forget(self, conn: LimitedProtocol) -> None:
        if self._live.pop(conn, 0) is None:
            mine = self._by_client[conn.client]
            del mine[conn]
            if not mine:
                del self._by_client[conn.client]


def _seen(conns: dict[LimitedProtocol, None], read: list[LimitedProtocol]) -> Iterator[Seen]:
    """``conns`` as the decision sees them, remembering in ``read`` which were looked at."""
    for conn in conns:
        read.append(conn)
        yield Seen(conn.client, conn.is_idle())


@implementer(IHandshakeListener)
class LimitedProtocol(ProtocolWrapper):
    """One connection under the limits: admitted or refused, handshake on a deadline.

    It sits between the TLS layer and the application protocol (``wrappedProtocol``,
    which the edge re-points at whoever takes the connection over).
    """

    factory: LimitedFactory

    def __init__(self, factory: LimitedFactory, wrapped: Protocol, client: str, peer: str) -> None:
        super().__init__(factory, wrapped)
        self.client = client
        self._peer = peer
        self._admitted = False
        self._handshake_done = not factory.tls
        self._deadline = None

    def makeConnection(self, transport) -> None:
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        tracker = self.factory.tracker
        if not tracker.admit(self):
            tracker.metrics.refused("connection_limit")
            _log.info("connection from {peer} refused: at the connection limit "
                      "and none idle to shed", peer=self._peer)
            self.transport.abortConnection()
            return
        self._admitted = True
        if not self._handshake_done:
            self._deadline = tracker.clock.callLater(tracker.limits.handshake_timeout,
                                                     self._handshake_timed_out)
        self.wrappedProtocol.makeConnection(self)

    def handshakeCompleted(self) -> None:
        self._handshake_done = True
        self._cancel_deadline()
        if IHandshakeListener.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.handshakeCompleted()

    def is_idle(self) -> bool:
        """Sheddable: no handshake yet, or the application protocol says it waits."""
        if not self._handshake_done:
            return True
        ask = getattr(self.wrappedProtocol, "is_idle", None)
        return bool(ask()) if callable(ask) else False

    def shed(self) -> None:
        """Make room for a newer connection: this one waits for nothing we owe it."""
        _log.info("connection from {peer} shed: idle at the connection limit", peer=self._peer)
        self.factory.tracker.metrics.refused("connection_shed")
        self.transport.abortConnection()

    def loseConnection(self) -> None:
        # Before the handshake nothing written can reach the peer, and a TLS close would
        # wait for a handshake that may never come: abort instead.
        if not self._handshake_done:
            self.abortConnection()
            return
        super().loseConnection()

    def abortConnection(self) -> None:
        self.disconnecting = 1
        self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        if self._admitted:
            self.wrappedProtocol.dataReceived(data)

    def connectionLost(self, reason: Failure) -> None:
        self._cancel_deadline()
        self.factory.tracker.forget(self)
        if self._admitted:
            self.wrappedProtocol.connectionLost(reason)
        self.wrappedProtocol = None

    def _handshake_timed_out(self) -> None:
        self._deadline = None
        _log.info("connection from {peer} closed: no TLS handshake in {seconds:g} s",
                  peer=self._peer, seconds=self.factory.tracker.limits.handshake_timeout)
        self.abortConnection()

    def _cancel_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None


class LimitedFactory(WrappingFactory):
    """Wraps a listener's factory so its connections count against ``tracker``.

    Put it *inside* the TLS layer (``TlsServerFactory(contexts, LimitedFactory(factory, ...))``)
    so it hears ``handshakeCompleted``; ``tls=False`` is for transports without TLS.
    """

    def __init__(self, wrapped, tracker: ConnectionTracker, tls: bool = True) -> None:
        super().__init__(wrapped)
        self.tracker = tracker
        self.tls = tls

    def buildProtocol(self, addr) -> LimitedProtocol | None:
        inner = self.wrappedFactory.buildProtocol(addr)
        if inner is None:
            return None
        host = getattr(addr, "host", None) or str(addr)
        port = getattr(addr, "port", None)
        peer = f"{host}:{port}" if port is not None else host
        return LimitedProtocol(self, inner, client_key(host), peer)

    def registerProtocol(self, p) -> None:
        """Counting is the tracker's job (see ``LimitedProtocol.makeConnection``)."""

    def unregisterProtocol(self, p) -> None:
        """See ``registerProtocol``."""
