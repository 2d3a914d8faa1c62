"""The certificate environment: the app edge over TLS with the cluster CA (client
certificates requested), TcpAccess handing HTTP apps to the AppForwarder in fixed-app mode,
the CLI's LocalProxy as the client, real SQLite/SessionManager/RoleCache/JwtSigner/AuditLog/
LockWatcher, a real upstream twisted.web app, and user certificates issued by the real CA.

`cenv` is the fixture; `cert_env` the context manager behind it (with users kept current
by a UserDirectory when given).
"""

from __future__ import annotations

import contextlib
from urllib.parse import urlsplit

import jwt as pyjwt
import pytest_twisted
from twisted.internet import reactor, ssl
from twisted.internet.endpoints import SSL4ClientEndpoint, TCP4ClientEndpoint
from twisted.internet.protocol import Factory
from twisted.web import resource, server
from twisted.internet import reactor as wall_clock

from apptunnel.audit import AuditLog
from apptunnel.auth.ca import ClusterCA, load_server_tls
from apptunnel.auth.directory import UserDirectory
from apptunnel.auth.jwt import JwtKeys, JwtSigner
from apptunnel.auth.locks import LockWatcher
from apptunnel.auth.policy import RoleCache
from apptunnel.auth.sessions import SessionManager
from apptunnel.backend.records import Resource, User
from apptunnel.backend.sqlite import SqliteBackend
from apptunnel.cli.profile import Profile
from apptunnel.cli.proxy_app import LocalProxy
from apptunnel.config import ProxyConfig
from apptunnel.proxy.edge import EdgeFactory
from apptunnel.proxy.forward import AppForwarder
from apptunnel.catalog import AppInfo
from apptunnel.proxy.registry import AgentRegistry
from apptunnel.proxy.service import _web_tls_options
from apptunnel.proxy.tcp_access import TcpAccess
from tests.support.forward_env import Client, Echo, Redirect, role_doc
from tests.support.keys import key_pair
from tests.support.tls_listener import tls_endpoint
from tests.support.waiting import wait

HOST = "apptunnel.localhost"
APP_PUBLIC = f"grafana.{HOST}"


class Env:
    def cert(self, user: str, roles=("dev",)) -> tuple[bytes, bytes]:
        pub, priv = key_pair()
        return self.ca.issue_user_cert(pub, user, roles, {"team": ["sre"]}, 3600.0), priv

    async def local(self, user: str, app: str = "grafana", roles=("dev",)):
        """A LocalProxy (the CLI's) for `user`; returns (port, said lines)."""
        cert, key = self.cert(user, roles)
        profile = Profile(proxy=f"{HOST}:{self.edge_port}", trust="pinned", cert_pem=cert,
                          key_pem=key, ca_pem=self.ca.cert_pem)
        said: list[str] = []
        port = reactor.listenTCP(0, LocalProxy(reactor, lambda: profile, app, None, said.append),
                                 interface="127.0.0.1")
        self.listening.append(port)
        return port.getHost().port, said

    async def plain(self, port: int) -> Client:
        client = Client()
        await wait(TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(Factory.forProtocol(lambda: client)))
        self.clients.append(client)
        return client

    async def tls(self, cert: tuple[bytes, bytes] | None) -> Client:
        """A TLS connection to the edge for the app host, with or without a certificate."""
        client_cert = ssl.PrivateCertificate.loadPEM(cert[0] + b"\n" + cert[1]) if cert else None
        options = ssl.optionsForClientTLS(APP_PUBLIC, trustRoot=ssl.Certificate.loadPEM(self.ca.cert_pem),
                                          clientCertificate=client_cert)
        client = Client()
        await wait(SSL4ClientEndpoint(reactor, "127.0.0.1", self.edge_port, options).connect(
            Factory.forProtocol(lambda: client)))
        self.clients.append(client)
        return client

    async def events(self, type: str):
        await self.audit.flush()
        return await self.backend.search_audit(type=type)

    def claims(self, token: str) -> dict:
        key = pyjwt.PyJWK(self.keys.jwk()).key
        return pyjwt.decode(token, key, algorithms=["ES256"], audience=f"https://{APP_PUBLIC}")


