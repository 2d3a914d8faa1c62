"""Processes as /proc sees them: a path's process tree, its resident memory and CPU time.

sshd forks a process per connection, nginx a worker per master: a path's cost is the sum
over each started process and its descendants, read when asked (a tree changes as
connections come and go).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")


def _children_map() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        stat = _stat_fields(int(entry.name))
        if stat is not None:
            tree.setdefault(int(stat[1]), []).append(int(entry.name))
    return tree


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat from field 3 on (state, ppid, ...); the command name may hold spaces."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def tree(*pids: int) -> list[int]:
    """`pids` and all their descendants that are alive now."""
    children = _children_map()
    out, todo = [], list(pids)
    while todo:
        pid = todo.pop()
        if pid in out:
            continue
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def cpu_seconds(pids: Iterable[int]) -> float:
    """user + system CPU seconds (utime + stime, /proc/PID/stat) summed over `pids`."""
    total = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])   # utime, stime (fields 14, 15)
    return total / _TICKS


def rss_kib(pids: Iterable[int]) -> int | None:
    """Resident KiB summed over `pids`; None if none of them is alive."""
    total, seen = 0, False
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        found = re.search(r"VmRSS:\s+(\d+)", status)
        if found:
            total += int(found.group(1))
            seen = True
    return total if seen else None


class ProcessSet:
    """The processes one path adds (e.g. sshd's tree + ssh), measured together."""

    def __init__(self, what: str, roots: Callable[[], list[int]]) -> None:
        self.what = what
        self._roots = roots

    def pids(self) -> list[int]:
        return tree(*self._roots())

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pids())

    def rss_kib(self) -> int | None:
        return rss_kib(self.pids())


def perf_instructions_work() -> bool:
    """Whether `perf stat -e instructions` counts here (VMs often have no PMU: "<not supported>")."""
    try:
        done = subprocess.run(["perf", "stat", "-x,", "-e", "instructions", "--", "true"],
                              capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0 and parse_perf_instructions(done.stderr) is not None


def parse_perf_instructions(text: str) -> int | None:
    """The instruction count from `perf stat -x,` output, or None if it was not counted."""
    for line in text.splitlines():
        fields = line.split(",")
        if len(fields) >= 3 and fields[2].startswith("instructions"):
            return int(fields[0]) if fields[0].isdigit() else None
    return None


class PerfCounter:
    """`perf stat -e instructions -p PIDS` around a run; stop() returns the count or None."""

    def __init__(self, pids: list[int], out: Path) -> None:
        self._out = out
        self._proc = subprocess.Popen(
            ["perf", "stat", "-x,", "-e", "instructions", "-o", str(out),
             "-p", ",".join(map(str, pids))], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> int | None:
        self._proc.send_signal(signal.SIGINT)
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(5)
            return None
        try:
            return parse_perf_instructions(self._out.read_text())
        except OSError:
            return None
