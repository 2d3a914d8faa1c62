"""Several proxies on one PostgreSQL behind HAProxy, as an operator runs them (issue 13).

`Haproxy` runs Debian's haproxy in the foreground on our own config (TESTBED.md §7): TCP
mode, so TLS passes through and each proxy keeps its certificate; a health check every
500 ms takes a dead proxy out within about a second. `ProxyFarm` starts N installed
proxies (`twistd apptunnel`) sharing one database: the first makes the CA and JWT key,
the others get copies of them (docs/operator.rst) and their own data_dir and proxy_id.
Agents dial the balancer's tunnel port and learn the proxies from there. Every wait is
bounded; every child is stopped by the PID we hold.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from pathlib import Path

import requests
import yaml

from tests.support.cluster import BIN, PUBLIC_HOST, Child, free_port, wait_until
from tests.support.localhost import localhost_resolution
from tests.support.system import require_program

class Haproxy:
    """haproxy -db on a config of ours: a web and a tunnel frontend over N proxies."""

    def __init__(self, root: Path, web_port: int, tunnel_port: int,
                 backends: list[tuple[int, int]]) -> None:
        self.binary = require_program("haproxy", "haproxy")
        self.config = root / "haproxy.cfg"
        self.log_path = root / "haproxy.log"
        self.stats_socket = root / "haproxy.sock"
        lines = ["global", "    maxconn 4000", f"    stats socket {self.stats_socket} mode 600",
                 "defaults", "    mode tcp",
                 "    timeout connect 2s", "    timeout client 10m", "    timeout server 10m",
                 "    retries 3", "    option redispatch 1"]
        for name, port, index in (("web", web_port, 0), ("tunnel", tunnel_port, 1)):
            lines += [f"frontend {name}", f"    bind 127.0.0.1:{port}",
                      f"    default_backend {name}s", f"backend {name}s", "    balance roundrobin"]
            lines += [f"    server p{n} 127.0.0.1:{ports[index]} check inter 500 fall 2 rise 2"
                      for n, ports in enumerate(backends)]
        self.config.write_text("\n".join(lines) + "\n")
        check = subprocess.run([self.binary, "-c", "-q", "-f", str(self.config)],
                               capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stderr
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([self.binary, "-db", "-f", str(self.config)],
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)

    def sessions(self, backend: str, server: str) -> int:
        """Connections HAProxy has sent to ``server`` of ``backend`` so far (``stot``)."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(self.stats_socket))
            s.sendall(b"show stat\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        lines = data.decode().splitlines()
        header = lines[0].lstrip("# ").split(",")
        for line in lines[1:]:
            row = dict(zip(header, line.split(",")))
            if row.get("pxname") == backend and row.get("svname") == server:
                return int(row["stot"])
        raise AssertionError(f"no server {server} in backend {backend}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


class ProxyFarm:
    """N proxies on one PostgreSQL database behind HAProxy, plus agents and the CLI."""

    def __init__(self, root: Path, db: dict, count: int = 3) -> None:
        self.root = root
        self.db = db
        self.web_port = free_port()            # the balancer's: public_addr
        self.tunnel_port = free_port()
        self.ports = [(free_port(), free_port()) for _ in range(count)]
        self.public_addr = f"{PUBLIC_HOST}:{self.web_port}"
        self.proxies: list[Child | None] = [None] * count
        self.agents: list[Child] = []
        self.haproxy: Haproxy | None = None
        pw = root / "pg-password"
        pw.write_text(db["password"] + "\n")
        os.chmod(pw, 0o600)
        for n, (web, tunnel) in enumerate(self.ports):
            self.config(n).write_text(yaml.safe_dump({
                "cluster_name": "e2e",
                "data_dir": str(self.data_dir(n)),
                "public_addr": self.public_addr,
                "web_listen_addr": f"127.0.0.1:{web}",
                "tunnel_listen_addr": f"127.0.0.1:{tunnel}",
                "backend": {"type": "postgres", "dsn": db["dsn"], "password_file": str(pw)},
                "keepalive": {"interval": "1s", "timeout": "3s"},
                "diag_addr": f"127.0.0.1:{free_port()}",
            }))

    def config(self, n: int) -> Path:
        return self.root / f"proxy{n}.yaml"

    def data_dir(self, n: int) -> Path:
        return self.root / f"p{n}"

    @property
    def ca_file(self) -> str:
        return str(self.data_dir(0) / "ca.crt")

    def url(self, host_prefix: str = "", path: str = "/", port: int | None = None) -> str:
        host = f"{host_prefix}.{PUBLIC_HOST}" if host_prefix else PUBLIC_HOST
        return f"https://{host}:{port or self.web_port}{path}"

    # -- processes ---------------------------------------------------------------------

    def start(self) -> None:
        """The first proxy (it makes the keys), then the others with copies of them, then
        HAProxy in front of all."""
        # The cluster's CA and signing keys are in PostgreSQL (auth/keystore.py): the
        # first proxy makes them, the others read them.
        self.start_proxy(0)
        for n in range(1, len(self.ports)):
            os.makedirs(self.data_dir(n), mode=0o700, exist_ok=True)
            self.start_proxy(n)
        self.haproxy = Haproxy(self.root, self.web_port, self.tunnel_port, self.ports)
        wait_until(lambda: self._healthy(self.web_port), 15, "HAProxy's web frontend")

    def start_proxy(self, n: int) -> None:
        self.proxies[n] = Child(
            f"proxy{n}",
            [str(BIN / "twistd"), "-n", "--pidfile=", "apptunnel", "--config", str(self.config(n))],
            self.root, self.root / f"proxy{n}.log")
        wait_until(lambda: self._healthy(self.ports[n][0], n), 30, f"proxy {n}'s /healthz")

    def _healthy(self, port: int, n: int | None = None) -> bool:
        if n is not None and not self.proxies[n].alive():
            raise AssertionError(f"proxy {n} exited:\n" + self.proxies[n].log_tail())
        with localhost_resolution():
            r = requests.get(self.url(path="/healthz", port=port), verify=self.ca_file, timeout=2)
        return r.status_code == 200

    def kill(self, n: int) -> None:
        """kill -9: no clean stop, its row stays until it goes stale."""
        child = self.proxies[n]
        child.proc.send_signal(signal.SIGKILL)
        child.proc.wait(10)
        child.stop()

    def proxy_id(self, n: int) -> str:
        return (self.data_dir(n) / "proxy_id").read_text().strip()

    def cli(self, *args: str, stdin: str | None = None, n: int = 0) -> subprocess.CompletedProcess:
        result = subprocess.run([str(BIN / "apptunnel"), "--config", str(self.config(n)), *args],
                                cwd=self.root, input=stdin, capture_output=True, text=True,
                                timeout=60)
        if result.returncode != 0:
            raise AssertionError(f"apptunnel {' '.join(args)} failed: {result.stderr}")
        return result

    def start_agent(self, name: str, apps: list[dict]) -> Child:
        token = json.loads(self.cli("tokens", "add", "--type", "app", "--ttl", "1h",
                                    "--format", "json").stdout)
        config = self.root / f"{name}.yaml"
        config.write_text(yaml.safe_dump({
            "data_dir": str(self.root / name),
            "proxy_addr": f"127.0.0.1:{self.tunnel_port}",   # the balancer: the seed
            "keepalive": {"interval": "1s", "timeout": "3s"},
            "diag_addr": f"127.0.0.1:{free_port()}",
            "join": {"token": token["token"], "ca_pin": token["ca_pin"]},
            "apps": apps,
        }))
        agent = Child(name, [str(BIN / "twistd"), "-n", "--pidfile=", "apptunnel-agent",
                             "--config", str(config)], self.root, self.root / f"{name}.log")
        self.agents.append(agent)
        return agent

    def stop(self) -> None:
        for child in self.agents:
            child.stop()
        if self.haproxy is not None:
            self.haproxy.stop()
        for child in self.proxies:
            if child is not None:
                child.stop()