@pytest_twisted.async_yield_fixture
async def cenv(tmp_path):
    async with cert_env(tmp_path) as e:
        yield e


@contextlib.asynccontextmanager
async def cert_env(tmp_path, users: tuple[User, ...] = ()):
    """The env; with ``users``, they are stored and a UserDirectory (polling every 0.1 s)
    caps every certificate and session by them."""
    e = Env()
    e.listening, e.clients = [], []
    data = str(tmp_path / "proxy")
    e.ca = ClusterCA.load_or_create(data, "utest", wall_clock)
    cert, key = load_server_tls(data, e.ca, [HOST, "*." + HOST], ["127.0.0.1"])
    e.backend = SqliteBackend(str(tmp_path / "apptunnel.db"), reactor)
    for name, labels in [("dev", {"env": "dev"}), ("ops", {"env": "prod"})]:
        await wait(e.backend.put_resource(Resource("role", name, role_doc(name, labels))))
    await wait(e.backend.create_user(User("carol", None, ("dev",), {}, 0.0)))
    for user in users:
        await wait(e.backend.create_user(user))
    e.users = None
    if users:
        e.users = UserDirectory(e.backend, reactor, interval=0.1)
        e.users.start()
    e.audit = AuditLog(e.backend, reactor)
    e.audit.start()
    e.locks = LockWatcher(e.backend, reactor, interval=0.1)
    e.locks.start()
    roles = RoleCache(e.backend, reactor)

    root = resource.Resource()
    root.putChild(b"echo", Echo())
    upstream = reactor.listenTCP(0, server.Site(root), interface="127.0.0.1")
    e.listening.append(upstream)
    origin = f"http://127.0.0.1:{upstream.getHost().port}"
    root.putChild(b"redirect", Redirect(origin))
    e.registry = AgentRegistry()
    e.registry.add(object(), "agent-1", [
        AppInfo(name="grafana", uri=origin, labels={"env": "dev"}, public_addr=APP_PUBLIC, agent_id="agent-1"),
        AppInfo(name="prod", uri=origin, labels={"env": "prod"}, public_addr=f"prod.{HOST}", agent_id="agent-1"),
    ])

    def connect_app(app_info, target, factory):
        parts = urlsplit(app_info.uri)
        return TCP4ClientEndpoint(reactor, parts.hostname, parts.port).connect(factory)

    config = ProxyConfig(
        path="p.yaml", cluster_name="utest", data_dir=data, public_addr=HOST,
        web_listen_addr="127.0.0.1:0", tunnel_listen_addr="127.0.0.1:0", backend_type="sqlite",
        backend_path="db", tls_cert_file=None, tls_key_file=None,
    )
    e.sessions = SessionManager(e.backend, reactor, config.session_ttl, locks=e.locks, audit=e.audit,
                                users=e.users)
    e.keys = JwtKeys.load_or_create(data, "ES256")
    e.forwarder = AppForwarder(config=config, registry=e.registry, sessions=e.sessions, roles=roles,
                               signer=JwtSigner(e.keys, "utest", reactor, 300.0), audit=e.audit,
                               clock=reactor, connect_app=connect_app, ca=e.ca, locks=e.locks,
                               users=e.users)
    access = TcpAccess(ca=e.ca, registry=e.registry, roles=roles, audit=e.audit, clock=reactor,
                       connect_app=connect_app, locks=e.locks, forwarder=e.forwarder, users=e.users)
    edge = EdgeFactory(HOST, server.Site(resource.Resource()), e.forwarder, tcp_access=access)
    listener = await wait(tls_endpoint(
        _web_tls_options(cert, key, [e.ca.cert_pem], e.ca.cert_pem)).listen(edge))
    e.listening.append(listener)
    e.edge_port = listener.getHost().port
    yield e
    for client in e.clients:
        if client.transport is not None and client.transport.connected:
            client.transport.abortConnection()
            await wait(client.closed)
    for port in e.listening:
        await port.stopListening()
    e.locks.stop()
    if e.users is not None:
        e.users.stop()
    await wait(e.audit.stop())
    await wait(e.backend.close())
