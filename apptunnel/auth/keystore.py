"""The cluster's keys in the backend: CA, JWT signing keys, SAML SP key, shared by every proxy.

Keys live in the backend's ``keys`` table (backend/base.py), so proxies on one PostgreSQL
share them and SQLite has the same code path. ``KeyStore.load`` is the start step:

- a kind with a ``current`` key is read as stored;
- otherwise the key files of an older data dir (``ca.key`` with ``ca.crt``, ``jwt.key``,
  ``saml-sp.key`` with ``saml-sp.crt``) are imported, or a new key is made, and inserted
  *if absent*; then everyone reads what is stored. Storage keeps at most one current key
  per kind, so two proxies starting at once on an empty database end up with one CA.
  Imported files are left alone and never read again (logged once, at the import).

Private material is sealed with AES-256-GCM when ``backend.encryption_key_file`` is set
(:class:`Sealer`); the kind and id are the associated data, so a sealed row copied onto
another row does not open. Anything wrong (encrypted rows and no key file, a wrong key
file, a swapped row, a key that does not fit) is a :class:`KeyStoreError`: one line, and
the proxy does not start. ca.py and jwt.py take key material and know nothing of this.

JWT rotation (``rotate_jwt``, ``apptunnel auth rotate --type jwt``) is stored times, not
messages: a ``next`` key with ``activate_at``, the current one with ``retire_at``. Each
proxy's :class:`JwtKeyWatcher` re-reads the rows every poll into its key ring
(auth/jwt.py), which decides from the clock which key signs and which are published;
``settle`` writes the outcome down afterwards (compare-and-set, whoever comes first).
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import os
from collections.abc import Callable

import attrs
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from apptunnel.auth import jwt as jwt_keys
from apptunnel.auth.ca import ClusterCA, new_ca_pem
from apptunnel.auth.connectors.saml import SP_CERT, SP_KEY, new_sp_pem
from apptunnel.backend.base import Backend, BackendError
from apptunnel.backend.records import KeyRecord
from apptunnel.errors import ApptunnelError
from apptunnel.files import read_encryption_key
from apptunnel.jwks import MIN_REFETCH_INTERVAL
from apptunnel.polling import Poll

__all__ = ["CA_KINDS", "CA_PUBLISH_DELAY", "KIND_CA", "KIND_HOST_CA", "KIND_JWT", "KIND_SAML",
           "KIND_USER_CA", "PUBLISH_DELAY", "RETIRE_MARGIN", "ClusterKeys",
           "JwtKeyWatcher", "KeyStore", "KeyStoreError", "RotationPlan", "Sealer", "ring_entries",
           "sealer_from_file"]

log = Logger()

KIND_CA = "ca"
KIND_JWT = "jwt"
KIND_SAML = "saml-sp"
# The two CA roles (issue 13 item 5): the user CA signs user and bot certificates, the host
# CA agents' and proxies' own. Both start as a copy of the cluster CA (``ca``), so a cluster
# changes nothing until one of them is rotated; ``ca`` itself is no longer read after that.
KIND_USER_CA = "user_ca"
KIND_HOST_CA = "host_ca"
CA_KINDS = {"user-ca": KIND_USER_CA, "host-ca": KIND_HOST_CA}
CURRENT, NEXT, RETIRED = "current", "next", "retired"

# JWT rotation timing. A new key is published by every proxy within one poll (or at once,
# through the control socket); an app whose JWKS cache predates it refetches on the unknown
# kid only if its last fetch is MIN_REFETCH_INTERVAL old (apptunnel/jwks.py). So the new key
# signs no earlier than a poll plus that interval plus a margin after it was stored; the
# old one stays published for the token lifetime plus a margin for clock skew and leeway.
KEY_POLL_INTERVAL = 2.0
PUBLISH_DELAY = KEY_POLL_INTERVAL + MIN_REFETCH_INTERVAL + 3.0
RETIRE_MARGIN = 15.0
# A new CA is trusted by every proxy within a poll of being stored; it issues only after
# that (plus a margin), so no proxy is shown a certificate it has not learnt to trust yet.
CA_PUBLISH_DELAY = KEY_POLL_INTERVAL + 3.0

SEALED_PREFIX = "enc:v1:"
_NONCE = 12


class KeyStoreError(ApptunnelError):
    """The stored keys cannot be used; the message is one line naming the problem."""


class Sealer:
    """AES-256-GCM over private key material; (kind, id) bound in as associated data."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    @staticmethod
    def _aad(kind: str, id: str) -> bytes:
        return f"apptunnel-key\0{kind}\0{id}".encode()

    def seal(self, kind: str, id: str, plaintext: bytes) -> str:
        nonce = os.urandom(_NONCE)
        sealed = self._aead.encrypt(nonce, plaintext, self._aad(kind, id))
        return SEALED_PREFIX + base64.b64encode(nonce + sealed).decode("ascii")

    def open(self, kind: str, id: str, text: str) -> bytes:
        try:
            raw = base64.b64decode(text[len(SEALED_PREFIX):], validate=True)
            return self._aead.decrypt(raw[:_NONCE], raw[_NONCE:], self._aad(kind, id))
        except (InvalidTag, binascii.Error, ValueError):
            raise KeyStoreError(
                f"stored key {kind}/{id} does not decrypt with backend.encryption_key_file: "
                f"a wrong key file, or the row was altered or swapped") from None


