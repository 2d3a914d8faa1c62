"""Agent enrolment: join tokens become agent certificates, and agents stay who they were.

Everything the cluster decides about an agent, with storage behind it: redeeming a join
token for a certificate (``join``), admitting a certificate-authenticated agent and
handing back the scope its token gave it (``hello``), renewing its certificate for the
same key (``renew``), and recording its connection state. The tunnel server only speaks
the protocol and asks this service; it holds no backend.

Refusals are :class:`EnrolmentRefused`: ``reason`` is for our log and the audit (it may
name the cause: "unknown token", "expired token"), ``message`` is what the agent is told
(no detail that helps guessing a token), ``rejoin`` says a new join could help.
"""

from __future__ import annotations

import functools

import attrs
from cryptography import x509
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from apptunnel.auth.ca import ClusterCA
from apptunnel.auth.errors import AuthError
from apptunnel.auth.pins import cert_pin
from apptunnel.auth.tokens import constant_time_equal, secret_hash
from apptunnel.backend.base import AlreadyExists, StorageUnavailable
from apptunnel.backend.records import Agent, AgentTunnel, Scope

__all__ = ["AGENT_CERT_TTL", "AgentEnrolment", "EnrolmentRefused", "Issued", "Joined",
           "live_token"]

log = Logger()

AGENT_CERT_TTL = 3 * 86400.0
_BAD_TOKEN = "invalid or expired join token"
_WRONG_KIND = {"app": "this token cannot be used to join an agent",
               "bot": "this token cannot be used to join a bot"}


class EnrolmentRefused(AuthError):
    """The cluster will not join, admit or renew this agent."""

    def __init__(self, reason: str, message: str | None = None, rejoin: bool = False) -> None:
        super().__init__(403, message if message is not None else reason)
        self.reason = reason
        self.rejoin = rejoin


STORAGE_DOWN = "the proxy's storage is unavailable, try again"


def _storage_refusal(method):
    """Storage down while deciding: a refusal the agent retries with backoff (one log
    line and an audit event where the tunnel server refuses), not a crash."""
    @functools.wraps(method)
    async def decided(*args, **kwargs):
        try:
            return await method(*args, **kwargs)
        except StorageUnavailable:
            raise EnrolmentRefused("storage unavailable", STORAGE_DOWN) from None
    return decided


async def live_token(backend, token: str, kind: str, now: float):
    """The stored join token ``token`` if it is live and of ``kind`` (``app``: an agent's,
    ``bot``: a bot's); EnrolmentRefused otherwise. Agents and bots both start here, so
    neither can join with the other's token. The use itself is taken later, atomically."""
    token_hash = secret_hash(token)
    record = await backend.get_token(token_hash)
    if record is None or not constant_time_equal(record.token_hash, token_hash):
        raise EnrolmentRefused("unknown token", _BAD_TOKEN)
    if record.expires <= now:
        raise EnrolmentRefused("expired token", _BAD_TOKEN)
    if record.kind != kind:
        raise EnrolmentRefused(f"token kind {record.kind!r} cannot join {kind!r}",
                               _WRONG_KIND.get(kind, _BAD_TOKEN))
    return record


@attrs.frozen
class Joined:
    """A join's result: the agent's certificate and the CA's, PEM."""

    cert_pem: bytes
    ca_pem: bytes


@attrs.frozen
class Issued:
    """A renewed certificate and when it ends."""

    cert_pem: bytes
    not_after: float


