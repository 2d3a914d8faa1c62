"""Security review of the tunnel listener's hello: what an agent may claim.

An app's public host is where browsers send that app's session cookies and where the JWT
audience points; an app's definition (labels, upstream, rewrites) is what policy checks
and what requests reach. Before the fixes an agent could announce an app under another
app's host, announce an existing app name with other labels and a rewrite and take part
of its traffic (issue 8, finding 1), announce any app whatever its join token was meant
for, and put an app at ``localhost:PORT`` (finding 12). Each refusal is for that app only.
"""

from __future__ import annotations

import uuid

import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from apptunnel.auth.pins import cert_pin
from apptunnel.auth.locks import LockWatcher
from apptunnel.auth.tokens import secret_hash
from apptunnel.backend.records import Agent, JoinToken, Lock, Scope
from apptunnel.proxy.tunnel_server import public_addr_refusal
from tests.support.tunnel_server_world import (  # noqa: F401 - world is a fixture
    AgentSide,
    agent_cert,
    csr_pem,
    enrolled,
    hello,
    settle,
    world,
)

GRAFANA_HOST = "grafana.apptunnel.localhost:3080"
GRAFANA = {"name": "grafana", "uri": "http://127.0.0.1:3000", "labels": {"env": "dev"},
           "public_addr": None, "rewrite_headers": [["X-Team", "sre"]],
           "jwt_claims": ["sub", "roles"]}


def thief_hello(public_addr: str) -> dict:
    return hello(host_id="host-2", apps=[{"name": "thief", "uri": "http://127.0.0.1:9",
                                          "labels": {"env": "dev"}, "public_addr": public_addr}])


def refused(agent: AgentSide) -> dict[str, str]:
    [answer] = agent.controls
    assert answer["type"] == "hello_ok"
    return {r["app"]: r["reason"] for r in answer.get("refused", [])}


async def registered(world, message, host_id="host-1", scope=Scope()):  # noqa: F811
    agent = AgentSide(message)
    pump = world.connect(agent, await enrolled(world, host_id, scope))
    await settle(pump, lambda: agent.controls or agent.lost is not None, "an answer")
    return agent, pump


async def audited(world, type):  # noqa: F811
    await world.audit.flush()
    return await world.backend.search_audit(type=type)


@pytest_twisted.ensureDeferred
async def test_agent_cannot_claim_host_of_an_offline_app(world):  # noqa: F811
    """An app named at the public host of a known (offline) app of another name is refused."""
    owner, pump = await registered(world, hello())
    pump.client_transport.loseConnection()
    pump.flush()
    assert not world.registry.is_online("grafana")

    thief, _ = await registered(world, thief_hello("GRAFANA.apptunnel.localhost:443"), "host-2")
    assert "belongs to app grafana" in refused(thief)["thief"]
    assert world.registry.app("thief") is None
    assert world.registry.app_by_host(GRAFANA_HOST).name == "grafana"


@pytest_twisted.ensureDeferred
async def test_agent_cannot_claim_host_of_an_online_app(world):  # noqa: F811
    """An app named at the public host of another online app is refused; the owner keeps it."""
    await registered(world, hello())
    thief, _ = await registered(world, thief_hello(GRAFANA_HOST), "host-2")
    assert list(refused(thief)) == ["thief"] and world.registry.app("thief") is None


@pytest_twisted.ensureDeferred
async def test_two_apps_of_one_hello_cannot_share_a_host(world):  # noqa: F811
    """One hello cannot give two of its apps the same public host: the second is refused."""
    agent, _ = await registered(world, hello(apps=[
        {"name": "a", "uri": "http://127.0.0.1:1", "public_addr": "a.apptunnel.localhost"},
        {"name": "b", "uri": "http://127.0.0.1:2", "public_addr": "A.apptunnel.localhost:8443"},
    ]))
    assert list(refused(agent)) == ["b"]
    assert [a.name for a in world.registry.apps()] == ["a"]


