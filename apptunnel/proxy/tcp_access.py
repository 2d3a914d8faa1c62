"""TCP apps through the proxy: ``apptunnel proxy app`` connections, upgraded to raw bytes.

A local proxy opens TLS to the proxy's own host, presents the user's certificate, and
sends one request::

    GET /v1/tcp/<app>?port=N HTTP/1.1
    Connection: Upgrade
    Upgrade: apptunnel-tcp

The edge hands such a connection here instead of to the web UI. The caller is decided
from the certificate alone (no cookies): valid user certificate of this cluster, then
the app, locks, RBAC, and finally the agent's own port policy (a stream names an app and
a port, the agent dials only declared ones). Refusals are one plain-text line with a
status and close the connection; success is ``101 Switching Protocols`` and from then on
the connection is a byte pipe to one tunnel stream. With ``Apptunnel-Dry-Run: 1`` the
same decision is made (and a denial audited) but nothing is opened: success is ``200``
with the app's kind, ``tcp`` or ``http``, as the one line. ``apptunnel proxy app`` asks
this before it listens.

HTTP apps take the same upgrade (when a forwarder is given): after the ``101`` the
connection is handed to the app forwarder in fixed-app mode, which reads the HTTP
requests that follow and authorizes, signs and audits each one as for a browser, with
the certificate as the caller. The local proxy stays a byte relay either way.

The bytes go through the one relay (``apptunnel/tunnel/relay.py``): each side is the
other's push producer, so a slow reader on one side pauses reading on the other. TLS has
no half close, so a FIN from the app closes the client connection (close_notify) once
queued bytes are out; the client's clean close is a FIN on the stream, an error a reset.
"""

from __future__ import annotations

from typing import Protocol as Interface
from urllib.parse import parse_qs, unquote

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IAddress, IHalfCloseableProtocol, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from apptunnel.auth.access import AccessPolicy, Allow, Deny, Facts, LiveRecheck, NeedsMore
from apptunnel.auth.ca import ClusterCA
from apptunnel.auth.callers import Caller, caller_from_certificate, peer_certificate
from apptunnel.auth.errors import AuthError
from apptunnel.backend.base import StorageUnavailable
from apptunnel.catalog import AppInfo
from apptunnel.proxy import pages
from apptunnel.proxy.errors import Refusal
from apptunnel.proxy.pool import AppEndpoint, ConnectApp, NoAgent
from apptunnel.proxy.handover import hand_over
from apptunnel.proxy.http1 import HttpError, RequestHead, RequestHeadPeek
from apptunnel.proxy.registry import AgentRegistry
from apptunnel.proxy.tcp_mux import MuxSession
from apptunnel.tunnel.errors import StreamRefused
from apptunnel.tunnel.frames import ErrorCode
from apptunnel.tunnel.relay import Relay, RelayEnd
from apptunnel.tunnel.targets import target_port

__all__ = ["DRY_RUN_HEADER", "MUX_TOKEN", "TCP_PATH", "UPGRADE_TOKEN", "Refusal", "TcpAccess",
           "is_tcp_request"]

TCP_PATH = b"/v1/tcp/"
UPGRADE_TOKEN = b"apptunnel-tcp"
# ``Upgrade: apptunnel-mux``: the same request and decision, but after the ``101`` the
# connection carries the tunnel protocol, one stream per local connection
# (apptunnel/proxy/tcp_mux.py). A dry run's answer says the proxy offers it.
MUX_TOKEN = b"apptunnel-mux"
MUX_OFFERED_HEADER = b"Apptunnel-Mux: 1"
# ``Apptunnel-Dry-Run: 1`` on the upgrade: decide exactly as for a real one, then answer
# ``200`` with the app's kind (``tcp`` or ``http``) instead of opening anything.
DRY_RUN_HEADER = b"apptunnel-dry-run"
CONNECT_TIMEOUT = 15.0
# Client bytes that may arrive before the 101 (a well-behaved client sends none).
EARLY_LIMIT = 64 * 1024


def is_tcp_request(head: RequestHead) -> bool:
    """A ``GET /v1/tcp/...`` asking to upgrade to ``apptunnel-tcp``."""
    upgrade = head.headers.tokens(b"upgrade")
    return (
        head.method == b"GET"
        and head.target.startswith(TCP_PATH)
        and (UPGRADE_TOKEN in upgrade or MUX_TOKEN in upgrade)
        and b"upgrade" in head.headers.tokens(b"connection")
    )


