"""Removed users and role changes on HTTP apps, on real loopback sockets (the certificate
env of test_forward_certs with a UserDirectory polling every 0.1 s): certificates and
sessions act with what their user holds now, and live connections are re-checked."""

from __future__ import annotations

import json

import pytest_twisted
from twisted.internet import defer

from apptunnel.backend.records import User
from tests.support.forward_env import header_map, request_bytes
from tests.support.waiting import until, wait
from tests.support.cert_env import APP_PUBLIC, cert_env

USERS = (User("alice", None, ("dev",), {"team": ("sre",)}, 0.0),
         User("bob", None, ("dev", "ops"), {"team": ("sre",)}, 0.0))


async def browser_session(env, user: User):
    """A browser connection on the app host with an app session of `user`."""
    _, web = await wait(env.sessions.create_web_session(user))
    code = await wait(env.sessions.create_auth_code(web, "grafana", "/", "st"))
    secret, _, _ = await wait(env.sessions.redeem_auth_code(code, "st", "grafana"))
    browser = await env.tls(None)
    cookie = [("Cookie", f"__Host-apptunnel_app={secret}")]
    head, _ = await browser.request(request_bytes(path="/echo", host=APP_PUBLIC, headers=cookie))
    assert head.status == 200
    return browser, cookie


@pytest_twisted.ensureDeferred
async def test_removed_user_is_cut_everywhere_and_refused(tmp_path):
    """users rm alice: her fixed, certificate and browser connections are cut; her
    certificate then gets 403 on the app host and through a local port."""
    async with cert_env(tmp_path, USERS) as env:
        port, said = await env.local("alice")
        fixed = await env.plain(port)
        head, _ = await fixed.request(request_bytes(path="/echo", host="x"))
        assert head.status == 200
        direct = await env.tls(env.cert("alice"))
        head, _ = await direct.request(request_bytes(path="/echo", host=APP_PUBLIC))
        assert head.status == 200
        browser, _ = await browser_session(env, USERS[0])
        other = await env.tls(env.cert("bob"))
        head, _ = await other.request(request_bytes(path="/echo", host=APP_PUBLIC))
        assert head.status == 200

        await wait(env.backend.delete_user("alice"))
        await wait(defer.gatherResults([fixed.closed, direct.closed, browser.closed]))
        assert other.transport.connected

        direct = await env.tls(env.cert("alice"))
        head, body = await direct.request(request_bytes(path="/echo", host=APP_PUBLIC))
        assert head.status == 403 and b"your user account no longer exists" in body
        again = await env.plain(port)
        again.transport.write(request_bytes(path="/echo"))
        await wait(again.closed)
        assert said[-1] == "proxy refused: 403 Forbidden: your user account no longer exists"
        denied = await env.events("access.denied")
        assert sum(1 for e in denied if e.fields.get("where") == "live connection") == 3


@pytest_twisted.ensureDeferred
async def test_a_certificate_acts_with_the_roles_its_user_holds_now(tmp_path):
    """bob's certificate says [dev, ops]; after ops is taken away it reaches grafana (dev)
    with a JWT saying [dev], and no longer reaches prod (ops) - even from a cached decision."""
    async with cert_env(tmp_path, USERS) as env:
        cert = env.cert("bob", roles=("dev", "ops"))
        prod = await env.tls(cert)
        head, _ = await prod.request(request_bytes(path="/echo", host="prod.apptunnel.localhost"))
        assert head.status == 200
        client = await env.tls(cert)
        head, body = await client.request(request_bytes(path="/echo", host=APP_PUBLIC))
        token = header_map(json.loads(body))["apptunnel-jwt-assertion"][0]
        assert env.claims(token)["roles"] == ["dev", "ops"]

        await wait(env.backend.update_user(User("bob", None, ("dev",), {"team": ("sre",)}, 0.0)))
        await wait(prod.closed)           # the live prod connection was re-checked and cut
        head, body = await client.request(request_bytes(path="/echo", host=APP_PUBLIC))
        assert head.status == 200         # grafana is still allowed: kept alive
        token = header_map(json.loads(body))["apptunnel-jwt-assertion"][0]
        assert env.claims(token)["roles"] == ["dev"]
        prod = await env.tls(cert)
        head, _ = await prod.request(request_bytes(path="/echo", host="prod.apptunnel.localhost"))
        assert head.status == 403


@pytest_twisted.ensureDeferred
async def test_a_session_acts_with_the_roles_its_user_holds_now(tmp_path):
    """alice loses dev: her browser connection on grafana is cut and the session gets 403."""
    async with cert_env(tmp_path, USERS) as env:
        await until(lambda: env.users.current("alice") is not None, "the first poll")
        browser, cookie = await browser_session(env, USERS[0])
        await wait(env.backend.update_user(User("alice", None, ("ops",), {}, 0.0)))
        await wait(browser.closed)
        again = await env.tls(None)
        head, _ = await again.request(request_bytes(path="/echo", host=APP_PUBLIC, headers=cookie))
        assert head.status == 403
