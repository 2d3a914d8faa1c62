"""A real proxy and agent, started as the installed commands, for end-to-end tests.

`twistd apptunnel`, `twistd apptunnel-agent` and `apptunnel` run as subprocesses from the
same virtualenv as the tests, with the working directory in a temp dir so they import the
installed package, exactly as a user runs them. Every wait is bounded; every child is
stopped by the PID we hold.
"""

from __future__ import annotations

import http.client
import json
import re
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jwt as pyjwt
import requests
import yaml

from tests.support.localhost import localhost_resolution

BIN = Path(sys.executable).parent
PUBLIC_HOST = "apptunnel.localhost"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_run(count: int) -> int:
    """The first of ``count`` consecutive free loopback ports (a proxy with workers uses
    the tunnel port + 1.. and the diag port + 1..: proxy/workers.py)."""
    for _ in range(200):
        first = free_port()
        if first + count > 65535:
            continue
        try:
            for port in range(first + 1, first + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return first
    raise AssertionError(f"no {count} consecutive free ports")


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05):
    """Poll `predicate` until it returns a true value; fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except Exception as err:  # the thing we wait for is not up yet
            last_error = err
        else:
            if value:
                return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last error: {last_error})")


class Child:
    """One subprocess with its output in a log file we can show when it misbehaves."""

    def __init__(self, name: str, argv: list[str], cwd: Path, log_path: Path,
                 env: dict | None = None):
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            argv, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env,
        )

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss_kib(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+)", status).group(1))

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


def app_jwt_claims(cluster: "Cluster", echo: dict, app: str = "hello") -> dict:
    """The claims of the JWT the proxy sent an echo app (its JSON answer), verified against
    the proxy's JWKS with the cluster as issuer and the app's public origin as audience."""
    [token] = [v for k, v in echo["headers"] if k.lower() == "apptunnel-jwt-assertion"]
    with localhost_resolution():
        jwks = requests.get(cluster.url(path="/.well-known/jwks.json"), verify=cluster.ca_file,
                            timeout=5).json()
    key = pyjwt.PyJWKSet.from_dict(jwks)[pyjwt.get_unverified_header(token)["kid"]]
    return pyjwt.decode(token, key.key, algorithms=["RS256"], issuer="e2e",
                        audience=f"https://{app}.{PUBLIC_HOST}:{cluster.web_port}")


class Cluster:
    """A proxy + agent pair on free loopback ports, configured through files and the CLI."""

    def __init__(self, apps: list[dict], root: Path | None = None, workers: int = 1):
        self.root = root or Path(tempfile.mkdtemp(prefix="apptunnel-e2e-"))
        self.workers = workers
        self.web_port = free_port()
        # workers > 1: worker I also listens on tunnel_port + 1 + I and diag_port + I.
        self.tunnel_port = free_port_run(workers + 1) if workers > 1 else free_port()
        self.diag_port = free_port_run(workers)   # the proxy's /metrics, /healthz, /readyz
        self.agent_diag_port = free_port()
        self.public_addr = f"{PUBLIC_HOST}:{self.web_port}"
        self.proxy_config = self.root / "proxy.yaml"
        self.agent_config = self.root / "agent.yaml"
        self.apps = apps
        self.proxy: Child | None = None
        self.agent: Child | None = None
        self.proxy_config.write_text(yaml.safe_dump({
            "cluster_name": "e2e",
            "data_dir": str(self.root / "proxy"),
            "public_addr": self.public_addr,
            "web_listen_addr": f"127.0.0.1:{self.web_port}",
            "tunnel_listen_addr": f"127.0.0.1:{self.tunnel_port}",
            "diag_addr": f"127.0.0.1:{self.diag_port}",
            "backend": {"type": "sqlite"},
            "keepalive": {"interval": "1s", "timeout": "3s"},
            **({"workers": workers} if workers > 1 else {}),
        }))

    @property
    def ca_file(self) -> str:
        return str(self.root / "proxy" / "ca.crt")

    def url(self, host_prefix: str = "", path: str = "/") -> str:
        host = f"{host_prefix}.{PUBLIC_HOST}" if host_prefix else PUBLIC_HOST
        return f"https://{host}:{self.web_port}{path}"

    # -- processes ---------------------------------------------------------------------

    def start_proxy(self) -> None:
        self.proxy = Child(
            "proxy",
            [str(BIN / "twistd"), "-n", "--pidfile=", "apptunnel", "--config", str(self.proxy_config)],
            self.root, self.root / "proxy.log",
        )
        wait_until(self._proxy_healthy, 30, "the proxy's /healthz")

    def _proxy_healthy(self) -> bool:
        if not self.proxy.alive():
            raise AssertionError("proxy exited:\n" + self.proxy.log_tail())
        with localhost_resolution():
            r = requests.get(self.url(path="/healthz"), verify=self.ca_file, timeout=2)
        return r.status_code == 200

    def cli(self, *args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [str(BIN / "apptunnel"), "--config", str(self.proxy_config), *args],
            cwd=self.root, input=stdin, capture_output=True, text=True, timeout=60,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"apptunnel {' '.join(args)} failed: {result.stderr}")
        return result

    def start_agent(self) -> None:
        if not (self.root / "agent" / "agent.crt").exists():
            token = json.loads(self.cli("tokens", "add", "--type", "app", "--ttl", "1h",
                                        "--format", "json").stdout)
            join = {"token": token["token"], "ca_pin": token["ca_pin"]}
        else:
            join = None
        config = {
            "data_dir": str(self.root / "agent"),
            "proxy_addr": f"127.0.0.1:{self.tunnel_port}",
            "diag_addr": f"127.0.0.1:{self.agent_diag_port}",
            "keepalive": {"interval": "1s", "timeout": "3s"},
            "apps": self.apps,
        }
        if join:
            config["join"] = join
        self.agent_config.write_text(yaml.safe_dump(config))
        self.agent = Child(
            "agent",
            [str(BIN / "twistd"), "-n", "--pidfile=", "apptunnel-agent", "--config", str(self.agent_config)],
            self.root, self.root / "agent.log",
        )

    def add_user(self, name: str, roles: list[str], password: str, traits: list[str] = ()) -> None:
        args = ["users", "add", name, "--roles", ",".join(roles), "--password-stdin"]
        for trait in traits:
            args += ["--traits", trait]
        self.cli(*args, stdin=password + "\n")

    def add_role(self, doc: dict) -> None:
        path = self.root / f"role-{doc['metadata']['name']}.yaml"
        path.write_text(yaml.safe_dump(doc))
        self.cli("create", "-f", str(path))

    def stop(self) -> None:
        for child in (self.agent, self.proxy):
            if child is not None:
                child.stop()


def audit(cluster: Cluster, type: str) -> list[dict]:
    """The cluster's audit events of `type`, through the admin CLI."""
    out = cluster.cli("audit", "search", "--type", type, "--format", "json").stdout.strip()
    if out.startswith("["):
        return json.loads(out)
    return [json.loads(line) for line in out.splitlines() if line.strip()]


