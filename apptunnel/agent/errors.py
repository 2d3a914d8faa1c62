"""The agent room's error family."""

from __future__ import annotations

from apptunnel.errors import ApptunnelError

__all__ = ["AgentError"]


class AgentError(ApptunnelError):
    """Root of the agent's errors; ``str()`` is one line for the operator."""
