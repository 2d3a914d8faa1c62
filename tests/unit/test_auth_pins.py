"""CA pins: one module for the pin form, the pin of a certificate and the chain check."""


import pytest
from cryptography import x509

from apptunnel.auth.ca import ClusterCA
from apptunnel.auth.pins import cert_pin, check_chain, is_pin, parse_pin, spki_pin
from twisted.internet.task import Clock

NOW = 1_700_000_000.0


def test_pin_of_a_certificate_is_the_same_loaded_or_pem(tmp_path):
    """cert_pin and spki_pin agree, and match the CA's own .pin."""
    clock = Clock()
    clock.advance(NOW)
    ca = ClusterCA.load_or_create(str(tmp_path), "c", clock)
    cert = x509.load_pem_x509_certificate(ca.cert_pem)
    assert cert_pin(cert) == spki_pin(ca.cert_pem) == ca.pin
    assert is_pin(ca.pin)


def test_parse_pin_accepts_pasted_forms_and_refuses_garbage():
    """A pin pasted with spaces or upper-case hex is normalised; anything else is refused."""
    pin = "sha256:" + "ab" * 32
    assert parse_pin("  SHA256:" + "AB" * 32 + "\n") == pin
    for bad in ["", "sha256:", "sha256:" + "0" * 63, "sha1:" + "0" * 64, "sha256:" + "g" * 64,
                None, 42]:
        with pytest.raises(ValueError, match="sha256: followed by 64 hex digits"):
            parse_pin(bad)
        assert not is_pin(bad)
    assert not is_pin("SHA256:" + "AB" * 32)   # what we print is lower-case


def test_check_chain_refuses_an_empty_chain():
    """No certificate presented: refused with a reason, before any secret is sent."""
    assert check_chain([], "sha256:" + "0" * 64, NOW) == "the proxy presented no certificate"