@pytest_twisted.ensureDeferred
async def test_same_app_may_come_back_and_another_agent_may_serve_it(world):  # noqa: F811
    """The owner of a host can re-register it, and a second agent of the same app is fine."""
    first, pump = await registered(world, hello())
    second, _ = await registered(world, hello(host_id="host-2"), "host-2")
    assert refused(second) == {}
    pump.client_transport.loseConnection()
    pump.flush()
    again, _ = await registered(world, hello())
    assert refused(again) == {}
    assert world.registry.app_by_host(GRAFANA_HOST).name == "grafana"


@pytest_twisted.ensureDeferred
async def test_rogue_definition_of_an_online_app_is_refused_and_audited(world):  # noqa: F811
    """A second agent announcing grafana with other labels, upstream and a rewrite is refused
    for grafana (audited, agent.app.refused), its other app registers, and every pick of
    grafana goes to the first agent."""
    _, real = await registered(world, hello())
    rogue_grafana = dict(GRAFANA, uri="http://127.0.0.1:6666", labels={"env": "prod"},
                         rewrite_headers=[["X-Webauth-User", "admin"]])
    other = {"name": "other", "uri": "http://127.0.0.1:7"}
    rogue, _ = await registered(world, hello("host-2", [rogue_grafana, other]), "host-2")
    reason = refused(rogue)["grafana"]
    assert "already defined differently by agent host-1" in reason and "labels" in reason
    assert world.registry.is_online("other")
    app = world.registry.app("grafana")
    assert app.labels == {"env": "dev"} and app.uri == "http://127.0.0.1:3000"
    assert {world.registry.pick("grafana") for _ in range(4)} == {real.server}
    [event] = await audited(world, "agent.app.refused")
    assert (event.actor, event.target, event.fields["reason"]) == ("host-2", "grafana", reason)


@pytest_twisted.ensureDeferred
async def test_rogue_cannot_redefine_an_offline_app_during_the_grace_period(world):  # noqa: F811
    """While the real agent is away, another agent cannot give its app another definition;
    when the real agent is back its definition (not the rogue's) decides."""
    _, real = await registered(world, hello())
    real.client_transport.loseConnection()
    real.flush()
    rogue, _ = await registered(
        world, hello("host-2", [dict(GRAFANA, labels={"env": "prod"})]), "host-2")
    assert "grafana" in refused(rogue)
    back, _ = await registered(world, hello())
    assert refused(back) == {} and world.registry.app("grafana").labels == {"env": "dev"}


@pytest_twisted.ensureDeferred
async def test_departed_app_is_forgotten_after_the_grace_period(world):  # noqa: F811
    """Apps of a departed agent stay listed (offline) for the grace period, then go."""
    _, pump = await registered(world, hello())
    pump.client_transport.loseConnection()
    pump.flush()
    world.clock.advance(119)
    assert [a.name for a in world.registry.apps(include_offline=True)] == ["grafana"]
    world.clock.advance(2)
    assert world.registry.apps(include_offline=True) == []
    assert world.registry.app_by_host(GRAFANA_HOST) is None


@pytest_twisted.ensureDeferred
async def test_scope_limits_what_an_agent_may_announce(world):  # noqa: F811
    """A token scoped to app a (or to label team=a) lets its agent announce only that."""
    apps = [{"name": "a", "uri": "http://127.0.0.1:1", "labels": {"team": "a"}},
            {"name": "b", "uri": "http://127.0.0.1:2", "labels": {"team": "b"}}]
    by_name, _ = await registered(world, hello(apps=apps), scope=Scope(apps=("a",)))
    assert list(refused(by_name)) == ["b"]
    by_label, _ = await registered(world, hello("host-2", apps=apps), "host-2",
                                   scope=Scope(labels=(("team", "a"),)))
    assert list(refused(by_label)) == ["b"] and not world.registry.is_online("b")


