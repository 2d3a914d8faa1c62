"""The access-request JSON API (mounted by web/routes.py, which authenticates the caller
with the session cookie or the user certificate, checks the origin and parses bodies).

    POST /v1/access-requests                 {"roles": [...]} or {"app": NAME}, "reason", "ttl"
    GET  /v1/access-requests                 mine, and those I may review
    GET  /v1/access-requests/ID
    POST /v1/access-requests/ID/review       {"approve": true|false, "reason": "..."}
    POST /v1/access-requests/ID/certs        {"public_key": PEM, "ttl"?}: an elevated certificate
    POST /v1/sessions/assume                 {"request_id": ID}: the web session assumes it

Each method takes the authenticated caller and plain values and returns the JSON answer;
refusals are RequestError/AuthError with their status, rendered by the routes' one error
handler.
"""

from __future__ import annotations

from typing import Any

from cryptography import x509
from twisted.internet.interfaces import IReactorTime

from apptunnel.auth.access_requests import RequestError, request_json
from apptunnel.auth.callers import Caller
from apptunnel.auth.request_service import AccessRequestService
from apptunnel.web.fields import ttl_field

MIN_CERT_TTL = 1.0


def _roles_field(value: Any) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise RequestError(400, "roles must be a list of role names")
    return value


class AccessRequestApi:
    """The API's answers; ``sessions`` a SessionManager, ``ca`` the ClusterCA."""

    def __init__(self, service: AccessRequestService, sessions, ca, audit,
                 clock: IReactorTime) -> None:
        self._service = service
        self._sessions = sessions
        self._ca = ca
        self._audit = audit
        self._clock = clock

    def _json(self, request) -> dict:
        return request_json(request, self._clock.seconds())

    async def create(self, caller: Caller, body: dict) -> dict:
        app = body.get("app")
        if app is not None and (not isinstance(app, str) or not app or len(app) > 128):
            raise RequestError(400, "app must be an app's name")
        created = await self._service.create(caller, _roles_field(body.get("roles")), app,
                                             body.get("reason"), ttl_field(body.get("ttl")))
        return self._json(created)

    async def list(self, caller: Caller) -> dict:
        return {"requests": [self._json(r) for r in await self._service.list(caller)]}

    async def show(self, caller: Caller, request_id: str) -> dict:
        return self._json(await self._service.show(caller, request_id))

    async def review(self, caller: Caller, request_id: str, body: dict) -> dict:
        approve = body.get("approve")
        if not isinstance(approve, bool):
            raise RequestError(400, "approve must be true or false")
        return self._json(await self._service.review(caller, request_id, approve,
                                                     body.get("reason")))

    async def assume(self, caller: Caller, secret: str | None, body: dict) -> dict:
        """The web session behind ``secret`` assumes the caller's approved request."""
        request_id = body.get("request_id")
        if not isinstance(request_id, str):
            raise RequestError(400, "request_id (a string) is required")
        if secret is None or caller.method != "session":
            raise RequestError(400, "only a web session assumes a request here; the CLI "
                                    "runs `apptunnel login --request-id ID`")
        request = await self._service.assumable(caller, request_id)
        web = await self._sessions.assume(secret, request.id)
        if web is None:
            raise RequestError(401, "sign in required")
        self._service.assumed(caller, request, "web session")
        return {"user": web.user, "roles": list(dict.fromkeys((*web.roles, *request.roles))),
                "requests": list(web.requests), "elevated_until": request.expires}

    async def certificate(self, caller: Caller, request_id: str, public_key: bytes,
                          wanted: float | None, client: str) -> dict:
        """A certificate for the caller's own key naming the request, valid as long as the
        caller's credential (so a certificate never renews itself past its own end). The
        request's roles count only while it is approved and unexpired (auth/access.py):
        when the elevation ends the certificate keeps the user's own roles, so the user
        is not logged out."""
        request = await self._service.assumable(caller, request_id)
        now = self._clock.seconds()
        ttl = caller.expires - now
        if wanted is not None:
            ttl = min(ttl, wanted)
        if ttl < MIN_CERT_TTL:
            raise RequestError(409, "the request or your login ends too soon; log in again")
        requests = tuple(dict.fromkeys((*caller.requests, request.id)))
        roles = tuple(dict.fromkeys((*caller.roles, *request.roles)))
        cert_pem = self._ca.issue_user_cert(public_key, caller.user, roles, caller.traits,
                                            ttl, requests=requests)
        self._audit.emit("cert.issue", actor=caller.user, target=caller.user, user=caller.user,
                         ttl=round(ttl, 3), request=request.id, client=client)
        self._service.assumed(caller, request, "certificate")
        expires = x509.load_pem_x509_certificate(cert_pem).not_valid_after_utc.timestamp()
        return {"cert": cert_pem.decode("ascii"), "ca": self._ca.cert_pem.decode("ascii"),
                "issuer": self._ca.user_issuer_pem.decode("ascii"),
                "expires": expires, "user": caller.user, "roles": list(roles),
                "request_id": request.id}
