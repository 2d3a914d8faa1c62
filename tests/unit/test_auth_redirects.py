"""safe_path: post-login return targets never leave the origin."""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from apptunnel.auth.redirects import safe_path

HOSTILE = [
    None,
    "",
    "//evil.example",
    "//evil.example/path",
    "///evil.example",
    "/\\evil.example",
    "\\\\evil.example",
    "/\\/evil.example",
    "%2F%2Fevil.example",
    "/%2F/evil.example",
    "/%2fevil.example",
    "/%5Cevil.example",
    "/%5cevil.example",
    "/%252F%252Fevil.example",
    "/%25252F%25252Fevil.example",
    "/%2525252F%2525252Fevil.example",
    "javascript:alert(1)",
    "JaVaScRiPt:alert(1)",
    " javascript:alert(1)",
    "data:text/html,<script>alert(1)</script>",
    "https://evil.example/",
    "http:evil.example",
    "evil.example",
    "relative/path",
    "./x",
    "../x",
    "?next=/x",
    "#frag",
    "/\t/evil.example",
    "/\n/evil.example",
    "/\r\nSet-Cookie: a=b",
    "/%0d%0aSet-Cookie:%20a=b",
    "/%09/evil.example",
    "/%00",
    " /x",
    "/x ",
    "/\u0000x",
    "/\u200b/evil.example",
    "/\u2028x",
    "/\u00a0x",
    "/\u3000/evil.example",
    "/" + "a" * 5000,
]


@pytest.mark.parametrize("target", HOSTILE)
def test_hostile_targets_become_root(target):
    """Every open-redirect trick in the table is replaced by "/"."""
    assert safe_path(target) == "/"


SAFE = [
    ("/", "/"),
    ("/d/home", "/d/home"),
    ("/d/home?orgId=1&from=now-6h#panel-2", "/d/home?orgId=1&from=now-6h#panel-2"),
    ("/search?q=a%20b", "/search?q=a%20b"),
    ("/x?next=//evil.example", "/x?next=//evil.example"),
    ("/a//b", "/a//b"),
    ("/a%2F%2Fb", "/a%2F%2Fb"),
    ("/javascript:alert(1)", "/javascript:alert(1)"),
    ("/@evil.example", "/@evil.example"),
    ("/caf\u00e9", "/caf%C3%A9"),
    ("/%ff", "/%ff"),
]


@pytest.mark.parametrize("target,expected", SAFE)
def test_same_origin_paths_are_kept(target, expected):
    """Ordinary same-origin paths survive (non-ASCII percent-encoded)."""
    assert safe_path(target) == expected


def assert_safe(out: str) -> None:
    assert out.startswith("/")
    assert not out.startswith("//") and not out.startswith("/\\")
    parts = urlsplit(out)
    assert not parts.scheme and not parts.netloc
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in out)
    once = unquote(out)
    assert not once.startswith("//") and not once.startswith("/\\")


url_chars = st.sampled_from(list("/\\%:.@?#&=-_~aZ09 \t\n\r") + ["%2F", "%2f", "%5C", "%25",
                                                                  "%09", "%00", "//"])
url_like = st.lists(url_chars, max_size=20).map("".join)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=40), url_like, url_like.map(lambda s: "/" + s)))
@example("/%2F%2Fevil")
@example("/%252F/evil")
def test_output_is_always_same_origin(target):
    """For any input, the output is a same-origin path even after one more decoding."""
    out = safe_path(target)
    assert_safe(out)


@settings(max_examples=100, deadline=None)
@given(url_like.map(lambda s: "/" + s))
def test_output_is_input_or_root(target):
    """safe_path never invents a path: it returns the (encoded) input or "/"."""
    assert safe_path(target) in (target, "/")
