"""An agent service without sockets, for unit tests: a saved identity from a throwaway CA,
a config, and a tunnel handler connected to a fake tunnel that records what it is sent."""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import reactor as wall_clock

from apptunnel.agent.join import AgentIdentity
from apptunnel.auth.ca import ClusterCA
from apptunnel.config import AgentConfig, AppConfig

APPS = (
    AppConfig("grafana", "http://127.0.0.1:3000", {"env": "dev"}, None,
              rewrite_headers=(("X-A", "b"),), jwt_claims=("sub",)),
    AppConfig("wiki", "https://wiki.internal", {}, "docs.example.com"),
)


def saved_identity(tmp_path, ca) -> AgentIdentity:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "h")]))
           .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    me = AgentIdentity("host-1", key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()), ca.sign_agent_csr(csr, "host-1", 86400), ca.cert_pem)
    me.save(str(tmp_path / "agent"))
    return me


def config(tmp_path, token=None, pin=None, addr="localhost:3024") -> AgentConfig:
    return AgentConfig(path=str(tmp_path / "agent.yaml"), data_dir=str(tmp_path / "agent"),
                       proxy_addr=addr, join_token=token, ca_pin=pin, apps=APPS)


@pytest.fixture
def ca(tmp_path):
    return ClusterCA.load_or_create(str(tmp_path / "proxy"), "unit", wall_clock)


class FakeTunnel:
    peer = "127.0.0.1:3024"

    def __init__(self):
        self.sent, self.closed = [], False

    def send_control(self, message):
        self.sent.append(message)

    def close(self):
        self.closed = True

    def go_away(self, reason):
        from twisted.internet import defer

        self.closed = True
        return defer.succeed(None)


def seed_link(service):
    from apptunnel.agent.service import _ProxyLink

    return service.links.setdefault(service.config.proxy_addr,
                                    _ProxyLink(service, service.config.proxy_addr, seed=True))


def connected(service, link=None):
    from apptunnel.agent.service import _AgentTunnel

    handler = _AgentTunnel(service, link or seed_link(service))
    tunnel = FakeTunnel()
    handler.tunnel_ready(tunnel)
    return handler, tunnel
