"""What a stream open may name: an app, and for a TCP app one of its declared ports.

The agent enforces it before dialing (a stream can never be aimed at an undeclared port);
the proxy asks the same function before it opens a stream, so ``apptunnel proxy app`` is
told at once (and its dry run can answer) with the agent's own words.
"""

from __future__ import annotations

from typing import Protocol
from urllib.parse import urlsplit

from apptunnel.tunnel.errors import StreamRefused
from apptunnel.tunnel.frames import ErrorCode

__all__ = ["target_port"]


class ServedApp(Protocol):
    """What the rule reads of an app: the agent's AppConfig and the proxy's AppInfo."""

    name: str
    uri: str
    tcp_ports: tuple[tuple[int, int], ...]

    @property
    def kind(self) -> str: ...


def target_port(app: ServedApp, requested) -> int | None:
    """The port a stream may dial: only the uri's port or a declared tcp_ports range.

    HTTP apps take no port (None = the uri's). A refusal is ``UNKNOWN_TARGET``, the same
    code as an unknown app: the tunnel can never be aimed at an undeclared port.
    """
    if app.kind != "tcp":
        if requested is not None:
            raise StreamRefused(ErrorCode.UNKNOWN_TARGET, f"{app.name} is an HTTP app: no port")
        return None
    uri_port = urlsplit(app.uri).port
    if requested is None:
        if uri_port is None:
            raise StreamRefused(ErrorCode.UNKNOWN_TARGET,
                                f"{app.name} serves several ports: name one")
        return uri_port
    if type(requested) is not int:
        raise StreamRefused(ErrorCode.UNKNOWN_TARGET, "port must be a number")
    if requested == uri_port or any(low <= requested <= high for low, high in app.tcp_ports):
        return requested
    raise StreamRefused(ErrorCode.UNKNOWN_TARGET, f"port {requested} is not served by {app.name}")
