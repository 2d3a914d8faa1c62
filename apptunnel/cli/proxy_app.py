"""`apptunnel proxy app NAME --port P`: a local port that leads to one app.

Before it listens it asks the proxy the same question each connection will ask: one
``apptunnel-tcp`` upgrade as a dry run (``Apptunnel-Dry-Run: 1``, see
``apptunnel/proxy/tcp_access.py``). A refusal (unknown or denied app, a port of an HTTP
app, an undeclared port, a lock, an expired certificate) exits 1 with the proxy's one line
and listens on nothing; an accept tells whether the app speaks HTTP or raw TCP.

Each connection to 127.0.0.1:P then becomes one stream of a single TLS connection to
the proxy that presents the user's certificate from the login profile (``Upgrade:
apptunnel-mux``, when the dry run offered it; an older proxy gets one TLS connection and
one upgrade per local connection). The stream and the local socket are joined by the one
relay (``apptunnel/tunnel/relay.py``). Any
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

import attrs
from cryptography.hazmat.primitives import serialization
from twisted.internet import defer, error, threads
from twisted.python.failure import Failure

from apptunnel import local_proxy
from apptunnel.cli.context import CliError, Io, UsageError
from apptunnel.cli.login import _factor_field, _have_terminal
from apptunnel.cli.output import clean
from apptunnel.cli.profile import NOT_LOGGED_IN, Profile, home_dir
from apptunnel.local_proxy import EXPIRED, LISTEN_BACKLOG, LocalProxy

__all__ = ["LocalProxy", "add_parsers", "check", "parse_port_spec", "proxy_app"]


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
            port = reactor.listenTCP(local_port, proxy, backlog=LISTEN_BACKLOG,
                                     interface="127.0.0.1")
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
    """The dry run (apptunnel/local_proxy.py) with its refusal as a CliError."""
    try:
        return await local_proxy.check(proxy)
    except local_proxy.SecondFactorNeeded as err:
        raise SecondFactorNeeded(err.message) from None
    except local_proxy.LocalProxyError as err:
        raise CliError(err.message) from None


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


