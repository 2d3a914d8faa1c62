"""`make bench`: apptunnel next to the tunnels a user would build by hand, in one run.

    python -m bench.run [--duration 5] [--only http,latency,tcp,bulk,idle,agent,fairness]

Paths: direct to the app; `ssh -R` (OpenSSH reverse tunnel); nginx terminating TLS in
front of that `ssh -R` (one worker, P-256, keep-alive upstream); apptunnel (the whole path:
TLS to the proxy, session, RBAC, JWT, audit, tunnel, agent). Every row gets its ratio to
`ssh -R`. Output: one table on stdout, bench/results/latest.json (+ a timestamped copy)
and bench/results/latest.png. docs/performance.rst says what each row means. The run
reports and never judges; every child process is stopped by its PID on the way out.
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import json
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):   # `python bench/run.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import attrs  # noqa: E402
import requests  # noqa: E402
import yaml  # noqa: E402
from cryptography import x509  # noqa: E402

from apptunnel.auth.ca import cert_pin  # noqa: E402
from apptunnel.demo import (  # noqa: E402
    APP_COOKIE, PUBLIC_HOST, Child, DemoError, LocalCluster, app_cookie, free_port,
    loopback_resolution, wait_until,
)
from bench import bulk, fairness, idle, peers, procs, profile, report, tcp, wrk  # noqa: E402
from bench.report import Measurement  # noqa: E402

KINDS = ("http", "latency", "tcp", "bulk", "idle", "agent", "fairness")
HTTP_PATHS = ("direct", "ssh", "nginx-tls", "apptunnel", "apptunnel-2w")
WORKERS_PATH = "apptunnel-2w"   # the same proxy with `workers: 2` (HTTP rows only)
RESULTS = Path(__file__).resolve().parent / "results"
FAILURES = (DemoError, wrk.WrkError, tcp.IperfError, bulk.CurlError, requests.RequestException,
            OSError, subprocess.SubprocessError)
_children: list[Child] = []


def _free_run(count: int) -> int:
    """The first of `count` consecutive free loopback ports (a proxy's workers use the
    ports after its tunnel and diag ports)."""
    for _ in range(200):
        first = free_port()
        try:
            for port in range(first + 1, first + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return first
    raise DemoError(f"no {count} consecutive free ports")


def _tunnels(diag_port: int) -> float:
    """Live tunnels on one proxy worker, from its /metrics."""
    text = requests.get(f"http://127.0.0.1:{diag_port}/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("apptunnel_tunnels{"))


def _own(*children: Child) -> Child:
    _children.extend(children)
    return children[-1]


def _stop_all() -> None:
    while _children:
        _children.pop().stop()


def _pids(*children: Child | None) -> Callable[[], list[int]]:
    return lambda: [c.proc.pid for c in children if c is not None and c.alive()]


class Bench:
    """Starts what the rows need (once each) and turns each measurement into a row."""

    def __init__(self, args: argparse.Namespace, root: Path) -> None:
        self.args = args
        self.root = root
        self.rows: list[Measurement] = []
        self.context: dict[str, str] = {}
        self.apps: list[dict] = []
        self.perf = procs.perf_instructions_work()
        self._clusters: dict[int, LocalCluster] = {}      # by `workers`
        self._cluster_errors: dict[int, str] = {}
        self._password = secrets.token_urlsafe(12)
        self._user_home: Path | None = None
        self._local: dict[tuple[str, int], tuple[Child, int]] = {}
        self._ssh: dict[str, tuple[list[Child], int]] = {}
        self._cookies: dict[int, str] = {}
        self.profile: str | None = None      # py-spy's top frames of the proxy (--profile)

    def attempt(self, test: str, path: str, step: Callable[[], Measurement]) -> None:
        """Run one row; a failure becomes that row's text instead of ending the run."""
        try:
            row = step()
        except FAILURES as err:
            self.fail(test, path, err)
            return
        self.rows.append(row)
        print(f"  {test} {report.LABELS.get(path, path)}: done", flush=True)

    def fail(self, test: str, path: str, err: BaseException) -> None:
        reason = "failed: " + (str(err).splitlines() or [type(err).__name__])[0][:200]
        self.rows.append(Measurement(test, path, error=reason))
        print(f"  {test} {report.LABELS.get(path, path)}: {reason}", flush=True)

    # -- what the rows run through --------------------------------------------------------------

    def cluster(self, workers: int = 1) -> LocalCluster:
        """One proxy + agent for every app of the run (and one more with `workers: 2` for
        its HTTP rows); a failed start is remembered."""
        if workers in self._cluster_errors:
            raise DemoError(f"the apptunnel cluster did not start: {self._cluster_errors[workers]}")
        if workers not in self._clusters:
            try:
                self._clusters[workers] = self._start_cluster(workers)
            except FAILURES as err:
                self._cluster_errors[workers] = str(err).splitlines()[0]
                raise
        return self._clusters[workers]

    def _start_cluster(self, workers: int) -> LocalCluster:
        name = "apptunnel" if workers == 1 else f"apptunnel-{workers}w"
        # Worker I also listens on the tunnel port + 1 + I and the diag port + I.
        cluster = LocalCluster(self.root / name, web_port=free_port(),
                               tunnel_port=_free_run(workers + 1) if workers > 1 else free_port(),
                               cluster_name="bench")
        cluster.diag_port = _free_run(workers)
        cluster.root.mkdir(parents=True, exist_ok=True)
        cluster.write_proxy_config()
        # Every bench connection comes from 127.0.0.1: lift the per-address cap (256) so the
        # idle and fairness rows measure streams, not the limit that protects a real proxy.
        config = yaml.safe_load(cluster.proxy_config.read_text())
        wanted = max(self.args.agent_streams, self.args.idle_streams, self.args.fair_streams)
        config["limits"] = {"max_connections": wanted + 1000, "max_connections_per_ip": wanted + 1000}
        if workers > 1:
            config["workers"] = workers
        cluster.proxy_config.write_text(yaml.safe_dump(config, sort_keys=False))
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
        for worker in range(workers):   # the agent holds a tunnel to every worker
            wait_until(lambda: _tunnels(cluster.diag_port + worker) > 0, 30,
                       f"the agent's tunnel to worker {worker}", cluster.proxy)
        return cluster

    def add_app(self, name: str, uri: str) -> None:
        self.apps.append({"name": name, "uri": uri, "labels": {"env": "bench"}})

    def cookie(self, expected_body: bytes, workers: int = 1) -> str:
        """Signed in like a browser, once; checks the app answers with its own body."""
        if workers not in self._cookies:
            cluster = self.cluster(workers)
            browser = cluster.browser_login("hello", "bench", self._password)
            cookie = app_cookie(browser)
            if not cookie:
                raise DemoError(f"signed in, but no {APP_COOKIE} cookie was set")
            page = browser.get(cluster.url("hello"), timeout=10)
            if page.status_code != 200 or page.content != expected_body:
                raise DemoError(f"the app through apptunnel answered HTTP {page.status_code} "
                                f"{page.content[:100]!r}, expected {expected_body!r}")
            self._cookies[workers] = cookie
        return self._cookies[workers]

    def user_home(self) -> Path:
        """An APPTUNNEL_HOME signed in as the bench user with `apptunnel login`, once."""
        if self._user_home is None:
            cluster = self.cluster()
            home = self.root / "user-home"
            pin = cert_pin(x509.load_pem_x509_certificate(cluster.ca_file.read_bytes()))
            argv = [sys.executable, "-m", "apptunnel.cli.main", "login", "--proxy",
                    cluster.public_addr, "--user", "bench", "--password-stdin", "--ca-pin", pin]
            done = subprocess.run(argv, input=self._password + "\n", capture_output=True,
                                  text=True, timeout=60,
                                  env={**os.environ, "APPTUNNEL_HOME": str(home)})
            if done.returncode != 0:
                raise DemoError("`apptunnel login` failed: "
                                + (done.stderr or done.stdout).strip()[:500])
            self._user_home = home
        return self._user_home

    def local_port(self, app: str, index: int = 0) -> tuple[Child, int]:
        """`apptunnel proxy app APP --port 0` number `index`; its port read from its output."""
        if (app, index) not in self._local:
            home = self.user_home()
            # `env` execs the command, so the PID we hold is the local proxy's own.
            child = _own(Child(f"proxy app {app}", [
                "env", f"APPTUNNEL_HOME={home}", sys.executable, "-m", "apptunnel.cli.main",
                "proxy", "app", app, "--port", "0"], self.root,
                self.root / f"proxy-app-{app}-{index}.log"))

            def listening() -> int | None:
                found = re.search(r"on 127\.0\.0\.1:(\d+)",
                                  child.log_path.read_text(errors="replace"))
                return int(found.group(1)) if found else None

            port = wait_until(listening, 20, f"`apptunnel proxy app {app}` to listen", child)
            self._local[(app, index)] = (child, port)
        return self._local[(app, index)]

    def ssh_tunnel(self, name: str, target_port: int) -> tuple[list[Child], int]:
        """A throwaway sshd + `ssh -R` to `target_port`, once per name."""
        if not peers.have_ssh():
            raise DemoError("sshd/ssh not installed (apt-get install openssh-server openssh-client)")
        if name not in self._ssh:
            children, port = peers.start_ssh_reverse_tunnel(self.root, target_port, name)
            _own(*children)
            self._ssh[name] = (children, port)
        return self._ssh[name]

    def ssh_sets(self, name: str, target_port: int) -> tuple[int, procs.ProcessSet, procs.ProcessSet]:
        """The tunnel's port, the sshd tree (server side) and the ssh client (agent side)."""
        (sshd, ssh), port = self.ssh_tunnel(name, target_port)
        return port, procs.ProcessSet("sshd", _pids(sshd)), procs.ProcessSet("ssh", _pids(ssh))

    # -- HTTP -----------------------------------------------------------------------------------

    def http(self, path: str, url: str, headers: tuple[str, ...], cpu: procs.ProcessSet,
             split: tuple[procs.ProcessSet, ...] = ()) -> Measurement:
        a = self.args
        if a.warmup:
            wrk.run(url, threads=a.threads, connections=a.connections, duration=a.warmup,
                    headers=headers)
        pids = cpu.pids()   # stable during a run: sshd forks per ssh login, not per forward
        counter = procs.PerfCounter(pids, self.root / f"perf-{path}.txt") if self.perf else None
        parts = [(part.what, part.pids()) for part in split]
        before = procs.cpu_seconds(pids)
        parts_before = [procs.cpu_seconds(p) for _, p in parts]
        result = wrk.run(url, threads=a.threads, connections=a.connections,
                         duration=a.duration, headers=headers)
        spent = procs.cpu_seconds(pids) - before
        parts_spent = [procs.cpu_seconds(p) - b for (_, p), b in zip(parts, parts_before)]
        instructions = counter.stop() if counter else None
        if path in ("apptunnel", WORKERS_PATH) and a.profile:
            # After the counted run, so sampling costs the numbers above nothing.
            self.profile_proxy(url, headers, path)
        values = {"req_s": result.requests_per_s, "p50_ms": result.p50_ms,
                  "p99_ms": result.p99_ms, "errors": result.errors}
        per = report.per_10k(spent, result.requests)
        if per is not None:
            values["cpu_s_per_10k"] = per
        if instructions is not None and result.requests:
            values["instructions_per_req"] = instructions / result.requests
        note = f"CPU of {cpu.what}"
        for (what, _), part in zip(parts, parts_spent):   # e.g. the proxy's and the agent's
            per_part = report.per_10k(part, result.requests)
            if per_part is not None:
                values[f"cpu_s_per_10k_{what}"] = per_part
                note += f"; {what} {per_part:.3f}"
        return Measurement("http", path, values, note=note)

    def profile_proxy(self, url: str, headers: tuple[str, ...], path: str = "apptunnel") -> None:
        """py-spy on the proxy (worker 0) during one more wrk run of the same shape; top
        frames kept."""
        if not profile.have_py_spy():
            self.profile = "no profile: py-spy is not installed (pip install '.[bench]')"
            return
        workers = 2 if path == WORKERS_PATH else 1
        name = "profile-proxy.txt" if workers == 1 else "profile-proxy-2w-worker0.txt"
        a, out = self.args, self.args.out / name
        out.parent.mkdir(parents=True, exist_ok=True)
        spy = profile.record(self.cluster(workers).proxy.proc.pid, a.duration, out)
        try:
            wrk.run(url, threads=a.threads, connections=a.connections, duration=a.duration,
                    headers=headers)
            _, err = spy.communicate(timeout=a.duration + 60)
        finally:
            if spy.poll() is None:
                spy.kill()
                spy.wait(5)
        if spy.returncode != 0 or not out.exists():
            self.profile = f"no profile: py-spy exited {spy.returncode}: {err.decode()[-300:].strip()}"
            return
        frames, samples = profile.top_frames(out.read_text())
        if workers > 1:   # the one-worker profile is the one the docs compare
            return
        self.profile = (f"py-spy of the proxy under wrk -t{a.threads} -c{a.connections} "
                        f"-d{a.duration}s (collapsed stacks: {out})\n"
                        + profile.format_frames(frames, samples))

    def latency(self, path: str, url: str, headers: tuple[str, ...]) -> Measurement:
        result = wrk.run(url, threads=1, connections=1, duration=self.args.latency_duration,
                         headers=headers)
        return Measurement("http-1", path, {"p50_ms": result.p50_ms, "p99_ms": result.p99_ms})

    # -- bulk -----------------------------------------------------------------------------------

    def iperf(self, server: Child, path: str, port: int, reverse: bool,
              cpu: procs.ProcessSet | None = None) -> Measurement:
        """One iperf3 run once the server is idle; a second try if it was turned away.
        With `cpu`, the CPU seconds those processes spent per GiB that reached the receiver."""
        pids = cpu.pids() if cpu is not None else []
        try:
            tcp.wait_server_idle(server)
            before = procs.cpu_seconds(pids)
            result = tcp.run(port, self.args.tcp_duration, reverse)
        except tcp.IperfError as err:
            print(f"  iperf3 {path}: {err}; once more", flush=True)
            tcp.wait_server_idle(server)
            before = procs.cpu_seconds(pids)
            result = tcp.run(port, self.args.tcp_duration, reverse)
        spent = procs.cpu_seconds(pids) - before
        values = {"gbps": result.receiver_gbps}
        per = report.per_gib(spent, result.receiver_bps / 8 * result.seconds) if pids else None
        if per is not None:
            values["cpu_s_per_gib"] = per
        return Measurement("iperf3-down" if reverse else "iperf3-up", path, values,
                           note=f"CPU of {cpu.what}" if cpu is not None else "")

    def curl(self, path: str, url: str, headers: tuple[str, ...], upload: Path | None,
             cafile: Path | None, cpu: procs.ProcessSet | None = None) -> Measurement:
        size = self.args.bulk_mib * 1024 * 1024
        pids = cpu.pids() if cpu is not None and path != "direct" else []
        before = procs.cpu_seconds(pids)
        done = bulk.run(url, size, upload=upload, headers=headers, cafile=cafile)
        spent = procs.cpu_seconds(pids) - before
        values = {"gbps": done.gbps, "seconds": done.seconds}
        if pids:
            values["cpu_s_per_gib"] = report.per_gib(spent, size)
        return Measurement("curl-up" if upload else "curl-down", path, values,
                           note=f"CPU of {cpu.what}" if pids else "")

    def profile_tcp(self, port: int, reverse: bool) -> None:
        """py-spy on the proxy, the agent and `proxy app` during one more iperf3 run."""
        if not profile.have_py_spy():
            self.profile = "no profile: py-spy is not installed (pip install '.[bench]')"
            return
        a, cluster = self.args, self.cluster()
        local = self.local_port("iperf")[0]
        who = {"proxy": cluster.proxy.proc.pid, "agent": cluster.agent.proc.pid,
               "proxy-app": local.proc.pid}
        outs = {name: a.out / f"profile-tcp-{name}.txt" for name in who}
        a.out.mkdir(parents=True, exist_ok=True)
        spies = {name: profile.record(pid, a.tcp_duration, outs[name])
                 for name, pid in who.items()}
        try:
            tcp.run(port, a.tcp_duration, reverse)
        finally:
            for spy in spies.values():
                try:
                    spy.wait(a.tcp_duration + 60)
                except subprocess.TimeoutExpired:
                    spy.kill()
                    spy.wait(5)
        text = []
        for name, out in outs.items():
            if not out.exists():
                text.append(f"no profile of {name}")
                continue
            frames, samples = profile.top_frames(out.read_text())
            text.append(f"py-spy of {name} under iperf3{' -R' if reverse else ''} "
                        f"-t{a.tcp_duration} (collapsed stacks: {out})\n"
                        + profile.format_frames(frames, samples))
        self.profile = (self.profile + "\n" if self.profile else "") + "\n".join(text)

    # -- streams --------------------------------------------------------------------------------

    def idle_row(self, test: str, path: str, ports: list[int], count: int, sink: idle.Sink,
                 sets: dict, child: Child | None) -> Measurement:
        result = idle.measure_streams(ports, count, sink, sets, child=child)
        kib = idle.per_connection_kib(result)
        values = {"held": result["held_count"], **{f"{k}_kib": v for k, v in kib.items()}}
        if test == "idle":
            values["total_kib"] = sum(kib.values())
        else:
            values["wanted"] = count
        note = f"stopped at {result['held_count']}: {result['stopped']}" if result["stopped"] else ""
        return Measurement(test, path, values, note=note)

    def fair_row(self, path: str, port: int, cpu: procs.ProcessSet) -> Measurement:
        per_stream, total, flowing, per_gib = fairness.measure(
            port, self.args.fair_streams, self.args.fair_duration,
            cpu=lambda: procs.cpu_seconds(cpu.pids()))
        starved = sum(1 for v in per_stream if v <= 0)
        values = {"streams": len(per_stream), "flowing": flowing, "gbps": total,
                  "min_mbps": min(per_stream), "max_mbps": max(per_stream),
                  "max_over_min": report.max_over_min(per_stream)}
        if per_gib:
            values["cpu_s_per_gib"] = per_gib
        notes = [f"CPU of {cpu.what}"] + ([f"{starved} streams got nothing"] if starved else [])
        return Measurement("fairness", path, values, note="; ".join(notes))


