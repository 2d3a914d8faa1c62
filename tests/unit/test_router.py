"""AppRouter: a request head in, an Answer or a Forward out (fakes for sessions, storage
and signing; no sockets, no reactor)."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from apptunnel.auth.access import AccessPolicy
from apptunnel.auth.callers import Caller
from apptunnel.backend.records import AppSession
from apptunnel.config import ProxyConfig
from apptunnel.proxy.http1 import Headers, RequestHead
from apptunnel.catalog import AppInfo
from apptunnel.proxy.registry import AgentRegistry
from apptunnel.proxy.router import Answer, AppRouter, Forward
from tests.unit.test_auth_access import Audit, Roles, Users

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


def head(method=b"GET", target=b"/", host=HOST, extra=()):
    headers = [(b"Host", host.encode())] if host is not None else []
    return RequestHead(method, target, b"HTTP/1.1", Headers(headers + list(extra)))


def route(r, h, caller=None):
    out = []
    Deferred.fromCoroutine(r.route(h, "10.1.1.1", caller)).addBoth(out.append)
    return out[0]


ALICE = Caller("alice", ("dev",), {}, "certificate", "fp", NOW + 3600)


def test_garbage_hosts_and_unknown_apps_are_answered_here():
    """A bad Host: 400 and close; an unknown app: 404; the proxy's own name here: 421."""
    r, _ = router()
    assert (route(r, head(host="a b")).status, route(r, head(host="a b")).close) == (400, True)
    assert route(r, head(host="nope.example.com")).status == 404
    assert route(r, head(host=PUBLIC)).status == 421


def test_connect_and_tcp_apps_are_never_forwarded():
    """CONNECT would become a raw pipe: 405. A TCP app's host says how to reach it."""
    r, _ = router()
    assert route(r, head(method=b"CONNECT", target=b"grafana:443")).status == 405
    answer = route(r, head(host="db.apptunnel.localhost:3080"))
    assert answer.status == 400 and b"apptunnel proxy app db" in answer.data


def test_without_a_session_a_browser_is_sent_to_sign_in():
    """No app session: GET gets the launch redirect with a fresh state cookie; POST a 401."""
    r, _ = router()
    answer = route(r, head(target=b"/dash?x=1"))
    assert isinstance(answer, Answer) and answer.status == 302
    assert b"/web/launch/grafana?path=%2Fdash%3Fx%3D1&state=" in answer.data
    assert b"Set-Cookie: __Host-apptunnel_state=" in answer.data
    assert route(r, head(method=b"POST")).status == 401


def test_an_allowed_certificate_is_forwarded_with_a_rewritten_head():
    """The app sees its own Host, our JWT, X-Forwarded-*, and none of our cookies or a
    spoofed identity header."""
    r, _ = router()
    spoof = [(b"Apptunnel-Jwt-Assertion", b"forged"), (b"Cookie", b"__Host-apptunnel_app=s; a=1")]
    out = route(r, head(extra=spoof), ALICE)
    assert isinstance(out, Forward) and out.user == "alice" and out.caller.roles == ("dev",)
    h = out.head.headers
    assert h.get(b"host") == b"10.0.0.5:3000"
    assert h.get_all(b"apptunnel-jwt-assertion") == [b"jwt-for-alice-dev"]
    assert h.get(b"cookie") == b"a=1"
    assert h.get(b"x-forwarded-for") == b"10.1.1.1"
    assert h.get(b"x-forwarded-host") == HOST.encode()


