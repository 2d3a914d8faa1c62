"""The restructured head code of the request path gives what the code before it gave.

Issue 14's HTTP levers rewrote field parsing (one regex over a field section), framing
(facts looked up once), ``Headers.tokens`` (remembered until a change) and the client
header rewrite (one pass). ``bench/http_before.py`` keeps the code as it was; these
properties hold the new code to its results, errors (status and reason) included.
"""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st

from apptunnel.auth.sessions import PROXY_COOKIE_PREFIX
from apptunnel.catalog import AppInfo
from apptunnel.proxy import http1
from apptunnel.proxy.app_connection import RandomIds, new_request_id
from apptunnel.proxy.app_heads import forwarded_client_headers
from apptunnel.proxy.headers import (
    MAX_CACHED_NAME,
    client_header_dropped,
    client_headers,
    identity_names,
)
from apptunnel.proxy.http1 import Headers, HttpError, RequestReader, ResponseReader
from bench import http_before as before

_NAMES = [b"Host", b"host", b"Cookie", b"cookie", b"Connection", b"Content-Length",
          b"content-length", b"Transfer-Encoding", b"Upgrade", b"X-A", b"x_a",
          b"X-Forwarded-For", b"Proxy-Authorization", b"Keep-Alive", b"TE",
          b"Teleport-Jwt-Assertion", b"Apptunnel.Jwt_Assertion", b"X-Webauth-User",
          b"Forwarded", b"Accept"]
_VALUES = [b"", b"a", b" a ", b"close", b"keep-alive, X-A", b"Upgrade", b"websocket",
           b"chunked", b"gzip, chunked", b"Chunked", b"chunked, chunked", b"5", b"5, 5",
           b"5,6", b" 10", b"+5", b"0x5", b"12345678901234567890", b"\ta\t",
           PROXY_COOKIE_PREFIX.encode() + b"app=s; theme=dark",
           b"a=1;" + PROXY_COOKIE_PREFIX.encode() + b"state=x", PROXY_COOKIE_PREFIX.encode() + b"x=1",
           b"x-a, host, content-length, cookie", b"caf\xc3\xa9", b"a\x00b", b"a\x7f", b"a\rb"]
# Bytes that matter to the parser: separators, whitespace, controls, CR and LF.
_ODD = st.binary(max_size=12).map(lambda b: b.translate(bytes.maketrans(b"\x01\x02\x03\x04\x05",
                                                                         b":\r\n \t")))


def _field():
    good = st.tuples(st.sampled_from(_NAMES[2:] * 4 + _NAMES[:2]), st.sampled_from([b": ", b":", b" : ", b":\t"]),
                     st.sampled_from(_VALUES)).map(b"".join)
    return st.one_of(good, good, good, good, good, good, good, _ODD)


_SEP = st.sampled_from([b" ", b" ", b" ", b"  ", b"\t", b""])
_REQUEST_LINES = st.one_of(
    st.tuples(st.sampled_from([b"GET", b"POST", b"G@T", b"", b"get"]), _SEP,
              st.sampled_from([b"/", b"/x?y", b"/\x7f", b"http://a/", b"", b"/\x80\xff", b"/ /"]), _SEP,
              st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/1.2", b"HTTP/2.0", b"http/1.1",
                               b"HTTP/11", b"HTTP/1.1 ", b"HTTP/1.x"]),
              st.sampled_from([b"\r\nHost: a", b"\r\nHost: a", b"", b"\r\nHost: a\r\nhost: b"]),
              ).map(b"".join),
    _ODD)
_STATUS_LINES = st.one_of(
    st.tuples(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/1.5", b"HTTP/2.0", b"HTTP/1.", b""]),
              _SEP,
              st.sampled_from([b"200", b"204", b"304", b"101", b"100", b"099", b"000", b"20", b"2000",
                               b"2a0", b""]),
              st.sampled_from([b"", b" ", b" OK", b"  two  spaces ", b" a\x7f", b" caf\xc3\xa9",
                               b" \t", b"OK", b" O\x01K"]),
              ).map(b"".join),
    _ODD)


def _heads(first):
    return st.tuples(first, st.lists(_field(), max_size=8), st.booleans()).map(
        lambda t: b"\r\n".join([t[0], *t[1]]) + (b"\r\n" if t[2] else b""))


def _outcome(fn, *args):
    try:
        return fn(*args)
    except HttpError as err:
        return ("error", err.status, err.reason)


def _lowered_in_step(headers: Headers) -> bool:
    return all(headers.get_all(n) == [v for m, v in headers if m.lower() == n.lower()]
               for n, _ in headers)


