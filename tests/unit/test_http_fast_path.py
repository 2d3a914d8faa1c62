"""The fast paths of the request path's head code give what its step-by-step paths give.

Issue 14's HTTP levers put a shortcut in front of several checks: one regex over a field
section (``_FIELD_SECTION``) and one per start line (``_REQUEST_LINE``, ``_STATUS_LINE``),
framing skipped for a request without Content-Length or Transfer-Encoding, one plain
Content-Length read without the loop, ``Headers.tokens`` remembered until a change, the
client header rewrite in one pass, the drop rule's answers remembered. The step-by-step
paths are still in the tree (``http1._parse_field_lines``, ``_request_line``,
``_status_line``, the ``_content_length`` loop, ``_is_chunked``, ``headers.client_headers``
and ``app_heads.strip_proxy_cookies``, ``headers._dropped_by_name``): these properties
hold each shortcut to them, errors (status and reason) included.
"""

from __future__ import annotations

import os
import re
from unittest import mock

from hypothesis import given, settings
from hypothesis import strategies as st

from apptunnel.auth.sessions import PROXY_COOKIE_PREFIX
from apptunnel.proxy import http1
from apptunnel.proxy.app_connection import RandomIds, new_request_id
from apptunnel.proxy.app_heads import forwarded_client_headers, strip_proxy_cookies
from apptunnel.proxy.headers import (
    MAX_CACHED_NAME,
    _dropped_by_name,
    client_header_dropped,
    client_headers,
    connection_named,
    identity_names,
)
from apptunnel.proxy.http1 import MAX_HEADERS, Headers, HttpError, RequestReader

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
              st.one_of(st.sampled_from([b"200", b"204", b"304", b"101", b"100", b"099", b"000", b"20",
                                         b"2000", b"2a0", b""]),
                        st.from_regex(rb"\A[0-9]{1,4}\Z")),
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
    return headers.lowered_items() == [(n.lower(), (n, v)) for n, v in headers]


# A pattern that matches nothing: with it in place of the one-pass patterns, the parsers
# take their step-by-step paths for every line and section.
_NEVER = re.compile(rb"(?!)")


def _step_by_step(parse, head):
    with mock.patch.multiple(http1, _REQUEST_LINE=_NEVER, _STATUS_LINE=_NEVER,
                             _FIELD_SECTION=_NEVER):
        return _outcome(parse, head)


@settings(max_examples=400, deadline=None)
@given(_heads(_REQUEST_LINES))
def test_request_heads_parse_as_step_by_step(head):
    new = _outcome(http1.parse_request_head, head)
    assert new == _step_by_step(http1.parse_request_head, head)
    if not isinstance(new, tuple):
        assert _lowered_in_step(new.headers)


@settings(max_examples=400, deadline=None)
@given(_heads(_STATUS_LINES))
def test_response_heads_parse_as_step_by_step(head):
    new = _outcome(http1.parse_response_head, head)
    assert new == _step_by_step(http1.parse_response_head, head)
    if not isinstance(new, tuple):
        assert _lowered_in_step(new.headers)


def _no_bare_cr_lf(section: bytes) -> bool:
    crlfs = section.count(b"\r\n")
    return section.count(b"\r") == crlfs and section.count(b"\n") == crlfs


def _fields_step_by_step(section: bytes, status: int):
    """What ``_parse_fields`` says without its one-regex pass: too many fields first, then
    the line-by-line loop."""
    if section.count(b"\r\n") >= MAX_HEADERS:
        return ("error", 431 if status == 400 else status, "too many header fields")
    return _outcome(http1._parse_field_lines, section.split(b"\r\n"), status)


def _judged_alike(section: bytes, status: int) -> None:
    new = _outcome(http1._parse_fields, section, status)
    old = _fields_step_by_step(section, status)
    assert new == old
    if not isinstance(new, tuple):
        assert new.lowered_items() == old.lowered_items()


@settings(max_examples=400, deadline=None)
@given(st.lists(st.one_of(_field(), st.binary(max_size=20)), min_size=1, max_size=4)
       .map(b"\r\n".join).filter(_no_bare_cr_lf), st.sampled_from([400, 502]))
def test_any_field_section_is_judged_as_line_by_line(section, status):
    """What the one-regex pass accepts is exactly what the line-by-line loop accepts, with
    the same items and lower-cased names; what it refuses, the loop refuses for the same
    status and reason."""
    _judged_alike(section, status)


@settings(max_examples=100, deadline=None)
@given(st.integers(MAX_HEADERS - 3, MAX_HEADERS + 2),
       st.sampled_from([b"X-A: 1", b" bad", b"bad", b"X-B: \x00"]), st.sampled_from([400, 502]))
