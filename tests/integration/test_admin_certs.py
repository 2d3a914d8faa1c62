"""The admin API over a real TLS handshake with client certificates: a bot's certificate
is refused (403) even when its roles carry every rule, and a user certificate counts for
the roles its user holds now, not those written into it."""

from __future__ import annotations

import pytest
import pytest_twisted

from apptunnel.admin.context import AdminContext
from apptunnel.backend.records import Resource, User
from apptunnel.web.admin_routes import mount_admin
from apptunnel.cli.http import ProxyClient, tls_context
from tests.support.keys import key_pem, new_key
from tests.support.tls_listener import listen_tls
from tests.support.waiting import in_thread

ADMIN = {"kind": "role", "metadata": {"name": "admin"},
         "spec": {"allow": {"rules": [{"resources": ["*"], "verbs": ["*"]}]}}}


@pytest.fixture
def env(web_env):
    return web_env


async def get(env, port, cert_pem, key, path):
    """GET ``path`` over TLS presenting ``cert_pem``: (status, JSON)."""
    client = ProxyClient(f"apptunnel.localhost:{port.getHost().port}",
                         tls_context(env.ca.cert_pem, client=(cert_pem, key_pem(key))))
    return await in_thread(lambda: client.call("GET", path))


@pytest_twisted.ensureDeferred
async def test_bots_and_demoted_users_certificates_are_refused(env):
    """bot:ci with the admin role: 403; root's certificate: 200, then 403 once the admin
    role is taken from root in storage (the certificate still names it)."""
    await env.backend.put_resource(Resource("role", "admin", ADMIN))
    now = env.clock.seconds()
    await env.backend.create_user(User("root", None, ("admin",), {}, now))
    mount_admin(env.web, AdminContext(env.backend, env.audit, env.clock,
                                      env.config.public_addr))
    await env.users.refresh()
    port = await listen_tls(env)
    try:
        key, public = new_key()
        bot_cert = env.ca.issue_bot_cert(public, "ci", ("admin",), 7, 600)
        code, answer = await get(env, port, bot_cert, key, "/v1/admin/users")
        assert (code, answer) == (403, {"error": "a bot cannot do this"})
        code, _ = await get(env, port, bot_cert, key, "/v1/audit/events")
        assert code == 403
        user_cert = env.ca.issue_user_cert(public, "root", ["admin"], {}, 600)
        code, answer = await get(env, port, user_cert, key, "/v1/admin/users")
        assert code == 200 and "root" in [u["name"] for u in answer["users"]]
        await env.backend.update_user(User("root", None, ("dev",), {}, now))
        await env.users.refresh()
        env.web.context.access.forget()
        code, _ = await get(env, port, user_cert, key, "/v1/admin/users")
        assert code == 403
    finally:
        await port.stopListening()
