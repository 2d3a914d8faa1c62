"""What a bench run found, as plain data: ratios to `ssh -R`, the printed table, the JSON.

Pure functions only (no processes, no clock, no files): the driver collects
`Measurement`s and hands them here, and tests/unit/test_bench_report.py pins the
arithmetic and the layout.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import attrs

BASELINE = "ssh"     # every ratio is to the `ssh -R` row of the same test
PATHS = ("direct", "ssh", "nginx-tls", "apptunnel", "apptunnel-2w")
LABELS = {"direct": "direct", "ssh": "ssh -R", "nginx-tls": "nginx TLS -> ssh -R",
          "apptunnel": "apptunnel", "apptunnel-2w": "apptunnel, 2 workers"}


@attrs.frozen
class Metric:
    key: str
    label: str
    fmt: str                  # format spec for the value, e.g. ".2f"
    unit: str = ""
    higher_is_better: bool = True


@attrs.frozen
class Test:
    """One kind of measurement: its title, its columns and the one its ratio is taken on."""

    key: str
    title: str
    metrics: tuple[Metric, ...]
    primary: str              # the metric whose ratio to ssh -R the table shows


def _m(key: str, label: str, fmt: str, unit: str = "", higher: bool = True) -> Metric:
    return Metric(key, label, fmt, unit, higher)


_GBPS = _m("gbps", "Gbit/s", ".2f")
_CPU_GIB = _m("cpu_s_per_gib", "CPU s/GiB", ".2f", "", False)
TESTS: dict[str, Test] = {t.key: t for t in (
    Test("http", "HTTP keep-alive, wrk", (
        _m("req_s", "req/s", ".0f"), _m("p50_ms", "p50", ".2f", "ms", False),
        _m("p99_ms", "p99", ".2f", "ms", False),
        _m("cpu_s_per_10k", "CPU s/10k req", ".3f", "", False),
        _m("instructions_per_req", "instr/req", ".0f", "", False),
        _m("errors", "errors", ".0f", "", False)), "req_s"),
    Test("http-1", "HTTP at 1 connection, wrk -t1 -c1", (
        _m("p50_ms", "p50", ".3f", "ms", False), _m("added_p50_ms", "+p50 over direct", ".3f", "ms", False),
        _m("p99_ms", "p99", ".3f", "ms", False)), "p50_ms"),
    Test("iperf3-up", "bulk TCP client -> app, iperf3 one stream", (_GBPS, _CPU_GIB), "gbps"),
    Test("iperf3-down", "bulk TCP app -> client, iperf3 -R one stream", (_GBPS, _CPU_GIB),
         "gbps"),
    Test("curl-down", "download of one large body, curl", (
        _GBPS, _m("seconds", "seconds", ".2f", "s", False), _CPU_GIB), "gbps"),
    Test("curl-up", "upload of one large body, curl -T", (
        _GBPS, _m("seconds", "seconds", ".2f", "s", False), _CPU_GIB), "gbps"),
    Test("idle", "idle TCP connections: KiB of resident memory per connection", (
        _m("held", "held", ".0f"), _m("server_kib", "proxy/sshd", ".1f", "KiB", False),
        _m("agent_kib", "agent/ssh", ".1f", "KiB", False),
        _m("local_kib", "proxy app", ".1f", "KiB", False),
        _m("total_kib", "all", ".1f", "KiB", False)), "total_kib"),
    Test("idle-agent", "idle streams through one agent", (
        _m("wanted", "wanted", ".0f"), _m("held", "held", ".0f"),
        _m("agent_kib", "agent", ".1f", "KiB", False),
        _m("server_kib", "proxy", ".1f", "KiB", False)), "agent_kib"),
    Test("fairness", "busy streams through one tunnel, each reading as fast as it can", (
        _m("streams", "streams", ".0f"), _m("flowing", "flowing", ".0f"), _GBPS,
        _m("min_mbps", "min Mbit/s", ".2f"), _m("max_mbps", "max Mbit/s", ".2f"),
        _m("max_over_min", "max/min", ".2f", "", False), _CPU_GIB), "max_over_min"),
)}


@attrs.frozen
class Measurement:
    """One row: a test through one path; `error` instead of values when it could not run."""

    test: str
    path: str
    values: dict[str, float] = attrs.field(factory=dict)
    error: str | None = None
    note: str = ""


def ratio(value: float | None, baseline: float | None) -> float | None:
    """value / baseline, or None when either is missing, not finite, or the baseline is 0."""
    if value is None or baseline is None:
        return None
    if not (math.isfinite(value) and math.isfinite(baseline)) or baseline == 0:
        return None
    return value / baseline


def ratios(rows: Sequence[Measurement]) -> dict[tuple[str, str], dict[str, float]]:
    """{(test, path): {metric: value / the ssh -R row's value}} for every row that has both."""
    base = {r.test: r.values for r in rows if r.path == BASELINE and r.error is None}
    out: dict[tuple[str, str], dict[str, float]] = {}
    for r in rows:
        if r.error is not None or r.test not in base:
            continue
        found = {k: q for k, v in r.values.items()
                 if (q := ratio(v, base[r.test].get(k))) is not None}
        out[(r.test, r.path)] = found
    return out


def added_latency(rows: Iterable[Measurement], test: str = "http-1") -> list[Measurement]:
    """`rows` with `added_p50_ms` (p50 minus the direct row's p50) set on each row of `test`."""
    rows = list(rows)
    direct = next((r.values.get("p50_ms") for r in rows
                   if r.test == test and r.path == "direct" and r.error is None), None)
    if direct is None:
        return rows
    return [attrs.evolve(r, values={**r.values, "added_p50_ms": r.values["p50_ms"] - direct})
            if r.test == test and r.error is None and "p50_ms" in r.values else r
            for r in rows]


def per_10k(cpu_seconds: float, requests: int) -> float | None:
    """CPU seconds per 10,000 requests, from a CPU-time delta over a counted run."""
    return None if requests <= 0 else cpu_seconds * 10_000 / requests


def per_gib(cpu_seconds: float, moved_bytes: float) -> float | None:
    """CPU seconds per GiB moved, from a CPU-time delta over a counted transfer."""
    return None if moved_bytes <= 0 else cpu_seconds * 2**30 / moved_bytes


def max_over_min(per_stream: Sequence[float]) -> float | None:
    """Fairness: the fastest stream's throughput over the slowest's (inf if one got nothing)."""
    if not per_stream:
        return None
    low, high = min(per_stream), max(per_stream)
    return math.inf if low <= 0 else high / low


def _cell(metric: Metric, values: dict[str, float]) -> str:
    v = values.get(metric.key)
    if v is None:
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return f"{v:{metric.fmt}}{metric.unit}"


def format_table(rows: Sequence[Measurement], context: dict[str, str] | None = None) -> str:
    """One table: a section per test (title, its columns, a row per path, x ssh -R)."""
    context = context or {}
    found = ratios(rows)
    lines: list[str] = []
    for test in TESTS.values():
        mine = sorted((r for r in rows if r.test == test.key),
                      key=lambda r: PATHS.index(r.path) if r.path in PATHS else len(PATHS))
        if not mine:
            continue
        shown = [m for m in test.metrics if any(m.key in r.values for r in mine)]
        primary = next(m for m in test.metrics if m.key == test.primary)
        title = test.title + (f" ({context[test.key]})" if test.key in context else "")
        head = f"{'path':<20}" + "".join(f"{m.label:>{_width(m)}}" for m in shown) \
            + f"{'x ssh -R (' + primary.label + ')':>24}"
        lines += ["", title, head]
        for r in mine:
            label = LABELS.get(r.path, r.path)
            if r.error is not None:
                lines.append(f"{label:<20}{r.error}")
                continue
            q = found.get((r.test, r.path), {}).get(test.primary)
            ratio_cell = "-" if q is None else f"x{q:.2f}"
            lines.append(f"{label:<20}" + "".join(f"{_cell(m, r.values):>{_width(m)}}" for m in shown)
                         + f"{ratio_cell:>24}" + (f"   {r.note}" if r.note else ""))
    return "\n".join(lines).lstrip("\n") + "\n"


def _width(metric: Metric) -> int:
    return max(len(metric.label) + 2, 11)


def to_json(rows: Sequence[Measurement], meta: dict) -> dict:
    """The run as JSON-ready data: `meta` (when, args, machine) and each row with its ratios.

    Infinite values (max/min when a stream got nothing) become the string "inf" so the file
    stays strict JSON.
    """
    found = ratios(rows)

    def clean(values: dict[str, float]) -> dict:
        return {k: ("inf" if isinstance(v, float) and math.isinf(v) else v)
                for k, v in values.items()}

    return {**meta, "baseline": BASELINE, "measurements": [
        {"test": r.test, "path": r.path, "label": LABELS.get(r.path, r.path),
         "values": clean(r.values), "ratio_to_ssh": clean(found.get((r.test, r.path), {})),
         "error": r.error, "note": r.note} for r in rows]}


def chart_bars(rows: Sequence[Measurement]) -> list[tuple[str, str, float]]:
    """(test and its primary metric, path label, ratio to ssh -R) for every row that has a
    finite one, in table order; the ssh -R rows themselves (always 1.0) are left out."""
    found = ratios(rows)
    order = {key: i for i, key in enumerate(TESTS)}

    def place(r: Measurement) -> tuple[int, int]:
        return order.get(r.test, len(order)), PATHS.index(r.path) if r.path in PATHS else len(PATHS)

    out = []
    for r in sorted(rows, key=place):
        test = TESTS.get(r.test)
        if test is None or r.path == BASELINE:
            continue
        q = found.get((r.test, r.path), {}).get(test.primary)
        if q is not None and math.isfinite(q):
            label = next(m.label for m in test.metrics if m.key == test.primary)
            out.append((f"{r.test} ({label})", LABELS.get(r.path, r.path), q))
    return out


def undrawn(rows: Sequence[Measurement]) -> list[str]:
    """The rows the chart cannot draw (failed, or no finite ratio), each with why."""
    drawn = {(t, who) for t, who, _ in chart_bars(rows)}
    out = []
    for r in rows:
        test = TESTS.get(r.test)
        if test is None or r.path == BASELINE:
            continue
        metric = next(m for m in test.metrics if m.key == test.primary)
        label = metric.label
        if (f"{r.test} ({label})", LABELS.get(r.path, r.path)) in drawn:
            continue
        why = r.error or f"{label} {_cell(metric, r.values)}"
        if r.error is None and r.test not in {m.test for m in rows if m.path == BASELINE}:
            why += ", no ssh -R row"
        out.append(f"{r.test} {LABELS.get(r.path, r.path)}: {why}")
    return out
