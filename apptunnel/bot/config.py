"""bot.yaml -> `BotConfig`: what ``twistd apptunnel-bot`` needs, every problem one line.

```yaml
data_dir: /var/lib/apptunnel-bot          # its key and certificate (0700; key 0600)
proxy_addr: proxy.example.com:443         # the proxy's public web address
join: {token: "...", ca_pin: "sha256:..."}  # first start only (apptunnel bots add)
certificate_ttl: 20m                      # 1m..1h (down to the cluster's floor)
outputs:
  - {type: identity, path: /run/ci/identity}
  - {type: app-proxy, app: grafana, listen: "127.0.0.1:8080"}
```

The same reader as proxy.yaml and agent.yaml (``apptunnel/config.py``): unknown keys,
wrong types and bad values are ``file: key: problem`` with the line.
"""

from __future__ import annotations

import os
import re

import attrs

from apptunnel.auth.bots import DEFAULT_CERT_TTL, MAX_CERT_TTL
from apptunnel.config import ConfigError, Section, base_dir, join_section, load_config
from apptunnel.net import split_host_port

__all__ = ["AppProxyOutput", "BotConfig", "IdentityOutput", "load_bot_config"]

# A bot may ask for down to a second: whether the cluster issues that short is the proxy's
# decision (bots.min_certificate_ttl, default 1m), and a refusal says so at join.
MIN_ASKED_TTL = 1.0
OUTPUT_TYPES = ("identity", "app-proxy")
_TOP_KEYS = ("data_dir", "proxy_addr", "join", "certificate_ttl", "outputs")
_APP = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")


@attrs.frozen
class IdentityOutput:
    """``tls.crt``, ``tls.key`` and ``ca.crt`` in ``path`` for ``curl --cert``."""

    path: str


@attrs.frozen
class AppProxyOutput:
    """A loopback port leading to ``app``, exactly like ``apptunnel proxy app``."""

    app: str
    host: str
    port: int
    remote_port: int | None = None


@attrs.frozen
class BotConfig:
    path: str
    data_dir: str
    proxy_addr: str
    join_token: str | None
    ca_pin: str | None
    certificate_ttl: float = DEFAULT_CERT_TTL
    outputs: tuple[IdentityOutput | AppProxyOutput, ...] = ()


def load_bot_config(path: str) -> BotConfig:
    """Parse ``path``; ConfigError (one line) on any problem."""
    return load_config(path, _build)


def _build(path: str, data) -> BotConfig:
    base = base_dir(path)
    top = Section(path, data, "", _TOP_KEYS)
    data_dir = top.file_path("data_dir", base, required=True)
    proxy_addr = top.string("proxy_addr", required=True)
    try:
        split_host_port(proxy_addr, 443)
    except ValueError as err:
        top.fail("proxy_addr", f"{err} (the proxy's public web address, as "
                               "`apptunnel login --proxy` takes it)")
    token, pin = join_section(top, "bot", "apptunnel bots add")
    ttl = top.duration("certificate_ttl", DEFAULT_CERT_TTL)
    if not MIN_ASKED_TTL <= ttl <= MAX_CERT_TTL:
        top.fail("certificate_ttl", "must be from 1m to 1h (or down to the cluster's "
                                    "bots.min_certificate_ttl), got "
                                    f"{top.raw('certificate_ttl')!r}")
    return BotConfig(os.path.abspath(path), data_dir, proxy_addr, token, pin, ttl,
                     _outputs(top, base))


def _outputs(top: Section, base: str) -> tuple:
    items = top.sequence("outputs")
    outputs, paths, listens = [], set(), set()
    for index, item in enumerate(items):
        line = items.item_lines[index] if index < len(items.item_lines) else items.line
        key = f"outputs[{index}]"
        if not isinstance(item, dict):
            raise ConfigError(top.file, "expected a mapping with a type", key=key, line=line)
        kind = item.get("type")
        allowed = {"identity": ("type", "path"), "app-proxy": ("type", "app", "listen")}
        if kind not in allowed:
            raise ConfigError(top.file, f"expected one of {', '.join(OUTPUT_TYPES)}, "
                                        f"got {kind!r}", key=f"{key}.type", line=line)
        out = Section(top.file, item, f"{key}.", allowed[kind], line)
        if kind == "identity":
            where = out.file_path("path", base, required=True)
            if where in paths or where == os.path.normpath(top.file_path("data_dir", base)):
                out.fail("path", "used twice (or the data_dir itself): give each its own")
            paths.add(where)
            outputs.append(IdentityOutput(where))
            continue
        app = out.string("app", required=True)
        name, _, remote = app.partition(":")
        if not _APP.match(name) or (remote and not (remote.isdigit() and 0 < int(remote) < 65536)):
            out.fail("app", f"expected an app name (or NAME:PORT of a multi-port app), got {app!r}")
        listen = out.string("listen", required=True)
        try:
            host, port = split_host_port(listen, None)
        except (ValueError, TypeError):
            out.fail("listen", f"expected 127.0.0.1:PORT, got {listen!r}")
        if host not in ("127.0.0.1", "localhost", "::1") or not 0 < port < 65536:
            out.fail("listen", f"must be a loopback address with a port, like 127.0.0.1:8080 "
                               f"(anyone who reaches it acts as the bot), got {listen!r}")
        if (host, port) in listens:
            out.fail("listen", f"{listen} is used twice")
        listens.add((host, port))
        outputs.append(AppProxyOutput(name, "127.0.0.1" if host == "localhost" else host,
                                      port, int(remote) if remote else None))
    return tuple(outputs)
