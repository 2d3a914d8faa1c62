"""A small internal web app that shows what apptunnel tells it about the caller.

It sits where a real internal app would (behind the agent) and makes the proxy's work
visible: the identity JWT and whether its signature checks out against the proxy's JWKS,
the ``X-Forwarded-*`` headers, a redirect to its own internal URL (to see Location
rewriting), server-sent events, a WebSocket echo and a large streamed body.

    python -m apptunnel.sample_app --listen 127.0.0.1:8081 \\
        --jwks-url https://apptunnel.localhost:3080/.well-known/jwks.json \\
        --ca-file demo-data/proxy/ca.crt --audience https://hello.apptunnel.localhost:3080

Everything runs on the reactor without blocking: keys are fetched with treq, the big body
is a pull producer, the WebSocket is the ``websockets`` sans-IO state machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from typing import Any

import attrs
import jinja2
import jwt
from treq.client import HTTPClient
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, wrapClientTLS
from twisted.internet.interfaces import IPullProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.logger import Logger, globalLogBeginner, textFileLogObserver
from twisted.python.failure import Failure
from twisted.web.client import Agent
from twisted.web.iweb import IAgentEndpointFactory
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from websockets.datastructures import Headers as WsHeaders
from websockets.frames import Opcode
from websockets.http11 import Request as WsRequest
from websockets.protocol import State as WsState
from websockets.server import ServerProtocol
from zope.interface import implementer

from apptunnel.jwks import JwksCache, JwksError
from apptunnel.net import loopback_host, split_host_port

log = Logger()

DEFAULT_HEADER = "Apptunnel-Jwt-Assertion"
NOT_REACHED = "no identity header: not reached through apptunnel"
LEEWAY = 30.0                      # seconds of clock skew tolerated on exp/nbf/iat
MAX_TOKEN_BYTES = 8 * 1024         # a common upstream header limit; bigger is not ours
MAX_WS_FRAME = 1024 * 1024
MAX_BIG_MB = 4096
BIG_CHUNK = 64 * 1024
_BIG_BLOCK = b"x" * BIG_CHUNK


@implementer(IAgentEndpointFactory)
class LoopbackEndpointFactory:
    """Dial ``*.localhost`` on 127.0.0.1 while TLS still verifies the URL's own hostname.

    The proxy's certificate names ``apptunnel.localhost``, which the system resolver may not
    know (RFC 6761 loopback names), so only the TCP connect is redirected.
    """

    def __init__(self, reactor, ca_pem: bytes | None, connect_timeout: float = 10.0) -> None:
        self._reactor = reactor
        self._trust = Certificate.loadPEM(ca_pem) if ca_pem else None
        self._timeout = connect_timeout

    def endpointForURI(self, uri):
        host = uri.host.decode("ascii")
        tcp = TCP4ClientEndpoint(self._reactor, loopback_host(host), uri.port, timeout=self._timeout)
        if uri.scheme == b"http":
            return tcp
        return wrapClientTLS(optionsForClientTLS(host, trustRoot=self._trust), tcp)


@attrs.frozen
class Identity:
    """What the app learned about the caller from the identity header."""

    present: bool
    verified: bool
    reason: str
    claims: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        claims = self.claims
        exp = claims.get("exp")
        return {
            "present": self.present,
            "verified": self.verified,
            "reason": self.reason,
            "username": claims.get("username") or claims.get("sub"),
            "roles": claims.get("roles", []),
            "traits": claims.get("traits", {}),
            "exp": exp,
            "expires": _iso(exp),
            "claims": claims,
        }


def _iso(epoch: Any) -> str | None:
    if not isinstance(epoch, (int, float)):
        return None
    try:
        return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).isoformat()
    except (OverflowError, OSError, ValueError):
        return None


class IdentityVerifier:
    """Checks the proxy's JWT: signature against the JWKS (algorithm from the key), audience,
    and exp/nbf/iat against the injected clock with `LEEWAY` seconds of tolerance."""

    def __init__(self, jwks: JwksCache | None, audience: str | None, clock: IReactorTime) -> None:
        self._jwks = jwks
        self._audience = audience
        self._clock = clock

    async def identify(self, token: str | None) -> Identity:
        if not token:
            return Identity(False, False, NOT_REACHED, {})
        if len(token) > MAX_TOKEN_BYTES:
            return Identity(True, False, f"token longer than {MAX_TOKEN_BYTES} bytes", {})
        try:
            header = jwt.get_unverified_header(token)
            claims = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError as err:
            return Identity(True, False, f"not a JWT: {err}", {})
        if self._jwks is None:
            return Identity(True, False, "not verified: no --jwks-url configured", claims)
        kid = header.get("kid")
        if not isinstance(kid, str):
            return Identity(True, False, "token has no kid", claims)
        try:
            key = await self._jwks.key(kid)
        except JwksError as err:
            return Identity(True, False, str(err), claims)
        try:
            verified = jwt.decode(
                token, key.key, algorithms=[key.algorithm_name], audience=self._audience,
                options={"verify_exp": False, "verify_nbf": False, "verify_iat": False,
                         "verify_aud": self._audience is not None, "require": ["exp"]},
            )
        except jwt.PyJWTError as err:
            return Identity(True, False, f"invalid token: {err}", claims)
        problem = self._time_problem(verified)
        if problem:
            return Identity(True, False, problem, claims)
        return Identity(True, True, f"signature verified with key {kid} ({key.algorithm_name})", verified)

    def _time_problem(self, claims: dict) -> str | None:
        now = self._clock.seconds()
        for name in ("exp", "nbf", "iat"):
            if name in claims and not isinstance(claims[name], (int, float)):
                return f"invalid token: {name} is not a number"
        if claims["exp"] + LEEWAY <= now:
            return "invalid token: expired"
        if "nbf" in claims and claims["nbf"] - LEEWAY > now:
            return "invalid token: not yet valid (nbf)"
        if "iat" in claims and claims["iat"] - LEEWAY > now:
            return "invalid token: issued in the future (iat)"
        return None


_PAGE = jinja2.Environment(autoescape=True).from_string("""<!doctype html>
<html><head><meta charset="utf-8"><title>hello from behind apptunnel</title>
<style>
body{font-family:system-ui,sans-serif;max-width:56rem;margin:2rem auto;padding:0 1rem;color:#222}
table{border-collapse:collapse;margin:.5rem 0 1.5rem}td,th{border:1px solid #ccc;padding:.3rem .6rem;text-align:left;vertical-align:top}
.ok{color:#0a6b2d;font-weight:bold}.bad{color:#a11;font-weight:bold}code,pre{background:#f4f4f4;padding:.1rem .3rem}
</style></head><body>
<h1>Hello{% if who.username %}, {{ who.username }}{% endif %}</h1>
{% if not who.present %}
<p class="bad">{{ who.reason }}</p>
{% else %}
<p>Identity header <code>{{ header }}</code>:
{% if who.verified %}<span class="ok">verified</span>{% else %}<span class="bad">NOT verified</span>{% endif %}
&mdash; {{ who.reason }}</p>
<table>
<tr><th>username</th><td>{{ who.username }}</td></tr>
<tr><th>roles</th><td>{{ who.roles | join(", ") }}</td></tr>
<tr><th>traits</th><td><code>{{ who.traits | tojson }}</code></td></tr>
<tr><th>expires</th><td>{{ who.expires }} (exp {{ who.exp }})</td></tr>
</table>
<details><summary>all claims</summary><pre>{{ who.claims | tojson(indent=2) }}</pre></details>
{% endif %}
<h2>Request</h2>
<table>{% for name, value in headers.items() %}<tr><th>{{ name }}</th><td>{{ value }}</td></tr>{% endfor %}</table>
<p>Header names received: {{ header_names | join(", ") }}</p>
<h2>Try</h2>
<ul>
<li><a href="/api/whoami">/api/whoami</a> (JSON)</li>
<li><a href="/redirect">/redirect</a> (302 to this app's internal URL; the proxy rewrites it)</li>
<li><a href="/big?mb=10">/big?mb=10</a> (10 MiB streamed)</li>
<li><button id="sse">server-sent events</button> <button id="ws">WebSocket echo</button></li>
</ul>
<pre id="out"></pre>
<script>
const out = document.getElementById("out");
const say = (t) => { out.textContent += t + "\\n"; };
document.getElementById("sse").onclick = () => {
  const es = new EventSource("/events");
  es.addEventListener("tick", (e) => say("sse: " + e.data));
  es.addEventListener("done", () => { say("sse: done"); es.close(); });
};
document.getElementById("ws").onclick = () => {
  const ws = new WebSocket((location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws");
  ws.onopen = () => ws.send("hello over apptunnel");
  ws.onmessage = (e) => { say("ws echo: " + e.data); ws.close(); };
  ws.onerror = () => say("ws: error");
};
</script>
</body></html>
""")

def _shown_headers(request: Request) -> dict[str, str]:
    """Host and X-Forwarded-*: what the proxy says about the original request."""
    shown = {}
    for raw_name, values in request.requestHeaders.getAllRawHeaders():
        name = raw_name.decode("latin-1")
        lowered = name.lower()
        if lowered == "host" or lowered.startswith("x-forwarded-") or lowered == "forwarded":
            shown[name] = ", ".join(v.decode("latin-1") for v in values)
    return dict(sorted(shown.items()))


def _header_names(request: Request) -> list[str]:
    return sorted(n.decode("latin-1") for n, _ in request.requestHeaders.getAllRawHeaders())


def _run_async(request: Request, coro) -> int:
    """Render from a coroutine; a failure is a plain 500, logged once."""
    gone = []
    request.notifyFinish().addErrback(lambda _: gone.append(True))

    def done(body: bytes) -> None:
        if not gone:
            request.write(body)
            request.finish()

    def failed(failure: Failure) -> None:
        log.failure("rendering {path} failed", failure, path=request.path)
        if not gone:
            request.setResponseCode(500)
            request.setHeader("content-type", "text/plain; charset=utf-8")
            request.write(b"internal error\n")
            request.finish()

    Deferred.fromCoroutine(coro).addCallbacks(done, failed)
    return NOT_DONE_YET


class _IdentityResource(Resource):
    isLeaf = True

    def __init__(self, verifier: IdentityVerifier, header: str, as_json: bool) -> None:
        super().__init__()
        self._verifier = verifier
        self._header = header
        self._json = as_json

    def render_GET(self, request: Request) -> int:
        return _run_async(request, self._render(request))

    async def _render(self, request: Request) -> bytes:
        raw = request.getHeader(self._header)
        who = (await self._verifier.identify(raw)).as_dict()
        headers = _shown_headers(request)
        names = _header_names(request)
        request.setHeader("cache-control", "no-store")
        if self._json:
            request.setHeader("content-type", "application/json")
            body = {"identity": who, "header": self._header, "headers": headers, "header_names": names}
            if not who["present"]:
                body["message"] = NOT_REACHED
            return json.dumps(body, indent=2, sort_keys=True).encode() + b"\n"
        request.setHeader("content-type", "text/html; charset=utf-8")
        return _PAGE.render(who=who, header=self._header, headers=headers,
                            header_names=names).encode()


class _EventsResource(Resource):
    """Server-sent events: `ticks` events, the first at once, then one per `interval`."""

    isLeaf = True

    def __init__(self, clock: IReactorTime, ticks: int = 5, interval: float = 1.0) -> None:
        super().__init__()
        self._clock = clock
        self._ticks = ticks
        self._interval = interval

    def render_GET(self, request: Request) -> int:
        request.setHeader("content-type", "text/event-stream")
        request.setHeader("cache-control", "no-store")
        request.setHeader("x-accel-buffering", "no")
        _TickStream(request, self._clock, self._ticks, self._interval).start()
        return NOT_DONE_YET


class _TickStream:
    def __init__(self, request: Request, clock: IReactorTime, ticks: int, interval: float) -> None:
        self._request = request
        self._clock = clock
        self._ticks = ticks
        self._interval = interval
        self._sent = 0
        self._call = None

    def start(self) -> None:
        self._request.notifyFinish().addErrback(self._gone)
        self._tick()

    def _tick(self) -> None:
        self._call = None
        self._sent += 1
        data = json.dumps({"tick": self._sent, "time": self._clock.seconds()})
        self._request.write(f"id: {self._sent}\nevent: tick\ndata: {data}\n\n".encode())
        if self._sent >= self._ticks:
            self._request.write(b"event: done\ndata: {}\n\n")
            self._request.finish()
        else:
            self._call = self._clock.callLater(self._interval, self._tick)

    def _gone(self, _reason: Failure) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None


class _RedirectResource(Resource):
    """302 to this app's own internal URL, as apps behind proxies often do by mistake."""

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        host = request.getHost()
        name = f"[{host.host}]" if ":" in host.host else host.host
        request.redirect(f"http://{name}:{host.port}/".encode())
        request.setHeader("content-type", "text/plain; charset=utf-8")
        return b"moved\n"


@implementer(IPullProducer)
class _Filler:
    """Writes the body one block per resumeProducing: memory stays one block, whatever N."""

    def __init__(self, request: Request, size: int) -> None:
        self._request = request
        self._left = size
        self._stopped = False

    def resumeProducing(self) -> None:
        if self._stopped:
            return
        n = min(BIG_CHUNK, self._left)
        self._left -= n
        self._request.write(_BIG_BLOCK[:n] if n < BIG_CHUNK else _BIG_BLOCK)
        if self._left == 0:
            self._stopped = True
            self._request.unregisterProducer()
            self._request.finish()

    def stopProducing(self) -> None:
        self._stopped = True


class _BigResource(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes | int:
        text = (request.args.get(b"mb") or [b"1"])[0]
        try:
            mb = int(text)
        except ValueError:
            mb = -1
        if not 0 <= mb <= MAX_BIG_MB:
            request.setResponseCode(400)
            request.setHeader("content-type", "text/plain; charset=utf-8")
            return f"mb must be an integer from 0 to {MAX_BIG_MB}\n".encode()
        size = mb * 1024 * 1024
        request.setHeader("content-type", "application/octet-stream")
        request.setHeader("content-length", str(size))
        if size == 0:
            return b""
        filler = _Filler(request, size)
        request.notifyFinish().addErrback(lambda _: filler.stopProducing())
        request.registerProducer(filler, False)
        return NOT_DONE_YET


class _WebSocketEcho(Protocol):
    """Echoes every data frame as it comes (fragments too), so no message is ever buffered
    whole; frames over MAX_WS_FRAME close the connection with 1009."""

    def __init__(self, ws: ServerProtocol, handshake: bytes) -> None:
        self._ws = ws
        self._handshake = handshake

    def connectionMade(self) -> None:
        self.transport.write(self._handshake)

    def dataReceived(self, data: bytes) -> None:
        self._ws.receive_data(data)
        for frame in self._ws.events_received():
            if self._ws.state is not WsState.OPEN:
                break
            if frame.opcode is Opcode.TEXT:
                self._ws.send_text(frame.data, frame.fin)
            elif frame.opcode is Opcode.BINARY:
                self._ws.send_binary(frame.data, frame.fin)
            elif frame.opcode is Opcode.CONT:
                self._ws.send_continuation(frame.data, frame.fin)
        self._flush()

    def _flush(self) -> None:
        for chunk in self._ws.data_to_send():
            if chunk:
                self.transport.write(chunk)
            else:
                self.transport.loseConnection()

    def connectionLost(self, reason: Failure) -> None:
        self._ws.receive_eof()


class _WebSocketResource(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes | int:
        headers = WsHeaders()
        for name, values in request.requestHeaders.getAllRawHeaders():
            for value in values:
                headers[name.decode("latin-1")] = value.decode("latin-1")
        response = ServerProtocol().accept(WsRequest(request.uri.decode("latin-1"), headers))
        if response.status_code != 101:
            request.setResponseCode(response.status_code)
            request.setHeader("content-type", "text/plain; charset=utf-8")
            return response.body
        # twisted.web already parsed the request, so the frame parser starts out OPEN.
        ws = ServerProtocol(state=WsState.OPEN, max_size=MAX_WS_FRAME)
        # twisted.web has no public hook to switch protocols, so the channel hands its
        # byte stream to the echo protocol, as Twisted's own WebSocketResource does.
        # HTTPChannel stays the transport's producer, so a client that does not read
        # pauses our reading (backpressure) instead of growing the write buffer.
        echo = _WebSocketEcho(ws, response.serialize())
        channel = request.channel
        channel.dataReceived = echo.dataReceived
        channel.connectionLost = echo.connectionLost
        echo.makeConnection(channel.transport)
        return NOT_DONE_YET


class _Root(Resource):
    def getChild(self, path: bytes, request: Request) -> Resource:
        return _NotFound()


class _NotFound(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        request.setResponseCode(404)
        request.setHeader("content-type", "text/plain; charset=utf-8")
        return b"not found\n"


def build_resource(verifier: IdentityVerifier, clock: IReactorTime, *,
                   header: str = DEFAULT_HEADER, tick_interval: float = 1.0) -> Resource:
    """The app's resource tree; `clock` paces the event stream."""
    root = _Root()
    root.putChild(b"", _IdentityResource(verifier, header, as_json=False))
    api = _Root()
    api.putChild(b"whoami", _IdentityResource(verifier, header, as_json=True))
    root.putChild(b"api", api)
    root.putChild(b"events", _EventsResource(clock, interval=tick_interval))
    root.putChild(b"ws", _WebSocketResource())
    root.putChild(b"redirect", _RedirectResource())
    root.putChild(b"big", _BigResource())
    return root


def build_verifier(reactor, clock: IReactorTime, jwks_url: str | None, ca_pem: bytes | None,
                   audience: str | None) -> IdentityVerifier:
    """A verifier that fetches keys from `jwks_url` (trusting `ca_pem`), or none at all."""
    jwks = None
    if jwks_url:
        agent = Agent.usingEndpointFactory(reactor, LoopbackEndpointFactory(reactor, ca_pem))
        jwks = JwksCache(HTTPClient(agent), jwks_url, clock)
    return IdentityVerifier(jwks, audience, clock)


def build_site(resource: Resource) -> Site:
    site = Site(resource)
    site.displayTracebacks = False
    return site


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m apptunnel.sample_app",
        description="A small internal app that shows the identity apptunnel sends it.")
    parser.add_argument("--listen", default="127.0.0.1:8081", help="host:port to listen on")
    parser.add_argument("--jwks-url", help="the proxy's https://PUBLIC_ADDR/.well-known/jwks.json")
    parser.add_argument("--ca-file", help="PEM CA that issued the proxy's certificate")
    parser.add_argument("--audience", help="this app's public URL (the JWT's aud)")
    parser.add_argument("--header", default=DEFAULT_HEADER, help="identity header name")
    args = parser.parse_args(argv)
    if bool(args.jwks_url) != bool(args.audience):
        parser.error("--jwks-url and --audience go together")
    try:
        args.host, args.port = split_host_port(args.listen)
    except ValueError as err:
        parser.error(f"--listen: {err}")
    args.ca_pem = None
    if args.ca_file:
        try:
            with open(args.ca_file, "rb") as f:
                args.ca_pem = f.read()
            Certificate.loadPEM(args.ca_pem)
        except OSError as err:
            parser.error(f"--ca-file: {err.strerror}: {args.ca_file}")
        except Exception:
            parser.error(f"--ca-file: not a PEM certificate: {args.ca_file}")
    return args


async def _serve(reactor, args: argparse.Namespace) -> None:
    verifier = build_verifier(reactor, reactor, args.jwks_url, args.ca_pem, args.audience)
    site = build_site(build_resource(verifier, reactor, header=args.header))
    port = await TCP4ServerEndpoint(reactor, args.port, interface=args.host).listen(site)
    address = port.getHost()
    log.info("sample app listening on http://{host}:{port}/", host=address.host, port=address.port)
    await Deferred()  # until react() stops the reactor on a signal


def main(argv: list[str] | None = None) -> None:
    from twisted.internet.task import react

    args = _parse_args(argv)
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)], redirectStandardIO=False)
    react(lambda reactor: Deferred.fromCoroutine(_serve(reactor, args)))


if __name__ == "__main__":
    main()
