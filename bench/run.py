"""`make bench`: apptunnel next to the same traffic sent directly and over `ssh -R`.

    python bench/run.py [--duration 5] [--connections 32] [--threads 2]
                        [--tcp-duration 3] [--idle-streams 1000]
                        [--only http,tcp,idle | direct,ssh,apptunnel,tcp,idle]

Everything runs on this machine's loopback. HTTP: one upstream (nginx `return 200`, or the
sample app when nginx is missing), measured with wrk directly, through an OpenSSH reverse
tunnel and through a proxy + agent pair signed in like a browser. TCP: `iperf3 -s` as a TCP
app, measured with `iperf3 -c` directly, through `ssh -R` and through `apptunnel proxy app`.
Idle: many open, silent connections through `apptunnel proxy app` and the memory they cost
the proxy and the agent. It reports numbers and ratios and never judges them; see
bench/README.rst for how to read them. Every child process is stopped by its PID on the
way out, whatever happens.
"""

from __future__ import annotations

import argparse
import atexit
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
from cryptography import x509

sys.path.insert(0, str(Path(__file__).resolve().parent))

import idle  # noqa: E402  (bench/ is not a package)
import peers  # noqa: E402
import tcp  # noqa: E402
import wrk  # noqa: E402

from apptunnel.auth.ca import cert_pin  # noqa: E402
from apptunnel.demo import (  # noqa: E402
    APP_COOKIE, PUBLIC_HOST, Child, DemoError, LocalCluster, app_cookie, free_port,
    loopback_resolution, wait_until,
)

HTTP_TARGETS = ("direct", "ssh", "apptunnel")
TARGETS = (*HTTP_TARGETS, "tcp", "idle")
GROUPS = {"http": HTTP_TARGETS}
PATHS = ("direct", "ssh", "apptunnel")          # the rows of the TCP table
LABELS = {"direct": "direct", "ssh": "ssh -R", "apptunnel": "apptunnel"}
_children: list[Child] = []


def _own(*children: Child) -> None:
    _children.extend(children)


def _stop_all() -> None:
    while _children:
        _children.pop().stop()


def _mib(kib: int | None) -> str:
    return "-" if kib is None else f"{kib / 1024:.1f} MiB"


