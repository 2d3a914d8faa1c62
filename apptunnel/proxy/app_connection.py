"""One client connection to app hosts: requests in order, each routed, then relayed.

Only heads are parsed and rewritten: body bytes are relayed as they arrive, framing
untouched, with backpressure both ways (the client's transport is paused while the app's
stream cannot take more, and the other way round), so memory per connection stays
bounded whatever the body size. What a head gets is decided by ``proxy/router.py``;
this module only does the I/O.

One request at a time per client connection: the next head is read only after the
current response has ended. One stream to the app per client connection, opened for the
first authorized request and reused while both ends keep the connection alive.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
import os
from typing import TYPE_CHECKING

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from apptunnel.audit import UNAVAILABLE as audit_unavailable
from apptunnel.auth.callers import Caller, certificate_caller
from apptunnel.backend.base import StorageUnavailable
from apptunnel.proxy import pages
from apptunnel.proxy.eager import run_eagerly
from apptunnel.proxy.http1 import (
    BodyBytes,
    EndOfMessage,
    HttpError,
    RequestHead,
    RequestReader,
    ResponseHead,
    ResponseReader,
    Trailers,
    Upgraded,
    keep_alive,
)
from apptunnel.proxy.pool import AppEndpoint, NoAgent
from apptunnel.catalog import AppInfo
from apptunnel.proxy.router import Answer, Forward
from apptunnel.tunnel.errors import StreamRefused
from apptunnel.tunnel.frames import ErrorCode

if TYPE_CHECKING:
    from apptunnel.proxy.forward import AppForwarder

# Bytes held per connection while a request is being authorized, and bytes of a request
# body thrown away after answering it here, before the connection is closed instead.
MAX_PENDING = 1024 * 1024
MAX_DISCARD = 1024 * 1024


MAX_AUDITED_HOST = 255    # a Host or path of an app-less request is cut to this in the audit


class RandomIds:
    """Random ids of 16 hex digits (64 bits from ``read``, os.urandom) cut from a buffer
    read 4 KiB at a time: a ``getrandom`` call per request cost ~2 µs of the reactor's time.

    The module's buffer is dropped in a forked child (workers are spawned, not forked, but
    a fork must never hand two processes the same ids). Reactor thread only.
    """

    CHUNK = 4096   # bytes of randomness per read: 512 ids

    def __init__(self, read: Callable[[int], bytes] = os.urandom) -> None:
        self._read = read
        self._hex = ""
        self._pos = 0

    def forget(self) -> None:
        """Drop what is buffered; the next id comes from a fresh read."""
        self._hex = ""
        self._pos = 0

    def next(self) -> str:
        pos = self._pos
        if pos >= len(self._hex):
            self._hex = self._read(self.CHUNK).hex()
            pos = 0
        self._pos = pos + 16
        return self._hex[pos:pos + 16]


_request_ids = RandomIds()
os.register_at_fork(after_in_child=_request_ids.forget)


def new_request_id() -> str:
    """A short random id naming one request on its error page and in the audit."""
    return _request_ids.next()


@attrs.define
class _Exchange:
    """One request/response on a client connection, for relaying and the audit record."""

    method: bytes
    path: bytes
    started: float
    keep_alive: bool
    version: bytes
    app: AppInfo | None = None
    user: str = ""
    upgrade: bool = False
    status: int = 0
    head_sent: bool = False
    request_done: bool = False
    response_done: bool = False
    bytes_in: int = 0
    bytes_out: int = 0
    discarded: int = 0
    request_id: str = ""      # on its error page and its app.request audit event
    host: str = ""            # as the request named it (audited when no app has it)
    audited: bool = False     # its app.request event is emitted (once)


def _connection_field(ex: _Exchange, status: int) -> bytes | None:
    """The Connection field of the response the client gets: what the proxy will do with
    the client's connection after it (the app's own field is about the app's connection)."""
    if status == 101:
        return b"Upgrade"
    if not ex.keep_alive:
        return b"close"
    if ex.version == b"HTTP/1.0":
        return b"keep-alive"   # an HTTP/1.0 client closes unless told otherwise
    return None