@attrs.frozen
class _WouldAccept:
    """A dry run's verdict: a real upgrade would be accepted for an app of this kind."""

    kind: str


@attrs.frozen
class _GoMux:
    """The upgrade asked for a multiplexed connection and the caller may use the app."""


class HttpHandOff(Interface):
    """Serves an HTTP app's requests on a connection after the upgrade (the app
    forwarder): every request is authorized, signed and audited as ``caller``."""

    def fixed_connection(self, app_name: str, caller: Caller, peer=None) -> Protocol: ...


def _plain(status: int, message: str, extra: bytes = b"") -> bytes:
    """One line of text the CLI can print as it is."""
    body = (" ".join(message.split())[:300] + "\n").encode("utf-8")
    return b"".join([
        b"HTTP/1.1 %d %s\r\n" % (status, pages.reason(status).encode("ascii")),
        b"Content-Type: text/plain; charset=utf-8\r\n",
        b"Content-Length: %d\r\n" % len(body),
        b"Cache-Control: no-store\r\n",
        extra,
        b"Connection: close\r\n\r\n",
        body,
    ])


def _parse_target(target: bytes) -> tuple[str, int | None]:
    """``/v1/tcp/<app>?port=N`` -> (app, port or None); Refusal(400) if malformed."""
    path, _, query = target.partition(b"?")
    try:
        name = unquote(path[len(TCP_PATH):].decode("ascii"), errors="strict")
        params = parse_qs(query.decode("ascii"), keep_blank_values=True, strict_parsing=False)
    except (UnicodeError, ValueError):
        raise Refusal(400, "malformed request target") from None
    if not name or "/" in name or len(name) > 63:
        raise Refusal(400, "malformed app name")
    ports = params.get("port", [])
    if len(ports) > 1:
        raise Refusal(400, "port given more than once")
    if not ports or ports[0] == "":
        return name, None
    text = ports[0]
    if not (text.isdigit() and text.isascii() and len(text) <= 5 and 1 <= int(text) <= 65535):
        raise Refusal(400, f"bad port {text[:10]!r}")
    return name, int(text)


