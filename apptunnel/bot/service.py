"""`twistd apptunnel-bot`: join once, keep a short certificate renewed, feed the outputs.

Start: the stored identity (``data_dir``) if there is one that has not expired, else one
join with ``join.token`` (verified against ``join.ca_pin`` before the token is sent).
Then the outputs are written and the app-proxy ports bound, and the certificate is
renewed with itself once a third of its lifetime is left (apptunnel/bot/renewal.py),
retried with backoff when the proxy cannot be reached or refuses. The token is never
used again: a restart takes the stored identity. A certificate that expired cannot be
renewed; the bot says so once and waits to be joined again (a new token from
``apptunnel bots add``).

Each renewal rewrites the identity output atomically and hands the new certificate to
the app-proxy outputs without closing their listeners: each new connection presents the
current certificate. A connection already open keeps the certificate it started with,
and the proxy ends it when that certificate ends (as for ``apptunnel proxy app``), so a
client of a long-lived TCP connection reconnects at most every ``certificate_ttl``.

The HTTP calls block (apptunnel/bot/client.py) and run in a thread; everything else is
on the reactor, with time from it.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable

from cryptography import x509
from cryptography.x509.oid import NameOID
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import Logger

from apptunnel.bot import client
from apptunnel.bot.client import BotCallFailed
from apptunnel.bot.config import AppProxyOutput, BotConfig, IdentityOutput
from apptunnel.bot.identity import Identity, load_identity, load_key, public_pem, save_identity
from apptunnel.bot.outputs import write_identity
from apptunnel.bot.renewal import backoff, renew_delay, retry_delay
from apptunnel.errors import ApptunnelError
from apptunnel.local_proxy import LISTEN_BACKLOG, LocalProxy, LocalProxyError, check
from apptunnel.startup import CannotStart, Listeners, fatal

log = Logger()

REJOIN = ("join the bot again: `apptunnel bots rm NAME`, `apptunnel bots add NAME ...`, "
          "and the new token in join.token")


class BotService(MultiService):
    """One bot. ``calls`` (join, renew) and ``run`` (how a blocking call is run) are
    replaceable so the unit tests drive it on a Clock without threads or network."""

    def __init__(self, config: BotConfig, reactor, calls=client,
                 run: Callable[..., defer.Deferred] | None = None) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self._calls = calls
        self._run = run or deferToThread
        self.identity: Identity | None = None
        self._key_pem = b""
        self._timer = None
        self._failures = 0
        self._given_up = False
        self.listeners = Listeners()
        self.app_proxies: list[LocalProxy] = []

    # -- lifecycle ----------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        d = defer.ensureDeferred(self._start())
        d.addErrback(self._cannot_start)

    @defer.inlineCallbacks
    def stopService(self):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        yield self.listeners.stop()
        yield super().stopService()

    def _cannot_start(self, failure) -> None:
        if failure.check(CannotStart, ApptunnelError, OSError):
            fatal(self.reactor, f"apptunnel-bot: {failure.getErrorMessage()}")
            return
        log.failure("apptunnel-bot could not start", failure)
        fatal(self.reactor, f"apptunnel-bot: {failure.getErrorMessage()}")

    async def _start(self) -> None:
        cfg = self.config
        self._key_pem = await self._run(load_key, cfg.data_dir)
        now = self.reactor.seconds()
        identity = await self._run(load_identity, cfg.data_dir, cfg.proxy_addr)
        if identity is not None and identity.expired(now):
            if cfg.join_token is None:
                raise CannotStart(f"the stored bot certificate has expired; {REJOIN}")
            log.info("the stored bot certificate has expired: joining with join.token")
            identity = None
        if identity is None:
            identity = await self._join()
        else:
            log.info("using the stored identity of bot {bot} (the join token is not used "
                     "again)", bot=_bot_name(identity))
        await self._take(identity)
        for output in cfg.outputs:
            if isinstance(output, AppProxyOutput):
                self._add_app_proxy(output)
        await self.listeners.listen()
        for proxy in self.app_proxies:
            await self._learn_kind(proxy)
        log.info("bot {bot} ready: certificate valid until {until}, {count} outputs",
                 bot=_bot_name(identity), until=_iso(identity.not_after),
                 count=len(cfg.outputs))
        self._schedule_renewal()

    async def _join(self) -> Identity:
        """One use of join.token; retried with backoff while the proxy cannot be reached,
        fatal when it refuses (a wrong pin, a used or unknown token: no retry helps)."""
        cfg = self.config
        if cfg.join_token is None or cfg.ca_pin is None:
            raise CannotStart("no stored identity in data_dir and no join.token: add the bot "
                              "with `apptunnel bots add` and put its token and CA pin in join")
        failures = 0
        while True:
            try:
                cert_pem, ca_pem = await self._run(
                    self._calls.join, cfg.proxy_addr, cfg.ca_pin, cfg.join_token,
                    public_pem(self._key_pem), cfg.certificate_ttl, self.reactor.seconds())
                break
            except BotCallFailed as err:
                if err.final:
                    raise CannotStart(f"join failed: {err.message}") from None
                failures += 1
                delay = backoff(failures)
                log.warn("join failed (attempt {n}; retrying in {delay:.0f}s): {reason}",
                         n=failures, delay=delay, reason=err.message)
                await deferLater(self.reactor, delay)
        identity = Identity(cfg.proxy_addr, self._key_pem, cert_pem, ca_pem)
        log.info("joined as bot {bot}", bot=_bot_name(identity))
        return identity

    # -- renewal ------------------------------------------------------------------------

    def _schedule_renewal(self) -> None:
        now = self.reactor.seconds()
        self._schedule(renew_delay(self.identity.not_after, self.config.certificate_ttl, now))

    def _schedule(self, delay: float) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = self.reactor.callLater(delay, self._renew_now)

    def _renew_now(self) -> None:
        d = defer.ensureDeferred(self.renew())
        d.addErrback(self._renewal_crashed)

    def _renewal_crashed(self, failure) -> None:
        """A bug, not the proxy's answer: logged once, and renewal goes on with backoff."""
        log.failure("bot renewal crashed", failure)
        self._renewal_failed(BotCallFailed(failure.getErrorMessage()))

    async def renew(self) -> None:
        """Renew with the current certificate; on failure retry later (until it expired)."""
        identity = self.identity
        try:
            cert_pem, ca_pem = await self._run(
                self._calls.renew, identity.proxy, identity.ca_pem, identity.cert_pem,
                identity.key_pem, public_pem(identity.key_pem), self.config.certificate_ttl)
        except BotCallFailed as err:
            self._renewal_failed(err)
            return
        self._failures = 0
        try:
            await self._take(identity.renewed(cert_pem, ca_pem))
        except OSError as err:   # in use in memory; the files are written next time
            log.warn("cannot write the renewed identity: {error}", error=str(err))
        log.info("renewed the certificate of bot {bot}: valid until {until}",
                 bot=_bot_name(self.identity), until=_iso(self.identity.not_after))
        self._schedule_renewal()

    def _renewal_failed(self, err: BotCallFailed) -> None:
        now = self.reactor.seconds()
        self._failures += 1
        if self.identity.expired(now):
            if not self._given_up:
                log.error("bot certificate expired and cannot be renewed ({reason}); "
                          "{rejoin}", reason=err.message, rejoin=REJOIN)
            self._given_up = True
            return
        delay = retry_delay(self._failures, self.identity.not_after, now)
        log.warn("bot certificate renewal failed (attempt {n}; retrying in {delay:.1f}s): "
                 "{reason}", n=self._failures, delay=delay, reason=err.message)
        self._schedule(delay)

    # -- outputs ------------------------------------------------------------------------

    async def _take(self, identity: Identity) -> None:
        """Make ``identity`` current: the app-proxy outputs present it from their next
        connection; it is stored and written to every identity output (files: in a
        thread, off the reactor)."""
        self.identity = identity
        for proxy in self.app_proxies:
            proxy.credentials_renewed()
        await self._run(self._write_files, identity)

    def _write_files(self, identity: Identity) -> None:
        save_identity(self.config.data_dir, identity)
        for output in self.config.outputs:
            if isinstance(output, IdentityOutput):
                write_identity(output.path, identity.cert_pem, identity.key_pem,
                               identity.ca_pem)

    def _add_app_proxy(self, output: AppProxyOutput) -> None:
        def say(line: str) -> None:
            log.info("app-proxy {app}: {line}", app=output.app, line=line)

        proxy = LocalProxy(self.reactor, lambda: self.identity, output.app, output.remote_port,
                           say, expired="bot certificate expired (renewal is failing)")
        endpoint_type = TCP6ServerEndpoint if ":" in output.host else TCP4ServerEndpoint
        self.listeners.add(f"outputs app-proxy {output.app} {output.host}:{output.port}",
                           endpoint_type(self.reactor, output.port, backlog=LISTEN_BACKLOG,
                                         interface=output.host),
                           proxy)
        self.app_proxies.append(proxy)

    async def _learn_kind(self, proxy: LocalProxy) -> None:
        """Ask the proxy once (the dry run): ``http`` apps get refusals as HTTP answers."""
        try:
            proxy.kind = await check(proxy)
        except LocalProxyError as err:
            log.warn("app-proxy {app}: {line} (listening anyway)", app=proxy.app,
                     line=err.message)


def _bot_name(identity: Identity) -> str:
    cert = x509.load_pem_x509_certificate(identity.cert_pem)
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else "?"


def _iso(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, tz=datetime.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%SZ")
