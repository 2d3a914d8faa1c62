"""`make demo`: a proxy, an agent and the sample app on this machine, ready to click.

    python -m apptunnel.demo [--dir demo-data] [--port 3080]

It writes the two config files, starts the installed commands exactly as an operator would
(`twistd apptunnel`, `apptunnel ...`, `twistd apptunnel-agent`), signs the demo user in once
to check the whole path, and prints a banner whose `$ ` lines are commands that work when
pasted (tests/integration/test_demo.py runs each of them). It also leaves the password and
the CA pin in ``DIR/demo-password`` and ``DIR/ca-pin`` for README.rst's lines.

Stopping: Ctrl-C (SIGINT to the terminal's process group), SIGTERM to make's process group
and SIGTERM to this process all stop the agent, the sample app and the proxy, in that
order. The children run in their own process group (so a group signal reaches only us and
we stop them in order) and are told by the kernel to end if we die without cleaning up
(``PR_SET_PDEATHSIG``).

This is orchestration outside any reactor: plain subprocesses, `requests` and bounded
polling loops. `LocalCluster` is reused by bench/run.py.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import html
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import parse_qs, urlsplit

import requests
import yaml

BIN = Path(sys.executable).parent
PUBLIC_HOST = "apptunnel.localhost"
APP_COOKIE = "__Host-apptunnel_app"


class DemoError(Exception):
    """Something did not start or answer; the message says what and shows the log tail."""


def free_port() -> int:
    """A port nothing listens on right now (bind port 0, read it, close)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


_real_getaddrinfo = socket.getaddrinfo


def _loopback_getaddrinfo(host, *args, **kwargs):
    name = host.decode("ascii", "replace") if isinstance(host, bytes) else host
    if isinstance(name, str) and (name == "localhost" or name.endswith(".localhost")):
        host = "127.0.0.1"
    return _real_getaddrinfo(host, *args, **kwargs)


@contextlib.contextmanager
def loopback_resolution() -> Iterator[None]:
    """Resolve `*.localhost` to 127.0.0.1 in this process (RFC 6761; glibc does not).

    Only the lookup changes: TLS still checks the certificate for the name in the URL.
    """
    socket.getaddrinfo = _loopback_getaddrinfo
    try:
        yield
    finally:
        socket.getaddrinfo = _real_getaddrinfo


_PR_SET_PDEATHSIG = 1


