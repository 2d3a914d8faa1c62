"""The tunnel server tells each registered agent the host CAs (the ``trust`` message):
after hello_ok, after renew_ok and to every agent when they change; never before
hello_ok (a stranger learns nothing)."""

from __future__ import annotations

import pytest_twisted
from cryptography import x509

from apptunnel.auth.pins import cert_pin
from apptunnel.backend.records import Agent, Scope
from tests.support.tunnel_server_world import (  # noqa: F401 - world is a fixture
    AgentSide,
    agent_cert,
    csr_pem,
    hello,
    settle,
    world,
)


@pytest_twisted.ensureDeferred
async def test_agents_hear_the_host_cas_after_hello_ok_renew_ok_and_on_change(world):
    host_cas = [("OLD",)]
    world.factory.trusted_cas = lambda: host_cas[0]
    agent = AgentSide(hello())
    key, csr = csr_pem()
    cert = world.ca.sign_agent_csr(csr, "host-1", 86400)
    parsed = x509.load_pem_x509_certificate(cert)
    await world.backend.put_agent(Agent(
        host_id="host-1", scope=Scope(), joined=world.clock.seconds(),
        cert_expires=parsed.not_valid_after_utc.timestamp(), key_pin=cert_pin(parsed)))
    pump = world.connect(agent, cert)
    await settle(pump, lambda: len(agent.controls) >= 2, "hello_ok and trust")
    assert [m["type"] for m in agent.controls] == ["hello_ok", "trust"]
    assert agent.controls[1] == {"type": "trust", "trusted_cas": ["OLD"]}

    host_cas[0] = ("NEW", "OLD")
    world.factory.trust_changed()
    await settle(pump, lambda: len(agent.controls) >= 3, "the changed set")
    assert agent.controls[2] == {"type": "trust", "trusted_cas": ["NEW", "OLD"]}

    pump.client.send_control({"type": "renew", "csr": csr_pem(key)[1]})
    await settle(pump, lambda: len(agent.controls) >= 5, "renew_ok and trust")
    assert [m["type"] for m in agent.controls[3:]] == ["renew_ok", "trust"]

    pump.client_transport.loseConnection()
    pump.flush()
    world.factory.trust_changed()   # the lost tunnel's session is not told
    pump.flush()
    assert len(agent.controls) == 5


@pytest_twisted.ensureDeferred
async def test_an_agent_that_is_not_registered_hears_no_trust(world):
    """A hello from an unknown agent is refused without a trust message."""
    world.factory.trusted_cas = lambda: ("OLD",)
    agent = AgentSide(hello())
    pump = world.connect(agent, agent_cert(world))
    await settle(pump, lambda: agent.controls, "the refusal")
    world.factory.trust_changed()
    pump.flush()
    assert [m["type"] for m in agent.controls] == ["hello_error"]
