"""YAML configuration files -> frozen attrs objects, with errors an operator can act on.

Every problem becomes one `ConfigError` line naming the file, the line and the key
(``etc/proxy.yaml:7: web_listen_addr: expected host:port, got 'abc'``). To know lines,
the YAML is loaded with a safe loader that remembers where each key and list item was.
Unknown keys are errors (a typo must not silently become a default), with the closest
valid key suggested. Relative paths are resolved against the config file's directory,
so a config means the same thing whatever directory the process starts in.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
from typing import Any, Callable, NoReturn
from urllib.parse import urlsplit

import attrs
import yaml

from apptunnel.auth.jwt import JWT_CLAIMS
from apptunnel.auth.pins import is_pin
from apptunnel.auth.rbac import RoleError, parse_label_selector
from apptunnel.errors import ConfigError
from apptunnel.files import read_encryption_key
from apptunnel.net import is_ip

__all__ = [
    "AgentConfig",
    "AppConfig",
    "ConfigError",
    "DynamicLabel",
    "ProxyConfig",
    "load_agent_config",
    "load_proxy_config",
    "app_from_resource",
    "load_yaml_documents",
    "parse_duration",
]

JWT_ALGORITHMS = ("RS256", "ES256", "EdDSA")
BACKEND_TYPES = ("sqlite", "postgres")
_POSTGRES_KEYS = ("type", "dsn", "password_file")

_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")
_HOSTNAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]{0,252})\Z")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_MAX_FILE_BYTES = 1024 * 1024


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _show(value: Any) -> str:
    """A short, single-line rendering of a bad value for an error message."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# -- durations ------------------------------------------------------------------------


def parse_duration(text: str | int | float) -> float:
    """Seconds from ``90``, ``"90s"``, ``"15m"``, ``"1h"``, ``"2h30m"``, ``"7d"``, ``"500ms"``.

    A bare number means seconds. Negative, empty or malformed input raises ValueError.
    """
    if isinstance(text, bool):
        raise ValueError(f"expected a duration like 90s, 15m, 1h, got {_show(text)}")
    if isinstance(text, (int, float)):
        seconds = float(text)
    elif isinstance(text, str):
        seconds = _parse_duration_text(text.strip())
    else:
        raise ValueError(f"expected a duration like 90s, 15m, 1h, got {_show(text)}")
    if not (seconds >= 0.0) or seconds == float("inf"):
        raise ValueError(f"expected a non-negative duration, got {_show(text)}")
    return seconds


def _parse_duration_text(text: str) -> float:
    bad = ValueError(f"expected a duration like 90s, 15m, 1h, 2h30m, got {_show(text)}")
    if not text:
        raise bad
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    total, pos = 0.0, 0
    while pos < len(text):
        match = _DURATION_PART.match(text, pos)
        if match is None:
            raise bad
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    return total


# -- YAML with line numbers -----------------------------------------------------------


class _Map(dict):
    """A YAML mapping that remembers its own line and the line of each key."""

    line: int = 0
    key_lines: dict


class _Seq(list):
    """A YAML sequence that remembers its own line and the line of each item."""

    line: int = 0
    item_lines: list


class _LineLoader(yaml.SafeLoader):
    """SafeLoader whose mappings and sequences carry line numbers; duplicate keys fail."""


def _construct_map(loader: _LineLoader, node: yaml.MappingNode):
    data = _Map()
    data.line = node.start_mark.line + 1
    data.key_lines = {}
    yield data
    loader.flatten_mapping(node)
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, "a mapping key must be a plain value", key_node.start_mark,
            ) from None
        if key in data:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {_show(key)}", key_node.start_mark,
            )
        data[key] = loader.construct_object(value_node, deep=True)
        data.key_lines[key] = key_node.start_mark.line + 1


def _construct_seq(loader: _LineLoader, node: yaml.SequenceNode):
    data = _Seq()
    data.line = node.start_mark.line + 1
    data.item_lines = []
    yield data
    for item in node.value:
        data.append(loader.construct_object(item, deep=True))
        data.item_lines.append(item.start_mark.line + 1)


_LineLoader.add_constructor("tag:yaml.org,2002:map", _construct_map)
_LineLoader.add_constructor("tag:yaml.org,2002:seq", _construct_seq)


def _read_text(path: str) -> str:
    """The file as text, bounded in size; ConfigError when it cannot be read."""
    try:
        with open(path, "rb") as f:
            raw = f.read(_MAX_FILE_BYTES + 1)
    except OSError as err:
        raise ConfigError(path, f"cannot read file: {err.strerror or err}") from None
    if len(raw) > _MAX_FILE_BYTES:
        raise ConfigError(path, f"file is larger than {_MAX_FILE_BYTES} bytes")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(path, "file is not UTF-8 text") from None


def _yaml_error(path: str, err: Exception) -> ConfigError:
    if isinstance(err, yaml.MarkedYAMLError):
        mark = err.problem_mark or err.context_mark
        line = mark.line + 1 if mark is not None else None
        problem = err.problem or err.context or "invalid YAML"
        return ConfigError(path, f"invalid YAML: {problem}", line=line)
    return ConfigError(path, f"invalid YAML: {err}")


def _read_yaml(path: str) -> _Map:
    """The top-level mapping of a config file, or one ConfigError line."""
    text = _read_text(path)
    try:
        data = yaml.load(text, Loader=_LineLoader)  # noqa: S506 - a SafeLoader subclass
    except (yaml.YAMLError, RecursionError) as err:
        raise _yaml_error(path, err) from None
    if data is None:
        raise ConfigError(path, "config file is empty (expected a mapping of settings)")
    if not isinstance(data, _Map):
        raise ConfigError(path, f"expected a mapping of settings at the top, got {_type_name(data)}",
                          line=1)
    return data


_MAX_VALUES = 100_000


def _plain(value: Any, budget: list[int]) -> Any:
    """Copy into plain dicts/lists, counting values so aliases cannot expand without bound."""
    budget[0] -= 1
    if budget[0] < 0:
        raise ValueError(f"more than {_MAX_VALUES} values (aliases expanding?)")
    if isinstance(value, dict):
        return {k: _plain(v, budget) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v, budget) for v in value]
    return value


