"""The `apptunnel` command: parse, call, print.

Exit status 0 on success, 2 for usage and configuration errors, 1 for other failures;
every error is one line ``apptunnel: error: ...`` on stderr, never a traceback.

Work is split in two so the reactor only runs when there is storage to talk to:
`prepare` (parse arguments, load the config, read stdin and input files) is plain
synchronous code, and `execute` runs the verb against the backend under the reactor.
`run` does both on a reactor that is already running (the tests use it in-process);
`main` is the console script and drives `execute` with `twisted.internet.task.react`.

The user's verbs (login, status, logout, apps ls) need no config and no reactor: they talk
to a proxy over HTTPS with blocking `requests`, so `prepare` runs them to completion.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
from typing import Any, Mapping, NoReturn, TextIO

import attrs
from twisted.internet import defer
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    globalLogBeginner,
)

from apptunnel.cli import (
    agents, apps, audit_search, bots, locks, login, mfa, migrate, proxy_app, requests,
    resources, rotate, tokens, users,
)
from apptunnel.cli.context import Admin, Io, UsageError
from apptunnel.cli.output import clean
from apptunnel.config import ProxyConfig, load_proxy_config
from apptunnel.errors import ApptunnelError, os_error_text

DEFAULT_CONFIG = "/etc/apptunnel/proxy.yaml"


class _ParserExit(Exception):
    """argparse wanted to exit (``--help``): carry the status out instead of sys.exit."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors become one-line UsageErrors."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see `{self.prog} --help`)")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            raise UsageError(message.strip())
        raise _ParserExit(status)


def version_text() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version

        ours = version("apptunnel")
    except PackageNotFoundError:
        ours = "(not installed)"
    import twisted

    return f"apptunnel {ours} (Python {platform.python_version()}, Twisted {twisted.__version__})"


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    """The whole command line; ``--config`` is accepted before or after the verb."""
    default_config = environ.get("APPTUNNEL_CONFIG") or DEFAULT_CONFIG
    common = _Parser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS, metavar="PATH",
                        help=f"proxy config file (default: $APPTUNNEL_CONFIG or {DEFAULT_CONFIG})")
    parser = _Parser(
        prog="apptunnel",
        description="Administer an apptunnel cluster: join tokens, users, roles, audit.",
    )
    parser.add_argument("--config", default=default_config, metavar="PATH",
                        help=f"proxy config file (default: $APPTUNNEL_CONFIG or {DEFAULT_CONFIG})")
    # Not required: a bare `apptunnel` prints this help (see `prepare`), not an error.
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")
    tokens.add_parsers(verbs, common)
    bots.add_parsers(verbs, common)
    agents.add_parsers(verbs, common)
    users.add_parsers(verbs, common)
    resources.add_parsers(verbs, common)
    audit_search.add_parsers(verbs, common)
    locks.add_parsers(verbs, common)
    login.add_parsers(verbs, common)
    apps.add_parsers(verbs, common)
    proxy_app.add_parsers(verbs, common)
    mfa.add_parsers(verbs, common)
    requests.add_parsers(verbs, common)
    migrate.add_parsers(verbs, common)
    rotate.add_parsers(verbs, common)
    verbs.add_parser("version", parents=[common], help="print the version")
    return parser


@attrs.frozen
class Invocation:
    """A parsed command with its config and inputs, ready to run against the backend."""

    args: argparse.Namespace
    config: ProxyConfig
    io: Io


def report(io: Io, err: BaseException) -> int:
    """One stderr line for any failure, and the exit status it means."""
    if isinstance(err, ApptunnelError):   # every room's family: its own line and status
        io.error(err.one_line())
        return err.exit_code
    if isinstance(err, OSError):
        io.error(os_error_text(err))
        return 1
    io.error(f"internal error: {type(err).__name__}: {err}")
    return 1


def prepare(argv: list[str], io: Io) -> Invocation | int:
    """Parse and load everything that does not need the reactor; an int is an exit status."""
    try:
        parser = build_parser(io.environ)
        with contextlib.redirect_stdout(io.stdout), contextlib.redirect_stderr(io.stderr):
            args = parser.parse_args(argv)
        if args.verb is None:   # like git: the help on stdout, and a usage status
            io.out(parser.format_help())
            return 2
        if args.verb == "version":
            io.out(version_text() + "\n")
            return 0
        user_handler = getattr(args, "user_handler", None)
        if user_handler is not None:
            return user_handler(args, io)
        config = load_proxy_config(args.config)
        read_inputs = getattr(args, "read_inputs", None)
        if read_inputs is not None:
            read_inputs(args, io)
        return Invocation(args, config, io)
    except _ParserExit as done:
        return done.status
    except Exception as err:  # noqa: BLE001 - every failure becomes one line
        return report(io, err)


async def execute(reactor: Any, invocation: Invocation) -> int:
    """Open the backend, run the verb, flush the audit log; never raises."""
    io = invocation.io
    try:
        admin = Admin.open(invocation.config, reactor, io)
        try:
            return await invocation.args.handler(admin, invocation.args)
        finally:
            await admin.close()
    except Exception as err:  # noqa: BLE001 - every failure becomes one line
        return report(io, err)


async def run(reactor: Any, argv: list[str], io: Io | None = None) -> int:
    """The whole CLI on an already running reactor; returns the exit status."""
    io = io if io is not None else default_io()
    prepared = prepare(argv, io)
    if isinstance(prepared, int):
        return prepared
    return await execute(reactor, prepared)


def default_io() -> Io:
    return Io(stdin=sys.stdin, stdout=sys.stdout, stderr=sys.stderr, environ=os.environ)


def _log_warnings_to(stream: TextIO) -> None:
    """Library warnings (e.g. a CA key readable by others) as one line each, no tracebacks."""

    def observe(event: dict) -> None:
        text = formatEvent(event) or "(no message)"
        stream.write(f"apptunnel: warning: {clean(text)}\n")

    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)
    globalLogBeginner.beginLoggingTo([FilteringLogObserver(observe, [predicate])],
                                     discardBuffer=True, redirectStandardIO=False)


def main(argv: list[str] | None = None) -> NoReturn:
    """Console script entry point: exits with the command's status."""
    io = default_io()
    prepared = prepare(list(sys.argv[1:] if argv is None else argv), io)
    if isinstance(prepared, int):
        sys.exit(prepared)
    _log_warnings_to(io.stderr)
    from twisted.internet import task

    async def react_main(reactor: Any) -> None:
        code = await execute(reactor, prepared)
        if code:
            raise SystemExit(code)

    task.react(lambda reactor: defer.ensureDeferred(react_main(reactor)))


if __name__ == "__main__":
    main()
