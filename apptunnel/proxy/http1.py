"""Sans-IO HTTP/1.1 for the app edge: parse heads, find where bodies end, touch nothing else.

The proxy reads and rewrites only message heads. Bodies pass through byte for byte (chunk
framing included), so this module parses chunk sizes only to know where a message ends;
a chunked body's trailer section comes out as its own ``Trailers`` event so the caller
decides whether it travels on. Framing is strict, because a proxy that reads a length
differently from the app behind it lets a client smuggle a second request past
authorization (RFC 9112 6.3, 11.2): CRLF line ends only, Transfer-Encoding with
Content-Length is refused, differing Content-Length values are refused, obs-fold is
refused. Requests are held to the one plain spelling of each framing element, because
whatever we accept is forwarded as it is and the app may read a looser spelling another
way: ``Transfer-Encoding`` exactly ``chunked``, one ``Content-Length`` value, chunk sizes
of at most 8 hex digits with nothing around them, and HTTP/1.0 or HTTP/1.1 only.

Finding the end of a head resumes where the last search stopped, so a head that arrives
one byte at a time costs linear time, not quadratic (``HeadScanner``).

Two readers hand back events:

* ``RequestReader`` (client -> proxy): ``RequestHead``, ``BodyBytes``, ``EndOfMessage``.
  It stops after each ``EndOfMessage`` and keeps later bytes until ``next_message()``, so
  the caller handles one request at a time; ``switch_to_raw()`` ends HTTP on the
  connection (after a 101) and returns what was left over.
* ``ResponseReader`` (app -> proxy): told each request's method with ``start(method)``;
  yields ``ResponseHead`` (also for 1xx), ``BodyBytes``, ``EndOfMessage``, or ``Upgraded``
  after a 101 / a 2xx answer to CONNECT, after which every byte is a ``BodyBytes``.

Both emit ``Trailers`` (the raw trailer section of a chunked body, final CRLF included)
just before that body's ``EndOfMessage``.

Nothing but ``HttpError`` leaves ``receive``; its ``status`` is what the client is told.
No Twisted import here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import attrs

from apptunnel.proxy.errors import ProxyError

MAX_HEAD = 64 * 1024
MAX_HEADERS = 100
MAX_CHUNK_LINE = 4096
MAX_TRAILERS = 64 * 1024
# Bytes kept while the caller is busy with the previous message (it pauses its
# transport meanwhile, so only one read's worth should ever arrive).
MAX_HELD = 1024 * 1024

_TOKEN_CHARS = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
_TOKEN = re.compile(_TOKEN_CHARS + rb"+")
# field-value: VCHAR, SP, HTAB and obs-text; no CTLs, CR, LF, NUL or DEL.
_BAD_VALUE_CHARS = rb"\x00-\x08\x0a-\x1f\x7f"
_BAD_VALUE = re.compile(rb"[" + _BAD_VALUE_CHARS + rb"]")
# A whole field section (lines joined by CRLF) in which every line is a valid field: one
# regex pass instead of two per line. CR and LF are bad value bytes, so the CRLFs here are
# exactly the line ends a split finds; a section it refuses is read line by line again to
# say what is wrong (``_parse_fields``).
# Possessive quantifiers: nothing a repeat took is given back, so a refused section costs
# one pass too (no backtracking over a 64 KiB head).
_FIELD = _TOKEN_CHARS + rb"++:[^" + _BAD_VALUE_CHARS + rb"]*+"
_FIELD_SECTION = re.compile(_FIELD + rb"(?:\r\n" + _FIELD + rb")*+")
_TARGET = re.compile(rb"[\x21-\x7e\x80-\xff]+")
_VERSION = re.compile(rb"HTTP/(\d)\.(\d)")
_STATUS = re.compile(rb"\d{3}")
_REASON_BAD = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")
# A request's chunk size: hex digits only, few enough that no app's integer overflows.
_STRICT_HEX = re.compile(rb"[0-9A-Fa-f]{1,8}")
_REQUEST_VERSIONS = (b"HTTP/1.1", b"HTTP/1.0")
_DIGITS = re.compile(rb"[0-9]{1,18}")
# Start lines every check below accepts, in one pass each (what they refuse is checked
# again step by step, to say why): method SP target SP HTTP/1.1 or HTTP/1.0; HTTP/1.x SP
# three digits, then optionally SP and a reason.
_REQUEST_LINE = re.compile(rb"(" + _TOKEN_CHARS + rb"++) ([\x21-\x7e\x80-\xff]++) (HTTP/1\.[01])")
_STATUS_LINE = re.compile(rb"(HTTP/1\.[0-9]) ([0-9]{3})(?: ([^" + _BAD_VALUE_CHARS + rb"]*+))?+")
_CHUNK_EXT_BAD = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


class HttpError(ProxyError):
    """A message we refuse; ``status`` is the HTTP status the peer should be told."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(status, reason)
        self.status = status
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.status} {self.reason}"


