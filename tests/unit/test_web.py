"""The proxy host's web UI and JSON API, over real sessions, roles, storage and audit."""

from __future__ import annotations

import json
from urllib.parse import parse_qs, quote, urlsplit

import jwt
import pytest
import pytest_twisted

from apptunnel.auth.errors import AuthError
from apptunnel.auth.jwt import JwtSigner
from tests.support.web_env import BASE, app_info, header, session_cookie


@pytest.fixture
def env(web_env):
    """The tests here run against the shared web app environment."""
    return web_env


@pytest_twisted.ensureDeferred
async def test_login_page_renders(env):
    """GET /web/login shows the form with the safe `next` carried in a hidden field."""
    response, body = await env.call("GET", "/web/login?next=%2Fweb%2Flaunch%2Fgrafana")
    assert response.code == 200
    assert header(response, "content-type") == "text/html; charset=utf-8"
    page = body.decode()
    assert 'action="/web/login"' in page and 'method="post"' in page
    assert 'name="next" value="/web/launch/grafana"' in page
    assert "test-cluster" in page


@pytest_twisted.ensureDeferred
async def test_login_page_escapes_next(env):
    """A hostile `next` never reaches the page unescaped: it is reduced to `/`."""
    response, body = await env.call("GET", "/web/login?next=" + quote('"><script>x</script>'))
    assert response.code == 200
    assert b"<script>" not in body
    assert b'name="next" value="/"' in body


@pytest_twisted.ensureDeferred
async def test_wrong_password_and_unknown_user_look_the_same(env):
    """Wrong password and unknown user both get 401 with the identical body, and are audited."""
    wrong, wrong_body = await env.call(
        "POST", "/web/login", data={"username": "alice", "password": "nope", "next": "/"})
    unknown, unknown_body = await env.call(
        "POST", "/web/login", data={"username": "mallory", "password": "nope", "next": "/"})
    assert wrong.code == unknown.code == 401
    # The form keeps what was typed (issue 12); otherwise the two answers are identical.
    assert b'value="alice"' in wrong_body and b'value="mallory"' in unknown_body
    assert wrong_body.replace(b"alice", b"X") == unknown_body.replace(b"mallory", b"X")
    assert b"invalid username or password" in wrong_body
    assert wrong.headers.getRawHeaders(b"set-cookie") is None
    events = await env.events("user.login")
    assert sorted(e.actor for e in events) == ["alice", "mallory"]
    for event in events:
        assert (event.code, event.outcome) == ("T1000W", "failure")
        assert "nope" not in json.dumps(event.fields)


@pytest_twisted.ensureDeferred
async def test_login_sets_host_only_cookie_and_redirects(env):
    """A good login sets a __Host- Secure HttpOnly Lax cookie capped by the role TTL, 303 to next."""
    target = "/web/launch/grafana?path=%2Fd&state=abc"
    response, _ = await env.call(
        "POST", "/web/login", data={"username": "alice", "password": "alice-pw", "next": target})
    assert response.code == 303
    assert header(response, "location") == target
    secret, attributes = session_cookie(response)
    assert secret
    assert attributes == ["Path=/", "Secure", "HttpOnly", "SameSite=Lax", "Max-Age=3600"]
    web = await env.sessions.web_session(secret)
    assert web.user == "alice" and web.expires == pytest.approx(env.clock.seconds() + 3600)
    assert [(e.code, e.actor) for e in await env.events("user.login")] == [("T1000I", "alice")]
    assert [e.actor for e in await env.events("session.web.start")] == ["alice"]


@pytest.mark.parametrize("hostile", [
    "//evil.com", "https://evil.com", "/\\evil.com", "javascript:alert(1)",
])
@pytest_twisted.ensureDeferred
async def test_hostile_next_lands_on_root(env, hostile):
    """Open-redirect attempts in `next` all land on `/` after login."""
    response, _ = await env.call(
        "POST", "/web/login", data={"username": "alice", "password": "alice-pw", "next": hostile})
    assert response.code == 303
    assert header(response, "location") == "/"


