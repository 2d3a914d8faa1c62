"""The agent <-> proxy control vocabulary: join, hello and renew, as typed records.

Both sides build and read these messages here and nowhere else: ``record.to_dict()`` is
what goes into a tunnel CONTROL frame, ``parse(message)`` turns a received JSON object
into its record or raises :class:`MessageError` with one reason (``"join.token must be a
string of 1-512 characters"``). Parsing checks the wire shape only (types, bounds, the
forms a field may take); what a well-formed message *may do* (is the token valid, may this
agent announce that app) is the business of the receiver.

Why here and not in ``tunnel/``: ``tunnel/`` is a general multiplexer that knows streams
and frames, not apptunnel's concepts; these messages name join tokens, CSRs, apps, labels
and header rewrites, the product's vocabulary carried over the tunnel. A neutral top-level
module lets the agent and the proxy share it without either importing the other's room.
It imports nothing of ours but the error root and the JWT claim names.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar
from urllib.parse import urlsplit

import attrs

from apptunnel.auth.jwt import JWT_CLAIMS
from apptunnel.auth.trust_set import MAX_TRUST_CAS as MAX_TRUSTED_CAS
from apptunnel.errors import ApptunnelError

__all__ = [
    "Announce",
    "AnnounceOk",
    "AppAnnouncement",
    "AppResources",
    "Hello",
    "HelloOk",
    "HelloRefused",
    "Join",
    "JoinOk",
    "JoinRefused",
    "MessageError",
    "Proxies",
    "Renew",
    "RenewOk",
    "RenewRefused",
    "Trust",
    "parse",
]

MAX_TOKEN = 512
MAX_PEM = 64 * 1024       # a control message is at most 64 KiB; the CA bounds CSRs itself
MAX_TEXT = 1024          # host ids, versions, proxy ids, public messages, reasons
MAX_DESCRIPTION = 200     # an app's one-line description (config.MAX_DESCRIPTION)
MAX_APPS = 1024
MAX_TCP_RANGES = 1024
MAX_SELECTORS = 64
MAX_SELECTOR_VALUES = 64

_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")


class MessageError(ApptunnelError):
    """A control message that is not well formed; ``str()`` says which field and why."""


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _text(message: dict, kind: str, key: str, limit: int = MAX_TEXT,
          empty: bool = False) -> str:
    value = message.get(key)
    if not isinstance(value, str) or len(value) > limit or (not value and not empty):
        raise MessageError(f"{kind}.{key} must be a string of {0 if empty else 1}-{limit} "
                           f"characters, got {_show(value)}")
    return value


def _optional_text(message: dict, kind: str, key: str) -> str:
    if message.get(key) is None:
        return ""
    return _text(message, kind, key, empty=True)


@attrs.frozen
class AppAnnouncement:
    """One app of a hello, as the agent's config defines it (``public_addr`` None = the
    proxy's default ``NAME.PUBLIC_HOST``)."""

    name: str
    uri: str
    labels: dict[str, str] = attrs.field(factory=dict)
    public_addr: str | None = None
    rewrite_headers: tuple[tuple[str, str], ...] = ()
    jwt_claims: tuple[str, ...] | None = None
    tcp_ports: tuple[tuple[int, int], ...] = ()
    description: str = ""

    def to_dict(self) -> dict:
        entry: dict[str, Any] = {
            "name": self.name,
            "uri": self.uri,
            "labels": dict(self.labels),
            "public_addr": self.public_addr,
            "rewrite_headers": [list(pair) for pair in self.rewrite_headers],
            "jwt_claims": list(self.jwt_claims) if self.jwt_claims is not None else None,
        }
        if self.tcp_ports:   # multi-port TCP apps only, so HTTP apps' entries stay as they were
            entry["tcp_ports"] = [list(r) for r in self.tcp_ports]
        if self.description:   # only when set, so older proxies see the entry unchanged
            entry["description"] = self.description
        return entry

    @classmethod
    def parse(cls, item: Any, where: str) -> AppAnnouncement:
        if not isinstance(item, dict):
            raise MessageError(f"{where} must be an object")
        name = item.get("name")
        if not isinstance(name, str) or not _DNS_LABEL.match(name):
            raise MessageError(f"{where}.name must be a DNS label, got {_show(name)}")
        uri = item.get("uri")
        try:
            parts = urlsplit(uri) if isinstance(uri, str) and len(uri) <= MAX_TEXT else None
            host = parts.hostname if parts is not None else None
        except ValueError:
            parts = host = None
        if parts is None or parts.scheme not in ("http", "https", "tcp") or not host:
            raise MessageError(f"{where}.uri must be an http(s) or tcp URL, got {_show(uri)}")
        labels = item.get("labels") or {}
        if not isinstance(labels, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
        ):
            raise MessageError(f"{where}.labels must map strings to strings")
        public_addr = item.get("public_addr") or None
        if public_addr is not None and (not isinstance(public_addr, str)
                                        or len(public_addr) > MAX_TEXT):
            raise MessageError(f"{where}.public_addr must be a string, got {_show(public_addr)}")
        rewrite = item.get("rewrite_headers") or []
        if not isinstance(rewrite, list) or not all(
            isinstance(p, list) and len(p) == 2 and isinstance(p[0], str)
            and _HEADER_NAME.match(p[0]) and isinstance(p[1], str)
            and not any(ord(c) < 32 and c != "\t" or ord(c) == 127 for c in p[1])
            for p in rewrite
        ):
            raise MessageError(f"{where}.rewrite_headers must be [name, value] pairs")
        claims = item.get("jwt_claims")
        if claims is not None and (not isinstance(claims, list)
                                   or not all(c in JWT_CLAIMS for c in claims)):
            raise MessageError(f"{where}.jwt_claims must be a list of known claims")
        description = item.get("description") or ""
        if not isinstance(description, str) or len(description) > MAX_DESCRIPTION \
                or any(ord(c) < 32 or ord(c) == 127 for c in description):
            raise MessageError(f"{where}.description must be one line of at most "
                               f"{MAX_DESCRIPTION} characters")
        return cls(
            name=name,
            uri=uri,
            labels=dict(labels),
            public_addr=public_addr,
            rewrite_headers=tuple((n, v) for n, v in rewrite),
            jwt_claims=tuple(claims) if claims is not None else None,
            tcp_ports=_tcp_ports(item.get("tcp_ports"), parts.scheme, where),
            description=description,
        )


