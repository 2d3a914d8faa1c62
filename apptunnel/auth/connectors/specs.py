"""Connector documents (``kind: ldap | oidc | saml``): parsed and checked in full.

Teleport's shapes, so an operator who knows them recognises them. Parsing is strict: an
unknown key, a wrong type or a value that cannot work is a `ConnectorError` naming the
key (``spec.url: ...``), at ``apptunnel create -f`` time, never at a user's sign-in.

LDAP, OIDC and SAML sign users in: every kind this module parses has a working flow (an
option we parse is an option we enforce).

Secrets: ``bind_password_file`` and ``client_secret_file`` name files the proxy reads at
sign-in; an inline ``client_secret`` is stored but `public_doc` (what ``apptunnel get
connectors`` prints) shows it as ``****``.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any
from urllib.parse import urlsplit

import attrs
from ldap3.core.exceptions import LDAPException
from ldap3.operation.search import parse_filter

from apptunnel.auth.connectors.mapping import RoleRule, value_matcher
from apptunnel.auth.errors import AuthError
from apptunnel.auth.names import ROLE_NAME, TRAIT_NAME
from apptunnel.auth.rbac import RoleError, parse_duration
from apptunnel.net import is_ip

KINDS = ("ldap", "oidc", "saml")
CONNECTOR_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}\Z")
USERNAME_PLACEHOLDER = "{username}"
DEFAULT_TIMEOUT = 5.0
MAX_TIMEOUT = 60.0
GROUPS_TRAIT = "groups"
_ATTRIBUTE = re.compile(r"[A-Za-z][A-Za-z0-9-]{0,63}\Z")
_SECRET_KEYS = ("client_secret", "bind_password", "password", "secret")

OIDC_KEYS = ("issuer_url", "client_id", "client_secret", "client_secret_file", "redirect_url",
             "scope", "username_claim", "ca_file", "claims_to_roles")
OIDC_CALLBACK_PATH = "/v1/webapi/oidc/callback"
_CLAIM = re.compile(r"[A-Za-z0-9_:.-]{1,64}\Z")
_SCOPE = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]{1,64}\Z")   # RFC 6749 scope-token

SAML_KEYS = ("acs", "entity_descriptor_url", "entity_descriptor", "service_provider_issuer",
             "attributes_to_roles", "display")
MAX_ENTITY_DESCRIPTOR = 256 * 1024
# A SAML attribute name may be a URI (urn:oid:..., http://schemas.../claims/...).
_SAML_ATTRIBUTE = re.compile(r"[^\x00-\x20\x7f]{1,256}\Z")

LDAP_KEYS = ("url", "start_tls", "ca_file", "bind_dn", "bind_password_file",
             "user_search_base", "user_search_filter", "username_attribute",
             "groups_to_roles", "attributes_to_traits", "timeout")


class ConnectorError(AuthError):
    """A connector document is invalid; the message starts with the key of the problem."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(400, message)


@attrs.frozen
class LdapSpec:
    """An LDAP directory users sign in to with their password (search, then bind)."""

    name: str
    url: str
    host: str
    port: int
    use_ssl: bool                 # ldaps://
    start_tls: bool
    ca_file: str | None           # None: the system trust store
    bind_dn: str
    bind_password_file: str
    user_search_base: str
    user_search_filter: str       # with {username}, replaced by the escaped name
    username_attribute: str       # the entry's name for apptunnel (uid)
    groups_to_roles: tuple[RoleRule, ...]
    attributes_to_traits: tuple[tuple[str, str], ...]   # (LDAP attribute, trait)
    timeout: float

    kind = "ldap"
    rules_key = "groups_to_roles"

    @property
    def role_rules(self) -> tuple[RoleRule, ...]:
        return self.groups_to_roles

    @property
    def whole_seconds(self) -> int:
        """ldap3's socket timeouts must be whole seconds (a float breaks its struct.pack)."""
        return max(1, math.ceil(self.timeout))


