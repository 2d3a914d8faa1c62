"""The tunnel session's part in app resources: pushes to agents whose selectors match,
and announcements checked like a hello (scope, resource definition), over memory pumps."""

from __future__ import annotations

import pytest_twisted

from apptunnel.backend.records import Resource, Scope
from apptunnel.proxy.app_resources import AppResources
from apptunnel.proxy.tunnel_server import ANNOUNCE_MIN_INTERVAL
from tests.support.tunnel_server_world import AgentSide, World, enrolled, hello, settle

WIKI = {"kind": "app", "metadata": {"name": "wiki", "labels": {"env": "dev"}},
        "spec": {"uri": "http://127.0.0.1:8080"}}


def app(name="wiki", uri="http://127.0.0.1:8080", labels=None):
    return {"name": name, "uri": uri, "labels": labels or {"env": "dev"}}


@pytest_twisted.async_yield_fixture
async def world(tmp_path):
    w = World(tmp_path)
    w.resources = AppResources(w.backend, w.clock)
    w.factory.resources = w.resources
    yield w
    await w.backend.close()


async def put(world, doc):
    await world.backend.put_resource(Resource("app", doc["metadata"]["name"], doc))
    await world.resources.refresh()


def of_type(agent, kind):
    return [m for m in agent.controls if m.get("type") == kind]


async def registered(world, scope=Scope(), resources=({"env": ["dev"]},)):
    message = hello(apps=[])
    if resources:
        message["resources"] = list(resources)
    agent = AgentSide(message)
    pump = world.connect(agent, await enrolled(world, scope=scope))
    await settle(pump, lambda: of_type(agent, "hello_ok"), "hello_ok")
    return agent, pump


async def announce(world, agent, pump, apps, count=1):
    pump.client.send_control({"type": "announce", "apps": apps})
    world.clock.advance(ANNOUNCE_MIN_INTERVAL)
    await settle(pump, lambda: len(of_type(agent, "announce_ok")) >= count, "announce_ok")
    return of_type(agent, "announce_ok")[-1]


@pytest_twisted.ensureDeferred
async def test_matching_resources_are_pushed_at_hello_and_on_change(world):
    """After hello_ok the agent gets the resources its selectors match (and only those);
    a change is pushed, a poll that changes nothing is not."""
    prod = {**WIKI, "metadata": {"name": "prod", "labels": {"env": "prod"}}}
    await put(world, WIKI)
    await put(world, prod)
    agent, pump = await registered(world)
    await settle(pump, lambda: of_type(agent, "app_resources"), "app_resources")
    assert of_type(agent, "app_resources") == [{"type": "app_resources", "resources": [WIKI]}]
    await world.resources.refresh()
    pump.flush()
    assert len(of_type(agent, "app_resources")) == 1
    await world.backend.delete_resource("app", "wiki")
    await world.resources.refresh()
    await settle(pump, lambda: len(of_type(agent, "app_resources")) == 2, "the second push")
    assert of_type(agent, "app_resources")[-1]["resources"] == []


@pytest_twisted.ensureDeferred
async def test_an_agent_without_selectors_is_sent_nothing(world):
    await put(world, WIKI)
    agent, pump = await registered(world, resources=())
    pump.flush()
    assert of_type(agent, "app_resources") == []


@pytest_twisted.ensureDeferred
async def test_an_announcement_replaces_what_the_tunnel_serves(world):
    """announce registers the new set: an app added is online, one left out is gone."""
    agent, pump = await registered(world, resources=())
    ok = await announce(world, agent, pump, [app(), app("other")])
    assert ok == {"type": "announce_ok", "refused": []}
    assert {a.name for a in world.registry.apps()} == {"wiki", "other"}
    await announce(world, agent, pump, [app("other")], count=2)
    assert world.registry.is_online("other") and not world.registry.is_online("wiki")


@pytest_twisted.ensureDeferred
async def test_the_token_scope_is_checked_on_every_announcement(world):
    """An agent allowed only `other` announcing `wiki` later is refused for it (audited)."""
    agent, pump = await registered(world, scope=Scope(apps=("other",)), resources=())
    ok = await announce(world, agent, pump, [app(), app("other")])
    assert [r["app"] for r in ok["refused"]] == ["wiki"]
    assert "join token allows only apps other" in ok["refused"][0]["reason"]
    assert not world.registry.is_online("wiki") and world.registry.is_online("other")
    await world.audit.flush()
    assert [e.target for e in await world.backend.search_audit(type="agent.app.refused")] == ["wiki"]


