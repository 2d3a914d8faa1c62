"""Joining a cluster: trade a join token for an agent certificate, trusting only the pin.

The agent knows nothing about the proxy but the CA pin an operator copied from
``apptunnel tokens add``. So the join connection accepts any certificate at first and
then checks, inside the TLS handshake, that the chain the proxy presented contains a
certificate whose public key has that pin and that the proxy's own certificate was
issued by it and is valid now. Only after that check has passed is the token handed to
TLS; a wrong pin aborts the handshake, so a man in the middle never sees the token (no
trust on first use).

The agent's private key is generated here and never leaves the machine: the proxy only
sees a CSR. The result is saved in ``data_dir``: ``agent.key`` (0600), ``agent.crt``,
``ca.crt`` and ``host_id``; ``agent.crt`` is written last, so its presence means a
complete identity.
"""

from __future__ import annotations

import datetime
import os
import uuid
from ssl import TLSVersion

import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet import defer, error
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from apptunnel.agent.errors import AgentError
from apptunnel.agent.trust import TRUST_FILE, forget_trust_set, load_trust_set
from apptunnel.auth.pins import cert_pin, check_chain
from apptunnel.config import AgentConfig
from apptunnel.files import write_file
from apptunnel.messages import Join, JoinOk, JoinRefused, MessageError, kind_of, parse
from apptunnel.net import is_ip, loopback_host, split_host_port
from apptunnel.tls.contexts import ClientTls
from apptunnel.tunnel.errors import StreamRefused
from apptunnel.tunnel.frames import ErrorCode
from apptunnel.tunnel.protocol import TunnelProtocol

__all__ = ["AgentIdentity", "JoinError", "join"]

log = Logger()

JOIN_TIMEOUT = 30.0
CONNECT_TIMEOUT = 10.0

_FILES = ("agent.key", "agent.crt", "ca.crt", "host_id")


class JoinError(AgentError):
    """Joining failed; ``str()`` is one line for the operator.

    ``retry`` is False when retrying cannot help without a config change (wrong pin,
    token refused) and True when the proxy was merely unreachable.
    """

    def __init__(self, message: str, retry: bool = False) -> None:
        super().__init__(message)
        self.retry = retry


@attrs.frozen
class AgentIdentity:
    """The agent's key, its certificate, the CA it joined under and the host CAs it
    trusts (``trusted``: agent/trust.py's set; empty means just ``ca_pem``)."""

    host_id: str
    key_pem: bytes
    cert_pem: bytes
    ca_pem: bytes
    trusted: tuple[bytes, ...] = ()

    @property
    def trusted_pems(self) -> tuple[bytes, ...]:
        return self.trusted or (self.ca_pem,)

    @classmethod
    def load(cls, data_dir: str) -> AgentIdentity | None:
        """The saved identity, None before the first join; JoinError if it is damaged."""
        paths = {name: os.path.join(data_dir, name) for name in _FILES}
        if not os.path.exists(paths["agent.crt"]):
            return None
        try:
            data = {}
            for name, path in paths.items():
                with open(path, "rb") as f:
                    data[name] = f.read()
            identity = cls(
                host_id=data["host_id"].decode("ascii").strip(),
                key_pem=data["agent.key"],
                cert_pem=data["agent.crt"],
                ca_pem=data["ca.crt"],
            )
            certs = load_trust_set(data_dir, identity.ca_pem,
                                   x509.load_pem_x509_certificate(identity.cert_pem))
            if os.path.exists(os.path.join(data_dir, TRUST_FILE)):   # else: ca.crt alone
                identity = attrs.evolve(identity, trusted=tuple(
                    c.public_bytes(serialization.Encoding.PEM) for c in certs))
            identity.check()
        except (OSError, ValueError, TypeError) as err:
            raise JoinError(
                f"{data_dir}: the saved agent identity is unreadable ({err}); remove "
                f"{', '.join(_FILES)} and join again with a new token"
            ) from None
        return identity

    def check(self) -> None:
        """ValueError unless key, certificate and CA belong together."""
        key = serialization.load_pem_private_key(self.key_pem, password=None)
        cert = x509.load_pem_x509_certificate(self.cert_pem)
        x509.load_pem_x509_certificate(self.ca_pem)   # ca.crt must at least parse
        if key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ) != cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ):
            raise ValueError("agent.key does not match agent.crt")
        for pem in self.trusted_pems:
            try:
                cert.verify_directly_issued_by(x509.load_pem_x509_certificate(pem))
                return
            except (ValueError, TypeError, InvalidSignature):
                continue
        raise ValueError("agent.crt is not issued by ca.crt or a trusted host CA")

    def save_cert(self, data_dir: str) -> None:
        """Replace only agent.crt (a renewal keeps the key): one atomic rename."""
        write_file(os.path.join(data_dir, "agent.crt"), self.cert_pem, 0o644)

    @property
    def cert_host_id(self) -> str:
        cert = x509.load_pem_x509_certificate(self.cert_pem)
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(names[0].value) if names else ""

    def save(self, data_dir: str) -> None:
        os.makedirs(data_dir, mode=0o700, exist_ok=True)
        write_file(os.path.join(data_dir, "host_id"), self.host_id.encode("ascii") + b"\n", 0o644)
        write_file(os.path.join(data_dir, "ca.crt"), self.ca_pem, 0o644)
        forget_trust_set(data_dir)
        write_file(os.path.join(data_dir, "agent.key"), self.key_pem, 0o600)
        write_file(os.path.join(data_dir, "agent.crt"), self.cert_pem, 0o644)

    @property
    def not_after(self) -> float:
        cert = x509.load_pem_x509_certificate(self.cert_pem)
        return cert.not_valid_after_utc.timestamp()

    def tunnel_tls(self) -> ClientTls:
        """The mutual-TLS tunnel's client side: our certificate and key, and the host CAs
        (the join CA, plus a new one during a host-CA rotation) as the only authorities
        a proxy's certificate may chain to; TLS 1.3, as the proxy's tunnel port requires."""
        return ClientTls(trusted_cas=self.trusted_pems, cert_pem=self.cert_pem,
                         key_pem=self.key_pem, minimum_version=TLSVersion.TLSv1_3)