# -- the run ----------------------------------------------------------------------------------------

# -- the run: the apps, the paths to them, then one function per kind of row ---------------------

@attrs.define
class Apps:
    """The upstream apps of this run (a kind's app is None when the kind is not run)."""

    upstream: Child
    upstream_port: int
    bulk_file: Path
    iperf: Child | None = None
    iperf_port: int = 0
    sink: idle.Sink | None = None
    source_port: int = 0


@attrs.frozen
class WebPath:
    """How an HTTP row reaches the upstream: URL, headers, CA, and the processes it adds."""

    url: str
    headers: tuple[str, ...]
    cafile: Path | None
    cpu: procs.ProcessSet
    split: tuple[procs.ProcessSet, ...] = ()   # parts of `cpu` also counted alone


def start_apps(bench: Bench, bulk_dir: Path) -> Apps:
    a, root, kinds = bench.args, bench.root, set(bench.args.only)
    upload_sink, upload_port = bulk.start_sink(root)
    _own(upload_sink)
    bulk_dir.chmod(0o755)
    bulk_file = bulk.zero_file(bulk_dir / "big", a.bulk_mib * 1024 * 1024)
    bulk_file.chmod(0o644)
    upstream, port = peers.start_nginx(root, bulk_dir, upload_port)
    apps = Apps(_own(upstream), port, bulk_file)
    bench.add_app("hello", f"http://127.0.0.1:{port}")
    if "tcp" in kinds:
        apps.iperf, apps.iperf_port = tcp.start_server(root)
        _own(apps.iperf)
        bench.add_app("iperf", f"tcp://127.0.0.1:{apps.iperf_port}")
    if kinds & {"idle", "agent"}:
        apps.sink = idle.Sink(root)
        _own(apps.sink.child)
        bench.add_app("sink", f"tcp://127.0.0.1:{apps.sink.port}")
    if "fairness" in kinds:
        source, apps.source_port = fairness.start_source(root)
        _own(source)
        bench.add_app("source", f"tcp://127.0.0.1:{apps.source_port}")
    print(f"bench dir {root}; upstream nginx on 127.0.0.1:{port}", flush=True)
    return apps


