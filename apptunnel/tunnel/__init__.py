"""The tunnel: a framed protocol multiplexing many byte streams over one connection.

Wire format in ``docs/protocol.rst``; module contract in ``docs/internals.rst``.
"""

from apptunnel.tunnel.errors import StreamRefused, TunnelError, TunnelLost, TunnelProtocolError
from apptunnel.tunnel.frames import ErrorCode

__all__ = ["ErrorCode", "StreamRefused", "TunnelError", "TunnelLost", "TunnelProtocolError"]