@pytest_twisted.ensureDeferred
async def test_apps_page_lists_exactly_the_allowed_apps(env):
    """The apps page shows only apps the user's roles allow, with Launch links and the CA pin."""
    secret = await env.login()
    response, body = await env.call("GET", "/", cookie=secret)
    assert response.code == 200
    page = body.decode()
    assert 'href="https://grafana.apptunnel.localhost:3080/"' in page
    assert "env=staging" in page                       # a label chip (a filter link)
    assert "wiki" not in page and "billing" not in page
    assert "alice" in page                             # roles are on the account page
    assert 'action="/web/logout"' in page
    assert env.ca.pin in page


@pytest_twisted.ensureDeferred
async def test_apps_page_empty_for_user_without_roles(env):
    """A user whose roles allow nothing sees no app at all (deny by default)."""
    secret = await env.login("bob", "bob-pw")
    response, body = await env.call("GET", "/", cookie=secret)
    assert response.code == 200
    assert b"Launch" not in body and b"grafana" not in body


@pytest_twisted.ensureDeferred
async def test_apps_page_without_session_redirects_to_login(env):
    """No (or a made-up) session cookie sends the browser to the login page."""
    for cookie in (None, "made-up-secret"):
        response, _ = await env.call("GET", "/", cookie=cookie)
        assert response.code == 302
        assert header(response, "location") == "/web/login"


@pytest_twisted.ensureDeferred
async def test_launch_issues_code_bound_to_state_and_app(env):
    """Launch redirects to the app host with a one-use code valid only for its state and app."""
    secret = await env.login()

    async def launch() -> str:
        response, _ = await env.call(
            "GET", "/web/launch/grafana?path=" + quote("/dash?x=1", safe="") + "&state=st-1",
            cookie=secret)
        assert response.code == 302
        location = urlsplit(header(response, "location"))
        assert (location.scheme, location.netloc, location.path) == (
            "https", "grafana.apptunnel.localhost:3080", "/.apptunnel/auth")
        return parse_qs(location.query)["code"][0]

    with pytest.raises(AuthError):
        await env.sessions.redeem_auth_code(await launch(), "st-1", "wiki")
    with pytest.raises(AuthError):
        await env.sessions.redeem_auth_code(await launch(), "other-state", "grafana")
    code = await launch()
    app_secret, app_session, path = await env.sessions.redeem_auth_code(code, "st-1", "grafana")
    assert app_secret and path == "/dash?x=1"
    assert (app_session.user, app_session.app) == ("alice", "grafana")
    with pytest.raises(AuthError):
        await env.sessions.redeem_auth_code(code, "st-1", "grafana")


@pytest_twisted.ensureDeferred
async def test_launch_without_session_round_trips_through_login(env):
    """Launch without a session goes to login with `next`, and login comes back to the launch."""
    launch = "/web/launch/grafana?path=%2F&state=st-2"
    response, _ = await env.call("GET", launch)
    assert response.code == 302
    location = header(response, "location")
    assert location == "/web/login?next=" + quote(launch, safe="")
    next_value = parse_qs(urlsplit(location).query)["next"][0]
    response, _ = await env.call(
        "POST", "/web/login",
        data={"username": "alice", "password": "alice-pw", "next": next_value})
    assert response.code == 303
    assert header(response, "location") == launch


@pytest_twisted.ensureDeferred
async def test_launch_rejects_unknown_app_and_bad_state(env):
    """Unknown app is 404; a missing or over-long state is 400; all on the uniform page."""
    secret = await env.login()
    unknown, body = await env.call("GET", "/web/launch/nope?state=s", cookie=secret)
    assert unknown.code == 404 and b"404" in body
    missing, _ = await env.call("GET", "/web/launch/grafana", cookie=secret)
    assert missing.code == 400
    long, _ = await env.call("GET", "/web/launch/grafana?state=" + "s" * 600, cookie=secret)
    assert long.code == 400


@pytest_twisted.ensureDeferred
async def test_launch_denied_app_is_403_and_audited(env):
    """Launching an app the roles deny is a 403 page and an access.denied event."""
    secret = await env.login()
    response, body = await env.call("GET", "/web/launch/wiki?state=s", cookie=secret)
    assert response.code == 403
    assert b"Access denied" in body
    events = await env.events("access.denied")
    assert [(e.code, e.actor, e.target, e.outcome) for e in events] == [
        ("T2200W", "alice", "wiki", "failure")]


