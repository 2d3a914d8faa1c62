"""Many idle TCP connections through one path, and what they cost in resident memory.

    python bench/idle.py sink --port PORT --status FILE     (the app the streams end at)

The sink accepts connections, reads and drops whatever arrives, and holds each one until
the peer closes it. Every 0.1 s it writes how many it holds to FILE, so the bench knows
when every local connection has become a stream that reached the app (the whole path is
then open: local client -> `proxy app` -> proxy -> tunnel stream -> agent -> sink).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import socket
import struct
import sys
import time
from pathlib import Path

from apptunnel.demo import Child, DemoError, free_port, port_in_use, wait_until

BATCH = 100          # connections opened before waiting for the sink to hold them all
BATCH_TIMEOUT = 60.0


def raise_nofile(wanted: int) -> int:
    """Lift the soft open-files limit towards `wanted` (capped by the hard limit); return it.

    Children inherit it, so calling this before starting them covers the whole path.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


# -- the sink (runs in its own process) ----------------------------------------------------

async def _serve(port: int, status: Path) -> None:
    held = 0

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal held
        held += 1
        try:
            while await reader.read(65536):
                pass
        except OSError:
            pass
        finally:
            held -= 1
            writer.close()

    server = await asyncio.start_server(hold, "127.0.0.1", port, backlog=1024)
    tmp = status.with_suffix(".tmp")
    last = -1
    async with server:
        while True:
            if held != last:
                tmp.write_text(str(held))
                os.replace(tmp, status)   # readers never see a half-written number
                last = held
            await asyncio.sleep(0.1)


def sink_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench/idle.py sink")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--status", type=Path, required=True)
    args = parser.parse_args(argv)
    raise_nofile(1 << 16)
    try:
        asyncio.run(_serve(args.port, args.status))
    except KeyboardInterrupt:
        pass
    return 0


# -- the bench side --------------------------------------------------------------------------

class Sink:
    """The sink subprocess and the count it reports."""

    def __init__(self, root: Path) -> None:
        self.port = free_port()
        self.status = root / "sink.count"
        self.child = Child("idle sink", [sys.executable, str(Path(__file__).resolve()), "sink",
                                         "--port", str(self.port), "--status", str(self.status)],
                           root, root / "sink.log")
        try:
            wait_until(lambda: self.status.exists() and port_in_use(self.port), 15,
                       "the idle sink to listen", self.child)
            wait_until(lambda: self.held() == 0, 10, "the idle sink to drop its probe", self.child)
        except BaseException:
            self.child.stop()
            raise

    def held(self) -> int:
        try:
            return int(self.status.read_text() or "0")
        except (OSError, ValueError):
            return -1

    def wait_held(self, count: int, timeout: float, child: Child | None = None) -> None:
        """Wait until the sink holds exactly `count`; the error names the other child's log."""
        wait_until(lambda: self.held() == count, timeout,
                   f"the idle sink to hold {count} connections (it holds {self.held()})",
                   child if child is not None else self.child)


def open_idle(ports: list[int], count: int, sink: Sink, child: Child | None = None
              ) -> tuple[list[socket.socket], float]:
    """Open `count` connections to 127.0.0.1, spread over `ports`, in bounded batches.

    Returns the sockets (the caller closes them) and the seconds it took until the sink held
    every one. Batches keep the accept backlog and the proxy's pending TLS handshakes small.
    On a failure the sockets opened so far are in `IdleOpenError.sockets`.
    """
    sockets: list[socket.socket] = []
    started = time.monotonic()
    try:
        while len(sockets) < count:
            for _ in range(min(BATCH, count - len(sockets))):
                port = ports[len(sockets) % len(ports)]
                sockets.append(socket.create_connection(("127.0.0.1", port), timeout=10))
            sink.wait_held(len(sockets), BATCH_TIMEOUT, child)
    except (OSError, DemoError) as err:
        raise IdleOpenError(str(err).splitlines()[0], sockets) from None
    except BaseException:
        close_all(sockets)
        raise
    return sockets, time.monotonic() - started


class IdleOpenError(Exception):
    """Opening stopped short; `sockets` are the ones that were opened."""

    def __init__(self, reason: str, sockets: list[socket.socket]) -> None:
        super().__init__(reason)
        self.sockets = sockets


_ABORT = struct.pack("ii", 1, 0)   # SO_LINGER on, 0 s: close() sends RST, not FIN


def close_all(sockets: list[socket.socket]) -> None:
    """Reset every connection.

    A plain close only half-closes the path: `apptunnel proxy app` then keeps the stream
    open waiting for the app to finish, and an idle app never does. A reset ends it at once.
    """
    while sockets:
        s = sockets.pop()
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _ABORT)
        except OSError:
            pass
        s.close()


def measure_streams(ports: list[int], count: int, sink: Sink, processes: dict,
                    child: Child | None = None, settle: float = 1.0) -> dict:
    """RSS (KiB) of each process (anything with `rss_kib()`) before, while holding up to
    `count` streams, and after closing them.

    One connection is opened and closed first so code paths and TLS state loaded on first
    use are not counted per stream. If opening stops short, what the sink held then is
    measured and the reason is kept in "stopped": a path that cannot hold `count` says how
    many it held and why, instead of failing the row.
    """
    warm, _ = open_idle(ports[:1], 1, sink, child)
    close_all(warm)
    sink.wait_held(0, 30, child)
    time.sleep(settle)
    before = {name: p.rss_kib() for name, p in processes.items()}
    stopped = None
    try:
        sockets, took = open_idle(ports, count, sink, child)
    except IdleOpenError as err:
        sockets, took, stopped = err.sockets, float("nan"), str(err)
    try:
        time.sleep(settle)
        held_count = sink.held()
        held = {name: p.rss_kib() for name, p in processes.items()}
    finally:
        close_all(sockets)
    sink.wait_held(0, 120, child)
    time.sleep(settle)
    after = {name: p.rss_kib() for name, p in processes.items()}
    if any(v is None for v in (*before.values(), *held.values())):
        gone = [name for name, p in processes.items() if p.rss_kib() is None]
        raise DemoError(f"{', '.join(gone) or 'a process'} exited during the idle-stream run")
    return {"count": count, "held_count": held_count, "open_seconds": took, "before": before,
            "held": held, "after": after, "stopped": stopped}


def per_connection_kib(result: dict) -> dict[str, float]:
    """KiB per held connection for each process: (holding - before) / held."""
    n = result["held_count"]
    if n <= 0:
        return {}
    return {name: (result["held"][name] - result["before"][name]) / n for name in result["held"]}


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "sink":
        sys.exit(sink_main(sys.argv[2:]))
    print("usage: python bench/idle.py sink --port PORT --status FILE", file=sys.stderr)
    sys.exit(2)