def sealer_from_file(path: str | None) -> Sealer | None:
    """The sealer for backend.encryption_key_file (None: keys stored plain); KeyStoreError."""
    if path is None:
        return None
    try:
        return Sealer(read_encryption_key(path))
    except ValueError as err:
        raise KeyStoreError(f"backend.encryption_key_file: {err}") from None


def is_sealed(record: KeyRecord) -> bool:
    return record.material.startswith(SEALED_PREFIX)


@attrs.frozen
class OpenKey:
    """A stored key with its private material opened (PEM bytes)."""

    record: KeyRecord
    private_pem: bytes

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def state(self) -> str:
        return self.record.state


@attrs.frozen
class ClusterKeys:
    """What one load found: the current key of each kind, every JWT key (for the JWKS)
    and every stored CA of each role (issuing and trusted ones, auth/ca_set.py)."""

    ca: OpenKey
    jwt: tuple[OpenKey, ...]
    saml: OpenKey
    user_ca: tuple[OpenKey, ...] = ()
    host_ca: tuple[OpenKey, ...] = ()


@attrs.frozen
class RotationPlan:
    """What ``auth rotate`` set in motion, for the CLI to print and audit."""

    kind: str
    old_id: str
    new_id: str
    published_at: float      # stored now; every proxy publishes it within a poll
    activate_at: float       # signs from then on
    retire_at: float         # the old key leaves the JWKS then


def ring_entries(keys: tuple[OpenKey, ...]) -> list[jwt_keys.RingKey]:
    """The JWT key ring (auth/jwt.py) for the stored keys; each with its stored algorithm."""
    entries = []
    for key in keys:
        try:
            pair = jwt_keys.JwtKeys.from_pem(key.record.public, key.private_pem)
        except jwt_keys.JwtKeyError as err:
            raise KeyStoreError(f"stored key jwt/{key.id}: {err.message}") from None
        entries.append(jwt_keys.RingKey(pair, key.record.activate_at or 0.0,
                                        key.record.retire_at))
    return entries


def _fingerprint(pem: bytes) -> str:
    return hashlib.sha256(pem).hexdigest()[:16]


@attrs.frozen
class _Fresh:
    """A key to insert: its id, private PEM and public part (a certificate or an algorithm)."""

    id: str
    private_pem: bytes
    public: str


