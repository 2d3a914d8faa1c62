"""What a module loads, asked of a fresh interpreter: the rooms' import boundaries hold at
run time too (a lazy import inside a function would slip past the static import rules)."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module, forbidden", [
    ("apptunnel.cli.login", "apptunnel.agent"),
    ("apptunnel.agent.join", "apptunnel.auth.ca"),
    ("apptunnel.agent.service", "apptunnel.auth.ca"),
])
def test_pin_users_do_not_load_the_ca_or_the_agent(module, forbidden):
    """The CLI needs no agent code and the agent no CA code to check a pin."""
    code = (f"import sys, {module}; "
            f"print(sorted(m for m in sys.modules if m.startswith({forbidden!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout.strip()
    assert out == "[]"


def test_the_ca_does_not_load_the_config_module():
    """auth/ca.py reports bad CA files without importing the config loader."""
    code = "import sys, apptunnel.auth.ca; print('apptunnel.config' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout.strip()
    assert out == "False"

