"""The registry of online apps and the tunnels that serve them."""

from apptunnel.catalog import AppInfo
from apptunnel.proxy.registry import AgentRegistry


def app(name, addr=None, agent="a1"):
    return AppInfo(
        name=name, uri=f"http://127.0.0.1:80{len(name)}", labels={"env": "dev"},
        public_addr=addr or f"{name}.apptunnel.localhost:3080", agent_id=agent,
    )


def test_apps_are_online_while_a_tunnel_serves_them():
    """Apps are online with their tunnel and go offline (not forgotten) when it is removed."""
    reg = AgentRegistry()
    t1 = object()
    reg.add(t1, "a1", [app("grafana"), app("wiki")])
    assert [a.name for a in reg.apps()] == ["grafana", "wiki"]
    assert reg.app("wiki").name == "wiki" and reg.app("nope") is None
    reg.remove(t1)
    assert reg.apps() == [] and reg.pick("wiki") is None and not reg.is_online("wiki")
    reg.remove(t1)  # removing twice is harmless


def test_app_by_host_ignores_case_port_and_trailing_dot():
    """Host lookups match the public address case-insensitively, with or without port."""
    reg = AgentRegistry()
    reg.add(object(), "a1", [app("grafana")])
    for host in ("grafana.apptunnel.localhost:3080", "GRAFANA.Apptunnel.localhost",
                 "grafana.apptunnel.localhost.:443"):
        assert reg.app_by_host(host).name == "grafana"
    assert reg.app_by_host("apptunnel.localhost:3080") is None
    assert reg.app_by_host("evil-grafana.apptunnel.localhost") is None


def test_pick_takes_turns_over_tunnels_and_follows_removal():
    """pick() round-robins over every tunnel serving the app and skips removed ones."""
    reg = AgentRegistry()
    t1, t2 = object(), object()
    reg.add(t1, "a1", [app("grafana")])
    reg.add(t2, "a2", [app("grafana", agent="a2")])
    assert {reg.pick("grafana") for _ in range(4)} == {t1, t2}
    assert len(reg.apps()) == 1
    reg.remove(t1)
    assert [reg.pick("grafana") for _ in range(3)] == [t2, t2, t2]


def test_re_adding_a_tunnel_replaces_its_apps():
    """A second add() for the same tunnel replaces what it announced before."""
    reg = AgentRegistry()
    t1 = object()
    reg.add(t1, "a1", [app("grafana")])
    reg.add(t1, "a1", [app("wiki")])
    assert [a.name for a in reg.apps()] == ["wiki"]
    assert not reg.is_online("grafana") and reg.pick("grafana") is None



def test_app_stays_known_offline_after_its_tunnel_leaves():
    """A departed app is still found by host (so the edge can answer 503) but not picked."""
    registry = AgentRegistry()
    tunnel = object()
    app = AppInfo(name="grafana", uri="http://127.0.0.1:3000", public_addr="grafana.example.com")
    registry.add(tunnel, "agent-1", [app])
    registry.remove(tunnel)
    assert registry.app_by_host("grafana.example.com") == app
    assert registry.app("grafana") == app
    assert registry.pick("grafana") is None
    assert not registry.is_online("grafana")
    assert registry.apps() == []
    assert registry.apps(include_offline=True) == [app]


# -- one registration per name (issue 8, finding 1) ---------------------------------------

from twisted.internet.task import Clock  # noqa: E402


def test_a_different_definition_of_a_name_is_refused_for_that_app_only():
    """Another agent's grafana with other labels is refused; its other app registers; the
    registration (policy) and every pick (forwarding) stay the first agent's."""
    reg = AgentRegistry()
    real, rogue = object(), object()
    assert reg.add(real, "a1", [app("grafana")]) == []
    evil = AppInfo(name="grafana", uri="http://127.0.0.1:6666", labels={"env": "prod"},
                   public_addr="grafana.apptunnel.localhost:3080", agent_id="a2",
                   rewrite_headers=(("X-Webauth-User", "admin"),))
    [(name, reason)] = reg.add(rogue, "a2", [evil, app("other", agent="a2")])
    assert name == "grafana" and "uri, labels, rewrite_headers differ" in reason
    assert reg.is_online("other")
    assert reg.app("grafana").labels == {"env": "dev"} and reg.app("grafana").agent_id == "a1"
    assert {reg.pick("grafana") for _ in range(5)} == {real}


def test_identical_definitions_are_load_balanced_and_the_registration_survives():
    """A second agent with the identical definition shares the traffic; when the first
    leaves, the registration stays and the second serves alone."""
    reg = AgentRegistry()
    t1, t2 = object(), object()
    reg.add(t1, "a1", [app("grafana")])
    assert reg.add(t2, "a2", [app("grafana", agent="a2")]) == []
    assert {reg.pick("grafana") for _ in range(4)} == {t1, t2}
    reg.remove(t1)
    assert reg.app("grafana").agent_id == "a1" and reg.pick("grafana") is t2


def test_offline_name_is_held_for_the_grace_period_then_forgotten():
    """Offline, a name keeps its definition against other agents (its own agent may change
    it); after the grace period it is forgotten and anyone may define it."""
    clock = Clock()
    reg = AgentRegistry(clock, grace=120)
    t1 = object()
    reg.add(t1, "a1", [app("grafana")])
    reg.remove(t1)
    changed = AppInfo(name="grafana", uri="http://127.0.0.1:1", labels={"env": "prod"},
                      public_addr="grafana.apptunnel.localhost:3080", agent_id="a2")
    assert [n for n, _ in reg.add(object(), "a2", [changed])] == ["grafana"]
    own = attrs_evolve(changed, agent_id="a1")
    t3 = object()
    assert reg.add(t3, "a1", [own]) == []          # its own agent, new config
    assert reg.app("grafana").labels == {"env": "prod"}
    reg.remove(t3)
    clock.advance(119)
    assert [a.name for a in reg.apps(include_offline=True)] == ["grafana"]
    clock.advance(2)
    assert reg.apps(include_offline=True) == [] and reg.app_by_host("grafana.apptunnel.localhost") is None
    assert reg.add(object(), "a2", [changed]) == []


def attrs_evolve(value, **changes):
    import attrs

    return attrs.evolve(value, **changes)


def test_pick_with_the_checked_registration_refuses_a_changed_one():
    """pick(name, app) routes only while app is still the registration decisions saw."""
    clock = Clock()
    reg = AgentRegistry(clock, grace=10)
    t1, t2 = object(), object()
    reg.add(t1, "a1", [app("grafana")])
    checked = reg.app("grafana")
    assert reg.pick("grafana", checked) is t1
    reg.remove(t1)
    clock.advance(11)
    other = attrs_evolve(checked, labels={"env": "prod"}, agent_id="a2")
    assert reg.add(t2, "a2", [other]) == []
    assert reg.pick("grafana", checked) is None and reg.pick("grafana", reg.app("grafana")) is t2