class AgentEnrolment:
    """Join, hello and renew decisions over the backend's ``agents`` rows and tokens."""

    def __init__(self, *, ca: ClusterCA, backend, clock: IReactorTime, proxy_id: str,
                 locks=None, agent_cert_ttl: float = AGENT_CERT_TTL) -> None:
        self.ca = ca
        self.backend = backend
        self.clock = clock
        self.proxy_id = proxy_id
        self.locks = locks
        self.agent_cert_ttl = agent_cert_ttl

    @property
    def ca_pem(self) -> bytes:
        return self.ca.cert_pem

    def verify_peer(self, cert: x509.Certificate) -> tuple[str, str]:
        """(role, name) of a client certificate of this cluster valid now; AuthError else."""
        return self.ca.verify_peer(cert, self.clock.seconds())

    def agent_lock(self, host_id: str):
        """The lock in force on agent ``host_id``, or None."""
        if self.locks is None:
            return None
        return next((lock for lock in self.locks.locks if lock.agent == host_id), None)

    @_storage_refusal
    async def join(self, token: str, csr: str, host_id: str, peer: str) -> Joined:
        """One use of ``token`` for a certificate of the key in ``csr``, recorded with the
        token's scope in one transaction; a host id already recorded joins again only with
        the same key, a locked agent not at all."""
        now = self.clock.seconds()
        record = await live_token(self.backend, token, "app", now)
        token_hash = record.token_hash
        try:
            cert_pem = self.ca.sign_agent_csr(csr, host_id, self.agent_cert_ttl)
        except AuthError as err:
            raise EnrolmentRefused(err.message) from None
        if self.agent_lock(host_id) is not None:
            raise EnrolmentRefused("agent is locked", f"agent {host_id} is locked")
        cert = x509.load_pem_x509_certificate(cert_pem)
        try:
            stored = await self.backend.redeem_token(token_hash, now, Agent(
                host_id=host_id, scope=Scope(), joined=now,
                cert_expires=cert.not_valid_after_utc.timestamp(), key_pin=cert_pin(cert),
                last_seen=now, peer=peer, proxy_id=self.proxy_id))
        except AlreadyExists:
            # Only the agent holding the key of that host id may join again under it
            # (it reuses agent.key), so nobody can take over another agent's record.
            raise EnrolmentRefused(
                "host_id taken by an agent with another key",
                f"host_id {host_id} belongs to another agent; remove the agent's host_id "
                "file to join as a new agent") from None
        if stored is None:
            raise EnrolmentRefused("token used up", _BAD_TOKEN)
        return Joined(cert_pem, self.ca.cert_pem)

    @_storage_refusal
    async def hello(self, host_id: str, cert: x509.Certificate | None) -> Scope:
        """The scope of a known, unlocked agent presenting the certificate of its recorded
        key; EnrolmentRefused otherwise (``rejoin`` when a new join could help)."""
        agent = await self.backend.get_agent(host_id)
        if agent is None:
            raise EnrolmentRefused("this agent is not known to the cluster (it joined before "
                                   "agent records existed, or was removed): join again with a "
                                   "new token", rejoin=True)
        if self.agent_lock(host_id) is not None:
            raise EnrolmentRefused("this agent is locked")
        if cert is None or cert_pin(cert) != agent.key_pin:
            raise EnrolmentRefused("certificate is not the agent's current one: join again "
                                   "with a new token", rejoin=True)
        return agent.scope

    async def renewed_until(self, host_id: str, cert: x509.Certificate) -> float | None:
        """When the agent's newest certificate expires, if it is for the key of ``cert``
        (the one its tunnel here was authenticated with) and the agent is known and not
        locked; None otherwise. An agent renews over one of its tunnels (one proxy): the
        other proxies learn the new expiry here instead of cutting its tunnel."""
        agent = await self.backend.get_agent(host_id)
        if agent is None or self.agent_lock(host_id) is not None:
            return None
        if cert_pin(cert) != agent.key_pin or agent.cert_expires <= self.clock.seconds():
            return None
        return agent.cert_expires

    @_storage_refusal
    async def renew(self, host_id: str, csr: str) -> Issued:
        """A new certificate for the same key, while the agent is known and not locked."""
        agent = await self.backend.get_agent(host_id)
        if agent is None:
            raise EnrolmentRefused("this agent is no longer known to the cluster")
        if self.agent_lock(host_id) is not None:
            raise EnrolmentRefused("this agent is locked")
        try:
            cert_pem = self.ca.sign_agent_csr(csr, host_id, self.agent_cert_ttl)
        except AuthError as err:
            raise EnrolmentRefused(err.message) from None
        cert = x509.load_pem_x509_certificate(cert_pem)
        if cert_pin(cert) != agent.key_pin:
            raise EnrolmentRefused("a renewal must keep the agent's key")
        not_after = cert.not_valid_after_utc.timestamp()
        await self.backend.update_agent(host_id, cert_expires=not_after,
                                        last_seen=self.clock.seconds())
        return Issued(cert_pem, not_after)

    def connected(self, host_id: str, peer: str, apps: tuple[str, ...],
                  version: str = "") -> None:
        """Record that the agent's tunnel here is up, serving ``apps``, running ``version``."""
        now = self.clock.seconds()
        self._record(self.backend.update_agent(host_id, connected_since=now, last_seen=now,
                                               peer=peer, proxy_id=self.proxy_id, apps=apps,
                                               draining=False, version=version))
        self._record(self.backend.put_agent_tunnel(AgentTunnel(host_id, self.proxy_id, peer, now)))

    def serving(self, host_id: str, apps: tuple[str, ...]) -> None:
        """Record what the agent serves now (a later announcement on a live tunnel)."""
        self._record(self.backend.update_agent(host_id, last_seen=self.clock.seconds(),
                                               apps=apps))

    def draining(self, host_id: str) -> None:
        """Record that the agent's tunnel here is going away (it finishes open streams)."""
        self._record(self.backend.update_agent(host_id, draining=True, only_proxy=self.proxy_id))

    def disconnected(self, host_id: str) -> None:
        """Record that the agent's last tunnel here went away."""
        self._record(self.backend.delete_agent_tunnel(host_id, self.proxy_id))
        self._record(self.backend.update_agent(
            host_id, connected_since=None, last_seen=self.clock.seconds(), draining=False,
            only_proxy=self.proxy_id))

    @staticmethod
    def _record(coro) -> None:
        """Connection state is informational: a failed write is logged, never fatal."""
        defer.ensureDeferred(coro).addErrback(
            lambda failure: log.warn("cannot record agent state: {error}",
                                     error=failure.getErrorMessage()))