def test_too_many_fields_is_still_the_first_thing_said(n, last, status):
    _judged_alike(b"\r\n".join([b"X-A: 1"] * n + [last]), status)


def test_too_many_fields_in_a_request_head():
    head = b"GET / HTTP/1.1\r\n" + b"\r\n".join([b"X-A: 1"] * 100 + [b" bad"])
    assert _outcome(http1.parse_request_head, head) == ("error", 431, "too many header fields")
    ok = b"GET / HTTP/1.1\r\nHost: a\r\n" + b"\r\n".join([b"X-A: 1"] * 99)
    assert len(http1.parse_request_head(ok).headers) == 100


_LINE_BYTES = st.lists(st.sampled_from([b"GET", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/1.", b"1", b"0",
                                        b"/", b" ", b"\t", b"200", b"99", b"OK", b"\x00", b"\x7f",
                                        b"\x80", b"@", b"HTTP/2.0"]), max_size=7).map(b"".join)
_FIRST_LINES = st.one_of(_LINE_BYTES, _REQUEST_LINES.map(lambda b: b.partition(b"\r\n")[0]),
                         _STATUS_LINES.map(lambda b: b.partition(b"\r\n")[0]))


@settings(max_examples=500, deadline=None)
@given(_FIRST_LINES)
def test_request_line_pattern_accepts_what_the_steps_accept(first):
    """``_REQUEST_LINE`` matches exactly the lines ``_request_line`` accepts, with the same
    (method, target, version); so ``parse_request_head`` reads a start line as the steps do."""
    line = http1._REQUEST_LINE.fullmatch(first)
    steps = _outcome(http1._request_line, first)
    if line is None:
        assert isinstance(steps, tuple) and steps[0] == "error"
    else:
        assert steps == line.groups()
    head = first + b"\r\nHost: a"
    assert _outcome(http1.parse_request_head, head) == _step_by_step(http1.parse_request_head, head)


@settings(max_examples=500, deadline=None)
@given(_FIRST_LINES)
def test_status_line_pattern_accepts_what_the_steps_accept(first):
    """``_STATUS_LINE`` matches every line ``_status_line`` accepts, with the same (version,
    status, reason); what it matches and the steps refuse is a status under 100, which the
    fast path refuses the same way; what it does not match, the steps refuse."""
    line = http1._STATUS_LINE.fullmatch(first)
    steps = _outcome(http1._status_line, first)
    if line is None:
        assert steps[0] == "error"
    elif int(line.group(2)) < 100:
        assert steps == ("error", 502, "invalid status code")
    else:
        assert steps == (line.group(1), int(line.group(2)), line.group(3) or b"")
    assert _outcome(http1.parse_response_head, first) == _step_by_step(http1.parse_response_head, first)


_FRAMING = st.lists(st.tuples(st.sampled_from([b"Content-Length", b"content-length",
                                               b"Transfer-Encoding", b"transfer-encoding",
                                               b"Connection", b"Host"]),
                              st.sampled_from(_VALUES + [b"0", b"0, 0", b"00"])), max_size=4)


@settings(max_examples=400, deadline=None)
@given(_FRAMING, st.sampled_from([b"HTTP/1.1", b"HTTP/1.0"]))
def test_request_framing_shortcut_is_what_the_full_checks_say(fields, version):
    """A request is framed "none" (no body) exactly when ``_is_chunked`` and
    ``_content_length`` find no chunked coding and no length; what they refuse, ``_framing``
    refuses for the same reason, whether or not its shortcut was taken."""
    head = http1.RequestHead(b"POST", b"/", version, Headers(fields))
    new = _outcome(RequestReader._framing, head)
    head = http1.RequestHead(b"POST", b"/", version, Headers(fields))
    try:
        chunked = http1._is_chunked(head.headers, 400, request=True)
        length = http1._content_length(head.headers, 400)
    except HttpError as err:
        assert new == ("error", err.status, err.reason)
        return
    if chunked is None and length is None:  # what the shortcut stands for
        assert not isinstance(new, tuple) and (new.kind, new.remaining) == ("none", 0)
    elif chunked is not None or length:
        assert isinstance(new, tuple) or new.kind != "none"
    else:  # Content-Length 0: no body, if it is spelled plainly
        assert new == ("error", 400, "Content-Length must be one plain number") or (
            new.kind, new.remaining) == ("none", 0)


_CL_VALUES = st.lists(st.one_of(st.sampled_from(_VALUES),
                                st.integers(0, 10**20).map(lambda n: b"%d" % n),
                                st.integers(0, 99).map(lambda n: b"%02d" % n)),
                      min_size=1, max_size=3)


