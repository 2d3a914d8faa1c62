"""Sign-in with an OpenID Connect provider: the authorization code flow with PKCE.

Each flow (`Flows`) is kept server-side, in storage (any proxy or worker may take the
callback), under the hash of its random ``state``: the connector,
the ``nonce``, the PKCE verifier, where the user goes afterwards and the hash of a random
*binding* the browser holds in a host-only cookie. A callback is accepted once (the flow
is taken out before anything else), within ``FLOW_TTL``, and only from the browser that
started it (the binding), so a callback URL handed to someone else signs nobody in.

The id_token is verified here, never trusted: the algorithm must be an asymmetric one
(``none`` and ``HS*`` are refused: an HMAC "signature" keyed with a public key or the
client secret proves nothing about the provider), the signature against the provider's
JWKS (fetched, cached and refetched for an unknown ``kid`` by `JwksCache`), ``iss`` equal
to the connector's ``issuer_url``, ``aud`` holding our ``client_id`` (and ``azp`` ours
when there are several), ``exp`` in the future by the reactor's clock, ``nonce`` the
flow's. The provider is found by discovery (``/.well-known/openid-configuration``,
cached for ``DISCOVERY_TTL``), over treq with ``ca_file`` as the only trust root when set.

The CLI (``apptunnel login --auth NAME``) starts the same flow with a loopback port, its
own state and a PKCE-like challenge; at the end the browser is sent to
``http://127.0.0.1:PORT/callback`` with a one-time code
the CLI exchanges, with the verifier only it knows, for its certificate (the one store
of those codes, shared with SAML, is `auth/connectors/cli_codes.py`).
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode, urlsplit

import attrs
import jwt
from treq import collect
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from apptunnel.auth.connectors.cli_codes import (  # noqa: F401 - CliCodes re-exported
    CliCodes, CliReturn, digest, random_token, same_secret)
from apptunnel.auth.connectors.signin import ExternalIdentity, ExternalSignIn, audit_login
from apptunnel.auth.connectors.specs import OidcSpec
from apptunnel.auth.errors import AuthError
from apptunnel.auth.names import USER_NAME
from apptunnel.auth.signin_states import SignInStates
from apptunnel.auth.throttle import LoginThrottle, Throttled
from apptunnel.jwks import JwksCache, JwksError

if TYPE_CHECKING:
    from apptunnel.audit import AuditLog
    from apptunnel.auth.connectors.store import ConnectorStore
    from apptunnel.backend.records import User

FLOW_TTL = 600.0            # from the button to the callback
MAX_FLOWS = 10_000
DISCOVERY_TTL = 300.0
HTTP_TIMEOUT = 10.0
MAX_BODY = 256 * 1024
LEEWAY = 60.0               # clock skew allowed on exp and iat
MAX_PARAM = 2048
ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384",
              "ES512", "EdDSA")
# Claims about the token itself, not the user: not traits.
TOKEN_CLAIMS = frozenset({"iss", "aud", "exp", "iat", "nbf", "nonce", "at_hash", "c_hash",
                          "azp", "auth_time", "sid", "jti", "acr", "amr", "s_hash"})
SIGN_IN_FAILED = "the sign-in with {connector} could not be completed; start it again"


class OidcError(Exception):
    """The provider's answer or token is not acceptable; the message says why (for logs)."""


# -- pure parts ---------------------------------------------------------------------------


@attrs.frozen
class Flow:
    connector: str
    nonce: str
    verifier: str
    binding: str                  # digest of the browser's cookie
    next: str
    cli: CliReturn | None
    expires: float


