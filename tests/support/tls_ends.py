"""Both ends of the TLS layer's unit tests (tests/unit/test_tls_*.py): certificates made
once from throwaway CAs, an application protocol that records what TLS hands up, and the
TLS log lines of a test."""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import reactor as wall_clock
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Protocol
from zope.interface import implementer

from apptunnel.auth.ca import ClusterCA
from apptunnel.tls.contexts import ServerTls


# -- certificates, made once ---------------------------------------------------------------

class Pki:
    def __init__(self, folder) -> None:
        self.ca = ClusterCA.load_or_create(str(folder / "ca"), "unit", wall_clock)
        self.other = ClusterCA.load_or_create(str(folder / "other"), "unit", wall_clock)
        self.cert, self.key = self.ca.issue_server_cert(["localhost"], ["127.0.0.1"])
        self.cert2, self.key2 = self.ca.issue_server_cert(["localhost"], ["127.0.0.1"])
        self.client = client_pair(self.ca, "host-1")
        self.stranger = client_pair(self.other, "host-1")
        self.foreign = self.other.issue_server_cert(["localhost"], ["127.0.0.1"])   # another CA
        self.dns_only = self.ca.issue_server_cert(["localhost"], [])                # no IP SAN

    def tls(self, **kw) -> ServerTls:
        kw.setdefault("chain", (self.ca.cert_pem,))
        kw.setdefault("client_cas", (self.ca.cert_pem,))
        return ServerTls(self.cert, self.key, **kw)


def client_pair(ca: ClusterCA, host_id: str) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host_id)]))
           .sign(key, hashes.SHA256()))
    cert = ca.sign_agent_csr(csr.public_bytes(serialization.Encoding.PEM), host_id, 3600)
    return cert, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption())


@implementer(IHandshakeListener)
class App(Protocol):
    """Records what the TLS layer hands up."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.lost = None
        self.handshakes = 0
        self.made = 0

    def connectionMade(self) -> None:
        self.made += 1

    def handshakeCompleted(self) -> None:
        self.handshakes += 1

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)

    def connectionLost(self, reason) -> None:
        self.lost = reason

    @property
    def data(self) -> bytes:
        return b"".join(self.received)


def tls_messages(events) -> list[str]:
    return [e["log_format"].format(**e) for e in events
            if "what" in e and "TLS" in str(e.get("what"))]
