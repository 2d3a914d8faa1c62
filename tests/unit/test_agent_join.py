"""Agent identity files and the pinned chain check that guards the join token."""

from __future__ import annotations

import os
import stat

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet import reactor as wall_clock

from apptunnel.agent.join import AgentIdentity, JoinError, _identity_from, join
from apptunnel.auth.pins import check_chain
from apptunnel.messages import JoinOk
from apptunnel.auth.ca import ClusterCA
from apptunnel.config import AgentConfig

NOW = 1_800_000_000.0
DAY = 86400.0


@pytest.fixture
def ca(tmp_path):
    clock = Clock()
    clock.advance(NOW)
    return ClusterCA.load_or_create(str(tmp_path / "ca"), "unit", clock=clock)


def load(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def new_key():
    return ec.generate_private_key(ec.SECP256R1())


def csr_for(key) -> bytes:
    return (x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "h")]))
            .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))


def key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def identity(ca, host_id="host-1") -> AgentIdentity:
    key = new_key()
    return AgentIdentity(host_id, key_pem(key), ca.sign_agent_csr(csr_for(key), host_id, DAY),
                         ca.cert_pem)


def config(tmp_path, token="tok", pin=None) -> AgentConfig:
    return AgentConfig(path=str(tmp_path / "agent.yaml"), data_dir=str(tmp_path / "agent"),
                       proxy_addr="127.0.0.1:1", join_token=token, ca_pin=pin, apps=())


def test_chain_with_pinned_ca_accepted(ca):
    """Leaf + pinned CA, leaf valid now and for serverAuth: accepted."""
    leaf, _ = ca.issue_server_cert(["localhost"], [], DAY)
    assert check_chain([load(leaf), load(ca.cert_pem)], ca.pin, NOW) is None


def test_chain_wrong_pin(ca):
    """No certificate with the pin: refused, naming the pin."""
    leaf, _ = ca.issue_server_cert(["localhost"], [], DAY)
    problem = check_chain([load(leaf), load(ca.cert_pem)], "sha256:" + "0" * 64, NOW)
    assert "ca_pin sha256:000" in problem


def test_chain_leaf_from_other_ca(ca, tmp_path):
    """A MITM that appends our real CA to its own leaf is refused."""
    other = ClusterCA.load_or_create(str(tmp_path / "other"), "unit", wall_clock)
    leaf, _ = other.issue_server_cert(["localhost"], [], DAY)
    problem = check_chain([load(leaf), load(ca.cert_pem)], ca.pin, NOW)
    assert problem == "the proxy's certificate is not issued by the pinned CA"


def test_chain_expired_leaf(ca):
    """An expired proxy certificate is refused even from the pinned CA."""
    leaf, _ = ca.issue_server_cert(["localhost"], [], DAY)
    problem = check_chain([load(leaf), load(ca.cert_pem)], ca.pin, NOW + 2 * DAY)
    assert "expired" in problem


def test_chain_client_cert_as_server(ca):
    """An agent's client certificate cannot pose as the proxy."""
    agent = identity(ca)
    problem = check_chain([load(agent.cert_pem), load(ca.cert_pem)], ca.pin, NOW)
    assert problem == "the proxy's certificate is not a server certificate"


def test_chain_empty(ca):
    """No certificate at all is refused."""
    assert check_chain([], ca.pin, NOW) == "the proxy presented no certificate"


def test_identity_round_trip_and_modes(ca, tmp_path):
    """save writes agent.key 0600 with its cert, CA and host id; load reads them back."""
    me = identity(ca)
    me.save(str(tmp_path / "agent"))
    assert stat.S_IMODE(os.stat(tmp_path / "agent" / "agent.key").st_mode) == 0o600
    assert AgentIdentity.load(str(tmp_path / "agent")) == me
    assert me.tunnel_tls().cert_pem == me.cert_pem and me.tunnel_tls().trusted_cas == (ca.cert_pem,)


def test_identity_missing_is_none(tmp_path):
    """Before the first join there is no identity."""
    assert AgentIdentity.load(str(tmp_path / "nothing")) is None


def test_identity_damaged_is_join_error(ca, tmp_path):
    """A key that does not match the certificate is one clear JoinError."""
    me = identity(ca)
    me.save(str(tmp_path / "agent"))
    (tmp_path / "agent" / "agent.key").write_bytes(key_pem(new_key()))
    with pytest.raises(JoinError, match="does not match"):
        AgentIdentity.load(str(tmp_path / "agent"))


@pytest_twisted.ensureDeferred
async def test_join_needs_token_and_pin(tmp_path):
    """join without a token or pin fails at once with a hint, dialing nothing."""
    with pytest.raises(JoinError, match="join.token and join.ca_pin"):
        await defer.ensureDeferred(join(None, config(tmp_path, token=None)))


def test_join_ok_with_other_ca_refused(ca, tmp_path):
    """A join_ok whose CA does not match the pin is refused."""
    key = new_key()
    answer = JoinOk(cert=ca.sign_agent_csr(csr_for(key), "h", DAY).decode(),
                    ca=ca.cert_pem.decode())
    with pytest.raises(JoinError, match="does not match ca_pin"):
        _identity_from(answer, key, "h", config(tmp_path, pin="sha256:" + "1" * 64))
    assert _identity_from(answer, key, "h", config(tmp_path, pin=ca.pin)).host_id == "h"


def test_join_ok_cert_for_other_key_refused(ca, tmp_path):
    """A join_ok certificate that is not for our key is refused."""
    answer = JoinOk(ca=ca.cert_pem.decode(),
                    cert=ca.sign_agent_csr(csr_for(new_key()), "h", DAY).decode())
    with pytest.raises(JoinError, match="bad certificate"):
        _identity_from(answer, new_key(), "h", config(tmp_path, pin=ca.pin))


def test_join_answers_are_read_as_typed_messages():
    """join_ok without a CA is a bad certificate, an unknown answer is named; both one line."""
    from twisted.internet.defer import Deferred

    from apptunnel.agent.join import _JoinHandler
    from apptunnel.messages import Join

    class Tunnel:
        closed = False

        def close(self):
            self.closed = True

    class TLS:
        verified = Deferred()
        problem = None

    for message, text in [({"type": "join_ok", "cert": "x"}, "bad certificate: join_ok.ca"),
                          ({"type": "hello_ok", "proxy_id": "p"}, "unexpected message 'hello_ok'"),
                          ({"type": "join_error", "message": "no\nway"}, "refused the join: no way")]:
        handler = _JoinHandler(TLS(), Join("t", "csr", "h"), "proxy:3024")
        tunnel = Tunnel()
        handler.control_received(tunnel, message)
        failures = []
        handler.result.addErrback(failures.append)
        assert tunnel.closed and text in str(failures[0].value)