class KeyStore:
    """Loads (and on first start makes) the cluster's keys in `backend`; see the module doc."""

    def __init__(self, backend: Backend, clock: IReactorTime, *, data_dir: str,
                 cluster_name: str, jwt_algorithm: str, sealer: Sealer | None = None) -> None:
        self._backend = backend
        self._clock = clock
        self._data_dir = data_dir
        self._cluster_name = cluster_name
        self._jwt_algorithm = jwt_algorithm
        self._sealer = sealer

    async def load(self) -> ClusterKeys:
        """Every kind's keys, made or imported first if the store has none.
        KeyStoreError for unusable keys, BackendError when storage fails."""
        ca = await self._current(KIND_CA, self._ca_files, self._new_ca)
        await self._current(KIND_JWT, self._jwt_file, self._new_jwt)
        saml = await self._current(KIND_SAML, self._saml_files, self._new_saml)
        for kind in (KIND_USER_CA, KIND_HOST_CA):
            await self._role_from_cluster_ca(kind, ca)
        jwt = await self.keys(KIND_JWT)
        return ClusterKeys(ca=ca, jwt=jwt, saml=saml, user_ca=await self.keys(KIND_USER_CA),
                           host_ca=await self.keys(KIND_HOST_CA))

    async def _role_from_cluster_ca(self, kind: str, ca: OpenKey) -> None:
        """A CA role that was never stored starts as the cluster CA (same id, same key),
        insert-if-absent: proxies starting at once on one store agree, and a role once
        rotated is never reset."""
        stored = await self._backend.list_keys(kind)
        if stored:
            await self._reseal_plain(stored)
            return
        if await self.add(kind, _Fresh(ca.id, ca.private_pem, ca.record.public), CURRENT):
            log.info("the {kind} role starts as the cluster CA {id}", kind=kind, id=ca.id)

    async def keys(self, kind: str) -> tuple[OpenKey, ...]:
        """Every stored key of `kind`, opened, oldest first."""
        return self.open_all(await self.records(kind))

    async def records(self, kind: str) -> list[KeyRecord]:
        """Every stored key of `kind` as stored (sealed), oldest first."""
        return await self._backend.list_keys(kind)

    def open_all(self, records: list[KeyRecord]) -> tuple[OpenKey, ...]:
        return tuple([self._open(r) for r in records])

    async def add(self, kind: str, fresh: _Fresh, state: str, **times: float | None) -> bool:
        """Insert-if-absent a new key (sealed when a key file is set)."""
        material = self._seal(kind, fresh.id, fresh.private_pem)
        return await self._backend.add_key(KeyRecord(
            kind, fresh.id, state, material, fresh.public, self._clock.seconds(), **times))

    # -- rotation ------------------------------------------------------------------

    async def rotate_jwt(self, jwt_ttl: float, delay: float = PUBLISH_DELAY) -> RotationPlan:
        """Store a `next` signing key that signs from now + `delay`, and retire the current
        one once every token it can still sign has expired. KeyStoreError while another
        rotation is under way (storage holds one `next` key per kind)."""
        await self.load()
        await self.settle()
        now = self._clock.seconds()
        stored = await self._backend.list_keys(KIND_JWT)
        pending = [r for r in stored if r.state == NEXT]
        if pending:
            raise KeyStoreError(f"a rotation is under way: key {pending[0].id} signs from "
                                f"{_when(pending[0].activate_at)}")
        [current] = [r for r in stored if r.state == CURRENT]
        fresh = new_jwt_key(self._jwt_algorithm)
        activate_at = now + delay
        retire_at = activate_at + jwt_ttl + RETIRE_MARGIN
        if not await self.add(KIND_JWT, fresh, NEXT, activate_at=activate_at):
            raise KeyStoreError("another rotation started at the same time; run `apptunnel "
                                "auth status`")
        if not await self._backend.set_key_states(
                [(CURRENT, attrs.evolve(current, retire_at=retire_at))]):
            await self._backend.delete_key(KIND_JWT, fresh.id)
            raise KeyStoreError("the current key changed during the rotation; try again")
        return RotationPlan(KIND_JWT, current.id, fresh.id, now, activate_at, retire_at)

    async def rotate_ca(self, kind: str, grace: float,
                        delay: float = CA_PUBLISH_DELAY) -> RotationPlan:
        """Store a new CA of role `kind` that is trusted at once and issues from now +
        `delay`; the current one stays trusted until `grace` after that, then goes.
        KeyStoreError while a rotation of that role is under way."""
        await self.load()
        await self.settle(kind)
        now = self._clock.seconds()
        stored = await self._backend.list_keys(kind)
        busy = [r for r in stored if r.state in (NEXT, RETIRED)]
        if busy:
            until = busy[0].activate_at if busy[0].state == NEXT else busy[0].retire_at
            raise KeyStoreError(f"a {kind} rotation is under way until {_when(until)}")
        [current] = [r for r in stored if r.state == CURRENT]
        key_pem, cert_pem = new_ca_pem(self._cluster_name, now)
        fresh = _Fresh(ClusterCA.from_pem(self._cluster_name, key_pem, cert_pem,
                                          self._clock).pin, key_pem, cert_pem.decode("ascii"))
        activate_at = now + delay
        retire_at = activate_at + grace
        if not await self.add(kind, fresh, NEXT, activate_at=activate_at):
            raise KeyStoreError("another rotation started at the same time; run `apptunnel "
                                "auth status`")
        if not await self._backend.set_key_states(
                [(CURRENT, attrs.evolve(current, retire_at=retire_at))]):
            await self._backend.delete_key(kind, fresh.id)
            raise KeyStoreError("the current CA changed during the rotation; try again")
        return RotationPlan(kind, current.id, fresh.id, now, activate_at, retire_at)

    async def settle(self, *kinds: str) -> None:
        """Write down what time already decided (any proxy or CLI may; compare-and-set):
        a `next` key past its activate_at becomes current (the old one retired), a retired
        key past its retire_at is deleted. `kinds`: JWT when none are named."""
        for kind in kinds or (KIND_JWT,):
            await self._settle(kind)

    async def _settle(self, kind: str) -> None:
        now = self._clock.seconds()
        stored = await self._backend.list_keys(kind)
        current = [r for r in stored if r.state == CURRENT]
        for record in stored:
            if record.state == NEXT and record.activate_at is not None \
                    and record.activate_at <= now and current:
                old = current[0]
                await self._backend.set_key_states([
                    (CURRENT, attrs.evolve(old, state=RETIRED,
                                           retire_at=old.retire_at or now)),
                    (NEXT, attrs.evolve(record, state=CURRENT)),
                ])
            elif record.state == RETIRED and (record.retire_at or 0.0) <= now:
                await self._backend.delete_key(kind, record.id)

    # -- loading one kind --------------------------------------------------------

    async def _current(self, kind: str, from_files: Callable[[], _Fresh | None],
                       make: Callable[[], _Fresh]) -> OpenKey:
        stored = await self._backend.list_keys(kind)
        current = [r for r in stored if r.state == CURRENT]
        if not current:
            files = from_files()
            fresh = files or make()
            if await self.add(kind, fresh, CURRENT):
                if files is not None:
                    log.info("imported the {kind} key from data_dir {dir} into the backend; "
                             "the files there are no longer read (keep them as a backup "
                             "or remove them)", kind=kind, dir=self._data_dir)
                else:
                    log.info("created the cluster's {kind} key {id}", kind=kind, id=fresh.id)
            current = [r for r in await self._backend.list_keys(kind) if r.state == CURRENT]
            if not current:
                raise KeyStoreError(f"no current {kind} key stored after inserting one")
        elif self._leftover_differs(from_files, current[0].id):
            log.warn("data_dir {dir} holds a {kind} key that is not the cluster's (stored) "
                     "one; it is ignored", dir=self._data_dir, kind=kind)
        await self._reseal_plain(stored)
        return self._open(current[0])

    @staticmethod
    def _leftover_differs(from_files: Callable[[], _Fresh | None], stored_id: str) -> bool:
        """Whether key files left in data_dir are not the stored key. Once a key is stored
        the files are never used, so an unreadable pair is no reason to stop: after a
        host-CA rotation ``ca.crt`` (published, auth/ca.py) no longer fits an old ``ca.key``."""
        try:
            files = from_files()
        except KeyStoreError:
            return True
        return files is not None and files.id != stored_id

    def _open(self, record: KeyRecord) -> OpenKey:
        if is_sealed(record):
            if self._sealer is None:
                raise KeyStoreError(
                    f"stored key {record.kind}/{record.id} is encrypted and "
                    f"backend.encryption_key_file is not set")
            return OpenKey(record, self._sealer.open(record.kind, record.id, record.material))
        return OpenKey(record, record.material.encode("ascii"))

    def _seal(self, kind: str, id: str, pem: bytes) -> str:
        if self._sealer is None:
            return pem.decode("ascii")
        return self._sealer.seal(kind, id, pem)

    async def _reseal_plain(self, stored: list[KeyRecord]) -> None:
        """Plain rows stored before the key file was set are sealed now (compare-and-set)."""
        if self._sealer is None:
            return
        for record in stored:
            if not is_sealed(record):
                sealed = attrs.evolve(record, material=self._sealer.seal(
                    record.kind, record.id, record.material.encode("ascii")))
                if await self._backend.set_key_states([(record.state, sealed)]):
                    log.info("encrypted stored key {kind}/{id} with "
                             "backend.encryption_key_file", kind=record.kind, id=record.id)

    # -- what a new or imported key of each kind is ------------------------------------

    def _read(self, *names: str) -> list[bytes] | None:
        """The files `names` (the private key first), None when there is no key file."""
        paths = [os.path.join(self._data_dir, n) for n in names]
        if not os.path.exists(paths[0]):
            return None
        try:
            out = []
            for path in paths:
                with open(path, "rb") as f:
                    out.append(f.read())
            return out
        except OSError as err:
            raise KeyStoreError(f"cannot import {err.filename}: {err.strerror} (restore the "
                                f"pair, or remove both files to make new keys)") from None

    def _ca_files(self) -> _Fresh | None:
        found = self._read("ca.key", "ca.crt")
        if found is None:
            return None
        key_pem, cert_pem = found
        try:
            ca = ClusterCA.from_pem(self._cluster_name, key_pem, cert_pem, self._clock)
        except ValueError as err:
            raise KeyStoreError(f"cannot import {self._data_dir}/ca.key: {err}") from None
        return _Fresh(ca.pin, key_pem, cert_pem.decode("ascii"))

    def _new_ca(self) -> _Fresh:
        key_pem, cert_pem = new_ca_pem(self._cluster_name, self._clock.seconds())
        ca = ClusterCA.from_pem(self._cluster_name, key_pem, cert_pem, self._clock)
        return _Fresh(ca.pin, key_pem, cert_pem.decode("ascii"))

    def _jwt_file(self) -> _Fresh | None:
        found = self._read(jwt_keys.KEY_FILE)
        if found is None:
            return None
        try:
            keys = jwt_keys.JwtKeys.from_pem(self._jwt_algorithm, found[0])
        except jwt_keys.JwtKeyError as err:
            raise KeyStoreError(f"cannot import {self._data_dir}/{jwt_keys.KEY_FILE}: "
                                f"{err.message}") from None
        return _Fresh(keys.kid, found[0], self._jwt_algorithm)

    def _new_jwt(self) -> _Fresh:
        return new_jwt_key(self._jwt_algorithm)

    def _saml_files(self) -> _Fresh | None:
        found = self._read(SP_KEY, SP_CERT)
        if found is None:
            return None
        return _Fresh(_fingerprint(found[1]), found[0], found[1].decode("ascii"))

    def _new_saml(self) -> _Fresh:
        key_pem, cert_pem = new_sp_pem(self._cluster_name, self._clock.seconds())
        return _Fresh(_fingerprint(cert_pem), key_pem, cert_pem.decode("ascii"))


