"""`apptunnel migrate`: upgrade the storage schema explicitly, before starting proxies of a
new version, and say from which version to which. A proxy also migrates when it starts;
this verb lets an operator do it once, on purpose, and see the result."""

from __future__ import annotations

import argparse

from apptunnel.backend.base import BackendError
from apptunnel.cli.context import Io
from apptunnel.config import load_proxy_config


def add_parsers(verbs, common: argparse.ArgumentParser) -> None:
    migrate = verbs.add_parser("migrate", parents=[common],
                               help="upgrade the storage schema to this version's")
    migrate.set_defaults(user_handler=run_migrate)


def run_migrate(args: argparse.Namespace, io: Io) -> int:
    """Blocking on purpose: nothing else runs in this process. Errors propagate to the
    CLI's one-line reporter."""
    config = load_proxy_config(args.config)
    if config.backend_type == "sqlite":
        from apptunnel.backend.sqlite import migrate_file

        before, after = migrate_file(config.backend_path)
    elif config.backend_type == "postgres":
        from apptunnel.backend.postgres import migrate_database, read_password_file

        password = (read_password_file(config.backend_password_file)
                    if config.backend_password_file else None)
        before, after = migrate_database(config.backend_dsn, password)
    else:
        raise BackendError(f"migrate: backend type {config.backend_type!r} is not supported")
    io.out(migration_text(before, after) + "\n")
    return 0


def migration_text(before: int, after: int) -> str:
    if before == after:
        return f"schema is at version {after}; nothing to do"
    return f"schema migrated from version {before} to {after}"
