"""The agent's stored host-CA set (apptunnel/agent/trust.py): kept 0600, never without the
CA the agent joined under, garbage refused."""

from __future__ import annotations

import os
import stat

import pytest

from apptunnel.agent.trust import TRUST_FILE, load_trust_set, save_trust_set
from apptunnel.auth.ca import new_ca_pem
from apptunnel.auth.trust_set import TrustSetError
from apptunnel.auth.pins import cert_pin, spki_pin

NOW = 1_800_000_000.0


def ca_pem() -> bytes:
    return new_ca_pem("test", NOW)[1]


def test_without_a_stored_set_the_join_ca_alone_is_trusted(tmp_path):
    joined = ca_pem()
    certs = load_trust_set(str(tmp_path), joined, spki_pin(joined))
    assert [cert_pin(c) for c in certs] == [spki_pin(joined)]


def test_a_received_set_is_stored_0600_and_read_back(tmp_path):
    joined, new = ca_pem(), ca_pem()
    pin = spki_pin(joined)
    save_trust_set(str(tmp_path), [joined.decode(), new.decode()], pin)
    mode = stat.S_IMODE(os.stat(tmp_path / TRUST_FILE).st_mode)
    assert mode == 0o600
    assert len(load_trust_set(str(tmp_path), joined, pin)) == 2


def test_a_set_without_the_join_ca_is_refused_and_nothing_is_written(tmp_path):
    joined = ca_pem()
    with pytest.raises(TrustSetError, match="pinned"):
        save_trust_set(str(tmp_path), [ca_pem().decode()], spki_pin(joined))
    assert not (tmp_path / TRUST_FILE).exists()


def test_a_damaged_or_swapped_file_is_refused(tmp_path):
    joined = ca_pem()
    pin = spki_pin(joined)
    (tmp_path / TRUST_FILE).write_text("garbage")
    with pytest.raises(TrustSetError, match=TRUST_FILE):
        load_trust_set(str(tmp_path), joined, pin)
    (tmp_path / TRUST_FILE).write_bytes(ca_pem())
    with pytest.raises(TrustSetError, match="pinned"):
        load_trust_set(str(tmp_path), joined, pin)
