"""One large body down and up through a path with curl: throughput of a single transfer.

    python bench/bulk.py sink --port PORT     (answers once it has read a whole body)

The upstream nginx serves a file of zeros at /bulk/big and passes a body POSTed to /upload,
unbuffered, to this module's sink, which reads all of it and only then answers (nginx's own
`return 200` answers at once and drops the rest, so curl would time only its first hop).
curl writes the download to /dev/null and streams the upload from the same file (`-T`), kept
in the page cache, so neither end waits on the disk.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
from pathlib import Path

import attrs

from apptunnel.demo import Child, free_port, port_in_use, wait_until


class CurlError(Exception):
    """curl failed, or moved fewer bytes than asked."""


@attrs.frozen
class Transfer:
    bytes: int
    seconds: float

    @property
    def gbps(self) -> float:
        return self.bytes * 8 / self.seconds / 1e9 if self.seconds > 0 else 0.0


def have_curl() -> bool:
    return shutil.which("curl") is not None


def parse(output: str, expected: int) -> Transfer:
    """`-w '%{http_code} %{size_download} %{size_upload} %{time_total}'` into a Transfer."""
    try:
        code, down, up, total = output.split()
        moved = max(int(float(down)), int(float(up)))
        seconds = float(total)
    except ValueError:
        raise CurlError(f"cannot read curl's -w output: {output[:200]!r}") from None
    if code != "200":
        raise CurlError(f"curl got HTTP {code}")
    if moved < expected:
        raise CurlError(f"curl moved {moved} of {expected} bytes")
    return Transfer(moved, seconds)


def zero_file(path: Path, size: int) -> Path:
    """A file of `size` zero bytes, really written: a sparse file reads 4x slower (every hole
    is zero-filled on each read), which would cap the direct row. Once written it stays in
    the page cache, so neither nginx's download nor curl's upload waits on the disk."""
    block = b"\0" * (1 << 20)
    with open(path, "wb") as f:
        for _ in range(size >> 20):
            f.write(block)
        f.write(block[: size & ((1 << 20) - 1)])
    return path


def run(url: str, size: int, *, upload: Path | None = None, headers: tuple[str, ...] = (),
        cafile: Path | None = None, timeout: float = 600) -> Transfer:
    """GET `url` (or POST `upload` to it with -T) and time it; bounded by `timeout`."""
    argv = ["curl", "-sS", "-o", "/dev/null", "-w",
            "%{http_code} %{size_download} %{size_upload} %{time_total}",
            "--max-time", str(int(timeout))]
    argv += ["--cacert", str(cafile)] if cafile else ["-k"]
    for header in headers:
        argv += ["-H", header]
    if upload is not None:
        # -T sends PUT and streams the file; Expect: 100-continue would add a round trip.
        argv += ["-T", str(upload), "-X", "POST", "-H", "Expect:"]
    argv.append(url)
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 30)
    except subprocess.TimeoutExpired:
        raise CurlError(f"curl did not finish within {timeout + 30:.0f}s") from None
    if done.returncode != 0:
        raise CurlError(f"curl exited {done.returncode}: {done.stderr.strip()[:300]}")
    return parse(done.stdout, size)


# -- the upload sink (its own process) -------------------------------------------------------------

_OK = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Type: text/plain\r\n\r\nok\n"
_BAD = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
_READ = 1 << 20


async def _drain_exactly(reader: asyncio.StreamReader, n: int) -> bool:
    while n > 0:
        chunk = await reader.read(min(_READ, n))
        if not chunk:
            return False
        n -= len(chunk)
    return True


async def _drain_chunked(reader: asyncio.StreamReader) -> bool:
    while True:
        size = int((await reader.readline()).split(b";")[0].strip() or b"x", 16)
        if not await _drain_exactly(reader, size + 2):
            return False
        if size == 0:
            return True


def body_kind(head: bytes) -> tuple[str, int]:
    """("length", N) or ("chunked", 0) from a request head; ("none", 0) without a body."""
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name, value = name.strip().lower(), value.strip().lower()
        if name == b"transfer-encoding" and value.endswith(b"chunked"):
            return "chunked", 0
        if name == b"content-length":
            return "length", int(value)
    return "none", 0


async def _serve_sink(port: int) -> None:
    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                kind, length = body_kind(head)
                whole = (await _drain_chunked(reader) if kind == "chunked"
                         else await _drain_exactly(reader, length))
                if not whole:
                    return
                writer.write(_OK)
                await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            writer.write(_BAD)
        except OSError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(one, "127.0.0.1", port, limit=_READ)
    async with server:
        await server.serve_forever()


def sink_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench/bulk.py sink")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    try:
        asyncio.run(_serve_sink(args.port))
    except KeyboardInterrupt:
        pass
    return 0


def start_sink(root: Path) -> tuple[Child, int]:
    port = free_port()
    child = Child("upload sink", [sys.executable, str(Path(__file__).resolve()), "sink",
                                  "--port", str(port)], root, root / "upload-sink.log")
    wait_until(lambda: port_in_use(port), 15, "the upload sink to listen", child)
    return child, port


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "sink":
        sys.exit(sink_main(sys.argv[2:]))
    print("usage: python bench/bulk.py sink --port PORT", file=sys.stderr)
    sys.exit(2)
