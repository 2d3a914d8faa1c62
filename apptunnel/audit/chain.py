"""The per-proxy hash chain over audit events, and the check that walks it.

(The admin CLI's events form one more chain, ``CLI_CHAIN``, extended by every CLI run in
one storage transaction each: backend ``append_audit_chained``.)

Each proxy numbers its events 1, 2, 3, ... (``seq``, continued across restarts) and stores
with each the previous event's digest (``prev``) and its own: sha256 over a canonical
encoding of every stored field plus ``prev``. Changing any stored field of one event breaks
its digest; deleting one leaves a gap in ``seq``; moving one breaks the order of ``seq`` in
storage order. Pure functions: no I/O, no clock.
"""

from __future__ import annotations

import hashlib
import json
import json.encoder
from collections.abc import Callable
from typing import Any

import attrs

from apptunnel.backend.records import AuditEvent

GENESIS = "0" * 64   # the prev of a proxy's first event
# The one chain that is not a proxy's: the admin CLI's events (audit/__init__.py). A proxy
# id is 16 hex digits, so it can never be this.
CLI_CHAIN = "cli"


def _compact_encoder() -> Callable[[Any], str]:
    """``json.dumps(o, sort_keys=True, separators=(",", ":"))``, its C encoder built once.

    JSONEncoder.encode builds a new C encoder object on every call, and this runs twice per
    request on the reactor thread; calling the one encode() would build gives the same text.
    No circular-reference markers: what is encoded here came out of JSON-safe values
    (audit ``_plain``, or a stored row), never a structure holding itself. Without the C
    accelerator this is JSONEncoder.encode itself.
    """
    encoder = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    make = json.encoder.c_make_encoder
    if make is None:
        return encoder.encode
    run = make(None, encoder.default, json.encoder.encode_basestring_ascii, None,
               encoder.key_separator, encoder.item_separator, encoder.sort_keys,
               encoder.skipkeys, encoder.allow_nan)

    def encode(o: Any) -> str:
        return "".join(run(o, 0))

    return encode


_ENCODE = _compact_encoder()


def canonical(e: AuditEvent) -> bytes:
    """Every stored field, in a fixed order, as compact JSON (sorted keys in ``fields``).
    Always from ``fields`` itself, never a cached ``fields_json``: this is what checks."""
    return _ENCODE([e.proxy_id, e.seq, e.prev, e.id, e.time, e.type, e.code, e.actor,
                    e.target, e.outcome, e.fields]).encode("ascii")


def digest_of(e: AuditEvent) -> str:
    return hashlib.sha256(canonical(e)).hexdigest()


def link_line(e: AuditEvent, proxy_id: str, seq: int, prev: str) -> tuple[AuditEvent, bytes]:
    """``e`` as event number ``seq`` of ``proxy_id``'s chain, after the event digested
    ``prev``, and its journal line (audit/journal.py)."""
    return link_parts((e.id, e.time, e.type, e.code, e.actor, e.target, e.outcome, e.fields),
                      proxy_id, seq, prev)


def link_parts(parts: tuple, proxy_id: str, seq: int, prev: str) -> tuple[AuditEvent, bytes]:
    """link_line for an event not made yet: ``parts`` are its first eight fields (id ...
    fields, in AuditEvent's order). This runs for every request on the reactor thread, so
    one record is made, with one encoding of the fields and one hash. The fields' encoding
    rides along on the record (``fields_json``: the stored column is the same text), so
    the store does not encode them again."""
    id, time, type, code, actor, target, outcome, fields = parts
    fields_json = _ENCODE(fields)
    # The head and the fields encoded apart are the bytes of the whole list encoded at
    # once: compact separators join a list's elements with a bare comma.
    head = _ENCODE([proxy_id, seq, prev, id, time, type, code, actor, target, outcome])
    body = (head[:-1] + "," + fields_json + "]").encode("ascii")
    digest = hashlib.sha256(body).hexdigest()
    chained = AuditEvent(id, time, type, code, actor, target, outcome, fields,
                         proxy_id, seq, prev, digest, fields_json)
    return chained, body[:-1] + b',"' + digest.encode("ascii") + b'"]\n'


def link(e: AuditEvent, proxy_id: str, seq: int, prev: str) -> AuditEvent:
    return link_line(e, proxy_id, seq, prev)[0]


def chain_name(chain: str) -> str:
    """How people read a chain's id: ``proxy ID``, or ``admin CLI`` for the CLI's."""
    return "admin CLI" if chain == CLI_CHAIN else f"proxy {chain}"


@attrs.frozen
class Problem:
    """The first thing wrong with one proxy's chain."""

    kind: str        # "altered" | "missing" | "reordered"
    proxy_id: str
    id: str          # the event where the walk found it
    seq: int
    detail: str

    def __str__(self) -> str:
        return (f"{self.kind}: {chain_name(self.proxy_id)} event {self.id} seq {self.seq}: "
                f"{self.detail}")


class ChainWalk:
    """Feed one proxy's chained events in storage (insertion) order; ``problem`` is the
    first break. At a gap the caller passes ``moved``: the event with the first missing seq
    if storage has it elsewhere (then it was moved, and is the one named), else None."""

    def __init__(self, proxy_id: str) -> None:
        self.proxy_id = proxy_id
        self.count = 0
        self.last_seq = 0
        self.last_digest = GENESIS
        self.problem: Problem | None = None

    def feed(self, e: AuditEvent, moved: AuditEvent | None = None) -> bool:
        """Check one event; False (and ``problem`` set) at the first break."""
        if self.problem is not None:
            return False
        expected = self.last_seq + 1
        if digest_of(attrs.evolve(e, digest="")) != e.digest:
            return self._fail("altered", e, "its digest does not match its stored fields")
        if e.seq > expected:
            if moved is not None and moved.seq == expected:
                return self._fail("reordered", moved,
                                  f"stored out of order: seq {e.seq} ({e.id}) comes before it")
            gap = (f"seq {expected}" if e.seq == expected + 1
                   else f"seqs {expected}..{e.seq - 1}")
            return self._fail("missing", e, f"{gap} before it are missing")
        if e.seq < expected:
            return self._fail("reordered", e, f"stored after seq {self.last_seq}")
        if e.prev != self.last_digest:
            return self._fail("altered", e, "its prev digest is not the previous event's digest")
        self.count += 1
        self.last_seq, self.last_digest = e.seq, e.digest
        return True

    def _fail(self, kind: str, e: AuditEvent, detail: str) -> bool:
        self.problem = Problem(kind, self.proxy_id, e.id, e.seq, detail)
        return False
