"""The local audit journal: every event is appended here before its response leaves.

Why it is enough: Twisted sends a response's bytes at the reactor's next doWrite, after the
code that wrote them (and emitted the event) has returned; an ``os.write`` to an O_APPEND
file is in the page cache when it returns, so a ``kill -9`` of the process after that loses
nothing. Power loss is covered by ``fsync`` in batches on a worker thread (``sync_plan`` /
``run_sync``), never per event on the reactor.

Layout: DIRECTORY/NNNNNNNNNNNN.jsonl segments (0600, directory 0700), one event per line,
each line the chain's canonical encoding (audit/chain.py) with the digest appended:
``[proxy_id, seq, prev, id, time, type, code, actor, target, outcome, fields, digest]``.
A line is trusted only if its digest matches, so a torn or garbled line is skipped, never
half-read. Segments rotate at ``segment_bytes``; a closed segment whose events are all
committed to the backend is deleted. The total is bounded by ``max_bytes``: past it
``append`` raises JournalFull and the caller applies ``audit.on_failure``.
"""

from __future__ import annotations

import json
import os

import attrs

from apptunnel.audit.chain import canonical, digest_of
from apptunnel.backend.records import AuditEvent

SEGMENT_BYTES = 4 * 1024 * 1024
MAX_BYTES = 64 * 1024 * 1024
_SUFFIX = ".jsonl"
_NAMES = ("proxy_id", "seq", "prev", "id", "time", "type", "code", "actor", "target",
          "outcome", "fields")


class JournalFull(Exception):
    """The journal is at its size bound."""


def encode(e: AuditEvent) -> bytes:
    """One journal line (chained events only: the digest is what proves a line whole)."""
    return canonical(e)[:-1] + b',"' + e.digest.encode("ascii") + b'"]\n'


def parse_line(line: bytes) -> AuditEvent | None:
    """The event on one line, or None for anything torn, garbled or not matching its digest.
    Never raises."""
    try:
        values = json.loads(line)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(values, list) or len(values) != len(_NAMES) + 1:
        return None
    record = dict(zip(_NAMES, values))
    digest = values[-1]
    texts = ("proxy_id", "prev", "id", "type", "code", "actor", "target", "outcome")
    if (not all(isinstance(record[k], str) for k in texts) or not isinstance(digest, str)
            or type(record["seq"]) is not int or type(record["time"]) not in (int, float)
            or not isinstance(record["fields"], dict)):
        return None
    event = AuditEvent(**record, digest="")
    if digest_of(event) != digest:
        return None
    return attrs.evolve(event, digest=digest)


def read_segment(data: bytes) -> tuple[list[AuditEvent], int, bool]:
    """(events, bad lines, whether the last line was torn: no newline or unreadable)."""
    events: list[AuditEvent] = []
    bad = 0
    lines = data.split(b"\n")
    tail = lines.pop()            # after the last newline: b"" unless torn
    for line in lines:
        e = parse_line(line)
        if e is None:
            bad += 1
        else:
            events.append(e)
    torn = tail != b""
    if not torn and bad and lines and parse_line(lines[-1]) is None:
        bad, torn = bad - 1, True   # an unreadable last line is a torn write, not garbage
    return events, bad, torn


@attrs.define
class _Segment:
    path: str
    size: int
    last_seq: int


@attrs.frozen
class Recovered:
    """What the journal held at open: its events in order, and what could not be read."""

    events: list[AuditEvent]
    bad_lines: int
    torn: bool


