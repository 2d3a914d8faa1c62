"""Many busy streams through one tunnel: does each get its share?

    python bench/fairness.py source --port PORT      (the app: sends zeros as fast as it can)

The app writes to every connection as fast as the connection takes it. The bench opens
`count` connections through a path, waits until every one has received its first bytes,
(or a timeout passed), then counts what each reads in the next `seconds` and reports the slowest and the fastest
stream (bench/report.py's max_over_min). One stream starved by the others shows as a
large max/min even when the total looks fine.

The app's sockets keep a fixed send buffer (SEND_BUFFER) instead of the kernel's
autotuning. Autotuned, its 1,000 loopback sockets queued ~1.8 GB between them, which put
this one machine (client, tunnel, app and ``ssh -R`` together) over the kernel's TCP memory
pressure threshold (``net.ipv4.tcp_mem``, sized from RAM): every socket of the machine was
then throttled, ``ssh -R`` had only 370-470 of 1,000 streams flowing, and the row measured
the kernel's pressure rules more than either tunnel (docs/performance.rst, "Busy streams").
An app on its own machine, as an agent's apps usually are, never pushes the client's and
the tunnel's machine into that.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

from apptunnel.demo import Child, free_port, port_in_use, wait_until

CHUNK = b"\0" * 65536
OPEN_AT_ONCE = 100
SEND_BUFFER = 128 * 1024   # SO_SNDBUF of the app's sockets (Linux doubles it)


# -- the app (its own process) ------------------------------------------------------------------

async def _serve(port: int) -> None:
    async def pour(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        try:
            while True:
                writer.write(CHUNK)
                await writer.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(pour, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


def source_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench/fairness.py source")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    try:
        asyncio.run(_serve(args.port))
    except KeyboardInterrupt:
        pass
    return 0


def start_source(root: Path) -> tuple[Child, int]:
    port = free_port()
    child = Child("fairness source", [sys.executable, str(Path(__file__).resolve()), "source",
                                      "--port", str(port)], root, root / "source.log")
    wait_until(lambda: port_in_use(port), 15, "the fairness source to listen", child)
    return child, port


# -- the bench side -------------------------------------------------------------------------------

async def _measure(port: int, count: int, seconds: float, first_bytes_timeout: float,
                   cpu: Callable[[], float]) -> tuple[list[int], float, int, float]:
    counts = [0] * count
    started = [asyncio.Event() for _ in range(count)]
    writers: list[asyncio.StreamWriter] = []
    gate = asyncio.Semaphore(OPEN_AT_ONCE)

    async def stream(i: int) -> None:
        async with gate:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writers.append(writer)
        while data := await reader.read(262144):
            counts[i] += len(data)
            started[i].set()

    tasks = [asyncio.create_task(stream(i)) for i in range(count)]
    try:
        deadline = time.monotonic() + first_bytes_timeout
        while not all(e.is_set() for e in started) and time.monotonic() < deadline:
            failed = [t for t in tasks if t.done() and t.exception() is not None]
            if failed:
                raise OSError(f"a stream failed: {failed[0].exception()}")
            await asyncio.sleep(0.1)
        flowing = sum(e.is_set() for e in started)
        before, cpu_before = list(counts), cpu()
        t0 = time.monotonic()
        await asyncio.sleep(seconds)
        after, spent = list(counts), cpu() - cpu_before
        took = time.monotonic() - t0
    finally:
        for t in tasks:
            t.cancel()
        for w in writers:
            w.transport.abort()
        await asyncio.gather(*tasks, return_exceptions=True)
    return [a - b for a, b in zip(after, before)], took, flowing, spent


def measure(port: int, count: int, seconds: float, first_bytes_timeout: float = 30.0,
            cpu: Callable[[], float] = lambda: 0.0) -> tuple[list[float], float, int, float]:
    """Per-stream throughput in Mbit/s over `seconds`, the total in Gbit/s, how many
    streams had received data when counting began, and the CPU seconds `cpu()` (the
    path's processes) grew by per GiB counted (0.0 if nothing was counted).

    Counting starts once every stream has data, or after `first_bytes_timeout` in any case:
    a stream still waiting then counts with what it gets, possibly 0 (a starved stream is a
    result, not an error).
    """
    moved, took, flowing, spent = asyncio.run(
        _measure(port, count, seconds, first_bytes_timeout, cpu))
    per_stream = [n * 8 / took / 1e6 for n in moved]
    total = sum(moved)
    return per_stream, total * 8 / took / 1e9, flowing, spent * 2**30 / total if total else 0.0


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "source":
        sys.exit(source_main(sys.argv[2:]))
    print("usage: python bench/fairness.py source --port PORT", file=sys.stderr)
    sys.exit(2)
