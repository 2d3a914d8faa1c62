"""Connection limits against the installed proxy: silent and half-open TLS clients.

The proxy runs with small limits (handshake 2 s, 40 connections, 20 per address), so an
attacker needs only a few dozen sockets to reach them. Every socket and wait is bounded.
Loopback has a whole /8, so sockets bound to 127.0.0.2 and 127.0.0.3 are other clients.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import time

import pytest
import requests
import yaml

from tests.support.cluster import Cluster
from tests.support.localhost import localhost_resolution

HANDSHAKE = 2.0
MAX_CONNECTIONS = 40
PER_IP = 20
SLACK = 3.0      # for a loaded 2-core machine


@pytest.fixture(scope="module")
def cluster():
    c = Cluster([])
    config = yaml.safe_load(c.proxy_config.read_text())
    config["limits"] = {"handshake_timeout": f"{HANDSHAKE}s", "max_connections": MAX_CONNECTIONS,
                        "max_connections_per_ip": PER_IP}
    # No agent here; a long keepalive shows the tunnel port's own deadline, not the dead-peer timer.
    config["keepalive"] = {"interval": "5s", "timeout": "15s"}
    c.proxy_config.write_text(yaml.safe_dump(config))
    try:
        c.start_proxy()
        yield c
    finally:
        c.stop()


def client_hello() -> bytes:
    """The first flight of a real TLS client, as bytes."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(incoming, outgoing,
                                                server_hostname="apptunnel.localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


@contextlib.contextmanager
def raw_sockets(port: int, count: int, payload: bytes = b"", source: str = "127.0.0.1"):
    """`count` TCP connections that send `payload` (maybe nothing) and then stay silent."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.settimeout(5)
            s.bind((source, 0))
            s.connect(("127.0.0.1", port))
            if payload:
                s.sendall(payload)
            socks.append(s)
        yield socks
    finally:
        for s in socks:
            s.close()


def closed_by_peer(s: socket.socket, within: float) -> bool:
    """Whether the proxy ended this connection (EOF or reset) within `within` seconds."""
    s.settimeout(max(0.01, within))
    deadline = time.monotonic() + within
    try:
        while True:
            data = s.recv(65536)   # a TLS alert may come before the EOF
            if not data:
                return True
            if time.monotonic() > deadline:
                return False
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def all_closed(socks, within: float) -> list[int]:
    """Indexes of the sockets still open after `within` seconds (from now) in total."""
    deadline = time.monotonic() + within
    return [i for i, s in enumerate(socks)
            if not closed_by_peer(s, max(0.01, deadline - time.monotonic()))]


def healthz(cluster: Cluster) -> int:
    with localhost_resolution():
        return requests.get(cluster.url(path="/healthz"), verify=cluster.ca_file, timeout=5).status_code


def test_silent_and_half_open_tls_clients_are_closed_at_the_handshake_deadline(cluster):
    """Nothing sent, half a ClientHello, or a whole one then silence: all aborted at the deadline."""
    hello = client_hello()
    with raw_sockets(cluster.web_port, 5) as silent, \
            raw_sockets(cluster.web_port, 5, hello[: len(hello) // 2], "127.0.0.2") as partial, \
            raw_sockets(cluster.web_port, 5, hello, "127.0.0.3") as stalled:
        started = time.monotonic()
        assert healthz(cluster) == 200
        still_open = all_closed(silent + partial + stalled, HANDSHAKE + SLACK)
        assert still_open == [], f"open after {time.monotonic() - started:.1f}s: {still_open}"


def test_new_client_is_served_while_one_address_holds_idle_sockets(cluster):
    """At the per-address cap the oldest idle sockets are shed and a new HTTPS client is served."""
    with raw_sockets(cluster.web_port, PER_IP + 10) as socks:
        for _ in range(3):
            assert healthz(cluster) == 200
        # Shed at once for the newcomers, long before the handshake deadline.
        assert all_closed(socks[:10], HANDSHAKE / 2) == []


def test_new_client_is_served_at_the_total_cap(cluster):
    """Idle sockets from other addresses filling the total cap are shed for a new client."""
    with raw_sockets(cluster.web_port, PER_IP, source="127.0.0.2") as a, \
            raw_sockets(cluster.web_port, PER_IP, source="127.0.0.3") as b:
        assert healthz(cluster) == 200
        assert all_closed(a[:1], HANDSHAKE / 2) == []
        assert healthz(cluster) == 200


def test_tunnel_port_closes_silent_clients_at_the_handshake_deadline(cluster):
    """The agents' port has the same deadline: a silent TLS client there is aborted too."""
    hello = client_hello()
    with raw_sockets(cluster.tunnel_port, 3) as silent, \
            raw_sockets(cluster.tunnel_port, 3, hello) as stalled:
        assert all_closed(silent + stalled, HANDSHAKE + SLACK) == []


def test_tunnel_port_sheds_idle_sockets_at_the_per_address_cap(cluster):
    """The agents' port counts against the same caps: surplus idle sockets are shed at once."""
    with raw_sockets(cluster.tunnel_port, PER_IP + 5, source="127.0.0.4") as socks:
        assert all_closed(socks[:5], HANDSHAKE / 2) == []
