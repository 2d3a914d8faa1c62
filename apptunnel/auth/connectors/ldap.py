"""Sign-in with an LDAP directory: search as the service account, then bind as the user.

`check_password` is the blocking part (ldap3 has no async API that fits Twisted): it
runs in a small dedicated thread pool, never on the reactor. `LdapSignIn` is the reactor
side: the same sign-in throttle as local passwords (per user name and per address), at
most a few directory checks at once behind a bounded, fair queue (the argon2 queue's
rules, `auth/passwords.HashQueue`), a deadline of the connector's ``timeout`` on the
whole check, and an audit event for every attempt (method ``ldap``, the connector).

Why each step:

* An empty password is refused before anything is sent: an LDAP simple bind with a DN
  and no password is an *unauthenticated* bind that many servers answer with success.
* The user name goes into ``user_search_filter`` escaped (RFC 4515), so ``*)(uid=*``
  matches nobody; the search must find exactly one entry.
* The apptunnel name is the entry's ``username_attribute`` (``uid``) as the directory
  holds it, not what was typed: ``ALICE`` and ``alice`` find the same entry and must be
  the same user for locks and audit.
* Groups are the entry's ``memberOf`` (Active Directory; OpenLDAP with the memberof or
  dynlist overlay), read by the service account in the same search.
* TLS (``ldaps://`` or StartTLS) verifies the server's certificate against ``ca_file``
  (else the system store) and its name; a directory that cannot be reached, answers
  garbage or does not answer within ``timeout`` is a 503 naming the connector.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING

from ldap3 import AUTO_BIND_NONE, NONE, SUBTREE, Connection, Server, Tls
from ldap3.core.exceptions import LDAPException
from ldap3.utils.conv import escape_filter_chars
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.defer import TimeoutError as DeadlinePassed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from apptunnel.auth.connectors.signin import ExternalIdentity, ExternalSignIn, audit_login
from apptunnel.auth.connectors.specs import GROUPS_TRAIT, USERNAME_PLACEHOLDER, LdapSpec
from apptunnel.auth.errors import AuthError
from apptunnel.auth.names import USER_NAME
from apptunnel.auth.passwords import HashQueue
from apptunnel.auth.throttle import LoginThrottle, Throttled

if TYPE_CHECKING:
    from apptunnel.audit import AuditLog
    from apptunnel.auth.connectors.store import ConnectorStore
    from apptunnel.backend.records import User

LOGIN_FAILED = "invalid username or password"
MAX_USERNAME = 256
MAX_PASSWORD = 1024
CONCURRENT_CHECKS = 4
QUEUED_CHECKS = 32
MEMBER_OF = "memberOf"


class DirectoryError(Exception):
    """The directory could not be asked (down, TLS refused, service account refused)."""


# -- the blocking part (runs in a thread) -------------------------------------------------


def read_bind_password(path: str) -> str:
    """The service account's password: the file's text, one trailing newline ignored."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(MAX_PASSWORD + 2)
    except (OSError, UnicodeDecodeError) as err:
        raise DirectoryError(f"cannot read bind_password_file {path}: "
                             f"{getattr(err, 'strerror', None) or err}") from None
    if text.endswith("\r\n"):
        text = text[:-2]
    elif text.endswith("\n"):
        text = text[:-1]
    if not text:
        raise DirectoryError(f"bind_password_file {path} is empty")
    return text


def throttle_name(username: str) -> str:
    """The name a guess is counted against. A directory matches ``uid`` ignoring case and
    the spaces around and inside it (caseIgnoreMatch), so ``alice``, `` Alice`` and
    ``alice  `` are one entry and must share one budget of guesses."""
    return " ".join(username.split()).casefold()


def search_filter(spec: LdapSpec, username: str) -> str:
    """``user_search_filter`` with the user name escaped (RFC 4515): data, never syntax."""
    return spec.user_search_filter.replace(USERNAME_PLACEHOLDER, escape_filter_chars(username))


def check_password(spec: LdapSpec, username: str, password: str) -> ExternalIdentity | None:
    """Who ``username`` is if ``password`` binds as their entry; None otherwise.

    Blocking: call it in a thread. DirectoryError when the directory cannot answer.
    """
    if not password:
        return None
    bind_password = read_bind_password(spec.bind_password_file)
    tls = Tls(ca_certs_file=spec.ca_file, validate=ssl.CERT_REQUIRED,
              version=None, valid_names=[spec.host])
    server = Server(spec.host, port=spec.port, use_ssl=spec.use_ssl, tls=tls,
                    connect_timeout=spec.whole_seconds, get_info=NONE)
    wanted = [spec.username_attribute, MEMBER_OF, *(a for a, _ in spec.attributes_to_traits)]
    service = _open(spec, server, spec.bind_dn, bind_password)
    try:
        if not service.bind():
            raise DirectoryError(f"the service account (bind_dn) was refused: "
                                 f"{service.result.get('description')}")
        service.search(spec.user_search_base, search_filter(spec, username), SUBTREE,
                       attributes=wanted, size_limit=2)
        entries = [e for e in service.response or () if e.get("type") == "searchResEntry"]
        if len(entries) != 1:
            return None             # nobody, or ambiguous: never guess which one
        entry = entries[0]
    except LDAPException as err:
        raise DirectoryError(_reason(err)) from None
    finally:
        _close(service)
    attributes = entry.get("attributes") or {}
    names = _values(attributes, spec.username_attribute)
    if len(names) != 1 or not USER_NAME.match(names[0]):
        return None
    user = _open(spec, server, entry["dn"], password)
    try:
        if not user.bind():
            return None
    except LDAPException as err:
        raise DirectoryError(_reason(err)) from None
    finally:
        _close(user)
    claims = {GROUPS_TRAIT: _values(attributes, MEMBER_OF)}
    for attribute, trait in spec.attributes_to_traits:
        claims[trait] = _values(attributes, attribute)
    return ExternalIdentity(spec.name, "ldap", names[0], claims)


