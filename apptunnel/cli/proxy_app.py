"""`apptunnel proxy app NAME --port P`: a local port that leads to one app.

Before it listens it asks the proxy the same question each connection will ask: one
``apptunnel-tcp`` upgrade as a dry run (``Apptunnel-Dry-Run: 1``, see
``apptunnel/proxy/tcp_access.py``). A refusal (unknown or denied app, a port of an HTTP
app, an undeclared port, a lock, an expired certificate) exits 1 with the proxy's one line
and listens on nothing; an accept tells whether the app speaks HTTP or raw TCP.

Each connection to 127.0.0.1:P then becomes its own TLS connection to the proxy,
presenting the user's certificate from the login profile, and one real upgrade. After
``101`` the two sockets are joined by the one relay (``apptunnel/tunnel/relay.py``). Any
other answer is printed as one line; for an HTTP app the client gets it as an HTTP
answer (the proxy's status and line, or 502/401 when the proxy cannot be reached or the
certificate has expired), for a TCP app the connection is closed. The listener keeps
running. The certificate is checked per connection: once it has expired, connections are
refused locally (after a re-read of the profile, so a fresh ``apptunnel login`` in
another terminal is picked up without a restart).

An app whose role asks for a second factor per session (``require_session_mfa``) makes
the dry run answer 401 "needs a second factor": the code is asked once per run (``--otp
CODE`` for scripts), traded at ``POST /v1/certs/app`` for a certificate bound to that one
app, valid for a minute to start sessions (as Teleport's per-session MFA certificates),
and every connection of the run presents it. Sessions started keep running; a connection
after that minute is refused with a line saying to run the command again.

For an HTTP app the relay is the same: the proxy, not this process, reads the HTTP
requests after the upgrade and authorizes, signs and audits each one, so plain
``curl localhost:P`` reaches the app as the logged-in user.

This verb runs a reactor, unlike the other user verbs.
"""

from __future__ import annotations

import argparse
import getpass
import time
from typing import NamedTuple
from collections.abc import Callable
from urllib.parse import quote

from http.client import responses

import attrs
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from twisted.internet import defer, error, ssl, threads
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from apptunnel.cli.context import CliError, Io, UsageError
from apptunnel.cli.login import _factor_field, _have_terminal
from apptunnel.cli.output import clean
from apptunnel.cli.profile import NOT_LOGGED_IN, TRUST_INSECURE, TRUST_PINNED, Profile, home_dir
from apptunnel.net import loopback_host, split_host_port
from apptunnel.tunnel.relay import Relay

__all__ = ["LocalProxy", "add_parsers", "check", "parse_port_spec", "proxy_app"]

CONNECT_TIMEOUT = 15.0
MAX_RESPONSE = 16 * 1024
EARLY_LIMIT = 64 * 1024
EXPIRED = "certificate expired: run apptunnel login"
LINGER = 2.0  # seconds a refused HTTP client may take to close after our answer
NEEDS_FACTOR = "needs a second factor"   # the proxy's per-session MFA refusal (401)

Say = Callable[[str], None]


def parse_port_spec(spec: str) -> tuple[int, int | None]:
    """``"15432"`` -> (15432, None); ``"15432:5432"`` -> (15432, 5432). UsageError if bad."""
    local, colon, remote = spec.partition(":")

    def port(text: str, allow_zero: bool) -> int:
        text = text.strip()
        if not (text.isdigit() and text.isascii() and len(text) <= 5):
            raise UsageError(f"--port: expected PORT or LOCAL:REMOTE, got {spec!r}")
        value = int(text)
        if not ((0 if allow_zero else 1) <= value <= 65535):
            raise UsageError(f"--port: ports must be 1-65535, got {spec!r}")
        return value

    return port(local, True), (port(remote, False) if colon else None)


