"""bench/results/latest.png: every row's ratio to `ssh -R` on its headline metric.

One horizontal bar per (test, path); the line at 1.0 is `ssh -R`. A row with no finite
ratio (a failed row, or max/min with a starved stream) has no bar: the table shows it. Higher is better for
throughput rows, lower for latency, memory, CPU and max/min (the label says which).
Needs matplotlib (`pip install '.[bench]'`); the run writes no chart without it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")   # no display: write a file

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import NullFormatter, ScalarFormatter  # noqa: E402

from bench import report  # noqa: E402

COLOURS = {"direct": "#9e9e9e", "ssh -R": "#1f77b4", "nginx TLS -> ssh -R": "#ff7f0e",
           "apptunnel": "#2ca02c", "apptunnel, 2 workers": "#98df8a"}


def write(rows: Sequence[report.Measurement], path: Path, when: str) -> None:
    bars = report.chart_bars(rows)
    if not bars:
        bars = [("no ratios in this run", "ssh -R", 1.0)]
    better = {t.key: next(m for m in t.metrics if m.key == t.primary).higher_is_better
              for t in report.TESTS.values()}
    labels = [f"{test}{' ^' if better.get(test.split(' ')[0], True) else ' v'}  {who}"
              for test, who, _ in bars]
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(bars) + 1.6))
    ax.barh(range(len(bars)), [q for _, _, q in bars],
            color=[COLOURS.get(who, "#555555") for _, who, _ in bars])
    ax.set_yticks(range(len(bars)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("ratio to ssh -R (log scale; ^ higher is better, v lower is better)")
    ax.set_title(f"apptunnel bench, {when}", fontsize=10)
    for i, (_, _, q) in enumerate(bars):
        ax.text(q, i, f" x{q:.2f}", va="center", fontsize=7)
    missing = report.undrawn(rows)
    if missing:
        fig.text(0.01, 0.005, "not drawn: " + "; ".join(missing)[:400], fontsize=7, wrap=True)
    fig.tight_layout(rect=(0, 0.04 if missing else 0, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