class Headers:
    """Ordered (name, value) byte pairs; lookups ignore case, order and spelling are kept.

    The lower-cased names are computed once (by the parser, or on the first lookup) and
    kept in step with every change, and list values (``tokens``) are remembered until the
    next change: a request's head is looked up a dozen times on its way through.
    ``lowered``, when given, must be the lower-cased names of ``items``, in order.
    """

    __slots__ = ("_items", "_names", "_tokens")

    def __init__(self, items: Iterable[tuple[bytes, bytes]] = (),
                 lowered: list[bytes] | None = None) -> None:
        self._items: list[tuple[bytes, bytes]] = list(items)
        self._names: list[bytes] | None = lowered  # lower-cased names, parallel to _items
        self._tokens: dict[bytes, tuple[bytes, ...]] | None = None  # tokens() per lower name

    def _lowered(self) -> list[bytes]:
        names = self._names
        if names is None:
            names = self._names = [n.lower() for n, _ in self._items]
        return names

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Headers) and self._items == other._items

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"

    def __contains__(self, name: bytes) -> bool:
        return name.lower() in self._lowered()

    def get(self, name: bytes, default: bytes | None = None) -> bytes | None:
        """The first value of ``name``, or ``default``."""
        names = self._lowered()
        lname = name.lower()
        if lname not in names:
            return default
        return self._items[names.index(lname)][1]

    def get_all(self, name: bytes) -> list[bytes]:
        names = self._lowered()
        lname = name.lower()
        if lname not in names:
            return []
        return [item[1] for n, item in zip(names, self._items) if n == lname]

    def count(self, name: bytes) -> int:
        """How many ``name`` fields there are."""
        return self._lowered().count(name.lower())

    def tokens(self, name: bytes) -> list[bytes]:
        """Comma-separated list values of every ``name`` field, lower-cased, empties dropped."""
        lname = name.lower()
        cache = self._tokens
        if cache is None:
            cache = self._tokens = {}
        found = cache.get(lname)
        if found is None:
            parts = []
            for value in self.get_all(lname):
                for part in value.split(b","):
                    part = part.strip(b" \t").lower()
                    if part:
                        parts.append(part)
            found = cache[lname] = tuple(parts)
        return list(found)

    def remove(self, name: bytes) -> int:
        """Drop every ``name`` field; returns how many went."""
        lname = name.lower()
        return self.remove_if(lambda n: n == lname)

    def remove_if(self, predicate) -> int:
        """Drop every field whose lower-cased name makes ``predicate`` true."""
        before = len(self._items)
        kept = [(n, item) for n, item in zip(self._lowered(), self._items) if not predicate(n)]
        self._tokens = None
        self._names = [n for n, _ in kept]
        self._items = [item for _, item in kept]
        return before - len(self._items)

    def set(self, name: bytes, value: bytes) -> None:
        """Replace every ``name`` field by one, at the end."""
        self.remove(name)
        self.add(name, value)

    def add(self, name: bytes, value: bytes) -> None:
        self._items.append((name, value))
        self._tokens = None
        if self._names is not None:
            self._names.append(name.lower())

    def items(self) -> list[tuple[bytes, bytes]]:
        return list(self._items)

    def lowered_items(self) -> list[tuple[bytes, tuple[bytes, bytes]]]:
        """(lower-cased name, (name, value)) for every field, in order: for one-pass rewrites."""
        return list(zip(self._lowered(), self._items))

    def replace_all(self, items: Iterable[tuple[bytes, bytes]]) -> None:
        self._items = list(items)
        self._names = None
        self._tokens = None


