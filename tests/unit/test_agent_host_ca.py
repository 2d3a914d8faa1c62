"""The agent through a host-CA rotation (agent/service.py trust_received, agent/join.py,
agent/trust.py) on a MemoryReactorClock: it keeps the set a proxy sends, renews onto the
issuing CA, survives a restart with it, and refuses hostile sets without changing a thing."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher

from apptunnel import messages
from apptunnel.agent.join import AgentIdentity
from apptunnel.agent.service import AgentService
from apptunnel.agent.trust import TRUST_FILE
from apptunnel.auth.ca import ClusterCA
from tests.support.agent_world import (  # noqa: F401 - ca is a fixture
    ca, config, connected, saved_identity)


def trust(*cas: ClusterCA) -> dict:
    return {"type": "trust", "trusted_cas": [c.cert_pem.decode() for c in cas]}


def started(tmp_path, ca):
    identity = saved_identity(tmp_path, ca)
    reactor = MemoryReactorClock()
    reactor.advance(ca.clock.seconds())
    service = AgentService(config(tmp_path), reactor)
    handler, tunnel = connected(service)
    handler.control_received(tunnel, {"type": "hello_ok", "proxy_id": "p"})
    return identity, reactor, service, handler, tunnel


def test_a_new_host_ca_is_kept_then_renewed_onto_and_survives_a_restart(tmp_path, ca):
    """[old, new] is stored and trusted, no renewal yet; [new, old] (new issues) asks
    for a renewal within seconds; the renewed certificate from the new CA is taken; a
    restart loads both; after the grace [new] alone is kept."""
    new = ClusterCA.load_or_create(str(tmp_path / "new"), "unit", ca.clock)
    _, reactor, service, handler, tunnel = started(tmp_path, ca)
    handler.control_received(tunnel, trust(ca, new))
    assert len(service.identity.trusted_pems) == 2
    assert (tmp_path / "agent" / TRUST_FILE).exists()
    sent = len(tunnel.sent)
    reactor.advance(6)
    assert len(tunnel.sent) == sent                      # old CA still issues: no renewal

    handler.control_received(tunnel, trust(new, ca))
    reactor.advance(6)
    renew = tunnel.sent[-1]
    assert renew["type"] == "renew"
    renewed = new.sign_agent_csr(renew["csr"], "host-1", 86400)
    handler.control_received(tunnel, {"type": "renew_ok", "cert": renewed.decode()})
    assert service.identity.cert_pem == renewed

    again = AgentIdentity.load(str(tmp_path / "agent"))
    assert again.cert_pem == renewed and len(again.trusted_pems) == 2
    assert again.ca_pem == ca.cert_pem                  # join CA kept: join.ca_pin matches

    handler.control_received(tunnel, trust(new))        # grace over: the old CA goes
    assert service.identity.trusted_pems == (new.cert.public_bytes(Encoding.PEM),)
    assert AgentIdentity.load(str(tmp_path / "agent")).trusted_pems == \
        service.identity.trusted_pems


def test_hostile_trust_sets_are_one_warning_and_change_nothing(tmp_path, ca):
    """A set without the CA of our own certificate (a swapped root), garbage PEM, a leaf
    certificate, and too many entries: refused, nothing stored, no renewal."""
    stranger = ClusterCA.load_or_create(str(tmp_path / "stranger"), "unit", ca.clock)
    identity, reactor, service, handler, tunnel = started(tmp_path, ca)
    bad = [
        trust(stranger),
        {"type": "trust", "trusted_cas": [ca.cert_pem.decode(), "-----BEGIN CERTIFICATE-----"
                                          "\ngarbage\n-----END CERTIFICATE-----\n"]},
        {"type": "trust", "trusted_cas": [identity.cert_pem.decode()]},
        {"type": "trust", "trusted_cas": [ca.cert_pem.decode()] * 9},
        {"type": "trust", "trusted_cas": "not a list"},
    ]
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        for message in bad:
            handler.control_received(tunnel, message)
    finally:
        globalLogPublisher.removeObserver(events.append)
    warnings = [e for e in events if e.get("log_level") is not None
                and e["log_level"].name == "warn"]
    assert len(warnings) == len(bad)
    assert service.identity.trusted_pems == (ca.cert_pem,)
    assert not (tmp_path / "agent" / TRUST_FILE).exists()
    sent = len(tunnel.sent)
    reactor.advance(6)
    assert len(tunnel.sent) == sent


def test_the_trust_message_is_bounded_before_it_is_judged():
    """messages.Trust: a list of 1..8 PEM strings of bounded size, nothing else."""
    for raw in ([], ["x"] * 9, [1], ["x" * (messages.MAX_PEM + 1)], None):
        with pytest.raises(messages.MessageError):
            messages.parse({"type": "trust", "trusted_cas": raw})
    assert messages.parse({"type": "trust", "trusted_cas": ["a"]}).trusted_cas == ("a",)


def test_a_rejoin_forgets_the_set_of_the_earlier_identity(tmp_path, ca):
    """A new join's identity starts from its own CA, not a set kept from before."""
    new = ClusterCA.load_or_create(str(tmp_path / "new"), "unit", ca.clock)
    _, _, service, handler, tunnel = started(tmp_path, ca)
    handler.control_received(tunnel, trust(ca, new))
    assert (tmp_path / "agent" / TRUST_FILE).exists()
    saved_identity(tmp_path, ca)                          # what a join saves
    assert not (tmp_path / "agent" / TRUST_FILE).exists()
    assert AgentIdentity.load(str(tmp_path / "agent")).trusted_pems == (ca.cert_pem,)
