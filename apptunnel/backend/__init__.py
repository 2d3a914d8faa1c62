"""Storage: pick the backend named in the proxy config."""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet.interfaces import IReactorCore

from apptunnel.backend.base import (AlreadyExists, Backend, BackendError, NotFound,
                                    StorageUnavailable)

if TYPE_CHECKING:
    from apptunnel.config import ProxyConfig

__all__ = ["AlreadyExists", "Backend", "BackendError", "NotFound", "StorageUnavailable",
           "open_backend"]


def open_backend(config: "ProxyConfig", reactor: IReactorCore) -> Backend:
    """Return the backend for ``config.backend_type``; BackendError names an unknown type."""
    if config.backend_type == "sqlite":
        from apptunnel.backend.sqlite import SqliteBackend

        return SqliteBackend(config.backend_path, reactor)
    if config.backend_type == "postgres":
        from apptunnel.backend.postgres import PostgresBackend, read_password_file

        password = (read_password_file(config.backend_password_file)
                    if config.backend_password_file else None)
        return PostgresBackend(config.backend_dsn, reactor, password=password)
    raise BackendError(
        f"unknown backend type {config.backend_type!r} (supported: sqlite, postgres)"
    )