class TcpAccess(Factory):
    """Builds one `TcpSession` per upgraded connection; holds what they all need."""

    _log = Logger()

    def __init__(self, *, ca: ClusterCA, registry: AgentRegistry, roles, audit,
                 clock: IReactorTime, connect_app: ConnectApp, locks=None,
                 connect_timeout: float = CONNECT_TIMEOUT,
                 forwarder: HttpHandOff | None = None, users=None,
                 access: AccessPolicy | None = None) -> None:
        self.ca = ca
        self.registry = registry
        self.audit = audit
        self.clock = clock
        self.connect_app = connect_app
        self.connect_timeout = connect_timeout
        self.forwarder = forwarder  # serves HTTP apps after the upgrade; None refuses them
        self.sessions: set[TcpSession] = set()
        self.users = users
        self.access = access or AccessPolicy(roles=roles, audit=audit, clock=clock, locks=locks,
                                             users=users)
        # A new lock, a removed user or a role change re-asks the policy for live sessions.
        LiveRecheck(self.access, clock, lambda: self.sessions, registry.app,
                    locks=locks, users=users, apps=registry)

    def buildProtocol(self, addr: IAddress) -> TcpSession:
        return TcpSession(self, addr)

    async def authorize(self, caller: Caller, name: str, port: int | None, client: str) -> AppInfo:
        """The app ``caller`` may open now (on ``port``): one answer for a whole upgrade
        and for each stream of a multiplexed one; Refusal with the client's status else."""
        app = self.registry.app(name)
        if app is None:
            raise Refusal(404, f"no app named {name!r}")
        if not self.audit.writable and not await self.audit.admitted():
            raise Refusal(503, "the proxy's audit log is not writable; try again shortly")
        facts = Facts(client_ip=client, port=port, where="tcp session")
        try:
            decision = await self.access.decide(caller, app, facts, self.clock.seconds())
        except StorageUnavailable as err:
            raise Refusal(err.status, "the proxy's storage is unavailable; try again "
                          "shortly") from None
        if isinstance(decision, Deny) and decision.code == "rbac":
            raise Refusal(403, f"you are not allowed to use {name}")
        if isinstance(decision, NeedsMore):
            # Per-session MFA: apptunnel proxy app asks for a factor and comes back with
            # a certificate bound to this app (POST /v1/certs with "app").
            raise Refusal(401, decision.message)
        if not isinstance(decision, Allow):
            raise Refusal(403, getattr(decision, "message", "") or f"you are not allowed to use {name}")
        if app.kind != "tcp":
            if self.forwarder is None:
                raise Refusal(400, f"{name} is an HTTP app: open https://{app.public_addr}")
            if port is not None:
                raise Refusal(400, f"{name} is an HTTP app: it takes no port")
            return app
        try:
            target_port(app, port)  # the agent's own rule, asked before opening a stream
        except StreamRefused as refused:
            raise Refusal(403, refused.reason) from None
        return app

    async def open_stream(self, app: AppInfo, caller: Caller, port: int | None, client: str,
                          end: RelayEnd) -> RelayEnd:
        """A stream to a TCP app whose protocol is ``end``; Refusal with the client's status."""
        target = {"app": app.name, "user": caller.user, "client": client}
        if port is not None:
            target["port"] = port
        d = AppEndpoint(self.connect_app, app, target).connect(_StreamFactory(end))
        d.addTimeout(self.connect_timeout, self.clock)
        name = app.name
        try:
            return await d
        except NoAgent:
            raise Refusal(503, f"no agent is serving {name}") from None
        except StreamRefused as refused:
            if refused.code == ErrorCode.UNKNOWN_TARGET:
                raise Refusal(403, refused.reason or f"{name} does not serve that port") from None
            if refused.code == ErrorCode.CONNECT_FAILED:
                raise Refusal(502, f"{name} is not reachable: {refused.reason}") from None
            raise Refusal(502, f"{name} is not reachable") from None
        except defer.TimeoutError:
            raise Refusal(504, f"{name} did not answer in time") from None

    def session_started(self, session: TcpSessionInfo) -> None:
        """A TCP session relays now: live re-checks see it and the audit records it."""
        self.sessions.add(session)
        self.audit.emit("tcp.session.start", actor=session.user, target=session.app,
                        user=session.user, app=session.app, port=session.port,
                        client_ip=session.client)
        self._log.info("tcp session {user} -> {app}:{port} from {client}", user=session.user,
                       app=session.app, port=session.port or "-", client=session.client)

    def session_ended(self, session: TcpSessionInfo, started: float) -> None:
        self.sessions.discard(session)
        duration_ms = int((self.clock.seconds() - started) * 1000)
        self.audit.emit("tcp.session.end", actor=session.user, target=session.app,
                        user=session.user, app=session.app, port=session.port,
                        client_ip=session.client, bytes_in=session.bytes_in,
                        bytes_out=session.bytes_out, duration_ms=duration_ms)


class TcpSessionInfo(Interface):
    """What the audit and the live re-check read of a relaying TCP session."""

    user: str
    app: str
    port: int | None
    client: str
    caller: Caller | None
    bytes_in: int
    bytes_out: int

    def refused(self, deny) -> None: ...