def _tcp_ports(raw: Any, scheme: str, where: str) -> tuple[tuple[int, int], ...]:
    """[[low, high], ...] of a tcp:// app; absent or empty for the others."""
    if not raw:
        return ()
    if scheme != "tcp" or not isinstance(raw, list) or len(raw) > MAX_TCP_RANGES:
        raise MessageError(f"{where}.tcp_ports must be a list of [low, high] for a tcp app")
    ranges = []
    for pair in raw:
        if not (isinstance(pair, list) and len(pair) == 2
                and all(type(p) is int and 1 <= p <= 65535 for p in pair)
                and pair[0] <= pair[1]):
            raise MessageError(f"{where}.tcp_ports has a bad range {_show(pair)}")
        ranges.append((pair[0], pair[1]))
    return tuple(ranges)


# -- the messages ------------------------------------------------------------------------
#
# Each record has TYPE (the wire "type"), to_dict() and a classmethod parse(dict).


@attrs.frozen
class Join:
    """agent -> proxy, the one message of an unauthenticated connection."""

    TYPE: ClassVar[str] = "join"
    token: str = attrs.field(repr=False)   # a secret: never in a repr or a log line
    csr: str
    host_id: str

    def to_dict(self) -> dict:
        return {"type": self.TYPE, "token": self.token, "csr": self.csr,
                "host_id": self.host_id}

    @classmethod
    def parse(cls, message: dict) -> Join:
        return cls(token=_text(message, cls.TYPE, "token", MAX_TOKEN),
                   csr=_text(message, cls.TYPE, "csr", MAX_PEM),
                   host_id=_text(message, cls.TYPE, "host_id", empty=True))


@attrs.frozen
class JoinOk:
    """proxy -> agent: the agent's certificate and the CA that issued it (PEM)."""

    TYPE: ClassVar[str] = "join_ok"
    cert: str
    ca: str

    def to_dict(self) -> dict:
        return {"type": self.TYPE, "cert": self.cert, "ca": self.ca}

    @classmethod
    def parse(cls, message: dict) -> JoinOk:
        return cls(cert=_text(message, cls.TYPE, "cert", MAX_PEM),
                   ca=_text(message, cls.TYPE, "ca", MAX_PEM))