@attrs.define
class RequestHead:
    method: bytes
    target: bytes
    version: bytes  # b"HTTP/1.1"
    headers: Headers
    # The proxy's id for this request: on its error page and in its app.request audit
    # event, so a user's screenshot leads to the event (set by the app connection).
    request_id: str = ""

    def to_bytes(self) -> bytes:
        return _head_bytes([self.method, b" ", self.target, b" ", self.version, b"\r\n"],
                           self.headers)


@attrs.define
class ResponseHead:
    version: bytes
    status: int
    reason: bytes
    headers: Headers

    def to_bytes(self) -> bytes:
        return _head_bytes([self.version, b" ", b"%d" % self.status, b" ", self.reason, b"\r\n"],
                           self.headers)


@attrs.frozen
class BodyBytes:
    """Body bytes exactly as they were on the wire (chunk framing included)."""

    data: bytes | memoryview


@attrs.frozen
class Trailers:
    """A chunked body's trailer section as it was on the wire, ending with the empty line.

    Kept apart from ``BodyBytes`` because trailer fields are header fields a client could
    use to smuggle what the head had stripped; ``b"\\r\\n"`` in its place is an empty one.
    """

    data: bytes


@attrs.frozen
class EndOfMessage:
    pass


@attrs.frozen
class Upgraded:
    """HTTP ended on this connection; the bytes that follow are another protocol."""


Event = RequestHead | ResponseHead | BodyBytes | Trailers | EndOfMessage | Upgraded


def _head_bytes(start: list[bytes], headers: Headers) -> bytes:
    """A head on the wire: the start line's pieces, the fields, the empty line; one join
    of the pieces (twice per request: the request and response heads)."""
    for name, value in headers:
        start += (name, b": ", value, b"\r\n")
    start.append(b"\r\n")
    return b"".join(start)


def keep_alive(version: bytes, headers: Headers) -> bool:
    """Whether the sender of this head means to keep the connection open afterwards."""
    conn = headers.tokens(b"connection")
    if b"close" in conn:
        return False
    if version == b"HTTP/1.0":
        return b"keep-alive" in conn
    return True


def _parse_version(raw: bytes, status: int) -> bytes:
    m = _VERSION.fullmatch(raw)
    if m is None:
        raise HttpError(400 if status == 400 else status, "malformed HTTP version")
    if m.group(1) != b"1":
        raise HttpError(505 if status == 400 else status, "unsupported HTTP version")
    return raw


def _parse_fields(section: bytes | None, status: int) -> Headers:
    """A field section (lines joined by CRLF; None for none) to Headers; ``status`` is what
    a bad field becomes (400 or 502)."""
    if section is None:
        return Headers()
    if section.count(b"\r\n") >= MAX_HEADERS:
        raise HttpError(431 if status == 400 else status, "too many header fields")
    if _FIELD_SECTION.fullmatch(section) is None:
        return _parse_field_lines(section.split(b"\r\n"), status)  # raises: says why
    items = []
    names = []
    for line in section.split(b"\r\n"):
        name, _, value = line.partition(b":")
        items.append((name, value.strip(b" \t")))
        names.append(name.lower())
    return Headers(items, lowered=names)


