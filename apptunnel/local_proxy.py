"""A local port that leads to one app through the proxy: `apptunnel proxy app`'s machinery.

The CLI's ``apptunnel proxy app`` and the bot's ``app-proxy`` output (apptunnel/bot/)
both serve a loopback port with this: before listening, one ``apptunnel-tcp`` upgrade as
a dry run (``Apptunnel-Dry-Run: 1``, see ``apptunnel/proxy/tcp_access.py``) asks the
proxy the question each connection will ask (`check`). When the proxy offers it (its
answer says ``Apptunnel-Mux: 1``), one TLS connection presenting the caller's
certificate is upgraded to ``apptunnel-mux`` and speaks the tunnel protocol: each local
connection is one stream on it, joined to the local socket by the one relay
(``apptunnel/tunnel/relay.py``); the connection is made again when it was lost or the
credentials changed. Otherwise (an older proxy) each local connection becomes its own
TLS connection and one ``apptunnel-tcp`` upgrade, joined after ``101``. A refusal reaches an HTTP client as an HTTP answer (the
proxy's status and line, or 502/401 when the proxy cannot be reached or the certificate
has expired), a TCP client as a close. The listener keeps running.

Credentials come from ``load_profile()``, called again once the cached ones expired, so
a renewed certificate (a fresh ``apptunnel login``, a bot's renewal) is picked up without
dropping the listener. What it returns needs ``proxy`` (host:port), ``trust`` (one of the
TRUST_* values), ``cert_pem``, ``key_pem``, ``ca_pem`` (for pinned trust) and
``expired(now)``; ``apptunnel.cli.profile.Profile`` is one.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from http.client import responses
from typing import NamedTuple
from urllib.parse import quote

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from apptunnel.errors import ApptunnelError
from apptunnel.net import loopback_host, split_host_port
from apptunnel.tls.contexts import ClientTls, client_context
from apptunnel.tls.layer import TlsClientEndpoint, client_failure
from apptunnel.tunnel.endpoints import no_delay, write_through
from apptunnel.tunnel.errors import StreamRefused, status_of
from apptunnel.tunnel.frames import ErrorCode
from apptunnel.tunnel.protocol import TunnelProtocol
from apptunnel.tunnel.relay import Relay

__all__ = ["LISTEN_BACKLOG", "Answer", "LocalProxy", "LocalProxyError", "SecondFactorNeeded",
           "check", "http_answer", "proxy_tls"]

# Trust modes for the proxy's web certificate.
TRUST_PINNED = "pinned"      # only the CAs in ca_pem (the cluster CA's pin checked at login/join)
TRUST_SYSTEM = "system"      # the system trust store (a publicly trusted proxy certificate)
TRUST_INSECURE = "insecure"  # no verification at all (--insecure)

CONNECT_TIMEOUT = 15.0
MAX_RESPONSE = 16 * 1024
EARLY_LIMIT = 64 * 1024
EXPIRED = "certificate expired: run apptunnel login"
LINGER = 2.0  # seconds a refused HTTP client may take to close after our answer
NEEDS_FACTOR = "needs a second factor"   # the proxy's per-session MFA refusal (401)
MUX_OFFERED = b"apptunnel-mux: 1"          # in a dry run's answer (tcp_access.MUX_OFFERED_HEADER)
KEEPALIVE_INTERVAL = 15.0                  # the multiplexed connection's pings (as the proxy's)
KEEPALIVE_TIMEOUT = 45.0
# The local listener's accept queue (Twisted's default is 50). A client opening 100
# connections at once overflowed 50: the kernel dropped the handshakes' last ACKs, the
# client saw them connected while we never accepted them, and they came in only when the
# SYN-ACK retries (1, 2, 4, 8, 16 s) got through: streams idle for up to 30 s.
LISTEN_BACKLOG = 1024

Say = Callable[[str], None]


class LocalProxyError(ApptunnelError):
    """The proxy refused, or could not be asked: ``message`` is one line to print."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