class Journal:
    """Append-only segments in one directory; ``append`` runs on the reactor thread."""

    def __init__(self, directory: str, max_bytes: int = MAX_BYTES,
                 segment_bytes: int = SEGMENT_BYTES) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self._segment_bytes = max(1, min(segment_bytes, max_bytes))
        self._closed: list[_Segment] = []
        self._current: _Segment | None = None
        self._fd: int | None = None
        self._next = 0
        self._unsynced: list[int] = []      # fds written since the last sync
        self._to_close: list[int] = []      # rotated fds: closed by the next sync
        self._new_file = False              # a segment was created: fsync the directory

    @classmethod
    def open(cls, directory: str, max_bytes: int = MAX_BYTES,
             segment_bytes: int = SEGMENT_BYTES) -> tuple["Journal", Recovered]:
        """Create or reopen the directory (blocking: at start) and read what it holds."""
        os.makedirs(directory, mode=0o700, exist_ok=True)
        os.chmod(directory, 0o700)
        journal = cls(directory, max_bytes, segment_bytes)
        events: list[AuditEvent] = []
        bad, torn = 0, False
        for name in journal._segment_names():
            path = os.path.join(directory, name)
            with open(path, "rb") as f:
                got, bad_here, torn_here = read_segment(f.read())
            events.extend(got)
            bad += bad_here
            torn = torn or torn_here
            journal._closed.append(_Segment(path, os.path.getsize(path),
                                            max((e.seq for e in got), default=0)))
            journal._next = max(journal._next, int(name[:-len(_SUFFIX)]) + 1)
        return journal, Recovered(events, bad, torn)

    def _segment_names(self) -> list[str]:
        return sorted(n for n in os.listdir(self.directory)
                      if n.endswith(_SUFFIX) and n[:-len(_SUFFIX)].isdigit())

    @property
    def size(self) -> int:
        """Bytes in every segment still on disk."""
        return sum(s.size for s in self._closed) + (self._current.size if self._current else 0)

    @property
    def has_room(self) -> bool:
        return self.size < self.max_bytes

    def append(self, e: AuditEvent) -> None:
        self.append_line(encode(e), e.seq)

    def append_line(self, line: bytes, seq: int) -> None:
        """Write one encoded event now (JournalFull past the bound; OSError such as ENOSPC
        as is). A short write is cut back off, so a failed append never leaves half a line."""
        if self.size + len(line) > self.max_bytes:
            raise JournalFull(f"audit journal at its bound ({self.max_bytes} bytes)")
        if self._current is None or self._current.size >= self._segment_bytes:
            self._rotate()
        assert self._current is not None and self._fd is not None
        written = 0
        try:
            written = os.write(self._fd, line)
            if written != len(line):
                raise OSError(28, "short write to the audit journal")
        except OSError:
            if written:
                os.ftruncate(self._fd, self._current.size)
            raise
        self._current.size += written
        self._current.last_seq = seq
        if not self._unsynced or self._unsynced[-1] != self._fd:
            self._unsynced.append(self._fd)

    def _rotate(self) -> None:
        if self._current is not None:
            self._closed.append(self._current)
            self._to_close.append(self._fd)
        path = os.path.join(self.directory, f"{self._next:012d}{_SUFFIX}")
        self._next += 1
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._current = _Segment(path, 0, 0)
        self._new_file = True

    def committed(self, seq: int) -> None:
        """Every event up to ``seq`` is in the backend: delete the segments holding only
        those (the current one is closed first once it is wholly committed)."""
        current = self._current
        if current is not None and current.size and current.last_seq <= seq:
            self._closed.append(current)
            self._to_close.append(self._fd)
            self._current, self._fd = None, None
        keep = []
        for segment in self._closed:
            if segment.last_seq <= seq:
                try:
                    os.unlink(segment.path)
                except FileNotFoundError:
                    pass
            else:
                keep.append(segment)
        self._closed = keep

    def sync_plan(self) -> tuple[list[int], list[int], str | None]:
        """Reactor thread: (fds to fsync, fds to close after, the directory when a segment
        was created since: its entry must survive power loss too) for one ``run_sync``."""
        fsync, self._unsynced = self._unsynced, []
        close, self._to_close = self._to_close, []
        directory = self.directory if self._new_file else None
        self._new_file = False
        return fsync, close, directory

    @staticmethod
    def run_sync(fsync: list[int], close: list[int], directory: str | None = None) -> None:
        """Worker thread: make the appended lines survive power loss; close rotated fds."""
        for fd in fsync:
            try:
                os.fsync(fd)
            except OSError:
                pass
        for fd in close:
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        if directory is not None:
            dir_fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def close(self) -> None:
        """Blocking: sync and close everything (at stop)."""
        fsync, close, directory = self.sync_plan()
        if self._fd is not None:
            close.append(self._fd)
            self._current = None
            self._fd = None
        self.run_sync([fd for fd in fsync if fd not in close], close, directory)

