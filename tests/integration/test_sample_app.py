"""The sample app on a real loopback socket, with the proxy's JWKS served over real TLS.

The JWKS server is a twisted.web site with a certificate for ``apptunnel.localhost`` from a
test CA, so the sample app's fetch goes through the same name mapping and TLS checks as in
the demo. Token times and SSE ticks run on a Clock; the network runs on the reactor.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import json
import os
import socket
import struct

import jwt
import pytest
import pytest_twisted
import treq
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ServerEndpoint
from twisted.internet.ssl import PrivateCertificate
from twisted.internet.task import Clock
from twisted.web.resource import Resource
from twisted.web.server import Site
from websockets.sync.client import connect as ws_connect

from apptunnel import jwks, sample_app

NOW = 1_700_000_000.0
AUDIENCE = "https://hello.apptunnel.localhost:3080"
HEADER = "Apptunnel-Jwt-Assertion"
WAIT = 10  # seconds: upper bound on every wait


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _make_tls() -> tuple[bytes, bytes, bytes]:
    """A test CA and a server certificate for apptunnel.localhost: (ca_pem, cert_pem, key_pem)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sample-app test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                         critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "apptunnel.localhost")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("apptunnel.localhost")]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    return (ca.public_bytes(serialization.Encoding.PEM),
            cert.public_bytes(serialization.Encoding.PEM), _pem_key(key))


TLS = _make_tls()
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())


def _jwk(private_key, kid: str) -> dict:
    public = private_key.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        jwk = jwt.algorithms.RSAAlgorithm.to_jwk(public, as_dict=True)
        jwk["alg"] = "RS256"
    else:
        jwk = jwt.algorithms.ECAlgorithm.to_jwk(public, as_dict=True)
        jwk["alg"] = "ES256"
    jwk.update(kid=kid, use="sig")
    return jwk


def _token(private_key=RSA_KEY, kid="k1", alg="RS256", **overrides) -> str:
    claims = {"iss": "demo", "sub": "alice", "username": "alice", "aud": AUDIENCE,
              "iat": int(NOW), "nbf": int(NOW), "exp": int(NOW) + 300,
              "roles": ["demo-apps"], "traits": {"team": ["sre"]}, "jti": "j1"}
    claims.update(overrides)
    return jwt.encode(claims, private_key, algorithm=alg, headers={"kid": kid})