@settings(max_examples=400, deadline=None)
@given(_heads(_REQUEST_LINES))
def test_request_heads_parse_as_before(head):
    new = _outcome(http1.parse_request_head, head)
    assert new == _outcome(before.parse_request_head, head)
    if not isinstance(new, tuple):
        assert _lowered_in_step(new.headers)


@settings(max_examples=400, deadline=None)
@given(_heads(_STATUS_LINES))
def test_response_heads_parse_as_before(head):
    new = _outcome(http1.parse_response_head, head)
    assert new == _outcome(before.parse_response_head, head)
    if not isinstance(new, tuple):
        assert _lowered_in_step(new.headers)


def _no_bare_cr_lf(section: bytes) -> bool:
    crlfs = section.count(b"\r\n")
    return section.count(b"\r") == crlfs and section.count(b"\n") == crlfs


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(_field(), st.binary(max_size=20)), min_size=1, max_size=4)
       .map(b"\r\n".join).filter(_no_bare_cr_lf))
def test_any_field_section_is_judged_as_before(section):
    """What the one-regex pass accepts is exactly what the line-by-line loop accepted."""
    new = _outcome(http1._parse_fields, section, 400)
    assert new == _outcome(before._parse_fields, section.split(b"\r\n"), 400)


def test_too_many_fields_is_still_the_first_thing_said():
    head = b"GET / HTTP/1.1\r\n" + b"\r\n".join([b"X-A: 1"] * 100 + [b" bad"])
    assert _outcome(http1.parse_request_head, head) == ("error", 431, "too many header fields")
    assert _outcome(before.parse_request_head, head) == _outcome(http1.parse_request_head, head)
    ok = b"GET / HTTP/1.1\r\nHost: a\r\n" + b"\r\n".join([b"X-A: 1"] * 99)
    assert len(http1.parse_request_head(ok).headers) == 100


_FRAMING = st.lists(st.tuples(st.sampled_from([b"Content-Length", b"content-length",
                                               b"Transfer-Encoding", b"transfer-encoding",
                                               b"Connection", b"Host"]),
                              st.sampled_from(_VALUES)), max_size=4)


def _framer(framer):
    return (framer.kind, framer.remaining, framer.strict, framer.status)


@settings(max_examples=400, deadline=None)
@given(_FRAMING, st.sampled_from([b"HTTP/1.1", b"HTTP/1.0"]))
def test_request_framing_is_decided_as_before(fields, version):
    head = http1.RequestHead(b"POST", b"/", version, Headers(fields))
    new = _outcome(lambda: _framer(RequestReader._framing(head)))
    head = http1.RequestHead(b"POST", b"/", version, Headers(fields))
    assert new == _outcome(lambda: _framer(before.request_framing(head)))


@settings(max_examples=400, deadline=None)
@given(_FRAMING, st.sampled_from([200, 204, 304, 404]), st.sampled_from([b"GET", b"HEAD"]),
       st.sampled_from([b"HTTP/1.1", b"HTTP/1.0"]))
def test_response_framing_is_decided_as_before(fields, status, method, version):
    head = b"%s %d X\r\n" % (version, status) + b"".join(b"%s: %s\r\n" % f for f in fields) + b"\r\n"
    reader = ResponseReader()
    reader.start(method)
    try:
        reader.receive(head)
        state = reader.state
        new = (reader.must_close, state)
    except HttpError as err:
        new = ("error", err.status, err.reason)
    try:
        kind, length, must_close = before.response_framing(
            method, http1.parse_response_head(head[:-4]))
        old = (must_close, "idle" if kind == "none" or (kind == "length" and length == 0) else "body")
    except HttpError as err:
        old = ("error", err.status, err.reason)
    assert new == old


_OPS = st.lists(st.tuples(st.sampled_from(["add", "set", "remove", "replace", "tokens"]),
                          st.sampled_from([b"Connection", b"connection", b"Upgrade", b"X-A"]),
                          st.sampled_from(_VALUES)), max_size=10)


@settings(max_examples=200, deadline=None)
@given(_OPS)
def test_remembered_tokens_never_go_stale(ops):
    """``tokens`` equals the plain computation after any edits, and a caller that changes
    the list it got changes nothing."""
    h = Headers([(b"Connection", b"keep-alive")])
    for op, name, value in ops:
        got = h.tokens(b"connection")
        got.append(b"junk")
        if op == "add":
            h.add(name, value)
        elif op == "set":
            h.set(name, value)
        elif op == "remove":
            h.remove(name)
        elif op == "replace":
            h.replace_all(list(h) + [(name, value)])
        for probe in (b"connection", b"Upgrade", b"x-a"):
            assert h.tokens(probe) == before.tokens(h, probe)


