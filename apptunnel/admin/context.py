"""What every admin service works with: storage, the audit log, the clock, the nudge."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import attrs

from apptunnel.errors import ApptunnelError

# How an admin error becomes an answer: CLI exit status, HTTP status.
USAGE, NOT_FOUND, CONFLICT, FAILED, FORBIDDEN = (
    "usage", "not_found", "conflict", "failed", "forbidden")
_STATUS = {USAGE: 400, NOT_FOUND: 404, CONFLICT: 409, FAILED: 400, FORBIDDEN: 403}


class AdminError(ApptunnelError):
    """A refused admin change. ``field`` names the input at fault (the CLI shows it as
    ``--field``, the API as ``field``); ``kind`` says what it becomes at each door."""

    def __init__(self, problem: str, kind: str = USAGE, field: str = "") -> None:
        self.problem = problem
        self.kind = kind
        self.field = field
        super().__init__(self.text())

    @property
    def status(self) -> int:
        return _STATUS[self.kind]

    def text(self, flag_prefix: str = "") -> str:
        return f"{flag_prefix}{self.field}: {self.problem}" if self.field else self.problem


@attrs.frozen
class Actor:
    """Who makes the change and through which door: ``via`` is ``cli`` or ``api``; the
    notes (``sudo_user``) go into the audit event beside the actor."""

    name: str
    via: str
    notes: tuple[tuple[str, str], ...] = ()


async def _no_nudge() -> None:
    return None


@attrs.define
class AdminContext:
    """Storage, audit, clock and how to make a change hold on the proxy now (``nudge``:
    the CLI asks the local proxy over its control socket; the proxy re-reads itself)."""

    backend: Any
    audit: Any
    clock: Any
    public_addr: str
    nudge: Callable[[], Awaitable[Any]] = _no_nudge

    def now(self) -> float:
        return self.clock.seconds()

    def emit(self, actor: Actor, type: str, target: str, **fields: Any) -> None:
        """One audit event per change, with the actor and the door it came through."""
        fields.update(actor.notes)
        self.audit.emit(type, actor=actor.name, target=target, outcome="success",
                        via=actor.via, **fields)

    async def missing_role(self, roles, planned: frozenset[str] = frozenset()) -> str | None:
        """The first of ``roles`` neither stored nor ``planned``; None when all exist."""
        for role in roles:
            if role not in planned and await self.backend.get_resource("role", role) is None:
                return role
        return None