class _Jwks(Resource):
    """The proxy's /.well-known/jwks.json, with a fetch counter and swappable keys."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.keys = [_jwk(RSA_KEY, "k1"), _jwk(EC_KEY, "k-ec")]
        self.fetches = 0

    def render_GET(self, request):
        self.fetches += 1
        request.setHeader("content-type", "application/json")
        return json.dumps({"keys": self.keys}).encode()


class Servers:
    def __init__(self) -> None:
        self.jwks = _Jwks()
        self.clock = Clock()
        self.clock.advance(NOW)
        self.ports = []

    async def start(self, jwks_host: str = "apptunnel.localhost") -> "Servers":
        tls = PrivateCertificate.loadPEM(TLS[1] + TLS[2]).options()
        jwks_port = await SSL4ServerEndpoint(reactor, 0, tls, interface="127.0.0.1").listen(
            Site(self.jwks))
        self.ports.append(jwks_port)
        url = f"https://{jwks_host}:{jwks_port.getHost().port}/.well-known/jwks.json"
        verifier = sample_app.build_verifier(reactor, self.clock, url, TLS[0], AUDIENCE)
        site = sample_app.build_site(sample_app.build_resource(verifier, self.clock))
        app_port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
        self.ports.append(app_port)
        self.port = app_port.getHost().port
        self.base = f"http://127.0.0.1:{self.port}"
        return self

    async def stop(self) -> None:
        for port in self.ports:
            await port.stopListening()


@pytest_twisted.async_yield_fixture
async def servers():
    s = await Servers().start()
    yield s
    await s.stop()


def _timed(d: Deferred) -> Deferred:
    return d.addTimeout(WAIT, reactor)


async def _get(url: str, **kwargs):
    return await _timed(treq.get(url, persistent=False, **kwargs))


async def _whoami(s: Servers, token: str | None = None, headers: dict | None = None) -> dict:
    headers = dict(headers or {})
    if token is not None:
        headers[HEADER] = token
    response = await _get(s.base + "/api/whoami", headers=headers)
    assert response.code == 200
    return json.loads(await _timed(treq.content(response)))


@pytest_twisted.ensureDeferred
async def test_valid_token_verifies_and_shows_claims(servers):
    """A token signed by a published key, for our audience, is verified and its claims shown."""
    body = await _whoami(servers, _token())
    who = body["identity"]
    assert who["verified"] is True, who["reason"]
    assert who["username"] == "alice"
    assert who["roles"] == ["demo-apps"]
    assert who["traits"] == {"team": ["sre"]}
    assert who["exp"] == int(NOW) + 300
    assert who["expires"].startswith("2023-11-14T22:")


@pytest_twisted.ensureDeferred
async def test_html_page_shows_identity(servers):
    """GET / renders the username, the verified status and escapes claim values."""
    token = _token(username="<b>mallory</b>")
    response = await _get(servers.base + "/", headers={HEADER: token})
    page = (await _timed(treq.content(response))).decode()
    assert response.headers.getRawHeaders("content-type")[0].startswith("text/html")
    assert "&lt;b&gt;mallory&lt;/b&gt;" in page and "<b>mallory</b>" not in page
    assert ">verified<" in page


@pytest_twisted.ensureDeferred
async def test_algorithm_comes_from_the_key(servers):
    """An ES256 key in the JWKS verifies ES256 tokens naming its kid."""
    body = await _whoami(servers, _token(EC_KEY, kid="k-ec", alg="ES256"))
    assert body["identity"]["verified"] is True, body["identity"]["reason"]


@pytest_twisted.ensureDeferred
async def test_token_from_another_key_with_unknown_kid_is_unverified(servers):
    """A token naming a kid the proxy does not publish is reported unverified."""
    body = await _whoami(servers, _token(OTHER_RSA_KEY, kid="rogue"))
    assert body["identity"]["verified"] is False
    assert "rogue" in body["identity"]["reason"]
    assert body["identity"]["username"] == "alice"  # shown, but marked unverified


@pytest_twisted.ensureDeferred
async def test_token_from_another_key_reusing_kid_is_unverified(servers):
    """A token signed by another key under a published kid fails the signature check."""
    body = await _whoami(servers, _token(OTHER_RSA_KEY, kid="k1"))
    assert body["identity"]["verified"] is False
    assert "Signature verification failed" in body["identity"]["reason"]


@pytest_twisted.ensureDeferred
async def test_hmac_with_public_key_is_rejected(servers):
    """An HS256 token keyed with the RSA public key (algorithm confusion) is not accepted."""
    public_pem = RSA_KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def b64(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "k1"}).encode())
    payload = b64(json.dumps({"sub": "root", "aud": AUDIENCE, "exp": int(NOW) + 300}).encode())
    signature = b64(hmac.new(public_pem, header + b"." + payload, hashlib.sha256).digest())
    body = await _whoami(servers, (header + b"." + payload + b"." + signature).decode())
    assert body["identity"]["verified"] is False


@pytest_twisted.ensureDeferred
async def test_wrong_audience_is_unverified(servers):
    """A token minted for another app is not accepted for this one."""
    body = await _whoami(servers, _token(aud="https://grafana.apptunnel.localhost:3080"))
    assert body["identity"]["verified"] is False
    assert "audience" in body["identity"]["reason"].lower()


@pytest_twisted.ensureDeferred
async def test_expiry_uses_clock_with_leeway(servers):
    """exp is checked against the injected clock with 30 s of leeway."""
    within = await _whoami(servers, _token(exp=int(NOW) - 20))
    assert within["identity"]["verified"] is True, within["identity"]["reason"]
    expired = await _whoami(servers, _token(exp=int(NOW) - 40))
    assert expired["identity"]["verified"] is False
    assert "expired" in expired["identity"]["reason"]


@pytest_twisted.ensureDeferred
async def test_missing_header_says_not_reached_through_apptunnel(servers):
    """Without the identity header, the page and JSON say the app was reached directly."""
    body = await _whoami(servers)
    assert body["identity"]["present"] is False
    assert body["message"] == "no identity header: not reached through apptunnel"
    page = await _timed(treq.content(await _get(servers.base + "/")))
    assert b"no identity header: not reached through apptunnel" in page


@pytest_twisted.ensureDeferred
async def test_garbage_and_oversized_tokens_are_one_clear_error(servers):
    """Non-JWT and over-long header values are reported unverified, not a 500."""
    garbage = await _whoami(servers, "not-a-jwt")
    assert garbage["identity"]["verified"] is False
    assert garbage["identity"]["reason"].startswith("not a JWT")
    huge = await _whoami(servers, "a" * (sample_app.MAX_TOKEN_BYTES + 1))
    assert "longer than" in huge["identity"]["reason"]


@pytest_twisted.ensureDeferred
async def test_forwarded_headers_are_shown(servers):
    """X-Forwarded-* and Host are echoed; cookie values are not."""
    body = await _whoami(servers, headers={"X-Forwarded-For": "203.0.113.9",
                                           "X-Forwarded-Proto": "https",
                                           "Cookie": "secret=1"})
    assert body["headers"]["X-Forwarded-For"] == "203.0.113.9"
    assert body["headers"]["X-Forwarded-Proto"] == "https"
    assert "Host" in body["headers"]
    assert "Cookie" in body["header_names"]
    assert "secret=1" not in json.dumps(body)


@pytest_twisted.ensureDeferred
async def test_keys_are_cached_and_refetched_on_rotation(servers):
    """One fetch serves many tokens; an unknown kid refetches, at most once per interval."""
    await _whoami(servers, _token())
    await _whoami(servers, _token())
    assert servers.jwks.fetches == 1
    new_key = ec.generate_private_key(ec.SECP256R1())
    servers.jwks.keys.append(_jwk(new_key, "k2"))
    rotated = _token(new_key, kid="k2", alg="ES256")
    too_soon = await _whoami(servers, rotated)
    assert too_soon["identity"]["verified"] is False
    assert servers.jwks.fetches == 1
    servers.clock.advance(jwks.MIN_REFETCH_INTERVAL)
    later = await _whoami(servers, _token(new_key, kid="k2", alg="ES256",
                                          exp=int(servers.clock.seconds()) + 300))
    assert later["identity"]["verified"] is True, later["identity"]["reason"]
    assert servers.jwks.fetches == 2


@pytest_twisted.ensureDeferred
async def test_retired_key_stops_verifying_after_max_age(servers):
    """Once the cache is older than max-age it is refetched, and a retired key is dropped."""
    assert (await _whoami(servers, _token()))["identity"]["verified"] is True
    servers.jwks.keys = [k for k in servers.jwks.keys if k["kid"] != "k1"]
    servers.clock.advance(jwks.JWKS_MAX_AGE)
    body = await _whoami(servers, _token(exp=int(servers.clock.seconds()) + 300))
    assert body["identity"]["verified"] is False
    assert "k1" in body["identity"]["reason"]
    assert servers.jwks.fetches == 2


@pytest_twisted.ensureDeferred
async def test_concurrent_lookups_share_one_fetch(servers):
    """Requests arriving together while the keys are unknown cause a single JWKS fetch."""
    from twisted.internet.defer import gatherResults

    results = await _timed(gatherResults([
        Deferred.fromCoroutine(_whoami(servers, _token())) for _ in range(5)]))
    assert all(r["identity"]["verified"] for r in results)
    assert servers.jwks.fetches == 1


@pytest_twisted.ensureDeferred
async def test_jwks_tls_name_mismatch_is_unverified():
    """A JWKS server whose certificate does not name the URL's host is not trusted."""
    s = await Servers().start(jwks_host="other.localhost")
    try:
        body = await _whoami(s, _token())
    finally:
        await s.stop()
    assert body["identity"]["verified"] is False
    assert "cannot fetch JWKS" in body["identity"]["reason"]
    assert s.jwks.fetches == 0


