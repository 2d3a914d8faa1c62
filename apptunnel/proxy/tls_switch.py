"""A TLS server configuration that can be replaced while the port stays open.

A CA rotation (auth/ca_set.py) changes which CAs client certificates may chain to, and at
the end of a host-CA grace which server certificate the proxy shows. Re-binding a port
would drop connections; instead the listening port is handed this creator, and each NEW
connection is made from the options current at accept time. Connections already open
keep the context they were made with.
"""

from __future__ import annotations

from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.ssl import CertificateOptions
from zope.interface import implementer

__all__ = ["SwitchableTls"]


@implementer(IOpenSSLServerConnectionCreator)
class SwitchableTls:
    """Server connections from the CertificateOptions last given to ``replace``."""

    def __init__(self, options: CertificateOptions) -> None:
        self._options = options

    def replace(self, options: CertificateOptions) -> None:
        options.getContext()   # a bad certificate fails here, not at the next accept
        self._options = options

    def serverConnectionForTLS(self, protocol) -> SSL.Connection:
        return self._options.serverConnectionForTLS(protocol)