@implementer(IPushProducer)
class _Valve:
    """A producer registered with one side's transport that pauses the other side."""

    def __init__(self, pause: Callable[[], None], resume: Callable[[], None]) -> None:
        self.pauseProducing = pause
        self.resumeProducing = resume

    def stopProducing(self) -> None:
        pass


class _AppSide(Protocol):
    """The byte stream to the app; everything goes to the owning AppConnection."""

    def __init__(self, conn: "AppConnection") -> None:
        self._conn = conn

    def dataReceived(self, data: bytes) -> None:
        self._conn.app_data(self, data)

    def connectionLost(self, reason: Failure) -> None:
        self._conn.app_lost(self, reason)


class _AppSideFactory(Factory):
    def __init__(self, conn: "AppConnection") -> None:
        self._conn = conn

    def buildProtocol(self, addr) -> _AppSide:
        return _AppSide(self._conn)


_UNKNOWN = object()  # the connection's certificate has not been looked at yet

# The connection's states. Each request goes reading_head -> routing (the router decides,
# a stream to the app opens) -> forwarding (relaying its response) or answered (we gave
# the response; the rest of its body is thrown away) -> reading_head again; a 101 makes
# it upgraded (a byte relay) for good. closing: we are closing it; closed: it is gone.
READING_HEAD, ROUTING, FORWARDING, ANSWERED = "reading_head", "routing", "forwarding", "answered"
UPGRADED, CLOSING, CLOSED = "upgraded", "closing", "closed"
_ENDED = (CLOSING, CLOSED)


