"""Address helpers: loopback mapping of *.localhost and host:port parsing."""

import pytest
from hypothesis import given, settings, strategies as st

from apptunnel.net import host_only, is_ip, loopback_host, split_host_port


@pytest.mark.parametrize("host", ["localhost", "LOCALHOST", "grafana.apptunnel.localhost",
                                  "a.localhost."])
def test_localhost_names_map_to_loopback(host):
    """localhost and any *.localhost become 127.0.0.1."""
    assert loopback_host(host) == "127.0.0.1"


@pytest.mark.parametrize("host", ["example.com", "10.0.0.1", "::1", "notlocalhost", "localhost.com"])
def test_other_hosts_unchanged(host):
    """Hosts outside .localhost are returned exactly as given."""
    assert loopback_host(host) == host


@pytest.mark.parametrize("addr, default, expected", [
    ("example.com:443", None, ("example.com", 443)),
    ("127.0.0.1:3024", None, ("127.0.0.1", 3024)),
    ("[::1]:443", None, ("::1", 443)),
    ("[::1]", 8443, ("::1", 8443)),
    ("host", 443, ("host", 443)),
    (" host:1 ", None, ("host", 1)),
])
def test_split_valid(addr, default, expected):
    """host:port, [v6]:port and bare hosts with a default port parse."""
    assert split_host_port(addr, default) == expected


@pytest.mark.parametrize("addr, default, message", [
    ("", None, "expected host:port"),
    ("host", None, "missing port"),
    (":443", None, "missing host"),
    ("host:abc", None, "port must be a number"),
    ("host:0", None, "out of range"),
    ("host:65536", None, "out of range"),
    ("::1:443", None, "need brackets"),
    ("[::1:443", None, "missing ']'"),
    ("[::1]x443", None, "unexpected text"),
    ("[host]:443", None, "only for IPv6"),
    ("host:", None, "port must be a number"),
    ("host:٣", None, "port must be a number"),
])
def test_split_errors_are_clear(addr, default, message):
    """Each malformed address gives a ValueError naming the problem."""
    with pytest.raises(ValueError, match=message):
        split_host_port(addr, default)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40), st.one_of(st.none(), st.integers(1, 65535)))
def test_split_never_raises_anything_but_valueerror(addr, default):
    """Arbitrary text parses to a valid port or raises ValueError, never something else."""
    try:
        host, port = split_host_port(addr, default)
    except ValueError:
        return
    assert host and 0 < port < 65536


def test_host_only_handles_ipv6_and_ports():
    """host_only strips ports, also after bracketed IPv6 literals."""
    assert host_only("[::1]:8080") == "[::1]"
    assert host_only("Example.COM:1") == "example.com"
    assert host_only("example.com") == "example.com"
    assert host_only("example.com.:443") == "example.com"


@pytest.mark.parametrize("host, version, expected", [
    ("127.0.0.1", None, True), ("::1", None, True), ("::1", 6, True), ("::1", 4, False),
    ("10.0.0.1", 6, False), ("[::1]", None, False), ("example.com", None, False),
    ("1.2.3", None, False), ("", None, False), ("localhost", None, False),
])
def test_is_ip_tells_literals_from_names(host, version, expected):
    """is_ip: bare IP literals (of the asked version) only; names and brackets are not."""
    assert is_ip(host, version) is expected