def web_paths(bench: Bench, apps: Apps) -> dict[str, WebPath]:
    """The HTTP paths that could be set up; one that could not is a failed `http` row."""
    up = apps.upstream
    paths = {"direct": WebPath(f"http://127.0.0.1:{apps.upstream_port}", (), None,
                               procs.ProcessSet("the upstream nginx itself", _pids(up)))}
    try:
        ssh_port, sshd, ssh = bench.ssh_sets("ssh-http", apps.upstream_port)
        paths["ssh"] = WebPath(f"http://127.0.0.1:{ssh_port}", (), None,
                               procs.ProcessSet("sshd + ssh", lambda: sshd.pids() + ssh.pids()))
        front, front_port = peers.start_nginx_tls_front(bench.root, ssh_port)
        _own(front)
        paths["nginx-tls"] = WebPath(f"https://127.0.0.1:{front_port}", (), None, procs.ProcessSet(
            "nginx + sshd + ssh", lambda: procs.tree(front.proc.pid) + sshd.pids() + ssh.pids()))
    except FAILURES as err:
        for path in ("ssh", "nginx-tls"):
            if path not in paths:
                bench.fail("http", path, err)
    try:
        cookie = bench.cookie(b"hello\n")
        cluster = bench.cluster()
    except FAILURES as err:
        bench.fail("http", "apptunnel", err)
        return paths
    paths["apptunnel"] = WebPath(
        f"https://127.0.0.1:{cluster.web_port}",
        (f"Cookie: {APP_COOKIE}={cookie}", f"Host: hello.{PUBLIC_HOST}:{cluster.web_port}"),
        cluster.ca_file, procs.ProcessSet("proxy + agent", _pids(cluster.proxy, cluster.agent)),
        _proxy_and_agent(cluster))
    if "http" not in bench.args.only:
        return paths
    try:   # the same proxy with `workers: 2`: CPU over every worker (the proxy's tree)
        cookie = bench.cookie(b"hello\n", workers=2)
        two = bench.cluster(workers=2)
    except FAILURES as err:
        bench.fail("http", WORKERS_PATH, err)
        return paths
    paths[WORKERS_PATH] = WebPath(
        f"https://127.0.0.1:{two.web_port}",
        (f"Cookie: {APP_COOKIE}={cookie}", f"Host: hello.{PUBLIC_HOST}:{two.web_port}"),
        two.ca_file, procs.ProcessSet("2 proxy workers + agent", _pids(two.proxy, two.agent)),
        _proxy_and_agent(two))
    return paths


