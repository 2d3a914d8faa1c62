"""The audit viewer: ``/v1/audit/events`` (JSON) and ``/web/audit`` (pages), mounted by
web/routes.py.

Reading needs the caller's rules to allow ``list`` (the search) or ``read`` (one event)
on ``event`` (auth/rbac.py). Filters come from the query string, so a filtered view is
a link one can share (an error page's request id links here); the backend filters and
pages (newest first), so a page costs one query whatever the size of the trail.
"""

from __future__ import annotations

import json
from urllib.parse import urlencode

from klein import Klein

from apptunnel.admin.audit import OUTCOMES, AuditQuery, AuditSearch
from apptunnel.admin.context import AdminError
from apptunnel.backend.records import AuditEvent
from apptunnel.web.admin_gate import AdminGate, AdminRoutes, iso
from apptunnel.web.http import json_response

FIELDS = ("since", "until", "type", "user", "app", "outcome", "request_id", "offset", "limit")


def event_view(event: AuditEvent) -> dict:
    return {"id": event.id, "time": event.time, "when": iso(event.time), "type": event.type,
            "code": event.code, "user": event.actor, "target": event.target,
            "outcome": event.outcome, "fields": event.fields,
            "request_id": event.fields.get("request_id")}


def query_fields(request) -> dict[str, str]:
    """The viewer's query-string fields (first value each; bad UTF-8 is ignored)."""
    found = {}
    for name in FIELDS:
        values = request.args.get(name.encode("ascii"))
        if values:
            found[name] = values[0].decode("utf-8", "replace")
    return found


class _AuditBase(AdminRoutes):
    def __init__(self, gate: AdminGate, search: AuditSearch) -> None:
        super().__init__(gate)
        self._search = search
        self._clock = gate.ctx.clock


class AuditApi(_AuditBase):
    """``/v1/audit/events?since=1h&user=alice&offset=50`` and ``/v1/audit/events/ID``."""

    app = Klein()
    app.handle_errors(AdminRoutes.on_error)

    @app.route("/v1/audit/events", methods=["GET"])
    async def events(self, request):
        await self.gate.require(request, "event", "list")
        query = AuditQuery.from_fields(query_fields(request), self._clock.seconds())
        events, more = await self._search.search(query)
        return json_response(request, 200, {"events": [event_view(e) for e in events],
                                    "offset": query.offset, "limit": query.limit,
                                    "next_offset": query.offset + len(events) if more else None})

    @app.route("/v1/audit/events/<string:event_id>", methods=["GET"])
    async def event(self, request, event_id: str):
        await self.gate.require(request, "event", "read")
        return json_response(request, 200, event_view(await self._search.event(event_id)))


class AuditPages(_AuditBase):
    """``/web/audit``: the table with filters and paging; ``/web/audit/ID``: one event."""

    app = Klein()
    app.handle_errors(AdminRoutes.on_error)

    @app.route("/web/audit", methods=["GET"])
    async def table(self, request):
        caller = await self.gate.require(request, "event", "list")
        given = query_fields(request)
        error, events, more, query = None, [], False, AuditQuery()
        try:
            query = AuditQuery.from_fields(given, self._clock.seconds())
            events, more = await self._search.search(query)
        except AdminError as err:     # a bad filter: said above the (empty) table
            error = err.text()
        keep = {k: v for k, v in given.items() if k not in ("offset",) and v}
        page = {
            "error": error, "filters": {name: given.get(name, "") for name in FIELDS},
            "outcomes": OUTCOMES,
            "events": [event_view(e) for e in events],
            "newer": (None if query.offset == 0 else "?" + urlencode(
                {**keep, "offset": max(0, query.offset - query.limit)})),
            "older": ("?" + urlencode({**keep, "offset": query.offset + len(events)})
                      if more else None),
            "first": query.offset + 1 if events else 0, "last": query.offset + len(events),
        }
        return await self.render(request, caller, "audit", "audit.html", page,
                                 400 if error else 200)

    @app.route("/web/audit/<string:event_id>", methods=["GET"])
    async def detail(self, request, event_id: str):
        caller = await self.gate.require(request, "event", "read")
        event = event_view(await self._search.event(event_id))
        return await self.render(request, caller, "audit", "audit_event.html", {
            "event": event,
            "fields": sorted((k, v if isinstance(v, str) else json.dumps(v, sort_keys=True))
                             for k, v in event["fields"].items()),
        })