@pytest_twisted.ensureDeferred
async def test_logout_ends_session(env):
    """Logout clears the cookie, ends the session server-side and writes session.web.end."""
    secret = await env.login()
    response, _ = await env.call("POST", "/web/logout", cookie=secret)
    assert response.code == 303
    assert header(response, "location") == "/web/login"
    value, attributes = session_cookie(response)
    assert value == "" and "Max-Age=0" in attributes
    again, _ = await env.call("GET", "/", cookie=secret)
    assert again.code == 302
    assert await env.sessions.web_session(secret) is None
    assert [e.actor for e in await env.events("session.web.end")] == ["alice"]


@pytest_twisted.ensureDeferred
async def test_json_login_and_logout(env):
    """POST /v1/sessions gives user, roles, expires and the cookie; DELETE ends it (204)."""
    response, body = await env.call(
        "POST", "/v1/sessions", origin=None,
        json={"username": "alice", "password": "alice-pw"})
    assert response.code == 200
    assert header(response, "content-type") == "application/json"
    data = json.loads(body)
    assert data["user"] == "alice" and data["roles"] == ["dev"]
    assert data["expires"] == pytest.approx(env.clock.seconds() + 3600)
    secret, _ = session_cookie(response)

    response, body = await env.call("GET", "/v1/apps", cookie=secret)
    assert response.code == 200
    assert json.loads(body) == {"apps": [{
        "name": "grafana", "type": "http", "labels": {"env": "staging"},
        "public_addr": "grafana.apptunnel.localhost:3080", "online": True, "description": "", "requestable": False,
    }]}

    response, body = await env.call("DELETE", "/v1/sessions", cookie=secret, origin=None)
    assert response.code == 204 and body == b""
    assert "Max-Age=0" in session_cookie(response)[1]
    response, body = await env.call("GET", "/v1/apps", cookie=secret)
    assert response.code == 401
    assert "error" in json.loads(body)


@pytest_twisted.ensureDeferred
async def test_apps_whose_agent_left_are_listed_offline(env):
    """An allowed app whose agent went away stays listed, marked offline, without Launch."""
    tunnel = object()
    env.registry.add(tunnel, "agent-2", [app_info("metrics", {"env": "staging"})])
    env.registry.remove(tunnel)
    response, body = await env.call(
        "POST", "/v1/sessions", origin=None, json={"username": "alice", "password": "alice-pw"})
    secret, _ = session_cookie(response)
    response, body = await env.call("GET", "/v1/apps", cookie=secret)
    apps = {app["name"]: app["online"] for app in json.loads(body)["apps"]}
    assert apps == {"grafana": True, "metrics": False}
    response, body = await env.call("GET", "/", cookie=secret)
    assert b"offline" in body and b"https://metrics.apptunnel.localhost:3080/" not in body


@pytest_twisted.ensureDeferred
async def test_json_api_errors(env):
    """Bad password 401, wrong content type 415, malformed JSON 400, no session 401: all JSON."""
    cases = [
        ({"json": {"username": "alice", "password": "x"}}, 401),
        ({"data": b'{"username": "alice"}', "headers": {"Content-Type": "text/plain"}}, 415),
        ({"data": b"{not json", "headers": {"Content-Type": "application/json"}}, 400),
        ({"json": ["alice", "alice-pw"]}, 400),
    ]
    for kwargs, status in cases:
        response, body = await env.call("POST", "/v1/sessions", origin=None, **kwargs)
        assert response.code == status, (kwargs, body)
        assert header(response, "content-type") == "application/json"
        assert isinstance(json.loads(body)["error"], str)
    response, body = await env.call(
        "POST", "/v1/sessions", origin=None, json={"username": "alice", "password": "x"})
    assert json.loads(body) == {"error": "invalid username or password"}
    response, body = await env.call("GET", "/v1/apps")
    assert response.code == 401 and "error" in json.loads(body)


@pytest_twisted.ensureDeferred
async def test_jwks_verifies_signed_tokens(env):
    """The published JWKS verifies a JwtSigner token with PyJWT, and may be cached 5 minutes."""
    response, body = await env.call("GET", "/.well-known/jwks.json")
    assert response.code == 200
    assert header(response, "cache-control") == "public, max-age=300"
    jwks = jwt.PyJWKSet.from_dict(json.loads(body))
    signer = JwtSigner(env.jwt_keys, "test-cluster", env.clock, 300.0)
    token = signer.token("s1", "alice", ["dev"], {}, "https://grafana.apptunnel.localhost:3080",
                         None)
    kid = jwt.get_unverified_header(token)["kid"]
    key = next(k for k in jwks.keys if k.key_id == kid)
    claims = jwt.decode(token, key.key, algorithms=["RS256"],
                        audience="https://grafana.apptunnel.localhost:3080")
    assert claims["username"] == "alice" and claims["iss"] == "test-cluster"