def _proxy_and_agent(cluster: LocalCluster) -> tuple[procs.ProcessSet, ...]:
    """The proxy (every worker: its process tree) and the agent, each counted alone."""
    return (procs.ProcessSet("proxy", _pids(cluster.proxy)),
            procs.ProcessSet("agent", _pids(cluster.agent)))


def http_rows(bench: Bench, web: dict[str, WebPath]) -> None:
    a = bench.args
    bench.context["http"] = (f"wrk -t{a.threads} -c{a.connections} -d{a.duration}s after "
                             f"{a.warmup}s warm-up; nginx `return 200 hello`")
    for path, w in web.items():
        bench.attempt("http", path, lambda: bench.http(path, w.url + "/", w.headers, w.cpu,
                                                       w.split))


def latency_rows(bench: Bench, web: dict[str, WebPath]) -> None:
    bench.context["http-1"] = f"-d{bench.args.latency_duration}s"
    for path, w in web.items():
        if path == WORKERS_PATH:   # one connection lands on one worker: nothing to add
            continue
        bench.attempt("http-1", path, lambda: bench.latency(path, w.url + "/", w.headers))


def bulk_rows(bench: Bench, web: dict[str, WebPath], apps: Apps) -> None:
    bench.context["curl-down"] = bench.context["curl-up"] = f"{bench.args.bulk_mib} MiB"
    for path, w in web.items():
        if path == WORKERS_PATH:   # one stream is one worker's: the HTTP rows show workers
            continue
        bench.attempt("curl-down", path, lambda: bench.curl(
            path, w.url + "/bulk/big", w.headers, None, w.cafile, w.cpu))
        bench.attempt("curl-up", path, lambda: bench.curl(
            path, w.url + "/upload", w.headers, apps.bulk_file, w.cafile, w.cpu))