class Flows:
    """Flows by state, in storage (auth/signin_states.py: the callback may reach another
    proxy or worker than the start): bounded (oldest first out), each taken at most once,
    until expiry."""

    def __init__(self, backend, clock: IReactorTime, max_flows: int = MAX_FLOWS) -> None:
        self._clock = clock
        self._states = SignInStates(backend, clock, "oidc", max_flows)

    async def put(self, state: str, flow: Flow) -> None:
        body = attrs.asdict(flow, recurse=False)
        body["cli"] = flow.cli.text() if flow.cli is not None else ""
        await self._states.put(state, body, flow.expires - self._clock.seconds())

    async def take(self, state: str) -> Flow | None:
        """The flow of ``state`` if it is live; it is gone afterwards either way."""
        body = await self._states.take(state)
        if body is None:
            return None
        try:
            return Flow(**{**body, "cli": CliReturn.from_text(body["cli"])})
        except (KeyError, TypeError):    # a row this version did not write: not a flow
            return None


def authorization_url(endpoint: str, spec: OidcSpec, state: str, nonce: str,
                      verifier: str) -> str:
    query = urlencode({
        "response_type": "code", "client_id": spec.client_id,
        "redirect_uri": spec.redirect_url, "scope": " ".join(spec.scope),
        "state": state, "nonce": nonce,
        "code_challenge": digest(verifier), "code_challenge_method": "S256",
    })
    return f"{endpoint}{'&' if '?' in endpoint else '?'}{query}"


def token_header(token: str) -> tuple[str, str]:
    """(alg, kid) of an id_token, refusing algorithms that prove nothing."""
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as err:
        raise OidcError(f"the id_token is not a JWT: {err}") from None
    alg, kid = header.get("alg"), header.get("kid")
    if alg not in ALGORITHMS:
        raise OidcError(f"the id_token's algorithm {alg!r} is not accepted")
    if not isinstance(kid, str) or not kid:
        raise OidcError("the id_token names no key (kid)")
    return alg, kid


def check_id_token(token: str, key: Any, alg: str, spec: OidcSpec, nonce: str,
                   now: float) -> dict:
    """The id_token's claims if signed by ``key`` and meant for us now; OidcError if not."""
    try:
        claims = jwt.decode(token, key, algorithms=[alg], audience=spec.client_id,
                            issuer=spec.issuer_url,
                            options={"verify_exp": False, "verify_iat": False,
                                     "verify_nbf": False,
                                     "require": ["iss", "aud", "exp", "iat", "sub", "nonce"]})
    except jwt.PyJWTError as err:
        raise OidcError(f"the id_token was refused: {err}") from None
    exp, iat = claims.get("exp"), claims.get("iat")
    if not isinstance(exp, (int, float)) or exp + LEEWAY <= now:
        raise OidcError("the id_token has expired")
    if not isinstance(iat, (int, float)) or iat - LEEWAY > now:
        raise OidcError("the id_token was issued in the future")
    aud = claims.get("aud")
    if isinstance(aud, list) and len(aud) > 1 and claims.get("azp") != spec.client_id:
        raise OidcError("the id_token is for several audiences and azp is not ours")
    if not isinstance(claims.get("nonce"), str) or \
            not hmac.compare_digest(claims["nonce"].encode(), nonce.encode()):
        raise OidcError("the id_token's nonce is not this sign-in's")
    if not isinstance(claims.get("sub"), str) or not claims["sub"]:
        raise OidcError("the id_token has no subject")
    return claims


