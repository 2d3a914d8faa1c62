"""Checks that work grows linearly with input size, without a wall-clock budget.

A timed assertion ("under 0.3 s") fails on a busy CI machine; a ratio does not: feeding
four times the input must cost about four times the CPU (linear), far below the sixteen
times a quadratic algorithm needs. Each size is measured a few times and the best run
counts, which removes most scheduling noise.
"""

import time


def cpu_seconds(run, repeats: int = 3) -> float:
    """The least CPU time ``run()`` took over ``repeats`` runs."""
    best = None
    for _ in range(repeats):
        started = time.process_time()
        run()
        elapsed = time.process_time() - started
        best = elapsed if best is None else min(best, elapsed)
    return best


def growth(run_with_size, small: int, factor: int = 4) -> float:
    """How much more CPU ``run_with_size(small * factor)`` costs than ``run_with_size(small)``."""
    little = cpu_seconds(lambda: run_with_size(small))
    big = cpu_seconds(lambda: run_with_size(small * factor))
    return big / max(little, 1e-6)