@pytest_twisted.ensureDeferred
async def test_an_app_resources_name_is_that_resource(world):
    """Any agent announcing a resource's name with another uri or extra labels is refused."""
    await put(world, WIKI)
    agent, pump = await registered(world, resources=())
    ok = await announce(world, agent, pump, [app(uri="http://10.0.0.1:22")])
    assert "defined by an app resource" in ok["refused"][0]["reason"]
    ok = await announce(world, agent, pump, [app(labels={"env": "dev", "team": "x"})], count=2)
    assert "without label team" in ok["refused"][0]["reason"]
    assert not world.registry.is_online("wiki")
    assert (await announce(world, agent, pump, [app()], count=3))["refused"] == []
    assert world.registry.is_online("wiki")


@pytest_twisted.ensureDeferred
async def test_a_burst_of_announcements_is_coalesced(world):
    """Closer than ANNOUNCE_MIN_INTERVAL, announcements wait and only the latest counts."""
    agent, pump = await registered(world, resources=())
    await announce(world, agent, pump, [app("a")])
    for name in ("b", "c", "d"):
        pump.client.send_control({"type": "announce", "apps": [app(name)]})
    pump.flush()
    assert len(of_type(agent, "announce_ok")) == 1          # waiting for the interval
    world.clock.advance(ANNOUNCE_MIN_INTERVAL)
    await settle(pump, lambda: len(of_type(agent, "announce_ok")) == 2, "one more announce_ok")
    assert [a.name for a in world.registry.apps()] == ["d"]


@pytest_twisted.ensureDeferred
async def test_a_bad_selector_in_a_hello_is_refused(world):
    message = hello(apps=[])
    message["resources"] = [{"env": ["^(unclosed$"]}]
    agent = AgentSide(message)
    pump = world.connect(agent, await enrolled(world))
    await settle(pump, lambda: agent.lost is not None, "close")
    [refused] = of_type(agent, "hello_error")
    assert "resources[0].labels.env" in refused["message"]


@pytest_twisted.ensureDeferred
async def test_a_draining_agent_is_recorded_as_such(world):
    """The agent's GOAWAY marks it draining in the backend (apps ls --admin)."""
    agent, pump = await registered(world, resources=())
    await announce(world, agent, pump, [app()])
    states, update = [], world.backend.update_agent

    async def recorded(host_id, **state):
        states.append(state.get("draining"))
        return await update(host_id, **state)

    world.backend.update_agent = recorded
    pump.client.go_away("shutting down").addErrback(lambda _: None)
    await settle(pump, lambda: agent.lost is not None, "the tunnel closed")
    # draining while its streams finish (none here), then gone: not draining any more
    assert states == [True, False]
    assert not world.registry.is_online("wiki")


@pytest_twisted.ensureDeferred
async def test_a_resource_with_its_own_public_address_is_accepted_at_it(world):
    """The agent announces the resource's public_addr as written: that is the resource."""
    world.factory.allowed_public_addrs = ("wiki.example.com",)
    await put(world, {**WIKI, "spec": {**WIKI["spec"], "public_addr": "wiki.example.com"}})
    agent, pump = await registered(world, resources=())
    ok = await announce(world, agent, pump, [{**app(), "public_addr": "wiki.example.com"}])
    assert ok["refused"] == [] and world.registry.app("wiki").public_addr == "wiki.example.com"
    ok = await announce(world, agent, pump, [app()], count=2)      # the default address
    assert "defined by an app resource" in ok["refused"][0]["reason"]


@pytest_twisted.ensureDeferred
async def test_a_resource_created_later_takes_its_name_from_a_static_app(world):
    """An agent already serving `wiki` from its own config loses it when a resource named
    wiki is created with another definition; its other apps stay."""
    agent, pump = await registered(world, resources=())
    await announce(world, agent, pump, [app(uri="http://10.0.0.9:80"), app("other")])
    assert world.registry.is_online("wiki")
    await put(world, WIKI)
    pump.flush()
    assert not world.registry.is_online("wiki") and world.registry.is_online("other")
    assert (await world.backend.get_agent("host-1")).apps == ("other",)