def _parse_field_lines(lines: list[bytes], status: int) -> Headers:
    """Field lines one at a time, naming the first bad one (what ``_FIELD_SECTION`` refused)."""
    items = []
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            raise HttpError(status, "obsolete line folding in header")
        name, sep, value = line.partition(b":")
        if not sep or _TOKEN.fullmatch(name) is None:
            raise HttpError(status, "invalid header field name")
        value = value.strip(b" \t")
        if _BAD_VALUE.search(value) is not None:
            raise HttpError(status, "invalid character in header field value")
        items.append((name, value))
    return Headers(items)


def _split_head(head: bytes, status: int) -> tuple[bytes, bytes | None]:
    """(start line, field section or None when the head has no field lines)."""
    crlfs = head.count(b"\r\n")
    # Every CR and LF must be one of the CRLFs (counted in C, not per line).
    if head.count(b"\r") != crlfs or head.count(b"\n") != crlfs:
        raise HttpError(status, "bare CR or LF in message head")
    first, sep, section = head.partition(b"\r\n")
    return first, (section if sep else None)


def parse_request_head(head: bytes) -> RequestHead:
    """One request head without its final empty line (``head`` ends before CRLFCRLF)."""
    first, section = _split_head(head, 400)
    line = _REQUEST_LINE.fullmatch(first)
    if line is not None:
        method, target, version = line.groups()
    else:
        method, target, version = _request_line(first)  # raises: says why
    headers = _parse_fields(section, 400)
    hosts = headers.count(b"host")
    if hosts > 1 or (version == b"HTTP/1.1" and not hosts):
        raise HttpError(400, "a request needs exactly one Host header")
    return RequestHead(method, target, version, headers)


def _request_line(first: bytes) -> tuple[bytes, bytes, bytes]:
    """A request line checked step by step (what ``_REQUEST_LINE`` refused)."""
    parts = first.split(b" ")
    if len(parts) != 3:
        raise HttpError(400, "malformed request line")
    method, target, version = parts
    if _TOKEN.fullmatch(method) is None:
        raise HttpError(400, "invalid request method")
    if _TARGET.fullmatch(target) is None:
        raise HttpError(400, "invalid request target")
    version = _parse_version(version, 400)
    if version not in _REQUEST_VERSIONS:
        raise HttpError(505, "unsupported HTTP version")
    return method, target, version


def parse_response_head(head: bytes) -> ResponseHead:
    first, section = _split_head(head, 502)
    line = _STATUS_LINE.fullmatch(first)
    if line is not None:
        version, status_raw, reason = line.groups()
        status = int(status_raw)
        if status < 100:
            raise HttpError(502, "invalid status code")
        reason = reason or b""
    else:
        version, status, reason = _status_line(first)  # raises: says why
    return ResponseHead(version, status, reason, _parse_fields(section, 502))


def _status_line(first: bytes) -> tuple[bytes, int, bytes]:
    """A status line checked step by step (what ``_STATUS_LINE`` refused)."""
    version, sep, rest = first.partition(b" ")
    status_raw, _, reason = rest.partition(b" ")
    if not sep or _STATUS.fullmatch(status_raw) is None:
        raise HttpError(502, "malformed status line")
    if _REASON_BAD.search(reason) is not None:
        raise HttpError(502, "invalid status reason")
    version = _parse_version(version, 502)
    status = int(status_raw)
    if status < 100:
        raise HttpError(502, "invalid status code")
    return version, status, reason


def _content_length(headers: Headers, status: int) -> int | None:
    values = headers.get_all(b"content-length")
    if not values:
        return None
    if len(values) == 1 and _DIGITS.fullmatch(values[0]) is not None:
        return int(values[0])  # one plain number: what the loop below would find
    found = set()
    for value in values:
        for part in value.split(b","):
            part = part.strip(b" \t")
            if _DIGITS.fullmatch(part) is None:
                raise HttpError(status, "invalid Content-Length")
            found.add(int(part))
    if len(found) != 1:
        raise HttpError(status, "conflicting Content-Length values")
    return found.pop()


