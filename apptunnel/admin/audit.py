"""Audit search for the viewer and the API: a query from text fields (a query string),
checked, then answered by the backend (filters and paging happen in storage)."""

from __future__ import annotations

import datetime
from collections.abc import Mapping

import attrs

from apptunnel.admin.context import NOT_FOUND, AdminError
from apptunnel.backend.records import AuditEvent
from apptunnel.config import parse_duration

OUTCOMES = ("success", "failure")
PAGE = 50
MAX_PAGE = 500
MAX_OFFSET = 100_000
MAX_TEXT = 200


def parse_time(option: str, text: str, now: float) -> float:
    """``1h`` means an hour before now; otherwise an ISO 8601 time (naive = UTC)."""
    try:
        return now - parse_duration(text)
    except ValueError:
        pass
    try:
        moment = datetime.datetime.fromisoformat(text.strip())
    except ValueError:
        raise AdminError(f"expected a duration like 1h or an ISO time like "
                         f"2024-05-01T12:00:00Z, got {text!r}", field=option) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return moment.timestamp()


@attrs.frozen
class AuditQuery:
    """What the viewer asks: a time window, exact filters, a page (newest first)."""

    since: float | None = None
    until: float | None = None
    type: str | None = None
    user: str | None = None
    app: str | None = None
    outcome: str | None = None
    request_id: str | None = None
    offset: int = 0
    limit: int = PAGE

    @classmethod
    def from_fields(cls, fields: Mapping[str, str], now: float) -> AuditQuery:
        """From query-string fields (empty ones ignored); AdminError naming the field."""
        def text(name: str) -> str | None:
            value = (fields.get(name) or "").strip()
            if len(value) > MAX_TEXT:
                raise AdminError(f"at most {MAX_TEXT} characters", field=name)
            return value or None

        def number(name: str, default: int, most: int, least: int) -> int:
            value = text(name)
            if value is None:
                return default
            if not value.isdigit() or not least <= int(value) <= most:
                raise AdminError(f"expected a whole number from {least} to {most}", field=name)
            return int(value)

        since, until = text("since"), text("until")
        query = cls(
            since=parse_time("since", since, now) if since else None,
            until=parse_time("until", until, now) if until else None,
            type=text("type"), user=text("user"), app=text("app"),
            outcome=text("outcome"), request_id=text("request_id"),
            offset=number("offset", 0, MAX_OFFSET, 0),
            limit=number("limit", PAGE, MAX_PAGE, 1),
        )
        if query.outcome is not None and query.outcome not in OUTCOMES:
            raise AdminError("expected success or failure", field="outcome")
        if query.since is not None and query.until is not None and query.since >= query.until:
            raise AdminError("since must be before until")
        return query

    def fields(self) -> dict[str, str]:
        """The filters as query-string fields (links to the next page keep them)."""
        found = {"type": self.type, "user": self.user, "app": self.app,
                 "outcome": self.outcome, "request_id": self.request_id}
        return {k: v for k, v in found.items() if v is not None}


class AuditSearch:
    """Reads the audit trail for the viewer and the API."""

    def __init__(self, backend) -> None:
        self._backend = backend

    async def search(self, query: AuditQuery) -> tuple[list[AuditEvent], bool]:
        """A page of matching events, newest first, and whether more follow."""
        found = await self._backend.search_audit(
            since=query.since, until=query.until, type=query.type, limit=query.limit + 1,
            actor=query.user, target=query.app, outcome=query.outcome,
            request_id=query.request_id, offset=query.offset, newest_first=True)
        return found[:query.limit], len(found) > query.limit

    async def event(self, event_id: str) -> AuditEvent:
        found = None
        if 0 < len(event_id) <= MAX_TEXT:
            found = await self._backend.get_audit_event(event_id)
        if found is None:
            raise AdminError("no audit event with that id", NOT_FOUND)
        return found