@attrs.frozen
class OidcSpec:
    """An OpenID Connect provider users sign in at (authorization code flow with PKCE)."""

    name: str
    issuer_url: str               # exactly as the provider's discovery and tokens say it
    client_id: str
    client_secret: str | None     # inline, or else read from client_secret_file
    client_secret_file: str | None
    redirect_url: str
    scope: tuple[str, ...]        # always starts with openid
    username_claim: str | None    # None: email, else sub
    ca_file: str | None
    claims_to_roles: tuple[RoleRule, ...]

    kind = "oidc"
    rules_key = "claims_to_roles"

    @property
    def role_rules(self) -> tuple[RoleRule, ...]:
        return self.claims_to_roles


@attrs.frozen
class SamlSpec:
    """A SAML 2.0 identity provider users sign in at (SP-initiated, auth/connectors/saml.py).

    Exactly one of ``entity_descriptor_url`` (fetched by the proxy) and
    ``entity_descriptor`` (the IdP's metadata XML inline) is set.
    """

    name: str
    acs: str                       # https://PUBLIC_ADDR/v1/webapi/saml/acs/NAME
    entity_descriptor_url: str | None
    entity_descriptor: str | None
    service_provider_issuer: str   # our entity id; the audience the IdP must name
    attributes_to_roles: tuple[RoleRule, ...]
    display: str

    kind = "saml"
    rules_key = "attributes_to_roles"

    @property
    def role_rules(self) -> tuple[RoleRule, ...]:
        return self.attributes_to_roles


Connector = LdapSpec | OidcSpec | SamlSpec


def connector_name(doc: Any) -> str:
    """``metadata.name`` of a connector document; ConnectorError if it is not valid."""
    metadata = doc.get("metadata") if isinstance(doc, dict) else None
    if not isinstance(metadata, dict):
        raise ConnectorError("metadata: expected a mapping with a name")
    _keys("metadata.", metadata, ("name", "description"))
    name = metadata.get("name")
    if not isinstance(name, str) or not CONNECTOR_NAME.match(name):
        raise ConnectorError(f"metadata.name: invalid connector name {name!r} (lower-case "
                             "letters, digits and -, at most 63)")
    return name


def parse_connector(doc: Any) -> Connector:
    """The connector a document describes; ConnectorError naming the key otherwise."""
    if not isinstance(doc, dict):
        raise ConnectorError("expected a mapping with kind, metadata and spec")
    kind = doc.get("kind")
    if kind not in KINDS:
        raise ConnectorError(f"kind: expected one of {', '.join(KINDS)}, got {kind!r}")
    _keys("", doc, ("kind", "version", "metadata", "spec"))
    name = connector_name(doc)
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        raise ConnectorError("spec: expected a mapping")
    return {"ldap": _ldap, "oidc": _oidc, "saml": _saml}[kind](name, spec)


def public_doc(doc: dict) -> dict:
    """The document with every secret value replaced by ``****`` (paths to files stay)."""
    def scrub(value: Any, key: str = "") -> Any:
        if isinstance(value, dict):
            return {k: scrub(v, str(k)) for k, v in value.items()}
        if isinstance(value, list):
            return [scrub(v) for v in value]
        if key in _SECRET_KEYS and value is not None:
            return "****"
        return value
    return scrub(doc)


# -- oidc --------------------------------------------------------------------------------


