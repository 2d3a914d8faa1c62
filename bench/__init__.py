"""Side-by-side benchmarks (`make bench`, `python -m bench.run`); docs/performance.rst.

A package so the driver imports its modules and tests/unit imports the pure ones; it is
not installed with apptunnel (setup.cfg packages only apptunnel and twisted.plugins).
"""