def _is_chunked(headers: Headers, status: int, request: bool) -> bool | None:
    """True for chunked, None when there is no Transfer-Encoding, False for until-close."""
    if not headers.get_all(b"transfer-encoding"):
        return None
    codings = headers.tokens(b"transfer-encoding")
    if not codings:
        raise HttpError(status, "empty Transfer-Encoding")
    if codings.count(b"chunked") > 1 or (b"chunked" in codings and codings[-1] != b"chunked"):
        raise HttpError(status, "chunked must be the final transfer coding, once")
    if codings[-1] != b"chunked":
        if request:
            raise HttpError(400, "request body length cannot be determined")
        return False
    return True


class _Framer:
    """Where one body ends; passes the body's bytes through as they are.

    ``strict`` (requests) holds chunk-size lines to the one plain spelling.
    """

    # kinds: "length", "chunked", "close", "none"

    def __init__(self, kind: str, length: int = 0, status: int = 400, strict: bool = False) -> None:
        self.kind = kind
        self.remaining = length
        self.status = status
        self.strict = strict
        # chunked sub-state: "size", "data", "data_crlf", "trailer"
        self.chunk_state = "size"
        # Bytes at the start of the buffer already searched for a line end, so a line
        # that arrives a byte at a time is scanned once, not once per byte; and where the
        # trailer line being read starts (the trailer section stays in the buffer).
        self._scanned = 0
        self._line_start = 0

    def feed(self, buf: bytearray, out: list) -> bool:
        """Consume from ``buf`` into ``out`` events; True once the body is complete."""
        if self.kind == "none":
            return True
        if self.kind == "close":
            if buf:
                out.append(BodyBytes(bytes(buf)))
                del buf[:]
            return False
        if self.kind == "length":
            if self.remaining and buf:
                n = min(self.remaining, len(buf))
                out.append(BodyBytes(bytes(buf[:n])))
                del buf[:n]
                self.remaining -= n
            return self.remaining == 0
        return self._feed_chunked(buf, out)

    def _feed_chunked(self, buf: bytearray, out: list) -> bool:
        # Consumed body bytes are gathered and emitted as one BodyBytes per call. The
        # trailer section stays in ``buf`` until its empty line arrives, then leaves as
        # one Trailers event.
        pos = 0
        done = False
        size = len(buf)
        while pos < size and not done:
            if self.chunk_state == "data":
                n = min(self.remaining, size - pos)
                pos += n
                self.remaining -= n
                if self.remaining == 0:
                    self.chunk_state = "data_crlf"
                continue
            if self.chunk_state == "data_crlf":
                if size - pos < 2:
                    break
                if buf[pos:pos + 2] != b"\r\n":
                    raise HttpError(self.status, "missing CRLF after chunk data")
                pos += 2
                self.chunk_state = "size"
                continue
            if self.chunk_state == "trailer":
                done = self._trailers(buf, pos, out)
                return done
            end = buf.find(b"\r\n", max(pos, self._scanned - 1))
            if end < 0:
                if size - pos > MAX_CHUNK_LINE:
                    raise HttpError(self.status, "chunk line too long")
                self._scanned = size - pos  # the partial line starts the buffer after _emit
                break
            self._scanned = 0
            line = bytes(buf[pos:end])
            pos = end + 2
            self._chunk_size(line)
        self._emit(buf, pos, out)
        return done

    def _trailers(self, buf: bytearray, start: int, out: list) -> bool:
        """Emit the body up to ``start`` and, once it is whole, the trailer section."""
        self._emit(buf, start, out)
        pos = self._line_start
        while True:
            end = buf.find(b"\r\n", max(pos, self._scanned - 1))
            if end < 0:
                self._scanned = len(buf)
                if len(buf) > MAX_TRAILERS:
                    raise HttpError(self.status, "trailer section too large")
                return False
            line = bytes(buf[pos:end])
            pos = self._line_start = self._scanned = end + 2
            if pos > MAX_TRAILERS:
                raise HttpError(self.status, "trailer section too large")
            if line == b"":
                out.append(Trailers(bytes(buf[:pos])))
                del buf[:pos]
                self._scanned = self._line_start = 0
                return True
            _parse_field_lines([line], self.status)

    @staticmethod
    def _emit(buf: bytearray, pos: int, out: list) -> None:
        if pos:
            out.append(BodyBytes(bytes(buf[:pos])))
            del buf[:pos]

    def _chunk_size(self, line: bytes) -> None:
        size_part, semi, ext = line.partition(b";")
        if self.strict:
            if _STRICT_HEX.fullmatch(size_part) is None:
                raise HttpError(self.status, "invalid chunk size")
        else:
            size_part = size_part.rstrip(b" \t")
            if _HEX.fullmatch(size_part) is None:
                raise HttpError(self.status, "invalid chunk size")
        if semi and _CHUNK_EXT_BAD.search(ext) is not None:
            raise HttpError(self.status, "invalid chunk extension")
        n = int(size_part, 16)
        if n == 0:
            self.chunk_state = "trailer"
            self._scanned = self._line_start = 0  # counted from the trailer section's start
        else:
            self.remaining = n
            self.chunk_state = "data"

    def feed_direct(self, data: bytes, out: list) -> tuple[bool, bytes]:
        """Fast path with nothing buffered: pass ``data`` on without copying it.

        Returns (complete, bytes past the end of the body).
        """
        if self.kind == "close":
            out.append(BodyBytes(data))
            return False, b""
        n = min(self.remaining, len(data))
        out.append(BodyBytes(data if n == len(data) else data[:n]))
        self.remaining -= n
        return self.remaining == 0, data[n:]

    def direct(self) -> bool:
        return self.kind == "close" or (self.kind == "length" and self.remaining > 0)

    def at_close(self) -> bool:
        """True when the peer closing the connection ends this body properly."""
        return self.kind == "close"