def _oidc(name: str, spec: dict) -> OidcSpec:
    _keys("spec.", spec, OIDC_KEYS)
    issuer = _string(spec, "issuer_url")
    parts = urlsplit(issuer)
    if parts.scheme not in ("https", "http") or not parts.hostname or parts.query \
            or parts.fragment or parts.username:
        raise ConnectorError(f"spec.issuer_url: expected https://HOST[/PATH], got {issuer!r}")
    if parts.scheme == "http" and not _loopback(parts.hostname):
        raise ConnectorError("spec.issuer_url: http:// only for a loopback issuer (tokens "
                             "and the client secret would travel in clear text): use https://")
    client_id = _string(spec, "client_id")
    secret, secret_file = spec.get("client_secret"), spec.get("client_secret_file")
    if (secret is None) == (secret_file is None):
        raise ConnectorError("spec.client_secret: give client_secret or client_secret_file "
                             "(one of them)")
    if secret is not None:
        secret = _string(spec, "client_secret")
    else:
        secret_file = _absolute_path(spec, "client_secret_file")
    redirect = _string(spec, "redirect_url")
    target = urlsplit(redirect)
    if target.scheme != "https" or not target.hostname or target.path != OIDC_CALLBACK_PATH \
            or target.query or target.fragment:
        raise ConnectorError(f"spec.redirect_url: expected https://PUBLIC_ADDR"
                             f"{OIDC_CALLBACK_PATH}, got {redirect!r}")
    scope = spec.get("scope", [])
    if not isinstance(scope, list) or not all(isinstance(s, str) and _SCOPE.match(s)
                                              for s in scope):
        raise ConnectorError("spec.scope: expected a list of scope names, e.g. [email, groups]")
    username_claim = spec.get("username_claim")
    if username_claim is not None and (not isinstance(username_claim, str)
                                       or not _CLAIM.match(username_claim)):
        raise ConnectorError("spec.username_claim: expected a claim name, e.g. email")
    ca_file = spec.get("ca_file")
    if ca_file is not None:
        ca_file = _absolute_path(spec, "ca_file")
    return OidcSpec(
        name=name, issuer_url=issuer, client_id=client_id, client_secret=secret,
        client_secret_file=secret_file, redirect_url=redirect,
        scope=tuple(dict.fromkeys(["openid", *scope])), username_claim=username_claim,
        ca_file=ca_file,
        claims_to_roles=_claim_rules(spec.get("claims_to_roles"), "spec.claims_to_roles",
                                     "claim"),
    )


def _claim_rules(value: Any, path: str, name_key: str, pattern: re.Pattern = _CLAIM,
                 what: str = "a claim name") -> tuple[RoleRule, ...]:
    """``[{<name_key>: CLAIM, value: V, roles: [...]}]``: each rule names its own claim."""
    if not isinstance(value, list) or not value:
        raise ConnectorError(f"{path}: expected a list of {{{name_key}: ..., value: ..., "
                             "roles: [...]}} rules (without one, nobody would get a role)")
    rules = []
    for index, rule in enumerate(value):
        where = f"{path}[{index}]"
        claim = rule.get(name_key) if isinstance(rule, dict) else None
        if isinstance(rule, dict) and (not isinstance(claim, str) or not pattern.match(claim)):
            raise ConnectorError(f"{where}.{name_key}: expected {what}")
        rules.append(_rule(rule, where, "value", claim or "", extra=(name_key,)))
    return tuple(rules)


# -- saml --------------------------------------------------------------------------------


def _saml(name: str, spec: dict) -> SamlSpec:
    _keys("spec.", spec, SAML_KEYS)
    acs = _https_url(spec, "acs")
    if not urlsplit(acs).path.rstrip("/").endswith(f"/v1/webapi/saml/acs/{name}"):
        raise ConnectorError(f"spec.acs: must be https://PUBLIC_ADDR/v1/webapi/saml/acs/{name} "
                             "(where the proxy receives this connector's responses)")
    url = spec.get("entity_descriptor_url")
    xml = spec.get("entity_descriptor")
    if (url is None) == (xml is None):
        raise ConnectorError("spec.entity_descriptor_url: give exactly one of "
                             "entity_descriptor_url and entity_descriptor (the IdP's metadata)")
    if url is not None:
        url = _https_url(spec, "entity_descriptor_url")
    else:
        if not isinstance(xml, str) or "EntityDescriptor" not in xml:
            raise ConnectorError("spec.entity_descriptor: expected the IdP's metadata XML "
                                 "(an EntityDescriptor)")
        if len(xml) > MAX_ENTITY_DESCRIPTOR:
            raise ConnectorError(f"spec.entity_descriptor: larger than "
                                 f"{MAX_ENTITY_DESCRIPTOR // 1024} KiB")
    issuer = spec.get("service_provider_issuer", acs)
    if not isinstance(issuer, str) or not issuer.strip() or len(issuer) > 1024:
        raise ConnectorError("spec.service_provider_issuer: expected a non-empty string "
                             "(our entity id; default: the acs)")
    display = spec.get("display", name)
    if not isinstance(display, str) or not display.strip() or len(display) > 64:
        raise ConnectorError("spec.display: expected a short label for the sign-in button")
    return SamlSpec(
        name=name, acs=acs, entity_descriptor_url=url, entity_descriptor=xml,
        service_provider_issuer=issuer,
        attributes_to_roles=_claim_rules(spec.get("attributes_to_roles"),
                                         "spec.attributes_to_roles", "name", _SAML_ATTRIBUTE,
                                         "an attribute name"),
        display=display,
    )


