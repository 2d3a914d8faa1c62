"""The proxy's tunnel listener wired as ProxyService wires it, and agent configs for it.

Real SQLite backend, CA, registry and audit log on a free loopback port, for tests that
run a real agent against a real proxy side without the web edge.
"""

from __future__ import annotations

import os

import pytest
import pytest_twisted

from twisted.internet import protocol, reactor
from twisted.internet import reactor as wall_clock

from apptunnel.audit import AuditLog
from apptunnel.auth.ca import ClusterCA, load_server_tls
from apptunnel.auth.enrolment import AgentEnrolment
from apptunnel.auth.tokens import new_secret, secret_hash
from apptunnel.backend.records import JoinToken
from apptunnel.backend.sqlite import SqliteBackend
from apptunnel.config import AgentConfig
from apptunnel.proxy.registry import AgentRegistry
from apptunnel.proxy.tunnel_server import TunnelServerFactory, tunnel_tls_options
from tests.support.tunnel_pairs import Echo
from tests.support.tls_listener import tls_endpoint
from tests.support.waiting import wait


class Proxy:
    """The proxy's side of the tunnel, as ProxyService wires it, on a free loopback port."""

    def __init__(self, root):
        self.data_dir = str(root / "proxy")
        self.ca = ClusterCA.load_or_create(self.data_dir, "itest", wall_clock)
        self.cert, self.key = load_server_tls(self.data_dir, self.ca, ["localhost"], ["127.0.0.1"])
        self.backend = SqliteBackend(os.path.join(self.data_dir, "apptunnel.db"), reactor)
        self.audit = AuditLog(self.backend, reactor)
        self.registry = AgentRegistry()
        self.enrolment = AgentEnrolment(ca=self.ca, backend=self.backend, clock=reactor,
                                        proxy_id="proxy-1")
        self.factory = TunnelServerFactory(
            enrolment=self.enrolment, registry=self.registry, audit=self.audit,
            clock=reactor, proxy_id="proxy-1", public_host="apptunnel.localhost",
            public_port=3080, keepalive_interval=0.5, keepalive_timeout=2.0,
        )
        self.port = None
        self.port_number = 0

    async def listen(self):
        endpoint = tls_endpoint(tunnel_tls_options(self.ca.cert_pem, self.cert, self.key),
                                self.port_number)
        self.port = await endpoint.listen(self.factory)
        self.port_number = self.port.getHost().port

    async def token(self, ttl: float = 3600.0) -> str:
        secret = new_secret()
        now = reactor.seconds()
        await self.backend.add_token(JoinToken(secret_hash(secret), "app", now + ttl, now))
        return secret

    async def joins(self) -> list:
        await self.audit.flush()
        return await self.backend.search_audit(type="agent.join")

    @property
    def addr(self) -> str:
        return f"localhost:{self.port_number}"


def agent_config(tmp_path, proxy, *, token=None, pin=None, apps=(), name="agent"):
    return AgentConfig(
        path=str(tmp_path / f"{name}.yaml"), data_dir=str(tmp_path / name),
        proxy_addr=proxy.addr, join_token=token, ca_pin=pin, apps=tuple(apps),
        keepalive_interval=0.5, keepalive_timeout=2.0,
    )


# Fixtures for tests that run a real agent against this proxy side (import them by name).


@pytest_twisted.async_yield_fixture
async def proxy(tmp_path):
    p = Proxy(tmp_path)
    p.audit.start()
    await p.listen()
    yield p
    if p.port is not None:
        await p.port.stopListening()
    await wait(p.audit.stop())
    await wait(p.backend.close())


@pytest.fixture
def echo_port():
    port = reactor.listenTCP(0, protocol.Factory.forProtocol(Echo), interface="127.0.0.1")
    yield port.getHost().port
    port.stopListening()