@implementer(IHalfCloseableProtocol)
class TcpSession(Protocol):
    """One client connection: read the upgrade request, authorize, then relay.

    States: ``reading`` (head not complete), ``deciding`` (authorizing / opening the
    stream), ``relaying``, ``handed`` (an HTTP app's connection, now the forwarder's),
    ``closed``.
    """

    _log = Logger()

    def __init__(self, access: TcpAccess, addr: IAddress) -> None:
        self._access = access
        self._addr = addr
        self._state = "reading"
        self._head: RequestHeadPeek | None = RequestHeadPeek()   # until the upgrade is read
        self._held: list[bytes] = []   # bytes after it, until the stream is there
        self._held_size = 0
        self._relay: Relay | None = None   # a: the client, b: the stream (once relaying)
        self._pending: defer.Deferred | None = None
        self._expiry = None
        self._handed: Protocol | None = None
        self._dry_run = False
        self._mux = False
        self.user = ""
        self.app = ""
        self.caller: Caller | None = None
        self.port: int | None = None
        self._started = 0.0

    @property
    def bytes_in(self) -> int:
        """Bytes the client sent to the app (after the upgrade)."""
        return self._relay.a.received if self._relay is not None else 0

    @property
    def bytes_out(self) -> int:
        """Bytes the app sent to the client."""
        return self._relay.b.received if self._relay is not None else 0

    @property
    def app_name(self) -> str:
        return self.app

    def refused(self, deny) -> None:
        """The access policy no longer allows this live session (lock, removed user, roles)."""
        why = {"locked": f"locked: {deny.message}", "user_removed": "user removed"}.get(
            deny.code, f"no longer allowed: {getattr(deny, 'reason', '')}")
        self.end(why)

    @property
    def client(self) -> str:
        host, port = getattr(self._addr, "host", "?"), getattr(self._addr, "port", "?")
        return f"{host}:{port}"

    # -- client side -------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._state == "relaying":
            self._relay.a.dataReceived(data)
            return
        if self._handed is not None:
            self._handed.dataReceived(data)  # a transport we could not re-point
            return
        if self._state == "closed":
            return
        if self._state == "deciding":
            self._held.append(data)
            self._held_size += len(data)
            if self._held_size > EARLY_LIMIT:
                self._refuse(400, "too much data before the upgrade")
            return
        try:
            # The same resumable head search as the edge (431 past MAX_HEAD).
            head = self._head.receive(data)
        except HttpError as err:
            self._refuse(err.status, str(err))
            return
        if head is None:
            return
        rest = self._head.after_head
        self._head = None
        self._held, self._held_size = ([rest] if rest else []), len(rest)
        if not is_tcp_request(head):
            self._refuse(400, "expected an apptunnel-tcp upgrade")
            return
        self._state = "deciding"
        self._dry_run = head.headers.get(DRY_RUN_HEADER) == b"1"
        self._mux = MUX_TOKEN in head.headers.tokens(b"upgrade")
        # Read nothing more until there is a stream to give it to.
        self.transport.pauseProducing()
        self._pending = defer.ensureDeferred(self._decide(head))
        self._pending.addCallbacks(self._connected, self._decide_failed)

    def readConnectionLost(self) -> None:
        """The client half closed (plain TCP only; TLS reports a whole close): pass the
        FIN on and keep sending the app's answer."""
        if self._state == "relaying":
            self._relay.a.readConnectionLost()
        elif self._state != "closed":
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        if self._state == "relaying":
            self._relay.a.writeConnectionLost()

    def connectionLost(self, reason: Failure) -> None:
        if self._handed is not None:
            self._handed.connectionLost(reason)
            return
        if self._state == "closed":
            return
        was_relaying = self._state == "relaying"
        self._state = "closed"
        self._cancel_expiry()
        if self._pending is not None and not self._pending.called:
            self._pending.cancel()
        if was_relaying:
            self._relay.a.connectionLost(reason)
            self._ended(reason)

    # -- deciding ----------------------------------------------------------------------

    async def _decide(self, head: RequestHead) -> Protocol | _WouldAccept | _GoMux | None:
        """The stream's protocol for a TCP app; None once handed to the forwarder."""
        access = self._access
        caller = self._identity()
        self.user, self.caller = caller.user, caller
        name, port = _parse_target(head.target)
        self.app, self.port = name, port
        app = await access.authorize(caller, name, port, self.client)
        if self._dry_run:
            return _WouldAccept("tcp" if app.kind == "tcp" else "http")
        if self._mux:
            return _GoMux()
        if app.kind != "tcp":
            if self._state == "deciding":
                self._to_forwarder(caller)
            return None
        self._schedule_expiry(caller.expires)
        return await access.open_stream(app, caller, port, self.client, self._relay_to_app())

    def _identity(self) -> Caller:
        """The caller named by the TLS client certificate; Refusal(401)."""
        cert = peer_certificate(self.transport)
        if cert is None:
            raise Refusal(401, "a user certificate is required: run apptunnel login")
        try:
            return caller_from_certificate(self._access.ca, cert, self._access.clock.seconds())
        except AuthError as err:
            raise Refusal(401, f"certificate refused ({err.message}): run apptunnel login") from None

    def _to_forwarder(self, caller: Caller) -> None:
        """101, then the connection belongs to a fixed-app ``AppConnection``."""
        self._switch(b"apptunnel-tcp", self._access.forwarder.fixed_connection(self.app, caller),
                     "http session")

    def _to_mux(self) -> None:
        """101, then the connection carries the tunnel protocol: one stream per local
        connection of this ``proxy app`` run (apptunnel/proxy/tcp_mux.py)."""
        session = MuxSession(self._access, self.caller, self.app, self.port, self.client,
                             self.transport.getPeer())
        self._switch(b"apptunnel-mux", session.protocol(), "multiplexed tcp access")

    def _switch(self, upgrade: bytes, conn: Protocol, what: str) -> None:
        """Answer 101 and give the connection, with the bytes held so far, to ``conn``."""
        self._state = "handed"
        self._handed = conn
        transport = self.transport
        transport.write(b"HTTP/1.1 101 Switching Protocols\r\n"
                        b"Connection: Upgrade\r\nUpgrade: " + upgrade + b"\r\n\r\n")
        early, self._held, self._held_size = b"".join(self._held), [], 0
        self._log.info("{what} {user} -> {app} from {client}", what=what, user=self.user,
                       app=self.app, client=self.client)
        hand_over(transport, self, conn)
        transport.resumeProducing()   # before the early bytes: the connection may pause it
        if early:
            conn.dataReceived(early)

    def _connected(self, stream_side: RelayEnd | _WouldAccept | None) -> None:
        self._pending = None
        if stream_side is None:
            return  # handed to the forwarder
        if isinstance(stream_side, _WouldAccept):
            if self._state == "deciding":
                self._answer(200, stream_side.kind, MUX_OFFERED_HEADER + b"\r\n")
            return
        if isinstance(stream_side, _GoMux):
            if self._state == "deciding":
                self._to_mux()
            return
        if self._state != "deciding":
            stream_side.transport.abortConnection()
            return
        revoked = self._access.access.revoked(self.user, self.app)
        if revoked is not None:
            # Locked or removed while the stream was opening: the live re-check could not
            # see this session yet.
            stream_side.transport.abortConnection()
            self._refuse(revoked.status, revoked.message)
            return
        self._state = "relaying"
        self._started = self._access.clock.seconds()
        # Audited (journaled) before the 101 leaves: the TLS layer sends a write at once,
        # and a kill -9 between the two must not leave a started session without its event.
        self._access.session_started(self)
        self.transport.write(b"HTTP/1.1 101 Switching Protocols\r\n"
                             b"Connection: Upgrade\r\nUpgrade: apptunnel-tcp\r\n\r\n")
        early, self._held, self._held_size = b"".join(self._held), [], 0
        # The client's end joins the relay (which resumes reading), then what the client
        # sent after its upgrade request goes first.
        client_end = self._relay.a
        client_end.makeConnection(self.transport)
        if early:
            client_end.dataReceived(early)

    def _decide_failed(self, failure: Failure) -> None:
        self._pending = None
        if self._state != "deciding":
            return  # the client went away; the cancellation landed here
        if failure.check(Refusal):
            self._refuse(failure.value.status, failure.value.message)
            return
        self._log.failure("tcp access for {client} failed", failure, client=self.client)
        self._refuse(500, "internal error")

    def _refuse(self, status: int, message: str) -> None:
        self._log.info("tcp access refused {client} {user} {app}: {status} {message}",
                       client=self.client, user=self.user or "-", app=self.app or "-",
                       status=status, message=message)
        self._answer(status, message)

    def _answer(self, status: int, message: str, extra: bytes = b"") -> None:
        """One plain-text answer, then close (a refusal, or a dry run's verdict)."""
        self._state = "closed"
        self._cancel_expiry()
        self._held = []
        self.transport.write(_plain(status, message, extra))
        self.transport.loseConnection()

    # -- relaying ----------------------------------------------------------------------

    def _relay_to_app(self) -> RelayEnd:
        """The stream's end of a new relay; the client's end joins it after the 101."""
        self._relay = Relay(EARLY_LIMIT)
        return self._relay.b

    def end(self, why: str) -> None:
        """Cut a live session (lock, certificate expiry)."""
        self._log.info("tcp session {user} -> {app} ended: {why}", user=self.user,
                       app=self.app, why=why)
        if self._state in ("relaying", "deciding"):
            self.transport.abortConnection()

    def _schedule_expiry(self, not_after: float) -> None:
        delay = max(0.0, not_after - self._access.clock.seconds())
        self._expiry = self._access.clock.callLater(delay, self.end, "certificate expired")

    def _cancel_expiry(self) -> None:
        if self._expiry is not None and self._expiry.active():
            self._expiry.cancel()
        self._expiry = None

    def _ended(self, reason: Failure) -> None:
        self._access.session_ended(self, self._started)


class _StreamFactory(Factory):
    """Gives the tunnel stream the relay's stream end."""

    noisy = False

    def __init__(self, end: RelayEnd) -> None:
        self._end = end

    def buildProtocol(self, addr) -> RelayEnd:
        return self._end