class HeadScanner:
    """Finds where a head ends in a growing buffer, resuming where the last search stopped.

    Searching the whole buffer again on every read makes a head sent a byte at a time
    cost time quadratic in its size; this remembers how far it looked. ``reset()`` after
    the head (and whatever came before it) has left the buffer.
    """

    __slots__ = ("_skip", "_scanned", "_status")

    def __init__(self, status: int = 400) -> None:
        self._status = status
        self._skip = 0      # empty lines before the start line (RFC 9112 2.2)
        self._scanned = 0   # bytes already searched for the blank line

    def reset(self) -> None:
        self._skip = self._scanned = 0

    def find(self, buf: bytearray | bytes) -> tuple[int, int] | None:
        """(start, end) of the first complete head in ``buf``, ``end`` at its CRLFCRLF.

        Raises 431 (502 for responses) once the head cannot fit in MAX_HEAD.
        """
        skip = self._skip
        if skip == self._scanned:  # still among (or just past) leading empty lines
            while buf[skip:skip + 2] == b"\r\n":
                skip += 2
            self._skip = skip
        end = buf.find(b"\r\n\r\n", max(skip, self._scanned - 3))
        if end < 0:
            if len(buf) > MAX_HEAD:
                raise HttpError(431 if self._status == 400 else self._status, "message head too large")
            # An odd trailing CR may begin the next empty line: look at it again.
            self._scanned = max(skip, len(buf) - (1 if buf[-1:] == b"\r" else 0))
            return None
        if end + 4 > MAX_HEAD:
            raise HttpError(431 if self._status == 400 else self._status, "message head too large")
        return skip, end


def _take_head(buf: bytearray, scanner: HeadScanner) -> bytes | None:
    """Remove and return one head (without the blank line), None if incomplete."""
    if not buf:
        return None  # nothing to look at (a response reader started before any bytes came)
    found = scanner.find(buf)
    if found is None:
        return None
    start, end = found
    head = bytes(buf[start:end])
    del buf[:end + 4]
    scanner.reset()
    return head


