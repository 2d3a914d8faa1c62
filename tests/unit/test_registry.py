"""The registry of online apps and the tunnels that serve them."""

from apptunnel.proxy.registry import AgentRegistry, AppInfo, host_only


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


def test_host_only_handles_ipv6_and_ports():
    """host_only strips ports, also after bracketed IPv6 literals."""
    assert host_only("[::1]:8080") == "[::1]"
    assert host_only("Example.COM:1") == "example.com"
    assert host_only("example.com") == "example.com"


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