@attrs.frozen
class JoinRefused:
    """proxy -> agent (type ``join_error``): why, without detail that helps guessing."""

    TYPE: ClassVar[str] = "join_error"
    message: str

    def to_dict(self) -> dict:
        return {"type": self.TYPE, "message": self.message}

    @classmethod
    def parse(cls, message: dict) -> JoinRefused:
        return cls(message=_optional_text(message, cls.TYPE, "message"))


@attrs.frozen
class Hello:
    """agent -> proxy, the first message of a certificate-authenticated connection."""

    TYPE: ClassVar[str] = "hello"
    host_id: str
    version: str
    apps: tuple[AppAnnouncement, ...] = ()
    resources: tuple[dict, ...] = ()     # label selectors: the app resources to be sent

    def to_dict(self) -> dict:
        message = {"type": self.TYPE, "host_id": self.host_id, "version": self.version,
                   "apps": [app.to_dict() for app in self.apps]}
        if self.resources:   # agents without selectors send the hello they always did
            message["resources"] = [dict(s) for s in self.resources]
        return message

    @classmethod
    def parse(cls, message: dict) -> Hello:
        host_id = message.get("host_id")
        if not isinstance(host_id, str) or len(host_id) > MAX_TEXT:
            raise MessageError(f"hello.host_id must be a string, got {_show(host_id)}")
        version = message.get("version", "")
        if not isinstance(version, str) or len(version) > MAX_TEXT:
            raise MessageError(f"hello.version must be a string, got {_show(version)}")
        return cls(host_id=host_id, version=version, apps=_apps(message.get("apps")),
                   resources=_selectors(message.get("resources")))


def _apps(raw: Any) -> tuple[AppAnnouncement, ...]:
    """The ``apps`` list of a hello or an announce: unique names, bounded."""
    if not isinstance(raw, list) or len(raw) > MAX_APPS:
        raise MessageError(f"apps must be a list of at most {MAX_APPS}")
    apps, seen = [], set()
    for index, item in enumerate(raw):
        app = AppAnnouncement.parse(item, f"apps[{index}]")
        if app.name in seen:
            raise MessageError(f"apps[{index}]: duplicate app {app.name!r}")
        seen.add(app.name)
        apps.append(app)
    return tuple(apps)


def _selectors(raw: Any) -> tuple[dict, ...]:
    """A hello's ``resources``: [{key: [value, ...]}, ...] (absent: none). The shape only;
    the proxy reads each with a role's label rules (``auth.rbac.parse_label_selector``)."""
    if raw is None:
        return ()
    if not isinstance(raw, list) or len(raw) > MAX_SELECTORS:
        raise MessageError(f"hello.resources must be a list of at most {MAX_SELECTORS}")
    out = []
    for index, item in enumerate(raw):
        if not isinstance(item, dict) or len(item) > MAX_SELECTOR_VALUES or not all(
            isinstance(k, str) and 0 < len(k) <= MAX_TEXT and isinstance(v, list)
            and 0 < len(v) <= MAX_SELECTOR_VALUES
            and all(isinstance(x, str) and len(x) <= MAX_TEXT for x in v)
            for k, v in item.items()
        ):
            raise MessageError(f"hello.resources[{index}] must map label names to lists of "
                               "strings")
        out.append({k: list(v) for k, v in item.items()})
    return tuple(out)


@attrs.frozen
class HelloOk:
    """proxy -> agent: registered; ``refused`` = (app, reason) for apps it did not take."""

    TYPE: ClassVar[str] = "hello_ok"
    proxy_id: str
    refused: tuple[tuple[str, str], ...] = ()

    def to_dict(self) -> dict:
        message: dict[str, Any] = {"type": self.TYPE, "proxy_id": self.proxy_id}
        if self.refused:
            message["refused"] = [{"app": app, "reason": reason} for app, reason in self.refused]
        return message

    @classmethod
    def parse(cls, message: dict) -> HelloOk:
        proxy_id = _optional_text(message, cls.TYPE, "proxy_id")
        return cls(proxy_id=proxy_id, refused=_refused(message, cls.TYPE))


def _refused(message: dict, kind: str) -> tuple[tuple[str, str], ...]:
    raw = message.get("refused") or []
    if not isinstance(raw, list) or len(raw) > MAX_APPS or not all(
        isinstance(item, dict) and isinstance(item.get("app"), str)
        and isinstance(item.get("reason"), str) for item in raw
    ):
        raise MessageError(f"{kind}.refused must be a list of {{app, reason}} strings")
    return tuple((item["app"], item["reason"]) for item in raw)


