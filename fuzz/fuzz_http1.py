"""Fuzz the HTTP/1.1 readers of the app edge with any bytes in any splits.

Input layout: a mode byte (even: ``RequestReader``, odd: ``ResponseReader``), four method
bytes (responses: the methods of the requests they answer, in turn), a cut count byte
(% 8) and that many piece sizes, then the byte stream.  Invariants:

* nothing but ``HttpError`` leaves the readers;
* every head re-parses from the exact bytes it was taken from;
* body bytes (and a chunked body's trailer section) are exactly the stream's bytes after
  the head, in order, with nothing lost or repeated (requests: bytes accounted for +
  bytes held == bytes fed);
* at ``EndOfMessage`` the body is exactly what its head framed: Content-Length bytes, or
  a complete chunked body (checked by an independent, simpler chunk parser).

Run: ``python fuzz/fuzz_http1.py -atheris_runs=100000`` (any libFuzzer flag works).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import Choices, FuzzFailure, run, split  # noqa: E402

from apptunnel.proxy import http1 as H  # noqa: E402

NAME = "http1"
METHODS = (b"GET", b"HEAD", b"POST", b"CONNECT")


def _chunked_length(body: bytes) -> int | None:
    """Where a chunked body ends by the plainest reading of RFC 9112 7.1; None if not whole."""
    pos = 0
    while True:
        end = body.find(b"\r\n", pos)
        if end < 0:
            return None
        size = int(body[pos:end].split(b";", 1)[0].strip(b" \t"), 16)
        pos = end + 2
        if size == 0:
            break
        pos += size + 2
    while True:  # trailer fields, then the empty line
        end = body.find(b"\r\n", pos)
        if end < 0:
            return None
        pos, line = end + 2, body[pos:end]
        if not line:
            return pos


class _Checker:
    """Walks the input stream alongside the reader's events."""

    def __init__(self, request: bool, methods: list[bytes]) -> None:
        self.request = request
        self.methods = methods
        self.stream = b""
        self.pos = 0          # stream bytes accounted for by events
        self.head = None
        self.method = b""
        self.body = bytearray()
        self.raw = False

    def take_head(self, event) -> None:
        start = self.pos
        while self.stream[start:start + 2] == b"\r\n":
            start += 2
        end = self.stream.find(b"\r\n\r\n", start)
        if end < 0:
            raise FuzzFailure("a head event before its blank line arrived")
        parse = H.parse_request_head if self.request else H.parse_response_head
        if parse(self.stream[start:end]) != event:
            raise FuzzFailure(f"head {event!r} does not re-parse from its bytes")
        self.pos = end + 4
        self.head = event
        self.body = bytearray()

    def take_body(self, data: bytes) -> None:
        data = bytes(data)
        if self.stream[self.pos:self.pos + len(data)] != data:
            raise FuzzFailure("body bytes differ from the stream's bytes")
        self.pos += len(data)
        if not self.raw:
            self.body += data

    def end_message(self) -> None:
        headers = self.head.headers
        codings = headers.tokens(b"transfer-encoding")
        lengths = headers.get_all(b"content-length")
        no_body = not self.request and (
            self.method == b"HEAD" or self.head.status in (204, 304))
        if no_body or (not codings and not lengths):
            expected = 0 if self.request or no_body else len(self.body)
        elif codings and codings[-1] == b"chunked":
            expected = _chunked_length(bytes(self.body))
        elif codings:
            expected = len(self.body)  # until close
        else:
            expected = int(lengths[0].split(b",")[0].strip(b" \t"))
        if expected != len(self.body):
            raise FuzzFailure(f"body of {len(self.body)} bytes ended, framing says {expected}")

    def handle(self, events: list) -> bool:
        """Check events; True if the message ended (the reader waits for its caller)."""
        ended = False
        for ev in events:
            if isinstance(ev, (H.RequestHead, H.ResponseHead)):
                self.take_head(ev)
            elif isinstance(ev, (H.BodyBytes, H.Trailers)):
                self.take_body(ev.data)
            elif isinstance(ev, H.Upgraded):
                self.raw = True
            elif isinstance(ev, H.EndOfMessage):
                self.end_message()
                ended = True
        return ended


def _requests(checker: _Checker, pieces: list[bytes]) -> None:
    reader = H.RequestReader()
    for piece in pieces:
        checker.stream += piece
        ended = checker.handle(reader.receive(piece))
        while ended:
            ended = checker.handle(reader.next_message())
        if reader.state != "error" and checker.pos + reader.held != len(checker.stream):
            raise FuzzFailure(f"{checker.pos} bytes accounted for and {reader.held} held, "
                              f"but {len(checker.stream)} fed")
    reader.connection_closed()


def _responses(checker: _Checker, pieces: list[bytes]) -> None:
    reader = H.ResponseReader()
    turn = 0

    def start() -> bool:
        nonlocal turn
        checker.method = checker.methods[turn % len(checker.methods)]
        turn += 1
        return checker.handle(reader.start(checker.method))

    ended = start()
    for piece in pieces:
        while ended:
            ended = start()
        checker.stream += piece
        ended = checker.handle(reader.receive(piece))
    checker.handle(reader.connection_closed())


def TestOneInput(data: bytes) -> None:  # noqa: N802 - the name atheris looks for
    choices = Choices(data)
    request = choices.byte() % 2 == 0
    methods = [METHODS[choices.byte() % len(METHODS)] for _ in range(4)]
    cuts = [choices.u16() % 1024 for _ in range(choices.byte() % 8)]
    pieces = split(choices.rest(), cuts)
    checker = _Checker(request, methods)
    try:
        (_requests if request else _responses)(checker, pieces)
    except H.HttpError as e:
        if not 400 <= e.status <= 599:
            raise FuzzFailure(f"HttpError with status {e.status}") from None


def seeds() -> list[bytes]:
    """Requests and responses with every kind of framing."""
    req = b"\x00\x00\x00\x00\x00\x00"
    resp = b"\x01\x00\x01\x02\x03\x00"
    return [
        req + b"GET / HTTP/1.1\r\nHost: a.localhost\r\n\r\n",
        req + b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"
              b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n",
        req + b"\r\nPUT /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
              b"5;ext=1\r\nhello\r\n0\r\nX-Sum: 1\r\n\r\n",
        b"\x00\x00\x00\x00\x00\x03\x00\x03\x00\x10\x00\x05"
        + b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        req + b"GET /old HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        resp + b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
               b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n"
               b"HTTP/1.1 204 No Content\r\n\r\n"
               b"HTTP/1.1 200 Connection established\r\n\r\nraw bytes",
        resp + b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked"
               b"\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        resp + b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil close",
        resp + b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x00",
    ]


def main() -> None:
    run(NAME, TestOneInput, seeds)


if __name__ == "__main__":
    main()