# -- the pinned handshake ---------------------------------------------------------------


@implementer(IOpenSSLClientConnectionCreator)
class PinnedTLS:
    """Client TLS 1.3 that accepts a proxy only if its chain matches the CA pin.

    OpenSSL's own chain checks are overridden (the CA is not trusted yet); the decision is
    made once, at the leaf, from the whole chain. ``verified`` fires (on a later reactor
    turn, outside the handshake) only after the check has passed.
    """

    def __init__(self, reactor, hostname: str, pin: str) -> None:
        self._reactor = reactor
        self._hostname = hostname
        self._pin = pin
        self.problem: str | None = None
        self.verified: defer.Deferred = defer.Deferred()
        self._passed = False

    def clientConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        context = SSL.Context(SSL.TLS_METHOD)
        context.set_min_proto_version(SSL.TLS1_3_VERSION)
        context.set_verify(SSL.VERIFY_PEER, self._verify)
        connection = SSL.Connection(context, None)
        connection.set_app_data(tlsProtocol)
        if not is_ip(self._hostname):
            connection.set_tlsext_host_name(self._hostname.encode("idna"))
        return connection

    def _verify(self, connection, cert, errno, depth, ok) -> bool:
        if depth > 0:
            return True  # judged as a whole when OpenSSL reaches the leaf
        chain = [c.to_cryptography() for c in (connection.get_peer_cert_chain() or [])]
        self.problem = check_chain(chain, self._pin, self._reactor.seconds())
        if self.problem is not None:
            return False
        if not self._passed:  # OpenSSL may ask about the leaf more than once
            self._passed = True
            self._reactor.callLater(0, self.verified.callback, None)
        return True


# -- the join conversation --------------------------------------------------------------


def make_csr(key_pem: bytes, host_id: str) -> str:
    """A PEM CSR signed by our key: proves to the proxy that we hold it."""
    key = serialization.load_pem_private_key(key_pem, password=None)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host_id)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode("ascii")