@attrs.frozen
class HelloRefused:
    """proxy -> agent (type ``hello_error``); ``rejoin``: this certificate is no good
    here, an agent with a configured token may join again."""

    TYPE: ClassVar[str] = "hello_error"
    message: str
    rejoin: bool = False

    def to_dict(self) -> dict:
        message: dict[str, Any] = {"type": self.TYPE, "message": self.message}
        if self.rejoin:
            message["rejoin"] = True
        return message

    @classmethod
    def parse(cls, message: dict) -> HelloRefused:
        return cls(message=_optional_text(message, cls.TYPE, "message"),
                   rejoin=message.get("rejoin") is True)


@attrs.frozen
class Renew:
    """agent -> proxy, after hello_ok: a CSR for the agent's current key."""

    TYPE: ClassVar[str] = "renew"
    csr: str

    def to_dict(self) -> dict:
        return {"type": self.TYPE, "csr": self.csr}

    @classmethod
    def parse(cls, message: dict) -> Renew:
        return cls(csr=_text(message, cls.TYPE, "csr", MAX_PEM))


@attrs.frozen
class RenewOk:
    """proxy -> agent: the renewed certificate (PEM)."""

    TYPE: ClassVar[str] = "renew_ok"
    cert: str

    def to_dict(self) -> dict:
        return {"type": self.TYPE, "cert": self.cert}

    @classmethod
    def parse(cls, message: dict) -> RenewOk:
        return cls(cert=_text(message, cls.TYPE, "cert", MAX_PEM))


@attrs.frozen
class RenewRefused:
    """proxy -> agent (type ``renew_error``)."""

    TYPE: ClassVar[str] = "renew_error"
    message: str

    def to_dict(self) -> dict:
        return {"type": self.TYPE, "message": self.message}

    @classmethod
    def parse(cls, message: dict) -> RenewRefused:
        return cls(message=_optional_text(message, cls.TYPE, "message"))


@attrs.frozen
class AppResources:
    """proxy -> agent, after hello_ok and whenever they change: every app resource the
    agent's ``resources`` selectors match (the whole set; what is absent is no longer
    served). Each is a ``kind: app`` document the agent reads with the parser of its own
    config (``config.app_from_resource``); here only its shape is checked."""

    TYPE: ClassVar[str] = "app_resources"
    resources: tuple[dict, ...] = ()

    def to_dict(self) -> dict:
        return {"type": self.TYPE, "resources": [dict(doc) for doc in self.resources]}

    @classmethod
    def parse(cls, message: dict) -> AppResources:
        raw = message.get("resources")
        if not isinstance(raw, list) or len(raw) > MAX_APPS:
            raise MessageError(f"app_resources.resources must be a list of at most {MAX_APPS}")
        seen = set()
        for index, doc in enumerate(raw):
            metadata = doc.get("metadata") if isinstance(doc, dict) else None
            name = metadata.get("name") if isinstance(metadata, dict) else None
            if (not isinstance(doc, dict) or doc.get("kind") != "app"
                    or not isinstance(doc.get("spec"), dict)
                    or not isinstance(name, str) or not _DNS_LABEL.match(name)):
                raise MessageError(f"app_resources.resources[{index}] must be a kind: app "
                                   "document with metadata.name and spec")
            if name in seen:
                raise MessageError(f"app_resources.resources[{index}]: duplicate app {name!r}")
            seen.add(name)
        return cls(resources=tuple(raw))


@attrs.frozen
class Announce:
    """agent -> proxy, after hello_ok: the whole set of apps this tunnel serves now (its
    static apps, the app resources it was sent, current dynamic label values). Checked
    exactly like a hello's apps; it replaces what the tunnel served."""

    TYPE: ClassVar[str] = "announce"
    apps: tuple[AppAnnouncement, ...] = ()

    def to_dict(self) -> dict:
        return {"type": self.TYPE, "apps": [app.to_dict() for app in self.apps]}

    @classmethod
    def parse(cls, message: dict) -> Announce:
        return cls(apps=_apps(message.get("apps")))


