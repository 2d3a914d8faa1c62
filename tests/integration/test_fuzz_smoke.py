"""The fuzz harnesses run in CI: seeds plus deterministic random inputs, no engine needed,
and one short run under atheris itself so the `make fuzz` path cannot rot."""

from __future__ import annotations

import importlib
import os
import random
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FUZZ = os.path.join(REPO, "fuzz")
sys.path.insert(0, FUZZ)

HARNESSES = ["fuzz_frames", "fuzz_mux", "fuzz_http1", "fuzz_config"]
# Random inputs per harness, sized to keep the whole file in a few seconds.
RANDOM_RUNS = {"fuzz_frames": 10000, "fuzz_mux": 5000, "fuzz_http1": 10000, "fuzz_config": 1000}


def _harness(name: str):
    return importlib.import_module(name)


def _mutations(seeds: list[bytes], rng: random.Random, count: int):
    """Random bytes and byte-level mutations of the seeds (the fuzzer's cheapest moves)."""
    for i in range(count):
        if i % 4 == 0 or not seeds:
            yield rng.randbytes(rng.randrange(0, 200))
            continue
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randrange(1, 6)):
            kind = rng.randrange(4)
            pos = rng.randrange(len(data) + 1)
            if kind == 0 and data:
                data[min(pos, len(data) - 1)] = rng.randrange(256)
            elif kind == 1:
                data[pos:pos] = rng.randbytes(rng.randrange(1, 8))
            elif kind == 2:
                del data[pos:pos + rng.randrange(1, 16)]
            else:
                other = rng.choice(seeds)
                start = rng.randrange(len(other) + 1)
                data[pos:pos] = other[start:start + rng.randrange(1, 32)]
        yield bytes(data)


@pytest.mark.parametrize("name", HARNESSES)
def test_seed_corpus_passes(name):
    """Every seed input, generated and committed, runs through its harness cleanly."""
    harness = _harness(name)
    from _harness import corpus_files

    inputs = list(harness.seeds()) + corpus_files(harness.NAME)
    assert len(inputs) >= 4
    for data in inputs:
        harness.TestOneInput(data)


@pytest.mark.parametrize("name", HARNESSES)
def test_random_inputs_pass(name):
    """Thousands of deterministic random and mutated inputs break no invariant."""
    harness = _harness(name)
    rng = random.Random(f"apptunnel-{name}")
    for data in _mutations(list(harness.seeds()), rng, RANDOM_RUNS[name]):
        harness.TestOneInput(data)


def test_atheris_runs_a_harness(tmp_path):
    """fuzz_frames runs 2000 executions under the atheris engine and exits 0."""
    env = dict(os.environ, PYTHONPATH=REPO, APPTUNNEL_FUZZ_WORK=str(tmp_path / "work"))
    proc = subprocess.run(
        [sys.executable, os.path.join(FUZZ, "fuzz_frames.py"), "-atheris_runs=2000",
         f"-artifact_prefix={tmp_path}/"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Done 2000 runs" in proc.stderr or "Done 2000 in" in proc.stderr, proc.stderr[-2000:]