class Browser:
    """A requests session that follows redirects and keeps cookies like a browser would."""

    def __init__(self, cluster: Cluster):
        self.cluster = cluster
        self.session = requests.Session()
        self.session.trust_env = False
        self.session.verify = cluster.ca_file

    def get(self, url: str, **kwargs) -> requests.Response:
        with localhost_resolution():
            return self.session.get(url, timeout=30, **kwargs)

    def post(self, url: str, **kwargs) -> requests.Response:
        with localhost_resolution():
            return self.session.post(url, timeout=30, **kwargs)

    def login_through(self, url: str, username: str, password: str) -> requests.Response:
        """Open `url`, sign in on the login page it leads to, and return where we land."""
        page = self.get(url)
        assert page.url.startswith(self.cluster.url(path="/web/login")), page.url
        next_value = re.search(r'name="next" value="([^"]*)"', page.text)
        import html

        form = {"username": username, "password": password,
                "next": html.unescape(next_value.group(1)) if next_value else "/"}
        return self.post(self.cluster.url(path="/web/login"), data=form,
                         headers={"Origin": self.cluster.url().rstrip("/")})


def post_from(cluster: Cluster, path: str, body: dict | str, source: str = "127.0.0.1",
         timeout: float = 30) -> tuple[int, dict, str]:
    """One POST from `source` (any 127.0.0.x: loopback is a whole /8) over a fresh TLS
    connection, with the proxy's Origin: (status, headers, body text)."""
    context = ssl.create_default_context(cafile=cluster.ca_file)
    sock = socket.create_connection(("127.0.0.1", cluster.web_port), timeout, (source, 0))
    conn = http.client.HTTPConnection(PUBLIC_HOST, cluster.web_port, timeout=timeout)
    conn.sock = context.wrap_socket(sock, server_hostname=PUBLIC_HOST)
    try:
        if isinstance(body, dict):
            payload, kind = json.dumps(body), "application/json"
        else:
            payload, kind = body, "application/x-www-form-urlencoded"
        conn.request("POST", path, body=payload, headers={
            "Content-Type": kind, "Origin": cluster.url().rstrip("/")})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read().decode()
    finally:
        conn.close()