def user_claims(claims: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    """Claims about the user as tuples of strings (lists kept, scalars as text)."""
    out: dict[str, tuple[str, ...]] = {}
    for name, value in claims.items():
        if name in TOKEN_CLAIMS:
            continue
        values = value if isinstance(value, list) else [value]
        text = tuple(str(v).lower() if isinstance(v, bool) else str(v) for v in values
                     if isinstance(v, (str, int, float, bool)))
        if text:
            out[name] = text
    return out


def username_of(spec: OidcSpec, claims: Mapping[str, tuple[str, ...]]) -> str:
    """``username_claim``'s single value (default ``email``, else ``sub``); OidcError if it
    is missing or not a valid user name."""
    if spec.username_claim is not None:
        values = claims.get(spec.username_claim, ())
    else:
        values = claims.get("email") or claims.get("sub", ())
        if claims.get("email") and claims.get("email_verified") == ("false",):
            raise OidcError("the provider says the email address is not verified")
    if len(values) != 1 or not USER_NAME.match(values[0]):
        raise OidcError(f"no usable user name in claim {spec.username_claim or 'email/sub'}")
    return values[0]


def needs_userinfo(spec: OidcSpec, claims: Mapping[str, Any]) -> bool:
    """Whether a claim the connector uses is missing from the id_token."""
    wanted = {rule.claim for rule in spec.claims_to_roles}
    wanted.add(spec.username_claim or "email")
    return any(name not in claims for name in wanted)


# -- I/O: the provider ---------------------------------------------------------------------


@attrs.frozen
class Provider:
    authorization_endpoint: str
    token_endpoint: str
    userinfo_endpoint: str | None
    jwks: JwksCache
    fetched: float


def _endpoint(doc: dict, key: str, spec: OidcSpec, required: bool = True) -> str | None:
    value = doc.get(key)
    if value is None and not required:
        return None
    parts = urlsplit(value) if isinstance(value, str) else None
    issuer = urlsplit(spec.issuer_url)
    if parts is None or parts.scheme not in ("https", "http") or not parts.hostname or \
            (parts.scheme == "http" and issuer.scheme != "http"):
        raise OidcError(f"discovery: {key} is missing or not an http(s) URL")
    return value


async def read_json(response, what: str) -> dict:
    """A bounded JSON object from a treq response; OidcError otherwise."""
    parts: list[bytes] = []
    size = [0]

    def gather(data: bytes) -> None:
        size[0] += len(data)
        if size[0] > MAX_BODY:
            raise OidcError(f"{what}: answer larger than {MAX_BODY} bytes")
        parts.append(data)

    await collect(response, gather)
    try:
        doc = json.loads(b"".join(parts))
    except (ValueError, UnicodeDecodeError):
        raise OidcError(f"{what}: not JSON (HTTP {response.code})") from None
    if not isinstance(doc, dict):
        raise OidcError(f"{what}: not a JSON object")
    return doc


def read_client_secret(spec: OidcSpec) -> str:
    if spec.client_secret is not None:
        return spec.client_secret
    try:
        with open(spec.client_secret_file, encoding="utf-8") as f:
            text = f.read(4096)
    except (OSError, UnicodeDecodeError) as err:
        raise OidcError(f"cannot read client_secret_file {spec.client_secret_file}: "
                        f"{getattr(err, 'strerror', None) or err}") from None
    text = text[:-1] if text.endswith("\n") else text
    if not text:
        raise OidcError(f"client_secret_file {spec.client_secret_file} is empty")
    return text


# -- the reactor side -----------------------------------------------------------------------


@attrs.frozen
class Finished:
    user: User
    flow: Flow


class OidcSignIn:
    """Starts flows, finishes callbacks (throttled per address, each audited), and hands
    the CLI its one-time code."""

    _log = Logger()

    def __init__(self, *, connectors: ConnectorStore, signin: ExternalSignIn,
                 throttle: LoginThrottle, audit: AuditLog, clock: IReactorTime,
                 http_for: Callable[[str | None], Any], backend) -> None:
        self._connectors = connectors
        self._signin = signin
        self._throttle = throttle
        self._audit = audit
        self._clock = clock
        self._http_for = http_for       # ca_file (or None) -> a treq HTTPClient
        self._flows = Flows(backend, clock)
        self._providers: dict[tuple[str, str, str | None], Provider] = {}

    async def start(self, name: str, target: str, cli: CliReturn | None
                    ) -> tuple[str, str] | None:
        """(the provider URL to send the browser to, the binding for its cookie); None
        when there is no OIDC connector of that name. AuthError 503 if the provider's
        discovery fails."""
        spec = await self._connectors.oidc(name)
        if spec is None:
            return None
        provider = await self._provider(spec)
        state, nonce, verifier, binding = (random_token() for _ in range(4))
        await self._flows.put(state, Flow(spec.name, nonce, verifier, digest(binding), target, cli,
                                    self._clock.seconds() + FLOW_TTL))
        return authorization_url(provider.authorization_endpoint, spec, state, nonce,
                                 verifier), binding

    async def finish(self, state: str | None, code: str | None, error: str | None,
                     binding: str | None, address: str, client: str) -> Finished:
        """The signed-in user and the flow's details; AuthError (400 wrong/used state,
        401 refused token, 403 no role, 429 throttled, 503 provider down), each audited."""
        key = f"oidc-callback:{digest(state or '')}"
        try:
            self._throttle.attempt(key, address, self._clock.seconds())
        except Throttled as err:
            audit_login(self._audit, "", "oidc", "", client, err.reason)
            raise
        flow = await self._flows.take(state) if state and len(state) <= MAX_PARAM else None
        if flow is None:
            audit_login(self._audit, "", "oidc", "", client, "unknown or used state")
            raise AuthError(400, "this sign-in link is unknown, used or expired; start the "
                                 "sign-in again")
        connector = flow.connector
        if not same_secret(binding, flow.binding):
            audit_login(self._audit, "", "oidc", connector, client, "wrong browser")
            raise AuthError(400, "this sign-in was started in another browser; start it again")
        if error or not code or len(code) > MAX_PARAM:
            audit_login(self._audit, "", "oidc", connector, client,
                        f"provider error: {str(error)[:64]}" if error else "no code")
            raise AuthError(401, f"{connector} did not sign you in"
                                 f"{': ' + str(error)[:64] if error else ''}")
        spec = await self._connectors.oidc(connector)
        if spec is None:
            audit_login(self._audit, "", "oidc", connector, client, "unknown connector")
            raise AuthError(400, f"no OIDC connector named {connector!r}")
        try:
            identity = await self._identity(spec, flow, code)
        except OidcError as err:
            self._log.warn("OIDC connector {name}: sign-in refused: {why}", name=spec.name,
                           why=str(err))
            audit_login(self._audit, "", "oidc", connector, client, str(err)[:200])
            raise AuthError(401, SIGN_IN_FAILED.format(connector=connector)) from None
        except AuthError:
            raise
        except Exception as err:  # noqa: BLE001 - the provider is down or slow: one line
            self._log.warn("OIDC connector {name}: provider unavailable: {why}",
                           name=spec.name, why=str(err)[:300] or type(err).__name__)
            self._throttle.abandoned(key, address)
            audit_login(self._audit, "", "oidc", connector, client, "provider unavailable")
            raise AuthError(503, f"the identity provider {connector} is not answering; "
                                 "try again later") from None
        self._throttle.succeeded(key, address)
        user = await self._signin.sign_in(identity, spec.claims_to_roles, client)
        return Finished(user, flow)

    async def _identity(self, spec: OidcSpec, flow: Flow, code: str) -> ExternalIdentity:
        provider = await self._provider(spec)
        http = self._http_for(spec.ca_file)
        response = await http.post(
            provider.token_endpoint, auth=(spec.client_id, read_client_secret(spec)),
            data={"grant_type": "authorization_code", "code": code,
                  "redirect_uri": spec.redirect_url, "code_verifier": flow.verifier},
            headers={"Accept": ["application/json"]}, timeout=HTTP_TIMEOUT)
        answer = await read_json(response, "token endpoint")
        if response.code != 200:
            raise OidcError(f"token endpoint: HTTP {response.code} "
                            f"{str(answer.get('error'))[:64]}")
        token = answer.get("id_token")
        if not isinstance(token, str) or len(token) > MAX_BODY:
            raise OidcError("token endpoint: no id_token")
        alg, kid = token_header(token)
        try:
            key = await provider.jwks.key(kid)
        except JwksError as err:
            raise OidcError(f"JWKS: {err}") from None
        claims = check_id_token(token, key.key, alg, spec, flow.nonce, self._clock.seconds())
        if needs_userinfo(spec, claims) and provider.userinfo_endpoint and \
                isinstance(answer.get("access_token"), str):
            claims = {**await self._userinfo(provider, spec, answer["access_token"], claims),
                      **claims}
        values = user_claims(claims)
        return ExternalIdentity(spec.name, "oidc", username_of(spec, values), values)

    async def _userinfo(self, provider: Provider, spec: OidcSpec, access_token: str,
                        claims: dict) -> dict:
        http = self._http_for(spec.ca_file)
        response = await http.get(provider.userinfo_endpoint, timeout=HTTP_TIMEOUT,
                                  headers={"Authorization": [f"Bearer {access_token}"],
                                           "Accept": ["application/json"]})
        info = await read_json(response, "userinfo")
        if response.code != 200 or info.get("sub") != claims["sub"]:
            raise OidcError("userinfo: refused, or about another subject")
        return info

    async def _provider(self, spec: OidcSpec) -> Provider:
        """The provider's endpoints from discovery, cached for DISCOVERY_TTL."""
        cache_key = (spec.name, spec.issuer_url, spec.ca_file)
        cached = self._providers.get(cache_key)
        now = self._clock.seconds()
        if cached is not None and now - cached.fetched < DISCOVERY_TTL:
            return cached
        url = spec.issuer_url.rstrip("/") + "/.well-known/openid-configuration"
        http = self._http_for(spec.ca_file)
        try:
            response = await http.get(url, timeout=HTTP_TIMEOUT,
                                      headers={"Accept": ["application/json"]})
            doc = await read_json(response, "discovery")
            if response.code != 200:
                raise OidcError(f"discovery: HTTP {response.code}")
            if doc.get("issuer") != spec.issuer_url:
                raise OidcError(f"discovery: issuer is {str(doc.get('issuer'))[:200]!r}, "
                                f"not the connector's issuer_url")
            provider = Provider(
                _endpoint(doc, "authorization_endpoint", spec),
                _endpoint(doc, "token_endpoint", spec),
                _endpoint(doc, "userinfo_endpoint", spec, required=False),
                cached.jwks if cached is not None else
                JwksCache(http, _endpoint(doc, "jwks_uri", spec), self._clock),
                now)
        except Exception as err:  # noqa: BLE001 - any failure: one line, a 503
            if cached is not None:
                return cached           # keep the last known endpoints while it is down
            self._log.warn("OIDC connector {name}: discovery at {url} failed: {why}",
                           name=spec.name, url=url, why=str(err)[:300] or type(err).__name__)
            raise AuthError(503, f"the identity provider {spec.name} is not answering; "
                                 "try again later") from None
        self._providers[cache_key] = provider
        return provider


def http_clients(reactor) -> Callable[[str | None], Any]:
    """ca_file (or None: the system trust store) -> a treq client, one per CA file. The
    CA file is read once, when a connector naming it is first used."""
    from treq.client import HTTPClient
    from twisted.internet.ssl import Certificate
    from twisted.web.client import Agent, BrowserLikePolicyForHTTPS

    clients: dict[str | None, Any] = {}

    def client(ca_file: str | None):
        if ca_file not in clients:
            policy = BrowserLikePolicyForHTTPS()
            if ca_file is not None:
                try:
                    with open(ca_file, "rb") as f:
                        policy = BrowserLikePolicyForHTTPS(Certificate.loadPEM(f.read()))
                except (OSError, ValueError) as err:
                    raise OidcError(f"cannot read ca_file {ca_file}: {err}") from None
            clients[ca_file] = HTTPClient(Agent(reactor, contextFactory=policy))
        return clients[ca_file]

    return client
