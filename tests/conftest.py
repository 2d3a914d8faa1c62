"""Fixtures shared by unit and integration test modules; the environments themselves live
in tests/support so that a module names the one it runs against (`env` is bound per
module). forward_env listens on loopback, so only tests/integration uses it."""

from __future__ import annotations

import pytest
import pytest_twisted

from tests.support.forward_env import running_forward_env
from tests.support.web_env import running_web_env


@pytest_twisted.async_yield_fixture
async def forward_env(tmp_path):
    """The real edge and forwarder in front of a real upstream app on loopback (in-memory
    storage)."""
    async with running_forward_env(tmp_path) as env:
        yield env


@pytest_twisted.async_yield_fixture
async def web_env(tmp_path):
    """The proxy's web app over in-memory storage, real sessions and CA, driven in memory."""
    async with running_web_env(tmp_path) as env:
        yield env


@pytest.fixture
def home(tmp_path):
    """An APPTUNNEL_HOME that does not exist yet, as on a user's first login."""
    return tmp_path / "home" / ".apptunnel"