class RequestHeadPeek:
    """The first request head of a connection, found as bytes arrive, consuming nothing.

    For the edge, which must read a head to pick the connection's owner and then hand the
    owner every byte: ``data`` is everything received so far.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._scanner = HeadScanner(400)
        self._end: int | None = None   # where the head's blank line ends, once found

    @property
    def data(self) -> bytes:
        return bytes(self._buf)

    @property
    def after_head(self) -> bytes:
        """What arrived after the head (b"" until the head is complete)."""
        return bytes(self._buf[self._end:]) if self._end is not None else b""

    def receive(self, data: bytes) -> RequestHead | None:
        """The head once it is complete (HttpError if it is bad), else None."""
        self._buf += data
        found = self._scanner.find(self._buf)
        if found is None:
            return None
        start, end = found
        self._end = end + 4
        return parse_request_head(bytes(self._buf[start:end]))


def peek_request_head(data: bytes) -> RequestHead | None:
    """The first request head in ``data`` if it is complete, without consuming anything."""
    return RequestHeadPeek().receive(data)


class RequestReader:
    """Client-to-proxy requests, one at a time."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._scanner = HeadScanner(400)
        self._state = "head"  # head | body | done | raw | error
        self._framer: _Framer | None = None

    @property
    def state(self) -> str:
        return self._state

    @property
    def held(self) -> int:
        """Bytes received but not yet parsed (e.g. a pipelined request after this one)."""
        return len(self._buf)

    def receive(self, data: bytes) -> list[Event]:
        if self._state == "raw":
            return [BodyBytes(data)] if data else []
        if self._state == "error":
            raise HttpError(400, "request stream already failed")
        if self._state == "body" and not self._buf and data and self._framer.direct():
            out: list[Event] = []
            done, rest = self._framer.feed_direct(data, out)
            if done:
                out.append(EndOfMessage())
                self._state = "done"
                self._buf += rest
            return out
        self._buf += data
        if self._state == "done":
            if len(self._buf) > MAX_HELD:
                self._state = "error"
                raise HttpError(400, "too much pipelined data")
            return []
        return self._run()

    def next_message(self) -> list[Event]:
        """The previous request was answered: parse the next one from what is held."""
        if self._state != "done":
            raise HttpError(400, "next_message called before the request ended")
        self._state = "head"
        return self._run()

    def switch_to_raw(self) -> bytes:
        """Stop parsing (after a 101); returns bytes the client already sent past the head."""
        rest = bytes(self._buf)
        self._buf = bytearray()
        self._state = "raw"
        return rest

    def connection_closed(self) -> None:
        """The client closed: fine between requests, an error inside one."""
        if self._state == "body" or (self._state == "head" and self._buf.strip(b"\r\n")):
            raise HttpError(400, "client closed in the middle of a request")

    def _run(self) -> list[Event]:
        out: list[Event] = []
        try:
            if self._state == "head":
                head = _take_head(self._buf, self._scanner)
                if head is None:
                    return out
                req = parse_request_head(head)
                self._framer = self._framing(req)
                out.append(req)
                self._state = "body"
            if self._state == "body":
                if self._framer.feed(self._buf, out):
                    out.append(EndOfMessage())
                    self._state = "done"
        except HttpError:
            self._state = "error"
            raise
        return out

    @staticmethod
    def _framing(req: RequestHead) -> _Framer:
        if b"content-length" not in req.headers and b"transfer-encoding" not in req.headers:
            return _Framer("none")  # most requests: no body, nothing more to check
        chunked = _is_chunked(req.headers, 400, request=True)
        length = _content_length(req.headers, 400)
        # The head goes to the app as it came: only spellings every parser reads alike.
        lengths = req.headers.get_all(b"content-length")
        if length is not None and (len(lengths) != 1 or _DIGITS.fullmatch(lengths[0]) is None):
            raise HttpError(400, "Content-Length must be one plain number")
        if chunked is not None:
            if req.version == b"HTTP/1.0":
                raise HttpError(400, "Transfer-Encoding in an HTTP/1.0 request")
            if length is not None:
                raise HttpError(400, "both Transfer-Encoding and Content-Length")
            codings = req.headers.get_all(b"transfer-encoding")
            if len(codings) != 1 or codings[0].lower() != b"chunked":
                raise HttpError(400, "Transfer-Encoding other than chunked")
            return _Framer("chunked", status=400, strict=True)
        if length:
            return _Framer("length", length, status=400)
        return _Framer("none")