@settings(max_examples=400, deadline=None)
@given(_CL_VALUES, st.sampled_from([400, 502]))
def test_one_plain_content_length_is_read_as_the_loop_reads_it(values, status):
    """``_content_length`` of some values equals the loop's answer: the same values
    twice over in one field always go through the loop (a comma is never one plain
    number), and the loop's answer does not change when the values repeat."""
    fields = [(b"Content-Length", v) for v in values]
    looped = [(b"Content-Length", b",".join(values + values))]
    assert (_outcome(http1._content_length, Headers(fields), status)
            == _outcome(http1._content_length, Headers(looped), status))


_OPS = st.lists(st.tuples(st.sampled_from(["add", "set", "remove", "replace", "tokens"]),
                          st.sampled_from([b"Connection", b"connection", b"Upgrade", b"X-A"]),
                          st.sampled_from(_VALUES)), max_size=10)


def _plain_tokens(headers: Headers, name: bytes) -> list[bytes]:
    parts = [p.strip(b" \t").lower() for v in headers.get_all(name) for p in v.split(b",")]
    return [p for p in parts if p]


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
            assert h.tokens(probe) == _plain_tokens(h, probe)


_IDENTITY = identity_names("Teleport-Jwt-Assertion", ["X-Webauth-User"])
# Connection fields that name others (hop-by-hop by request), framing and Host among them.
_CONNECTION = st.lists(st.sampled_from([b"X-A", b"cookie", b"Accept", b"host", b"Content-Length",
                                        b"close", b"Upgrade", b"x-forwarded-for"]),
                       max_size=3).map(b", ".join)
_CLIENT_FIELDS = st.lists(st.one_of(st.tuples(st.sampled_from(_NAMES), st.sampled_from(_VALUES)),
                                    st.tuples(st.just(b"Connection"), _CONNECTION)), max_size=10)


@settings(max_examples=400, deadline=None)
@given(_CLIENT_FIELDS, st.booleans())
def test_client_headers_are_rewritten_in_one_pass_as_in_three(fields, looked_up):
    head = http1.RequestHead(b"GET", b"/", b"HTTP/1.1", Headers(fields))
    if looked_up:
        head.headers.get(b"host")  # lower-cased names already built, or not
    ours = [(b"Connection", b"Upgrade"), (b"X-Forwarded-For", b"10.0.0.1"),
            (b"Teleport-Jwt-Assertion", b"t")]
    new = forwarded_client_headers(head.headers, _IDENTITY, b"127.0.0.1:8080", ours)
    old = client_headers(Headers(fields), _IDENTITY)
    strip_proxy_cookies(old)
    old.set(b"Host", b"127.0.0.1:8080")
    for name, value in ours:
        old.add(name, value)
    assert new.items() == old.items()
    assert _lowered_in_step(new)
    assert Headers(fields) == head.headers   # the client's head is left as it was


@settings(max_examples=200, deadline=None)
@given(_CLIENT_FIELDS, st.booleans())
def test_client_headers_keep_what_the_rule_keeps(fields, looked_up):
    headers = Headers(fields)
    if looked_up:
        headers.get(b"host")
    named = connection_named(Headers(fields))
    expected = [(n, v) for n, v in fields
                if not (n.lower() in named or _dropped_by_name(n.lower(), _IDENTITY))]
    assert client_headers(headers, _IDENTITY).items() == expected


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.sampled_from(_NAMES), st.binary(max_size=80)).map(bytes.lower),
       st.sampled_from([frozenset(), frozenset([b"x-a", b"te"])]),
       st.sampled_from([("Teleport-Jwt-Assertion", ()), ("X-Id", ("X-Webauth-User", "a.b_c"))]))
def test_remembered_drop_answers_are_the_rule(lname, named, names):
    """The remembered answer is the rule's, for short and long names, whatever came before."""
    identity = identity_names(*names)
    for _ in range(2):
        assert client_header_dropped(lname, identity, named) == (
            lname in named or _dropped_by_name(lname, identity))
    long = lname + b"-" * MAX_CACHED_NAME
    assert client_header_dropped(long, identity, named) == (
        long in named or _dropped_by_name(long, identity))


@settings(max_examples=200, deadline=None)
@given(_CLIENT_FIELDS)
def test_heads_go_on_the_wire_as_joined(fields):
    lines = b"".join(name + b": " + value + b"\r\n" for name, value in fields) + b"\r\n"
    head = http1.RequestHead(b"GET", b"/x", b"HTTP/1.1", Headers(fields))
    assert head.to_bytes() == b"GET /x HTTP/1.1\r\n" + lines
    resp = http1.ResponseHead(b"HTTP/1.1", 200, b"OK", Headers(fields))
    assert resp.to_bytes() == b"HTTP/1.1 200 OK\r\n" + lines


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