@pytest_twisted.ensureDeferred
async def test_unknown_agent_is_refused_with_one_line(world):  # noqa: F811
    """A valid certificate whose agent the backend does not know cannot hello."""
    agent = AgentSide(hello())
    await settle(world.connect(agent, agent_cert(world)), lambda: agent.lost is not None, "close")
    [answer] = agent.controls
    assert answer["type"] == "hello_error" and "join again" in answer["message"]
    assert world.registry.apps() == []


@pytest_twisted.ensureDeferred
async def test_public_addr_outside_public_host_needs_the_allow_list(world):  # noqa: F811
    """localhost:PORT (in the proxy's certificate) is refused unless allowed by the operator."""
    app = {"name": "local", "uri": "http://127.0.0.1:1", "public_addr": "localhost:3080"}
    agent, _ = await registered(world, hello(apps=[app]))
    assert "allowed_public_addrs" in refused(agent)["local"]
    world.factory.allowed_public_addrs = ("localhost:3080",)
    again, _ = await registered(world, hello("host-2", apps=[app]), "host-2")
    assert refused(again) == {} and world.registry.app_by_host("localhost:3080").name == "local"


@pytest_twisted.ensureDeferred
async def test_rewrite_of_a_framing_header_is_refused(world):  # noqa: F811
    """A rewrite setting Content-Length would strip the client's and desynchronise the
    request's framing towards the app. The agent's own config refuses it, so a hello that
    carries one is malformed: refused whole, with the reason."""
    app = {"name": "smuggle", "uri": "http://127.0.0.1:1",
           "rewrite_headers": [["X-Team", "a"], ["Content-Length", "0"]]}
    agent, _ = await registered(world, hello(apps=[app, GRAFANA]))
    [answer] = agent.controls
    assert answer["type"] == "hello_error" and "Content-Length" in answer["message"]
    assert world.registry.app("smuggle") is None and world.registry.app("grafana") is None


def test_public_addr_rule():
    """One label under the public host is fine; deeper names, other domains, need a list."""
    rule = public_addr_refusal
    assert rule("grafana.apptunnel.localhost:3080", "apptunnel.localhost", ()) is None
    for addr in ("localhost:3080", "a.b.apptunnel.localhost", "evil.com", "xapptunnel.localhost"):
        assert rule(addr, "apptunnel.localhost", ()) is not None
    assert rule("x.corp.example", "apptunnel.localhost", ("*.corp.example",)) is None
    assert rule("corp.example", "apptunnel.localhost", ("*.corp.example",)) is not None
    assert rule("localhost:1", "apptunnel.localhost", ("localhost:2",)) is not None
    assert rule("localhost:1", "apptunnel.localhost", ("localhost",)) is None


@pytest_twisted.ensureDeferred
async def test_locked_agent_is_cut_refused_and_cannot_renew(world):  # noqa: F811
    """A lock on an agent cuts its tunnel, refuses its next hello, and is audited."""
    locks = LockWatcher(world.backend, world.clock)
    locks.add_listener(world.factory.lock_added)
    world.enrolment.locks = locks
    agent, pump = await registered(world, hello())
    await world.backend.put_lock(Lock(id=str(uuid.uuid4()), user=None, app=None, message="",
                                      created=world.clock.seconds(), expires=None,
                                      created_by="test", agent="host-1"))
    await locks.refresh()
    await settle(pump, lambda: agent.lost is not None, "the cut")
    assert world.registry.apps() == []
    again = AgentSide(hello())
    await settle(world.connect(again, await enrolled(world)), lambda: again.lost is not None,
                 "close")
    assert again.controls == [{"type": "hello_error", "message": "this agent is locked"}]
    [event] = await audited(world, "lock.enforced")
    assert event.actor == "host-1"


