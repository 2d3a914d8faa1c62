"""Cluster keys in the backend (auth/keystore.py) with real `twistd apptunnel` processes:
one CA for proxies racing on an empty PostgreSQL, keys sealed at rest, a wrong or missing
key file refused in one line, an old data dir's key files imported."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import requests
import yaml
from twisted.internet.task import Clock

from apptunnel.auth.ca import ClusterCA
from apptunnel.auth.jwt import JwtKeys
from tests.support.cluster import BIN, Child, free_port
from tests.support.localhost import localhost_resolution
from tests.support.postgres import PostgresServer

TIMEOUT = 30.0
PIN = re.compile(r"serving https://\S+ .*CA pin (sha256:[0-9a-f]{64})")


@pytest.fixture(scope="module")
def postgres_server():
    server = PostgresServer().start()
    try:
        yield server
    finally:
        server.stop()


def proxy_yaml(root: Path, name: str, backend: dict) -> Path:
    web, tunnel = free_port(), free_port()
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "cluster_name": "keys",
        "data_dir": str(root / name),
        "public_addr": f"apptunnel.localhost:{web}",
        "web_listen_addr": f"127.0.0.1:{web}",
        "tunnel_listen_addr": f"127.0.0.1:{tunnel}",
        "diag_addr": f"127.0.0.1:{free_port()}",
        "backend": backend,
    }))
    return path


def postgres_backend(root: Path, db: dict, key_file: Path | None = None) -> dict:
    password = root / "pg-password"
    password.write_text(db["password"] + "\n")
    password.chmod(0o600)
    backend = {"type": "postgres", "dsn": db["dsn"], "password_file": str(password)}
    if key_file is not None:
        backend["encryption_key_file"] = str(key_file)
    return backend


def key_file(root: Path, name: str = "keys.key") -> Path:
    path = root / name
    path.write_bytes(os.urandom(32))
    path.chmod(0o600)
    return path


def start(root: Path, config: Path) -> Child:
    return Child(config.stem, [str(BIN / "twistd"), "-n", "--pidfile=", "apptunnel",
                               "--config", str(config)], root, root / f"{config.stem}.log")


def serving_pin(child: Child) -> str:
    """The CA pin the proxy says it serves with; fails if it exits or is slow."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        found = PIN.search(child.log_path.read_text(errors="replace"))
        if found:
            return found.group(1)
        if not child.alive():
            raise AssertionError(f"{child.name} exited:\n{child.log_tail()}")
        time.sleep(0.1)
    raise AssertionError(f"{child.name} not serving in {TIMEOUT}s:\n{child.log_tail()}")


def refused(root: Path, config: Path) -> str:
    """Run a proxy that must not start: exit non-zero, no traceback; its one error line."""
    done = subprocess.run([str(BIN / "twistd"), "-n", "--pidfile=", "apptunnel",
                           "--config", str(config)], cwd=root, capture_output=True, text=True,
                          timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "Traceback" not in output and "serving" not in output, output
    lines = [line for line in output.splitlines() if "#critical]" in line or "error:" in line]
    assert len(lines) == 1, output
    return lines[0]


def test_proxies_racing_on_one_postgres_share_one_sealed_ca(tmp_path, postgres_server):
    """Three proxies start at once on an empty database: one CA, one JWT key, every row
    sealed (the raw material is not a PEM); without the key file, or with another one, a
    proxy refuses to start with one line; every start without a key file is warned."""
    db = postgres_server.new_database()
    secret = key_file(tmp_path)
    backend = postgres_backend(tmp_path, db, secret)
    children = [start(tmp_path, proxy_yaml(tmp_path, f"proxy{i}", backend)) for i in range(3)]
    try:
        pins = {serving_pin(child) for child in children}
        assert len(pins) == 1, pins
        rows = postgres_server.psql("SELECT kind, state, material FROM keys ORDER BY kind",
                                    database=db["dbname"]).splitlines()
        # The two CA roles start as the cluster CA (racing proxies agree: insert-if-absent).
        assert [row.split("|")[:2] for row in rows] == [
            ["ca", "current"], ["host_ca", "current"], ["jwt", "current"],
            ["saml-sp", "current"], ["user_ca", "current"]]
        for row in rows:
            material = row.split("|", 2)[2]
            assert material.startswith("enc:v1:") and "PRIVATE KEY" not in material
        for child in children:
            assert "unencrypted" not in child.log_path.read_text()
            assert not (tmp_path / child.name / "ca.key").exists()
            assert (tmp_path / child.name / "ca.crt").exists()     # the public certificate
    finally:
        for child in children:
            child.stop()

    no_key = dict(backend)
    del no_key["encryption_key_file"]
    line = refused(tmp_path, proxy_yaml(tmp_path, "nokey", no_key))
    assert "is encrypted and backend.encryption_key_file is not set" in line, line
    wrong = dict(backend, encryption_key_file=str(key_file(tmp_path, "wrong.key")))
    line = refused(tmp_path, proxy_yaml(tmp_path, "wrongkey", wrong))
    assert "does not decrypt with backend.encryption_key_file" in line, line

    plain_db = postgres_server.new_database()
    child = start(tmp_path, proxy_yaml(tmp_path, "plain", postgres_backend(tmp_path, plain_db)))
    try:
        serving_pin(child)
        assert "stored unencrypted in PostgreSQL" in child.log_path.read_text()
    finally:
        child.stop()


def test_a_key_file_readable_by_others_is_refused_in_one_line(tmp_path):
    secret = key_file(tmp_path)
    secret.chmod(0o644)
    config = proxy_yaml(tmp_path, "proxy", {"type": "sqlite",
                                            "encryption_key_file": str(secret)})
    line = refused(tmp_path, config)
    assert "backend.encryption_key_file" in line and "chmod 600" in line, line


def test_an_old_data_dir_keeps_its_ca_and_signing_key(tmp_path):
    """Keys made as files by an older proxy are imported: same CA pin (agents keep
    trusting it), same JWT kid (apps keep verifying), files left as they were."""
    data = tmp_path / "proxy"
    clock = Clock()
    clock.advance(time.time())
    ca = ClusterCA.load_or_create(str(data), "keys", clock)
    jwt = JwtKeys.load_or_create(str(data), "RS256")
    before = (data / "ca.key").read_bytes()
    child = start(tmp_path, proxy_yaml(tmp_path, "proxy", {"type": "sqlite"}))
    try:
        assert serving_pin(child) == ca.pin
        log = child.log_path.read_text()
        assert "imported the ca key" in log and "imported the jwt key" in log
        public = yaml.safe_load((tmp_path / "proxy.yaml").read_text())["public_addr"]
        with localhost_resolution():
            jwks = requests.get(f"https://{public}/.well-known/jwks.json",
                                verify=str(data / "ca.crt"), timeout=10).json()
        assert [k["kid"] for k in jwks["keys"]] == [jwt.kid]
    finally:
        child.stop()
    assert (data / "ca.key").read_bytes() == before
