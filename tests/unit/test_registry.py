"""The registry of online apps and the tunnels that serve them."""

from apptunnel.proxy.registry import AgentRegistry, AppInfo, host_only


def app(name, addr=None, agent="a1"):
    return AppInfo(
        name=name, uri=f"http://127.0.0.1:80{len(name)}", labels={"env": "dev"},
        public_addr=addr or f"{name}.apptunnel.localhost:3080", agent_id=agent,
    )


def test_apps_are_online_while_a_tunnel_serves_them():
    """Apps appear with their tunnel and disappear when it is removed."""
    reg = AgentRegistry()
    t1 = object()
    reg.add(t1, "a1", [app("grafana"), app("wiki")])
    assert [a.name for a in reg.apps()] == ["grafana", "wiki"]
    assert reg.app("wiki").name == "wiki" and reg.app("nope") is None
    reg.remove(t1)
    assert reg.apps() == [] and reg.app("wiki") is None and reg.pick("wiki") is None
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
    assert reg.app_by_host("grafana.apptunnel.localhost") is None


def test_host_only_handles_ipv6_and_ports():
    """host_only strips ports, also after bracketed IPv6 literals."""
    assert host_only("[::1]:8080") == "[::1]"
    assert host_only("Example.COM:1") == "example.com"
    assert host_only("example.com") == "example.com"
