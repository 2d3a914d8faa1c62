"""The proxy's tunnel listener: agents join here, then keep their tunnels here.

Every connection is TLS 1.3. The client certificate is *requested* and, when present,
verified against the cluster CA by OpenSSL, but not required, because an agent that has
not joined yet has none. What a connection may do depends on that certificate:

* no certificate: exactly one ``join`` message (token + CSR), answered with the signed
  certificate or an error, then the connection is closed;
* an agent certificate of this cluster: a ``hello`` listing its apps, after which the
  apps are online in the registry for as long as the tunnel lives.

Anything else (another first message, a malformed message, silence) gets one log line
and a closed connection. Streams only ever go proxy -> agent: the proxy refuses every
stream an agent tries to open.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from OpenSSL import crypto
from twisted.internet import defer, ssl
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

from apptunnel.auth.ca import ClusterCA
from apptunnel.auth.errors import AuthError
from apptunnel.auth.tokens import constant_time_equal, secret_hash
from apptunnel.proxy.registry import AppInfo, host_only
from apptunnel.tunnel.errors import StreamRefused
from apptunnel.tunnel.frames import ErrorCode
from apptunnel.tunnel.protocol import TunnelProtocol

__all__ = ["AGENT_CERT_TTL", "TunnelServerFactory", "tunnel_tls_options"]

log = Logger()

AGENT_CERT_TTL = 365 * 86400.0
FIRST_MESSAGE_TIMEOUT = 30.0
JOIN_TOKEN_KINDS = ("app",)
JWT_CLAIMS = ("iss", "sub", "username", "aud", "iat", "nbf", "exp", "roles", "traits", "jti")

_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")
_HOSTNAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*\Z")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
_MAX_TOKEN = 512


def tunnel_tls_options(ca_cert_pem: bytes, cert_pem: bytes, key_pem: bytes) -> ssl.CertificateOptions:
    """TLS 1.3 only; our cert plus the CA in the chain (so agents can check the pin);
    client certificates requested and verified against the cluster CA, not required."""
    ca = crypto.load_certificate(crypto.FILETYPE_PEM, ca_cert_pem)
    return ssl.CertificateOptions(
        privateKey=crypto.load_privatekey(crypto.FILETYPE_PEM, key_pem),
        certificate=crypto.load_certificate(crypto.FILETYPE_PEM, cert_pem),
        extraCertChain=[ca],
        verify=True,
        caCerts=[ca],
        requireCertificate=False,
        raiseMinimumTo=ssl.TLSVersion.TLSv1_3,
    )


class TunnelServerFactory(ServerFactory):
    """Builds one TunnelProtocol (responder side) and one handler per agent connection."""

    def __init__(self, ca: ClusterCA, backend, registry, audit, clock: IReactorTime,
                 proxy_id: str, public_host: str, public_port: int,
                 keepalive_interval: float = 5.0, keepalive_timeout: float = 15.0) -> None:
        self.ca = ca
        self.backend = backend
        self.registry = registry
        self.audit = audit
        self.clock = clock
        self.proxy_id = proxy_id
        self.public_host = public_host.lower().rstrip(".")
        self.public_port = public_port
        self.keepalive_interval = keepalive_interval
        self.keepalive_timeout = keepalive_timeout

    def buildProtocol(self, addr) -> TunnelProtocol:
        return TunnelProtocol(
            TunnelSession(self), self.clock, initiator=False,
            keepalive_interval=self.keepalive_interval,
            keepalive_timeout=self.keepalive_timeout,
        )

    def default_public_addr(self, name: str) -> str:
        host = f"{name}.{self.public_host}"
        return host if self.public_port == 443 else f"{host}:{self.public_port}"


class HelloError(ValueError):
    """A hello message we will not register; the text is the logged reason."""


class TunnelSession:
    """The handler of one agent connection: join, or hello and then registered.

    States: ``waiting`` (no message yet), ``joining`` (join in progress, nothing else
    accepted), ``registered`` (hello accepted), ``closing``.
    """

    def __init__(self, factory: TunnelServerFactory) -> None:
        self._factory = factory
        self._state = "waiting"
        self._timer = None
        self._tunnel: TunnelProtocol | None = None
        self._peer = "?"
        self._host_id = ""

    # -- TunnelHandler -----------------------------------------------------------------

    def tunnel_ready(self, tunnel: TunnelProtocol) -> None:
        self._tunnel = tunnel
        try:
            address = tunnel.transport.getPeer()
            self._peer = f"{address.host}:{address.port}"
        except AttributeError:
            pass
        self._timer = self._factory.clock.callLater(FIRST_MESSAGE_TIMEOUT, self._silent)

    def control_received(self, tunnel: TunnelProtocol, message: dict) -> None:
        self._tunnel = tunnel
        kind = message.get("type") if isinstance(message, dict) else None
        if self._state == "waiting":
            self._cancel_timer()
            try:
                role, name = self._peer_identity(tunnel)
            except AuthError as err:
                self._close(tunnel, f"client certificate refused: {err.message}")
                return
            if role is None and kind == "join":
                self._state = "joining"
                self._start_join(tunnel, message)
                return
            if role == "agent" and kind == "hello":
                self._hello(tunnel, name, message)
                return
            who = "unauthenticated connection" if role is None else f"{role} {name}"
            self._close(tunnel, f"unexpected first message {_show(kind)} from {who}")
            return
        self._close(tunnel, f"unexpected message {_show(kind)} in state {self._state}")

    def stream_requested(self, tunnel: TunnelProtocol, target: dict) -> defer.Deferred:
        return defer.fail(StreamRefused(ErrorCode.REFUSED, "the proxy accepts no streams"))

    def tunnel_going_away(self, tunnel: TunnelProtocol) -> None:
        """The agent is draining: no new streams here; idle keep-alive streams are let go
        so the tunnel can finish closing (registry listeners do that). Apps stay known."""
        if self._state == "registered":
            self._factory.registry.drain(tunnel)
            log.info("agent {host_id} ({peer}) is going away", host_id=self._host_id,
                     peer=self._peer)

    def tunnel_lost(self, tunnel: TunnelProtocol, reason: Failure) -> None:
        self._cancel_timer()
        if self._state == "registered":
            self._factory.registry.remove(tunnel)
            log.info("agent {host_id} ({peer}) disconnected: {reason}", host_id=self._host_id,
                     peer=self._peer, reason=reason.getErrorMessage())
        self._state = "closing"

    # -- join --------------------------------------------------------------------------

    def _start_join(self, tunnel: TunnelProtocol, message: dict) -> None:
        d = defer.ensureDeferred(self._join(tunnel, message))
        d.addErrback(self._join_crashed, tunnel)

    async def _join(self, tunnel: TunnelProtocol, message: dict) -> None:
        f = self._factory
        token, csr, host_id = message.get("token"), message.get("csr"), message.get("host_id")
        if not (isinstance(token, str) and 0 < len(token) <= _MAX_TOKEN
                and isinstance(csr, str) and isinstance(host_id, str)):
            self._refuse_join(tunnel, str(host_id)[:64], "malformed join message",
                              "join message needs token, csr and host_id strings")
            return
        token_hash = secret_hash(token)
        record = await f.backend.get_token(token_hash)
        if self._state == "closing":
            return  # the agent went away while we looked the token up
        now = f.clock.seconds()
        if record is None or not constant_time_equal(record.token_hash, token_hash):
            self._refuse_join(tunnel, host_id, "unknown token", "invalid or expired join token")
            return
        if record.expires <= now:
            self._refuse_join(tunnel, host_id, "expired token", "invalid or expired join token")
            return
        if record.kind not in JOIN_TOKEN_KINDS:
            self._refuse_join(tunnel, host_id, f"token kind {record.kind!r} cannot join agents",
                              "this token cannot be used to join an agent")
            return
        try:
            cert_pem = f.ca.sign_agent_csr(csr, host_id, AGENT_CERT_TTL)
        except AuthError as err:
            self._refuse_join(tunnel, host_id, err.message, err.message)
            return
        self._send(tunnel, {"type": "join_ok", "cert": cert_pem.decode("ascii"),
                            "ca": f.ca.cert_pem.decode("ascii")})
        f.audit.emit("agent.join", actor=host_id, target=f.proxy_id, outcome="success",
                     peer=self._peer)
        log.info("agent {host_id} joined from {peer}", host_id=host_id, peer=self._peer)
        self._finish(tunnel)

    def _refuse_join(self, tunnel: TunnelProtocol, host_id: str, reason: str,
                     public: str) -> None:
        """Tell the agent why (without detail that helps guessing) and log/audit the rest."""
        self._send(tunnel, {"type": "join_error", "message": public})
        self._factory.audit.emit("agent.join", actor=host_id, target=self._factory.proxy_id,
                                 outcome="failure", peer=self._peer, reason=reason)
        log.warn("agent join from {peer} refused: {reason}", peer=self._peer, reason=reason)
        self._finish(tunnel)

    def _join_crashed(self, failure: Failure, tunnel: TunnelProtocol) -> None:
        log.failure("join from {peer} failed", failure, peer=self._peer)
        self._send(tunnel, {"type": "join_error", "message": "internal error, try again"})
        self._finish(tunnel)

    # -- hello -------------------------------------------------------------------------

    def _hello(self, tunnel: TunnelProtocol, host_id: str, message: dict) -> None:
        try:
            if message.get("host_id") != host_id:
                raise HelloError(f"host_id {_show(message.get('host_id'))} does not match "
                                 f"its certificate ({host_id})")
            apps = self._apps(message.get("apps"), host_id)
        except HelloError as err:
            self._close(tunnel, f"bad hello from agent {host_id}: {err}")
            return
        self._state = "registered"
        self._host_id = host_id
        self._factory.registry.add(tunnel, host_id, apps)
        self._send(tunnel, {"type": "hello_ok", "proxy_id": self._factory.proxy_id})
        log.info("agent {host_id} connected from {peer} with apps {apps}", host_id=host_id,
                 peer=self._peer, apps=", ".join(a.name for a in apps) or "(none)")

    def _apps(self, raw: Any, host_id: str) -> list[AppInfo]:
        if not isinstance(raw, list):
            raise HelloError("apps must be a list")
        apps, seen, hosts = [], set(), {}
        for index, item in enumerate(raw):
            if not isinstance(item, dict):
                raise HelloError(f"apps[{index}] must be an object")
            app = self._app(item, host_id, index)
            if app.name in seen:
                raise HelloError(f"apps[{index}]: duplicate app {app.name!r}")
            # A public host belongs to one app name: its cookies and JWT audience are that
            # app's, so no agent may put another app there, even while its owner is away.
            host = host_only(app.public_addr)
            owner = hosts.get(host) or self._factory.registry.host_owner(host)
            if owner is not None and owner != app.name:
                raise HelloError(f"apps[{index}].public_addr {host!r} belongs to app {owner!r}")
            hosts[host] = app.name
            seen.add(app.name)
            apps.append(app)
        return apps

    def _app(self, item: dict, host_id: str, index: int) -> AppInfo:
        where = f"apps[{index}]"
        name = item.get("name")
        if not isinstance(name, str) or not _DNS_LABEL.match(name):
            raise HelloError(f"{where}.name must be a DNS label, got {_show(name)}")
        uri = item.get("uri")
        try:
            parts = urlsplit(uri) if isinstance(uri, str) else None
        except ValueError:
            parts = None
        if parts is None or parts.scheme not in ("http", "https", "tcp") or not parts.hostname:
            raise HelloError(f"{where}.uri must be an http(s) or tcp URL, got {_show(uri)}")
        tcp_ports = self._tcp_ports(item.get("tcp_ports"), parts.scheme, where)
        labels = item.get("labels") or {}
        if not isinstance(labels, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
        ):
            raise HelloError(f"{where}.labels must map strings to strings")
        public_addr = item.get("public_addr") or self._factory.default_public_addr(name)
        if not isinstance(public_addr, str) or not self._valid_public_addr(public_addr):
            raise HelloError(f"{where}.public_addr is not a usable app address: "
                             f"{_show(public_addr)}")
        rewrite = item.get("rewrite_headers") or []
        if not isinstance(rewrite, list) or not all(
            isinstance(p, list) and len(p) == 2 and isinstance(p[0], str)
            and _HEADER_NAME.match(p[0]) and isinstance(p[1], str)
            and not any(ord(c) < 32 and c != "\t" or ord(c) == 127 for c in p[1])
            for p in rewrite
        ):
            raise HelloError(f"{where}.rewrite_headers must be [name, value] pairs")
        claims = item.get("jwt_claims")
        if claims is not None and (not isinstance(claims, list)
                                   or not all(c in JWT_CLAIMS for c in claims)):
            raise HelloError(f"{where}.jwt_claims must be a list of known claims")
        return AppInfo(
            name=name,
            uri=uri,
            labels=dict(labels),
            public_addr=public_addr.lower(),
            rewrite_headers=tuple((n, v) for n, v in rewrite),
            jwt_claims=tuple(claims) if claims is not None else None,
            agent_id=host_id,
            tcp_ports=tcp_ports,
        )

    @staticmethod
    def _tcp_ports(raw: Any, scheme: str, where: str) -> tuple[tuple[int, int], ...]:
        """[[low, high], ...] of a tcp:// app; absent or empty for the others."""
        if not raw:
            return ()
        if scheme != "tcp" or not isinstance(raw, list) or len(raw) > 1024:
            raise HelloError(f"{where}.tcp_ports must be a list of [low, high] for a tcp app")
        ranges = []
        for pair in raw:
            if not (isinstance(pair, list) and len(pair) == 2
                    and all(type(p) is int and 1 <= p <= 65535 for p in pair)
                    and pair[0] <= pair[1]):
                raise HelloError(f"{where}.tcp_ports has a bad range {_show(pair)}")
            ranges.append((pair[0], pair[1]))
        return tuple(ranges)

    def _valid_public_addr(self, addr: str) -> bool:
        """A host[:port] that is not the proxy's own host (that would hijack the web UI)."""
        host, _, port = addr.lower().partition(":")
        if port and not (port.isdigit() and port.isascii() and 0 < int(port) < 65536):
            return False
        return bool(_HOSTNAME.match(host)) and host.rstrip(".") != self._factory.public_host

    # -- helpers -----------------------------------------------------------------------

    def _peer_identity(self, tunnel: TunnelProtocol) -> tuple[str | None, str | None]:
        """(role, name) from the client certificate, (None, None) without one; AuthError
        when the certificate is not a valid agent/user certificate of this cluster now."""
        cert = getattr(tunnel, "peer_certificate", None)
        if cert is None:
            return None, None
        if isinstance(cert, crypto.X509):
            cert = cert.to_cryptography()
        if not isinstance(cert, x509.Certificate):
            return None, None
        return self._factory.ca.verify_peer(cert, self._factory.clock.seconds())

    def _send(self, tunnel: TunnelProtocol, message: dict) -> None:
        if self._state != "closing":
            tunnel.send_control(message)

    def _finish(self, tunnel: TunnelProtocol) -> None:
        """Close after the answer has been written (go_away flushes first)."""
        if self._state == "closing":
            return
        self._state = "closing"
        tunnel.go_away("join finished").addErrback(lambda _: None)

    def _close(self, tunnel: TunnelProtocol, reason: str) -> None:
        log.warn("tunnel {peer} closed: {reason}", peer=self._peer, reason=reason)
        if self._state == "registered":
            self._factory.registry.remove(tunnel)
        self._state = "closing"
        tunnel.close()

    def _silent(self) -> None:
        self._timer = None
        if self._tunnel is not None and self._state == "waiting":
            self._close(self._tunnel, f"no join or hello within {FIRST_MESSAGE_TIMEOUT:.0f}s")

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None



def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
