"""TCP apps in the agent config, the hello, the registry and the agent's port policy."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor

from apptunnel.agent.upstream import UpstreamDialer, target_port
from apptunnel.config import AppConfig, ConfigError, load_agent_config, parse_port_range
from apptunnel.catalog import AppInfo
from apptunnel.tunnel.errors import StreamRefused
from apptunnel.tunnel.frames import ErrorCode
from tests.support.tcp_apps import multi

HEAD = "data_dir: agent-data\nproxy_addr: 127.0.0.1:3024\napps:\n"


def agent(tmp_path: Path, apps: str) -> str:
    path = tmp_path / "agent.yaml"
    path.write_text(HEAD + textwrap.indent(textwrap.dedent(apps), "  "))
    return str(path)


def test_single_port_tcp_app(tmp_path):
    """tcp://host:port is a TCP app with no extra ranges."""
    config = load_agent_config(agent(tmp_path, """\
        - name: db
          uri: tcp://localhost:5432
    """))
    app = config.apps[0]
    assert (app.uri, app.tcp_ports, app.kind) == ("tcp://localhost:5432", (), "tcp")


def test_multi_port_tcp_app(tmp_path):
    """tcp_ports takes single ports and "low-high" ranges."""
    config = load_agent_config(agent(tmp_path, """\
        - name: multi
          uri: tcp://localhost
          tcp_ports: [5432, 6379, "8000-8010"]
    """))
    assert config.apps[0].tcp_ports == ((5432, 5432), (6379, 6379), (8000, 8010))


def test_http_apps_are_http_kind(tmp_path):
    """http(s) apps keep kind http and no tcp ports."""
    config = load_agent_config(agent(tmp_path, """\
        - name: web
          uri: http://localhost:3000
    """))
    assert config.apps[0].kind == "http" and config.apps[0].tcp_ports == ()


@pytest.mark.parametrize("apps, line, key, problem", [
    ("- name: db\n  uri: tcp://localhost\n", 5, "apps[0].uri", "needs a port"),
    ("- name: db\n  uri: http://localhost\n  tcp_ports: [80]\n", 6, "apps[0].tcp_ports",
     "only for tcp://"),
    ("- name: db\n  uri: tcp://localhost\n  tcp_ports: [0]\n", 6, "apps[0].tcp_ports[0]",
     "1-65535"),
    ("- name: db\n  uri: tcp://localhost\n  tcp_ports: [70000]\n", 6, "apps[0].tcp_ports[0]",
     "1-65535"),
    ("- name: db\n  uri: tcp://localhost\n  tcp_ports:\n    - 22\n    - \"9-3\"\n", 8,
     "apps[0].tcp_ports[1]", "low-high"),
    ("- name: db\n  uri: tcp://localhost\n  tcp_ports: [\"x\"]\n", 6, "apps[0].tcp_ports[0]",
     "expected a port"),
    ("- name: db\n  uri: tcp://localhost\n  tcp_ports: []\n", 6, "apps[0].tcp_ports",
     "at least one"),
])
def test_tcp_errors_name_file_line_and_key(tmp_path, apps, line, key, problem):
    """Each TCP config mistake is one line with file:line: key."""
    path = agent(tmp_path, apps)
    with pytest.raises(ConfigError) as caught:
        load_agent_config(path)
    text = str(caught.value)
    assert text.startswith(f"{path}:{line}: {key}: "), text
    assert problem in text and "\n" not in text


@settings(max_examples=100, deadline=None)
@given(st.one_of(st.integers(-10, 70000), st.text(max_size=12), st.booleans(), st.none()))
def test_parse_port_range_only_raises_value_error(entry):
    """Any entry parses to a valid range or raises ValueError."""
    try:
        low, high = parse_port_range(entry)
    except ValueError:
        return
    assert 1 <= low <= high <= 65535


def test_port_policy_allows_uri_port_and_declared_ranges():
    """A stream may name the uri's port or a port inside a declared range."""
    app = multi(uri="tcp://127.0.0.1:7000")
    assert target_port(app, None) == 7000
    assert target_port(app, 7000) == 7000
    assert target_port(app, 5432) == 5432
    assert target_port(app, 8005) == 8005


@pytest.mark.parametrize("requested", [22, 7999, 8011, "5432", 5432.0, True])
def test_port_policy_refuses_other_ports(requested):
    """A port outside the ranges (or not an int) is UNKNOWN_TARGET with a reason."""
    with pytest.raises(StreamRefused) as caught:
        target_port(multi(), requested)
    assert caught.value.code == ErrorCode.UNKNOWN_TARGET and caught.value.reason


def test_port_policy_needs_a_port_for_multi_port_apps():
    """No port and no uri port: refused, naming the problem."""
    with pytest.raises(StreamRefused, match="name one"):
        target_port(multi(), None)


def test_http_apps_refuse_a_port():
    """An HTTP app cannot be aimed at another port."""
    app = AppConfig(name="web", uri="http://127.0.0.1:3000", labels={}, public_addr=None)
    assert target_port(app, None) is None
    with pytest.raises(StreamRefused) as caught:
        target_port(app, 22)
    assert caught.value.code == ErrorCode.UNKNOWN_TARGET


@pytest_twisted.ensureDeferred
async def test_dialer_refuses_undeclared_port_without_dialing():
    """The dialer refuses a port outside the ranges before any connection attempt."""
    dialer = UpstreamDialer(reactor, (multi(),))
    with pytest.raises(StreamRefused) as caught:
        await dialer.stream_requested(None, {"app": "multi", "port": 22})
    assert caught.value.code == ErrorCode.UNKNOWN_TARGET
    assert "22" in caught.value.reason


def test_registry_app_kind():
    """AppInfo says tcp for tcp:// URIs and keeps its ranges."""
    info = AppInfo(name="db", uri="tcp://127.0.0.1:5432", tcp_ports=((1, 2),))
    assert info.kind == "tcp" and info.tcp_ports == ((1, 2),)
    assert AppInfo(name="web", uri="http://x").kind == "http"
