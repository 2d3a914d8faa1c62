"""etc/*.service pass `systemd-analyze verify`, keep their hardening, and say what
docs/operator.rst tells operators (install path, config path, state directory).

verify needs ExecStart's binary to exist, so each unit is checked as a copy whose
/opt/apptunnel/bin/ is this virtualenv's bin/ (where the same commands are installed).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.support.cluster import BIN
from tests.support.system import require_program

ROOT = Path(__file__).resolve().parents[2]
UNITS = ("apptunnel-proxy.service", "apptunnel-agent.service", "apptunnel-bot.service")
INSTALL_BIN = "/opt/apptunnel/bin/"
MAX_EXPOSURE = 2.0      # systemd-analyze security: 0 (locked) .. 10 (exposed)

HARDENING = (
    "NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes",
    "PrivateDevices=yes", "CapabilityBoundingSet=\n", "SystemCallFilter=@system-service",
    "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX", "RestrictNamespaces=yes",
    "LimitNOFILE=65536", "UMask=0077", "StateDirectory=",
)


def local_copy(tmp_path: Path, unit: str) -> Path:
    text = (ROOT / "etc" / unit).read_text()
    assert INSTALL_BIN + "twistd" in text
    copy = tmp_path / unit
    copy.write_text(text.replace(INSTALL_BIN, f"{BIN}/"))
    return copy


@pytest.mark.parametrize("unit", UNITS)
def test_unit_passes_systemd_analyze_verify(tmp_path, unit):
    """No error and no warning from `systemd-analyze verify` on the unit."""
    analyze = require_program("systemd-analyze", "systemd")
    done = subprocess.run([analyze, "verify", str(local_copy(tmp_path, unit))],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr


@pytest.mark.parametrize("unit", UNITS)
def test_unit_is_hardened(tmp_path, unit):
    """The hardening options are set, and `systemd-analyze security` rates it OK."""
    text = (ROOT / "etc" / unit).read_text()
    for option in HARDENING:
        assert re.search("^" + re.escape(option), text, re.M), f"{unit}: {option!r} missing"
    assert "DynamicUser" in text or re.search(r"^User=apptunnel", text, re.M)
    assert not re.search(r"^AmbientCapabilities=", text, re.M), "no capability by default"
    analyze = require_program("systemd-analyze", "systemd")
    done = subprocess.run([analyze, "security", "--offline=true", "--no-pager",
                           str(local_copy(tmp_path, unit))],
                          capture_output=True, text=True, timeout=60)
    found = re.search(r"Overall exposure level for \S+: ([\d.]+)", done.stdout + done.stderr)
    assert found, done.stdout + done.stderr
    print(f"{unit}: systemd-analyze security exposure {found.group(1)}")
    assert float(found.group(1)) <= MAX_EXPOSURE


@pytest.mark.parametrize("unit", UNITS)
def test_unit_paths_are_the_ones_the_operator_guide_gives(unit):
    """Install path, config file and state directory in the unit appear in the guide."""
    text = (ROOT / "etc" / unit).read_text()
    guide = (ROOT / "docs" / "operator.rst").read_text()
    config = re.search(r"^ExecStart=.* --config (\S+)", text, re.M).group(1)
    state = "/var/lib/" + re.search(r"^StateDirectory=(\S+)", text, re.M).group(1)
    for path in (INSTALL_BIN.rstrip("/").rsplit("/", 1)[0], config, state):
        assert path in guide, f"{unit}: {path} is not in docs/operator.rst"
    assert f"etc/{unit}" in guide