def _end_with_parent() -> None:
    """In the child before exec: SIGTERM when the demo dies, even by SIGKILL (Linux)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass   # not Linux: the orderly stop in `run` still applies


class Child:
    """One subprocess with its output in a log file, stopped by the PID we hold."""

    def __init__(self, name: str, argv: list[str], cwd: Path, log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "ab")
        # Its own process group: Ctrl-C reaches only us, and we stop the children in order.
        self.proc = subprocess.Popen(argv, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, process_group=0,
                                     preexec_fn=_end_with_parent)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join("    " + line for line in text[-lines:])

    def rss_kib(self) -> int | None:
        """Resident memory from /proc, or None once the process is gone."""
        try:
            status = Path(f"/proc/{self.proc.pid}/status").read_text()
        except OSError:
            return None
        found = re.search(r"VmRSS:\s+(\d+)", status)
        return int(found.group(1)) if found else None

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


def wait_until(predicate: Callable[[], Any], timeout: float, what: str,
               child: Child | None = None, interval: float = 0.1) -> Any:
    """Poll `predicate` until it returns a true value; DemoError naming `what` after `timeout`.

    If `child` exits meanwhile we stop at once and show the end of its log.
    """
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if child is not None and not child.alive():
            raise DemoError(f"{child.name} exited (status {child.proc.returncode}) while waiting "
                            f"for {what}; end of {child.log_path}:\n{child.log_tail()}")
        try:
            value = predicate()
        except (requests.RequestException, OSError, ValueError) as err:
            last_error = err
        else:
            if value:
                return value
        time.sleep(interval)
    message = f"timed out after {timeout:.0f}s waiting for {what}"
    if last_error is not None:
        message += f" (last error: {str(last_error)[:200]})"
    if child is not None:
        message += f"; end of {child.log_path}:\n{child.log_tail()}"
    raise DemoError(message)


class LocalCluster:
    """One proxy and one agent on loopback ports, configured through files and the CLI.

    Call inside `loopback_resolution()` so `*.localhost` URLs reach the proxy.
    """

    def __init__(self, root: Path, *, web_port: int, tunnel_port: int, cluster_name: str = "demo",
                 keepalive: dict | None = None) -> None:
        self.root = root.resolve()
        self.web_port = web_port
        self.tunnel_port = tunnel_port
        # /metrics, /healthz, /readyz of each process: free ports, so demos run side by side.
        self.diag_port, self.agent_diag_port = free_port(), free_port()
        self.cluster_name = cluster_name
        self.keepalive = keepalive
        self.public_addr = f"{PUBLIC_HOST}:{web_port}"
        self.proxy_config = self.root / "proxy.yaml"
        self.agent_config = self.root / "agent.yaml"
        self.proxy: Child | None = None
        self.agent: Child | None = None
        self.ca_pin: str | None = None

    @property
    def ca_file(self) -> Path:
        return self.root / "proxy" / "ca.crt"

    def url(self, app: str = "", path: str = "/") -> str:
        host = f"{app}.{PUBLIC_HOST}" if app else PUBLIC_HOST
        return f"https://{host}:{self.web_port}{path}"

    def _session(self) -> requests.Session:
        session = requests.Session()
        session.trust_env = False  # REQUESTS_CA_BUNDLE would override verify=
        session.verify = str(self.ca_file)
        return session

    # -- proxy and CLI ---------------------------------------------------------------------

    def write_proxy_config(self) -> None:
        config: dict[str, Any] = {
            "cluster_name": self.cluster_name,
            "data_dir": str(self.root / "proxy"),
            "public_addr": self.public_addr,
            "web_listen_addr": f"127.0.0.1:{self.web_port}",
            "tunnel_listen_addr": f"127.0.0.1:{self.tunnel_port}",
            "diag_addr": f"127.0.0.1:{self.diag_port}",
            "backend": {"type": "sqlite"},
        }
        if self.keepalive:
            config["keepalive"] = self.keepalive
        self.proxy_config.write_text(yaml.safe_dump(config, sort_keys=False))

    def start_proxy(self, timeout: float = 30.0) -> None:
        self.proxy = Child("proxy", [str(BIN / "twistd"), "-n", "--pidfile=", "apptunnel",
                                     "--config", str(self.proxy_config)],
                           self.root, self.root / "proxy.log")
        wait_until(self._healthy, timeout, f"the proxy's {self.url(path='/healthz')}", self.proxy)

    def _healthy(self) -> bool:
        if not self.ca_file.exists():
            return False
        return self._session().get(self.url(path="/healthz"), timeout=2).status_code == 200

    def cli(self, *args: str, stdin: str | None = None, check: bool = True
            ) -> subprocess.CompletedProcess:
        """Run `apptunnel --config proxy.yaml ARGS` from the same environment."""
        argv = [sys.executable, "-m", "apptunnel.cli.main", "--config", str(self.proxy_config), *args]
        result = subprocess.run(argv, cwd=self.root, input=stdin, capture_output=True, text=True,
                                timeout=60)
        if check and result.returncode != 0:
            raise DemoError(f"`apptunnel {' '.join(args)}` failed: "
                            f"{(result.stderr or result.stdout).strip()[:500]}")
        return result

    def put_role(self, name: str, app_labels: dict) -> None:
        path = self.root / f"role-{name}.yaml"
        path.write_text(yaml.safe_dump({"kind": "role", "metadata": {"name": name},
                                        "spec": {"allow": {"app_labels": app_labels}}}))
        self.cli("create", "-f", str(path), "--force")

    def put_user(self, name: str, roles: list[str], password: str) -> None:
        """Create the user, or on a second run reset the password of the one we made before."""
        users = json.loads(self.cli("users", "ls", "--format", "json").stdout or "[]")
        if isinstance(users, dict):
            users = users.get("users", [])
        names = {u.get("name") for u in users if isinstance(u, dict)}
        if name in names:
            self.cli("users", "update", name, "--roles", ",".join(roles))
            self.cli("users", "set-password", name, "--password-stdin", stdin=password + "\n")
        else:
            self.cli("users", "add", name, "--roles", ",".join(roles), "--password-stdin",
                     stdin=password + "\n")

    def join_token(self) -> dict:
        """{"token", "expires", "ca_pin"} of a fresh one-hour agent join token."""
        out = self.cli("tokens", "add", "--type", "app", "--ttl", "1h", "--format", "json").stdout
        try:
            token = json.loads(out)
            self.ca_pin = token["ca_pin"]
            return {"token": token["token"], "ca_pin": token["ca_pin"]}
        except (ValueError, KeyError, TypeError):
            raise DemoError(f"`apptunnel tokens add --format json` printed no token: {out[:200]!r}") \
                from None

    # -- agent -------------------------------------------------------------------------------

    def write_agent_config(self, apps: list[dict]) -> None:
        """agent.yaml with a fresh single-use join token: used on the first start, and again
        when a kept demo dir's short-lived certificate expired (or predates agent records);
        otherwise the agent keeps its certificate and the token simply expires."""
        config: dict[str, Any] = {
            "data_dir": str(self.root / "agent"),
            "proxy_addr": f"127.0.0.1:{self.tunnel_port}",
            "diag_addr": f"127.0.0.1:{self.agent_diag_port}",
            "join": self.join_token(),
        }
        if self.keepalive:
            config["keepalive"] = self.keepalive
        config["apps"] = apps
        self.agent_config.write_text(yaml.safe_dump(config, sort_keys=False))
        os.chmod(self.agent_config, 0o600)  # it may hold a join token

    def start_agent(self) -> None:
        self.agent = Child("agent", [str(BIN / "twistd"), "-n", "--pidfile=", "apptunnel-agent",
                                     "--config", str(self.agent_config)],
                           self.root, self.root / "agent.log")

    # -- users' view --------------------------------------------------------------------------

    def api_session(self, username: str, password: str) -> requests.Session:
        """A session signed in through POST /v1/sessions."""
        session = self._session()
        response = session.post(self.url(path="/v1/sessions"), timeout=30,
                                json={"username": username, "password": password})
        if response.status_code != 200:
            raise DemoError(f"sign-in as {username} failed: HTTP {response.status_code} "
                            f"{response.text[:200]}")
        return session

    def wait_app_online(self, session: requests.Session, app: str, timeout: float = 30.0) -> None:
        def online() -> bool:
            response = session.get(self.url(path="/v1/apps"), timeout=5)
            apps = response.json().get("apps", []) if response.status_code == 200 else []
            return any(a.get("name") == app and a.get("online", True) for a in apps)

        wait_until(online, timeout, f"app {app!r} to come online", self.agent)

    def browser_login(self, app: str, username: str, password: str) -> requests.Session:
        """Open the app like a browser: redirected to sign in, then handed back with a cookie.

        Follows the real hand-off (launch, login form, one-time code); the returned session
        holds the app's `__Host-apptunnel_app` cookie.
        """
        session = self._session()
        page = session.get(self.url(app), timeout=30)
        if not urlsplit(page.url).path.startswith("/web/login"):
            raise DemoError(f"opening {self.url(app)} did not lead to the login page "
                            f"(ended at {page.url}, HTTP {page.status_code})")
        found = re.search(r'name="next"\s+value="([^"]*)"', page.text)
        next_value = html.unescape(found.group(1)) if found else \
            parse_qs(urlsplit(page.url).query).get("next", ["/"])[0]
        landed = session.post(self.url(path="/web/login"), timeout=30,
                              data={"username": username, "password": password, "next": next_value},
                              headers={"Origin": self.url().rstrip("/")})
        if landed.status_code != 200 or urlsplit(landed.url).hostname != f"{app}.{PUBLIC_HOST}":
            raise DemoError(f"signing in to {app} ended at {landed.url} (HTTP {landed.status_code})")
        return session

    def stop(self) -> None:
        for child in (self.agent, self.proxy):
            if child is not None:
                child.stop()


def app_cookie(session: requests.Session) -> str | None:
    for cookie in session.cookies:
        if cookie.name == APP_COOKIE:
            return cookie.value
    return None


def _banner(cluster: LocalCluster, password: str, ports: dict[str, int]) -> str:
    """What to open and what to paste. Every line starting with `$ ` works as printed
    (tests/integration/test_demo.py runs them); `# keeps running` marks a command that
    serves until Ctrl-C, for the lines after it in another terminal."""
    ca = cluster.ca_file
    bin_dir = BIN
    cli = f"{bin_dir}/apptunnel"
    admin = f"{cli} --config {cluster.proxy_config}"
    origin = cluster.url().rstrip("/")
    jar = cluster.root / "curl-cookies"
    return f"""
