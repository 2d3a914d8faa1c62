"""Resolve `localhost` and `*.localhost` to loopback inside the test process.

Browsers and curl do this themselves (RFC 6761), but glibc on a plain Debian machine does
not, so Python HTTP clients in tests need it. Only name lookup changes: TLS still checks
the certificate against the hostname the client asked for.
"""

import contextlib
import socket

_real_getaddrinfo = socket.getaddrinfo


def _getaddrinfo(host, *args, **kwargs):
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    if isinstance(host, str) and (host == "localhost" or host.endswith(".localhost")):
        host = "127.0.0.1"
    return _real_getaddrinfo(host, *args, **kwargs)


@contextlib.contextmanager
def localhost_resolution():
    """Map *.localhost to 127.0.0.1 for the duration of the block."""
    socket.getaddrinfo = _getaddrinfo
    try:
        yield
    finally:
        socket.getaddrinfo = _real_getaddrinfo