def _https_url(spec: dict, key: str) -> str:
    """An https:// URL (http:// only for a loopback host, as in tests and demos)."""
    value = _string(spec, key)
    parts = urlsplit(value)
    try:
        parts.port
    except ValueError:
        raise ConnectorError(f"spec.{key}: invalid port in {value!r}") from None
    if not parts.hostname or parts.scheme not in ("https", "http") or parts.username \
            or parts.fragment:
        raise ConnectorError(f"spec.{key}: expected an https:// URL, got {value!r}")
    if parts.scheme == "http" and not _loopback(parts.hostname):
        raise ConnectorError(f"spec.{key}: must be https:// (http:// only for a loopback host)")
    return value


# -- ldap --------------------------------------------------------------------------------


def _ldap(name: str, spec: dict) -> LdapSpec:
    _keys("spec.", spec, LDAP_KEYS)
    url = _string(spec, "url")
    parts = urlsplit(url)
    if parts.scheme not in ("ldap", "ldaps") or not parts.hostname:
        raise ConnectorError(f"spec.url: expected ldaps://HOST[:PORT] or ldap://HOST[:PORT], "
                             f"got {url!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ConnectorError("spec.url: only scheme, host and port (the search base is "
                             "spec.user_search_base)")
    try:
        port = parts.port or (636 if parts.scheme == "ldaps" else 389)
    except ValueError:
        raise ConnectorError(f"spec.url: invalid port in {url!r}") from None
    start_tls = spec.get("start_tls", False)
    if not isinstance(start_tls, bool):
        raise ConnectorError("spec.start_tls: expected true or false")
    use_ssl = parts.scheme == "ldaps"
    if use_ssl and start_tls:
        raise ConnectorError("spec.start_tls: not with ldaps:// (it is TLS already)")
    if not use_ssl and not start_tls and not _loopback(parts.hostname):
        raise ConnectorError("spec.url: ldap:// sends passwords in clear text: use ldaps:// "
                             "or start_tls: true (plain ldap:// only for a loopback host)")
    ca_file = spec.get("ca_file")
    if ca_file is not None:
        ca_file = _absolute_path(spec, "ca_file")
    bind_dn = _string(spec, "bind_dn")
    password_file = _absolute_path(spec, "bind_password_file")
    base = _string(spec, "user_search_base")
    search = spec.get("user_search_filter", "(uid={username})")
    if not isinstance(search, str) or search.count(USERNAME_PLACEHOLDER) != 1:
        raise ConnectorError("spec.user_search_filter: expected an LDAP filter with "
                             "{username} once, e.g. \"(uid={username})\"")
    if not (search.startswith("(") and search.endswith(")")):
        raise ConnectorError("spec.user_search_filter: must be in parentheses")
    try:
        parse_filter(search.replace(USERNAME_PLACEHOLDER, "x"), None, True, True, None, False)
    except (LDAPException, TypeError, ValueError, IndexError):
        raise ConnectorError(f"spec.user_search_filter: not a valid LDAP filter: "
                             f"{search!r}") from None
    username_attribute = spec.get("username_attribute", "uid")
    if not isinstance(username_attribute, str) or not _ATTRIBUTE.match(username_attribute):
        raise ConnectorError("spec.username_attribute: expected an LDAP attribute name")
    return LdapSpec(
        name=name, url=url, host=parts.hostname, port=port, use_ssl=use_ssl,
        start_tls=start_tls, ca_file=ca_file, bind_dn=bind_dn,
        bind_password_file=password_file, user_search_base=base,
        user_search_filter=search, username_attribute=username_attribute,
        groups_to_roles=_role_rules(spec.get("groups_to_roles"), "spec.groups_to_roles",
                                    "group", GROUPS_TRAIT, dn=True),
        attributes_to_traits=_attribute_traits(spec.get("attributes_to_traits")),
        timeout=_timeout(spec.get("timeout", DEFAULT_TIMEOUT)),
    )


def _role_rules(value: Any, path: str, key: str, claim: str, dn: bool = False
                ) -> tuple[RoleRule, ...]:
    if not isinstance(value, list) or not value:
        raise ConnectorError(f"{path}: expected a list of {{{key}: ..., roles: [...]}} rules "
                             "(without one, nobody would get a role)")
    return tuple(_rule(rule, f"{path}[{index}]", key, claim, dn)
                 for index, rule in enumerate(value))


def _rule(rule: Any, where: str, key: str, claim: str, dn: bool = False,
          extra: tuple[str, ...] = ()) -> RoleRule:
    """One ``{key: VALUE, roles: [...]}`` rule granting roles when ``claim`` has VALUE."""
    if not isinstance(rule, dict):
        raise ConnectorError(f"{where}: expected a mapping with {', '.join(extra)}"
                             f"{', ' if extra else ''}{key} and roles")
    _keys(f"{where}.", rule, (*extra, key, "roles"))
    raw = rule.get(key)
    if not isinstance(raw, str) or not raw:
        raise ConnectorError(f"{where}.{key}: expected a non-empty string")
    try:
        matcher = value_matcher(raw, dn=dn)
    except ValueError as err:
        raise ConnectorError(f"{where}.{key}: {err}") from None
    roles = rule.get("roles")
    if not isinstance(roles, list) or not roles:
        raise ConnectorError(f"{where}.roles: expected a non-empty list of role names")
    for number, role in enumerate(roles):
        if not isinstance(role, str) or not ROLE_NAME.match(role):
            raise ConnectorError(f"{where}.roles[{number}]: invalid role name {role!r}")
    return RoleRule(claim, matcher, tuple(dict.fromkeys(roles)))


def _attribute_traits(value: Any) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise ConnectorError("spec.attributes_to_traits: expected a mapping of LDAP "
                             "attribute to trait name, e.g. {mail: email}")
    pairs = []
    for attribute, trait in value.items():
        if not isinstance(attribute, str) or not _ATTRIBUTE.match(attribute):
            raise ConnectorError(f"spec.attributes_to_traits: invalid LDAP attribute "
                                 f"{attribute!r}")
        if not isinstance(trait, str) or not TRAIT_NAME.match(trait):
            raise ConnectorError(f"spec.attributes_to_traits.{attribute}: invalid trait "
                                 f"name {trait!r}")
        if trait == GROUPS_TRAIT:
            raise ConnectorError(f"spec.attributes_to_traits.{attribute}: the trait "
                                 f"{GROUPS_TRAIT!r} is the user's groups already")
        pairs.append((attribute, trait))
    return tuple(pairs)


def _timeout(value: Any) -> float:
    try:
        seconds = parse_duration("spec.timeout", value)
    except RoleError as err:
        raise ConnectorError(err.message) from None
    if not 1.0 <= seconds <= MAX_TIMEOUT:
        raise ConnectorError(f"spec.timeout: must be between 1s and {int(MAX_TIMEOUT)}s")
    return seconds


# -- helpers -----------------------------------------------------------------------------


def _keys(prefix: str, mapping: dict, allowed: tuple[str, ...]) -> None:
    for key in mapping:
        if key not in allowed:
            raise ConnectorError(f"{prefix}{key}: unknown key (expected one of "
                                 f"{', '.join(allowed)})")


def _string(spec: dict, key: str) -> str:
    value = spec.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ConnectorError(f"spec.{key}: required (a non-empty string)")
    return value


def _absolute_path(spec: dict, key: str) -> str:
    value = _string(spec, key)
    if not os.path.isabs(value):
        raise ConnectorError(f"spec.{key}: expected an absolute path, got {value!r}")
    return value


def _loopback(host: str) -> bool:
    host = host.lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    return is_ip(host) and (host.startswith("127.") or host == "::1")
