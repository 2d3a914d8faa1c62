"""`apptunnel proxy app NAME --port P`: a local port that leads to one app.

Each connection to 127.0.0.1:P becomes its own TLS connection to the proxy, presenting
the user's certificate from the login profile, and one ``apptunnel-tcp`` upgrade (see
``apptunnel/proxy/tcp_access.py``). After ``101`` the two sockets are joined byte for
byte, each the other's push producer, so neither side is read faster than the other can
take it. Any other answer is printed as one line and that connection is closed; the
listener keeps running. The certificate is checked per connection: once it has expired,
connections are refused locally (after a re-read of the profile, so a fresh
``apptunnel login`` in another terminal is picked up without a restart).

For an HTTP app the relay is the same: the proxy, not this process, reads the HTTP
requests after the upgrade and authorizes, signs and audits each one, so plain
``curl localhost:P`` reaches the app as the logged-in user.

This verb runs a reactor, unlike the other user verbs.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from urllib.parse import quote

from OpenSSL import SSL
from twisted.internet import defer, error, ssl
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from apptunnel.cli.context import CliError, Io, UsageError
from apptunnel.cli.output import clean
from apptunnel.cli.profile import NOT_LOGGED_IN, TRUST_INSECURE, TRUST_PINNED, Profile, home_dir
from apptunnel.net import loopback_host, split_host_port

__all__ = ["LocalProxy", "add_parsers", "parse_port_spec", "proxy_app"]

CONNECT_TIMEOUT = 15.0
MAX_RESPONSE = 16 * 1024
EARLY_LIMIT = 64 * 1024

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
    app.set_defaults(user_handler=proxy_app)


def proxy_app(args: argparse.Namespace, io: Io) -> int:
    """Console handler: listen, then run the reactor until interrupted."""
    local_port, remote_port = parse_port_spec(args.port)
    home = home_dir(io.environ)
    if Profile.load(home) is None:
        raise CliError(NOT_LOGGED_IN)
    from twisted.internet import reactor

    def say(line: str) -> None:
        io.stderr.write(f"apptunnel: {clean(line)}\n")
        io.stderr.flush()

    proxy = LocalProxy(reactor, lambda: Profile.load(home), args.name, remote_port, say)
    try:
        port = reactor.listenTCP(local_port, proxy, interface="127.0.0.1")
    except error.CannotListenError:
        raise CliError(f"local port {local_port} is in use") from None
    bound = port.getHost().port
    target = args.name if remote_port is None else f"{args.name}:{remote_port}"
    io.out(f"Proxying connections to {target} on 127.0.0.1:{bound}\n")
    io.stdout.flush()
    reactor.run()
    return 0


class LocalProxy(Factory):
    """Accepts local connections and gives each its own upgraded connection to the proxy."""

    noisy = False

    def __init__(self, reactor, load_profile: Callable[[], Profile | None], app: str,
                 remote_port: int | None, say: Say, now: Callable[[], float] = time.time,
                 connect_timeout: float = CONNECT_TIMEOUT) -> None:
        self.reactor = reactor
        self._load_profile = load_profile
        self._profile: Profile | None = None
        self.app = app
        self.remote_port = remote_port
        self.say = say
        self.now = now
        self.connect_timeout = connect_timeout

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

    def request(self) -> bytes:
        target = "/v1/tcp/" + quote(self.app, safe="")
        if self.remote_port is not None:
            target += f"?port={self.remote_port}"
        host, _ = split_host_port(self._profile.proxy, 443)
        return (f"GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\n"
                "Upgrade: apptunnel-tcp\r\nUser-Agent: apptunnel-proxy-app\r\n\r\n").encode("ascii")

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


class LocalConnection(Protocol):
    """One local client: held (not read) until the proxy said 101, then relayed.

    Not half-closeable on purpose: TLS to the proxy has no half close, so the client's
    FIN ends the whole session (what psql, redis-cli and most TCP clients do anyway).
    """

    def __init__(self, factory: LocalProxy) -> None:
        self._factory = factory
        self._remote: RemoteSide | None = None
        self._connecting: defer.Deferred | None = None
        self._early: list[bytes] = []
        self._early_size = 0
        self._closed = False

    def connectionMade(self) -> None:
        # Read nothing from the local client until the proxy has said 101.
        self.transport.pauseProducing()
        f = self._factory
        profile = f.profile()
        if profile is None:
            f.say("certificate expired: run apptunnel login")
            self.transport.loseConnection()
            return
        try:
            endpoint = f.endpoint(profile)
        except (ValueError, SSL.Error) as err:
            f.say(f"cannot use the saved login: {err}")
            self.transport.loseConnection()
            return
        self._connecting = endpoint.connect(_RemoteFactory(self, f.request()))
        self._connecting.addErrback(self._connect_failed)

    def _connect_failed(self, failure: Failure) -> None:
        self._connecting = None
        if self._closed:
            return
        self._factory.say(f"cannot reach the proxy: {failure.getErrorMessage()}")
        self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        if self._remote is not None and self._remote.relaying:
            self._remote.transport.write(data)
            return
        self._early_size += len(data)
        if self._early_size > EARLY_LIMIT:
            self._factory.say("local client sent too much before the proxy answered")
            self.transport.abortConnection()
            return
        self._early.append(data)

    def upgraded(self, remote: RemoteSide) -> None:
        """101: flush what the client already sent and join the two sockets."""
        self._connecting = None
        if self._closed:
            remote.transport.loseConnection()
            return
        self._remote = remote
        early, self._early = self._early, []
        for chunk in early:
            remote.transport.write(chunk)
        self.transport.registerProducer(remote.transport, True)
        remote.transport.registerProducer(self.transport, True)
        self.transport.resumeProducing()

    def remote_data(self, data: bytes) -> None:
        if not self._closed:
            self.transport.write(data)

    def remote_lost(self, reason: Failure, message: str | None) -> None:
        """The proxy side ended; print why if it never upgraded."""
        self._connecting = None
        self._remote = None
        if message:
            self._factory.say(message)
        if self._closed:
            return
        self.transport.unregisterProducer()
        if message is None and reason.check(error.ConnectionDone):
            self.transport.loseConnection()
        elif message is None:
            self.transport.abortConnection()
        else:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure) -> None:
        self._closed = True
        if self._connecting is not None:
            d, self._connecting = self._connecting, None
            d.cancel()
        remote, self._remote = self._remote, None
        if remote is not None:
            remote.local_lost()


class _RemoteFactory(Factory):
    noisy = False

    def __init__(self, local: LocalConnection, request: bytes) -> None:
        self._local = local
        self._request = request

    def buildProtocol(self, addr) -> RemoteSide:
        return RemoteSide(self._local, self._request)


class RemoteSide(Protocol):
    """The TLS connection to the proxy: send the upgrade, read the answer, then relay."""

    def __init__(self, local: LocalConnection, request: bytes) -> None:
        self._local: LocalConnection | None = local
        self._request = request
        self._buf = bytearray()
        self.relaying = False
        self._status: int | None = None

    def connectionMade(self) -> None:
        self.transport.write(self._request)

    def dataReceived(self, data: bytes) -> None:
        if self.relaying:
            if self._local is not None:
                self._local.remote_data(data)
            return
        self._buf += data
        if len(self._buf) > MAX_RESPONSE:
            self._buf = self._buf[:MAX_RESPONSE]
            self.transport.abortConnection()
            return
        if self._status is None:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                return
            status_line = bytes(self._buf[: self._buf.find(b"\r\n")])
            parts = status_line.split(b" ", 2)
            try:
                self._status = int(parts[1])
            except (IndexError, ValueError):
                self._status = 0
            if self._status == 101:
                rest = bytes(self._buf[end + 4:])
                self._buf = bytearray()
                self.relaying = True
                local = self._local
                if local is not None:
                    local.upgraded(self)
                    if rest:
                        local.remote_data(rest)

    def _refusal(self) -> str:
        """One line from a non-101 answer: the proxy's text, else the status line."""
        head, _, body = bytes(self._buf).partition(b"\r\n\r\n")
        status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        if not head:
            return "the proxy closed the connection without answering"
        text = body.decode("utf-8", "replace").strip().splitlines()
        text = text[0] if text and not text[0].lstrip().startswith("<") else ""
        return f"proxy refused: {status_line.partition(' ')[2]}" + (f": {text}" if text else "")

    def local_lost(self) -> None:
        self._local = None
        self.transport.unregisterProducer()
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure) -> None:
        local, self._local = self._local, None
        if local is None:
            return
        if self.relaying:
            local.remote_lost(reason, None)
        else:
            local.remote_lost(reason, self._refusal())
