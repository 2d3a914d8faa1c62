"""Sans-IO HTTP/1.1 heads and body framing of the app edge."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apptunnel.proxy.http1 import (
    MAX_HEAD,
    BodyBytes,
    EndOfMessage,
    Headers,
    HttpError,
    RequestHead,
    RequestReader,
    ResponseHead,
    ResponseReader,
    Trailers,
    Upgraded,
    keep_alive,
)


def read_requests(chunks):
    """Feed chunks, moving to the next message after each end; body bytes joined."""
    reader = RequestReader()
    events = []
    for chunk in chunks:
        new = reader.receive(chunk)
        while True:
            events.extend(new)
            if reader.state != "done":
                break
            new = reader.next_message()
            if not new:
                break
    return normalize(events), reader


def normalize(events):
    out = []
    for ev in events:
        if isinstance(ev, BodyBytes):
            data = bytes(ev.data)
            if out and isinstance(out[-1], bytes):
                out[-1] += data
            else:
                out.append(data)
        else:
            out.append(ev)
    return out


def read_responses(chunks, methods, close=False):
    reader = ResponseReader()
    methods = list(methods)
    events = reader.start(methods.pop(0))
    for chunk in chunks:
        new = reader.receive(chunk)
        events.extend(new)
        while reader.state == "idle" and methods and any(isinstance(e, EndOfMessage) for e in new):
            new = reader.start(methods.pop(0))
            events.extend(new)
    if close:
        events.extend(reader.connection_closed())
    return normalize(events), reader


GET = b"GET /a?b=1 HTTP/1.1\r\nHost: app.example\r\nAccept: */*\r\n\r\n"
POST_CL = b"POST /up HTTP/1.1\r\nHost: app.example\r\nContent-Length: 5\r\n\r\nhello"
POST_CHUNKED = (
    b"POST /up HTTP/1.1\r\nHost: app.example\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5;name=val\r\nhello\r\n0\r\nX-Trailer: yes\r\n\r\n"
)


def test_request_head_parsed_with_order_and_case_kept():
    """A request head gives method, target, version and headers in wire order and case."""
    events, _ = read_requests([GET])
    head = events[0]
    assert isinstance(head, RequestHead)
    assert (head.method, head.target, head.version) == (b"GET", b"/a?b=1", b"HTTP/1.1")
    assert head.headers.items() == [(b"Host", b"app.example"), (b"Accept", b"*/*")]
    assert events[1:] == [EndOfMessage()]


def test_content_length_body_passes_through():
    """A Content-Length body is relayed unchanged and ends the message at its length."""
    events, _ = read_requests([POST_CL])
    assert events[1:] == [b"hello", EndOfMessage()]


def test_chunked_body_passes_through_with_framing_and_trailers_apart():
    """Chunked framing and extensions pass byte for byte; the trailer section is its own event."""
    events, _ = read_requests([POST_CHUNKED])
    assert events[1:] == [b"5;name=val\r\nhello\r\n0\r\n", Trailers(b"X-Trailer: yes\r\n\r\n"),
                          EndOfMessage()]


def test_reader_holds_pipelined_request_until_next_message():
    """After one request ends, the next is parsed only when the caller asks."""
    reader = RequestReader()
    first = reader.receive(GET + POST_CL)
    assert isinstance(first[0], RequestHead) and first[-1] == EndOfMessage()
    assert reader.receive(b"") == []
    second = normalize(reader.next_message())
    assert second[0].method == b"POST" and second[1:] == [b"hello", EndOfMessage()]


@pytest.mark.parametrize(
    "raw, status",
    [
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: 1\r\n  folded\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nBad Name: 1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nName : 1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
        (b"G@T / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 4\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -3\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x3\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3;a\x01\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1" * 17 + b"\r\n", 400),
    ],
)
def test_malformed_requests_are_refused_with_status(raw, status):
    """Smuggling-prone or malformed requests raise HttpError with the right status."""
    with pytest.raises(HttpError) as err:
        read_requests([raw])
    assert err.value.status == status


def test_oversized_head_is_431():
    """A head over 64 KiB is refused with 431 before the end of the head arrives."""
    reader = RequestReader()
    reader.receive(b"GET / HTTP/1.1\r\nHost: a\r\n")
    with pytest.raises(HttpError) as err:
        reader.receive(b"X: " + b"a" * MAX_HEAD + b"\r\n")
    assert err.value.status == 431


def test_too_many_headers_is_431():
    """More than 100 header fields are refused with 431."""
    raw = b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X: 1\r\n" * 100 + b"\r\n"
    with pytest.raises(HttpError) as err:
        read_requests([raw])
    assert err.value.status == 431


def test_failed_reader_stays_failed():
    """After an error the reader refuses further input instead of resynchronising."""
    reader = RequestReader()
    with pytest.raises(HttpError):
        reader.receive(b"BAD\r\n\r\n")
    with pytest.raises(HttpError):
        reader.receive(GET)


def test_close_mid_request_is_an_error_and_between_requests_is_not():
    """A client closing inside a body is a 400; closing between requests is fine."""
    reader = RequestReader()
    reader.receive(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 9\r\n\r\nabc")
    with pytest.raises(HttpError):
        reader.connection_closed()
    reader = RequestReader()
    reader.receive(GET)
    reader.next_message()
    reader.connection_closed()


def test_switch_to_raw_returns_bytes_past_the_head():
    """After an upgrade, bytes the client already sent come back and later data is raw."""
    reader = RequestReader()
    reader.receive(b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n\x81\x00")
    assert reader.switch_to_raw() == b"\x81\x00"
    assert normalize(reader.receive(b"GET / HTTP/1.1")) == [b"GET / HTTP/1.1"]


def test_headers_helpers_ignore_case_and_keep_order():
    """get/remove/set/tokens match names case-insensitively and keep the rest in order."""
    h = Headers([(b"A", b"1"), (b"b", b"2"), (b"a", b"3"), (b"Connection", b"Keep-Alive, X-Y")])
    assert h.get(b"a") == b"1" and h.get_all(b"A") == [b"1", b"3"]
    assert h.tokens(b"connection") == [b"keep-alive", b"x-y"]
    assert h.remove(b"A") == 2 and b"a" not in h
    h.set(b"B", b"9")
    assert h.items() == [(b"Connection", b"Keep-Alive, X-Y"), (b"B", b"9")]


def test_head_serialization_round_trips():
    """A parsed head serializes back to the same bytes."""
    events, _ = read_requests([GET])
    assert events[0].to_bytes() == GET
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: b\r\n\r\nok"
    events, _ = read_responses([raw], [b"GET"])
    assert events[0].to_bytes() + events[1] == raw


def test_keep_alive_rules():
    """HTTP/1.1 is persistent unless 'close'; HTTP/1.0 only with 'keep-alive'."""
    assert keep_alive(b"HTTP/1.1", Headers())
    assert not keep_alive(b"HTTP/1.1", Headers([(b"Connection", b"close")]))
    assert not keep_alive(b"HTTP/1.0", Headers())
    assert keep_alive(b"HTTP/1.0", Headers([(b"Connection", b"Keep-Alive")]))


# Responses


def test_response_without_length_reads_until_close():
    """A response with neither length nor chunking ends when the app closes."""
    events, reader = read_responses([b"HTTP/1.1 200 OK\r\n\r\nabc", b"def"], [b"GET"], close=True)
    assert isinstance(events[0], ResponseHead) and events[1:] == [b"abcdef", EndOfMessage()]
    assert reader.must_close


def test_head_204_304_responses_have_no_body():
    """HEAD responses and 204/304 end at the head even when they carry a length."""
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"
    events, _ = read_responses([raw], [b"HEAD"])
    assert events[1:] == [EndOfMessage()]
    for status in (204, 304):
        raw = b"HTTP/1.1 %d X\r\nContent-Length: 10\r\n\r\n" % status
        events, reader = read_responses([raw], [b"GET"])
        assert events[1:] == [EndOfMessage()] and not reader.must_close


def test_informational_response_precedes_final_one():
    """A 100 Continue head is reported and the final response follows."""
    raw = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx"
    events, _ = read_responses([raw], [b"POST"])
    assert [e.status for e in events[:2]] == [100, 200] and events[2:] == [b"x", EndOfMessage()]


def test_switching_protocols_makes_raw_stream():
    """A 101 gives Upgraded and every later byte as body, including the rest of the read."""
    raw = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x01a"
    reader = ResponseReader()
    reader.start(b"GET")
    events = reader.receive(raw)
    assert events[0].status == 101 and events[1] == Upgraded() and bytes(events[2].data) == b"\x81\x01a"
    assert normalize(reader.receive(b"HTTP/1.1 200")) == [b"HTTP/1.1 200"]


def test_connect_2xx_makes_raw_stream():
    """A 2xx answer to CONNECT switches to raw bytes."""
    reader = ResponseReader()
    reader.start(b"CONNECT")
    events = reader.receive(b"HTTP/1.1 200 OK\r\n\r\n")
    assert events[1] == Upgraded() and reader.state == "raw"


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: 1\r\n folded\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nxyz\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nab",
        b"NONSENSE\r\n\r\n",
    ],
)
def test_malformed_responses_are_502(raw):
    """Broken or ambiguous responses from the app raise HttpError 502."""
    with pytest.raises(HttpError) as err:
        read_responses([raw], [b"GET"])
    assert err.value.status == 502


def test_response_truncated_by_close_is_an_error():
    """The app closing before Content-Length bytes arrived is a 502."""
    reader = ResponseReader()
    reader.start(b"GET")
    reader.receive(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc")
    with pytest.raises(HttpError) as err:
        reader.connection_closed()
    assert err.value.status == 502


def test_unsolicited_response_bytes_are_an_error():
    """Bytes from the app while no request is outstanding are refused."""
    reader = ResponseReader()
    with pytest.raises(HttpError):
        reader.receive(b"HTTP/1.1 200 OK\r\n\r\n")


# Properties

_names = st.sampled_from([b"X-A", b"accept", b"Cookie", b"X-Long-Name-Here"])
_values = st.binary(max_size=20).map(
    lambda b: bytes(c for c in b if 0x20 <= c <= 0x7E).strip()
)
_bodies = st.binary(max_size=200)


@st.composite
def requests(draw):
    method = draw(st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE"]))
    headers = [(b"Host", b"app.example")] + draw(st.lists(st.tuples(_names, _values), max_size=5))
    body = draw(_bodies) if method in (b"POST", b"PUT") else b""
    framing = draw(st.sampled_from(["length", "chunked"])) if body else "none"
    if framing == "length":
        headers.append((b"Content-Length", b"%d" % len(body)))
        wire_body = body
    elif framing == "chunked":
        headers.append((b"Transfer-Encoding", b"chunked"))
        sizes = draw(st.lists(st.integers(1, 50), max_size=5))
        parts, rest = [], body
        for size in sizes:
            if not rest:
                break
            piece, rest = rest[:size], rest[size:]
            parts.append(b"%x;e=1\r\n%s\r\n" % (len(piece), piece))
        if rest:
            parts.append(b"%X\r\n%s\r\n" % (len(rest), rest))
        parts.append(b"0\r\n")
        trailers = Trailers(draw(st.sampled_from([b"", b"X-T: 1\r\n", b"A: b\r\nC-D: e f\r\n"])) + b"\r\n")
        wire_body = b"".join(parts)
    else:
        wire_body = b""
    head = RequestHead(method, b"/p?q=1", b"HTTP/1.1", Headers(headers))
    return head, wire_body, trailers if framing == "chunked" else None


def splits(data, cuts):
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in points:
        pieces.append(data[last:p])
        last = p
    pieces.append(data[last:])
    return pieces


@settings(max_examples=150, deadline=None)
@given(st.lists(requests(), min_size=1, max_size=4), st.lists(st.integers(0, 10**6), max_size=12))
def test_any_split_of_pipelined_requests_gives_same_events(msgs, cuts):
    """Pipelined requests split anywhere yield the same heads, body bytes and ends."""
    stream = b"".join(head.to_bytes() + body + (trailers.data if trailers else b"")
                      for head, body, trailers in msgs)
    expected = []
    for head, body, trailers in msgs:
        expected.append(head)
        if body:
            expected.append(body)
        if trailers:
            expected.append(trailers)
        expected.append(EndOfMessage())
    whole, _ = read_requests([stream])
    pieces, _ = read_requests(splits(stream, cuts))
    bytewise, _ = read_requests([stream[i:i + 1] for i in range(len(stream))])
    assert whole == pieces == bytewise == expected


@st.composite
def responses(draw):
    status = draw(st.sampled_from([200, 201, 204, 304, 404, 500]))
    body = b"" if status in (204, 304) else draw(_bodies)
    chunked = draw(st.booleans())
    headers = [(b"Server", b"t")]
    if chunked and status not in (204, 304):
        headers.append((b"Transfer-Encoding", b"chunked"))
        wire = (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n"
        trailers = Trailers(draw(st.sampled_from([b"", b"X-T: 1\r\n"])) + b"\r\n")
    else:
        headers.append((b"Content-Length", b"%d" % len(body)))
        wire, trailers = body, None
    return ResponseHead(b"HTTP/1.1", status, b"Reason", Headers(headers)), wire, trailers


@settings(max_examples=150, deadline=None)
@given(st.lists(responses(), min_size=1, max_size=4), st.lists(st.integers(0, 10**6), max_size=12))
def test_any_split_of_response_stream_gives_same_events(msgs, cuts):
    """Responses on one connection, split anywhere, yield the same events."""
    expected = []
    for head, body, trailers in msgs:
        expected.append(head)
        if body:
            expected.append(body)
        if trailers:
            expected.append(trailers)
        expected.append(EndOfMessage())
    # Each response is fed separately: the app may only answer an outstanding request.
    for pieces_of in (lambda b: [b], lambda b: splits(b, cuts), lambda b: [b[i:i + 1] for i in range(len(b))]):
        reader = ResponseReader()
        events = []
        for head, body, trailers in msgs:
            events.extend(reader.start(b"GET"))
            for piece in pieces_of(head.to_bytes() + body + (trailers.data if trailers else b"")):
                events.extend(reader.receive(piece))
        assert normalize(events) == expected


@settings(max_examples=300, deadline=None)
@given(st.booleans(), st.binary(max_size=400), st.lists(st.integers(0, 10**6), max_size=8))
def test_garbage_requests_give_events_or_http_error(in_chunked_body, data, cuts):
    """Arbitrary bytes never raise anything but HttpError from the request reader."""
    if in_chunked_body:
        data = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + data
    try:
        read_requests(splits(data, cuts))
    except HttpError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.sampled_from([b"GET", b"HEAD", b"CONNECT"]))
def test_garbage_responses_give_events_or_http_error(data, method):
    """Arbitrary bytes never raise anything but HttpError from the response reader."""
    reader = ResponseReader()
    try:
        reader.start(method)
        for i in range(0, len(data), 7):
            reader.receive(data[i:i + 7])
        reader.connection_closed()
    except HttpError:
        pass


# Ambiguous framing in requests (issue 8, finding 13): the head is forwarded as it came,
# so only the one plain spelling of each framing element is accepted.


@pytest.mark.parametrize(
    "raw, status",
    [
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity, chunked\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 3\r\n\r\nabc", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3 \r\nabc\r\n0\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\t\r\nabc\r\n0\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n 3\r\nabc\r\n0\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0000000000000003\r\nabc\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n000000003\r\nabc\r\n", 400),
        (b"GET / HTTP/1.2\r\nHost: a\r\n\r\n", 505),
        (b"GET / HTTP/1.9\r\nHost: a\r\n\r\n", 505),
    ],
)
def test_ambiguous_request_framing_is_refused(raw, status):
    """identity+chunked, repeated lengths, padded or 16-digit chunk sizes and HTTP/1.2 are refused."""
    with pytest.raises(HttpError) as e:
        read_requests([raw])
    assert e.value.status == status


def test_plain_chunk_sizes_and_extensions_still_pass():
    """Upper/lower-case hex of up to 8 digits and chunk extensions are fine."""
    body = b"0000000A;x=1\r\n0123456789\r\na\r\n0123456789\r\n0\r\n\r\n"
    events, _ = read_requests([b"PUT / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n" + body])
    assert events[1:] == [body[:-2], Trailers(b"\r\n"), EndOfMessage()]


def test_responses_keep_their_tolerance():
    """An app's padded chunk size is read as before: responses go to the client, not to an app."""
    events, _ = read_responses([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3 \r\nabc\r\n0\r\n\r\n"],
                               [b"GET"])
    assert events[-1] == EndOfMessage()


@pytest.mark.parametrize("reader_kind", ["request", "response"])
def test_trailer_section_is_one_event_whatever_the_split(reader_kind):
    """Trailer fields arriving a byte at a time come out as one Trailers event, then the end."""
    trailer = b"Apptunnel-Jwt-Assertion: forged\r\nX-More: 1\r\n\r\n"
    body = b"3\r\nabc\r\n0\r\n"
    if reader_kind == "request":
        wire = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + body + trailer
        events, _ = read_requests([wire[i:i + 1] for i in range(len(wire))])
    else:
        wire = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body + trailer
        events, _ = read_responses([wire[i:i + 1] for i in range(len(wire))], [b"GET"])
    assert events[1:] == [body, Trailers(trailer), EndOfMessage()]


def test_oversized_trailer_section_is_refused():
    """A trailer section past MAX_TRAILERS is an error, also when it never ends."""
    wire = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n" + b"X: y\r\n" * 20000
    with pytest.raises(HttpError):
        read_requests([wire])


# Slow heads (issue 8, finding 9): finding the end of a head resumes where it stopped.


class _CountingBuffer(bytearray):
    """A bytearray that counts how many bytes ``find`` was asked to look at."""

    looked = 0

    def find(self, sub, start=0, *rest):
        type(self).looked += max(0, len(self) - start)
        return super().find(sub, start, *rest)


def test_head_scanner_looks_at_each_byte_a_bounded_number_of_times():
    """A 60 KB head fed a byte at a time is searched in linear, not quadratic, work."""
    from apptunnel.proxy.http1 import HeadScanner

    head = b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X-Pad: " + b"p" * 60000 + b"\r\n\r\n"
    scanner = HeadScanner()
    buf = _CountingBuffer()
    _CountingBuffer.looked = 0
    found = None
    for i in range(len(head)):
        buf += head[i:i + 1]
        found = scanner.find(buf)
        if found is not None:
            break
    assert found == (0, len(head) - 4)
    assert _CountingBuffer.looked < 5 * len(head)


def test_head_scanner_resumes_across_leading_empty_lines_and_split_crlf():
    """Empty lines before a head and a CRLFCRLF split anywhere are found exactly once."""
    from apptunnel.proxy.http1 import HeadScanner

    data = b"\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n"
    for cut in range(1, len(data)):
        scanner = HeadScanner()
        assert scanner.find(data[:cut]) is None
        assert scanner.find(data) == (4, len(data) - 4)


@pytest.mark.parametrize("feed", ["reader", "peek"])
def test_slow_head_costs_linear_time(feed):
    """A head fed a byte at a time costs linear CPU: four times the bytes cost about four
    times as much (a quadratic search would cost sixteen)."""
    from apptunnel.proxy.http1 import RequestHeadPeek

    from tests.support.scaling import growth

    def parse(pad):
        head = b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X-Pad: " + b"p" * pad + b"\r\n\r\n"
        target = RequestReader() if feed == "reader" else RequestHeadPeek()
        results = [target.receive(head[i:i + 1]) for i in range(len(head))]
        assert results[-1]  # the head came out at the last byte
        assert not any(results[:-1])

    assert growth(parse, 15000) < 8


@settings(max_examples=100, deadline=None)
@given(st.lists(requests(), min_size=1, max_size=2), st.lists(st.integers(0, 10**6), max_size=12))
def test_peek_finds_the_same_first_head_whatever_the_split(msgs, cuts):
    """RequestHeadPeek gives the first head at the same point for any split, consuming nothing."""
    from apptunnel.proxy.http1 import RequestHeadPeek

    stream = b"\r\n" + b"".join(head.to_bytes() + body + (trailers.data if trailers else b"")
                               for head, body, trailers in msgs)
    peek = RequestHeadPeek()
    found = None
    for piece in splits(stream, cuts):
        head = peek.receive(piece)
        found = found or head
    assert found == msgs[0][0]
    assert peek.data == stream


def _outcome(chunks):
    """Events (body bytes joined) or the HttpError status, for split comparisons."""
    try:
        events, _ = read_requests(chunks)
    except HttpError as err:
        return ("error", err.status)
    return ("events", events)


_chunk_lines = st.lists(st.sampled_from([
    b"3\r\nabc\r\n", b"A;x=y\r\n0123456789\r\n", b"3 \r\nabc\r\n", b"0\r\n", b"\r\n", b"X-T: 1\r\n",
    b"Bad Name: 1\r\n", b"zz\r\n", b"3\r\nabcd", b"\r", b"\n", b"1\r\n\r\n\r\n", b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
]), max_size=10)


@settings(max_examples=300, deadline=None)
@given(_chunk_lines, st.lists(st.integers(0, 10**6), max_size=8))
def test_chunked_bodies_give_the_same_outcome_for_any_split(lines, cuts):
    """Resumed line scanning: any split (and byte at a time) gives what one write gives,
    errors included."""
    data = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + b"".join(lines)
    whole = _outcome([data])
    assert _outcome(splits(data, cuts)) == whole
    assert _outcome([data[i:i + 1] for i in range(len(data))]) == whole