_APP = AppInfo("hello", "http://127.0.0.1:8080", public_addr="hello.example.test",
               rewrite_headers=(("X-Webauth-User", "{{internal.logins}}"),))


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(_NAMES), st.sampled_from(_VALUES)), max_size=10),
       st.booleans())
def test_client_headers_are_rewritten_in_one_pass_as_in_three(fields, looked_up):
    head = http1.RequestHead(b"GET", b"/", b"HTTP/1.1", Headers(fields))
    if looked_up:
        head.headers.get(b"host")  # lower-cased names already built, or not
    ours = [(b"Connection", b"Upgrade"), (b"X-Forwarded-For", b"10.0.0.1"),
            (b"Teleport-Jwt-Assertion", b"t")]
    new = forwarded_client_headers(head.headers, identity_names("Teleport-Jwt-Assertion",
                                                                 ["X-Webauth-User"]), b"127.0.0.1:8080", ours)
    old = before.forwarded_client_headers(head, _APP, "Teleport-Jwt-Assertion", ours)
    assert new.items() == old.items()
    assert _lowered_in_step(new)
    assert Headers(fields) == head.headers   # the client's head is left as it was


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(_NAMES), st.sampled_from(_VALUES)), max_size=10))
def test_client_headers_alone_are_as_before(fields):
    identity = identity_names("Teleport-Jwt-Assertion", ["X-Webauth-User"])
    assert (client_headers(Headers(fields), identity).items()
            == before.client_headers(Headers(fields), identity).items())


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.sampled_from(_NAMES), st.binary(max_size=80)).map(bytes.lower),
       st.sampled_from([frozenset(), frozenset([b"x-a", b"te"])]),
       st.sampled_from([("Teleport-Jwt-Assertion", ()), ("X-Id", ("X-Webauth-User", "a.b_c"))]))
def test_remembered_drop_answers_are_the_rule(lname, named, names):
    """The remembered answer is the rule's, for short and long names, whatever came before."""
    identity = identity_names(*names)
    for _ in range(2):
        assert client_header_dropped(lname, identity, named) == before.client_header_dropped(
            lname, identity, named)
    long = lname + b"-" * MAX_CACHED_NAME
    assert client_header_dropped(long, identity, named) == before.client_header_dropped(
        long, identity, named)


_LINE_BYTES = st.lists(st.sampled_from([b"GET", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/1.", b"1", b"0",
                                        b"/", b" ", b"\t", b"200", b"99", b"OK", b"\x00", b"\x7f",
                                        b"\x80", b"@", b"HTTP/2.0"]), max_size=7).map(b"".join)


@settings(max_examples=500, deadline=None)
@given(_LINE_BYTES)
def test_start_lines_are_judged_as_before(first):
    """The one-pass start-line patterns accept what the step-by-step checks accepted."""
    for parse, old, fields in ((http1.parse_request_head, before.parse_request_head, b"\r\nHost: a"),
                               (http1.parse_response_head, before.parse_response_head, b"")):
        assert _outcome(parse, first + fields) == _outcome(old, first + fields)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(_NAMES), st.sampled_from(_VALUES)), max_size=10))
def test_heads_go_on_the_wire_as_before(fields):
    head = http1.RequestHead(b"GET", b"/x", b"HTTP/1.1", Headers(fields))
    assert head.to_bytes() == before.head_bytes(head)
    resp = http1.ResponseHead(b"HTTP/1.1", 200, b"OK", Headers(fields))
    assert resp.to_bytes() == b"HTTP/1.1 200 OK\r\n" + before.head_bytes(head).partition(b"\r\n")[2]


def test_request_ids_are_random_hex_across_refills_and_fresh_after_a_fork():
    """16 lower-case hex digits, as ``secrets.token_hex(8)`` gave; all distinct across
    several buffer refills; every byte read is used once; ``forget`` (a forked child)
    never reuses what the parent had buffered."""
    reads = []

    def read(n):
        data = os.urandom(n)
        reads.append(data)
        return data

    ids = RandomIds(read)
    got = [ids.next() for _ in range(3 * RandomIds.CHUNK // 8 + 5)]
    assert all(len(i) == 16 and set(i) <= set("0123456789abcdef") for i in got)
    assert len(set(got)) == len(got)
    assert len(reads) == 4 and "".join(got[:3 * RandomIds.CHUNK // 8]) == b"".join(reads[:3]).hex()
    ids.forget()
    after = ids.next()
    assert len(reads) == 5 and after == reads[4][:8].hex()
    assert new_request_id() != new_request_id()
