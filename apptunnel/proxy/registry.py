"""Which apps are online, what each one is, and through which tunnels it is reached.

An app name has ONE registration: the definition its first agent announced (uri, labels,
public address, rewrites, JWT claims, ports). Policy reads that registration (``app``,
``app_by_host``) and forwarding picks among the tunnels that announced exactly it
(``pick``), so what is checked is what is routed to. Another agent may serve the same name
only with an identical definition (load-balanced); a different one is refused for that
app (``add`` returns why), the agent's other apps register.

When its last tunnel goes away an app stays *known* (offline) for a grace period, so a
request for it is answered 503 rather than 404 and no other agent can take its name or
host meanwhile; an agent that served it may come back with a changed definition (a
restart after a config change). After the grace period the name is forgotten.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from apptunnel.catalog import AppInfo
from apptunnel.net import host_only

log = Logger()

DEFAULT_GRACE = 120.0


@attrs.define
class _Registration:
    """The one definition of an app name, who served it, and since when it is offline."""

    app: AppInfo
    agents: set[str]
    offline_since: float | None = None


def definition(app: AppInfo) -> AppInfo:
    """What must be identical for two agents to serve one name: all but the agent id."""
    return attrs.evolve(app, agent_id="")


class AgentRegistry:
    """Live tunnels and their apps; lookups by name or by the Host a browser used.

    Implements ``catalog.AppCatalog`` (``apps``, ``app``, ``app_by_host``, ``is_online``)
    for the web room; the rest (``add``, ``remove``, ``pick``, ``drain``) is the proxy's.
    """

    def __init__(self, clock: IReactorTime | None = None, grace: float = DEFAULT_GRACE) -> None:
        self._clock = clock
        self._grace = grace
        self._tunnels: dict[Any, tuple[str, list[AppInfo]]] = {}
        self._names: dict[str, _Registration] = {}
        self._hosts: dict[str, str] = {}       # public host -> app name, for every known name
        self._serving: dict[str, list[Any]] = {}   # name -> tunnels, in registration order
        self._turn: dict[str, int] = {}
        self._offline: set[str] = set()        # names with no tunnel, within the grace period
        self._drain_listeners: list[Callable[[Any], None]] = []
        self._change_listeners: list[Callable[[str], None]] = []

    def add(self, tunnel: Any, agent_id: str, apps: list[AppInfo]) -> list[tuple[str, str]]:
        """Register (or re-register) what one tunnel serves; returns (name, reason) for
        each app refused because its name or public host is defined otherwise."""
        self._forget_expired()
        if tunnel in self._tunnels:
            self.remove(tunnel)
        accepted, refused, changed = [], [], []
        for app in apps:
            reason = self._conflict(app, agent_id)
            if reason is not None:
                refused.append((app.name, reason))
                continue
            accepted.append(app)
            reg = self._names.get(app.name)
            if reg is None or reg.offline_since is not None and definition(reg.app) != definition(app):
                if reg is not None:
                    changed.append(app.name)
                self._define(app)
                reg = self._names[app.name]
            reg.agents.add(agent_id)
            reg.offline_since = None
            self._offline.discard(app.name)
        self._tunnels[tunnel] = (agent_id, accepted)
        self._rebuild()
        for name in changed:
            self._tell(self._change_listeners, name)
        return refused

    def _conflict(self, app: AppInfo, agent_id: str) -> str | None:
        host = host_only(app.public_addr)
        owner = self._hosts.get(host)
        if owner is not None and owner != app.name:
            return f"public address {host} belongs to app {owner}"
        reg = self._names.get(app.name)
        if reg is None or definition(reg.app) == definition(app):
            return None
        if reg.offline_since is not None and agent_id in reg.agents:
            return None   # its own agent, back with a changed config
        fields = [f.name for f in attrs.fields(AppInfo)
                  if f.name != "agent_id" and getattr(reg.app, f.name) != getattr(app, f.name)]
        return (f"app {app.name} is already defined differently by agent {reg.app.agent_id} "
                f"({', '.join(fields)} differ)")

    def _define(self, app: AppInfo) -> None:
        old = self._names.get(app.name)
        if old is not None:
            self._hosts.pop(host_only(old.app.public_addr), None)
        self._names[app.name] = _Registration(app, set())
        self._hosts[host_only(app.public_addr)] = app.name

    def remove(self, tunnel: Any) -> None:
        entry = self._tunnels.pop(tunnel, None)
        if entry is None:
            return
        self._rebuild()
        now = self._clock.seconds() if self._clock is not None else 0.0
        for app in entry[1]:
            reg = self._names.get(app.name)
            if reg is not None and app.name not in self._serving and reg.offline_since is None:
                reg.offline_since = now
                self._offline.add(app.name)

    def add_drain_listener(self, listener: Callable[[Any], None]) -> None:
        """Call ``listener(tunnel)`` whenever a tunnel starts going away (see ``drain``)."""
        self._drain_listeners.append(listener)

    def add_change_listener(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(name)`` when the definition of a known app changes (new labels
        from a dynamic label or an edited app resource), so live connections are checked
        again against it."""
        self._change_listeners.append(listener)

    def drain(self, tunnel: Any) -> None:
        """The tunnel is going away: pick it no more, and tell listeners so the streams
        they keep open on it between requests can be let go (the tunnel then closes)."""
        self.remove(tunnel)
        self._tell(self._drain_listeners, tunnel)

    @staticmethod
    def _tell(listeners: list[Callable[[Any], None]], what: Any) -> None:
        for listener in list(listeners):
            try:
                listener(what)
            except Exception:
                log.failure("registry listener failed")

    def apps(self, include_offline: bool = False) -> list[AppInfo]:
        """Online apps (and known offline ones if asked), one per name, sorted by name."""
        self._forget_expired()
        return [reg.app for name, reg in sorted(self._names.items())
                if include_offline or name in self._serving]

    def tunnels(self) -> list[tuple[str, Any]]:
        """(agent id, tunnel) for every live tunnel (metrics read them at scrape time)."""
        return [(agent_id, tunnel) for tunnel, (agent_id, _) in self._tunnels.items()]

    def is_online(self, name: str) -> bool:
        """Whether some live tunnel serves ``name`` now."""
        return name in self._serving

    def app(self, name: str) -> AppInfo | None:
        """The registration of ``name`` (online, or offline within the grace period)."""
        self._forget_expired()
        reg = self._names.get(name)
        return reg.app if reg is not None else None

    def app_by_host(self, host: str) -> AppInfo | None:
        """The app whose public address is ``host``, ignoring case and any port."""
        name = self.host_owner(host)
        return self.app(name) if name is not None else None

    def host_owner(self, host: str) -> str | None:
        """The name of the app (online or last seen) that holds public ``host``, if any."""
        self._forget_expired()
        return self._hosts.get(host_only(host))

    def pick(self, name: str, checked: AppInfo | None = None,
             exclude: frozenset = frozenset()) -> Any | None:
        """A tunnel serving ``name``'s registration, taking turns over those not going away
        (and not in ``exclude``: those a failed open was already tried on).

        With ``checked`` (the AppInfo a decision was made on), None unless that is still
        the registration: a request is never routed to a definition it was not checked on.
        """
        reg = self._names.get(name)
        if checked is not None and (reg is None or definition(reg.app) != definition(checked)):
            return None
        tunnels = [t for t in self._serving.get(name, ())
                   if not getattr(t, "going_away", False) and t not in exclude]
        if not tunnels:
            return None
        turn = self._turn.get(name, 0) % len(tunnels)
        self._turn[name] = turn + 1
        return tunnels[turn]

    def _rebuild(self) -> None:
        serving: dict[str, list[Any]] = {}
        for tunnel, (_, apps) in self._tunnels.items():
            for app in apps:
                serving.setdefault(app.name, []).append(tunnel)
        self._serving = serving
        self._turn = {name: turn for name, turn in self._turn.items() if name in serving}

    def _forget_expired(self) -> None:
        """Drop names offline for longer than the grace period (never without a clock)."""
        if self._clock is None or not self._offline:
            return
        cutoff = self._clock.seconds() - self._grace
        for name in [n for n in self._offline if self._names[n].offline_since <= cutoff]:
            self._offline.discard(name)
            reg = self._names.pop(name)
            self._hosts.pop(host_only(reg.app.public_addr), None)
            log.info("app {app} forgotten after {grace:.0f}s offline", app=name,
                     grace=self._grace)