class Bench:
    def __init__(self, args: argparse.Namespace, root: Path) -> None:
        self.args = args
        self.root = root
        self.results: dict[str, wrk.WrkResult | str] = {}
        self.tcp_results: dict[str, tcp.IperfResult | str] = {}
        self.idle_result: dict | str | None = None
        self.notes: list[str] = []
        self.apps: list[dict] = []          # the agent's apps, added as upstreams start
        self.iperf_server: Child | None = None
        self._cluster: LocalCluster | None = None
        self._cluster_error: str | None = None
        self._password = secrets.token_urlsafe(12)
        self._user_home: Path | None = None
        self._local_ports: dict[str, tuple[Child, int]] = {}

    def measure(self, name: str, url: str, headers: tuple[str, ...] = ()) -> None:
        a = self.args
        if a.warmup:
            wrk.run(url, threads=a.threads, connections=a.connections, duration=a.warmup,
                    headers=headers)
        self.results[name] = wrk.run(url, threads=a.threads, connections=a.connections,
                                     duration=a.duration, headers=headers)
        print(f"  {name}: done", flush=True)

    def attempt(self, name: str, step, results: dict | None = None) -> None:
        """Run one target; a failure is reported in its row instead of ending the run."""
        try:
            step()
        except (DemoError, wrk.WrkError, tcp.IperfError, requests.RequestException, OSError,
                subprocess.SubprocessError) as err:
            message = f"failed: {err}"
            if name == "idle":
                self.idle_result = message
            else:
                (self.results if results is None else results)[name] = message
            label = name if results is None else f"tcp {name}"
            print(f"  {label}: failed: {err}", flush=True)

    # -- the shared apptunnel cluster ---------------------------------------------------------

    def cluster(self) -> LocalCluster:
        """One proxy + agent serving every app of this run, started on first use.

        A failed start is remembered: the next target reports it instead of starting a
        second proxy on the same ports.
        """
        if self._cluster_error is not None:
            raise DemoError(f"the apptunnel cluster did not start: {self._cluster_error}")
        if self._cluster is not None:
            return self._cluster
        try:
            self._cluster = self._start_cluster()
        except (DemoError, requests.RequestException, OSError, subprocess.SubprocessError) as err:
            self._cluster_error = str(err).splitlines()[0]
            raise
        return self._cluster

    def _start_cluster(self) -> LocalCluster:
        cluster = LocalCluster(self.root / "apptunnel", web_port=free_port(),
                               tunnel_port=free_port(), cluster_name="bench")
        cluster.root.mkdir(parents=True, exist_ok=True)
        cluster.write_proxy_config()
        try:
            cluster.start_proxy()
        finally:
            if cluster.proxy is not None:
                _own(cluster.proxy)
        cluster.put_role("bench-apps", {"env": "bench"})
        cluster.put_user("bench", ["bench-apps"], self._password)
        cluster.write_agent_config(self.apps)
        cluster.start_agent()
        _own(cluster.agent)
        session = cluster.api_session("bench", self._password)
        for app in self.apps:
            cluster.wait_app_online(session, app["name"])
        return cluster

    def add_app(self, name: str, uri: str) -> None:
        self.apps.append({"name": name, "uri": uri, "labels": {"env": "bench"}})

    def user_home(self) -> Path:
        """An APPTUNNEL_HOME signed in as the bench user with `apptunnel login`, once."""
        if self._user_home is not None:
            return self._user_home
        cluster = self.cluster()
        home = self.root / "user-home"
        pin = cert_pin(x509.load_pem_x509_certificate(cluster.ca_file.read_bytes()))
        argv = [sys.executable, "-m", "apptunnel.cli.main", "login", "--proxy",
                cluster.public_addr, "--user", "bench", "--password-stdin", "--ca-pin", pin]
        done = subprocess.run(argv, input=self._password + "\n", capture_output=True, text=True,
                              timeout=60, env={**os.environ, "APPTUNNEL_HOME": str(home)})
        if done.returncode != 0:
            raise DemoError(f"`apptunnel login` failed: {(done.stderr or done.stdout).strip()[:500]}")
        self._user_home = home
        return home

    def local_port(self, app: str) -> tuple[Child, int]:
        """`apptunnel proxy app APP --port 0` as a child; its port read from what it prints."""
        if app in self._local_ports:
            return self._local_ports[app]
        home = self.user_home()
        # `env` execs the command, so the PID we hold is the local proxy's own.
        child = Child(f"proxy app {app}", [
            "env", f"APPTUNNEL_HOME={home}", sys.executable, "-m", "apptunnel.cli.main",
            "proxy", "app", app, "--port", "0"], self.root, self.root / f"proxy-app-{app}.log")
        _own(child)

        def listening() -> int | None:
            found = re.search(r"on 127\.0\.0\.1:(\d+)", child.log_path.read_text(errors="replace"))
            return int(found.group(1)) if found else None

        port = wait_until(listening, 20, f"`apptunnel proxy app {app}` to listen", child)
        self._local_ports[app] = (child, port)
        return child, port

    # -- HTTP -------------------------------------------------------------------------------------

    def ssh(self, upstream_port: int) -> None:
        if not peers.have_ssh():
            self.results["ssh"] = "skipped: sshd/ssh not installed (apt-get install openssh-server)"
            return
        children, port = peers.start_ssh_reverse_tunnel(self.root, upstream_port)
        _own(*children)
        self.measure("ssh", f"http://127.0.0.1:{port}/")

    def apptunnel(self, expected_body: bytes) -> None:
        cluster = self.cluster()
        browser = cluster.browser_login("hello", "bench", self._password)
        cookie = app_cookie(browser)
        if not cookie:
            raise DemoError(f"signed in, but no {APP_COOKIE} cookie was set")
        page = browser.get(cluster.url("hello"), timeout=10)
        if page.status_code != 200 or page.content != expected_body:
            raise DemoError(f"the app through apptunnel answered HTTP {page.status_code} "
                            f"{page.content[:100]!r}, expected {expected_body!r}")
        before = (cluster.proxy.rss_kib(), cluster.agent.rss_kib())
        self.measure("apptunnel", f"https://127.0.0.1:{cluster.web_port}/", headers=(
            f"Cookie: {APP_COOKIE}={cookie}", f"Host: hello.{PUBLIC_HOST}:{cluster.web_port}"))
        after = (cluster.proxy.rss_kib(), cluster.agent.rss_kib())
        self.notes.append(f"memory (RSS) before -> after the apptunnel run: "
                          f"proxy {_mib(before[0])} -> {_mib(after[0])}, "
                          f"agent {_mib(before[1])} -> {_mib(after[1])}")

    # -- TCP --------------------------------------------------------------------------------------

    def iperf(self, path: str, port: int) -> None:
        """One iperf3 run once the server is idle; a second try if it was turned away."""
        try:
            tcp.wait_server_idle(self.iperf_server)
            result = tcp.run(port, self.args.tcp_duration)
        except tcp.IperfError as err:
            print(f"  tcp {path}: {err}; once more", flush=True)
            tcp.wait_server_idle(self.iperf_server)
            result = tcp.run(port, self.args.tcp_duration)
        self.tcp_results[path] = result
        print(f"  tcp {path}: done", flush=True)

    def tcp_ssh(self, iperf_port: int) -> None:
        if not peers.have_ssh():
            self.tcp_results["ssh"] = "skipped: sshd/ssh not installed (apt-get install openssh-server)"
            return
        base = self.root / "tcp-ssh"   # its own keys and logs, apart from the HTTP tunnel's
        base.mkdir(parents=True, exist_ok=True)
        children, port = peers.start_ssh_reverse_tunnel(base, iperf_port)
        _own(*children)
        self.iperf("ssh", port)

    def tcp_apptunnel(self) -> None:
        _, port = self.local_port("iperf")
        self.iperf("apptunnel", port)

    # -- idle streams -------------------------------------------------------------------------------

    def idle(self, sink: idle.Sink) -> None:
        cluster = self.cluster()
        local, port = self.local_port("sink")
        processes = {"proxy": cluster.proxy, "agent": cluster.agent, "proxy app": local}
        self.idle_result = idle.measure_streams(port, self.args.idle_streams, sink, processes,
                                                child=local)
        print("  idle: done", flush=True)

    # -- reports ------------------------------------------------------------------------------------

    def report(self, upstream: str) -> str:
        a = self.args
        lines = ["", f"wrk -t{a.threads} -c{a.connections} -d{a.duration}s --latency "
                     f"(after a {a.warmup}s warm-up); upstream: {upstream}", "",
                 f"{'target':<11}{'req/s':>11}{'p50':>10}{'p99':>10}{'requests':>11}{'errors':>8}"]
        for name in HTTP_TARGETS:
            if name not in self.results:
                continue
            r = self.results[name]
            if isinstance(r, str):
                lines.append(f"{LABELS[name]:<11}{r}")
            else:
                lines.append(f"{LABELS[name]:<11}{r.requests_per_s:>11.0f}{r.p50_ms:>8.2f}ms"
                             f"{r.p99_ms:>8.2f}ms{r.requests:>11}{r.errors:>8}")
        ours = self.results.get("apptunnel")
        if isinstance(ours, wrk.WrkResult):
            lines.append("")
            for name in ("ssh", "direct"):
                other = self.results.get(name)
                if isinstance(other, wrk.WrkResult) and other.requests_per_s and other.p50_ms:
                    lines.append(
                        f"apptunnel/{LABELS[name]:<7} req/s x{ours.requests_per_s / other.requests_per_s:.2f}"
                        f"   p50 x{ours.p50_ms / other.p50_ms:.2f}   p99 x{ours.p99_ms / max(other.p99_ms, 1e-9):.2f}")
        if self.notes:
            lines.append("")
            lines.extend(self.notes)
        return "\n".join(lines) + "\n"

    def tcp_report(self) -> str:
        lines = ["", f"iperf3 -c -t{self.args.tcp_duration} -J (one TCP stream); "
                     "app: iperf3 -s on 127.0.0.1", "",
                 f"{'target':<11}{'receiver':>15}{'sender':>15}{'retransmits':>13}"]
        for name in PATHS:
            if name not in self.tcp_results:
                continue
            r = self.tcp_results[name]
            if isinstance(r, str):
                lines.append(f"{LABELS[name]:<11}{r}")
            else:
                retr = "-" if r.retransmits is None else str(r.retransmits)
                lines.append(f"{LABELS[name]:<11}{r.receiver_gbps:>9.2f} Gbit/s"
                             f"{r.sender_gbps:>9.2f} Gbit/s{retr:>13}")
        ours = self.tcp_results.get("apptunnel")
        if isinstance(ours, tcp.IperfResult):
            ratios = []
            for name in ("ssh", "direct"):
                other = self.tcp_results.get(name)
                if isinstance(other, tcp.IperfResult) and other.receiver_bps:
                    ratios.append(f"apptunnel/{LABELS[name]:<7} Gbit/s "
                                  f"x{ours.receiver_bps / other.receiver_bps:.2f}")
            if ratios:
                lines.append("")
                lines.extend(ratios)
        return "\n".join(lines) + "\n"

    def idle_report(self) -> str:
        r = self.idle_result
        n = self.args.idle_streams
        head = f"{n} idle TCP connections through `apptunnel proxy app` (one tunnel stream each)"
        if isinstance(r, str):
            return f"\n{head}\n\n{r}\n"
        lines = ["", f"{head}; all held by the app after {r['open_seconds']:.1f}s", "",
                 f"{'process':<11}{'before':>12}{'holding':>12}{'per stream':>14}{'closed':>12}"]

        def row(label: str, before: int, held: int, after: int | None) -> str:
            per = (held - before) / n
            return (f"{label:<11}{_mib(before):>12}{_mib(held):>12}{per:>10.1f} KiB"
                    f"{_mib(after):>12}")

        for name in ("proxy", "agent"):
            lines.append(row(name, r["before"][name], r["held"][name], r["after"][name]))
        after = r["after"]["proxy"], r["after"]["agent"]
        lines.append(row("both", r["before"]["proxy"] + r["before"]["agent"],
                         r["held"]["proxy"] + r["held"]["agent"],
                         None if None in after else sum(after)))
        lines.append(row("proxy app", r["before"]["proxy app"], r["held"]["proxy app"],
                         r["after"]["proxy app"]) + "   (user side)")
        return "\n".join(lines) + "\n"

    def failed(self) -> list[str]:
        rows = [*self.results.items(), *(("tcp " + k, v) for k, v in self.tcp_results.items()),
                ("idle", self.idle_result)]
        return [name for name, r in rows if isinstance(r, str) and r.startswith("failed")]


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    parser.add_argument("--warmup", type=int, default=1, help="seconds of discarded warm-up")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tcp-duration", type=int, default=3, help="seconds per iperf3 run")
    parser.add_argument("--idle-streams", type=int, default=1000,
                        help="idle connections opened for the memory table")
    parser.add_argument("--only", default=",".join(TARGETS),
                        help="comma-separated subset of: " + ", ".join(TARGETS)
                        + " (http = direct,ssh,apptunnel)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs) afterwards")
    args = parser.parse_args(argv)
    chosen: list[str] = []
    for name in (t.strip() for t in args.only.split(",") if t.strip()):
        chosen.extend(GROUPS.get(name, (name,)))
    unknown = set(chosen) - set(TARGETS)
    if unknown:
        parser.error(f"--only: unknown target(s) {', '.join(sorted(unknown))}")
    args.only = [t for t in TARGETS if t in chosen]
    if args.tcp_duration < 1 or args.idle_streams < 1:
        parser.error("--tcp-duration and --idle-streams must be at least 1")
    return args