def tcp_rows(bench: Bench, apps: Apps) -> None:
    bench.context["iperf3-up"] = bench.context["iperf3-down"] = f"-t{bench.args.tcp_duration}"

    def ssh() -> tuple[int, procs.ProcessSet]:
        port, sshd, client = bench.ssh_sets("ssh-iperf", apps.iperf_port)
        return port, procs.ProcessSet("sshd + ssh", lambda: sshd.pids() + client.pids())

    def apptunnel() -> tuple[int, procs.ProcessSet]:
        cluster = bench.cluster()
        local, port = bench.local_port("iperf")
        return port, procs.ProcessSet("proxy + agent + proxy app",
                                      _pids(cluster.proxy, cluster.agent, local))

    ports = {"direct": lambda: (apps.iperf_port, None), "ssh": ssh, "apptunnel": apptunnel}
    for reverse in (False, True):
        for path, where in ports.items():
            def row(path=path, where=where, reverse=reverse) -> Measurement:
                port, cpu = where()
                return bench.iperf(apps.iperf, path, port, reverse, cpu)

            bench.attempt("iperf3-down" if reverse else "iperf3-up", path, row)
    if bench.args.profile:
        try:
            bench.profile_tcp(bench.local_port("iperf")[1], reverse=True)
        except FAILURES as err:
            print(f"  iperf3 profile: failed: {err}", flush=True)