def load_yaml_documents(path: str) -> list[Any]:
    """Every document of a multi-document YAML file (resources for `apptunnel create -f`).

    The same safe, strict loader as the config files (duplicate keys are errors, so a
    repeated ``deny:`` cannot silently drop rules); values come back as plain dicts and
    lists. ConfigError (one line, with the line number) on unreadable files or bad YAML.
    """
    return load_yaml_text(path, _read_text(path))


def load_yaml_text(name: str, text: str) -> list[Any]:
    """`load_yaml_documents` for text already in hand (YAML edited in the admin pages);
    ``name`` is what the one-line error names."""
    budget = [_MAX_VALUES]
    try:
        return [_plain(doc, budget) for doc in yaml.load_all(text, Loader=_LineLoader)]  # noqa: S506
    except (yaml.YAMLError, RecursionError, ValueError) as err:
        raise _yaml_error(name, err) from None


# -- typed access to one mapping -------------------------------------------------------


def _type_name(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    return {
        bool: "a boolean", int: "a number", float: "a number", str: "a string",
        _Map: "a mapping", _Seq: "a list",
    }.get(type(value), type(value).__name__)


class _Section:
    """Validated reads from one mapping; every problem names its key path and line."""

    def __init__(self, file: str, data: _Map, prefix: str, allowed: tuple[str, ...],
                 home_line: int | None = None) -> None:
        self.file = file
        self.data = data
        self.prefix = prefix
        # A missing key is reported at the line that introduced this mapping.
        self.home_line = data.line if home_line is None else home_line
        for key in data:
            if not isinstance(key, str) or key not in allowed:
                self._unknown(key, allowed)

    def _unknown(self, key: Any, allowed: tuple[str, ...]) -> NoReturn:
        close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else f" (valid keys: {', '.join(allowed)})"
        self.fail(key, f"unknown key{hint}")

    def path(self, key: Any) -> str:
        return f"{self.prefix}{key}"

    def line(self, key: Any) -> int:
        return self.data.key_lines.get(key, self.home_line)

    def fail(self, key: Any, problem: str) -> NoReturn:
        raise ConfigError(self.file, problem, key=self.path(key), line=self.line(key))

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def raw(self, key: str, required: bool = False) -> Any:
        value = self.data.get(key)
        if value is None and required:
            self.fail(key, "required key is missing" if key not in self.data else "must not be empty")
        return value

    def string(self, key: str, required: bool = False, default: str | None = None) -> str | None:
        value = self.raw(key, required)
        if value is None:
            return default
        if not isinstance(value, str):
            self.fail(key, f"expected a string, got {_type_name(value)} {_show(value)}")
        if not value.strip():
            self.fail(key, "must not be empty")
        if any(ord(c) < 32 or ord(c) == 127 for c in value):
            self.fail(key, "must not contain control characters")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.raw(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            self.fail(key, f"expected true or false, got {_show(value)}")
        return value

    def duration(self, key: str, default: float) -> float:
        value = self.raw(key)
        if value is None:
            return default
        try:
            seconds = parse_duration(value)
        except ValueError as err:
            self.fail(key, str(err))
        if seconds <= 0:
            self.fail(key, f"must be longer than zero, got {_show(value)}")
        return seconds

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        value = self.string(key, default=default)
        if value not in choices:
            self.fail(key, f"expected one of {', '.join(choices)}, got {_show(value)}")
        return value

    def address(self, key: str, required: bool = False, default: str | None = None,
                default_port: int | None = None, allow_port_zero: bool = False) -> str | None:
        value = self.string(key, required=required, default=default)
        if value is None:
            return None
        try:
            _split_addr(value, default_port, allow_port_zero)
        except ValueError as err:
            self.fail(key, str(err))
        return value

    def file_path(self, key: str, base: str, required: bool = False) -> str | None:
        value = self.string(key, required=required)
        if value is None:
            return None
        return _resolve(base, value)

    def section(self, key: str, allowed: tuple[str, ...]) -> _Section | None:
        value = self.raw(key)
        if value is None:
            return None
        if not isinstance(value, _Map):
            self.fail(key, f"expected a mapping, got {_type_name(value)}")
        return _Section(self.file, value, f"{self.path(key)}.", allowed, self.line(key))

    def sequence(self, key: str) -> _Seq:
        value = self.raw(key)
        if value is None:
            empty = _Seq()
            empty.line, empty.item_lines = self.line(key), []
            return empty
        if not isinstance(value, _Seq):
            self.fail(key, f"expected a list, got {_type_name(value)}")
        return value


def _resolve(base: str, value: str) -> str:
    return os.path.normpath(os.path.join(base, os.path.expanduser(value)))


def _split_addr(addr: str, default_port: int | None, allow_port_zero: bool) -> tuple[str, int]:
    """(host, port) of ``host:port`` / ``[v6]:port`` / ``host`` (with a default port)."""
    bad = ValueError(f"expected host:port, got {_show(addr)}")
    host, port_text = addr, None
    if addr.startswith("["):
        end = addr.find("]")
        if end < 0:
            raise bad
        host, rest = addr[1:end], addr[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise bad
            port_text = rest[1:]
        if not is_ip(host, version=6):
            raise bad
    elif ":" in addr:
        host, _, port_text = addr.rpartition(":")
        if ":" in host:
            raise ValueError(f"expected host:port (write IPv6 as [addr]:port), got {_show(addr)}")
    bracketed = addr.startswith("[")
    if not host or (not bracketed and not _HOSTNAME.match(host)):
        raise bad
    if port_text is None:
        if default_port is None:
            raise bad
        return host, default_port
    if not port_text.isdigit() or not port_text.isascii():
        raise bad
    port = int(port_text)
    if port > 65535 or (port == 0 and not allow_port_zero):
        raise ValueError(f"port must be 1-65535, got {_show(addr)}")
    return host, port


# -- the config objects ------------------------------------------------------------------


@attrs.frozen
class DynamicLabel:
    """A label whose value is a command's output, run every ``period`` (agent/labels.py);
    the command is an argument vector (no shell) killed after ``timeout``."""

    key: str
    command: tuple[str, ...]
    period: float
    timeout: float


@attrs.frozen
class AppConfig:
    """One app an agent serves; the agent dials only these URIs."""

    name: str
    uri: str
    labels: dict[str, str]
    public_addr: str | None
    insecure_skip_verify: bool = False
    rewrite_headers: tuple[tuple[str, str], ...] = ()
    jwt_claims: tuple[str, ...] | None = None
    tcp_ports: tuple[tuple[int, int], ...] = ()   # (low, high) ranges; tcp:// apps only
    dynamic_labels: tuple[DynamicLabel, ...] = ()
    description: str = ""     # one line the catalogue shows under the name

    @property
    def kind(self) -> str:
        """``tcp`` for raw TCP apps (``tcp://``), else ``http``."""
        return "tcp" if self.uri.startswith("tcp://") else "http"


@attrs.frozen
class LimitsConfig:
    """``limits:``: what the web and tunnel listeners enforce on connections (proxy/limits.py)."""

    handshake_timeout: float = 10.0
    max_connections: int = 10_000
    max_connections_per_ip: int = 256


@attrs.frozen
class ThrottleConfig:
    """``auth.throttle:``: sign-in attempts (auth/throttle.py) and password hashing at once."""

    max_failures_per_user: int = 5
    max_failures_per_address: int = 20
    window: float = 300.0
    max_tracked: int = 10_000
    concurrent_hashes: int = 2
    queued_hashes: int = 32


@attrs.frozen
class AccessRequestsConfig:
    """``access_requests:``: the webhook told of every state change (auth/request_webhook.py)."""

    webhook_url: str
    ca_file: str | None = None


@attrs.frozen
class AuditConfig:
    """audit: durability (audit/journal.py) and what happens when nothing can take an
    event (on_failure: refuse answers 503 at once; block holds up to block_timeout)."""

    on_failure: str = "refuse"
    block_timeout: float = 10.0
    journal_max_bytes: int = 64 * 1024 * 1024


AUDIT_ON_FAILURE = ("refuse", "block")


@attrs.frozen
class ProxyConfig:
    """Everything the proxy process needs; paths are absolute."""

    path: str
    cluster_name: str
    data_dir: str
    public_addr: str
    web_listen_addr: str
    tunnel_listen_addr: str
    backend_type: str
    backend_path: str
    tls_cert_file: str | None
    tls_key_file: str | None
    jwt_header: str = "Apptunnel-Jwt-Assertion"
    jwt_algorithm: str = "RS256"
    jwt_ttl: float = 300.0
    session_ttl: float = 43200.0
    keepalive_interval: float = 5.0
    keepalive_timeout: float = 15.0
    audit_file: str | None = None
    audit: AuditConfig = AuditConfig()
    limits: LimitsConfig = LimitsConfig()
    throttle: ThrottleConfig = ThrottleConfig()
    # auth.second_factor: off | otp | webauthn | on | optional (auth/mfa.py)
    second_factor: str = "off"
    # Agents: certificate lifetime (renewed over the tunnel), how long a departed agent's
    # apps stay listed, and public addresses allowed outside *.PUBLIC_HOST (host or
    # host:port, or *.domain).
    agent_cert_ttl: float = 3 * 86400.0
    app_grace_period: float = 120.0
    allowed_public_addrs: tuple[str, ...] = ()
    # bots.min_certificate_ttl: the shortest bot certificate issued (auth/bots.py).
    bot_min_certificate_ttl: float = 60.0
    # ca_min_grace_period: the shortest grace `auth rotate --type user-ca|host-ca` accepts
    # (auth/ca_rotation.py); lowered only by tests and drills.
    ca_min_grace_period: float = 3600.0
    # access_requests: where each state change of an access request is POSTed.
    access_requests: AccessRequestsConfig | None = None
    # backend: {type: postgres, dsn, password_file}: the dsn has no password in it (config
    # refuses one); the password is read from password_file when the backend opens.
    backend_dsn: str | None = None
    backend_password_file: str | None = None
    # backend.encryption_key_file (either type): seals the keys stored in the backend
    # (auth/keystore.py); checked (0600, 32 bytes) when the config is read.
    backend_encryption_key_file: str | None = None
    # diag_addr: the plain-HTTP /metrics, /healthz, /readyz listener (apptunnel/diag.py);
    # None is off. The loader's default is DEFAULT_PROXY_DIAG_ADDR (loopback).
    diag_addr: str | None = None
    # Where agents reach this proxy's tunnel listener (proxy/peers.py): told to agents
    # connected to the other proxies; "" = tunnel_listen_addr (see default_advertise_addr).
    advertise_tunnel_addr: str = ""
    # workers: proxy processes sharing the listeners (proxy/workers.py); 1 = one process.
    workers: int = 1

    @property
    def public_host(self) -> str:
        return _split_addr(self.public_addr, 443, False)[0]

    @property
    def public_port(self) -> int:
        return _split_addr(self.public_addr, 443, False)[1]

    @property
    def web_listen_host(self) -> str:
        return _split_addr(self.web_listen_addr, None, True)[0]

    @property
    def web_listen_port(self) -> int:
        return _split_addr(self.web_listen_addr, None, True)[1]

    @property
    def tunnel_listen_host(self) -> str:
        return _split_addr(self.tunnel_listen_addr, None, True)[0]

    @property
    def tunnel_listen_port(self) -> int:
        return _split_addr(self.tunnel_listen_addr, None, True)[1]


@attrs.frozen
class AgentConfig:
    """Everything the agent process needs; paths are absolute."""

    path: str
    data_dir: str
    proxy_addr: str
    join_token: str | None
    ca_pin: str | None
    apps: tuple[AppConfig, ...]
    keepalive_interval: float = 5.0
    keepalive_timeout: float = 15.0
    # ``resources:`` label selectors ({key: [values]}): app resources to serve as well.
    resources: tuple[dict, ...] = ()
    # diag_addr: as the proxy's; the loader's default is DEFAULT_AGENT_DIAG_ADDR.
    diag_addr: str | None = None

    @property
    def proxy_host(self) -> str:
        return _split_addr(self.proxy_addr, None, False)[0]

    @property
    def proxy_port(self) -> int:
        return _split_addr(self.proxy_addr, None, False)[1]


# -- loaders -----------------------------------------------------------------------------

_PROXY_KEYS = (
    "cluster_name", "data_dir", "public_addr", "web_listen_addr", "tunnel_listen_addr",
    "backend", "tls", "jwt", "session_ttl", "keepalive", "audit",
    "limits", "auth",
    "agent_cert_ttl", "app_grace_period", "allowed_public_addrs", "bots", "ca_min_grace_period",
    "access_requests", "diag_addr", "diag_addr_public", "advertise_tunnel_addr", "workers",
)
_AGENT_KEYS = ("data_dir", "proxy_addr", "join", "keepalive", "apps", "resources",
               "diag_addr", "diag_addr_public")
# The diagnostics listeners (metrics, health) listen on loopback unless told otherwise.
DEFAULT_PROXY_DIAG_ADDR = "127.0.0.1:3090"
DEFAULT_AGENT_DIAG_ADDR = "127.0.0.1:3091"
_APP_KEYS = (
    "name", "uri", "labels", "public_addr", "insecure_skip_verify", "rewrite", "jwt_claims",
    "tcp_ports", "dynamic_labels", "description",
)
MAX_DESCRIPTION = 200   # one line on the catalogue card
# Dynamic labels: a period below the floor would make an agent a fork loop; the command
# gets at most DYNAMIC_TIMEOUT (or its period, if shorter) before it is killed.
DYNAMIC_PERIOD_FLOOR = 1.0
DYNAMIC_TIMEOUT = 10.0
MAX_DYNAMIC_LABELS = 16
MAX_COMMAND_ARGS = 64
MAX_SELECTORS = 64


def _guard(path: str, build: Callable[[str, _Map], Any]) -> Any:
    """Run a loader so that nothing but ConfigError can leave it."""
    try:
        return build(path, _read_yaml(path))
    except ConfigError:
        raise
    except (RecursionError, MemoryError, ValueError, TypeError) as err:
        raise ConfigError(path, f"cannot load config: {err}") from None


def load_proxy_config(path: str) -> ProxyConfig:
    """Read and validate the proxy's YAML file; ConfigError (one line) on any problem."""
    return _guard(path, _build_proxy)


def load_agent_config(path: str) -> AgentConfig:
    """Read and validate the agent's YAML file; ConfigError (one line) on any problem."""
    return _guard(path, _build_agent)


def _base_dir(path: str) -> str:
    return os.path.dirname(os.path.abspath(path))


def _keepalive(top: _Section) -> tuple[float, float]:
    keepalive = top.section("keepalive", ("interval", "timeout"))
    if keepalive is None:
        return 5.0, 15.0
    interval = keepalive.duration("interval", 5.0)
    timeout = keepalive.duration("timeout", 15.0)
    if timeout <= interval:
        keepalive.fail("timeout", "must be longer than keepalive.interval")
    return interval, timeout


def _count(section: _Section, key: str, default: int, most: int = 10_000_000) -> int:
    """A whole number from 1 to ``most``."""
    value = section.raw(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        section.fail(key, f"expected a whole number, got {_show(value)}")
    if not 1 <= value <= most:
        section.fail(key, f"must be from 1 to {most}, got {value}")
    return value




def _audit(top: _Section, base: str) -> tuple[str | None, AuditConfig]:
    audit = top.section("audit", ("file", "on_failure", "block_timeout", "journal_max_bytes"))
    if audit is None:
        return None, AuditConfig()
    block_timeout = audit.duration("block_timeout", 10.0)
    if block_timeout > 300:
        audit.fail("block_timeout", f"must be at most 5m, got {_show(audit.raw('block_timeout'))}")
    max_bytes = _count(audit, "journal_max_bytes", 64 * 1024 * 1024, most=1 << 40)
    if max_bytes < 4096:
        audit.fail("journal_max_bytes", f"must be at least 4096, got {max_bytes}")
    return audit.file_path("file", base), AuditConfig(
        on_failure=audit.choice("on_failure", AUDIT_ON_FAILURE, "refuse"),
        block_timeout=block_timeout,
        journal_max_bytes=max_bytes,
    )


def _limits(top: _Section) -> LimitsConfig:
    limits = top.section("limits", ("handshake_timeout", "max_connections",
                                    "max_connections_per_ip"))
    if limits is None:
        return LimitsConfig()
    default = LimitsConfig()
    total = _count(limits, "max_connections", default.max_connections)
    per_ip = _count(limits, "max_connections_per_ip", min(default.max_connections_per_ip, total))
    if per_ip > total:
        limits.fail("max_connections_per_ip", f"must not exceed max_connections ({total})")
    return LimitsConfig(
        handshake_timeout=limits.duration("handshake_timeout", default.handshake_timeout),
        max_connections=total,
        max_connections_per_ip=per_ip,
    )


AUTH_KEYS = ("throttle", "second_factor")
SECOND_FACTORS = ("off", "otp", "webauthn", "on", "optional")


def _second_factor(top: _Section) -> str:
    """``auth.second_factor``; YAML 1.1 reads a bare off/on as false/true, so take those too."""
    auth = top.section("auth", AUTH_KEYS)
    if auth is None or not auth.has("second_factor"):
        return "off"
    value = auth.raw("second_factor")
    if isinstance(value, bool):
        return "on" if value else "off"
    return auth.choice("second_factor", SECOND_FACTORS, "off")


def _throttle(top: _Section) -> ThrottleConfig:
    auth = top.section("auth", AUTH_KEYS)
    throttle = auth.section("throttle", tuple(attrs.fields_dict(ThrottleConfig))) if auth else None
    if throttle is None:
        return ThrottleConfig()
    default = ThrottleConfig()
    return ThrottleConfig(
        max_failures_per_user=_count(throttle, "max_failures_per_user",
                                     default.max_failures_per_user, 1000),
        max_failures_per_address=_count(throttle, "max_failures_per_address",
                                        default.max_failures_per_address, 100_000),
        window=throttle.duration("window", default.window),
        max_tracked=_count(throttle, "max_tracked", default.max_tracked),
        concurrent_hashes=_count(throttle, "concurrent_hashes", default.concurrent_hashes, 64),
        queued_hashes=_count(throttle, "queued_hashes", default.queued_hashes, 10_000),
    )


def _build_proxy(path: str, data: _Map) -> ProxyConfig:
    base = _base_dir(path)
    top = _Section(path, data, "", _PROXY_KEYS)
    data_dir = top.file_path("data_dir", base, required=True)
    public_addr = top.address("public_addr", required=True, default_port=443)
    public_host = _split_addr(public_addr, 443, False)[0]
    cluster_name = top.string("cluster_name", default=public_host)
    web = top.address("web_listen_addr", default="0.0.0.0:3080", allow_port_zero=True)
    tunnel = top.address("tunnel_listen_addr", default="0.0.0.0:3024", allow_port_zero=True)

    backend_type, backend_path = "sqlite", os.path.join(data_dir, "apptunnel.db")
    backend_dsn = backend_password_file = encryption_key_file = None
    backend = top.section("backend", ("type", "path", *_POSTGRES_KEYS[1:],
                                      "encryption_key_file"))
    if backend is not None:
        backend_type = backend.string("type", default="sqlite")
        if backend_type not in BACKEND_TYPES:
            backend.fail("type", f"expected one of {', '.join(BACKEND_TYPES)}, got {_show(backend_type)}")
        if backend_type == "postgres":
            if "path" in backend.data:
                backend.fail("path", "only for backend type sqlite")
            backend_dsn = _postgres_dsn(backend)
            backend_password_file = backend.file_path("password_file", base)
        else:
            for key in _POSTGRES_KEYS[1:]:
                if key in backend.data:
                    backend.fail(key, "only for backend type postgres")
            backend_path = backend.file_path("path", base) or backend_path
        encryption_key_file = backend.file_path("encryption_key_file", base)
        if encryption_key_file is not None:
            try:
                read_encryption_key(encryption_key_file)
            except ValueError as err:
                backend.fail("encryption_key_file", str(err))

    cert_file = key_file = None
    tls = top.section("tls", ("cert_file", "key_file"))
    if tls is not None:
        cert_file = tls.file_path("cert_file", base)
        key_file = tls.file_path("key_file", base)
        if cert_file and not key_file:
            tls.fail("key_file", "required when tls.cert_file is set")
        if key_file and not cert_file:
            tls.fail("cert_file", "required when tls.key_file is set")

    jwt_header, jwt_algorithm, jwt_ttl = "Apptunnel-Jwt-Assertion", "RS256", 300.0
    jwt = top.section("jwt", ("header", "algorithm", "ttl"))
    if jwt is not None:
        jwt_header = jwt.string("header", default=jwt_header)
        if not _HEADER_NAME.match(jwt_header):
            jwt.fail("header", f"not a valid HTTP header name: {_show(jwt_header)}")
        if "_" in jwt_header:
            jwt.fail("header", "must not contain '_' (proxies drop such headers)")
        jwt_algorithm = jwt.choice("algorithm", JWT_ALGORITHMS, jwt_algorithm)
        jwt_ttl = jwt.duration("ttl", jwt_ttl)

    audit_file, audit_config = _audit(top, base)

    interval, timeout = _keepalive(top)
    agent_cert_ttl = top.duration("agent_cert_ttl", 3 * 86400.0)
    if not 10.0 <= agent_cert_ttl <= 90 * 86400.0:
        top.fail("agent_cert_ttl", f"must be between 10s and 90d, got {_show(top.raw('agent_cert_ttl'))}")
    allowed = _allowed_public_addrs(top)
    ca_min_grace = top.duration("ca_min_grace_period", 3600.0)
    if not ca_min_grace >= 1.0:
        top.fail("ca_min_grace_period", f"must be at least 1s, got {_show(top.raw('ca_min_grace_period'))}")
    # Port 0 only when inherited from a tunnel_listen_addr with port 0 (tests): such a
    # proxy is not registered for other proxies' agents (proxy/peers.py).
    advertise = (top.address("advertise_tunnel_addr")
                 or default_advertise_addr(tunnel, public_host))
    diag_addr = _diag_addr(top, DEFAULT_PROXY_DIAG_ADDR)
    workers = _workers(top, web, tunnel, advertise, diag_addr)
    return ProxyConfig(
        path=os.path.abspath(path),
        cluster_name=cluster_name,
        data_dir=data_dir,
        public_addr=public_addr,
        web_listen_addr=web,
        tunnel_listen_addr=tunnel,
        backend_type=backend_type,
        backend_path=backend_path,
        tls_cert_file=cert_file,
        tls_key_file=key_file,
        jwt_header=jwt_header,
        jwt_algorithm=jwt_algorithm,
        jwt_ttl=jwt_ttl,
        session_ttl=top.duration("session_ttl", 43200.0),
        keepalive_interval=interval,
        keepalive_timeout=timeout,
        audit_file=audit_file,
        audit=audit_config,
        limits=_limits(top),
        throttle=_throttle(top),
        second_factor=_second_factor(top),
        agent_cert_ttl=agent_cert_ttl,
        app_grace_period=top.duration("app_grace_period", 120.0),
        allowed_public_addrs=allowed,
        bot_min_certificate_ttl=_bot_min_ttl(top),
        ca_min_grace_period=ca_min_grace,
        access_requests=_access_requests(top, base),
        backend_dsn=backend_dsn,
        backend_password_file=backend_password_file,
        backend_encryption_key_file=encryption_key_file,
        diag_addr=diag_addr,
        advertise_tunnel_addr=advertise,
        workers=workers,
    )


MAX_WORKERS_PER_CPU = 4


def _workers(top: _Section, web: str, tunnel: str, advertise: str, diag: str | None) -> int:
    """``workers``: a count or ``auto`` (one per CPU). Several workers need fixed ports:
    each binds the shared ones and its own tunnel (and diag) port next to them
    (proxy/workers.py), which an ephemeral port 0 cannot give."""
    most = (os.cpu_count() or 1) * MAX_WORKERS_PER_CPU
    if top.raw("workers") == "auto":
        count = min(os.cpu_count() or 1, most)
    else:
        count = _count(top, "workers", 1, most=most)
    if count == 1:
        return 1
    # (key, address, how many ports above it the workers use: proxy/workers.py)
    for key, addr, above in (("web_listen_addr", web, 0), ("tunnel_listen_addr", tunnel, count),
                             ("advertise_tunnel_addr", advertise, count),
                             ("diag_addr", diag, count - 1)):
        if addr is None:
            continue
        port = _split_addr(addr, None, True)[1]
        if port == 0:
            top.fail("workers", f"{count} workers need a fixed port in {key} (not 0)")
        if port + above > 65535:
            top.fail("workers", f"{count} workers need {key}'s port + {above} to be a port")
    return count


def _diag_addr(top: _Section, default: str) -> str | None:
    """``diag_addr``: host:port, or off; a host that is not loopback needs
    ``diag_addr_public: true`` (metrics name apps and agents, and nothing guards them)."""
    public = top.boolean("diag_addr_public", False)
    value = top.raw("diag_addr")
    if value is False or value == "off":   # YAML reads a bare off as false
        if "diag_addr_public" in top.data:
            top.fail("diag_addr_public", "diag_addr is off")
        return None
    addr = top.address("diag_addr", default=default, allow_port_zero=True)
    host = _split_addr(addr, None, True)[0]
    if not public and not _is_loopback(host):
        top.fail("diag_addr", f"{_show(host)} is not a loopback address: set "
                 "diag_addr_public: true to serve metrics and health beyond this machine")
    return addr


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def default_advertise_addr(tunnel_listen_addr: str, public_host: str) -> str:
    """tunnel_listen_addr, or public_host with its port when it listens on every address
    (0.0.0.0 or ::, which no agent can dial)."""
    host, port = _split_addr(tunnel_listen_addr, None, True)
    if host in ("0.0.0.0", "::", ""):
        return f"{public_host}:{port}"
    return tunnel_listen_addr


_DSN_PASSWORD = re.compile(r"(?:^|\s)password\s*=|^postgres(?:ql)?://[^/@]*:[^/@]*@", re.I)


def _postgres_dsn(backend: _Section) -> str:
    """backend.dsn: libpq key=value or a postgresql:// URI, never with a password in it
    (the config file is not a secret; password_file is). The dsn is never echoed back."""
    dsn = backend.string("dsn", required=True)
    assert dsn is not None
    if _DSN_PASSWORD.search(dsn.strip()):
        backend.fail("dsn", "must not contain a password: put it in password_file")
    return dsn


def _bot_min_ttl(top: _Section) -> float:
    """``bots: {min_certificate_ttl: 1m}``: the floor of a bot's certificate_ttl (1s..1h).
    Lower it only to watch renewals quickly (tests, demos): a bot asking for less than
    the floor is refused at join and renewal."""
    bots = top.section("bots", ("min_certificate_ttl",))
    if bots is None:
        return 60.0
    floor = bots.duration("min_certificate_ttl", 60.0)
    if not 1.0 <= floor <= 3600.0:
        bots.fail("min_certificate_ttl",
                  f"must be from 1s to 1h, got {_show(bots.raw('min_certificate_ttl'))}")
    return floor


def _access_requests(top: _Section, base: str) -> AccessRequestsConfig | None:
    """``access_requests: {webhook_url: https://..., ca_file: ...}``; https only, and no
    credentials in the URL (it is logged; put a secret in the path of a private host)."""
    section = top.section("access_requests", ("webhook_url", "ca_file"))
    if section is None:
        return None
    url = section.string("webhook_url", required=True)
    parsed = urlsplit(url)
    if parsed.scheme != "https" or not parsed.hostname:
        section.fail("webhook_url", f"expected an https:// URL, got {_show(url)}")
    if parsed.username is not None or parsed.password is not None:
        section.fail("webhook_url", "must not hold a user name or password")
    try:
        parsed.port
    except ValueError:
        section.fail("webhook_url", f"invalid port in {_show(url)}")
    return AccessRequestsConfig(url, section.file_path("ca_file", base))


def _allowed_public_addrs(top: _Section) -> tuple[str, ...]:
    """``[localhost:8443, "*.apps.example.com"]``: lower-cased host[:port] or *.domain."""
    items = top.sequence("allowed_public_addrs")
    out = []
    for index, entry in enumerate(items):
        key, line = f"allowed_public_addrs[{index}]", items.item_lines[index]
        text = entry.lower().rstrip(".") if isinstance(entry, str) else ""
        host = text[2:] if text.startswith("*.") else text
        try:
            _split_addr(host, 443, False)
        except ValueError:
            raise ConfigError(top.file, f"expected host, host:port or *.domain, got {_show(entry)}",
                              key=key, line=line) from None
        if text.startswith("*.") and ":" in host:
            raise ConfigError(top.file, f"a *.domain entry takes no port, got {_show(entry)}",
                              key=key, line=line)
        out.append(text)
    return tuple(out)


def join_section(top: _Section, who: str, printed_by: str) -> tuple[str | None, str | None]:
    """``join: {token, ca_pin}`` of an agent's or a bot's config: (token, pin), each None
    when absent. A token needs the pin, so the joiner verifies the proxy before sending it."""
    join = top.section("join", ("token", "ca_pin"))
    if join is None:
        return None, None
    token, pin = join.string("token"), join.string("ca_pin")
    if pin is not None and not is_pin(pin):
        join.fail("ca_pin", "expected 'sha256:' and 64 lowercase hex digits "
                            f"(printed by `{printed_by}`)")
    if token is not None and pin is None:
        join.fail("ca_pin", f"required with join.token, so the {who} can verify the proxy "
                            f"(printed by `{printed_by}`)")
    if token is None and who == "bot":
        join.fail("token", f"required in join (printed by `{printed_by}`)")
    return token, pin


def _build_agent(path: str, data: _Map) -> AgentConfig:
    base = _base_dir(path)
    top = _Section(path, data, "", _AGENT_KEYS)
    data_dir = top.file_path("data_dir", base, required=True)
    proxy_addr = top.address("proxy_addr", required=True)

    token, pin = join_section(top, "agent", "apptunnel tokens add")

    items = top.sequence("apps")
    apps: list[AppConfig] = []
    seen: dict[str, int] = {}
    for index, item in enumerate(items):
        line = items.item_lines[index] if index < len(items.item_lines) else items.line
        if not isinstance(item, _Map):
            raise ConfigError(path, f"expected a mapping with name and uri, got {_type_name(item)}",
                              key=f"apps[{index}]", line=line)
        app = _build_app(_Section(path, item, f"apps[{index}].", _APP_KEYS))
        if app.name in seen:
            raise ConfigError(path, f"duplicate app name {app.name!r} (first at line {seen[app.name]})",
                              key=f"apps[{index}].name", line=item.key_lines.get("name", line))
        seen[app.name] = item.key_lines.get("name", line)
        apps.append(app)

    interval, timeout = _keepalive(top)
    return AgentConfig(
        path=os.path.abspath(path),
        data_dir=data_dir,
        proxy_addr=proxy_addr,
        join_token=token,
        ca_pin=pin,
        apps=tuple(apps),
        keepalive_interval=interval,
        keepalive_timeout=timeout,
        resources=_resource_selectors(top),
        diag_addr=_diag_addr(top, DEFAULT_AGENT_DIAG_ADDR),
    )


def _resource_selectors(top: _Section) -> tuple[dict, ...]:
    """``resources: [{labels: {env: dev}}]``: which app resources this agent serves.

    Each selector follows a role's ``app_labels`` rules (exact, ``*``, ``^regex$``, lists;
    no trait templates); kept as plain ``{key: [values]}`` because the hello carries them
    and the proxy parses them again with the same rules."""
    items = top.sequence("resources")
    if len(items) > MAX_SELECTORS:
        top.fail("resources", f"at most {MAX_SELECTORS} selectors")
    out = []
    for index, item in enumerate(items):
        line = items.item_lines[index] if index < len(items.item_lines) else items.line
        if not isinstance(item, _Map):
            raise ConfigError(top.file, f"expected a mapping with labels, got {_type_name(item)}",
                              key=f"resources[{index}]", line=line)
        entry = _Section(top.file, item, f"resources[{index}].", ("labels",), line)
        labels = entry.raw("labels", required=True)
        try:
            parse_label_selector(entry.path("labels"), labels)
        except RoleError as err:
            raise ConfigError(top.file, err.message, line=entry.line("labels")) from None
        if not labels:
            entry.fail("labels", "an empty selector matches nothing (use {\"*\": \"*\"} for all)")
        out.append({k: list(v) if isinstance(v, list) else [v] for k, v in labels.items()})
    return tuple(out)


def _build_app(app: _Section) -> AppConfig:
    name = app.string("name", required=True)
    if not _DNS_LABEL.match(name):
        app.fail("name", f"expected a DNS label (a-z, 0-9, '-', at most 63), got {_show(name)}")

    uri = app.string("uri", required=True)
    try:
        parts = urlsplit(uri)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        app.fail("uri", f"not a valid URL: {_show(uri)}")
    if parts.scheme not in ("http", "https", "tcp"):
        app.fail("uri", f"expected an http:// or https:// URL (or tcp:// for a TCP app), got {_show(uri)}")
    if not parts.hostname:
        app.fail("uri", f"URL has no host: {_show(uri)}")
    tcp_ports = _tcp_ports(app, parts)

    labels = _labels(app)
    dynamic = _dynamic_labels(app, labels)

    public_addr = app.address("public_addr", default_port=443)
    rewrite_headers: list[tuple[str, str]] = []
    rewrite = app.section("rewrite", ("headers",))
    if rewrite is not None:
        headers = rewrite.sequence("headers")
        for index, entry in enumerate(headers):
            line = headers.item_lines[index]
            rewrite_headers.append(_parse_header(app.file, f"{rewrite.path('headers')}[{index}]",
                                                 line, entry))

    jwt_claims: tuple[str, ...] | None = None
    if app.has("jwt_claims"):
        claims = app.sequence("jwt_claims")
        for index, claim in enumerate(claims):
            if claim not in JWT_CLAIMS:
                raise ConfigError(app.file, f"unknown claim {_show(claim)} "
                                  f"(expected some of {', '.join(JWT_CLAIMS)})",
                                  key=f"{app.path('jwt_claims')}[{index}]",
                                  line=claims.item_lines[index])
        jwt_claims = tuple(dict.fromkeys(claims))

    return AppConfig(
        name=name,
        uri=uri,
        labels=labels,
        public_addr=public_addr,
        insecure_skip_verify=app.boolean("insecure_skip_verify", False),
        rewrite_headers=tuple(rewrite_headers),
        jwt_claims=jwt_claims,
        tcp_ports=tcp_ports,
        dynamic_labels=dynamic,
        description=_description(app),
    )


def _description(app: _Section) -> str:
    """``description:``: one line of text for the catalogue (at most MAX_DESCRIPTION)."""
    text = app.string("description") or ""
    if len(text) > MAX_DESCRIPTION:
        app.fail("description", f"at most {MAX_DESCRIPTION} characters, got {len(text)}")
    return text


def _labels(app: _Section) -> dict[str, str]:
    """``labels:``: a mapping of non-empty names to strings."""
    labels: dict[str, str] = {}
    raw_labels = app.raw("labels")
    if raw_labels is None:
        return labels
    if not isinstance(raw_labels, _Map):
        app.fail("labels", f"expected a mapping of strings, got {_type_name(raw_labels)}")
    for key, value in raw_labels.items():
        where = dict(file=app.file, line=raw_labels.key_lines.get(key, raw_labels.line))
        if not isinstance(key, str) or not key.strip():
            raise ConfigError(problem=f"label names must be non-empty strings, got {_show(key)}",
                              key=app.path("labels"), **where)
        if not isinstance(value, str):
            raise ConfigError(problem=f"expected a string, got {_type_name(value)} {_show(value)} "
                              "(quote it)", key=f"{app.path('labels')}.{key}", **where)
        labels[key] = value
    return labels


def _dynamic_labels(app: _Section, static: dict[str, str]) -> tuple[DynamicLabel, ...]:
    """``dynamic_labels: {commit: {command: [git, rev-parse, HEAD], period: 1m}}``."""
    raw = app.raw("dynamic_labels")
    if raw is None:
        return ()
    if not isinstance(raw, _Map):
        app.fail("dynamic_labels", f"expected a mapping of label names, got {_type_name(raw)}")
    if len(raw) > MAX_DYNAMIC_LABELS:
        app.fail("dynamic_labels", f"at most {MAX_DYNAMIC_LABELS} dynamic labels")
    out = []
    for key, spec in raw.items():
        where = f"{app.path('dynamic_labels')}."
        line = raw.key_lines.get(key, raw.line)
        if not isinstance(key, str) or not key.strip():
            raise ConfigError(app.file, f"label names must be non-empty strings, got {_show(key)}",
                              key=app.path("dynamic_labels"), line=line)
        if key in static:
            raise ConfigError(app.file, f"{key!r} is also a static label (a label is one or the "
                              "other)", key=f"{where}{key}", line=line)
        if not isinstance(spec, _Map):
            raise ConfigError(app.file, f"expected a mapping with command and period, got "
                              f"{_type_name(spec)}", key=f"{where}{key}", line=line)
        entry = _Section(app.file, spec, f"{where}{key}.", ("command", "period"), line)
        command = entry.raw("command", required=True)
        if (not isinstance(command, _Seq) or not command or len(command) > MAX_COMMAND_ARGS
                or not all(isinstance(arg, str) and arg and "\0" not in arg for arg in command)):
            entry.fail("command", f"expected a list of 1-{MAX_COMMAND_ARGS} non-empty strings "
                                  "(an argument vector; no shell runs it)")
        period = entry.duration("period", 60.0)
        if period < DYNAMIC_PERIOD_FLOOR:
            entry.fail("period", f"must be at least {DYNAMIC_PERIOD_FLOOR:g}s")
        out.append(DynamicLabel(key=key, command=tuple(command), period=period,
                                timeout=min(period, DYNAMIC_TIMEOUT)))
    return tuple(out)


# -- app resources (`kind: app`) --------------------------------------------------------

_RESOURCE_KEYS = ("kind", "version", "metadata", "spec")
_METADATA_KEYS = ("name", "labels", "description")


def _wrap(value: Any) -> Any:
    """Plain dicts and lists (no line numbers) as the loader's mappings and sequences."""
    if isinstance(value, dict):
        data = _Map((k, _wrap(v)) for k, v in value.items())
        data.line, data.key_lines = None, {}
        return data
    if isinstance(value, list):
        data = _Seq(_wrap(v) for v in value)
        data.line, data.item_lines = None, [None] * len(value)
        return data
    return value


def app_from_resource(where: str, doc: Any) -> AppConfig:
    """A ``kind: app`` document -> the AppConfig an agent's ``apps:`` entry would give.

    ``metadata: {name, labels}`` and ``spec: {uri, public_addr, rewrite, ...}`` (exactly an
    ``apps:`` entry's other keys), checked by the same parser as the agent config, so an
    app resource and a static app cannot mean different things. ConfigError naming
    ``where`` (a file, ``file: doc N``, or ``app resource NAME``) and the key."""
    if not isinstance(doc, dict):
        raise ConfigError(where, "expected a mapping with kind, metadata and spec")
    top = _Section(where, _wrap(doc), "", _RESOURCE_KEYS)
    if doc.get("kind") != "app":
        top.fail("kind", f"expected app, got {_show(doc.get('kind'))}")
    metadata = top.section("metadata", _METADATA_KEYS)
    if metadata is None:
        top.fail("metadata", "required key is missing")
    spec = top.section("spec", tuple(k for k in _APP_KEYS if k not in ("name", "labels")))
    if spec is None:
        top.fail("spec", "required key is missing")
    merged = _Map(spec.data)
    merged.line, merged.key_lines = None, {}
    merged["name"] = metadata.raw("name", required=True)
    if metadata.has("labels"):
        merged["labels"] = metadata.data["labels"]
    # Name and labels are checked first where they are written: under metadata.
    name = metadata.string("name", required=True)
    if not _DNS_LABEL.match(name):
        metadata.fail("name", f"expected a DNS label (a-z, 0-9, '-', at most 63), got "
                              f"{_show(name)}")
    _labels(metadata)
    return _build_app(_Section(where, merged, "spec.", _APP_KEYS))


def _tcp_ports(app: _Section, parts) -> tuple[tuple[int, int], ...]:
    """``tcp_ports: [5432, "8000-8010"]`` -> ((5432, 5432), (8000, 8010)).

    A tcp:// app must say which port(s) the agent may dial: the uri's port, or this list.
    """
    if not app.has("tcp_ports"):
        if parts.scheme == "tcp" and parts.port is None:
            app.fail("uri", "a tcp:// URL needs a port (or list the ports in tcp_ports)")
        if parts.scheme == "tcp" and parts.path not in ("", "/"):
            app.fail("uri", "a tcp:// URL has no path")
        return ()
    if parts.scheme != "tcp":
        app.fail("tcp_ports", "only for tcp:// apps")
    ports = app.sequence("tcp_ports")
    if not ports:
        app.fail("tcp_ports", "must list at least one port or range")
    ranges: list[tuple[int, int]] = []
    for index, entry in enumerate(ports):
        key, line = f"{app.path('tcp_ports')}[{index}]", ports.item_lines[index]
        try:
            ranges.append(parse_port_range(entry))
        except ValueError as err:
            raise ConfigError(app.file, str(err), key=key, line=line) from None
    return tuple(ranges)


def parse_port_range(entry: Any) -> tuple[int, int]:
    """``5432`` or ``"8000-8010"`` -> (low, high); ValueError naming the problem."""
    if isinstance(entry, bool):
        raise ValueError(f"expected a port or \"low-high\", got {_show(entry)}")
    if isinstance(entry, int):
        low = high = entry
    elif isinstance(entry, str) and entry.strip():
        first, dash, second = entry.strip().partition("-")
        if not (first.strip().isdigit() and first.strip().isascii()
                and (not dash or (second.strip().isdigit() and second.strip().isascii()))):
            raise ValueError(f"expected a port or \"low-high\", got {_show(entry)}")
        low = int(first)
        high = int(second) if dash else low
    else:
        raise ValueError(f"expected a port or \"low-high\", got {_show(entry)}")
    if not (1 <= low <= 65535 and 1 <= high <= 65535):
        raise ValueError(f"ports must be 1-65535, got {_show(entry)}")
    if low > high:
        raise ValueError(f"range must be low-high, got {_show(entry)}")
    return low, high


# Header names an app's rewrite may not set: they frame the request or its connection, so
# only the proxy writes them. Refused in the agent's config and again in the proxy's hello.
UNREWRITABLE_HEADERS = frozenset(
    ["content-length", "transfer-encoding", "connection", "upgrade", "keep-alive", "te",
     "trailer", "proxy-connection"]
)


def _parse_header(file: str, key: str, line: int, entry: Any) -> tuple[str, str]:
    """``"Name: value"`` -> (name, value); the value may be empty, never multi-line."""
    if not isinstance(entry, str) or ":" not in entry:
        raise ConfigError(file, f"expected \"Name: value\", got {_show(entry)}", key=key, line=line)
    name, _, value = entry.partition(":")
    name, value = name.strip(), value.strip()
    if not _HEADER_NAME.match(name):
        raise ConfigError(file, f"not a valid HTTP header name: {_show(name)}", key=key, line=line)
    if name.lower() in UNREWRITABLE_HEADERS:
        raise ConfigError(file, f"{name} frames the request; only the proxy sets it", key=key,
                          line=line)
    if any(ord(c) < 32 and c != "\t" or ord(c) == 127 for c in value):
        raise ConfigError(file, "header value must not contain control characters", key=key,
                          line=line)
    return name, value


# The same reader and checks for other rooms' config files (apptunnel/bot/config.py).
Section = _Section
load_config = _guard
base_dir = _base_dir
