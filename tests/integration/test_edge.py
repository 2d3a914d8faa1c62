"""The edge behind real TLS on a loopback port: the TLS transport is handed over like a
plain one. (Routing, hand-over and limits on memory transports: tests/unit/test_edge.py.)"""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from twisted.internet import reactor, ssl
from twisted.internet.endpoints import SSL4ClientEndpoint, SSL4ServerEndpoint
from twisted.internet.protocol import Factory
from twisted.web import server

from apptunnel.proxy.edge import EdgeFactory
from tests.support.edge_site import Hello
from tests.support.forward_env import PUBLIC, Client, request_bytes
from tests.support.waiting import wait


@pytest.fixture
def env(forward_env):
    """The tests here run against the shared forwarder environment."""
    return forward_env


@pytest_twisted.ensureDeferred
async def test_edge_over_tls_serves_web_and_apps_on_one_port(env, tmp_path):
    """Behind TLS the edge hands over the TLS transport: web UI and app requests both work."""
    cert = ssl.KeyPair.generate().selfSignedCert(1, CN="apptunnel.localhost")
    listener = await wait(SSL4ServerEndpoint(reactor, 0, cert.options(), interface="127.0.0.1").listen(
        EdgeFactory("apptunnel.localhost", server.Site(Hello()), env.forwarder)))
    port = listener.getHost().port
    try:
        async def fetch(raw):
            client = Client()
            await wait(SSL4ClientEndpoint(reactor, "127.0.0.1", port, ssl.CertificateOptions()).connect(
                Factory.forProtocol(lambda: client)))
            results = []
            for one in raw:
                results.append(await client.request(one))
            client.transport.loseConnection()
            await wait(client.closed)
            return results

        [(head, body)] = await fetch([request_bytes(host=PUBLIC)])
        assert head.status == 200 and body == f"web:{PUBLIC}".encode()
        secret = await env.app_cookie()
        cookie = [("Cookie", f"__Host-apptunnel_app={secret}")]
        results = await fetch([request_bytes(path=f"/echo?n={i}", headers=cookie) for i in range(3)])
        assert [json.loads(body)["uri"] for _, body in results] == ["/echo?n=0", "/echo?n=1", "/echo?n=2"]
    finally:
        await listener.stopListening()
