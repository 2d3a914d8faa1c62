"""Certificates: the CLI's login certificate, per-session MFA's one-app certificate, and
the bots' join and renewal (decisions: auth/ca.py, auth/access.py, web/bots.py).

    POST /v1/certs, POST /v1/certs/app, POST /v1/bots/join, POST /v1/bots/renew
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cryptography import x509
from klein import Klein

from apptunnel.auth.access import Allow, Deny, Facts, NeedsMore
from apptunnel.auth.callers import Caller, caller_from_session
from apptunnel.auth.errors import AuthError
from apptunnel.auth.mfa import ENROLL_FIRST, given_factors
from apptunnel.web.context import Routes
from apptunnel.web.fields import public_key_field, ttl_field
from apptunnel.web.http import (
    WebError,
    client,
    client_host,
    json_body,
    json_response,
    tls_transport,
)
from apptunnel.web.sign_in import LOGIN_FAILED, connector_field

if TYPE_CHECKING:
    from apptunnel.auth.mfa import SecondFactors
    from apptunnel.web.bots import BotRoutes
    from apptunnel.web.context import WebContext
    from apptunnel.web.sign_in import SignIn

# The shortest user certificate we issue: shorter ones would expire before the CLI used them.
MIN_CERT_TTL = 1.0
SESSION_MFA_CERT_TTL = 60.0   # a one-app MFA certificate starts sessions for a minute


class CertRoutes(Routes):
    app = Klein()
    app.handle_errors(Routes.on_error)

    def __init__(self, ctx: WebContext, sign_in: SignIn, factors: SecondFactors | None,
                 bots: BotRoutes | None) -> None:
        super().__init__(ctx)
        self._sign_in = sign_in
        self._factors = factors
        self._bots = bots               # bots' join and renewal (web/bots.py)

    @app.route("/v1/certs", methods=["POST"])
    async def api_certs(self, request):
        """A short-lived user certificate for the caller's own public key (the CLI's login).

        Authenticated by username/password in the body or else by the web-session cookie,
        never by a certificate: a certificate must not be able to renew itself forever.
        """
        ctx, sign_in = self.ctx, self._sign_in
        ctx.refuse_cross_origin(request)
        body = json_body(request)
        public_key = public_key_field(body.get("public_key"))
        wanted = ttl_field(body.get("ttl"))
        username, password = body.get("username"), body.get("password")
        now = ctx.clock.seconds()
        if body.get("sso_code") is not None:
            user = await sign_in.redeem_sso_code(request, body)
            caller = Caller(user.name, tuple(user.roles), dict(user.traits), "sso", "",
                            now + ctx.config.session_ttl)
            limit = ctx.config.session_ttl
        elif username is not None or password is not None:
            if not isinstance(username, str) or not isinstance(password, str):
                raise WebError(400, "username and password must be strings")
            connector = connector_field(body)
            if connector is not None:
                # A connector's users prove themselves to their directory; second factors
                # are for local accounts (their devices live here).
                user = await sign_in.check_connector(request, connector, username, password)
            else:
                user = await sign_in.check_password(request, username, password)
                await sign_in.full_sign_in(request, user.name, given_factors(body))
            caller = Caller(user.name, tuple(user.roles), dict(user.traits), "password", "",
                            now + ctx.config.session_ttl)
            limit = ctx.config.session_ttl
        else:
            _, web = await ctx.web_session(request)
            if web is None:
                raise AuthError(401, LOGIN_FAILED)
            if web.enroll_only:
                raise AuthError(403, ENROLL_FIRST)
            caller = caller_from_session(web)
            limit = web.expires - now  # a certificate never outlives the session behind it
        caller = await ctx.acting(caller, "certificate")
        role_set = await ctx.roles.role_set(caller.roles)
        ttl = min(limit, role_set.max_session_ttl(ctx.config.session_ttl))
        if wanted is not None:
            ttl = min(ttl, wanted)
        if ttl < MIN_CERT_TTL:
            raise AuthError(401, LOGIN_FAILED)
        cert_pem = ctx.ca.issue_user_cert(public_key, caller.user, caller.roles,
                                          caller.traits, ttl)
        ctx.audit.emit("cert.issue", actor=caller.user, target=caller.user, user=caller.user,
                       ttl=round(ttl, 3), client=client(request))
        expires = x509.load_pem_x509_certificate(cert_pem).not_valid_after_utc.timestamp()
        return json_response(request, 200, {
            "cert": cert_pem.decode("ascii"),
            "ca": ctx.ca.cert_pem.decode("ascii"),
            "issuer": ctx.ca.user_issuer_pem.decode("ascii"),
            "trusted_cas": list(ctx.ca.host_trust()),
            "expires": expires,
            "user": caller.user,
            "roles": list(caller.roles),
        })

    @app.route("/v1/certs/app", methods=["POST"])
    async def api_app_cert(self, request):
        """Per-session MFA for ``apptunnel proxy app``: after a fresh factor, a certificate
        for the caller's own key bound to one app, valid a minute to START sessions
        (sessions it starts may run until the caller's credential ends).

        Authenticated by a web session or the user certificate of the connection (a
        one-app certificate cannot ask: it opens its app and nothing else).
        """
        ctx = self.ctx
        ctx.refuse_cross_origin(request)
        if self._factors is None:
            raise WebError(404)
        body = json_body(request)
        public_key = public_key_field(body.get("public_key"))
        ttl_field(body.get("ttl"))               # a bad one fails before the factor
        name = body.get("app")
        if not isinstance(name, str) or not name:
            raise WebError(400, "app (a string) is required")
        caller = await ctx.caller(request)
        if caller is None:
            raise WebError(401, "sign in required")
        caller = await ctx.acting(caller, "mfa certificate")   # roles held now
        app = ctx.registry.app(name)
        if app is None:
            raise WebError(404, f"no app named {name!r}")
        now = ctx.clock.seconds()
        decision = await ctx.access.decide(caller, app, Facts(client_ip=client(request),
                                                              where="mfa certificate"), now)
        if isinstance(decision, Allow):
            raise WebError(400, f"{name} does not ask for a second factor")
        if not isinstance(decision, NeedsMore) or decision.kind != "mfa":
            message = decision.message if isinstance(decision, Deny) else ""
            raise WebError(403, message or f"you are not allowed to use {name}")
        await self._factors.check_session(caller.user, app.name, given_factors(body),
                                          client_host(request))
        ttl = min(SESSION_MFA_CERT_TTL, caller.expires - now)
        wanted = ttl_field(body.get("ttl"))      # may only shorten the minute
        if wanted is not None:
            ttl = min(ttl, wanted)
        if ttl < MIN_CERT_TTL:
            raise AuthError(401, LOGIN_FAILED)
        cert_pem = ctx.ca.issue_user_cert(public_key, caller.user, caller.roles,
                                          caller.traits, ttl, mfa_app=app.name,
                                          sessions_until=caller.expires)
        ctx.audit.emit("cert.issue", actor=caller.user, target=caller.user, user=caller.user,
                       ttl=round(ttl, 3), app=app.name, mfa=True, client=client(request))
        expires = x509.load_pem_x509_certificate(cert_pem).not_valid_after_utc.timestamp()
        return json_response(request, 200, {"cert": cert_pem.decode("ascii"),
                                            "expires": expires, "app": app.name,
                                            "user": caller.user})

    @app.route("/v1/bots/join", methods=["POST"])
    async def bot_join(self, request):
        if self._bots is None:
            raise WebError(404)
        return json_response(request, 200,
                             await self._bots.join(json_body(request), client(request)))

    @app.route("/v1/bots/renew", methods=["POST"])
    async def bot_renew(self, request):
        if self._bots is None:
            raise WebError(404)
        return json_response(request, 200, await self._bots.renew(
            json_body(request), tls_transport(request), client(request)))