def idle_rows(bench: Bench, apps: Apps) -> None:
    n, sink = bench.args.idle_streams, apps.sink
    bench.context["idle"] = f"{n} connections"

    def through_ssh() -> Measurement:
        port, sshd, ssh = bench.ssh_sets("ssh-sink", sink.port)
        return bench.idle_row("idle", "ssh", [port], n, sink, {"server": sshd, "agent": ssh}, None)

    def through_apptunnel() -> Measurement:
        cluster = bench.cluster()
        local, port = bench.local_port("sink")
        return bench.idle_row("idle", "apptunnel", [port], n, sink, {
            "server": cluster.proxy, "agent": cluster.agent, "local": local}, local)

    bench.attempt("idle", "ssh", through_ssh)
    bench.attempt("idle", "apptunnel", through_apptunnel)


def agent_row(bench: Bench, apps: Apps) -> None:
    a = bench.args
    bench.context["idle-agent"] = (f"{a.agent_streams} through `proxy app` processes of "
                                   f"{a.streams_per_local_proxy} each")

    def streams() -> Measurement:
        cluster = bench.cluster()
        count = -(-a.agent_streams // a.streams_per_local_proxy)
        local = [bench.local_port("sink", i) for i in range(count)]
        return bench.idle_row("idle-agent", "apptunnel", [port for _, port in local],
                              a.agent_streams, apps.sink,
                              {"server": cluster.proxy, "agent": cluster.agent}, local[0][0])

    bench.attempt("idle-agent", "apptunnel", streams)


def fairness_rows(bench: Bench, apps: Apps) -> None:
    a = bench.args
    bench.context["fairness"] = f"{a.fair_streams} streams, {a.fair_duration}s"
    def through_ssh() -> Measurement:
        port, sshd, ssh = bench.ssh_sets("ssh-source", apps.source_port)
        return bench.fair_row("ssh", port, procs.ProcessSet(
            "sshd + ssh", lambda: sshd.pids() + ssh.pids()))

    def through_apptunnel() -> Measurement:
        cluster = bench.cluster()
        local, port = bench.local_port("source")
        return bench.fair_row("apptunnel", port, procs.ProcessSet(
            "proxy + agent + proxy app", _pids(cluster.proxy, cluster.agent, local)))

    bench.attempt("fairness", "ssh", through_ssh)
    bench.attempt("fairness", "apptunnel", through_apptunnel)


def run(bench: Bench, bulk_dir: Path) -> None:
    """Every chosen kind of row, in one fixed order; the apps first (the agent serves them)."""
    kinds = set(bench.args.only)
    apps = start_apps(bench, bulk_dir)
    with loopback_resolution():
        web = web_paths(bench, apps) if kinds & {"http", "latency", "bulk"} else {}
        if "http" in kinds:
            http_rows(bench, web)
        if "latency" in kinds:
            latency_rows(bench, web)
        if "bulk" in kinds:
            bulk_rows(bench, web, apps)
        if "tcp" in kinds:
            tcp_rows(bench, apps)
        if "idle" in kinds:
            idle_rows(bench, apps)
        if "agent" in kinds:
            agent_row(bench, apps)
        if "fairness" in kinds:
            fairness_rows(bench, apps)


def write_results(bench: Bench, out: Path, started: datetime.datetime, took: float) -> list[str]:
    """latest.json, a timestamped copy, and latest.png when matplotlib is installed."""
    out.mkdir(parents=True, exist_ok=True)
    rows = report.added_latency(bench.rows)
    meta = {"when": started.isoformat(timespec="seconds"), "seconds": round(took, 1),
            "args": {k: v for k, v in vars(bench.args).items() if k != "out"},
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "python": platform.python_version()},
            "cpu_measure": "perf instructions + /proc CPU seconds" if bench.perf
            else "/proc utime+stime (perf stat -e instructions is not supported here)",
            "context": bench.context, "profile": bench.profile}
    data = json.dumps(report.to_json(rows, meta), indent=2) + "\n"
    (out / "latest.json").write_text(data)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    (out / f"{stamp}.json").write_text(data)
    written = [str(out / "latest.json"), str(out / f"{stamp}.json")]
    try:
        from bench import chart
        chart.write(rows, out / "latest.png", meta["when"])
        written.append(str(out / "latest.png"))
    except ImportError:
        written.append("no chart: matplotlib is not installed (pip install '.[bench]')")
    return written


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--duration", type=int, default=5, help="seconds per wrk run (HTTP rows)")
    add("--warmup", type=int, default=1, help="seconds of discarded wrk warm-up per path")
    add("--connections", type=int, default=32)
    add("--threads", type=int, default=2)
    add("--latency-duration", type=int, default=3, help="seconds of wrk -t1 -c1 per path")
    add("--tcp-duration", type=int, default=3, help="seconds per iperf3 run")
    add("--bulk-mib", type=int, default=1024, help="size of the curl download and upload")
    add("--idle-streams", type=int, default=1000, help="idle connections per path (memory)")
    add("--agent-streams", type=int, default=10000, help="idle streams through the one agent")
    add("--streams-per-local-proxy", type=int, default=4000,
        help="agent row: streams per `proxy app` process (it holds 2 descriptors per stream)")
    add("--fair-streams", type=int, default=1000, help="busy streams for the fairness rows")
    add("--fair-duration", type=int, default=20,
        help="seconds the busy streams are counted (a stream moves in 32 KiB credit steps: "
             "in 5 s each has only ~20 of them, and one more or less moves max/min by 10%%)")
    add("--only", default=",".join(KINDS), help="comma-separated subset of: " + ", ".join(KINDS))
    add("--out", type=Path, default=RESULTS, help="where latest.json and latest.png go")
    add("--profile", action="store_true",
        help="sample with py-spy under the same load: the proxy after the apptunnel HTTP row; "
             "proxy, agent and `proxy app` after the apptunnel iperf3 rows")
    add("--keep", action="store_true", help="keep the temp dir (every child's log) afterwards")
    args = parser.parse_args(argv)
    chosen = [t.strip() for t in args.only.split(",") if t.strip()]
    unknown = set(chosen) - set(KINDS)
    if unknown:
        parser.error(f"--only: unknown kind(s) {', '.join(sorted(unknown))}")
    args.only = [k for k in KINDS if k in chosen]
    for name in ("duration", "latency_duration", "tcp_duration", "bulk_mib", "idle_streams",
                 "agent_streams", "streams_per_local_proxy", "fair_streams", "fair_duration"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def _missing_tools(args: argparse.Namespace) -> list[str]:
    kinds, missing = set(args.only), []
    if kinds & {"http", "latency"} and shutil.which("wrk") is None:
        missing.append("wrk is not installed (apt-get install wrk)")
    if "tcp" in kinds and not tcp.have_iperf3():
        missing.append("iperf3 is not installed (apt-get install iperf3)")
    if "bulk" in kinds and not bulk.have_curl():
        missing.append("curl is not installed (apt-get install curl)")
    if not peers.have_nginx():
        missing.append("nginx is not installed (apt-get install nginx)")
    return missing


def _terminate(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    missing = _missing_tools(args)
    for problem in missing:
        print(f"bench: error: {problem}", file=sys.stderr)
    if missing:
        return 2
    # A stream is a socket here, up to two in `proxy app`, one or two in the proxy, the
    # agent and the sink; children inherit the limit.
    idle.raise_nofile(2 * max(args.agent_streams, args.idle_streams, args.fair_streams) + 1024)
    root = Path(tempfile.mkdtemp(prefix="apptunnel-bench-"))
    bulk_dir = Path(tempfile.mkdtemp(prefix="apptunnel-bench-bulk-"))
    atexit.register(_stop_all)
    signal.signal(signal.SIGTERM, _terminate)
    bench = Bench(args, root)
    started = datetime.datetime.now(datetime.timezone.utc)
    clock = time.monotonic()
    try:
        run(bench, bulk_dir)
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    except FAILURES as err:
        print(f"bench: error: {err}", file=sys.stderr)
        return 1
    finally:
        _stop_all()
        shutil.rmtree(bulk_dir, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    took = time.monotonic() - clock
    rows = report.added_latency(bench.rows)
    print("\n" + report.format_table(rows, bench.context), end="")
    if bench.profile:
        print("\n" + bench.profile, end="")
    for line in write_results(bench, args.out, started, took):
        print(f"wrote {line}" if not line.startswith("no chart") else line)
    print(f"(took {took:.0f}s" + (f"; logs in {root})" if args.keep else ")"))
    return 1 if any(r.error and r.error.startswith("failed") for r in bench.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