class _Events:
    """Splits an SSE body into events as the bytes arrive."""

    def __init__(self) -> None:
        self.queue: DeferredQueue = DeferredQueue()
        self._buffer = b""

    def feed(self, data: bytes) -> None:
        self._buffer += data
        while b"\n\n" in self._buffer:
            event, self._buffer = self._buffer.split(b"\n\n", 1)
            fields = dict(line.split(b": ", 1) for line in event.split(b"\n"))
            self.queue.put(fields)


@pytest_twisted.ensureDeferred
async def test_events_arrive_one_tick_at_a_time(servers):
    """/events sends a tick, then the next only when a second has passed, five in all."""
    response = await _timed(treq.get(servers.base + "/events", unbuffered=True, persistent=False))
    assert response.headers.getRawHeaders("content-type") == ["text/event-stream"]
    events = _Events()
    finished = treq.collect(response, events.feed)
    first = await _timed(events.queue.get())
    assert first[b"event"] == b"tick" and json.loads(first[b"data"])["tick"] == 1
    for n in range(2, 6):
        await _timed(_sleep(0.05))
        assert not events.queue.pending, "next tick arrived before its time"
        servers.clock.advance(1.0)
        tick = await _timed(events.queue.get())
        assert json.loads(tick[b"data"])["tick"] == n
    done = await _timed(events.queue.get())
    assert done[b"event"] == b"done"
    await _timed(finished)


