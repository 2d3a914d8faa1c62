"""`Audit`: a stand-in for AuditLog that keeps what code under test emits, in memory.

One fake for every unit test that checks audit events (sign-in connectors, OIDC, SAML,
the access policy, the router and app connections), readable two ways: `events` holds
(type, actor, outcome, other fields) tuples, the shape the sign-in tests compare, and
`of(type)` the keyword arguments of each event of that type (actor, target and outcome
included), the shape the access tests compare.
"""

from __future__ import annotations


class Audit:
    """Records each emit; `events` and `of` are two views of the same records."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, str, dict]] = []
        self._emitted: list[tuple[str, dict]] = []
        self.writable = True        # AuditLog.writable: set False to test audit.on_failure
        self.admit = False          # what admitted() answers while not writable

    def admitted(self):
        from twisted.internet.defer import succeed
        return succeed(self.writable or self.admit)

    def emit(self, type, **fields):
        self._emitted.append((type, fields))
        rest = {k: v for k, v in fields.items() if k not in ("actor", "target", "outcome")}
        self.events.append((type, fields.get("actor", ""), fields.get("outcome", "success"), rest))

    def of(self, type) -> list[dict]:
        return [fields for t, fields in self._emitted if t == type]