@pytest_twisted.ensureDeferred
async def test_renewal_keeps_the_key_and_moves_the_expiry(world):  # noqa: F811
    """renew answers a new certificate for the same key; the tunnel outlives the old one;
    a CSR for another key is refused."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = x509.load_pem_x509_certificate(
        world.ca.sign_agent_csr(csr_pem(key)[1], "host-1", 600))
    await world.backend.put_agent(Agent("host-1", Scope(), world.clock.seconds(),
                                        cert.not_valid_after_utc.timestamp(), cert_pin(cert)))
    agent = AgentSide(hello())
    pump = world.connect(agent, cert.public_bytes(serialization.Encoding.PEM))
    await settle(pump, lambda: agent.controls, "hello_ok")
    pump.client.send_control({"type": "renew", "csr": csr_pem()[1]})   # another key
    await settle(pump, lambda: len(agent.controls) == 2, "renew_error")
    assert agent.controls[1]["type"] == "renew_error"
    world.enrolment.agent_cert_ttl = 1200.0
    world.clock.advance(10)
    pump.client.send_control({"type": "renew", "csr": csr_pem(key)[1]})
    await settle(pump, lambda: len(agent.controls) == 3, "renew_ok")
    renewed = x509.load_pem_x509_certificate(agent.controls[2]["cert"].encode())
    assert cert_pin(renewed) == cert_pin(cert)
    assert renewed.not_valid_after_utc > cert.not_valid_after_utc
    def run_for(seconds):   # in keepalive-sized steps, so pings are answered
        for _ in range(int(seconds / 2)):
            world.clock.advance(2)
            pump.flush()

    run_for(600)                   # past the first certificate's end: still up
    assert agent.lost is None and world.registry.is_online("grafana")
    run_for(600)                   # past the renewed one's: cut
    assert agent.lost is not None and not world.registry.is_online("grafana")


@pytest_twisted.ensureDeferred
async def test_renew_garbage_and_floods_are_answered_not_obeyed(world):  # noqa: F811
    """A renew with no CSR, a garbage CSR, or too soon after the last is answered with
    renew_error; nothing is signed, and the tunnel stays up."""
    agent, pump = await registered(world, hello())
    for message in ({"type": "renew"}, {"type": "renew", "csr": ["x"]},
                    {"type": "renew", "csr": "-----BEGIN CERTIFICATE REQUEST-----\nAAAA"}):
        world.clock.advance(6)
        count = len(agent.controls)
        pump.client.send_control(message)
        await settle(pump, lambda: len(agent.controls) > count, "an answer")
        assert agent.controls[-1]["type"] == "renew_error"
    count = len(agent.controls)
    pump.client.send_control({"type": "renew", "csr": csr_pem()[1]})
    pump.client.send_control({"type": "renew", "csr": csr_pem()[1]})
    await settle(pump, lambda: len(agent.controls) >= count + 2, "two answers")
    assert {"type": "renew_error", "message": "renewal too soon"} in agent.controls[count:]
    assert not [m for m in agent.controls if m["type"] == "renew_ok"]
    assert agent.lost is None and world.registry.is_online("grafana")


@pytest_twisted.ensureDeferred
async def test_renew_as_first_message_closes(world):  # noqa: F811
    """renew before a hello is an unexpected first message: closed, nothing signed."""
    agent = AgentSide({"type": "renew", "csr": csr_pem()[1]})
    await settle(world.connect(agent, await enrolled(world)), lambda: agent.lost is not None,
                 "close")
    assert agent.controls == []


@pytest_twisted.ensureDeferred
async def test_a_token_holder_cannot_take_over_another_agents_host_id(world):  # noqa: F811
    """A join naming an existing agent's host id with another key is refused and the
    token keeps its use; the real agent (same key) may join again under it."""
    await enrolled(world, "host-1")
    now = world.clock.seconds()
    await world.backend.add_token(JoinToken(secret_hash("one"), "app", now + 60, now, 1))
    thief = AgentSide({"type": "join", "token": "one", "csr": csr_pem()[1], "host_id": "host-1"})
    await settle(world.connect(thief), lambda: thief.lost is not None, "close")
    assert thief.controls[0]["type"] == "join_error"
    assert "belongs to another agent" in thief.controls[0]["message"]
    assert (await world.backend.get_token(secret_hash("one"))).uses_left == 1
