"""Small address helpers shared by the proxy, the agent, the CLI and the local proxies.

One place for what a host is: ``host_only`` (a Host header or address without its port),
``is_ip`` (an IP literal, not a name), ``split_host_port``, ``loopback_host``.

``*.localhost`` is loopback by RFC 6761, but the system resolver of a plain Debian machine
does not know that, so our own clients map it before they connect. TLS still checks the
certificate against the name the user gave, only the TCP connect uses the mapped address.
"""

from __future__ import annotations

import ipaddress

__all__ = ["client_key", "host_only", "is_ip", "loopback_host", "split_host_port"]


def host_only(host: str) -> str:
    """``Host`` header or address without its port, lower-cased, no trailing dot.

    A bracketed IPv6 literal keeps its brackets (``[::1]:8080`` -> ``[::1]``).
    """
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        host = host[: end + 1] if end > 0 else host
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


def is_ip(host: str, version: int | None = None) -> bool:
    """Whether ``host`` is an IP address literal (of ``version`` 4 or 6 when given).

    No brackets and no zone: ``::1`` is an IP, ``[::1]`` is not. TLS sends no SNI for an
    IP, and a browser page cannot own one through DNS.
    """
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return version is None or ip.version == version


def loopback_host(host: str) -> str:
    """``127.0.0.1`` for ``localhost`` and ``*.localhost``; any other host unchanged."""
    lowered = host.lower().rstrip(".")
    if lowered == "localhost" or lowered.endswith(".localhost"):
        return "127.0.0.1"
    return host


def split_host_port(addr: str, default_port: int | None = None) -> tuple[str, int]:
    """``"host:port"``, ``"[::1]:443"`` or (with a default) ``"host"`` -> (host, port).

    IPv6 literals need brackets when a port follows; brackets are removed from the result.
    Raises ValueError naming the address and the problem.
    """
    if not isinstance(addr, str) or not addr.strip():
        raise ValueError(f"expected host:port, got {addr!r}")
    text = addr.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"missing ']' in address {addr!r}")
        host, rest = text[1:end], text[end + 1:]
        if ":" not in host:
            raise ValueError(f"brackets are only for IPv6 addresses, got {addr!r}")
        if rest and not rest.startswith(":"):
            raise ValueError(f"unexpected text after ']' in {addr!r}")
        port_text = rest[1:] if rest else None
    elif text.count(":") > 1:
        raise ValueError(f"IPv6 addresses need brackets, e.g. [::1]:443, got {addr!r}")
    elif ":" in text:
        host, port_text = text.split(":", 1)
    else:
        host, port_text = text, None
    if not host:
        raise ValueError(f"missing host in {addr!r}")
    if port_text is None:
        if default_port is None:
            raise ValueError(f"missing port in {addr!r} (expected host:port)")
        return host, default_port
    if not port_text.isdigit() or not port_text.isascii():
        raise ValueError(f"port must be a number in {addr!r}")
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"port out of range (1-65535) in {addr!r}")
    return host, port


def client_key(host: str) -> str:
    """Whom a per-client limit counts: the IPv4 address, or the IPv6 /64 around it.

    One IPv6 host usually holds a whole /64, so counting single v6 addresses would let
    it take a fresh quota per address. IPv4-mapped v6 addresses count as their IPv4.
    Anything that is not an IP address (a Unix socket, a test transport) counts as given.
    """
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)