================================================================================
 apptunnel demo is running
================================================================================
 Web UI      {cluster.url()}
 Sample app  {cluster.url('hello')}
 User        demo
 Password    {password}
 CA pin      {cluster.ca_pin}

 Your browser will warn about the certificate until you trust the demo CA:
   {ca}
 (Chrome/Firefox: settings -> certificates -> authorities -> import.)

 The commands are in {bin_dir} (add it to PATH, or paste these as they are).

 As a user, with the CLI (a short-lived certificate in ~/.apptunnel):
   $ echo '{password}' | {cli} login --proxy {cluster.public_addr} --user demo --ca-pin {cluster.ca_pin} --password-stdin
   $ {cli} apps ls
   $ {cli} apps config hello
 (`apps config` prints a curl line that reaches the app with that certificate.)
   $ {cli} proxy app hello --port {ports['http']}    # keeps running; in another terminal:
   $ curl -s http://127.0.0.1:{ports['http']}/api/whoami
   $ {cli} proxy app hello-tcp --port {ports['tcp']}    # keeps running; a TCP app:
   $ curl -s http://127.0.0.1:{ports['tcp']}/api/whoami

 With curl alone: sign in (the sign-in form wants an Origin header, as browsers
 send it: a CSRF guard), then open the app; the cookie jar carries the hand-off:
   $ curl -s -o /dev/null --cacert {ca} -c {jar} -b {jar} -H 'Origin: {origin}' -d username=demo -d password={password} {cluster.url(path="/web/login")}
   $ curl -s -L --cacert {ca} -c {jar} -b {jar} {cluster.url('hello', '/api/whoami')}

 As the admin (the commands read the proxy's config):
   $ {admin} users ls
   $ {admin} audit search --since 10m --user demo

 Logs: {cluster.root}/proxy.log, agent.log, sample-app.log
 Press Ctrl-C to stop.
================================================================================
"""


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m apptunnel.demo",
                                     description="Run a proxy, an agent and a sample app locally.")
    parser.add_argument("--dir", default="demo-data", help="where configs, data and logs go")
    parser.add_argument("--port", type=int, default=3080, help="the proxy's HTTPS port")
    parser.add_argument("--tunnel-port", type=int, default=3024, help="the agents' tunnel port")
    parser.add_argument("--app-port", type=int, default=8081, help="the sample app's port")
    parser.add_argument("--proxy-app-port", type=int, default=8082,
                        help="the port the banner's `proxy app hello` line uses")
    parser.add_argument("--tcp-app-port", type=int, default=15432,
                        help="the port the banner's `proxy app hello-tcp` line uses")
    return parser.parse_args(argv)


def _self_check(cluster: LocalCluster, password: str) -> str:
    """Sign in through the browser flow and ask the app who it thinks we are."""
    try:
        session = cluster.browser_login("hello", "demo", password)
        who = session.get(cluster.url("hello", "/api/whoami"), timeout=10).json()["identity"]
    except (DemoError, requests.RequestException, ValueError, KeyError, TypeError) as err:
        return f"self-check: could not complete a sign-in to hello: {err}"
    if who.get("verified"):
        return f"self-check: signed in as {who.get('username')}; the app verified the identity JWT"
    return f"self-check: the app did NOT verify the identity JWT: {who.get('reason')}"


def run(args: argparse.Namespace) -> int:
    root = Path(args.dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    for port, what in ((args.port, "--port"), (args.tunnel_port, "--tunnel-port"),
                       (args.app_port, "--app-port")):
        if port_in_use(port):
            raise DemoError(f"port {port} ({what}) is already in use: is a demo already running?")

    cluster = LocalCluster(root, web_port=args.port, tunnel_port=args.tunnel_port)
    app: Child | None = None
    try:
        cluster.write_proxy_config()
        _say(f"starting the proxy (log: {root / 'proxy.log'}) ...")
        cluster.start_proxy()
        password = secrets.token_urlsafe(12)
        cluster.put_role("demo-apps", {"env": "demo"})
        cluster.put_user("demo", ["demo-apps"], password)
        upstream = f"127.0.0.1:{args.app_port}"
        cluster.write_agent_config([
            {"name": "hello", "uri": f"http://{upstream}", "labels": {"env": "demo"}},
            # The same sample app as a TCP app: `apptunnel proxy app hello-tcp` relays bytes.
            {"name": "hello-tcp", "uri": f"tcp://{upstream}", "labels": {"env": "demo"}},
        ])
        _write_secret(root / "demo-password", password)
        _write_secret(root / "ca-pin", cluster.ca_pin or "")
        _say("starting the sample app and the agent ...")
        app = Child("sample app", [sys.executable, "-m", "apptunnel.sample_app",
                                   "--listen", upstream,
                                   "--jwks-url", cluster.url(path="/.well-known/jwks.json"),
                                   "--ca-file", str(cluster.ca_file),
                                   "--audience", cluster.url("hello").rstrip("/")],
                    root, root / "sample-app.log")
        wait_until(lambda: port_in_use(args.app_port), 15, "the sample app to listen", app)
        cluster.start_agent()
        cluster.wait_app_online(cluster.api_session("demo", password), "hello")
        _say(_self_check(cluster, password))
        _say(_banner(cluster, password, {"http": args.proxy_app_port, "tcp": args.tcp_app_port}))
        while True:
            for child in (cluster.proxy, cluster.agent, app):
                if not child.alive():
                    raise DemoError(f"{child.name} exited (status {child.proc.returncode}); "
                                    f"end of {child.log_path}:\n{child.log_tail()}")
            time.sleep(1.0)
    finally:
        # A second Ctrl-C or the SIGTERM that follows make's must not cut this short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _say("stopping ...")
        for child in (cluster.agent, app, cluster.proxy):
            if child is not None:
                child.stop()


def _write_secret(path: Path, text: str) -> None:
    """Written 0600 without a newline, so `--password-stdin < file` reads it as is."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _say(text: str) -> None:
    """Print, unless our terminal or pipe is gone (make was killed, a reader stopped
    reading after the banner): the demo goes on, and so does stopping it.

    A gone pipe is replaced by /dev/null, so later prints and the interpreter's last
    flush do not fail again.
    """
    try:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    except (OSError, ValueError):
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        except (OSError, ValueError):
            pass


def _terminate(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)   # the terminal went away
    try:
        with loopback_resolution():
            run(args)
    except KeyboardInterrupt:
        return 0
    except DemoError as err:
        print(f"demo: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
