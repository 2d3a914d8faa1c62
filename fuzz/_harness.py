"""What every harness shares: reading choices from fuzz input, the seed corpus, atheris.

A harness is plain Python (``TestOneInput(data: bytes)``) so the unit tests can drive it
without atheris; only ``run()`` needs the atheris engine, and imports it there.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable

FUZZ_DIR = os.path.dirname(os.path.abspath(__file__))
CORPUS_DIR = os.path.join(FUZZ_DIR, "corpus")


class FuzzFailure(AssertionError):
    """An invariant broke: the input is a finding, whatever exception types are allowed."""


class Choices:
    """Reads decisions off the input; runs out into zeros so every input is a valid program."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    @property
    def remaining(self) -> int:
        return len(self._data) - self._pos

    def byte(self) -> int:
        if self._pos >= len(self._data):
            return 0
        b = self._data[self._pos]
        self._pos += 1
        return b

    def u16(self) -> int:
        return self.byte() << 8 | self.byte()

    def below(self, n: int) -> int:
        """A number in [0, n) (n <= 65536)."""
        return (self.u16() if n > 256 else self.byte()) % n

    def take(self, n: int) -> bytes:
        chunk = self._data[self._pos:self._pos + n]
        self._pos += len(chunk)
        return chunk

    def rest(self) -> bytes:
        return self.take(self.remaining)


def split(data: bytes, sizes: Iterable[int]) -> list[bytes]:
    """``data`` cut into pieces of the given sizes (0 = an empty feed), the tail last."""
    pieces = []
    pos = 0
    for size in sizes:
        pieces.append(data[pos:pos + size])
        pos += size
    pieces.append(data[pos:])
    return pieces


def corpus_files(name: str) -> list[bytes]:
    """The committed seed inputs of one harness (fuzz/corpus/<name>/)."""
    folder = os.path.join(CORPUS_DIR, name)
    if not os.path.isdir(folder):
        return []
    found = []
    for entry in sorted(os.listdir(folder)):
        with open(os.path.join(folder, entry), "rb") as f:
            found.append(f.read())
    return found


def write_seeds(name: str, seeds: Iterable[bytes]) -> str:
    """Create fuzz/corpus/<name>/ from ``seeds`` if it is missing or empty; returns it."""
    folder = os.path.join(CORPUS_DIR, name)
    os.makedirs(folder, exist_ok=True)
    if not os.listdir(folder):
        for i, seed in enumerate(seeds):
            with open(os.path.join(folder, f"seed-{i:03d}"), "wb") as f:
                f.write(seed)
    return folder


def run(name: str, test_one_input: Callable[[bytes], None],
        seeds: Callable[[], Iterable[bytes]]) -> None:
    """Fuzz with atheris; libFuzzer flags come from the command line.

    Unless the caller names corpus folders itself, libFuzzer gets a scratch folder
    (``$APPTUNNEL_FUZZ_WORK/<name>``, default under the temp dir) to write what it
    learns into, then the committed seeds: the repository's corpus never grows by itself.
    """
    import tempfile

    import atheris  # only the engine needs it; the unit tests run harnesses without it

    folder = write_seeds(name, seeds())
    argv = list(sys.argv)
    if not any(not a.startswith("-") for a in argv[1:]):
        root = os.environ.get("APPTUNNEL_FUZZ_WORK") or os.path.join(
            tempfile.gettempdir(), "apptunnel-fuzz")
        work = os.path.join(root, name)
        os.makedirs(work, exist_ok=True)
        argv += [work, folder]
    atheris.instrument_all()
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()