def _terminate(signum, frame) -> None:
    raise KeyboardInterrupt


def _missing_tools(args: argparse.Namespace) -> list[str]:
    missing = []
    if set(args.only) & set(HTTP_TARGETS) and shutil.which("wrk") is None:
        missing.append("wrk is not installed (apt-get install wrk)")
    if "tcp" in args.only and not tcp.have_iperf3():
        missing.append("iperf3 is not installed (apt-get install iperf3)")
    return missing


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    for problem in _missing_tools(args):
        print(f"bench: error: {problem}", file=sys.stderr)
    if _missing_tools(args):
        return 2
    # Each idle stream is a socket here, two in `proxy app`, one or two in the proxy, the
    # agent and the sink; children inherit the limit.
    idle.raise_nofile(4 * args.idle_streams + 1024)
    root = Path(tempfile.mkdtemp(prefix="apptunnel-bench-"))
    atexit.register(_stop_all)
    signal.signal(signal.SIGTERM, _terminate)
    bench = Bench(args, root)
    http = [t for t in args.only if t in HTTP_TARGETS]
    try:
        with loopback_resolution():
            started = time.monotonic()
            if http:
                if shutil.which("nginx") or Path("/usr/sbin/nginx").exists():
                    upstream, port = peers.start_nginx(root)
                    description, body = 'nginx `return 200 "hello\\n"`', b"hello\n"
                else:
                    upstream, port = peers.start_sample_app(root)
                    description = "the sample app's / (nginx not installed)"
                    body = requests.get(f"http://127.0.0.1:{port}/", timeout=10).content
                _own(upstream)
                bench.add_app("hello", f"http://127.0.0.1:{port}")
                print(f"bench dir {root}; HTTP upstream on 127.0.0.1:{port}", flush=True)
            if "tcp" in args.only:
                bench.iperf_server, iperf_port = tcp.start_server(root)
                _own(bench.iperf_server)
                bench.add_app("iperf", f"tcp://127.0.0.1:{iperf_port}")
            sink = None
            if "idle" in args.only:
                sink = idle.Sink(root)
                _own(sink.child)
                bench.add_app("sink", f"tcp://127.0.0.1:{sink.port}")
            if "direct" in args.only:
                bench.attempt("direct", lambda: bench.measure("direct", f"http://127.0.0.1:{port}/"))
            if "ssh" in args.only:
                bench.attempt("ssh", lambda: bench.ssh(port))
            if "apptunnel" in args.only:
                bench.attempt("apptunnel", lambda: bench.apptunnel(body))
            if "tcp" in args.only:
                bench.attempt("direct", lambda: bench.iperf("direct", iperf_port), bench.tcp_results)
                bench.attempt("ssh", lambda: bench.tcp_ssh(iperf_port), bench.tcp_results)
                bench.attempt("apptunnel", bench.tcp_apptunnel, bench.tcp_results)
            if sink is not None:
                bench.attempt("idle", lambda: bench.idle(sink))
            if http:
                print(bench.report(description), end="")
            if "tcp" in args.only:
                print(bench.tcp_report(), end="")
            if "idle" in args.only:
                print(bench.idle_report(), end="")
            print(f"(took {time.monotonic() - started:.0f}s; logs in {root})" if args.keep
                  else f"(took {time.monotonic() - started:.0f}s)")
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    except DemoError as err:
        print(f"bench: error: {err}", file=sys.stderr)
        return 1
    finally:
        _stop_all()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 1 if bench.failed() else 0


if __name__ == "__main__":
    sys.exit(main())
