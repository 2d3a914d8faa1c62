"""AgentService wiring on a MemoryReactorClock, and the agent's twistd options."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography import x509
from cryptography.x509.oid import NameOID
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage

from apptunnel.agent import tap
from apptunnel.agent.join import AgentIdentity
from apptunnel.agent.service import AgentService
from apptunnel.auth.ca import ClusterCA
from apptunnel.config import AgentConfig, AppConfig, ConfigError

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
    return ClusterCA.load_or_create(str(tmp_path / "proxy"), "unit")


def test_no_identity_no_token_is_config_error(tmp_path):
    """Without a saved identity or a token the agent refuses to start, saying why."""
    with pytest.raises(ConfigError, match="join.token"):
        AgentService(config(tmp_path), MemoryReactorClock())


def test_saved_identity_dials_proxy_on_loopback(tmp_path, ca):
    """With a saved identity the agent dials proxy_addr (localhost mapped to 127.0.0.1)."""
    saved_identity(tmp_path, ca)
    reactor = MemoryReactorClock()
    service = AgentService(config(tmp_path), reactor)
    service.startService()
    host, port = reactor.tcpClients[0][:2]
    assert (host, port) == ("127.0.0.1", 3024)
    assert service.client is not None


def test_stale_identity_rejoins_with_token(tmp_path, ca):
    """A saved identity from another CA than join.ca_pin is replaced by a new join."""
    saved_identity(tmp_path, ca)
    reactor = MemoryReactorClock()
    service = AgentService(config(tmp_path, token="t", pin="sha256:" + "2" * 64), reactor)
    service.startService()
    assert service.client is None  # joining first, tunnel afterwards
    assert service._joining is not None and not service._joining.called


def test_hello_lists_configured_apps(tmp_path, ca):
    """hello names the host and every configured app with its announced fields."""
    saved_identity(tmp_path, ca)
    hello = AgentService(config(tmp_path), MemoryReactorClock()).hello_message()
    assert hello["type"] == "hello" and hello["host_id"] == "host-1"
    assert hello["apps"] == [
        {"name": "grafana", "uri": "http://127.0.0.1:3000", "labels": {"env": "dev"},
         "public_addr": None, "rewrite_headers": [["X-A", "b"]], "jwt_claims": ["sub"]},
        {"name": "wiki", "uri": "https://wiki.internal", "labels": {}, "public_addr":
         "docs.example.com", "rewrite_headers": [], "jwt_claims": None},
    ]


def test_tap_requires_config():
    """`twistd apptunnel-agent` without --config is a usage error."""
    with pytest.raises(usage.UsageError, match="--config is required"):
        tap.Options().parseOptions([])


def test_tap_bad_config_is_one_line(tmp_path):
    """A bad config file becomes a one-line UsageError while twistd parses options."""
    path = tmp_path / "agent.yaml"
    path.write_text("data_dir: x\nproxy_addr: nonsense\n")
    options = tap.Options()
    with pytest.raises(usage.UsageError) as info:
        options.parseOptions(["--config", str(path)])
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_tap_builds_agent_service(tmp_path, ca):
    """A valid config with a saved identity builds an AgentService."""
    saved_identity(tmp_path, ca)
    path = tmp_path / "agent.yaml"
    path.write_text(f"data_dir: {tmp_path / 'agent'}\nproxy_addr: 127.0.0.1:3024\napps: []\n")
    options = tap.Options()
    options.parseOptions(["--config", str(path)])
    assert isinstance(tap.makeService(options), AgentService)
