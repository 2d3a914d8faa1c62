"""An AppRouter over fakes for the unit tests of routing and app connections: `router()`
gives the router (apps grafana at `HOST` and db, proxy at `PUBLIC`, clock at `NOW`) and
its audit; sessions are `NoSessions` and the JWT is `Signer`'s readable stand-in. No
sockets, no reactor."""

from __future__ import annotations

from twisted.internet.task import Clock

from apptunnel.auth.access import AccessPolicy
from apptunnel.catalog import AppInfo
from apptunnel.config import ProxyConfig
from apptunnel.proxy.registry import AgentRegistry
from apptunnel.proxy.router import AppRouter
from tests.support.access_fakes import Roles, Users
from tests.support.audit_fake import Audit

PUBLIC = "apptunnel.localhost:3080"
HOST = "grafana.apptunnel.localhost:3080"
NOW = 1_000_000.0


class NoSessions:
    async def app_session(self, secret, app):
        return None


class Signer:
    def token(self, key, user, roles, traits, audience, claims, bot=False):
        return f"jwt-for-{user}-{'+'.join(roles)}" + ("-bot" if bot else "")


def router(roles=None):
    clock = Clock()
    clock.advance(NOW)
    config = ProxyConfig(
        path="p.yaml", cluster_name="t", data_dir="/nonexistent", public_addr=PUBLIC,
        web_listen_addr="127.0.0.1:0", tunnel_listen_addr="127.0.0.1:0", backend_type="sqlite",
        backend_path="/nonexistent/db", tls_cert_file=None, tls_key_file=None,
    )
    registry = AgentRegistry()
    registry.add(object(), "a1", [
        AppInfo("grafana", "http://10.0.0.5:3000", {"env": "dev"}, HOST),
        AppInfo("db", "tcp://10.0.0.6:5432", {"env": "dev"}, "db.apptunnel.localhost:3080"),
    ])
    audit = Audit()
    access = AccessPolicy(roles=roles or Roles(), audit=audit, clock=clock, users=Users(alice=("dev",)))
    return AppRouter(config=config, registry=registry, sessions=NoSessions(), access=access,
                     signer=Signer(), audit=audit, clock=clock), audit
