"""The key store (auth/keystore.py): keys made once, imported from old data dirs, sealed."""

from __future__ import annotations

import base64
import os

import attrs
import jwt as pyjwt
import pytest
import pytest_twisted
from twisted.internet.task import Clock

from apptunnel.auth.ca import ClusterCA
from apptunnel.auth.jwt import JwtKeyRing, JwtKeys, JwtSigner
from apptunnel.auth.keystore import (
    KIND_CA, KIND_JWT, PUBLISH_DELAY, RETIRE_MARGIN, JwtKeyWatcher, KeyStore, KeyStoreError,
    Sealer, ring_entries,
)
from apptunnel.backend.memory import MemoryBackend
from apptunnel.files import read_encryption_key

KEY = bytes(range(32))


def store(backend, data_dir, sealer=None, algorithm="ES256") -> KeyStore:
    clock = Clock()
    clock.advance(1_800_000_000)
    return KeyStore(backend, clock, data_dir=str(data_dir), cluster_name="unit",
                    jwt_algorithm=algorithm, sealer=sealer)


@pytest_twisted.ensureDeferred
async def test_first_load_makes_one_key_of_each_kind_and_later_loads_read_them(tmp_path):
    backend = MemoryBackend()
    first = await store(backend, tmp_path).load()
    again = await store(backend, tmp_path / "other-proxy").load()
    assert first == again
    assert [k.state for k in first.jwt] == ["current"]
    kinds = sorted(k.kind for k in await backend.list_keys())
    # Both CA roles start as the cluster CA (same key): nothing changes until a rotation.
    assert kinds == ["ca", "host_ca", "jwt", "saml-sp", "user_ca"]
    assert [k.id for k in first.user_ca] == [k.id for k in first.host_ca] == [first.ca.id]
    assert os.listdir(tmp_path) == []          # nothing written to data_dir


@pytest_twisted.ensureDeferred
async def test_key_files_of_an_old_data_dir_are_imported_once_and_left_alone(tmp_path):
    ca = ClusterCA.load_or_create(str(tmp_path), "unit", Clock())
    jwt = JwtKeys.load_or_create(str(tmp_path), "ES256")
    before = {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)}
    keys = await store(MemoryBackend(), tmp_path).load()
    assert keys.ca.id == ca.pin
    assert keys.jwt[0].id == jwt.kid
    assert {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)} == before


@pytest_twisted.ensureDeferred
async def test_a_data_dir_holding_another_ca_does_not_replace_the_stored_one(tmp_path):
    backend = MemoryBackend()
    stored = await store(backend, tmp_path / "a").load()
    ClusterCA.load_or_create(str(tmp_path / "b"), "unit", Clock())
    assert (await store(backend, tmp_path / "b").load()).ca == stored.ca


@pytest_twisted.ensureDeferred
async def test_an_unusable_key_file_is_one_line_not_a_new_key(tmp_path):
    (tmp_path / "ca.crt").write_text("published certificate alone: not imported")
    await store(MemoryBackend(), tmp_path).load()
    (tmp_path / "ca.key").write_text("garbage")
    with pytest.raises(KeyStoreError, match="cannot import .*ca.key: not a PEM"):
        await store(MemoryBackend(), tmp_path).load()
    os.unlink(tmp_path / "ca.crt")
    with pytest.raises(KeyStoreError, match="cannot import .*ca.crt"):
        await store(MemoryBackend(), tmp_path).load()
    os.unlink(tmp_path / "ca.key")
    JwtKeys.load_or_create(str(tmp_path), "RS256")
    with pytest.raises(KeyStoreError, match="jwt.key: .*cannot sign ES256"):
        await store(MemoryBackend(), tmp_path).load()


@pytest_twisted.ensureDeferred
async def test_sealed_rows_are_not_the_pem_and_open_with_the_key_file_only(tmp_path):
    backend = MemoryBackend()
    plain = await store(backend, tmp_path, Sealer(KEY)).load()
    for row in await backend.list_keys():
        assert row.material.startswith("enc:v1:")
        assert "PRIVATE KEY" not in row.material
        assert base64.b64decode(row.material[7:]).find(b"PRIVATE") == -1
    assert (await store(backend, tmp_path, Sealer(KEY)).load()) == plain
    with pytest.raises(KeyStoreError, match="is encrypted and backend.encryption_key_file "
                                            "is not set"):
        await store(backend, tmp_path).load()
    with pytest.raises(KeyStoreError, match="does not decrypt .* wrong key file"):
        await store(backend, tmp_path, Sealer(bytes(32))).load()


