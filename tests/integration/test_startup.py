"""Start-up failures of the real `twistd` processes: exit non-zero, one line, no traceback.

systemd's ``Restart=on-failure`` only acts on a process that exits with an error; a proxy
that logs a traceback for a busy port and runs on without it is never restarted.
"""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.support.cluster import BIN, free_port

TIMEOUT = 20   # the process must be gone well within this


def twistd(tmp_path: Path, plugin: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "twistd"), "-n", "--pidfile=", plugin, *args],
                          cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT,
                          stdin=subprocess.DEVNULL)


def proxy_config(tmp_path: Path, web_port: int, tunnel_port: int, data_dir: str = "data") -> Path:
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump({
        "cluster_name": "startup",
        "data_dir": str(tmp_path / data_dir),
        "public_addr": f"apptunnel.localhost:{web_port}",
        "web_listen_addr": f"127.0.0.1:{web_port}",
        "tunnel_listen_addr": f"127.0.0.1:{tunnel_port}",
        "diag_addr": "127.0.0.1:0",
        "backend": {"type": "sqlite"},
    }))
    return path


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    """Every line that reports a problem (log lines at warn and above, `error:` lines)."""
    text = result.stdout + result.stderr
    return [line for line in text.splitlines()
            if "#critical]" in line or "#error]" in line or "error:" in line]


@pytest.fixture
def busy_port():
    """A loopback port something else is listening on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.mark.parametrize("which", ["web", "tunnel"])
def test_proxy_with_a_busy_port_exits_with_one_line(tmp_path, busy_port, which):
    """A taken web or tunnel port: exit 1 within seconds, one line naming the address,
    no traceback and never "serving"."""
    if which == "web":
        config = proxy_config(tmp_path, busy_port, free_port())
    else:
        config = proxy_config(tmp_path, free_port(), busy_port)
    result = twistd(tmp_path, "apptunnel", "--config", str(config))
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output and "Unhandled" not in output, output
    assert "serving" not in output, output
    lines = error_lines(result)
    assert len(lines) == 1, output
    assert f"{which}_listen_addr 127.0.0.1:{busy_port}" in lines[0], lines
    assert "address already in use" in lines[0], lines


def test_proxy_with_an_unusable_store_exits_with_one_line(tmp_path):
    """A backend file it cannot open (a directory in its place): exit 1, one line naming it."""
    config = proxy_config(tmp_path, free_port(), free_port())
    (tmp_path / "data" / "apptunnel.db").mkdir(parents=True)
    result = twistd(tmp_path, "apptunnel", "--config", str(config))
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output and "serving" not in output, output
    assert any("cannot use the backend" in line and "apptunnel.db" in line
               for line in error_lines(result)), output


@pytest.mark.parametrize("plugin", ["apptunnel", "apptunnel-agent"])
def test_bad_config_is_one_line_without_the_usage_block(tmp_path, plugin):
    """A config twistd cannot load is one line: no `Options:` block, no traceback."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("cluster_name: [unclosed\n")
    for args in (["--config", str(bad)], []):
        result = twistd(tmp_path, plugin, *args)
        output = result.stdout + result.stderr
        assert result.returncode != 0, output
        assert "Options:" not in output and "Usage:" not in output, output
        assert "Traceback" not in output, output
        assert len(output.strip().splitlines()) == 1, output
        assert output.startswith(f"{plugin}: error: "), output
        assert ("bad.yaml" if args else "--config") in output, output


def test_agent_with_an_unreadable_identity_exits_with_one_line(tmp_path):
    """An agent whose saved key cannot be read (a directory in its place) exits non-zero
    with one line naming its data_dir."""
    data = tmp_path / "agent-data"
    data.mkdir()
    (data / "agent.crt").write_text("not a certificate\n")
    (data / "agent.key").mkdir()
    config = tmp_path / "agent.yaml"
    config.write_text(yaml.safe_dump({"data_dir": str(data), "proxy_addr": f"127.0.0.1:{free_port()}", "diag_addr": "127.0.0.1:0",
                                      "apps": [{"name": "a", "uri": "http://127.0.0.1:9"}]}))
    result = twistd(tmp_path, "apptunnel-agent", "--config", str(config))
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output, output
    assert len(output.strip().splitlines()) == 1, output
    assert str(data) in output, output


def test_agent_whose_data_dir_is_a_file_exits_with_one_line(tmp_path):
    """data_dir that is a file: one line naming it, not a traceback after the join."""
    data = tmp_path / "agent-data"
    data.write_text("a file\n")
    config = tmp_path / "agent.yaml"
    config.write_text(yaml.safe_dump({
        "data_dir": str(data), "proxy_addr": f"127.0.0.1:{free_port()}", "diag_addr": "127.0.0.1:0",
        "join": {"token": "x" * 32, "ca_pin": "sha256:" + "0" * 64},
        "apps": [{"name": "a", "uri": "http://127.0.0.1:9"}]}))
    result = twistd(tmp_path, "apptunnel-agent", "--config", str(config))
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output, output
    assert len(output.strip().splitlines()) == 1, output
    assert str(data) in output, output
