"""Run `iperf3` and read its JSON report: bulk TCP throughput of one path.

The server is the TCP app; the client measures one stream through whichever port it is
given (the server itself, an `ssh -R` forward, or an `apptunnel proxy app` port).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import attrs

from apptunnel.demo import Child, free_port, port_in_use, wait_until


@attrs.frozen
class IperfResult:
    sender_bps: float      # what the client pushed into its socket
    receiver_bps: float    # what reached the iperf3 server: the number that counts
    retransmits: int | None
    seconds: float

    @property
    def receiver_gbps(self) -> float:
        return self.receiver_bps / 1e9

    @property
    def sender_gbps(self) -> float:
        return self.sender_bps / 1e9


class IperfError(Exception):
    """iperf3 failed or printed something we cannot read."""


def have_iperf3() -> bool:
    return shutil.which("iperf3") is not None


def parse(output: str) -> IperfResult:
    """Numbers from `iperf3 -c ... -J`; its own "error" field becomes an IperfError."""
    try:
        report = json.loads(output)
    except ValueError:
        raise IperfError("cannot read iperf3's JSON report: " + output[-300:].strip()) from None
    if not isinstance(report, dict):
        raise IperfError("iperf3's report is not a JSON object")
    if report.get("error"):
        raise IperfError(f"iperf3: {report['error']}")
    try:
        sent = report["end"]["sum_sent"]
        received = report["end"]["sum_received"]
        retransmits = sent.get("retransmits")
        return IperfResult(float(sent["bits_per_second"]), float(received["bits_per_second"]),
                           int(retransmits) if retransmits is not None else None,
                           float(received.get("seconds", sent.get("seconds", 0.0))))
    except (KeyError, TypeError, ValueError):
        raise IperfError("iperf3's report has no end.sum_sent/sum_received bits_per_second") \
            from None


def start_server(root: Path) -> tuple[Child, int]:
    """`iperf3 -s` on a free loopback port; it serves one test at a time, run after run."""
    port = free_port()
    child = Child("iperf3 -s", ["iperf3", "-s", "-B", "127.0.0.1", "-p", str(port),
                                "--forceflush"], root, root / "iperf3-server.log")
    wait_until(lambda: port_in_use(port), 10, "iperf3 -s to listen", child)
    return child, port


def _server_waiting(child: Child) -> bool:
    """True when the last thing iperf3 -s logged is that it listens for the next test."""
    try:
        lines = child.log_path.read_text(errors="replace").splitlines()
    except OSError:
        return False
    lines = [line for line in lines if line.strip() and not line.startswith("---")]
    return bool(lines) and lines[-1].startswith("Server listening on")


def wait_server_idle(child: Child, timeout: float = 20.0, quiet: float = 0.5) -> None:
    """Wait until iperf3 -s has been waiting for a test for `quiet` seconds in a row.

    Readiness probes (ours, `ssh -R`'s) reach the server as half-begun tests that it
    needs a moment to give up on; a client arriving meanwhile is turned away as busy.
    """
    since: list[float] = []

    def settled() -> bool:
        if not _server_waiting(child):
            since.clear()
            return False
        if not since:
            since.append(time.monotonic())
        return time.monotonic() - since[0] >= quiet

    wait_until(settled, timeout, "iperf3 -s to wait for the next test", child, interval=0.05)


def run(port: int, seconds: int, reverse: bool = False) -> IperfResult:
    """One `iperf3 -c 127.0.0.1 -p PORT -t SECONDS -J` (`-R`: the server sends), bounded by
    its duration plus a margin."""
    limit = seconds + 30
    argv = ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds), "-J",
            "--connect-timeout", "10000", *(["-R"] if reverse else [])]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        raise IperfError(f"iperf3 -c did not finish within {limit}s") from None
    if done.returncode != 0 and not done.stdout.strip():
        raise IperfError(f"iperf3 -c exited {done.returncode}: {done.stderr.strip()[:300]}")
    return parse(done.stdout)
