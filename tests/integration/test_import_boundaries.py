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



def test_test_modules_share_helpers_through_tests_support():
    """A test module imports fixtures and helpers from tests/support, never from another
    test module: importing one runs its module-scoped set-up and couples unrelated files."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    offenders = []
    # tests/support/oidc/node_modules is npm's (`make test` runs npm ci there), not ours.
    for path in sorted(p for p in root.rglob("*.py") if "node_modules" not in p.parts):
        package = path.relative_to(root.parent).parent.parts
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level:
                # `from . import x` / `from .test_x import y`, made absolute
                base = package[:len(package) - node.level + 1]
                names = [".".join(base + ((node.module,) if node.module else ()))]
            else:
                names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                         else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            for name in names:
                if name.startswith(("tests.integration", "tests.unit")):
                    offenders.append(f"{path.relative_to(root)}: {name}")
    assert offenders == []