class AppConnection(Protocol):
    """One client connection to app hosts: requests in order, each authorized and relayed.

    In fixed-app mode (``fixed_app`` and ``caller`` given, after an ``apptunnel-tcp``
    upgrade for an HTTP app) every request goes to that app as that certificate's user.
    ``user`` / ``app_name`` say who the connection currently serves, for locks.
    """

    _log = Logger()

    def __init__(self, forwarder: AppForwarder, fixed_app: str | None = None,
                 caller: Caller | None = None, peer=None) -> None:
        self._fw = forwarder
        self._peer = peer   # the client's address when the transport is a tunnel stream
        self._fixed_app = fixed_app
        self._cert = caller if fixed_app is not None else _UNKNOWN
        self.user = caller.user if fixed_app is not None and caller is not None else ""
        self.app_name = fixed_app
        self.caller = caller if fixed_app is not None else None  # who the policy last allowed
        self._expiry = None
        self._clock = forwarder.clock
        self._reader = RequestReader()
        self._pending: deque = deque()
        self._pending_bytes = 0
        self._pumping = False
        self.state = READING_HEAD
        self._ex: _Exchange | None = None
        self._upstream: _AppSide | None = None
        self._upstream_app: str | None = None
        self._resp = ResponseReader()
        self._connecting: defer.Deferred | None = None
        self._client_pauses: set[str] = set()
        self._client_full = False
        self._client_ip = ""
        self._last_active = 0.0
        self._timer = None
        self._head_timer = None

    # Client side

    def connectionMade(self) -> None:
        peer = self._peer or self.transport.getPeer()
        self._client_ip = getattr(peer, "host", "") or ""
        self.transport.registerProducer(_Valve(self._client_blocked, self._client_unblocked), True)
        self._fw.connections.add(self)
        if self._fixed_app is not None:
            delay = max(0.0, self._cert.expires - self._clock.seconds())
            self._expiry = self._clock.callLater(delay, self.cut)
        self._touch()

    def cut(self) -> None:
        """End the connection now (a lock, an expired certificate), whatever is in flight."""
        if self.state == CLOSED:
            return
        self._close()
        self.transport.abortConnection()

    def refused(self, deny) -> None:
        """The policy no longer allows this connection's caller (lock, removed user, roles)."""
        self._log.info("{user} may no longer open {app} ({why}): cutting their connection",
                       user=self.user, app=self.app_name, why=deny.reason)
        self.cut()

    def is_idle(self) -> bool:
        """Between requests (no exchange, not upgraded): the connection limits may shed it."""
        return self.state == READING_HEAD

    def tunnel_draining(self, tunnel) -> None:
        """Close our idle upstream stream if it rides on ``tunnel`` (which is going away).

        Only between requests: an exchange in progress keeps its stream until the response
        ends (``_finish`` then lets it go), and an upgraded connection keeps relaying.
        """
        if self.state in (FORWARDING, UPGRADED, CLOSING, CLOSED) or self._upstream is None:
            return
        if self._fw.tunnel_of(self._upstream) is tunnel:
            self._drop_upstream(abort=False)

    def dataReceived(self, data: bytes) -> None:
        if self.state in _ENDED:
            return
        self._last_active = self._clock.seconds()
        if self.state == UPGRADED:
            if self._upstream is not None:
                self._upstream.transport.write(data)
            return
        try:
            events = self._reader.receive(data)
        except HttpError as err:
            self._bad_request(err)
            return
        self._queue(events)
        self._watch_head()
        # Pause only when the client actually sends more while we are busy with a request:
        # what arrived is held (one read at most), and the common case (one request, then
        # wait for its response) costs no syscalls.
        if self.state == ROUTING:
            self._pause_client("routing")
        if (self._ex is not None and self._reader.state == "done" and self._reader.held
                and self.state not in _ENDED):
            self._pause_client("waiting")

    def connectionLost(self, reason: Failure) -> None:
        upgraded = self.state == UPGRADED
        self.state = CLOSED
        self._fw.connections.discard(self)
        if self._expiry is not None and self._expiry.active():
            self._expiry.cancel()
        self._expiry = None
        self._cancel_timer()
        self._cancel_head_timer()
        if self._connecting is not None:
            self._connecting.cancel()
        ex = self._ex
        in_flight = ex is not None and not ex.response_done
        if in_flight:
            self._audit(ex, incomplete=True)
        self._ex = None
        # A client that left between requests ends the app's connection with a FIN (the
        # app must not log a reset per keep-alive client); one that left mid-exchange or
        # mid-upgrade cuts it.
        self._drop_upstream(abort=in_flight or upgraded)
        self._pending.clear()

    def _queue(self, events: list) -> None:
        for event in events:
            if isinstance(event, (BodyBytes, Trailers)):
                self._pending_bytes += len(event.data)
        self._pending.extend(events)
        if self._pending_bytes > MAX_PENDING:
            self._log.warn("client {ip} sent too much while waiting; closing", ip=self._client_ip)
            self._close()
            return
        self._pump()

    def _pump(self) -> None:
        """Handle queued request events until one needs an asynchronous decision."""
        if self._pumping:
            return
        self._pumping = True
        try:
            while self._pending and self.state not in (ROUTING, CLOSING, CLOSED):
                event = self._pending.popleft()
                if isinstance(event, RequestHead):
                    self._begin(event)
                elif isinstance(event, BodyBytes):
                    self._pending_bytes -= len(event.data)
                    self._request_body(event.data)
                elif isinstance(event, Trailers):
                    # Trailer fields would reach the app as header fields past our
                    # stripping (a JWT header, a rewrite header): an empty section goes instead.
                    self._pending_bytes -= len(event.data)
                    self._request_body(b"\r\n")
                elif isinstance(event, EndOfMessage):
                    self._request_end()
        finally:
            self._pumping = False

    def _begin(self, head: RequestHead) -> None:
        path = head.target.partition(b"?")[0]
        head.request_id = new_request_id()
        self._ex = _Exchange(
            method=head.method, path=path, started=self._clock.seconds(),
            keep_alive=keep_alive(head.version, head.headers), version=head.version,
            request_id=head.request_id,
            host=(head.headers.get(b"host") or b"")[:MAX_AUDITED_HOST].decode("latin-1"),
        )
        self.state = ROUTING
        if self._fixed_app is not None:
            routing = self._fw.router.route_fixed(head, self._client_ip, self._fixed_app, self._cert)
        else:
            if self._cert is _UNKNOWN:
                # A TLS connection's certificate cannot change: verify it once.
                self._cert = certificate_caller(self._fw.ca, self.transport, self._clock.seconds())
            routing = self._fw.router.route(head, self._client_ip, self._cert)
        if not self._fw.audit.writable:
            routing = self._audit_gate(routing, self._ex)
        run_eagerly(routing, self._routed, self._route_failed, self._ex)

    async def _audit_gate(self, routing, ex: _Exchange) -> Answer | Forward:
        """audit.on_failure: no request starts that its audit event could not be kept for."""
        if await self._fw.audit.admitted():
            return await routing
        routing.close()
        return Answer(pages.error_response(503, audit_unavailable, close=True,
                                           **self._page_ids(ex)), 503, True)

    def _routed(self, outcome: Answer | Forward, ex: _Exchange) -> None:
        if self.state in _ENDED or ex is not self._ex:
            return
        if isinstance(outcome, Answer):
            self._answer(outcome)
            return
        ex.app, ex.user, ex.upgrade = outcome.app, outcome.user, outcome.upgrade
        self.user, self.app_name = outcome.user, outcome.app.name
        self.caller = outcome.caller
        if (self._upstream is not None and self._upstream_app == outcome.app.name
                and not self._fw.draining(self._upstream)):
            self._send_head(outcome)
            return
        self._drop_upstream(abort=False)
        target = {"app": outcome.app.name, "user": outcome.user, "client": self._client_address()}
        d = AppEndpoint(self._fw.connect_app, outcome.app, target).connect(_AppSideFactory(self))
        d.addTimeout(self._fw.connect_timeout, self._clock)
        self._connecting = d
        d.addCallbacks(self._app_connected, self._connect_failed,
                       callbackArgs=(outcome, ex), errbackArgs=(outcome, ex))

    def _route_failed(self, failure: Failure, ex: _Exchange) -> None:
        if failure.check(StorageUnavailable):   # one line, a 503: nothing is broken here
            self._log.warn("routing a request: storage unavailable: {error}",
                           error=failure.value.one_line())
            status, page = 503, pages.storage_unavailable(failure.value, **self._page_ids(ex))
        else:
            self._log.failure("routing a request failed", failure)
            status, page = 500, pages.error_response(500, close=True, **self._page_ids(ex))
        if self.state not in _ENDED and ex is self._ex:
            self._answer(Answer(page, status, True))

    def _app_connected(self, proto: _AppSide, outcome: Forward, ex: _Exchange) -> None:
        self._connecting = None
        if self.state in _ENDED or ex is not self._ex:
            proto.transport.loseConnection()
            return
        self._upstream = proto
        self._upstream_app = outcome.app.name
        self._resp = ResponseReader()
        proto.transport.registerProducer(
            _Valve(lambda: self._app_full(proto, True), lambda: self._app_full(proto, False)), True
        )
        if self._client_full:
            proto.transport.pauseProducing()
        self._send_head(outcome)

    def _connect_failed(self, failure: Failure, outcome: Forward, ex: _Exchange) -> None:
        self._connecting = None
        if self.state in _ENDED or ex is not self._ex:
            return
        err = failure.value
        if isinstance(err, NoAgent) or (isinstance(err, StreamRefused) and err.code == ErrorCode.UNKNOWN_TARGET):
            status = 503
        elif isinstance(err, (defer.TimeoutError, defer.CancelledError)):
            status = 504
        else:
            status = 502
        self._log.warn(
            "cannot reach app {app} for {user}: {why}", app=outcome.app.name, user=outcome.user,
            why=failure.getErrorMessage() or failure.type.__name__,
        )
        ex.status = status
        self._answer(Answer(pages.error_response(status, close=not ex.keep_alive,
                                                 head_only=ex.method == b"HEAD",
                                                 **self._page_ids(ex)),
                            status, not ex.keep_alive))

    def _send_head(self, outcome: Forward) -> None:
        ex = self._ex
        self.state = FORWARDING
        held = self._resp.start(ex.method)
        self._upstream.transport.write(outcome.head.to_bytes())
        self._resume_client("routing")
        if held:
            self._relay(held)
        self._pump()

    def _answer(self, answer: Answer) -> None:
        """Give a locally made response; the rest of the request body is thrown away."""
        ex = self._ex
        self.state = ANSWERED
        ex.status = answer.status
        ex.response_done = True
        # Journaled before the answer's bytes leave (see _relay's EndOfMessage), even when
        # the rest of the request is still to be read (and thrown away): its bytes_in then
        # counts what came before the answer.
        self._audit(ex)
        self.transport.write(answer.data)
        if answer.close:
            self._ex = None
            self._audit(ex)
            self._close()
            return
        self._resume_client("routing")
        if ex.request_done:
            self._finish()
        else:
            self._pump()

    def _request_body(self, data) -> None:
        ex = self._ex
        ex.bytes_in += len(data)
        if self.state == FORWARDING and self._upstream is not None and not ex.response_done:
            self._upstream.transport.write(data)
        else:
            ex.discarded += len(data)
            if ex.discarded > MAX_DISCARD:
                self._close()

    def _request_end(self) -> None:
        ex = self._ex
        ex.request_done = True
        if ex.response_done:
            self._finish()

    def _finish(self) -> None:
        """Both halves of an exchange are done: audit it and read the next request."""
        ex = self._ex
        self._ex = None
        self._audit(ex)
        if not ex.keep_alive:
            self._close()
            return
        self.state = READING_HEAD
        if self._upstream is not None and self._fw.draining(self._upstream):
            self._drop_upstream(abort=False)  # the next request opens a stream elsewhere
        self._resume_client("waiting")
        try:
            events = self._reader.next_message()
        except HttpError as err:
            self._bad_request(err)
            return
        self._queue(events)
        self._watch_head()

    def _bad_request(self, err: HttpError) -> None:
        self._log.info("bad request from {ip}: {why}", ip=self._client_ip, why=err.reason)
        ex = self._ex
        if ex is not None and ex.head_sent:
            self._close()  # mid-exchange: the response already started, just stop
            return
        status = err.status if err.status in (400, 431, 501, 505) else 400
        self.transport.write(pages.error_response(status, close=True))
        self._close()

    # App side

    def app_data(self, proto: _AppSide, data: bytes) -> None:
        if proto is not self._upstream or self.state in _ENDED:
            return
        self._last_active = self._clock.seconds()
        if self.state == UPGRADED:
            self.transport.write(data)
            return
        try:
            events = self._resp.receive(data)
        except HttpError as err:
            self._app_broken(err)
            return
        self._relay(events)

    def app_lost(self, proto: _AppSide, reason: Failure) -> None:
        if proto is not self._upstream:
            return
        self._upstream = None
        self._resume_client("app-full")
        if self.state in _ENDED:
            return
        if self.state == UPGRADED:
            self._close()
            return
        ex = self._ex
        if self.state != FORWARDING or ex.response_done:
            return
        try:
            events = self._resp.connection_closed()
        except HttpError as err:
            self._app_broken(err)
            return
        self._relay(events)

    def _relay(self, events: list) -> None:
        out: list = []
        ex = self._ex
        for event in events:
            if isinstance(event, (BodyBytes, Trailers)):
                out.append(event.data)
                if ex is not None:
                    ex.bytes_out += len(event.data)
            elif isinstance(event, ResponseHead):
                if self.state != FORWARDING:
                    self._app_broken(HttpError(502, "response without a request"))
                    return
                if event.status == 101 and not ex.upgrade:
                    self._app_broken(HttpError(502, "upgrade the client did not ask for"))
                    return
                if event.status < 200 and event.status != 101:
                    if ex.version != b"HTTP/1.0":
                        out.append(event.to_bytes())
                    continue
                ex.status = event.status
                ex.head_sent = True
                if self._resp.must_close and event.status != 101:
                    ex.keep_alive = False
                out.append(self._fw.response_head(event, ex.app, self._fixed_app is not None,
                                                  _connection_field(ex, event.status)).to_bytes())
            elif isinstance(event, Upgraded):
                self._audit(self._ex)   # before the 101 leaves: see EndOfMessage
                self._flush(out)
                self._go_raw()
            elif isinstance(event, EndOfMessage):
                # The audit event is journaled before the bytes that complete the response
                # leave (audit/__init__.py): a kill -9 between the two must not leave an
                # answered request without its event. Writes leave at once (the TLS layer
                # and write-through send in the same call), so the order here is the order
                # on the wire.
                self._audit(self._ex)
                self._flush(out)
                self._response_end()
                if self.state in _ENDED:
                    return
        self._flush(out)

    def _flush(self, out: list) -> None:
        if out and self.state not in _ENDED:
            self.transport.writeSequence(out)
        out.clear()

    def _response_end(self) -> None:
        ex = self._ex
        ex.response_done = True
        if self._resp.must_close:
            self._drop_upstream(abort=False)
        if ex.request_done:
            self._finish()
        else:
            # The app answered before the whole body arrived: stop here rather than
            # guess whether it still wants the rest.
            self._audit(ex)
            self._ex = None
            self._close()

    def _go_raw(self) -> None:
        """After a 101: the connection is a plain byte relay both ways from now on."""
        ex = self._ex
        self.state = UPGRADED
        self._ex = None
        self._audit(ex)
        rest = self._reader.switch_to_raw()
        self._pending.clear()
        self._pending_bytes = 0
        if rest:
            self._upstream.transport.write(rest)
        self._resume_client("waiting")
        self._resume_client("routing")

    def _app_broken(self, err: HttpError) -> None:
        ex = self._ex
        self._log.warn(
            "bad response from app {app}: {why}", app=ex.app.name if ex and ex.app else "?", why=err.reason,
        )
        forwarding = ex is not None and self.state == FORWARDING
        self._drop_upstream(abort=True)
        if forwarding:
            if not ex.head_sent:
                ex.status = 502
            self._audit(ex, incomplete=not ex.head_sent)   # before the 502 page leaves
            self._ex = None
            if not ex.head_sent:
                self.transport.write(pages.error_response(502, close=True,
                                                          **self._page_ids(ex)))
        self._close()

    # Flow control and lifetime

    def _pause_client(self, why: str) -> None:
        if not self._client_pauses and self.state not in _ENDED:
            self.transport.pauseProducing()
        self._client_pauses.add(why)

    def _resume_client(self, why: str) -> None:
        if why in self._client_pauses:
            self._client_pauses.discard(why)
            if not self._client_pauses and self.state not in _ENDED:
                self.transport.resumeProducing()

    def _app_full(self, proto: _AppSide, full: bool) -> None:
        """The app's stream cannot take more: stop reading the client (current stream only)."""
        if proto is not self._upstream:
            return
        if full:
            self._pause_client("app-full")
        else:
            self._resume_client("app-full")

    def _client_blocked(self) -> None:
        """The client's transport is full: stop reading from the app."""
        self._client_full = True
        if self._upstream is not None:
            self._upstream.transport.pauseProducing()

    def _client_unblocked(self) -> None:
        self._client_full = False
        if self._upstream is not None:
            self._upstream.transport.resumeProducing()

    def _drop_upstream(self, abort: bool) -> None:
        proto, self._upstream, self._upstream_app = self._upstream, None, None
        self._resume_client("app-full")
        if proto is None or proto.transport is None:
            return
        if abort and hasattr(proto.transport, "abortConnection"):
            proto.transport.abortConnection()
        else:
            proto.transport.loseConnection()

    def _close(self) -> None:
        if self.state in _ENDED:
            return
        upgraded = self.state == UPGRADED
        self.state = CLOSING
        self._cancel_timer()
        self._cancel_head_timer()
        ex, self._ex = self._ex, None
        in_flight = ex is not None and not ex.response_done
        if in_flight:
            self._audit(ex, incomplete=True)
        # A finished exchange lets the app side close gracefully; anything else is cut.
        self._drop_upstream(abort=in_flight or upgraded)
        self.transport.unregisterProducer()
        self.transport.loseConnection()

    def _watch_head(self) -> None:
        """Start the head deadline at a head's first byte; stop it once the head is read."""
        waiting = self._reader.state == "head" and self._reader.held > 0 and self.state not in _ENDED
        if waiting and self._head_timer is None:
            self._head_timer = self._clock.callLater(self._fw.head_timeout, self._head_late)
        elif not waiting:
            self._cancel_head_timer()

    def _head_late(self) -> None:
        self._head_timer = None
        if self.state in _ENDED or self._reader.state != "head":
            return
        self._log.info("request head from {ip} not complete in time; closing", ip=self._client_ip)
        self.transport.write(pages.error_response(408, close=True))
        self._close()

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None and self._head_timer.active():
            self._head_timer.cancel()
        self._head_timer = None

    def _touch(self) -> None:
        self._last_active = self._clock.seconds()
        self._timer = self._clock.callLater(self._fw.idle_timeout, self._idle_check)

    def _idle_check(self) -> None:
        """Close after a quiet spell; the timer re-arms instead of resetting per packet."""
        self._timer = None
        if self.state in _ENDED:
            return
        limit = self._fw.upgraded_idle_timeout if self.state == UPGRADED else self._fw.idle_timeout
        quiet = self._clock.seconds() - self._last_active
        if quiet < limit:
            self._timer = self._clock.callLater(limit - quiet, self._idle_check)
            return
        ex = self._ex
        self._log.info("closing idle connection from {ip}", ip=self._client_ip)
        if ex is not None and not ex.head_sent and self.state == FORWARDING:
            ex.status = 504
            self._audit(ex, incomplete=True)   # before the 504 page leaves
            self.transport.write(pages.error_response(504, close=True,
                                                      **self._page_ids(ex)))
        self._close()

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _client_address(self) -> str:
        peer = self._peer or self.transport.getPeer()
        return f"{getattr(peer, 'host', '')}:{getattr(peer, 'port', '')}"

    def _page_ids(self, ex: _Exchange | None) -> dict:
        """An error page's link home and request id (pages.error_response keywords)."""
        config = self._fw.config
        return {"home": pages.home_origin(config.public_host, config.public_port),
                "request_id": ex.request_id if ex is not None else ""}

    def _audit(self, ex: _Exchange, incomplete: bool = False) -> None:
        """Count and audit the exchange, once: it is called before the bytes that complete
        a response are written, and again where the exchange ends (then a no-op)."""
        if ex.audited:
            return
        ex.audited = True
        elapsed = self._clock.seconds() - ex.started   # one reading for the metric and the event
        self._fw.metrics.request(ex.app.name if ex.app is not None else "", ex.status, elapsed)
        if ex.app is None:
            if ex.status != 404:
                return   # refused before an app was chosen: its refusal is audited as such
            # No app has that host: still one event, so the request id on the 404 page
            # leads somewhere (host scans are on record too).
            self._fw.audit.emit("app.request", actor=ex.user, target="", outcome="failure",
                                method=ex.method.decode("latin-1"),
                                path=ex.path.decode("latin-1")[:MAX_AUDITED_HOST],
                                status=ex.status, host=ex.host, client_ip=self._client_ip,
                                request_id=ex.request_id)
            return
        fields = dict(
            method=ex.method.decode("latin-1"),
            path=ex.path.decode("latin-1"),
            status=ex.status,
            bytes_in=ex.bytes_in,
            bytes_out=ex.bytes_out,
            duration_ms=round(elapsed * 1000.0, 3),
            user=ex.user,
            app=ex.app.name,
            client_ip=self._client_ip,
            request_id=ex.request_id,
        )
        if incomplete:
            fields["incomplete"] = True
        outcome = "failure" if incomplete or ex.status >= 500 else "success"
        self._fw.audit.emit("app.request", actor=ex.user, target=ex.app.name, outcome=outcome, **fields)
