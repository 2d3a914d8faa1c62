"""The proxy's live CAs through a user-CA rotation (auth/ca_set.py, auth/keystore.py
rotate_ca), on a Clock and the memory backend: who issues, who is trusted, when the old
CA's certificates stop working, and that a CA of one role never vouches for the other."""

from __future__ import annotations

import attrs
import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet.task import Clock

from apptunnel.auth.ca import ClusterCA
from apptunnel.auth.ca_set import CaLoader, CaSet, CaWatcher
from apptunnel.auth.errors import AuthError
from apptunnel.auth.keystore import KIND_HOST_CA, KIND_USER_CA, KeyStore, KeyStoreError
from apptunnel.backend.memory import MemoryBackend
from apptunnel.proxy.tls_switch import SwitchableTls

GRACE = 30.0
DELAY = 5.0


def make_csr() -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
           .sign(key, hashes.SHA256()))
    return key, csr.public_bytes(serialization.Encoding.PEM)


def public_pem() -> bytes:
    return ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def load(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


class Proxy:
    """What a proxy holds: the key store, its CaSet and the watcher that keeps it."""

    def __init__(self, backend, clock, data_dir) -> None:
        self.store = KeyStore(backend, clock, data_dir=str(data_dir), cluster_name="unit",
                              jwt_algorithm="ES256")
        self.clock = clock
        self.changes = 0

    async def start(self) -> Proxy:
        keys = await self.store.load()
        loader = CaLoader("unit", self.clock)
        self.cas = CaSet(*loader.roles(keys.user_ca, keys.host_ca))
        self.watcher = CaWatcher(self.store, self.cas, loader, self.clock, self._changed)
        return self

    def _changed(self) -> None:
        self.changes += 1

    def user_cert(self, name: str = "alice") -> x509.Certificate:
        return load(self.cas.issue_user_cert(public_pem(), name, ["dev"], {}, 3600.0))

    def agent_cert(self) -> x509.Certificate:
        return load(self.cas.sign_agent_csr(make_csr()[1], "host-1", 3600.0))


@pytest.fixture
def clock() -> Clock:
    clock = Clock()
    clock.advance(1_800_000_000)
    return clock


@pytest_twisted.ensureDeferred
async def test_user_ca_rotation_trusts_new_at_once_issues_after_delay_drops_old_after_grace(
        tmp_path, clock):
    """Stored: both CAs trusted; after the publish delay the new one issues; the old one's
    certificates work until the grace ends and are refused after; agents are untouched."""
    backend = MemoryBackend()
    proxy = await (Proxy(backend, clock, tmp_path)).start()
    old_user, agent = proxy.user_cert(), proxy.agent_cert()
    old_pin = proxy.cas.pin
    plan = await proxy.store.rotate_ca(KIND_USER_CA, GRACE, delay=DELAY)
    assert (plan.old_id, plan.activate_at, plan.retire_at) == (
        old_pin, clock.seconds() + DELAY, clock.seconds() + DELAY + GRACE)

    await proxy.watcher.refresh()
    assert proxy.changes == 1 and len(proxy.cas.user.trusted) == 2
    assert proxy.cas.user.issuing.pin == old_pin          # not before the delay
    assert proxy.cas.verify_peer(old_user) == ("user", "alice")
    await proxy.watcher.refresh()
    assert proxy.changes == 1                             # idle polls change nothing

    clock.advance(DELAY)
    await proxy.watcher.refresh()
    assert proxy.cas.user.issuing.pin == plan.new_id
    new_user = proxy.user_cert("bob")
    new_user.verify_directly_issued_by(load(proxy.cas.user_issuer_pem))
    assert proxy.cas.verify_peer(new_user) == ("user", "bob")
    assert proxy.cas.verify_peer(old_user) == ("user", "alice")   # in its grace
    # The host role did not move: agents, the pin and the proxy's own CA are as before.
    assert proxy.cas.pin == old_pin and proxy.cas.verify_peer(agent) == ("agent", "host-1")
    states = {r.id: r.state for r in await backend.list_keys(KIND_USER_CA)}
    assert states == {old_pin: "retired", plan.new_id: "current"}   # settled in storage

    clock.advance(GRACE)
    await proxy.watcher.refresh()
    with pytest.raises(AuthError) as refused:
        proxy.cas.verify_peer(old_user)
    assert refused.value.status == 401
    assert proxy.cas.verify_peer(new_user) == ("user", "bob")
    assert proxy.cas.verify_peer(agent) == ("agent", "host-1")   # same key, host role
    assert [r.id for r in await backend.list_keys(KIND_USER_CA)] == [plan.new_id]
    assert [r.id for r in await backend.list_keys(KIND_HOST_CA)] == [old_pin]


@pytest_twisted.ensureDeferred
async def test_a_proxy_that_restarts_during_the_grace_trusts_both(tmp_path, clock):
    """A second proxy on the same store decides the same from the stored times."""
    backend = MemoryBackend()
    first = await Proxy(backend, clock, tmp_path / "a").start()
    old_user = first.user_cert()
    plan = await first.store.rotate_ca(KIND_USER_CA, GRACE, delay=DELAY)
    clock.advance(DELAY + 1)
    second = await Proxy(backend, clock, tmp_path / "b").start()
    assert second.cas.user.issuing.pin == plan.new_id
    assert second.cas.verify_peer(old_user) == ("user", "alice")
    assert second.cas.verify_peer(second.user_cert("bob")) == ("user", "bob")


@pytest_twisted.ensureDeferred
async def test_a_ca_of_one_role_never_vouches_for_the_other(tmp_path, clock):
    """Hostile: an agent certificate signed by the new user CA and a user certificate
    signed by a foreign CA are refused, even while both user CAs are trusted."""
    backend = MemoryBackend()
    proxy = await Proxy(backend, clock, tmp_path).start()
    plan = await proxy.store.rotate_ca(KIND_USER_CA, GRACE, delay=0.0)
    await proxy.watcher.refresh()
    [new_user_ca] = [ca for ca in proxy.cas.user.trusted if ca.pin == plan.new_id]
    forged = load(new_user_ca.sign_agent_csr(make_csr()[1], "host-evil", 3600.0))
    with pytest.raises(AuthError, match="agent CA"):
        proxy.cas.verify_peer(forged)
    stranger = ClusterCA.load_or_create(str(tmp_path / "other"), "unit", clock)
    foreign = load(stranger.issue_user_cert(public_pem(), "alice", ["admin"], {}, 3600.0))
    with pytest.raises(AuthError, match="not issued by this cluster"):
        proxy.cas.verify_peer(foreign)


@pytest_twisted.ensureDeferred
async def test_a_second_rotation_waits_for_the_grace_and_bad_rows_keep_the_cas_in_use(
        tmp_path, clock):
    """One rotation per role at a time (bounded trust set); an unreadable stored CA is one
    log line and the CAs in use are kept."""
    backend = MemoryBackend()
    proxy = await Proxy(backend, clock, tmp_path).start()
    await proxy.store.rotate_ca(KIND_USER_CA, GRACE, delay=DELAY)
    clock.advance(DELAY)
    with pytest.raises(KeyStoreError, match="under way"):
        await proxy.store.rotate_ca(KIND_USER_CA, GRACE, delay=DELAY)
    await proxy.watcher.refresh()
    in_use = proxy.cas.user
    [current] = [r for r in await backend.list_keys(KIND_USER_CA) if r.state == "current"]
    assert await backend.add_key(attrs.evolve(current, id="sha256:bad", state="next",
                                              material="garbage", activate_at=None))
    await proxy.watcher.refresh()     # logs, keeps
    assert proxy.cas.user is in_use


def test_switchable_tls_gives_new_connections_the_replaced_options(monkeypatch):
    """New connections get the context of the configuration last given; a bad replacement
    fails at once (the context is built in replace) and leaves the old one in place."""
    from apptunnel.proxy import tls_switch

    def build(tls):
        if tls == "bad":
            raise ValueError("bad certificate")
        return f"context of {tls}"

    monkeypatch.setattr(tls_switch, "server_context", build)
    tls = SwitchableTls("old")
    assert tls.context() == "context of old"
    tls.replace("new")
    assert tls.context() == "context of new"
    with pytest.raises(ValueError):
        tls.replace("bad")
    assert tls.context() == "context of new"


def test_the_web_and_tunnel_contexts_switch_together_or_not_at_all(monkeypatch):
    """A rotation rebuilds both ports' contexts: if the second cannot be built, the first
    keeps its old context too (the two ports never trust different CAs)."""
    from apptunnel.proxy import tls_switch

    def build(tls):
        if tls.startswith("bad"):
            raise ValueError("bad certificate")
        return f"context of {tls}"

    monkeypatch.setattr(tls_switch, "server_context", build)
    web, tunnel = SwitchableTls("web old"), SwitchableTls("tunnel old")
    with pytest.raises(ValueError):
        tls_switch.replace_together((web, "web new"), (tunnel, "bad tunnel"))
    assert (web.context(), tunnel.context()) == ("context of web old", "context of tunnel old")
    tls_switch.replace_together((web, "web new"), (tunnel, "tunnel new"))
    assert (web.context(), tunnel.context()) == ("context of web new", "context of tunnel new")


@pytest_twisted.ensureDeferred
async def test_an_upgraded_data_dir_still_starts_after_a_host_ca_rotation(tmp_path, clock):
    """An old data_dir keeps ca.key; after a host-CA rotation the proxy publishes the new
    CA as data_dir/ca.crt, which no longer fits ca.key: the leftover is ignored (warned),
    never a reason to refuse the start."""
    from apptunnel.auth.ca import publish_ca_cert

    old = ClusterCA.load_or_create(str(tmp_path), "unit", clock)   # ca.key + ca.crt
    backend = MemoryBackend()
    proxy = await Proxy(backend, clock, tmp_path).start()
    assert proxy.cas.pin == old.pin                                 # imported
    plan = await proxy.store.rotate_ca(KIND_HOST_CA, GRACE, delay=0.0)
    clock.advance(GRACE + 1)
    await proxy.watcher.refresh()
    assert proxy.cas.pin == plan.new_id
    publish_ca_cert(str(tmp_path), proxy.cas.cert_pem)
    again = await Proxy(backend, clock, tmp_path).start()
    assert again.cas.pin == plan.new_id
