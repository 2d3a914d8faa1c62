"""What every admin verb works with: streams, the proxy's backend and the audit log.

Admin verbs talk to the storage of ``--config`` directly (no running proxy needed), and
every change they make is written to the audit log, flushed before the process exits.
"""

from __future__ import annotations

import os
import pwd
from typing import Any, Mapping, TextIO

import attrs
from twisted.internet.interfaces import IReactorTime

from apptunnel.admin.context import Actor, AdminContext, AdminError, USAGE
from apptunnel.audit import AuditLog
from apptunnel.audit.chain import CLI_CHAIN
from apptunnel.auth.ca_set import CaLoader, CaSet
from apptunnel.auth.keystore import KeyStore, KeyStoreError, sealer_from_file
from apptunnel.backend import Backend, open_backend
from apptunnel.cli.control import refresh_proxy
from apptunnel.cli.output import clean
from apptunnel.config import ProxyConfig, parse_duration
from apptunnel.errors import ApptunnelError


class CliError(ApptunnelError):
    """A failure to report as one line; ``code`` is the exit status (1 failure, 2 usage)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.exit_code = code

    def one_line(self) -> str:
        return self.message


class UsageError(CliError):
    """Bad arguments or bad input files: exit status 2."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code=2)


def duration_arg(flag: str, text: str | None, most: float | None = None,
                 most_text: str = "") -> float | None:
    """A duration option (``--ttl 2h``) in seconds; None when not given. More than 0 and,
    with ``most``, at most that (``most_text`` says it the way a user writes it)."""
    if text is None:
        return None
    try:
        value = parse_duration(text)
    except ValueError as err:
        raise UsageError(f"{flag}: {err}") from None
    if value <= 0 or (most is not None and value > most):
        limit = f" and at most {most_text}" if most is not None else ""
        raise UsageError(f"{flag}: must be more than 0{limit}, got {text!r}")
    return value


def cli_error(err: AdminError) -> CliError:
    """An admin service's refusal as the CLI says it: ``--field: problem``."""
    text = err.text("--")
    return UsageError(text) if err.kind == USAGE else CliError(text)


@attrs.define
class Io:
    """The process's streams and environment, passed in so tests run the CLI in-process."""

    stdin: TextIO
    stdout: TextIO
    stderr: TextIO
    environ: Mapping[str, str]
    uid: int = attrs.field(factory=os.getuid)   # the real account running the command

    def out(self, text: str) -> None:
        self.stdout.write(text)

    def warn(self, message: str) -> None:
        self.stderr.write(f"apptunnel: warning: {clean(message)}\n")

    def error(self, message: str) -> None:
        self.stderr.write(f"apptunnel: error: {clean(message)}\n")

    def password_line(self, limit: int) -> str:
        """The password given on stdin (``--password-stdin``): one line, at most ``limit``."""
        text = self.stdin.read(limit + 3)
        if text.endswith("\n"):
            text = text[:-1]
            if text.endswith("\r"):
                text = text[:-1]
        if "\n" in text or "\r" in text:
            raise UsageError("--password-stdin: expected the password on a single line")
        if len(text) > limit:
            raise UsageError(f"--password-stdin: password longer than {limit} characters")
        return text

    @property
    def actor(self) -> str:
        """Who ran the command, for the audit log: the real OS account (uid -> name).

        Never ``$USER`` or ``$LOGNAME``: anyone sets those. An account without a passwd
        entry is ``uid:N``.
        """
        try:
            return pwd.getpwuid(self.uid).pw_name
        except KeyError:
            return f"uid:{self.uid}"

    @property
    def sudo_user(self) -> str | None:
        """Who ran ``sudo``, noted beside the actor when root runs the command through it.

        Only root can have it, and root could write anything anyway: it is a note for the
        reader of the audit log, never the actor.
        """
        if self.uid != 0:
            return None
        return clean(self.environ.get("SUDO_USER", "").strip())[:64] or None


class Admin:
    """An open backend plus the audit log for one CLI run; `close` flushes the audit."""

    def __init__(self, config: ProxyConfig, reactor: Any, io: Io, backend: Backend,
                 audit: AuditLog) -> None:
        self.config = config
        self.reactor = reactor
        self.io = io
        self.backend = backend
        self.audit = audit

    @classmethod
    def open(cls, config: ProxyConfig, reactor: Any, io: Io) -> Admin:
        """Open storage the way the proxy does, creating the data directory (0700) if new."""
        os.makedirs(config.data_dir, mode=0o700, exist_ok=True)
        os.makedirs(os.path.dirname(config.backend_path) or ".", mode=0o700, exist_ok=True)
        backend = open_backend(config, reactor)
        audit = AuditLog(backend, reactor, json_file=config.audit_file,
                         shared_chain=CLI_CHAIN)
        audit.start()
        return cls(config, reactor, io, backend, audit)

    @property
    def clock(self) -> IReactorTime:
        return self.reactor

    def now(self) -> float:
        return self.reactor.seconds()

    @property
    def actor(self) -> Actor:
        """The OS account running the command, as the admin services record it."""
        sudo = self.io.sudo_user
        return Actor(self.io.actor, "cli", (("sudo_user", sudo),) if sudo is not None else ())

    @property
    def services(self) -> AdminContext:
        """The admin services' context (apptunnel/admin/): this run's storage and audit,
        nudging the local proxy like every other verb."""
        return AdminContext(self.backend, self.audit, self.reactor, self.config.public_addr,
                            self.refresh_proxy)

    def keystore(self) -> KeyStore:
        """The cluster's keys in this config's backend (auth/keystore.py), as the proxy reads
        them: the CLI never makes a CA of its own in data_dir."""
        try:
            sealer = sealer_from_file(self.config.backend_encryption_key_file)
        except KeyStoreError as err:
            raise CliError(str(err)) from None
        return KeyStore(self.backend, self.reactor, data_dir=self.config.data_dir,
                        cluster_name=self.config.cluster_name,
                        jwt_algorithm=self.config.jwt_algorithm, sealer=sealer)

    async def cluster_ca(self) -> CaSet:
        """The cluster's CAs (made or imported on first use, as a proxy start would); its
        ``pin`` is the host CA the proxies present now, what joining agents and bots pin."""
        try:
            keys = await self.keystore().load()
            loader = CaLoader(self.config.cluster_name, self.reactor)
            return CaSet(*loader.roles(keys.user_ca, keys.host_ca))
        except (KeyStoreError, ValueError) as err:
            raise CliError(f"cluster keys: {err}") from None

    def emit(self, type: str, target: str, outcome: str = "success", **fields: Any) -> None:
        """Record one admin change; the CLI marks its events with ``via: cli``."""
        sudo = self.io.sudo_user
        if sudo is not None:
            fields["sudo_user"] = sudo
        self.audit.emit(type, actor=self.io.actor, target=target, outcome=outcome,
                        via="cli", **fields)

    async def refresh_proxy(self) -> None:
        """Make the change hold on the proxy of this config before the command returns.

        A proxy that does not run here is nothing to wait for; one that does not confirm
        in time still applies the change at its next poll, which the warning says.
        """
        confirmed = await refresh_proxy(self.reactor, self.config.data_dir)
        if confirmed is False:
            self.io.warn("the proxy did not confirm the change in time; "
                         "it applies it within a few seconds")

    async def close(self) -> None:
        """Write pending audit events, then close storage; a failure here is reported."""
        try:
            await self.audit.flush()
            await self.audit.stop()
        finally:
            await self.backend.close()
