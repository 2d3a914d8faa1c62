"""CA rotation decisions (apptunnel/auth/ca_rotation.py, auth/trust_set.py): grace floor, trust sets, and the
host-CA set an agent receives, fed hostile input."""

from __future__ import annotations

import datetime
import math

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from apptunnel.auth import ca_rotation, trust_set
from apptunnel.auth.ca import new_ca_pem
from apptunnel.auth.ca_rotation import ca_trust, grace_period
from apptunnel.auth.trust_set import MAX_TRUST_CAS, TrustSetError, parse_trust_set
from apptunnel.auth.pins import spki_pin
from apptunnel.backend.records import KeyRecord

NOW = 1_800_000_000.0


def record(id, state, activate_at=None, retire_at=None):
    return KeyRecord("user_ca", id, state, "key", "cert", NOW - 100, activate_at, retire_at)


def ca_pem() -> str:
    return new_ca_pem("test", NOW)[1].decode()


def leaf_pem() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "leaf")])
    when = datetime.datetime.fromtimestamp(NOW, datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(when).not_valid_after(when + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM).decode()


# -- grace period -----------------------------------------------------------------------

def test_grace_default_and_floor():
    assert grace_period(None) == ca_rotation.DEFAULT_GRACE
    assert grace_period(7200.0) == 7200.0
    assert grace_period(20.0, minimum=10.0) == 20.0
    for bad in (0.0, -1.0, 59.0, math.nan):
        with pytest.raises(ValueError, match="at least"):
            grace_period(bad, minimum=60.0)


# -- one role's trust at a moment ------------------------------------------------------

def test_before_rotation_the_current_ca_issues_and_is_the_only_trusted():
    trust = ca_trust([record("a", "current")], NOW)
    assert trust.issuing.id == "a"
    assert [r.id for r in trust.trusted] == ["a"]
    assert trust.expired == ()


def test_next_ca_is_trusted_at_once_and_issues_from_its_time():
    rows = [record("a", "current", retire_at=NOW + 100), record("b", "next", activate_at=NOW + 5)]
    before = ca_trust(rows, NOW)
    assert before.issuing.id == "a"
    assert {r.id for r in before.trusted} == {"a", "b"}
    after = ca_trust(rows, NOW + 5)
    assert after.issuing.id == "b"
    assert {r.id for r in after.trusted} == {"a", "b"}


def test_retired_ca_is_trusted_until_its_grace_ends_then_dropped():
    rows = [record("a", "retired", retire_at=NOW + 30), record("b", "current")]
    assert {r.id for r in ca_trust(rows, NOW + 29.9).trusted} == {"a", "b"}
    late = ca_trust(rows, NOW + 30)
    assert [r.id for r in late.trusted] == ["b"]
    assert [r.id for r in late.expired] == ["a"]


def test_retired_without_an_end_is_not_trusted_and_unknown_states_never_are():
    rows = [record("a", "retired"), record("b", "current"), record("c", "bogus")]
    trust = ca_trust(rows, NOW)
    assert [r.id for r in trust.trusted] == ["b"]


def test_no_ca_to_issue_with_is_refused():
    with pytest.raises(ValueError):
        ca_trust([record("a", "retired", retire_at=NOW + 10)], NOW)
    with pytest.raises(ValueError):
        ca_trust([record("b", "next", activate_at=NOW + 10)], NOW)


# -- the trusted host-CA set an agent or CLI receives -----------------------------------

def test_trust_set_with_the_pinned_ca_and_a_new_one_is_accepted():
    old, new = ca_pem(), ca_pem()
    certs = parse_trust_set([old, new], spki_pin(old.encode()))
    assert len(certs) == 2


def test_trust_set_without_the_pinned_ca_is_refused():
    old = ca_pem()
    with pytest.raises(TrustSetError, match="pinned"):
        parse_trust_set([ca_pem(), ca_pem()], spki_pin(old.encode()))


@pytest.mark.parametrize("value", [
    None, "pem", {}, [], [1], [b"-----BEGIN CERTIFICATE-----"],
    ["garbage"], ["-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"],
    ["caf\u00e9"],
])
def test_trust_set_garbage_is_refused(value):
    with pytest.raises(TrustSetError):
        parse_trust_set(value, "sha256:" + "0" * 64)


def test_trust_set_leaf_certificate_is_not_a_ca():
    pinned = ca_pem()
    with pytest.raises(TrustSetError, match="not a CA"):
        parse_trust_set([pinned, leaf_pem()], spki_pin(pinned.encode()))


def test_trust_set_bounds_count_size_and_duplicates():
    pinned = ca_pem()
    pin = spki_pin(pinned.encode())
    with pytest.raises(TrustSetError, match="at most"):
        parse_trust_set([pinned] * (MAX_TRUST_CAS + 1), pin)
    with pytest.raises(TrustSetError, match="bytes"):
        parse_trust_set([pinned, "x" * trust_set.MAX_TRUST_BYTES], pin)
    with pytest.raises(TrustSetError, match="duplicate"):
        parse_trust_set([pinned, pinned], pin)


def test_pinned_clients_keep_their_pinned_ca_first_and_add_the_others():
    """CLI login and bots: ca.crt = the pinned CA then the other host CAs named; a set
    that drops the pinned CA is refused; an older proxy's answer (no field) changes
    nothing."""
    from apptunnel.auth.trust_set import pinned_with_trusted

    pinned, new = ca_pem(), ca_pem()
    pin = spki_pin(pinned.encode())
    kept = pinned_with_trusted(pinned.encode(), [new, pinned], pin)
    certs = x509.load_pem_x509_certificates(kept)
    assert [spki_pin(c.public_bytes(serialization.Encoding.PEM)) for c in certs] == [
        pin, spki_pin(new.encode())]
    assert pinned_with_trusted(pinned.encode(), None, pin) == pinned.encode()
    with pytest.raises(TrustSetError, match="pinned"):
        pinned_with_trusted(pinned.encode(), [new], pin)
    with pytest.raises(TrustSetError):
        pinned_with_trusted(pinned.encode(), [pinned, "garbage"], pin)