@pytest_twisted.ensureDeferred
async def test_healthz(env):
    """/healthz answers 200 {"status": "ok"} without a session."""
    response, body = await env.call("GET", "/healthz")
    assert response.code == 200 and json.loads(body) == {"status": "ok"}


@pytest.mark.parametrize("headers", [
    {"Origin": "https://evil.com"},
    {"Origin": "null"},
    {"Origin": "http://apptunnel.localhost:3080"},
    {"Referer": "https://evil.com/page"},
    {},
])
@pytest_twisted.ensureDeferred
async def test_cross_origin_form_login_is_refused(env, headers):
    """A form POST from another origin (or with no Origin/Referer) is 403 and signs nobody in."""
    response, body = await env.call(
        "POST", "/web/login", origin=None, headers=headers,
        data={"username": "alice", "password": "alice-pw", "next": "/"})
    assert response.code == 403
    assert response.headers.getRawHeaders(b"set-cookie") is None
    assert await env.events("user.login") == []


@pytest_twisted.ensureDeferred
async def test_same_origin_referer_is_accepted_and_logout_is_guarded(env):
    """A same-origin Referer stands in for Origin; a cross-origin logout leaves the session."""
    response, _ = await env.call(
        "POST", "/web/login", origin=None, headers={"Referer": BASE + "/web/login?next=%2F"},
        data={"username": "alice", "password": "alice-pw", "next": "/"})
    assert response.code == 303
    secret, _ = session_cookie(response)
    response, _ = await env.call("POST", "/web/logout", cookie=secret,
                                 origin="https://evil.com")
    assert response.code == 403
    assert await env.sessions.web_session(secret) is not None
    response, _ = await env.call("POST", "/v1/sessions", origin="https://evil.com",
                                 json={"username": "alice", "password": "alice-pw"})
    assert response.code == 403


@pytest_twisted.ensureDeferred
async def test_security_headers_on_every_response(env):
    """Pages, API, static files and error pages all carry the security headers."""
    expected = {
        "content-security-policy":
            "default-src 'self'; frame-ancestors 'none'; form-action 'self' https:; "
            "base-uri 'none'; object-src 'none'",
        "strict-transport-security": "max-age=31536000",
        "x-frame-options": "DENY",
        "x-content-type-options": "nosniff",
        "referrer-policy": "same-origin",
    }
    for path in ("/web/login", "/healthz", "/static/app.css", "/no/such/page", "/"):
        response, _ = await env.call("GET", path)
        for name, value in expected.items():
            assert header(response, name) == value, (path, name)
    for path in ("/web/login", "/healthz", "/no/such/page"):
        response, _ = await env.call("GET", path)
        assert header(response, "cache-control") == "no-store", path


@pytest_twisted.ensureDeferred
async def test_static_css_and_uniform_error_pages(env):
    """CSS is served from the package; unknown paths and methods get the uniform error page."""
    response, body = await env.call("GET", "/static/app.css")
    assert response.code == 200
    assert header(response, "content-type").startswith("text/css")
    assert b".topbar" in body
    for path in ("/static/nope.css", "/static/", "/static/../routes.py", "/no/such/page"):
        response, body = await env.call("GET", path)
        assert response.code == 404, path
        assert b"Not found" in body and b"Traceback" not in body
    response, body = await env.call("GET", "/web/logout")
    assert response.code == 405
    assert b"Method not allowed" in body


@pytest_twisted.ensureDeferred
async def test_requests_for_another_host_are_refused_with_421(env):
    """A request on the web UI naming an app host (keep-alive reuse) gets 421, not a page."""
    response, body = await env.call("GET", "/healthz", headers={"Host": "grafana.apptunnel.localhost:3080"})
    assert response.code == 421
    assert b"Wrong address" in body
    response, _ = await env.call("GET", "/healthz")
    assert response.code == 200
