"""The signed-in user's own account: the account page, second-factor devices and their
JSON API.

    GET /web/account
    POST /web/account/totp, /web/account/webauthn, /web/account/devices/remove
    POST /web/account/sessions/end          sign out everywhere
    GET/POST /v1/mfa/devices, DELETE /v1/mfa/devices/NAME, POST /v1/mfa/totp
    GET /v1/account                         who I am, my roles, traits and web sessions
    DELETE /v1/sessions/all                 sign out everywhere
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import segno
from klein import Klein

from apptunnel.auth.errors import AuthError
from apptunnel.web.context import Routes
from apptunnel.web.http import (
    WebError,
    arg,
    client,
    json_body,
    json_response,
    no_content,
    redirect,
    script_json,
    set_session_cookie,
)

if TYPE_CHECKING:
    from apptunnel.auth.mfa import SecondFactors
    from apptunnel.backend.records import WebSession
    from apptunnel.web.context import WebContext
    from apptunnel.web.sign_in import SignIn

ACCOUNT_LOGIN = "/web/login?next=%2Fweb%2Faccount"


def when(epoch: float) -> str:
    """A UTC time as the account page shows it."""
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(epoch))


def session_rows(sessions, current: str | None) -> list[dict]:
    """The account page's "my sessions": a short id (of the hash, never the secret),
    times, and which one is this browser."""
    return [{"id": s.id_hash[:12], "created": s.created, "expires": s.expires,
             "current": s.id_hash == current} for s in sessions]


def qr_svg(text: str) -> str:
    """The QR code of ``text`` as inline SVG (made here: no third party sees the secret)."""
    return segno.make(text, error="m").svg_inline(scale=4)


class AccountRoutes(Routes):
    app = Klein()
    app.handle_errors(Routes.on_error)

    def __init__(self, ctx: WebContext, sign_in: SignIn, factors: SecondFactors | None
                 ) -> None:
        super().__init__(ctx)
        self._sign_in = sign_in
        self._factors = factors

    @app.route("/web/account", methods=["GET"])
    async def account_page(self, request):
        _, web = await self.ctx.web_session(request)
        if web is None:
            return redirect(request, 302, ACCOUNT_LOGIN)
        return await self._account_page(request, 200, web, None)

    @app.route("/web/account/totp", methods=["POST"])
    async def account_add_totp(self, request):
        return await self._add_device(request, lambda user: self._factors.add_totp(
            user, arg(request, "name"), arg(request, "secret"), arg(request, "otp")))

    @app.route("/web/account/webauthn", methods=["POST"])
    async def account_add_webauthn(self, request):
        """A security key registered by the account page's script (static/webauthn.js)."""
        return await self._add_device(request, lambda user: self._factors.add_webauthn(
            user, arg(request, "name"), arg(request, "webauthn")))

    async def _add_device(self, request, add) -> bytes:
        """Enroll a device with ``add(user)``; an enroll-only session becomes a full one."""
        self.ctx.require_same_origin(request)
        secret, web = await self.ctx.web_session(request)
        if web is None or self._factors is None:
            return redirect(request, 303, ACCOUNT_LOGIN)
        try:
            codes = await add(web.user)
        except AuthError as err:
            return await self._account_page(request, err.status, web, err.message)
        if web.enroll_only:
            # Password + the new device: the session becomes a full one.
            await self.ctx.sessions.end_web_session(secret)
            user = await self._sign_in.user(web.user)
            secret, web, ttl = await self._sign_in.open_web_session(request, user)
            set_session_cookie(request, secret, ttl)
        return await self._account_page(request, 200, web, None, codes)

    @app.route("/web/account/devices/remove", methods=["POST"])
    async def account_remove_device(self, request):
        self.ctx.require_same_origin(request)
        _, web = await self.ctx.web_session(request)
        if web is None or self._factors is None:
            return redirect(request, 303, ACCOUNT_LOGIN)
        try:
            await self._factors.remove(web.user, arg(request, "name") or "")
        except AuthError as err:
            return await self._account_page(request, err.status, web, err.message)
        return redirect(request, 303, "/web/account")

    async def _account_page(self, request, status: int, web: WebSession, error: str | None,
                            recovery_codes: list[str] | None = None) -> bytes:
        if self._factors is None:
            raise WebError(404)
        secret, uri = self._factors.new_totp(web.user)
        devices = await self._factors.devices(web.user)
        sessions = session_rows(await self.ctx.sessions.user_web_sessions(web.user),
                                web.id_hash)
        for row in sessions:
            row["created_text"], row["expires_text"] = when(row["created"]), when(row["expires"])
        return self.ctx.page(request, status, "account.html", {
            "user": web.user, "enroll_only": web.enroll_only, "error": error,
            "nav": "account", "extra_nav": await self.ctx.extra_nav(web),
            "roles": list(web.roles), "traits": sorted(web.traits.items()),
            "signed_in": when(web.created), "expires": when(web.expires),
            "sessions": sessions,
            "devices": [{"name": d.name, "type": d.kind,
                         "created": time.strftime("%Y-%m-%d", time.gmtime(d.created))}
                        for d in devices],
            "recovery_left": await self._factors.recovery_codes_left(web.user),
            "recovery_codes": recovery_codes or [],
            "totp_secret": secret, "totp_uri": uri, "qr_svg": qr_svg(uri),
            "webauthn_options": script_json(
                await self._factors.registration_options(web.user)),
            "next": "/",
        })

    @app.route("/web/account/sessions/end", methods=["POST"])
    async def sign_out_everywhere(self, request):
        """End every web session of the user (this one too) and their app sessions."""
        self.ctx.require_same_origin(request)
        _, web = await self.ctx.web_session(request)
        if web is None:
            return redirect(request, 303, "/web/login")
        await self._end_all(request, web.user)
        return redirect(request, 303, "/web/login")

    async def _end_all(self, request, user: str) -> int:
        count = await self.ctx.sessions.end_user_sessions(user)
        self.ctx.audit.emit("session.web.end", actor=user, client=client(request),
                            everywhere=True, sessions=count)
        set_session_cookie(request, "", 0)
        return count

    # -- JSON API ------------------------------------------------------------------------

    @app.route("/v1/account", methods=["GET"])
    async def api_account(self, request):
        """Who the caller is: user, roles, traits, how long the credential lasts, and the
        user's web sessions."""
        self.ctx.refuse_cross_origin(request)
        secret, web = await self.ctx.web_session(request)
        caller = await self.ctx.caller(request)
        if caller is None:
            raise WebError(401, "sign in required")
        current = web.id_hash if web is not None else None
        return json_response(request, 200, {
            "user": caller.user, "roles": list(caller.roles), "traits": caller.traits,
            "method": caller.method, "expires": caller.expires,
            "sessions": session_rows(await self.ctx.sessions.user_web_sessions(caller.user),
                                     current),
        })

    @app.route("/v1/sessions/all", methods=["DELETE"])
    async def api_sign_out_everywhere(self, request):
        caller = await self.ctx.signed_in(request, "sign out everywhere")
        count = await self._end_all(request, caller.user)
        return json_response(request, 200, {"ended": count})

    @app.route("/v1/mfa/devices", methods=["GET"])
    async def api_mfa_devices(self, request):
        user = await self._account_user(request)
        devices = await self._factors.devices(user)
        return json_response(request, 200, {
            "devices": [{"name": d.name, "type": d.kind, "created": d.created}
                        for d in devices],
            "recovery_codes_left": await self._factors.recovery_codes_left(user),
        })

    @app.route("/v1/mfa/totp", methods=["POST"])
    async def api_mfa_new_totp(self, request):
        """A fresh TOTP secret to enroll (nothing stored until a code confirms it)."""
        user = await self._account_user(request)
        secret, uri = self._factors.new_totp(user)
        return json_response(request, 200, {"secret": secret, "uri": uri})

    @app.route("/v1/mfa/devices", methods=["POST"])
    async def api_mfa_add(self, request):
        user = await self._account_user(request)
        body = json_body(request)
        if body.get("type") != "totp":
            raise WebError(400, "type must be totp")
        codes = await self._factors.add_totp(user, body.get("name"), body.get("secret"),
                                             body.get("otp"))
        return json_response(request, 200, {"name": body.get("name"), "type": "totp",
                                            "recovery_codes": codes})

    @app.route("/v1/mfa/devices/<string:name>", methods=["DELETE"])
    async def api_mfa_remove(self, request, name: str):
        user = await self._account_user(request)
        await self._factors.remove(user, name)
        return no_content(request)

    async def _account_user(self, request) -> str:
        """Who manages their devices: a web session (enroll-only included) or a user
        certificate; never a cross-origin request."""
        self.ctx.refuse_cross_origin(request)
        if self._factors is None:
            raise WebError(404)
        _, web = await self.ctx.web_session(request)
        if web is not None:
            return web.user
        caller = await self.ctx.caller(request)
        if caller is None:
            raise WebError(401, "sign in required")
        return caller.user
