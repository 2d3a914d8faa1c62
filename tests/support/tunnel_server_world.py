"""The proxy's tunnel listener (TunnelServerFactory) on memory pumps and a Clock, for the unit
tests of join and hello and their security review.

`world` (a fixture; import it by name) is a `World`: CA, in-memory backend, audit, registry
and enrolment at `NOW`, whose `connect` joins an `AgentSide` (optionally presenting an agent
certificate through `CertTransport`). `settle` pumps until a condition holds; `csr_pem`,
`agent_cert`, `enrolled` and `hello` make what an agent sends. No sockets."""

from __future__ import annotations

import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import crypto
from twisted.internet import defer, task
from twisted.internet.interfaces import ISSLTransport
from zope.interface import implementer

from apptunnel.audit import AuditLog
from apptunnel.auth.ca import ClusterCA
from apptunnel.auth.enrolment import AgentEnrolment
from apptunnel.auth.pins import cert_pin
from apptunnel.auth.tokens import secret_hash
from apptunnel.backend.records import Agent, JoinToken, Scope
from apptunnel.proxy.registry import AgentRegistry
from apptunnel.proxy.tunnel_server import TunnelServerFactory
from apptunnel.tunnel.errors import StreamRefused
from apptunnel.tunnel.frames import ErrorCode
from apptunnel.tunnel.protocol import TunnelProtocol
from tests.support.memory import MemoryBackend
from tests.support.pump import MemoryTransport, Pump

NOW = 1_800_000_000.0


class AgentSide:
    """A minimal agent-side TunnelHandler that records what the proxy says."""

    def __init__(self, first_message=None):
        self.first_message = first_message
        self.controls = []
        self.lost = None

    def tunnel_ready(self, tunnel):
        if self.first_message is not None:
            tunnel.send_control(self.first_message)

    def control_received(self, tunnel, message):
        self.controls.append(message)

    def stream_requested(self, tunnel, target):
        return defer.fail(StreamRefused(ErrorCode.REFUSED, "test"))

    def tunnel_lost(self, tunnel, reason):
        self.lost = reason


@implementer(ISSLTransport)
class CertTransport(MemoryTransport):
    """A memory transport that reports a verified TLS client certificate."""

    peer_cert = None

    def getPeerCertificate(self):
        return self.peer_cert


class World:
    def __init__(self, tmp_path):
        self.clock = task.Clock()
        self.clock.advance(NOW)
        self.ca = ClusterCA.load_or_create(str(tmp_path / "ca"), "unit", clock=self.clock)
        self.backend = MemoryBackend()
        self.audit = AuditLog(self.backend, self.clock)
        self.registry = AgentRegistry(self.clock)
        self.enrolment = AgentEnrolment(ca=self.ca, backend=self.backend, clock=self.clock,
                                        proxy_id="p-1")
        self.factory = TunnelServerFactory(
            enrolment=self.enrolment, registry=self.registry, audit=self.audit,
            clock=self.clock, proxy_id="p-1", public_host="apptunnel.localhost",
            public_port=3080,
        )

    def connect(self, agent: AgentSide, cert_pem: bytes | None = None) -> Pump:
        server = self.factory.buildProtocol(None)
        client = TunnelProtocol(agent, self.clock, initiator=True)
        if cert_pem is None:
            return Pump(client, server)
        pump = Pump.__new__(Pump)
        # Same wiring as Pump, but the proxy's transport reports the agent's certificate.
        from twisted.internet.address import IPv4Address
        a = IPv4Address("TCP", "127.0.0.1", 40001)
        b = IPv4Address("TCP", "127.0.0.1", 3024)
        pump.client, pump.server = client, server
        pump.client_transport = MemoryTransport(a, b, 256 * 1024)
        pump.server_transport = CertTransport(b, a, 256 * 1024)
        pump.server_transport.peer_cert = crypto.load_certificate(crypto.FILETYPE_PEM, cert_pem)
        pump.chunk, pump.closed = 64 * 1024, False
        client.makeConnection(pump.client_transport)
        server.makeConnection(pump.server_transport)
        return pump

    async def add_token(self, secret: str, ttl: float = 3600.0, kind: str = "app"):
        now = self.clock.seconds()
        await self.backend.add_token(JoinToken(secret_hash(secret), kind, now + ttl, now))

    async def events(self):
        await self.audit.flush()
        return await self.backend.search_audit(type="agent.join")


@pytest_twisted.async_yield_fixture
async def world(tmp_path):
    w = World(tmp_path)
    yield w
    await w.backend.close()


async def settle(pump: Pump, predicate, what: str, rounds: int = 100):
    """Pump bytes and run what is due on the clock until `predicate()` holds; storage
    answers at once, so a predicate still false after `rounds` rounds never will be."""
    for _ in range(rounds):
        pump.flush()
        pump.server._clock.advance(0)
        pump.flush()
        if predicate():
            return
    raise AssertionError(f"{what} did not happen")


def csr_pem(key=None) -> tuple[ec.EllipticCurvePrivateKey, str]:
    key = key or ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
           .sign(key, hashes.SHA256()))
    return key, csr.public_bytes(serialization.Encoding.PEM).decode()


def agent_cert(world, host_id="host-1") -> bytes:
    """A certificate of the cluster CA that the backend knows nothing about."""
    return world.ca.sign_agent_csr(csr_pem()[1], host_id, 86400)


async def enrolled(world, host_id="host-1", scope=Scope(), ttl=86400.0) -> bytes:
    """An agent certificate with the backend's agent record, as a join leaves them."""
    cert = world.ca.sign_agent_csr(csr_pem()[1], host_id, ttl)
    parsed = x509.load_pem_x509_certificate(cert)
    await world.backend.put_agent(Agent(
        host_id=host_id, scope=scope, joined=world.clock.seconds(),
        cert_expires=parsed.not_valid_after_utc.timestamp(), key_pin=cert_pin(parsed)))
    return cert


def hello(host_id="host-1", apps=None) -> dict:
    if apps is None:
        apps = [{"name": "grafana", "uri": "http://127.0.0.1:3000", "labels": {"env": "dev"},
                 "public_addr": None, "rewrite_headers": [["X-Team", "sre"]],
                 "jwt_claims": ["sub", "roles"]}]
    return {"type": "hello", "host_id": host_id, "version": "test", "apps": apps}
