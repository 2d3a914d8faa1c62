"""Which apps are online, and through which agent tunnels the proxy can reach them.

An app is online while at least one live tunnel announced it. When its last tunnel goes
away the app stays *known* (offline) with what the agent last told us, so a request for it
is answered "no agent is serving this app" (503) rather than "no such host" (404), and
the UI can show it as offline.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
from twisted.logger import Logger

log = Logger()


@attrs.frozen
class AppInfo:
    """One app as announced by an agent (``public_addr`` already defaulted by the caller)."""

    name: str
    uri: str
    labels: dict[str, str] = attrs.field(factory=dict)
    public_addr: str = ""
    rewrite_headers: tuple[tuple[str, str], ...] = ()
    jwt_claims: tuple[str, ...] | None = None
    agent_id: str = ""
    tcp_ports: tuple[tuple[int, int], ...] = ()   # (low, high) ranges of a multi-port TCP app

    @property
    def kind(self) -> str:
        """``tcp`` for raw TCP apps (``tcp://``), else ``http``."""
        return "tcp" if self.uri.startswith("tcp://") else "http"


def host_only(host: str) -> str:
    """``Host`` header or address without its port, lower-cased, no trailing dot."""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        host = host[: end + 1] if end > 0 else host
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


class AgentRegistry:
    """Live tunnels and their apps; lookups by name or by the Host a browser used."""

    def __init__(self) -> None:
        self._tunnels: dict[Any, tuple[str, list[AppInfo]]] = {}
        # name -> [(tunnel, AppInfo)] in registration order; rebuilt on every change.
        self._by_name: dict[str, list[tuple[Any, AppInfo]]] = {}
        self._by_host: dict[str, str] = {}
        self._turn: dict[str, int] = {}
        # Every app ever announced since start, by name, and its host; outlives tunnels.
        self._known: dict[str, AppInfo] = {}
        self._known_hosts: dict[str, str] = {}
        self._drain_listeners: list[Callable[[Any], None]] = []

    def add(self, tunnel: Any, agent_id: str, apps: list[AppInfo]) -> None:
        """Register (or re-register) what one tunnel serves."""
        self._tunnels[tunnel] = (agent_id, list(apps))
        self._rebuild()

    def remove(self, tunnel: Any) -> None:
        if self._tunnels.pop(tunnel, None) is not None:
            self._rebuild()

    def add_drain_listener(self, listener: Callable[[Any], None]) -> None:
        """Call ``listener(tunnel)`` whenever a tunnel starts going away (see ``drain``)."""
        self._drain_listeners.append(listener)

    def drain(self, tunnel: Any) -> None:
        """The tunnel is going away: pick it no more, and tell listeners so the streams
        they keep open on it between requests can be let go (the tunnel then closes)."""
        self.remove(tunnel)
        for listener in list(self._drain_listeners):
            try:
                listener(tunnel)
            except Exception:
                log.failure("drain listener failed")

    def apps(self, include_offline: bool = False) -> list[AppInfo]:
        """Online apps (and known offline ones if asked), one per name, sorted by name."""
        if include_offline:
            return [app for _, app in sorted(self._known.items())]
        return [entries[0][1] for _, entries in sorted(self._by_name.items())]

    def is_online(self, name: str) -> bool:
        return name in self._by_name

    def app(self, name: str) -> AppInfo | None:
        """The app called ``name``, online or last seen."""
        entries = self._by_name.get(name)
        return entries[0][1] if entries else self._known.get(name)

    def app_by_host(self, host: str) -> AppInfo | None:
        """The app whose public address is ``host``, ignoring case and any port."""
        host = host_only(host)
        name = self._by_host.get(host) or self._known_hosts.get(host)
        return self.app(name) if name is not None else None

    def host_owner(self, host: str) -> str | None:
        """The name of the app (online or last seen) that holds public ``host``, if any."""
        host = host_only(host)
        return self._by_host.get(host) or self._known_hosts.get(host)

    def pick(self, name: str) -> Any | None:
        """A tunnel serving ``name``, taking turns over those not going away."""
        entries = [entry for entry in self._by_name.get(name, ())
                   if not getattr(entry[0], "going_away", False)]
        if not entries:
            return None
        turn = self._turn.get(name, 0) % len(entries)
        self._turn[name] = turn + 1
        return entries[turn][0]

    def _rebuild(self) -> None:
        by_name: dict[str, list[tuple[Any, AppInfo]]] = {}
        for tunnel, (_, apps) in self._tunnels.items():
            for app in apps:
                by_name.setdefault(app.name, []).append((tunnel, app))
        by_host: dict[str, str] = {}
        for name, entries in by_name.items():
            host = host_only(entries[0][1].public_addr)
            owner = by_host.setdefault(host, name)
            if owner != name:
                log.warn(
                    "apps {first} and {second} claim the same public address {host}; "
                    "serving {first}", first=owner, second=name, host=host,
                )
        self._by_name = by_name
        self._by_host = by_host
        for host, name in by_host.items():
            self._known[name] = by_name[name][0][1]
            for old_host in [h for h, n in self._known_hosts.items() if n == name and h != host]:
                del self._known_hosts[old_host]
            self._known_hosts[host] = name
        self._turn = {name: turn for name, turn in self._turn.items() if name in by_name}
