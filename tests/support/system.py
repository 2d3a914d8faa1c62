"""Real programs from Debian packages that some tests start (PostgreSQL, Redis, Chromium).

`make test` installs them when it runs as root on Debian. Elsewhere a test that needs a
missing one is skipped with the reason printed, except under CI=true, where nothing may
skip: there a missing program fails the test and names the package to install.
"""

from __future__ import annotations

import os
import shutil

import pytest


def require_program(program: str, package: str) -> str:
    """The path of `program`, or skip (fail under CI=true) naming the Debian package."""
    path = program if os.path.isabs(program) else shutil.which(program)
    if path and os.access(path, os.X_OK):
        return path
    reason = f"{program} is not installed (Debian package {package}; `make test` installs it as root)"
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)
