"""The auth room's one exception: what went wrong, as the web boundary will show it."""

from __future__ import annotations

from apptunnel.errors import ApptunnelError


class AuthError(ApptunnelError):
    """Carries the HTTP status and a public message that is safe to show any caller."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def one_line(self) -> str:
        return " ".join(self.message.split())

    def __repr__(self) -> str:
        return f"AuthError({self.status}, {self.message!r})"
