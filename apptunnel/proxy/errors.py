"""The proxy room's error family: refusals and failures of the proxy's own listeners."""

from __future__ import annotations

from apptunnel.errors import ApptunnelError

__all__ = ["ProxyError", "Refusal"]


class ProxyError(ApptunnelError):
    """Root of the proxy's errors (a refused message, an unusable request, no agent)."""


class Refusal(ProxyError):
    """A TCP-access request (or one stream of a multiplexed one) answered with ``status``
    and a one-line ``message``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(status, message)
        self.status = status
        self.message = message
