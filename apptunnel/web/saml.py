"""The SAML connector's HTTP side: SP metadata, the start of a sign-in, the ACS.

`WebApp` (web/routes.py) owns the routes and calls these; the decisions are
`auth/connectors/saml.SamlSignIn`'s. The request id rides in a ``__Host-`` cookie of the
browser that started the sign-in: the ACS answers only that browser's own request (a
response obtained by someone else cannot be pushed into a victim's browser). The IdP
posts to the ACS from its own site, so this one cookie is ``SameSite=None``; it holds no
secret of the user's (the id is in the AuthnRequest URL anyway) and dies with the flow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from apptunnel.auth.connectors.cli_codes import CliReturn
    from apptunnel.auth.connectors.saml import SamlSignIn
    from apptunnel.backend.records import User

REQUEST_COOKIE = "__Host-apptunnel_saml"
MAX_FORM_FIELD = 300 * 1024


class SamlWeb:
    """HTTP in and out for `SamlSignIn`: cookies, form fields, content types."""

    def __init__(self, saml: SamlSignIn) -> None:
        self._saml = saml

    async def metadata(self, request, name: str, address: str) -> bytes:
        xml = await self._saml.metadata(name, address)
        request.setHeader(b"Content-Type", b"application/samlmetadata+xml")
        return xml.encode("utf-8")

    async def start(self, request, name: str, target: str, address: str,
                    cli: CliReturn | None = None) -> bytes:
        """Redirect (HTTP-Redirect binding) to the IdP with a new request; remember it
        (and where the CLI waits, when ``apptunnel login --auth`` started it)."""
        request_id, location = await self._saml.start(name, target, address, cli)
        _set_request_cookie(request, request_id, 600)
        request.setResponseCode(302)
        request.setHeader(b"Location", location.encode("utf-8"))
        return b""

    async def acs(self, request, name: str, address: str, client: str
                  ) -> tuple[User, str, CliReturn | None]:
        """The signed-in user, their target and where the CLI waits (if it started the
        sign-in); the request cookie is spent either way."""
        response = _field(request, "SAMLResponse")
        raw = request.getCookie(REQUEST_COOKIE.encode("ascii"))
        request_id = raw.decode("ascii", "replace") if raw and len(raw) <= 128 else None
        _set_request_cookie(request, "", 0)
        return await self._saml.acs(name, response, request_id, address, client)


def _field(request, name: str) -> str | None:
    values = request.args.get(name.encode("ascii"))
    if not values or len(values[0]) > MAX_FORM_FIELD:
        return None
    return values[0].decode("ascii", "replace")


def _set_request_cookie(request, value: str, max_age: int) -> None:
    request.responseHeaders.addRawHeader(
        b"Set-Cookie",
        f"{REQUEST_COOKIE}={value}; Path=/; Secure; HttpOnly; SameSite=None; "
        f"Max-Age={max_age}".encode("ascii"),
    )
