"""The root of apptunnel's errors, and the one error two rooms share (a bad operator file).

Each room has one exception family (``AuthError`` in auth/, ``BackendError`` in
backend/, ``ProxyError`` in proxy/, ``AgentError`` in agent/, ``CliError`` in cli/,
``ConfigError`` here), and every family derives from :class:`ApptunnelError`, which says
what it becomes where a person reads it: ``one_line()`` for the message and
``exit_code`` for the process status (1 failure, 2 usage or configuration). So the CLI
and the twistd plugins catch ONE type, not a list that grows with every room.
``tunnel/`` is the exception: it imports nothing of ours, and its ``TunnelError`` only
ever reaches protocol code, never a person.

``ConfigError`` lives here rather than in ``config.py`` because rooms that must not
import the config loader (auth's CA reading ``ca.key``) still report an unusable
operator file the same way; ``config.py`` re-exports it.
"""

from __future__ import annotations

__all__ = ["ApptunnelError", "ConfigError", "os_error_text"]


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def os_error_text(err: OSError) -> str:
    """``path: reason`` for an OSError (no ``[Errno 2]``, no repr), as people read it."""
    where = f"{err.filename}: " if err.filename else ""
    return f"{where}{err.strerror or err.__class__.__name__}"


class ApptunnelError(Exception):
    """An error a person may read: one line, and the exit status it means."""

    exit_code: int = 1

    def one_line(self) -> str:
        """The message without newlines (a peer's text can carry them)."""
        return _one_line(str(self))


class ConfigError(ApptunnelError):
    """A bad config file; ``str()`` is one line ``file[:line]: key: problem``.

    ``ConfigError(file, problem, key=..., line=...)`` builds that line; a caller that
    already has the whole line may pass just ``ConfigError(message)``.
    """

    exit_code = 2

    def __init__(self, file: str, problem: str | None = None, key: str | None = None,
                 line: int | None = None) -> None:
        if problem is None:
            self.file, self.line, self.key, self.problem = None, None, None, file
            super().__init__(_one_line(file))
            return
        self.file = file
        self.line = line
        self.key = key
        self.problem = problem
        where = file if line is None else f"{file}:{line}"
        text = f"{where}: {key}: {problem}" if key else f"{where}: {problem}"
        super().__init__(_one_line(text))