@pytest_twisted.ensureDeferred
async def test_a_sealed_row_moved_onto_another_row_does_not_open(tmp_path):
    backend = MemoryBackend()
    await store(backend, tmp_path, Sealer(KEY)).load()
    ca, jwt = (await backend.list_keys(KIND_CA))[0], (await backend.list_keys(KIND_JWT))[0]
    # An attacker with write access to the table puts the JWT row's sealed material
    # under the CA's id: the associated data (kind, id) no longer matches.
    assert await backend.set_key_states([("current", attrs.evolve(ca, material=jwt.material))])
    with pytest.raises(KeyStoreError, match=f"stored key ca/{ca.id} does not decrypt"):
        await store(backend, tmp_path, Sealer(KEY)).load()


@pytest_twisted.ensureDeferred
async def test_plain_rows_are_sealed_once_a_key_file_is_set(tmp_path):
    backend = MemoryBackend()
    plain = await store(backend, tmp_path).load()
    assert (await store(backend, tmp_path, Sealer(KEY)).load()).ca.private_pem == \
        plain.ca.private_pem
    assert all(r.material.startswith("enc:v1:") for r in await backend.list_keys())


def test_encryption_key_file_is_32_bytes_raw_or_base64_and_private(tmp_path):
    path = tmp_path / "key"
    for content in (KEY, base64.b64encode(KEY) + b"\n"):
        path.write_bytes(content)
        path.chmod(0o600)
        assert read_encryption_key(str(path)) == KEY
    path.chmod(0o640)
    with pytest.raises(ValueError, match="readable by group or others"):
        read_encryption_key(str(path))
    path.chmod(0o600)
    for bad in (b"short", KEY + b"x", base64.b64encode(KEY[:31])):
        path.write_bytes(bad)
        with pytest.raises(ValueError, match="must hold 32 random bytes"):
            read_encryption_key(str(path))
    with pytest.raises(ValueError, match="cannot read"):
        read_encryption_key(str(tmp_path / "missing"))


# -- JWT rotation (auth rotate --type jwt) -------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_jwt_rotation_publishes_first_signs_later_and_drops_the_old_key_last(tmp_path):
    """The schedule on one Clock: published at once, signing after the publish delay,
    the old key in the JWKS until its last token expired, then deleted from storage."""
    backend = MemoryBackend()
    clock = Clock()
    clock.advance(1_800_000_000)
    keystore = KeyStore(backend, clock, data_dir=str(tmp_path), cluster_name="unit",
                        jwt_algorithm="ES256")
    keys = await keystore.load()
    ring = JwtKeyRing(clock, ring_entries(keys.jwt))
    watcher = JwtKeyWatcher(keystore, ring, clock)
    signer = JwtSigner(ring, "unit", clock, ttl=60)
    old = ring.kid

    def kids():
        return [k["kid"] for k in ring.jwks()["keys"]]

    def token_kid():
        return pyjwt.get_unverified_header(
            signer.token("session", "alice", (), {}, "https://app"))["kid"]

    assert token_kid() == old
    plan = await keystore.rotate_jwt(jwt_ttl=60)
    assert plan.old_id == old and plan.activate_at == clock.seconds() + PUBLISH_DELAY
    assert plan.retire_at == plan.activate_at + 60 + RETIRE_MARGIN
    with pytest.raises(KeyStoreError, match="a rotation is under way"):
        await keystore.rotate_jwt(jwt_ttl=60)
    await watcher.refresh()
    assert kids() == [old, plan.new_id]                    # published, not signing
    assert token_kid() == old
    clock.advance(PUBLISH_DELAY)
    assert token_kid() == plan.new_id                      # the cached token is re-signed
    await watcher.refresh()
    states = {k.id: k.state for k in await backend.list_keys("jwt")}
    assert states == {old: "retired", plan.new_id: "current"}
    assert kids() == [old, plan.new_id]                    # old tokens still verify
    clock.advance(60 + RETIRE_MARGIN)
    assert kids() == [plan.new_id]
    await watcher.refresh()
    assert [k.id for k in await backend.list_keys("jwt")] == [plan.new_id]
    # And a second rotation is possible once the first is done.
    assert (await keystore.rotate_jwt(jwt_ttl=60)).old_id == plan.new_id


@pytest_twisted.ensureDeferred
async def test_a_watcher_that_cannot_read_keys_keeps_signing_with_what_it_has(tmp_path):
    backend = MemoryBackend()
    keys = await store(backend, tmp_path, Sealer(KEY)).load()
    clock = Clock()
    ring = JwtKeyRing(clock, ring_entries(keys.jwt))
    kid = ring.kid
    await JwtKeyWatcher(store(backend, tmp_path), ring, clock).refresh()   # no key file
    assert ring.kid == kid and [k["kid"] for k in ring.jwks()["keys"]] == [kid]
