"""The tunnel's exception family.

Each error carries what it becomes on the wire (a reset/refusal ``code``), so the layer that
catches it never has to guess.  No Twisted import: the sans-IO codec raises these too.
"""

from __future__ import annotations


class TunnelError(Exception):
    """Base class of everything the tunnel raises."""


class TunnelProtocolError(TunnelError):
    """The peer broke the protocol; the whole connection ends with ``code``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(code, reason)
        self.code = int(code)
        self.reason = reason

    def __str__(self) -> str:
        return f"{_code_name(self.code)}: {self.reason}"


class StreamRefused(TunnelError):
    """An OPEN was answered with a refusal (or could not be sent at all)."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(code, reason)
        self.code = int(code)
        self.reason = reason

    def __str__(self) -> str:
        if self.reason:
            return f"stream refused ({_code_name(self.code)}): {self.reason}"
        return f"stream refused ({_code_name(self.code)})"


class TunnelLost(TunnelError):
    """The tunnel connection went away while this operation was in flight."""


def _code_name(code: int) -> str:
    # Imported lazily: frames imports this module.
    from apptunnel.tunnel.frames import ErrorCode

    try:
        return ErrorCode(code).name
    except ValueError:
        return f"code {code}"


def with_status(status: int, message: str) -> str:
    """A refusal reason that carries the HTTP-like status its client should show (the
    multiplexed ``proxy app`` connection: ``"403 you are not allowed to use db"``)."""
    return f"{int(status):03d} {message}"


def status_of(reason: str, default: int) -> tuple[int, str]:
    """(status, message) of a reason made by ``with_status``; ``default`` for any other."""
    head, _, rest = reason.partition(" ")
    if len(head) == 3 and head.isascii() and head.isdigit() and 100 <= int(head) <= 599:
        return int(head), rest
    return default, reason