def new_jwt_key(algorithm: str) -> _Fresh:
    """A new signing key for `algorithm`, named by its kid."""
    pem = jwt_keys.new_key_pem(algorithm)
    return _Fresh(jwt_keys.JwtKeys.from_pem(algorithm, pem).kid, pem, algorithm)


def _when(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime(
        "%Y-%m-%d %H:%M:%S UTC")


class JwtKeyWatcher:
    """Re-reads the JWT keys every poll (and on the control socket's refresh) into the
    proxy's key ring, so a rotation started anywhere is published here within a poll."""

    _log = Logger()

    def __init__(self, store: KeyStore, ring: jwt_keys.JwtKeyRing, clock: IReactorTime,
                 interval: float = KEY_POLL_INTERVAL) -> None:
        self._store = store
        self._ring = ring
        self._seen: list[KeyRecord] | None = None   # parsed once per change, not per poll
        self._poll = Poll(self.refresh, clock, interval, "JWT key watcher")

    def start(self) -> None:
        self._poll.start()

    def stop(self) -> None:
        self._poll.stop()

    async def refresh(self) -> None:
        """Read the keys now; never raises (one line logged, the next poll retries)."""
        try:
            await self._store.settle()
            records = await self._store.records(KIND_JWT)
            if records != self._seen:
                self._ring.replace(ring_entries(self._store.open_all(records)))
                self._seen = records
        except (KeyStoreError, BackendError, ValueError) as err:
            self._log.warn("cannot read the JWT keys (keeping the ones in use): {error}",
                           error=err)