def _open(spec: LdapSpec, server: Server, who: str, password: str) -> Connection:
    conn = Connection(server, user=who, password=password, auto_bind=AUTO_BIND_NONE,
                      receive_timeout=spec.whole_seconds, raise_exceptions=False,
                      read_only=True)
    try:
        conn.open()
        if spec.start_tls and not conn.start_tls():
            raise DirectoryError("StartTLS was refused")
    except LDAPException as err:
        _close(conn)
        raise DirectoryError(_reason(err)) from None
    return conn


def _close(conn: Connection) -> None:
    try:
        conn.unbind()
    except Exception:  # noqa: BLE001 - closing a broken connection: nothing to tell
        pass


def _values(attributes: dict, name: str) -> tuple[str, ...]:
    """An attribute's string values, whatever the case of its name in the answer."""
    for key, value in attributes.items():
        if key.lower() == name.lower():
            values = value if isinstance(value, list) else [value]
            # Text only: a binary attribute (jpegPhoto) is no trait and no name.
            return tuple(str(v) for v in values if isinstance(v, (str, int)))
    return ()


def _reason(err: Exception) -> str:
    return f"{type(err).__name__}: {err}"[:300]


# -- the reactor side ---------------------------------------------------------------------


class LdapSignIn:
    """Password sign-in through an LDAP connector, throttled, bounded, timed and audited."""

    _log = Logger()

    def __init__(self, *, connectors: ConnectorStore, signin: ExternalSignIn,
                 throttle: LoginThrottle, audit: AuditLog, clock: IReactorTime,
                 run_in_thread: Callable[..., Deferred] | None = None,
                 queue: HashQueue | None = None) -> None:
        self._connectors = connectors
        self._signin = signin
        self._throttle = throttle
        self._audit = audit
        self._clock = clock
        self._queue = queue or HashQueue(CONCURRENT_CHECKS, QUEUED_CHECKS, run_in_thread)

    async def connector_names(self) -> list[str]:
        """The LDAP connectors users may choose on the sign-in form."""
        return await self._connectors.ldap_names()

    async def login(self, connector: str, username: str, password: str, address: str = "",
                    client: str = "") -> User:
        """The signed-in user; AuthError 401 (wrong), 403 (no role, locked out name),
        429 (throttled), 503 (directory down or slow, or busy), 400 (no such connector)."""
        spec = await self._connectors.ldap(connector) if isinstance(connector, str) else None
        name = username[:MAX_USERNAME] if isinstance(username, str) else ""
        if spec is None:
            audit_login(self._audit, name, "ldap", str(connector)[:64], client,
                        "unknown connector")
            raise AuthError(400, f"no LDAP connector named {str(connector)[:64]!r}")
        if not name or len(username) > MAX_USERNAME or not isinstance(password, str) \
                or not password or len(password) > MAX_PASSWORD:
            # Refused before any bind: an empty password is an unauthenticated bind.
            audit_login(self._audit, name, "ldap", spec.name, client,
                        "empty password" if password == "" else "invalid credentials")
            raise AuthError(401, LOGIN_FAILED)
        key = throttle_name(username)
        try:
            self._throttle.attempt(key, address, self._clock.seconds())
        except Throttled as err:
            audit_login(self._audit, name, "ldap", spec.name, client, err.reason)
            raise
        identity = await self._check(spec, username, password, address, client)
        if identity is None:
            audit_login(self._audit, name, "ldap", spec.name, client, "invalid credentials")
            raise AuthError(401, LOGIN_FAILED)
        self._throttle.succeeded(key, address)
        return await self._signin.sign_in(identity, spec.groups_to_roles, client)

    async def _check(self, spec: LdapSpec, username: str, password: str, address: str,
                     client: str) -> ExternalIdentity | None:
        """check_password in the pool within ``spec.timeout``; 503 naming the directory."""
        d = self._queue.run(address, check_password, spec, username, password)
        d.addTimeout(spec.timeout, self._clock)
        try:
            return await d
        except Throttled as err:
            self._throttle.abandoned(throttle_name(username), address)
            audit_login(self._audit, username, "ldap", spec.name, client, err.reason)
            raise
        except (CancelledError, DeadlinePassed):
            problem = f"no answer within {spec.timeout:g} s"
        except DirectoryError as err:
            problem = str(err)
        except LDAPException as err:
            problem = _reason(err)
        self._throttle.abandoned(throttle_name(username), address)   # never checked
        self._log.warn("LDAP connector {name} ({url}): {problem}", name=spec.name,
                       url=spec.url, problem=problem)
        audit_login(self._audit, username, "ldap", spec.name, client, "directory unavailable")
        raise AuthError(503, f"the directory {spec.name} is not answering; try again later")