async def check(proxy: LocalProxy) -> str:
    """Ask the proxy whether it would accept our upgrade (a dry run of the same decision):
    the app's kind (``tcp`` or ``http``), else LocalProxyError with the proxy's one line."""
    profile = proxy.profile()
    if profile is None:
        raise LocalProxyError(proxy.expired)
    try:
        endpoint = proxy.endpoint(profile)
    except (ValueError, ssl.SSLError) as err:
        raise LocalProxyError(f"cannot use the saved login: {err}") from None
    asked = _Question()
    connecting = endpoint.connect(_RemoteFactory(asked, proxy.request(dry_run=True)))
    connecting.addTimeout(proxy.connect_timeout, proxy.reactor)
    try:
        await connecting
    except Exception as err:  # any connect failure: one line, as for each connection
        raise LocalProxyError(f"cannot reach the proxy: {err}") from None
    answer = await asked.answered.addTimeout(proxy.connect_timeout, proxy.reactor)
    if answer.status == 401 and NEEDS_FACTOR in answer.text():
        raise SecondFactorNeeded(answer.line())
    if answer.status != 200:
        raise LocalProxyError(answer.line())
    proxy.multiplexed = answer.offers_mux()
    kind = answer.text()
    return kind if kind in ("tcp", "http") else "tcp"


class SecondFactorNeeded(LocalProxyError):
    """The dry run's answer for an app asking for a second factor per session."""


class Answer(NamedTuple):
    """The proxy's answer to an upgrade that did not switch protocols."""

    status: int          # 0 when there was no status line
    raw: bytes           # the whole answer as received (at most MAX_RESPONSE bytes)
    ended: str = ""      # without an answer: why TLS ended the connection, if it did

    def text(self) -> str:
        """The first line of the body (the proxy's one-line reason)."""
        _, _, body = self.raw.partition(b"\r\n\r\n")
        lines = body.decode("utf-8", "replace").strip().splitlines()
        return lines[0].strip() if lines and not lines[0].lstrip().startswith("<") else ""

    def line(self) -> str:
        """One line to print: the proxy's status and reason."""
        if not self.raw:
            return self.ended or "the proxy closed the connection without answering"
        status_line = self.raw.split(b"\r\n", 1)[0].decode("latin-1")
        text = self.text()
        return f"proxy refused: {status_line.partition(' ')[2]}" + (f": {text}" if text else "")

    def complete(self) -> bool:
        """A whole HTTP answer we may pass on to an HTTP client as it is."""
        return self.status >= 200 and b"\r\n\r\n" in self.raw

    def offers_mux(self) -> bool:
        """Whether the proxy said it takes multiplexed connections."""
        head = self.raw.partition(b"\r\n\r\n")[0].lower()
        return MUX_OFFERED in head.split(b"\r\n")


