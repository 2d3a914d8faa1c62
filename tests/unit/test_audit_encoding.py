"""An audit event's fields are encoded once, by the chain, and the store writes that text
(issue 14: the JSON was encoded again on the SQLite thread for every request). The stored
column and the digest stay byte for byte what they were (the store itself:
test_backend_sqlite.py; the mirror: tests/integration/test_audit.py)."""

from __future__ import annotations

import json
import json.encoder

import attrs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import apptunnel.backend.sqlite as sqlite_backend
from apptunnel.audit import _plain
import apptunnel.audit.chain as chain_module
from apptunnel.audit.chain import GENESIS, canonical, digest_of, link_line
from apptunnel.backend.records import AuditEvent

_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=3),
    max_leaves=8)
_TEXT = st.text(max_size=12)


def _event(i: int, fields: dict, actor: str = "alice") -> AuditEvent:
    return AuditEvent(f"id{i:04d}", 1000.0 + i / 7, "app.request", "T2100I", actor, "wiki",
                      "success", fields)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.text(max_size=6), _VALUES, max_size=6), _TEXT, _TEXT)
def test_the_chains_encoding_is_the_stored_text_and_the_canonical_body(fields, actor, prev):
    """Any fields (unicode, NaN, nesting, empty): fields_json is exactly what the store
    wrote before (sqlite _dump), and the journal line is exactly the old single encoding."""
    plain = _plain(fields)
    chained, line = link_line(_event(1, plain, actor), "proxy-1", 7, prev)
    assert chained.fields_json == sqlite_backend._dump(plain)
    old_body = json.dumps(["proxy-1", 7, prev, chained.id, chained.time, chained.type,
                           chained.code, actor, "wiki", "success", plain],
                          sort_keys=True, separators=(",", ":")).encode("ascii")
    assert canonical(chained) == old_body
    assert line == old_body[:-1] + b',"' + chained.digest.encode() + b'"]\n'
    assert digest_of(attrs.evolve(chained, digest="")) == chained.digest


def test_the_cached_encoding_is_not_part_of_the_record():
    """Events read back from storage (no cached text) equal the ones emitted; repr hides it."""
    chained, _ = link_line(_event(1, {"status": 200}), "p", 1, GENESIS)
    assert chained.fields_json == '{"status":200}'
    assert chained == attrs.evolve(chained, fields_json="")
    assert "fields_json" not in repr(chained)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_VALUES)
def test_the_prebuilt_encoder_gives_json_dumps_text(value):
    """The C encoder built once (and its pure-Python fallback) encode like json.dumps."""
    expected = json.dumps(value, sort_keys=True, separators=(",", ":"))
    assert chain_module._ENCODE(value) == expected
    assert _FALLBACK(value) == expected


def _fallback_encoder():
    saved = json.encoder.c_make_encoder
    json.encoder.c_make_encoder = None
    try:
        return chain_module._compact_encoder()
    finally:
        json.encoder.c_make_encoder = saved


_FALLBACK = _fallback_encoder()
