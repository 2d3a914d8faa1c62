"""`make bench`: HTTP through apptunnel next to the same traffic directly and over `ssh -R`.

    python bench/run.py [--duration 5] [--connections 32] [--threads 2] [--only direct,ssh,apptunnel]

Everything runs on this machine's loopback: one upstream (nginx `return 200`, or the sample
app when nginx is missing), measured with wrk directly, through an OpenSSH reverse tunnel
and through a proxy + agent pair signed in like a browser. It reports numbers and ratios
and never judges them; see bench/README.rst for how to read them. Every child process is
stopped by its PID on the way out, whatever happens.
"""

from __future__ import annotations

import argparse
import atexit
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers  # noqa: E402  (bench/ is not a package)
import wrk  # noqa: E402

from apptunnel.demo import (  # noqa: E402
    APP_COOKIE, PUBLIC_HOST, Child, DemoError, LocalCluster, app_cookie, free_port,
    loopback_resolution,
)

TARGETS = ("direct", "ssh", "apptunnel")
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
        self.notes: list[str] = []

    def measure(self, name: str, url: str, headers: tuple[str, ...] = ()) -> None:
        a = self.args
        if a.warmup:
            wrk.run(url, threads=a.threads, connections=a.connections, duration=a.warmup,
                    headers=headers)
        self.results[name] = wrk.run(url, threads=a.threads, connections=a.connections,
                                     duration=a.duration, headers=headers)
        print(f"  {name}: done", flush=True)

    def attempt(self, name: str, step) -> None:
        """Run one target; a failure is reported in its row instead of ending the run."""
        try:
            step()
        except (DemoError, wrk.WrkError, requests.RequestException, OSError,
                subprocess.SubprocessError) as err:
            self.results[name] = f"failed: {err}"
            print(f"  {name}: failed: {err}", flush=True)

    def ssh(self, upstream_port: int) -> None:
        if not peers.have_ssh():
            self.results["ssh"] = "skipped: sshd/ssh not installed (apt-get install openssh-server)"
            return
        children, port = peers.start_ssh_reverse_tunnel(self.root, upstream_port)
        _own(*children)
        self.measure("ssh", f"http://127.0.0.1:{port}/")

    def apptunnel(self, upstream_port: int, expected_body: bytes) -> None:
        cluster = LocalCluster(self.root / "apptunnel", web_port=free_port(),
                               tunnel_port=free_port(), cluster_name="bench")
        cluster.root.mkdir(parents=True, exist_ok=True)
        cluster.write_proxy_config()
        try:
            cluster.start_proxy()
        finally:
            if cluster.proxy is not None:
                _own(cluster.proxy)
        password = secrets.token_urlsafe(12)
        cluster.put_role("bench-apps", {"env": "bench"})
        cluster.put_user("bench", ["bench-apps"], password)
        cluster.write_agent_config([{"name": "hello", "uri": f"http://127.0.0.1:{upstream_port}",
                                     "labels": {"env": "bench"}}])
        cluster.start_agent()
        _own(cluster.agent)
        cluster.wait_app_online(cluster.api_session("bench", password), "hello")
        browser = cluster.browser_login("hello", "bench", password)
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

    def report(self, upstream: str) -> str:
        a = self.args
        lines = ["", f"wrk -t{a.threads} -c{a.connections} -d{a.duration}s --latency "
                     f"(after a {a.warmup}s warm-up); upstream: {upstream}", "",
                 f"{'target':<11}{'req/s':>11}{'p50':>10}{'p99':>10}{'requests':>11}{'errors':>8}"]
        labels = {"direct": "direct", "ssh": "ssh -R", "apptunnel": "apptunnel"}
        for name in TARGETS:
            if name not in self.results:
                continue
            r = self.results[name]
            if isinstance(r, str):
                lines.append(f"{labels[name]:<11}{r}")
            else:
                lines.append(f"{labels[name]:<11}{r.requests_per_s:>11.0f}{r.p50_ms:>8.2f}ms"
                             f"{r.p99_ms:>8.2f}ms{r.requests:>11}{r.errors:>8}")
        ours = self.results.get("apptunnel")
        if isinstance(ours, wrk.WrkResult):
            lines.append("")
            for name in ("ssh", "direct"):
                other = self.results.get(name)
                if isinstance(other, wrk.WrkResult) and other.requests_per_s and other.p50_ms:
                    lines.append(
                        f"apptunnel/{labels[name]:<7} req/s x{ours.requests_per_s / other.requests_per_s:.2f}"
                        f"   p50 x{ours.p50_ms / other.p50_ms:.2f}   p99 x{ours.p99_ms / max(other.p99_ms, 1e-9):.2f}")
        if self.notes:
            lines.append("")
            lines.extend(self.notes)
        return "\n".join(lines) + "\n"


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    parser.add_argument("--warmup", type=int, default=1, help="seconds of discarded warm-up")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default=",".join(TARGETS),
                        help="comma-separated subset of: " + ", ".join(TARGETS))
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs) afterwards")
    args = parser.parse_args(argv)
    args.only = [t.strip() for t in args.only.split(",") if t.strip()]
    unknown = set(args.only) - set(TARGETS)
    if unknown:
        parser.error(f"--only: unknown target(s) {', '.join(sorted(unknown))}")
    return args


def _terminate(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if shutil.which("wrk") is None:
        print("bench: error: wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="apptunnel-bench-"))
    atexit.register(_stop_all)
    signal.signal(signal.SIGTERM, _terminate)
    bench = Bench(args, root)
    try:
        with loopback_resolution():
            if shutil.which("nginx") or Path("/usr/sbin/nginx").exists():
                upstream, port = peers.start_nginx(root)
                description, body = 'nginx `return 200 "hello\\n"`', b"hello\n"
            else:
                upstream, port = peers.start_sample_app(root)
                description = "the sample app's / (nginx not installed)"
                body = requests.get(f"http://127.0.0.1:{port}/", timeout=10).content
            _own(upstream)
            print(f"bench dir {root}; upstream on 127.0.0.1:{port}", flush=True)
            started = time.monotonic()
            if "direct" in args.only:
                bench.attempt("direct", lambda: bench.measure("direct", f"http://127.0.0.1:{port}/"))
            if "ssh" in args.only:
                bench.attempt("ssh", lambda: bench.ssh(port))
            if "apptunnel" in args.only:
                bench.attempt("apptunnel", lambda: bench.apptunnel(port, body))
            print(bench.report(description), end="")
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
    failed = [name for name, r in bench.results.items() if isinstance(r, str) and r.startswith("failed")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
