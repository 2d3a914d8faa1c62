"""The one store of `apptunnel login --auth` codes (auth/connectors/cli_codes.py), shared
by the OIDC callback and the SAML ACS: single use, bound to the CLI's verifier, short."""

from __future__ import annotations

from twisted.internet.task import Clock

from apptunnel.auth.connectors import oidc
from apptunnel.auth.connectors.cli_codes import CLI_CODE_TTL, CliCodes, digest


def test_a_code_is_single_use_and_worth_nothing_without_its_verifier():
    clock = Clock()
    codes = CliCodes(clock)
    alice = codes.issue("alice", digest("alice-verifier"))
    bob = codes.issue("bob", digest("bob-verifier"))
    assert codes.redeem(alice, "bob-verifier") is None          # another CLI's verifier
    assert codes.redeem(alice, "alice-verifier") is None        # spent by the wrong try
    assert codes.redeem(bob, "bob-verifier") == "bob"
    assert codes.redeem(bob, "bob-verifier") is None            # replay
    assert codes.redeem("garbage", "bob-verifier") is None
    late = codes.issue("alice", digest("v"))
    clock.advance(CLI_CODE_TTL)
    assert codes.redeem(late, "v") is None


def test_the_store_is_bounded_oldest_first_out():
    codes = CliCodes(Clock(), max_codes=2)
    first, second, third = (codes.issue(u, digest("v")) for u in ("a", "b", "c"))
    assert codes.redeem(first, "v") is None
    assert codes.redeem(second, "v") == "b" and codes.redeem(third, "v") == "c"


def test_oidc_uses_the_shared_store_not_a_copy():
    assert oidc.CliCodes is CliCodes and oidc.CliReturn.__module__.endswith("cli_codes")
