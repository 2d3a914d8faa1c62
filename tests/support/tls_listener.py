"""TLS listeners for tests, on the proxy's own TLS layer (apptunnel/tls): the web app of a
web env behind the proxy's real web TLS options, and any ServerTls on 127.0.0.1."""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.web.server import Site

from apptunnel.proxy.service import _web_tls_options
from apptunnel.tls.contexts import ServerTls, server_context
from apptunnel.tls.layer import TlsServerEndpoint


def tls_endpoint(tls: ServerTls, port: int = 0, interface: str = "127.0.0.1") -> IStreamServerEndpoint:
    """A TLS server endpoint as the proxy's listeners make them (one context for all)."""
    context = server_context(tls)
    return TlsServerEndpoint(TCP4ServerEndpoint(reactor, port, interface=interface),
                             lambda: context)


async def listen_tls(env) -> IListeningPort:
    """The web app behind the real web TLS options (client certs requested) on 127.0.0.1:0."""
    cert_pem, server_key = env.ca.issue_server_cert(["apptunnel.localhost"], ["127.0.0.1"])
    options = _web_tls_options(cert_pem, server_key, [env.ca.cert_pem], env.ca.cert_pem)
    site = Site(env.web.resource())
    site.noisy = False
    return await tls_endpoint(options).listen(site)
