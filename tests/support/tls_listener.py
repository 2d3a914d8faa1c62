"""The web app of a web env behind the proxy's real web TLS options on 127.0.0.1:0, for
clients that must do a real handshake (user certificates, CA pins)."""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.internet.interfaces import IListeningPort
from twisted.web.server import Site

from apptunnel.proxy.service import _web_tls_options


async def listen_tls(env) -> IListeningPort:
    """The web app behind the real web TLS options (client certs requested) on 127.0.0.1:0."""
    cert_pem, server_key = env.ca.issue_server_cert(["apptunnel.localhost"], ["127.0.0.1"])
    options = _web_tls_options(cert_pem, server_key, [env.ca.cert_pem], env.ca.cert_pem)
    site = Site(env.web.resource())
    site.noisy = False
    endpoint = SSL4ServerEndpoint(reactor, 0, options, interface="127.0.0.1")
    return await endpoint.listen(site)