def _sleep(seconds: float) -> Deferred:
    from twisted.internet.task import deferLater

    return deferLater(reactor, seconds, lambda: None)


def _ws_session(url: str) -> list:
    with ws_connect(url, open_timeout=WAIT, close_timeout=WAIT) as ws:
        ws.send("hello")
        text = ws.recv(timeout=WAIT)
        ws.send(b"\x00\x01binary")
        binary = ws.recv(timeout=WAIT)
        ws.send(["frag", "men", "ted"])
        fragmented = ws.recv(timeout=WAIT)
    return [text, binary, fragmented]


@pytest_twisted.ensureDeferred
async def test_websocket_echo(servers):
    """/ws upgrades and echoes text, binary and fragmented messages."""
    received = await _timed(threads.deferToThread(_ws_session, f"ws://127.0.0.1:{servers.port}/ws"))
    assert received == ["hello", b"\x00\x01binary", "fragmented"]


def _ws_oversized(url: str) -> int | None:
    """Announce a frame one byte over the limit (the header alone) and read the close code.

    Sending the whole oversized frame raced the server's close: the client was still
    writing when the server hung up, and saw a broken pipe instead of the 1009.
    """
    port = int(url.split(":")[2].split("/")[0])
    key = base64.b64encode(os.urandom(16)).decode()
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        sock.sendall((f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                      f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                      "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        data = b""
        while b"\r\n\r\n" not in data and len(data) < 65536:
            chunk = sock.recv(4096)
            if not chunk:
                return None
            data += chunk
        head, _, data = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        # FIN + binary, masked, 64-bit length, then the mask: no payload follows.
        sock.sendall(b"\x82\xff" + struct.pack("!Q", sample_app.MAX_WS_FRAME + 1) + b"\0" * 4)
        while len(data) < 4:
            chunk = sock.recv(4096)
            if not chunk:
                return None
            data += chunk
    if data[0] & 0x0F != 0x8:   # not a close frame
        return None
    return struct.unpack("!H", data[2:4])[0]


@pytest_twisted.ensureDeferred
async def test_websocket_oversized_frame_closes_with_1009(servers):
    """A frame over the size limit ends the WebSocket with close code 1009."""
    code = await _timed(threads.deferToThread(_ws_oversized, f"ws://127.0.0.1:{servers.port}/ws"))
    assert code == 1009


@pytest_twisted.ensureDeferred
async def test_websocket_without_upgrade_is_refused(servers):
    """A plain GET /ws gets a 4xx answer, not a hang."""
    response = await _get(servers.base + "/ws")
    assert response.code in (400, 426)
    await _timed(treq.content(response))


@pytest_twisted.ensureDeferred
async def test_big_streams_the_requested_size(servers):
    """/big?mb=2 sends exactly 2 MiB with Content-Length, arriving in many chunks."""
    response = await _timed(treq.get(servers.base + "/big?mb=2", unbuffered=True, persistent=False))
    assert response.length == 2 * 1024 * 1024  # from Content-Length
    sizes = []
    await _timed(treq.collect(response, lambda data: sizes.append(len(data))))
    assert sum(sizes) == 2 * 1024 * 1024
    assert len(sizes) > 1


@pytest.mark.parametrize("value", [b"-1", b"x", b"99999"])
@pytest_twisted.ensureDeferred
async def test_big_rejects_bad_sizes(servers, value):
    """/big answers 400 for sizes that are not an integer in range."""
    response = await _get(servers.base + "/big?mb=" + value.decode())
    assert response.code == 400
    await _timed(treq.content(response))


@pytest_twisted.ensureDeferred
async def test_redirect_points_at_internal_url(servers):
    """/redirect is a 302 to the app's own internal absolute URL."""
    response = await _get(servers.base + "/redirect", allow_redirects=False)
    assert response.code == 302
    assert response.headers.getRawHeaders("location") == [f"http://127.0.0.1:{servers.port}/"]
    await _timed(treq.content(response))