def http_answer(status: int, message: str) -> bytes:
    """A one-line HTTP answer of our own (the proxy could not be asked)."""
    body = (" ".join(message.split())[:300] + "\n").encode("utf-8")
    return (f"HTTP/1.1 {status} {responses.get(status, 'Error')}\r\n"
            "Content-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode("ascii") + body


class _Question:
    """The owner of a dry-run connection: fires `answered` with the proxy's Answer."""

    def __init__(self) -> None:
        self.answered: defer.Deferred = defer.Deferred()

    def upgraded(self, remote: RemoteSide, rest: bytes) -> None:
        # A proxy that ignored the dry run: it said yes; open nothing.
        remote.transport.abortConnection()
        self.answered.callback(Answer(200, b""))

    def refused(self, answer: Answer) -> None:
        if not self.answered.called:
            self.answered.callback(answer)


class LocalProxy(Factory):
    """Accepts local connections and gives each its own upgraded connection to the proxy."""

    noisy = False

    def __init__(self, reactor, load_profile: Callable[[], object | None], app: str,
                 remote_port: int | None, say: Say, now: Callable[[], float] | None = None,
                 connect_timeout: float = CONNECT_TIMEOUT, kind: str = "tcp",
                 expired: str = EXPIRED) -> None:
        self.reactor = reactor
        self._load_profile = load_profile
        self._profile = None
        self.app = app
        self.remote_port = remote_port
        self.say = say
        self.now = now or reactor.seconds
        self.connect_timeout = connect_timeout
        self.kind = kind   # "http": refusals reach the local client as HTTP answers
        self.expired = expired
        self.multiplexed = False      # set by `check` when the proxy offers it
        self._link: _MuxLink | None = None
        self._made: tuple[ClientTls, ssl.SSLContext] | None = None

    def bind(self, profile) -> None:
        """Present this one-app MFA certificate from now on, never re-reading the saved
        login: once it has expired, new connections are refused (sessions run on)."""
        self._profile = profile
        self._load_profile = lambda: profile
        self.expired = (f"the second-factor certificate for {self.app} starts sessions for a "
                        f"minute only: run apptunnel proxy app {self.app} again")

    def credentials_renewed(self) -> None:
        """Read the credentials again for the next connection (a bot renewed them);
        connections already open keep theirs."""
        self._profile = None

    def buildProtocol(self, addr) -> LocalConnection:
        return LocalConnection(self)

    def profile(self):
        """A profile whose certificate is valid now, re-read once the cached one expired."""
        now = self.now()
        if self._profile is None or self._profile.expired(now):
            try:
                self._profile = self._load_profile()
            except ApptunnelError as err:
                self.say(getattr(err, "message", None) or str(err))
                self._profile = None
        if self._profile is None or self._profile.expired(now):
            return None
        return self._profile

    def request(self, dry_run: bool = False, mux: bool = False) -> bytes:
        target = "/v1/tcp/" + quote(self.app, safe="")
        if self.remote_port is not None:
            target += f"?port={self.remote_port}"
        host, _ = split_host_port(self._profile.proxy, 443)
        extra = "Apptunnel-Dry-Run: 1\r\n" if dry_run else ""
        upgrade = "apptunnel-mux" if mux else "apptunnel-tcp"
        return (f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\n"
                f"Upgrade: {upgrade}\r\n{extra}User-Agent: apptunnel-proxy-app\r\n\r\n"
                ).encode("ascii")

    def open_stream(self, profile, factory) -> defer.Deferred:
        """A stream for one local connection on the run's multiplexed connection, made
        (again) when there is none, it was lost, or the credentials changed; errbacks
        with `_Unserved` (a status and a line for the local client)."""
        link = self._link
        if link is None or link.lost or link.profile is not profile:
            if link is not None:
                link.retire()
            link = self._link = _MuxLink(self, profile)
        return link.stream(factory)

    def stop(self) -> None:
        """Close the multiplexed connection (the listener is going away)."""
        if self._link is not None:
            self._link.retire()
            self._link = None

    def endpoint(self, profile, batch: bool = False) -> TlsClientEndpoint:
        """TLS to the proxy (apptunnel/tls) trusting it as ``profile`` says and presenting
        its certificate. ``batch``: a reactor turn's writes leave as one TLS write, for the
        multiplexed connection, which carries a frame per stream and turn. Raises
        ValueError or ssl.SSLError on a saved login that cannot be used."""
        host, port = split_host_port(profile.proxy, 443)
        context = self._context(proxy_tls(profile))
        tcp = HostnameEndpoint(self.reactor, loopback_host(host), port,
                               timeout=self.connect_timeout)
        return TlsClientEndpoint(tcp, lambda: context, host,
                                 batch_clock=self.reactor if batch else None)

    def _context(self, tls: ClientTls) -> ssl.SSLContext:
        """The context for ``tls``, made again only when the login changed: an older
        proxy's run dials once per local connection, and loading the system's store
        takes tens of milliseconds."""
        if self._made is None or self._made[0] != tls:
            self._made = (tls, client_context(tls))
        return self._made[1]


def proxy_tls(profile) -> ClientTls:
    """How ``proxy app`` meets the proxy's web port, by the profile's trust mode: pinned,
    every CA in ``ca.crt`` (the pinned one, plus a new host CA learnt during a host-CA
    rotation) and nothing else; insecure (``login --insecure``), no check at all; any
    other, the system's store. Verified modes check that the certificate names the host
    dialled (``TlsClientEndpoint``). TLS 1.2 or later and no ALPN, as the port expects."""
    shown = {"cert_pem": profile.cert_pem, "key_pem": profile.key_pem}
    if profile.trust == TRUST_PINNED:
        cas = tuple(cert.public_bytes(serialization.Encoding.PEM)
                    for cert in x509.load_pem_x509_certificates(profile.ca_pem or b""))
        return ClientTls(trusted_cas=cas, **shown)
    if profile.trust == TRUST_INSECURE:
        return ClientTls(trusted_cas=(), verify=False, **shown)
    return ClientTls(trusted_cas=(), system_cas=True, **shown)


@implementer(IHalfCloseableProtocol)
class LocalConnection(Protocol):
    """One local client: one end of a relay (held, not read, until the proxy said 101).

    TLS to the proxy has no half close, so the client's FIN closes that connection
    (close_notify) and ends the session, what psql, redis-cli and most TCP clients expect.
    """

    def __init__(self, factory: LocalProxy) -> None:
        self._factory = factory
        self._relay = Relay(EARLY_LIMIT)   # a: this client, b: the proxy after the 101
        self._connecting: defer.Deferred | None = None
        self._closed = False
        self._discarding = False   # answered and half closed: the client's bytes are dropped
        self._linger = None

    def connectionMade(self) -> None:
        # Sent at once, as the agent does with an app's socket: each relayed chunk would
        # otherwise wait for the next poll (two epoll_ctl calls and a reactor pass each).
        no_delay(self.transport)
        write_through(self.transport)
        # The relay reads nothing more from the client until the other end is joined.
        self._relay.a.makeConnection(self.transport)
        f = self._factory
        profile = f.profile()
        if profile is None:
            self._fail(401, f.expired)
            return
        if f.multiplexed:
            self._connecting = f.open_stream(profile, _EndFactory(self._relay.b))
            self._connecting.addCallbacks(self._stream_opened, self._stream_failed)
            return
        try:
            endpoint = f.endpoint(profile)
        except (ValueError, ssl.SSLError) as err:
            self._fail(502, f"cannot use the saved login: {err}")
            return
        self._connecting = endpoint.connect(_RemoteFactory(self, f.request()))
        self._connecting.addErrback(self._connect_failed)

    def _stream_opened(self, _) -> None:
        self._connecting = None   # the stream's end joined the relay: bytes flow

    def _stream_failed(self, failure: Failure) -> None:
        self._connecting = None
        if self._closed or failure.check(defer.CancelledError):
            return
        if failure.check(_Unserved):
            unserved = failure.value
            self._factory.say(unserved.line)
            self._answer(unserved.answer, unserved.status, unserved.message)
            return
        self._fail(502, f"cannot reach the proxy: {failure.getErrorMessage()}")

    def _connect_failed(self, failure: Failure) -> None:
        self._connecting = None
        if not self._closed:
            self._fail(502, f"cannot reach the proxy: {failure.getErrorMessage()}")

    def _fail(self, status: int, message: str) -> None:
        """Print why; an HTTP client also gets it as an HTTP answer."""
        self._factory.say(message)
        self._answer(Answer(0, b""), status, message)

    def _answer(self, answer: Answer, status: int, message: str) -> None:
        if self._closed:
            return
        if self._factory.kind != "http":
            self.transport.loseConnection()
            return
        self.transport.write(answer.raw if answer.complete() else http_answer(status, message))
        # Lingering close: closing with the request still unread would be a RST that can
        # destroy the answer in the client's buffer; so FIN, read and drop until the client
        # closes, for LINGER seconds at most.
        self._discarding = True
        self.transport.loseWriteConnection()
        self.transport.resumeProducing()
        self._linger = self._factory.reactor.callLater(LINGER, self.transport.loseConnection)

    def dataReceived(self, data: bytes) -> None:
        if not self._discarding:
            self._relay.a.dataReceived(data)

    def readConnectionLost(self) -> None:
        if self._discarding:
            self.transport.loseConnection()
            return
        self._relay.a.readConnectionLost()

    def writeConnectionLost(self) -> None:
        self._relay.a.writeConnectionLost()

    def upgraded(self, remote: RemoteSide, rest: bytes) -> None:
        """101: the proxy's connection joins the relay; what followed the 101 comes first."""
        self._connecting = None
        remote.relay_through(self._relay.b)
        if rest:
            self._relay.b.dataReceived(rest)

    def refused(self, answer: Answer) -> None:
        """The proxy ended without a 101: print its line, answer an HTTP client."""
        self._connecting = None
        line = answer.line()
        self._factory.say(line)
        self._answer(answer, 502, line)

    def connectionLost(self, reason: Failure) -> None:
        self._closed = True
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        if self._connecting is not None:
            d, self._connecting = self._connecting, None
            d.cancel()
        self._relay.a.connectionLost(reason)


class _Unserved(Exception):
    """A local connection the proxy did not take: what to print and to answer."""

    def __init__(self, status: int, line: str, answer: Answer | None = None,
                 message: str | None = None) -> None:
        super().__init__(line)
        self.status = status
        self.line = line                   # printed
        self.message = message or line     # the body of an HTTP client's answer
        self.answer = answer or Answer(0, b"")


class _EndFactory(Factory):
    """Gives a stream the relay end already made for its local connection."""

    noisy = False

    def __init__(self, end) -> None:
        self._end = end

    def buildProtocol(self, addr):
        return self._end


class _MuxLink:
    """The one upgraded connection of a run that carries every local connection as a
    stream (the client side of apptunnel/proxy/tcp_mux.py; a `TunnelHandler`)."""

    def __init__(self, proxy: LocalProxy, profile) -> None:
        self._proxy = proxy
        self.profile = profile
        self.lost = False
        self._tunnel: TunnelProtocol | None = None
        self._waiting: list[defer.Deferred] = []
        try:
            endpoint = proxy.endpoint(profile, batch=True)
        except (ValueError, ssl.SSLError) as err:
            self._fail(_Unserved(502, f"cannot use the saved login: {err}"))
            return
        d = endpoint.connect(_RemoteFactory(self, proxy.request(mux=True)))
        d.addTimeout(proxy.connect_timeout, proxy.reactor)
        d.addErrback(lambda f: self._fail(
            _Unserved(502, f"cannot reach the proxy: {f.getErrorMessage()}")))

    def stream(self, factory) -> defer.Deferred:
        if self._tunnel is not None:
            return self._open(self._tunnel, factory)
        if self.lost:
            return defer.fail(_Unserved(502, "cannot reach the proxy: connection lost"))
        waiter: defer.Deferred = defer.Deferred()
        self._waiting.append(waiter)
        return waiter.addCallback(self._open, factory)

    def _open(self, tunnel: TunnelProtocol, factory) -> defer.Deferred:
        d = tunnel.connect_stream({}, factory)
        d.addErrback(self._unserved)
        return d

    @staticmethod
    def _unserved(failure: Failure):
        if failure.check(StreamRefused):
            status, message = status_of(failure.value.reason, 502)
            message = message or str(failure.value)
            line = f"proxy refused: {status} {responses.get(status, 'Error')}: {message}"
            raise _Unserved(status, line, message=message)
        return failure

    def retire(self) -> None:
        """No new streams here; those open finish, then the connection closes."""
        self.lost = True
        if self._tunnel is not None:
            self._tunnel.go_away("the local proxy made a new connection")
        self._fail(_Unserved(502, "cannot reach the proxy: connection replaced"))

    def _fail(self, unserved: _Unserved) -> None:
        self.lost = True
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            if not waiter.called:
                waiter.errback(unserved)

    # -- the upgrade (RemoteSide's owner) --------------------------------------------------

    def upgraded(self, remote: RemoteSide, rest: bytes) -> None:
        proxy = self._proxy
        tunnel = TunnelProtocol(self, proxy.reactor, initiator=True,
                                keepalive_interval=KEEPALIVE_INTERVAL,
                                keepalive_timeout=KEEPALIVE_TIMEOUT)
        remote.relay_through(tunnel)
        if rest:
            tunnel.dataReceived(rest)

    def refused(self, answer: Answer) -> None:
        self._fail(_Unserved(502, answer.line(), answer))

    # -- TunnelHandler ---------------------------------------------------------------------

    def tunnel_ready(self, tunnel: TunnelProtocol) -> None:
        if self.lost:   # retired while the upgrade was on its way
            tunnel.go_away("the local proxy made a new connection")
            return
        self._tunnel = tunnel
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            if not waiter.called:
                waiter.callback(tunnel)

    def control_received(self, tunnel: TunnelProtocol, message: dict) -> None:
        """The proxy sends none today; unknown messages are ignored (forward compatible)."""

    def stream_requested(self, tunnel: TunnelProtocol, target: dict) -> defer.Deferred:
        return defer.fail(StreamRefused(ErrorCode.REFUSED, "the local proxy accepts no streams"))

    def tunnel_lost(self, tunnel: TunnelProtocol, reason: Failure) -> None:
        self._tunnel = None
        self._fail(_Unserved(502, f"cannot reach the proxy: {reason.getErrorMessage()}"))


class _RemoteFactory(Factory):
    noisy = False

    def __init__(self, owner, request: bytes) -> None:
        self._owner = owner
        self._request = request

    def buildProtocol(self, addr) -> RemoteSide:
        return RemoteSide(self._owner, self._request)


class RemoteSide(Protocol):
    """The TLS connection to the proxy: send the upgrade, read the answer; after a 101 it
    feeds the relay's other end. The owner hears ``upgraded(self, rest)`` or
    ``refused(Answer)``."""

    def __init__(self, owner, request: bytes) -> None:
        self._owner = owner
        self._request = request
        self._buf = bytearray()
        self._end = None

    def connectionMade(self) -> None:
        self.transport.write(self._request)

    def relay_through(self, end) -> None:
        self._end = end
        end.makeConnection(self.transport)

    def dataReceived(self, data: bytes) -> None:
        if self._end is not None:
            self._end.dataReceived(data)
            return
        self._buf += data
        if len(self._buf) > MAX_RESPONSE:
            del self._buf[MAX_RESPONSE:]
            self.transport.abortConnection()
            return
        end = self._buf.find(b"\r\n\r\n")
        if end >= 0 and _status(bytes(self._buf)) == 101:
            rest = bytes(self._buf[end + 4:])
            self._buf = bytearray()
            self._owner.upgraded(self, rest)

    def connectionLost(self, reason: Failure) -> None:
        if self._end is not None:
            self._end.connectionLost(reason)
            return
        raw = bytes(self._buf)
        ended = client_failure(reason.value, "the proxy") or ""
        self._owner.refused(Answer(_status(raw), raw, ended))


def _status(raw: bytes) -> int:
    """The status code of an answer's first line, 0 if there is none."""
    parts = raw.split(b"\r\n", 1)[0].split(b" ", 2)
    try:
        return int(parts[1]) if parts[0].startswith(b"HTTP/") else 0
    except (IndexError, ValueError):
        return 0
