"""Bots against a real Cluster: `apptunnel bots add` through the admin CLI, the installed
`twistd apptunnel-bot` as a subprocess, and the bot HTTP API called directly with a key
of our own (for the hostile cases: replays, wrong tokens, expired certificates)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import requests
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.support.cluster import BIN, Child, Cluster, wait_until
from tests.support.localhost import localhost_resolution


def add_bot(cluster: Cluster, name: str, roles: str, *extra: str) -> dict:
    """`apptunnel bots add NAME --roles ROLES --format json`: name, token, ca_pin."""
    return json.loads(cluster.cli("bots", "add", name, "--roles", roles, "--format", "json",
                                  *extra).stdout)


class BotProcess:
    """`twistd -n apptunnel-bot --config bot.yaml`, ready once it logs "ready"."""

    def __init__(self, cluster: Cluster, name: str, joined: dict, ttl: str = "3s",
                 outputs: list[dict] = (), wait: bool = True):
        self.root = cluster.root / f"bot-{name}"
        self.root.mkdir(exist_ok=True)
        self.config = self.root / "bot.yaml"
        self.config.write_text(yaml.safe_dump({
            "data_dir": str(self.root / "data"), "proxy_addr": cluster.public_addr,
            "join": {"token": joined["token"], "ca_pin": joined["ca_pin"]},
            "certificate_ttl": ttl, "outputs": list(outputs)}))
        runs = len(list(self.root.glob("bot*.log")))
        self.log_path = self.root / f"bot{runs or ''}.log"   # each run its own log
        self.child = Child(f"bot {name}", [str(BIN / "twistd"), "-n", "--pidfile=",
                                           "apptunnel-bot", "--config", str(self.config)],
                           self.root, self.log_path)
        if wait:
            wait_until(self._ready, 30, f"bot {name} to be ready")

    def _ready(self) -> bool:
        if not self.child.alive():
            raise AssertionError("bot exited:\n" + self.child.log_tail())
        return " ready: " in self.log()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def renewals(self) -> int:
        return self.log().count("renewed the certificate of bot")

    def stop(self) -> None:
        self.child.stop()


def curl(*args: str, timeout: float = 10) -> subprocess.CompletedProcess:
    """curl with a bounded run time; -s and the status code on the last line."""
    return subprocess.run(["curl", "-s", "-m", str(int(timeout)), "-w", "\n%{http_code}",
                           *args], capture_output=True, text=True, timeout=timeout + 5)


class BotKey:
    """A key of our own to call /v1/bots/join and /v1/bots/renew as a bot would."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.dir.mkdir(exist_ok=True)
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.key_path = self.dir / "key.pem"
        self.key_path.write_bytes(self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        self.public = self.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode("ascii")

    def save_cert(self, cert_pem: str, name: str = "cert.pem") -> Path:
        path = self.dir / name
        path.write_text(cert_pem)
        return path


def call(cluster: Cluster, path: str, body: dict, cert: Path | None = None,
         key: Path | None = None) -> requests.Response:
    """POST a JSON body to the proxy, optionally presenting a client certificate."""
    with localhost_resolution():
        return requests.post(cluster.url(path=path), json=body, verify=cluster.ca_file,
                             cert=(str(cert), str(key)) if cert else None, timeout=10)


def not_after(cert_pem: str) -> float:
    return x509.load_pem_x509_certificate(cert_pem.encode()).not_valid_after_utc.timestamp()