def test_a_websocket_from_another_origin_is_refused_and_audited():
    """The origin rule is the router's; the refusal is the policy's (403, access.denied)."""
    r, audit = router()
    upgrade = [(b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")]
    bad = route(r, head(extra=upgrade + [(b"Origin", b"https://evil.example")]), ALICE)
    assert isinstance(bad, Answer) and bad.status == 403
    assert audit.of("access.denied")[-1]["reason"] == "WebSocket origin mismatch"
    good = route(r, head(extra=upgrade + [(b"Origin", f"https://{HOST}".encode())]), ALICE)
    assert isinstance(good, Forward) and good.upgrade


def test_an_expired_certificate_falls_back_to_sign_in():
    """A certificate past its expiry is no caller: the browser path applies."""
    r, _ = router()
    expired = Caller("alice", ("dev",), {}, "certificate", "fp", NOW - 1)
    assert route(r, head(), expired).status == 302


def test_a_removed_user_certificate_gets_the_removed_message():
    """The policy's message reaches the page: 'your user account no longer exists'."""
    r, _ = router()
    ghost = Caller("ghost", ("dev",), {}, "certificate", "fp-g", NOW + 3600)
    answer = route(r, head(), ghost)
    assert answer.status == 403 and b"your user account no longer exists" in answer.data


class OneSession:
    """An app session for every cookie; counts how often the session behind it is read."""

    def __init__(self):
        self.record = AppSession("app-hash", "web-hash", "alice", "grafana", NOW, NOW + 600)
        self.resolved = 0

    async def app_session(self, secret, app):
        return self.record if secret else None

    async def caller(self, app_session):
        self.resolved += 1
        return Caller("alice", ("dev",), {}, "session", app_session.id_hash, app_session.expires)


def test_a_cached_session_decision_reads_neither_the_session_nor_the_roles():
    """The hot path: the second request of a session within the TTL is decided from the
    cache; the web session behind the cookie and the roles are not read again."""
    roles = Roles()
    r, _ = router(roles)
    sessions = r.sessions = OneSession()
    cookie = [(b"Cookie", b"__Host-apptunnel_app=secret")]
    assert isinstance(route(r, head(extra=cookie)), Forward)
    reads = (sessions.resolved, roles.calls)
    for _ in range(3):
        out = route(r, head(extra=cookie))
        assert isinstance(out, Forward) and out.caller.credential == "app-hash"
    assert (sessions.resolved, roles.calls) == reads == (1, 1)


def mfa_roles():
    """dev allows grafana and asks for a second factor per session (issue 10)."""
    from apptunnel.auth.rbac import parse_role
    roles = Roles()
    roles.roles["dev"] = parse_role({"kind": "role", "metadata": {"name": "dev"},
                                     "spec": {"options": {"require_session_mfa": True},
                                              "allow": {"app_labels": {"env": "dev"}}}})
    return roles


class MfaSession(OneSession):
    def __init__(self, verified: bool):
        super().__init__()
        self.verified = verified

    async def caller(self, app_session):
        return Caller("alice", ("dev",), {}, "session", app_session.id_hash,
                      app_session.expires, "grafana" if self.verified else None)


def test_an_app_session_without_the_second_factor_goes_back_through_the_launch():
    """Per-session MFA: an app session started without a fresh factor (before the role
    asked for one) is sent to the launch and its prompt; a POST gets 401; an MFA-verified
    app session is forwarded."""
    r, _ = router(mfa_roles())
    r.sessions = MfaSession(verified=False)
    cookie = [(b"Cookie", b"__Host-apptunnel_app=secret")]
    answer = route(r, head(target=b"/d", extra=cookie))
    assert answer.status == 302 and b"/web/launch/grafana?path=%2Fd&state=" in answer.data
    assert route(r, head(b"POST", extra=cookie)).status == 401
    r2, _ = router(mfa_roles())
    r2.sessions = MfaSession(verified=True)
    assert isinstance(route(r2, head(extra=cookie)), Forward)


def test_a_certificate_without_the_factor_is_told_so_and_a_bound_one_passes():
    """A plain certificate on an app asking for MFA: 403 saying it needs a second factor;
    a one-app certificate for it is forwarded; one for another app is refused."""
    r, _ = router(mfa_roles())
    plain = Caller("alice", ("dev",), {}, "certificate", "fp-1", NOW + 3600)
    answer = route(r, head(), plain)
    assert answer.status == 403 and b"needs a second factor" in answer.data
    bound = Caller("alice", ("dev",), {}, "certificate", "fp-2", NOW + 3600, "grafana")
    assert isinstance(route(r, head(), bound), Forward)
    other = Caller("alice", ("dev",), {}, "certificate", "fp-3", NOW + 3600, "wiki")
    answer = route(r, head(), other)
    assert answer.status == 403 and b"this certificate only opens wiki" in answer.data