def _saved_key(data_dir: str) -> ec.EllipticCurvePrivateKey | None:
    """The key of an earlier join: a host id may only be joined again with its key."""
    try:
        with open(os.path.join(data_dir, "agent.key"), "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
    except (OSError, ValueError, TypeError):
        return None
    return key if isinstance(key, ec.EllipticCurvePrivateKey) else None


class _JoinHandler:
    """TunnelHandler for the one-message join: send join, wait for the answer."""

    def __init__(self, tls: PinnedTLS, message: Join, proxy_addr: str) -> None:
        self._tls = tls
        self._message = message
        self._proxy_addr = proxy_addr
        self.result: defer.Deferred = defer.Deferred()
        self._lost = False

    def tunnel_ready(self, tunnel) -> None:
        def send(_):
            if not self._lost:
                tunnel.send_control(self._message.to_dict())

        self._tls.verified.addCallback(send)

    def control_received(self, tunnel, message: dict) -> None:
        if self.result.called:
            return
        try:
            answer = parse(message)
        except MessageError as err:
            answer = err
        if isinstance(answer, JoinOk):
            self.result.callback(answer)
        elif isinstance(answer, JoinRefused):
            text = " ".join(answer.message[:300].split())
            self.result.errback(JoinError(f"the proxy at {self._proxy_addr} refused the join: "
                                          f"{text}"))
        elif isinstance(answer, MessageError) and message.get("type") == JoinOk.TYPE:
            self.result.errback(JoinError(f"the proxy at {self._proxy_addr} answered the join "
                                          f"with a bad certificate: {answer.one_line()}"))
        else:
            self.result.errback(JoinError(f"the proxy at {self._proxy_addr} answered the join "
                                          f"with an unexpected message {kind_of(message)}"))
        tunnel.close()

    def stream_requested(self, tunnel, target: dict) -> defer.Deferred:
        return defer.fail(StreamRefused(ErrorCode.REFUSED, "joining"))

    def tunnel_lost(self, tunnel, reason: Failure) -> None:
        self._lost = True
        if self.result.called:
            return
        if self._tls.problem is not None:
            err = JoinError(f"refusing the proxy at {self._proxy_addr}: {self._tls.problem} "
                            "(check ca_pin; the token was not sent)")
        else:
            err = JoinError(f"the proxy at {self._proxy_addr} closed the connection before "
                            f"answering the join ({reason.getErrorMessage()})", retry=True)
        self.result.errback(err)


async def join(reactor, config: AgentConfig) -> AgentIdentity:
    """Join the cluster with ``config.join_token``, verify the proxy by ``config.ca_pin``,
    save the identity in ``config.data_dir`` and return it; JoinError otherwise."""
    if not config.join_token or not config.ca_pin:
        raise JoinError(f"{config.path}: join.token and join.ca_pin are needed to join "
                        "(create a token with `apptunnel tokens add --type app`)")
    host, port = split_host_port(config.proxy_addr)
    old_host_id = _read_host_id(config.data_dir)
    host_id = old_host_id or str(uuid.uuid4())
    key = (_saved_key(config.data_dir) if old_host_id else None) or ec.generate_private_key(
        ec.SECP256R1())
    tls = PinnedTLS(reactor, host, config.ca_pin)
    handler = _JoinHandler(tls, Join(token=config.join_token,
                                     csr=make_csr(_key_pem(key), host_id),
                                     host_id=host_id), config.proxy_addr)
    endpoint = wrapClientTLS(
        tls, HostnameEndpoint(reactor, loopback_host(host), port, timeout=CONNECT_TIMEOUT)
    )
    factory = Factory.forProtocol(lambda: TunnelProtocol(
        handler, reactor, initiator=True,
        keepalive_interval=config.keepalive_interval,
        keepalive_timeout=config.keepalive_timeout,
    ))
    factory.noisy = False
    try:
        tunnel = await endpoint.connect(factory).addTimeout(CONNECT_TIMEOUT, reactor)
    except (error.ConnectError, error.DNSLookupError, defer.TimeoutError, OSError) as err:
        raise JoinError(f"cannot reach the proxy at {config.proxy_addr}: "
                        f"{_describe(err)}", retry=True) from None
    try:
        answer = await handler.result.addTimeout(JOIN_TIMEOUT, reactor)
    except defer.TimeoutError:
        tunnel.transport.abortConnection()
        raise JoinError(f"the proxy at {config.proxy_addr} did not answer the join within "
                        f"{JOIN_TIMEOUT:.0f}s", retry=True) from None
    identity = _identity_from(answer, key, host_id, config)
    identity.save(config.data_dir)
    log.info("joined the cluster as {host_id} (certificate valid until {until})",
             host_id=host_id,
             until=datetime.datetime.fromtimestamp(identity.not_after, datetime.timezone.utc)
             .isoformat(timespec="seconds"))
    return identity


def _identity_from(answer: JoinOk, key: ec.EllipticCurvePrivateKey, host_id: str,
                   config: AgentConfig) -> AgentIdentity:
    """Check the proxy's join_ok: the CA must be the pinned one, the cert ours and from it."""
    cert_text, ca_text = answer.cert, answer.ca
    try:
        ca = x509.load_pem_x509_certificate(ca_text.encode("ascii"))
        if cert_pin(ca) != config.ca_pin:
            raise ValueError(f"the CA it returned does not match ca_pin {config.ca_pin}")
        identity = AgentIdentity(
            host_id=host_id,
            key_pem=_key_pem(key),
            cert_pem=cert_text.encode("ascii"),
            ca_pem=ca.public_bytes(serialization.Encoding.PEM),
        )
        identity.check()
    except (ValueError, TypeError, UnicodeError) as err:
        raise JoinError(f"the proxy at {config.proxy_addr} answered the join with a bad "
                        f"certificate: {err}") from None
    return identity


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _read_host_id(data_dir: str) -> str | None:
    """Keep the host id across re-joins, so audit and logs follow one machine."""
    try:
        with open(os.path.join(data_dir, "host_id"), "rb") as f:
            text = f.read(200).decode("ascii").strip()
    except (OSError, UnicodeError):
        return None
    return text or None


def _describe(err: Exception) -> str:
    if isinstance(err, error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(err, (defer.TimeoutError, error.TimeoutError)):
        return "connection timed out"
    if isinstance(err, error.DNSLookupError):
        return "DNS lookup failed"
    return " ".join((str(err) or err.__class__.__name__).split())
