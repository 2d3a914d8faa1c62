"""A sampling profile of the proxy under wrk load (`--profile`): where its CPU goes.

py-spy samples the running proxy from outside (no restart, no instrumentation in the
process) and writes collapsed stacks, one line per distinct stack: "frame;frame;... count".
`top_frames` turns them into the table docs/performance.rst shows: the share of samples
in which a function is on top of the stack (self) and anywhere on it (total).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import attrs


def have_py_spy() -> str | None:
    """py-spy's path: beside this Python (the venv's bin, `pip install '.[bench]'`) or on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def record(pid: int, seconds: int, out: Path, rate: int = 200) -> subprocess.Popen:
    """Start `py-spy record` on `pid` for `seconds`; wait on the returned process."""
    return subprocess.Popen(
        [have_py_spy() or "py-spy", "record", "--pid", str(pid), "--duration", str(seconds),
         "--rate", str(rate), "--format", "raw", "--nonblocking", "--output", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@attrs.frozen
class Frame:
    function: str         # "name (file.py)" without the line number
    self_share: float     # of all samples, 0..1
    total_share: float


_LINE = re.compile(r":\d+\)$")


def _name(frame: str) -> str:
    """py-spy's "func (path/to/file.py:123)" as "func (file.py)": lines split one function."""
    frame = _LINE.sub(")", frame.strip())
    head, sep, path = frame.partition(" (")
    return f"{head} ({path.rsplit('/', 1)[-1]}" if sep else frame


def top_frames(collapsed: str, n: int = 20) -> tuple[list[Frame], int]:
    """The `n` functions with the most self samples, and the number of samples."""
    self_count: Counter[str] = Counter()
    total_count: Counter[str] = Counter()
    samples = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        k = int(count)
        samples += k
        frames = [_name(f) for f in stack.split(";") if f]
        if not frames:
            continue
        self_count[frames[-1]] += k
        for name in set(frames):
            total_count[name] += k
    if not samples:
        return [], 0
    return [Frame(name, c / samples, total_count[name] / samples)
            for name, c in self_count.most_common(n)], samples


def format_frames(frames: list[Frame], samples: int) -> str:
    lines = [f"{'self':>6} {'total':>6}  function ({samples} samples)"]
    lines += [f"{f.self_share:>6.1%} {f.total_share:>6.1%}  {f.function}" for f in frames]
    return "\n".join(lines) + "\n"
