"""The proxy room's error family: refusals and failures of the proxy's own listeners."""

from __future__ import annotations

from apptunnel.errors import ApptunnelError

__all__ = ["ProxyError"]


class ProxyError(ApptunnelError):
    """Root of the proxy's errors (a refused message, an unusable request, no agent)."""
