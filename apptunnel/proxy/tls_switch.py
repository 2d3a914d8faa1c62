"""A TLS server configuration that can be replaced while the port stays open.

A CA rotation (auth/ca_set.py) changes which CAs client certificates may chain to, and at
the end of a host-CA grace which server certificate the proxy shows. Re-binding a port
would drop connections; instead the listening port's TLS layer (apptunnel/tls/layer.py)
asks ``context`` at each accept, so each NEW connection is made from the configuration
current then. Connections already open keep the context they were made with.
"""

from __future__ import annotations

import ssl

from apptunnel.tls.contexts import ServerTls, server_context

__all__ = ["SwitchableTls", "replace_together"]


class SwitchableTls:
    """Server contexts from the ServerTls last given to ``replace``."""

    def __init__(self, tls: ServerTls) -> None:
        self._context = server_context(tls)

    def replace(self, tls: ServerTls) -> None:
        """Build the new context now: a bad certificate or key fails here (``ssl.SSLError``,
        an OSError, or ValueError), not at the next accept, and the old one stays."""
        replace_together((self, tls))

    def context(self) -> ssl.SSLContext:
        return self._context


def replace_together(*changes: tuple[SwitchableTls, ServerTls]) -> None:
    """Build every new context first, then switch them all: the web and tunnel ports move
    to a rotation's CAs together, and a context that cannot be built switches none."""
    built = [(switch, server_context(tls)) for switch, tls in changes]
    for switch, context in built:
        switch._context = context