@attrs.frozen
class AnnounceOk:
    """proxy -> agent: the announcement is registered; ``refused`` as in hello_ok."""

    TYPE: ClassVar[str] = "announce_ok"
    refused: tuple[tuple[str, str], ...] = ()

    def to_dict(self) -> dict:
        return {"type": self.TYPE,
                "refused": [{"app": app, "reason": reason} for app, reason in self.refused]}

    @classmethod
    def parse(cls, message: dict) -> AnnounceOk:
        return cls(refused=_refused(message, cls.TYPE))


MAX_PROXIES = 64
_ADDR = re.compile(r"([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*"
                   r"|\[[0-9a-f:.]{2,45}\]):[0-9]{1,5}\Z")


@attrs.frozen
class Proxies:
    """proxy -> agent, after hello_ok and whenever the set changes: every live proxy of
    the cluster (``proxy_id``, ``addr`` = its advertise_tunnel_addr), the sender included.
    The agent keeps one tunnel to each; the addresses are only dialled, every tunnel is
    still verified against the cluster CA like the first one."""

    TYPE: ClassVar[str] = "proxies"
    proxies: tuple[tuple[str, str], ...] = ()

    def to_dict(self) -> dict:
        return {"type": self.TYPE,
                "proxies": [{"proxy_id": pid, "addr": addr} for pid, addr in self.proxies]}

    @classmethod
    def parse(cls, message: dict) -> Proxies:
        raw = message.get("proxies")
        if not isinstance(raw, list) or len(raw) > MAX_PROXIES:
            raise MessageError(f"proxies.proxies must be a list of at most {MAX_PROXIES}")
        out = []
        for index, item in enumerate(raw):
            pid = item.get("proxy_id") if isinstance(item, dict) else None
            addr = item.get("addr") if isinstance(item, dict) else None
            if (not isinstance(pid, str) or not 0 < len(pid) <= 64
                    or not isinstance(addr, str) or len(addr) > 260
                    or not _ADDR.match(addr.lower()) or not 0 < int(addr.rsplit(":", 1)[1]) < 65536):
                raise MessageError(f"proxies.proxies[{index}] must be {{proxy_id, addr}} with "
                                   f"addr host:port, got {_show(item)}")
            out.append((pid, addr.lower()))
        return cls(proxies=tuple(out))


@attrs.frozen
class Trust:
    """proxy -> agent, after hello_ok, after renew_ok and whenever it changes: the host
    CAs the proxies are trusted under (PEM), the one that issues agent certificates now
    first. During a host-CA rotation this is how an agent learns the new CA before any
    proxy presents a certificate it signed; the agent judges it (auth/trust_set.py
    parse_trust_set) and keeps it in agent/trust.py's file."""

    TYPE: ClassVar[str] = "trust"
    trusted_cas: tuple[str, ...]

    def to_dict(self) -> dict:
        return {"type": self.TYPE, "trusted_cas": list(self.trusted_cas)}

    @classmethod
    def parse(cls, message: dict) -> Trust:
        raw = message.get("trusted_cas")
        if (not isinstance(raw, list) or not 0 < len(raw) <= MAX_TRUSTED_CAS
                or not all(isinstance(pem, str) and len(pem) <= MAX_PEM for pem in raw)):
            raise MessageError(f"trust.trusted_cas must be a list of 1 to {MAX_TRUSTED_CAS} "
                               f"PEM strings")
        return cls(trusted_cas=tuple(raw))


Message = (Join | JoinOk | JoinRefused | Hello | HelloOk | HelloRefused
           | Renew | RenewOk | RenewRefused | AppResources | Announce | AnnounceOk | Proxies
           | Trust)

_TYPES: dict[str, Any] = {cls.TYPE: cls for cls in (
    Join, JoinOk, JoinRefused, Hello, HelloOk, HelloRefused, Renew, RenewOk, RenewRefused,
    AppResources, Announce, AnnounceOk, Proxies, Trust)}


def parse(message: Any) -> Message:
    """The record for a received control message; MessageError for an unknown type or a
    malformed field (the text names the field)."""
    kind = message.get("type") if isinstance(message, dict) else None
    cls = _TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise MessageError(f"unknown message type {_show(kind)}")
    return cls.parse(message)


def kind_of(message: Any) -> str:
    """The ``type`` of a received message, for a log line (never raises)."""
    kind = message.get("type") if isinstance(message, dict) else None
    return _show(kind)
