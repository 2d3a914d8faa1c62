"""The cluster's two CA roles as one live issuer and verifier, kept current from storage.

Since CA rotation (issue 13 item 5) the cluster has a *user* CA (user and bot certificates;
what client certificates on the web port chain to) and a *host* CA (agents' certificates
and the proxies' own server certificates; what agents and the CLI verify a proxy
against). Each role is a set of stored rows (auth/keystore.py); ``ca_trust``
(auth/ca_rotation.py) decides from them and the clock which CA issues and which are
trusted. :class:`CaSet` answers what the rest of the proxy asked of the one ``ClusterCA``
before (issue, verify, the CA to pin), so those callers did not change; :class:`CaWatcher`
re-reads the rows every poll and swaps the decision in, and tells the proxy when the
trusted sets changed so it can rebuild the TLS contexts of new connections.

Which host CA a proxy *presents* (signs its server certificate, is sent as the CA to pin)
is the oldest one still trusted: during a host-CA grace the agents and CLIs out there were
pinned to it, so a proxy keeps showing it until the grace ends.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import attrs
from cryptography import x509
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from apptunnel.auth.ca import ROLE_AGENT, ClusterCA
from apptunnel.auth.ca_rotation import CURRENT, RETIRED, ca_trust
from apptunnel.auth.errors import AuthError
from apptunnel.auth.keystore import (KEY_POLL_INTERVAL, KIND_HOST_CA, KIND_USER_CA, KeyStore,
                                     KeyStoreError, OpenKey)
from apptunnel.backend.base import BackendError
from apptunnel.backend.records import KeyRecord
from apptunnel.polling import Poll

__all__ = ["CaLoader", "CaRole", "CaSet", "CaWatcher", "role_decision"]


@attrs.frozen
class CaRole:
    """One role at one moment: the CA that issues, the one presented, and all trusted."""

    issuing: ClusterCA
    presenting: ClusterCA
    trusted: tuple[ClusterCA, ...]

    @property
    def key(self) -> tuple[str, str, tuple[str, ...]]:
        """What a change is judged by (ids only)."""
        return (self.issuing.pin, self.presenting.pin, tuple(ca.pin for ca in self.trusted))

    def trusted_pems(self) -> tuple[bytes, ...]:
        return tuple(ca.cert_pem for ca in self.trusted)


def role_decision(keys: Sequence[OpenKey], now: float,
                  load: Callable[[OpenKey], ClusterCA]) -> CaRole:
    """Decide one role from its stored keys at ``now`` (ValueError: no CA to issue with).
    The presented CA is the oldest trusted one: a retired CA in its grace, else the
    current one (a ``next`` CA is trusted, issues once active, is presented only later)."""
    decision = ca_trust([key.record for key in keys], now)
    by_id = {key.id: key for key in keys}
    trusted = tuple(load(by_id[record.id]) for record in decision.trusted)
    issuing = load(by_id[decision.issuing.id])
    old = [ca for ca, record in zip(trusted, decision.trusted) if record.state == RETIRED]
    current = [ca for ca, record in zip(trusted, decision.trusted) if record.state == CURRENT]
    presenting = (old or current or [issuing])[0]
    return CaRole(issuing, presenting, trusted)


class CaSet:
    """The proxy's CAs: user and bot certificates from the user role, agents' and the
    proxy's own from the host role; a certificate is accepted only from a CA trusted for
    the role it names. Same methods as ``ClusterCA``, so holders need not change."""

    def __init__(self, user: CaRole, host: CaRole) -> None:
        self.user = user
        self.host = host

    def replace(self, user: CaRole, host: CaRole) -> None:
        self.user, self.host = user, host

    # What clients pin and what they are shown: the presented host CA.
    @property
    def cert(self) -> x509.Certificate:
        return self.host.presenting.cert

    @property
    def cert_pem(self) -> bytes:
        return self.host.presenting.cert_pem

    @property
    def pin(self) -> str:
        return self.host.presenting.pin

    @property
    def cluster_name(self) -> str:
        return self.host.presenting.cluster_name

    @property
    def clock(self) -> IReactorTime:
        return self.host.presenting.clock

    @property
    def user_issuer_pem(self) -> bytes:
        """The CA that signs user and bot certificates now (sent with them, as ``issuer``)."""
        return self.user.issuing.cert_pem

    def host_trust(self) -> tuple[str, ...]:
        """The host CAs agents are to trust (PEM), the one issuing agent certificates first:
        an agent whose certificate is from another one renews (agent/service.py)."""
        first = self.host.issuing
        rest = [ca for ca in self.host.trusted if ca.pin != first.pin]
        return tuple(ca.cert_pem.decode("ascii") for ca in (first, *rest))

    def issue_user_cert(self, *args, **kwargs) -> bytes:
        return self.user.issuing.issue_user_cert(*args, **kwargs)

    def issue_bot_cert(self, *args, **kwargs) -> bytes:
        return self.user.issuing.issue_bot_cert(*args, **kwargs)

    def sign_agent_csr(self, *args, **kwargs) -> bytes:
        return self.host.issuing.sign_agent_csr(*args, **kwargs)

    def issue_server_cert(self, *args, **kwargs) -> tuple[bytes, bytes]:
        return self.host.presenting.issue_server_cert(*args, **kwargs)

    def verify_peer(self, cert: x509.Certificate, now: float | None = None) -> tuple[str, str]:
        """(role, name) of a client certificate from a CA trusted for that role; AuthError
        (401) for anything else, e.g. an agent certificate from the user CA."""
        first: AuthError | None = None
        for ca in _unique((*self.user.trusted, *self.host.trusted)):
            try:
                role, name = ca.verify_peer(cert, now)
            except AuthError as err:
                first = first or err
                continue
            role_cas = self.host.trusted if role == ROLE_AGENT else self.user.trusted
            if any(trusted.pin == ca.pin for trusted in role_cas):
                return role, name
            raise AuthError(401, f"certificate is not issued by this cluster's {role} CA")
        raise first or AuthError(401, "certificate is not issued by this cluster's CA")


def _unique(cas: Iterable[ClusterCA]) -> list[ClusterCA]:
    seen: dict[str, ClusterCA] = {}
    for ca in cas:
        seen.setdefault(ca.pin, ca)
    return list(seen.values())


class CaLoader:
    """Stored CA keys as ClusterCA objects, each parsed once."""

    def __init__(self, cluster_name: str, clock: IReactorTime) -> None:
        self._cluster_name = cluster_name
        self._clock = clock
        self._loaded: dict[tuple[str, str], ClusterCA] = {}

    def __call__(self, key: OpenKey) -> ClusterCA:
        record: KeyRecord = key.record
        found = self._loaded.get((record.kind, record.id))
        if found is None:
            found = ClusterCA.from_pem(self._cluster_name, key.private_pem,
                                       record.public.encode("ascii"), self._clock)
            self._loaded[(record.kind, record.id)] = found
        return found

    def roles(self, user: Sequence[OpenKey], host: Sequence[OpenKey]) -> tuple[CaRole, CaRole]:
        """Both roles decided now; KeyStoreError when a stored CA is unusable."""
        now = self._clock.seconds()
        try:
            return role_decision(user, now, self), role_decision(host, now, self)
        except ValueError as err:
            raise KeyStoreError(f"stored cluster CA unusable: {err}") from None


class CaWatcher:
    """Re-reads both CA roles every poll (and on the control socket's refresh) into the
    proxy's :class:`CaSet`; ``on_change`` runs when a trusted or presented CA changed,
    so new connections get TLS contexts that trust the new set."""

    _log = Logger()

    def __init__(self, store: KeyStore, cas: CaSet, loader: CaLoader, clock: IReactorTime,
                 on_change: Callable[[], None], interval: float = KEY_POLL_INTERVAL) -> None:
        self._store = store
        self._cas = cas
        self._loader = loader
        self._on_change = on_change
        self._poll = Poll(self.refresh, clock, interval, "CA watcher")

    def start(self) -> None:
        self._poll.start()

    def stop(self) -> None:
        self._poll.stop()

    async def refresh(self) -> None:
        """Read the CAs now; never raises (one line logged, the CAs in use are kept)."""
        try:
            await self._store.settle(KIND_USER_CA, KIND_HOST_CA)
            user, host = self._loader.roles(await self._store.keys(KIND_USER_CA),
                                            await self._store.keys(KIND_HOST_CA))
        except (KeyStoreError, BackendError) as err:
            self._log.warn("cannot read the cluster CAs (keeping the ones in use): {error}",
                           error=err)
            return
        changed = (user.key, host.key) != (self._cas.user.key, self._cas.host.key)
        self._cas.replace(user, host)
        if changed:
            self._log.info("cluster CAs now: user CA issuing {user} ({n_user} trusted), host "
                           "CA issuing {host}, presenting {shown} ({n_host} trusted)",
                           user=user.issuing.pin, n_user=len(user.trusted),
                           host=host.issuing.pin, shown=host.presenting.pin,
                           n_host=len(host.trusted))
            self._on_change()
