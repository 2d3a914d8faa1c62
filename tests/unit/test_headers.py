"""Pure header rules of the app edge (proxy/headers.py) and the shared origin check."""

from __future__ import annotations

import pytest

from apptunnel.auth.origins import own_origins, same_origin
from apptunnel.proxy.headers import (
    client_headers,
    cookie_has_domain,
    identity_names,
    local_port_cross_site,
    squash,
    valid_host,
)
from apptunnel.proxy.http1 import Headers


@pytest.mark.parametrize("raw", [b"apptunnel.localhost", b"grafana.apptunnel.localhost:3080", b"x", b"X.Example.COM.",
                                 b"127.0.0.1", b"127.0.0.1:8080", b"[::1]", b"[::1]:443", b"[2001:db8::1]:65535",
                                 b"a-b.c-d.example"])
def test_valid_hosts(raw):
    """DNS names and IP literals, with an optional numeric port, are valid Hosts."""
    assert valid_host(raw)


@pytest.mark.parametrize("raw", [None, b"", b"echo.apptunnel.localhost:@evil.com", b"a@b", b"a:b", b"a:", b"a:0",
                                 b"a:65536", b"a:123456", b"a b", b"a/b", b"a\\b", b"-a.example", b"a-.example",
                                 b"a..b", b".a", b"[::1", b"[zz::1]", b"[::1]x", b"::1", b"a_b.example", b"\xc3\xa9.example",
                                 b"a" * 64 + b".example", b"a%2e.example"])
def test_invalid_hosts(raw):
    """Userinfo, paths, bad ports, bad labels and broken IPv6 literals are not Hosts."""
    assert not valid_host(raw)


def test_identity_names_fold_case_dashes_underscores_and_dots():
    """The JWT header, the peers' and the rewrite names match in every folded spelling."""
    names = identity_names("Apptunnel-Jwt-Assertion", ["X-Webauth-User"])
    for spelling in (b"apptunnel-jwt-assertion", b"apptunnel_jwt_assertion", b"apptunnel.jwt.assertion",
                     b"apptunneljwtassertion", b"teleport-jwt-assertion", b"x-pomerium-jwt-assertion",
                     b"cf-access-jwt-assertion", b"x-webauth-user", b"x.webauth.user", b"xwebauthuser"):
        assert squash(spelling) in names
    assert squash(b"x-webauth-users") not in names


def test_client_headers_keep_the_rest_in_order():
    """Ordinary headers pass in order; identity, hop-by-hop and forwarding headers go."""
    headers = Headers([(b"Host", b"a"), (b"Accept", b"*/*"), (b"X.Webauth.User", b"admin"),
                       (b"Connection", b"keep-alive, X-Gone, Host"), (b"X-Gone", b"1"), (b"TE", b"trailers"),
                       (b"Trailer", b"X"), (b"X-Forwarded-Host", b"evil"), (b"Cookie", b"a=1")])
    out = client_headers(headers, identity_names("Apptunnel-Jwt-Assertion", ["X-Webauth-User"]))
    assert out.items() == [(b"Host", b"a"), (b"Accept", b"*/*"), (b"Cookie", b"a=1")]


@pytest.mark.parametrize("value, has", [
    (b"a=1; Path=/", False),
    (b"a=1; Path=/; Secure; HttpOnly; SameSite=Lax", False),
    (b"a=1; Domain=example.com", True),
    (b"a=1; path=/; domain=.apptunnel.localhost", True),
    (b"a=1;DOMAIN = x", True),
    (b"domain=1; Path=/", False),  # a cookie named domain is not the attribute
])
def test_cookie_domain_attribute(value, has):
    """Any Domain attribute, in any case and spacing, makes a cookie more than host-only."""
    assert cookie_has_domain(value) is has


@pytest.mark.parametrize("headers, refused", [
    ([], False),
    ([(b"Origin", b"http://127.0.0.1:8080")], False),
    ([(b"Origin", b"http://localhost")], False),
    ([(b"Origin", b"http://[::1]:3000"), (b"Sec-Fetch-Site", b"same-site")], False),
    ([(b"Origin", b"https://grafana.apptunnel.localhost")], False),
    ([(b"Sec-Fetch-Site", b"same-origin")], False),
    ([(b"Sec-Fetch-Site", b"none")], False),
    ([(b"Sec-Fetch-Site", b"cross-site")], True),
    ([(b"Sec-Fetch-Site", b"Cross-Site")], True),
    ([(b"Origin", b"null")], True),
    ([(b"Origin", b"https://127.0.0.1:8080")], True),
    ([(b"Origin", b"http://127.0.0.1.evil.example")], True),
    ([(b"Origin", b"http://localhost:8080@evil.example")], True),
    ([(b"Origin", b"https://evil.example"), (b"Sec-Fetch-Site", b"same-origin")], True),
])
def test_local_port_cross_site(headers, refused):
    """Cross-site by Sec-Fetch-Site or by a non-loopback, non-app Origin is refused."""
    why = local_port_cross_site(Headers(headers), "https://grafana.apptunnel.localhost")
    assert (why is not None) is refused


def test_same_origin_prefers_origin_then_referer():
    """Origin decides when sent; else Referer's origin; neither gives None."""
    allowed = own_origins("Apptunnel.localhost", 3080)
    assert same_origin("https://apptunnel.localhost:3080", "https://evil.example/", allowed) is True
    assert same_origin("https://evil.example", "https://apptunnel.localhost:3080/x", allowed) is False
    assert same_origin(None, "https://apptunnel.localhost:3080/web", allowed) is True
    assert same_origin(None, "https://apptunnel.localhost/web", allowed) is False
    assert same_origin(None, "not a url", allowed) is False
    assert same_origin(None, None, allowed) is None
    assert own_origins("a.example", 443) == {"https://a.example", "https://a.example:443"}


def test_valid_host_answers_the_same_when_asked_again_and_its_memory_is_bounded():
    from apptunnel.proxy.headers import _valid_host_cached
    hostile = [b"a.example:@evil.com", b"a.example/x", b"[::1", b"a.example:0", b"a.example:65536",
               b"user@a.example", b"a" * 255, b"a" * 5000, b"\xff.example", b"a.example:443"]
    first = [valid_host(h) for h in hostile]
    assert [valid_host(h) for h in hostile] == first
    assert first == [False, False, False, False, False, False, False, False, False, True]
    for n in range(1000):                       # a client cycling Host values
        valid_host(b"h%d.example" % n)
    assert _valid_host_cached.cache_info().currsize <= 256
