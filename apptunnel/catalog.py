"""What apps exist, as the web UI and the JSON API see them: a read-only catalogue.

``AppInfo`` is one app's registration (announced by an agent, checked by the tunnel
server). ``AppCatalog`` is the reading side of the proxy's registry: the web room lists
and looks apps up through it and never sees tunnels, picking or draining, so ``web/``
needs nothing from ``proxy/``. ``proxy.registry.AgentRegistry`` implements it.
"""

from __future__ import annotations

from typing import Protocol

import attrs

__all__ = ["AppCatalog", "AppInfo"]


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
    description: str = ""     # one line for the catalogue (the app entry's `description`)

    @property
    def kind(self) -> str:
        """``tcp`` for raw TCP apps (``tcp://``), else ``http``."""
        return "tcp" if self.uri.startswith("tcp://") else "http"


class AppCatalog(Protocol):
    """Read-only view of the known apps (online, or offline within a grace period)."""

    def apps(self, include_offline: bool = False) -> list[AppInfo]:
        """Online apps (and known offline ones if asked), one per name, sorted by name."""

    def app(self, name: str) -> AppInfo | None:
        """The registration of ``name``, or None."""

    def app_by_host(self, host: str) -> AppInfo | None:
        """The app whose public address is ``host`` (case and port ignored), or None."""

    def is_online(self, name: str) -> bool:
        """Whether some live tunnel serves ``name`` now."""
