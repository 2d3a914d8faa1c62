"""The one store of `apptunnel login --auth` codes (auth/connectors/cli_codes.py), shared
by the OIDC callback and the SAML ACS: single use, bound to the CLI's verifier, short,
and in the backend, so any proxy or worker redeems what another issued."""

from __future__ import annotations

import pytest_twisted
from twisted.internet.task import Clock

from apptunnel.auth.connectors import oidc
from apptunnel.auth.connectors.cli_codes import CLI_CODE_TTL, CliCodes, digest
from apptunnel.backend.records import AuthCode
from tests.support.memory import MemoryBackend


@pytest_twisted.ensureDeferred
async def test_a_code_is_single_use_and_worth_nothing_without_its_verifier():
    clock = Clock()
    codes = CliCodes(clock, MemoryBackend())
    alice = await codes.issue("alice", digest("alice-verifier"))
    bob = await codes.issue("bob", digest("bob-verifier"))
    assert await codes.redeem(alice, "bob-verifier") is None      # another CLI's verifier
    assert await codes.redeem(alice, "alice-verifier") is None    # spent by the wrong try
    assert await codes.redeem(bob, "bob-verifier") == "bob"
    assert await codes.redeem(bob, "bob-verifier") is None        # replay
    assert await codes.redeem("garbage", "bob-verifier") is None
    late = await codes.issue("alice", digest("v"))
    clock.advance(CLI_CODE_TTL)
    assert await codes.redeem(late, "v") is None


@pytest_twisted.ensureDeferred
async def test_a_code_issued_by_one_proxy_is_redeemed_at_another():
    """Two proxies (or workers) on one backend: the browser's proxy issues, the CLI's
    connection reaches the other, which redeems it once."""
    backend, clock = MemoryBackend(), Clock()
    issued = await CliCodes(clock, backend).issue("alice", digest("v"))
    other = CliCodes(clock, backend)
    assert await other.redeem(issued, "v") == "alice"
    assert await CliCodes(clock, backend).redeem(issued, "v") is None


@pytest_twisted.ensureDeferred
async def test_an_app_hand_off_code_is_never_a_cli_code():
    """A hand-off code of an app (same table) with a matching 'verifier' opens nothing."""
    backend, clock = MemoryBackend(), Clock()
    await backend.put_auth_code(AuthCode(code_hash=digest("app-code"), web_session="w",
                                         app="grafana", path="alice",
                                         state_hash=digest("state"), expires=60.0))
    assert await CliCodes(clock, backend).redeem("app-code", "state") is None


def test_oidc_uses_the_shared_store_not_a_copy():
    assert oidc.CliCodes is CliCodes and oidc.CliReturn.__module__.endswith("cli_codes")