def add_parsers(verbs: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    proxy = verbs.add_parser("proxy", parents=[common], help="local ports leading to apps")
    sub = proxy.add_subparsers(dest="action", metavar="ACTION", required=True)
    app = sub.add_parser("app", parents=[common], help="listen on localhost and relay to an app (HTTP or TCP)")
    app.add_argument("name", metavar="NAME", help="the app")
    app.add_argument("--port", default="0", metavar="LOCAL[:REMOTE]",
                     help="local port (0 = any free one); REMOTE picks a port of a multi-port app")
    app.add_argument("--otp", metavar="CODE",
                     help="second-factor code (or recovery code) for an app that asks for "
                          "one per session; asked on the terminal otherwise")
    app.set_defaults(user_handler=proxy_app)


def proxy_app(args: argparse.Namespace, io: Io) -> int:
    """Console handler: ask the proxy, listen, then run the reactor until interrupted."""
    local_port, remote_port = parse_port_spec(args.port)
    home = home_dir(io.environ)
    if Profile.load(home) is None:
        raise CliError(NOT_LOGGED_IN)
    from twisted.internet import reactor

    def say(line: str) -> None:
        io.stderr.write(f"apptunnel: {clean(line)}\n")
        io.stderr.flush()

    proxy = LocalProxy(reactor, lambda: Profile.load(home), args.name, remote_port, say)
    failed: list[CliError] = []

    async def begin() -> None:
        try:
            proxy.kind = await check(proxy)
        except SecondFactorNeeded:
            code = args.otp or await threads.deferToThread(_ask_code, args.name)
            profile = proxy.profile()
            if profile is None:
                raise CliError(EXPIRED) from None
            bound = await threads.deferToThread(app_certificate, profile, args.name, code)
            proxy.bind(bound)
            proxy.kind = await check(proxy)
        try:
            port = reactor.listenTCP(local_port, proxy, interface="127.0.0.1")
        except error.CannotListenError:
            raise CliError(f"local port {local_port} is in use") from None
        bound = port.getHost().port
        target = args.name if remote_port is None else f"{args.name}:{remote_port}"
        io.out(f"Proxying connections to {target} on 127.0.0.1:{bound}\n")
        io.stdout.flush()

    def stop(failure: Failure) -> None:
        failed.append(failure.value if failure.check(CliError)
                      else CliError(f"proxy app failed: {failure.getErrorMessage()}"))
        reactor.stop()

    reactor.callWhenRunning(lambda: defer.Deferred.fromCoroutine(begin()).addErrback(stop))
    reactor.run()
    if failed:
        raise failed[0]
    return 0


async def check(proxy: LocalProxy) -> str:
    """Ask the proxy whether it would accept our upgrade (a dry run of the same decision):
    the app's kind (``tcp`` or ``http``), else CliError with the proxy's one line."""
    profile = proxy.profile()
    if profile is None:
        raise CliError(EXPIRED)
    try:
        endpoint = proxy.endpoint(profile)
    except (ValueError, SSL.Error) as err:
        raise CliError(f"cannot use the saved login: {err}") from None
    asked = _Question()
    connecting = endpoint.connect(_RemoteFactory(asked, proxy.request(dry_run=True)))
    connecting.addTimeout(proxy.connect_timeout, proxy.reactor)
    try:
        await connecting
    except Exception as err:  # any connect failure: one line, as for each connection
        raise CliError(f"cannot reach the proxy: {err}") from None
    answer = await asked.answered.addTimeout(proxy.connect_timeout, proxy.reactor)
    if answer.status == 401 and NEEDS_FACTOR in answer.text():
        raise SecondFactorNeeded(answer.line())
    if answer.status != 200:
        raise CliError(answer.line())
    kind = answer.text()
    return kind if kind in ("tcp", "http") else "tcp"


class SecondFactorNeeded(CliError):
    """The dry run's answer for an app asking for a second factor per session."""


def _ask_code(app: str) -> str:
    """The code, asked on the terminal (run in a thread: getpass blocks)."""
    if not _have_terminal():
        raise UsageError(f"{app} asks for a second factor: give the code with --otp CODE")
    try:
        return getpass.getpass(f"Code from your authenticator app for {app}: ").strip()
    except (EOFError, KeyboardInterrupt):
        raise CliError("no code entered") from None


def app_certificate(profile: Profile, app: str, code: str) -> Profile:
    """The profile with a one-app MFA certificate for the same key (blocking: a thread)."""
    key = serialization.load_pem_private_key(profile.key_pem, password=None)
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    body = {"public_key": public.decode("ascii"), "app": app, _factor_field(code): code.strip()}
    status, answer = profile.client().call("POST", "/v1/certs/app", body)
    if status != 200 or not isinstance(answer, dict) or not isinstance(answer.get("cert"), str):
        why = answer.get("error") if isinstance(answer, dict) else None
        raise CliError(f"second factor for {app} refused: {why or f'HTTP {status}'}")
    return attrs.evolve(profile, cert_pem=answer["cert"].encode("ascii"))


class Answer(NamedTuple):
    """The proxy's answer to an upgrade that did not switch protocols."""

    status: int          # 0 when there was no status line
    raw: bytes           # the whole answer as received (at most MAX_RESPONSE bytes)

    def text(self) -> str:
        """The first line of the body (the proxy's one-line reason)."""
        _, _, body = self.raw.partition(b"\r\n\r\n")
        lines = body.decode("utf-8", "replace").strip().splitlines()
        return lines[0].strip() if lines and not lines[0].lstrip().startswith("<") else ""

    def line(self) -> str:
        """One line to print: the proxy's status and reason."""
        if not self.raw:
            return "the proxy closed the connection without answering"
        status_line = self.raw.split(b"\r\n", 1)[0].decode("latin-1")
        text = self.text()
        return f"proxy refused: {status_line.partition(' ')[2]}" + (f": {text}" if text else "")

    def complete(self) -> bool:
        """A whole HTTP answer we may pass on to an HTTP client as it is."""
        return self.status >= 200 and b"\r\n\r\n" in self.raw


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

    def __init__(self, reactor, load_profile: Callable[[], Profile | None], app: str,
                 remote_port: int | None, say: Say, now: Callable[[], float] = time.time,
                 connect_timeout: float = CONNECT_TIMEOUT, kind: str = "tcp") -> None:
        self.reactor = reactor
        self._load_profile = load_profile
        self._profile: Profile | None = None
        self.app = app
        self.remote_port = remote_port
        self.say = say
        self.now = now
        self.connect_timeout = connect_timeout
        self.kind = kind   # "http": refusals reach the local client as HTTP answers
        self.expired = EXPIRED

    def bind(self, profile: Profile) -> None:
        """Present this one-app MFA certificate from now on, never re-reading the saved
        login: once it has expired, new connections are refused (sessions run on)."""
        self._profile = profile
        self._load_profile = lambda: profile
        self.expired = (f"the second-factor certificate for {self.app} starts sessions for a "
                        f"minute only: run apptunnel proxy app {self.app} again")

    def buildProtocol(self, addr) -> LocalConnection:
        return LocalConnection(self)

    def profile(self) -> Profile | None:
        """A profile whose certificate is valid now, re-read once the cached one expired."""
        now = self.now()
        if self._profile is None or self._profile.expired(now):
            try:
                self._profile = self._load_profile()
            except CliError as err:
                self.say(err.message)
                self._profile = None
        if self._profile is None or self._profile.expired(now):
            return None
        return self._profile

    def request(self, dry_run: bool = False) -> bytes:
        target = "/v1/tcp/" + quote(self.app, safe="")
        if self.remote_port is not None:
            target += f"?port={self.remote_port}"
        host, _ = split_host_port(self._profile.proxy, 443)
        extra = "Apptunnel-Dry-Run: 1\r\n" if dry_run else ""
        return (f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\n"
                f"Upgrade: apptunnel-tcp\r\n{extra}User-Agent: apptunnel-proxy-app\r\n\r\n"
                ).encode("ascii")

    def endpoint(self, profile: Profile):
        host, port = split_host_port(profile.proxy, 443)
        client_cert = ssl.PrivateCertificate.loadPEM(profile.cert_pem + b"\n" + profile.key_pem)
        if profile.trust == TRUST_INSECURE:
            creator = ssl.CertificateOptions(
                privateKey=client_cert.privateKey.original,
                certificate=client_cert.original, verify=False,
                raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
            )
        else:
            trust = ssl.Certificate.loadPEM(profile.ca_pem) if profile.trust == TRUST_PINNED else None
            creator = ssl.optionsForClientTLS(host, trustRoot=trust, clientCertificate=client_cert)
        tcp = HostnameEndpoint(self.reactor, loopback_host(host), port,
                               timeout=self.connect_timeout)
        return wrapClientTLS(creator, tcp)


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
        # The relay reads nothing more from the client until the other end is joined.
        self._relay.a.makeConnection(self.transport)
        f = self._factory
        profile = f.profile()
        if profile is None:
            self._fail(401, f.expired)
            return
        try:
            endpoint = f.endpoint(profile)
        except (ValueError, SSL.Error) as err:
            self._fail(502, f"cannot use the saved login: {err}")
            return
        self._connecting = endpoint.connect(_RemoteFactory(self, f.request()))
        self._connecting.addErrback(self._connect_failed)

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
        self._owner.refused(Answer(_status(raw), raw))


def _status(raw: bytes) -> int:
    """The status code of an answer's first line, 0 if there is none."""
    parts = raw.split(b"\r\n", 1)[0].split(b" ", 2)
    try:
        return int(parts[1]) if parts[0].startswith(b"HTTP/") else 0
    except (IndexError, ValueError):
        return 0
