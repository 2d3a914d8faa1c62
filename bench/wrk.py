"""Run `wrk` and read its report: requests/s, latency percentiles, errors."""

from __future__ import annotations

import re
import subprocess

import attrs

_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


@attrs.frozen
class WrkResult:
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int          # non-2xx/3xx responses + socket errors

    def describe_errors(self) -> str:
        return str(self.errors) if self.errors else "0"


class WrkError(Exception):
    """wrk failed or printed something we cannot read."""


def _ms(value: str, unit: str) -> float:
    return float(value) * _UNITS[unit]


def parse(output: str) -> WrkResult:
    """Numbers from wrk's text report (run with --latency)."""
    rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
    p50 = re.search(r"^\s+50%\s+([\d.]+)(us|ms|s|m)\b", output, re.M)
    p99 = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s|m)\b", output, re.M)
    total = re.search(r"(\d+) requests in", output)
    if not (rate and p50 and p99 and total):
        raise WrkError("cannot read wrk's report:\n" + output[-800:])
    errors = 0
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    if non_2xx:
        errors += int(non_2xx.group(1))
    sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    if sockets:
        errors += sum(int(n) for n in sockets.groups())
    return WrkResult(float(rate.group(1)), _ms(*p50.groups()), _ms(*p99.groups()),
                     int(total.group(1)), errors)


def run(url: str, *, threads: int, connections: int, duration: int,
        headers: tuple[str, ...] = ()) -> WrkResult:
    """One wrk run; bounded by its own duration plus a margin."""
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--latency", "--timeout", "5s"]
    for header in headers:
        argv += ["-H", header]
    argv.append(url)
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30)
    except subprocess.TimeoutExpired:
        raise WrkError(f"wrk did not finish within {duration + 30}s") from None
    if done.returncode != 0:
        raise WrkError(f"wrk exited {done.returncode}: {(done.stderr or done.stdout).strip()[:300]}")
    return parse(done.stdout)