class ResponseReader:
    """App-to-proxy responses; each one is read against the method that asked for it."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._scanner = HeadScanner(502)
        self._state = "idle"  # idle | head | body | raw | error
        self._method = b""
        self._framer: _Framer | None = None
        self.must_close = False  # the connection cannot carry another response

    @property
    def state(self) -> str:
        return self._state

    def start(self, method: bytes) -> list[Event]:
        """A request with ``method`` was sent; read its response (from held bytes first)."""
        if self._state != "idle":
            raise HttpError(502, "a response is already in progress")
        self._method = method
        self._state = "head"
        return self._run()

    def receive(self, data: bytes) -> list[Event]:
        if self._state == "raw":
            return [BodyBytes(data)] if data else []
        if self._state == "error":
            raise HttpError(502, "response stream already failed")
        if self._state == "idle":
            if data:
                self._state = "error"
                raise HttpError(502, "data from the app without a request")
            return []
        if self._state == "body" and not self._buf and data and self._framer.direct():
            out: list[Event] = []
            done, rest = self._framer.feed_direct(data, out)
            if done:
                out.append(EndOfMessage())
                self._state = "idle"
                if rest:
                    self._state = "error"
                    raise HttpError(502, "data from the app past the end of the response")
            return out
        self._buf += data
        return self._run()

    def connection_closed(self) -> list[Event]:
        """The app closed; ends an until-close body, fails anything else in flight."""
        if self._state == "body" and self._framer.at_close():
            self._state = "idle"
            return [EndOfMessage()]
        if self._state in ("head", "body"):
            self._state = "error"
            raise HttpError(502, "app closed the connection in the middle of a response")
        return []

    def _run(self) -> list[Event]:
        out: list[Event] = []
        try:
            while self._state == "head":
                head = _take_head(self._buf, self._scanner)
                if head is None:
                    return out
                resp = parse_response_head(head)
                out.append(resp)
                if self._settle(resp, out):
                    return out
            if self._state == "body":
                if self._framer.feed(self._buf, out):
                    out.append(EndOfMessage())
                    self._state = "idle"
                    if self._buf:
                        self._state = "error"
                        raise HttpError(502, "data from the app past the end of the response")
        except HttpError:
            self._state = "error"
            raise
        return out

    def _settle(self, resp: ResponseHead, out: list) -> bool:
        """Pick framing after a head; True when the reader left HTTP (upgrade)."""
        status = resp.status
        upgrade = status == 101 or (self._method == b"CONNECT" and 200 <= status < 300)
        if upgrade:
            self._state = "raw"
            self.must_close = True
            out.append(Upgraded())
            if self._buf:
                out.append(BodyBytes(bytes(self._buf)))
                self._buf = bytearray()
            return True
        if status < 200:
            return False  # informational: the final response follows
        if not keep_alive(resp.version, resp.headers):
            self.must_close = True
        if self._method == b"HEAD" or status in (204, 304):
            self._framer = _Framer("none")
        else:
            chunked = _is_chunked(resp.headers, 502, request=False)
            length = _content_length(resp.headers, 502)
            if chunked is not None and length is not None:
                raise HttpError(502, "both Transfer-Encoding and Content-Length")
            if chunked:
                self._framer = _Framer("chunked", status=502)
            elif chunked is False or length is None:
                self._framer = _Framer("close")
                self.must_close = True
            else:
                self._framer = _Framer("length", length, status=502)
        self._state = "body"
        return False
