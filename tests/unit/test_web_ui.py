"""The web UI's pages in memory: catalogue filters kept in the URL, the TCP Connect
dialog, Request buttons, the requests page (create, review, assume) and its refusal of
cross-site forms; plus the pure parts (filters from query strings, request rows)."""

from __future__ import annotations

import re

import attrs
import pytest_twisted

from apptunnel.catalog import AppInfo
from apptunnel.web.catalogue import Filters, connect_commands, suggested_port
from apptunnel.web.request_routes import remaining, request_rows
from tests.support.web_env import header
from tests.unit.test_web_access_requests import env  # noqa: F401  (the fixture)

EVIL = "https://evil.example"


def test_filters_from_query_strings():
    """q and label=k=v parse; junk, duplicates, bad UTF-8 and excess are dropped."""
    f = Filters.from_args({b"q": [b" Wik "], b"label": [b"tier=docs", b"tier=docs", b"noeq",
                                                         b"=x", b"\xff=1"]})
    assert f == Filters("Wik", (("tier", "docs"),))
    many = Filters.from_args({b"label": [b"k%d=v" % i for i in range(50)]})
    assert len(many.labels) == 10
    assert Filters.from_args({b"q": [b"x" * 500]}).q == "x" * 100
    assert Filters.from_args({}) == Filters()


def test_filters_keep_and_link():
    """q matches name, description or a label; every label filter must hold; chips toggle."""
    f = Filters("wik", (("tier", "docs"),))
    assert f.keeps("wiki", "", {"tier": "docs"})
    assert not f.keeps("wiki", "", {"tier": "ops"})
    assert Filters("handbook").keeps("wiki", "The Handbook", {})
    assert Filters("env=prod").keeps("x", "", {"env": "prod"})
    assert f.toggle("tier", "docs") == "/web/apps?q=wik"
    assert f.toggle("env", "prod") == "/web/apps?q=wik&label=tier%3Ddocs&label=env%3Dprod"
    assert Filters().toggle("a", "b&c") == "/web/apps?label=a%3Db%26c"


def test_connect_commands_are_exact_and_quoted():
    login, proxy = connect_commands("apptunnel.localhost:3080", "o'neil", "pg", "sha256:ab")
    assert login == ("apptunnel login --proxy apptunnel.localhost:3080 --user 'o'\"'\"'neil' "
                     "--ca-pin sha256:ab")
    assert proxy == f"apptunnel proxy app pg --port {suggested_port('pg')}"
    assert 20000 <= suggested_port("pg") < 30000


def test_request_rows_and_remaining():
    """Mine vs the reviewer's queue, Assume offered once for an approved own request."""
    base = {"roles": ["r"], "apps": [], "reason": "", "reviews": [], "expires": 1000.0}
    listed = [dict(base, id="a", user="me", state="approved"),
              dict(base, id="b", user="me", state="pending"),
              dict(base, id="c", user="them", state="pending"),
              dict(base, id="d", user="them", state="denied"),
              dict(base, id="e", user="them", state="pending",
                   reviews=[{"author": "me", "approve": True, "reason": "", "created": 1}])]
    mine, queue = request_rows(listed, "me", ("x",), 1000.0 - 3900)
    assert [r["id"] for r in mine] == ["b", "a"]
    assert [r["id"] for r in queue] == ["c"]
    assert [r["can_assume"] for r in mine] == [False, True]
    assert mine[0]["remaining"] == "1 h 5 min"
    mine, _ = request_rows(listed, "me", ("a",), 0)
    assert not mine[1]["can_assume"]
    assert (remaining(0), remaining(59), remaining(60), remaining(7200)) == \
        ("ended", "59 s", "1 min", "2 h")


@pytest_twisted.ensureDeferred
async def test_catalogue_filters_in_the_url_and_request_buttons(env):  # noqa: F811
    """?q and ?label narrow the cards; billing (requestable) has Request, not Launch."""
    e = await env()
    alice = await e.login("alice", "alice-pw")
    response, body = await e.call("GET", "/web/apps", cookie=alice)
    page = body.decode()
    assert response.code == 200
    assert 'data-name="grafana"' in page and 'data-name="billing"' in page
    assert 'href="/web/requests?app=billing"' in page
    billing = page[page.index('data-name="billing"'):]
    billing = billing[:billing.index("</li>")]
    assert "Launch" not in billing and "Request access" in billing
    _, body = await e.call("GET", "/web/apps?label=env%3Dprod", cookie=alice)
    page = body.decode()
    assert 'data-name="billing"' in page and 'data-name="grafana"' not in page
    assert 'value="env=prod"' in page        # the search form keeps the label filter
    _, body = await e.call("GET", "/web/apps?q=GRAF", cookie=alice)
    assert b'data-name="grafana"' in body and b'data-name="billing"' not in body
    # The JSON API: allowed apps by default, requestable ones on ?all=1.
    import json
    _, raw = await e.call("GET", "/v1/apps", cookie=alice)
    assert [a["name"] for a in json.loads(raw)["apps"]] == ["grafana", "wiki"]
    _, raw = await e.call("GET", "/v1/apps?all=1", cookie=alice)
    assert {a["name"]: a["requestable"] for a in json.loads(raw)["apps"]} == \
        {"grafana": False, "wiki": False, "billing": True}


@pytest_twisted.ensureDeferred
async def test_tcp_app_has_connect_not_launch(env):  # noqa: F811
    """A TCP app's card offers Connect with the exact login and proxy lines, no Launch."""
    e = await env()
    e.registry.add(object(), "agent-2", [AppInfo(
        name="pg", uri="tcp://127.0.0.1:5432", labels={"env": "staging"},
        public_addr="pg.apptunnel.localhost:3080", agent_id="agent-2",
        description="Team database")])
    alice = await e.login("alice", "alice-pw")
    _, body = await e.call("GET", "/web/apps?q=database", cookie=alice)
    page = body.decode()
    card = page[page.index('data-name="pg"'):]
    card = card[:card.index("</li>")]
    assert 'data-type="tcp"' in page and "Team database" in card
    assert "Launch" not in card and "Connect" in card
    assert f"apptunnel proxy app pg --port {suggested_port('pg')}" in card
    assert "apptunnel login --proxy apptunnel.localhost:3080 --user alice --ca-pin" in card


@pytest_twisted.ensureDeferred
async def test_requests_page_create_review_assume(env):  # noqa: F811
    """alice asks on the page, bob approves in his queue, alice assumes in one click and
    billing is hers; the page shows the remaining time."""
    e = await env()
    alice, bob = await e.login("alice", "alice-pw"), await e.login("bob", "bob-pw")
    _, body = await e.call("GET", "/web/requests?app=billing", cookie=alice)
    assert b'value="billing"' in body and b'value="billing-access"' in body
    response, body = await e.call("POST", "/web/requests", cookie=alice, data={
        "role": "billing-access", "reason": "invoice run", "ttl": "3600"})
    assert response.code == 200, body
    rid = re.search(rb'data-request="([^"]+)"', body).group(1).decode()
    assert b"pending" in body
    _, body = await e.call("GET", "/web/requests", cookie=bob)
    assert f'action="/web/requests/{rid}/review"'.encode() in body
    response, body = await e.call("POST", f"/web/requests/{rid}/review", cookie=bob,
                                  data={"verdict": "approve", "reason": "ok"})
    assert response.code == 200 and b"Approved." in body
    _, body = await e.call("GET", "/web/requests", cookie=alice)
    assert f'action="/web/requests/{rid}/assume"'.encode() in body
    response, body = await e.call("POST", f"/web/requests/{rid}/assume", cookie=alice)
    assert response.code == 200 and b"assumed" in body and b"left" in body
    _, body = await e.call("GET", "/web/apps", cookie=alice)
    billing = body.decode()[body.decode().index('data-name="billing"'):]
    assert "Launch" in billing[:billing.index("</li>")]


@pytest_twisted.ensureDeferred
async def test_cross_site_forms_and_fetches_are_refused(env):  # noqa: F811
    """Every state-changing form and API call of the UI refuses a foreign Origin (and a
    form with no Origin or Referer); nothing changes."""
    e = await env()
    alice = await e.login("alice", "alice-pw")
    forms = ["/web/requests", "/web/requests/x/review", "/web/requests/x/assume",
             "/web/logout", "/web/login", "/web/account/totp", "/web/account/webauthn",
             "/web/account/devices/remove", "/web/launch/grafana", "/web/login/mfa",
             "/web/account/sessions/end"]
    for path in forms:
        for origin in (EVIL, None):
            response, body = await e.call("POST", path, cookie=alice, origin=origin,
                                          data={"verdict": "approve", "reason": "x",
                                                "role": "billing-access"})
            assert response.code == 403, (path, origin, response.code)
    api = [("POST", "/v1/access-requests"), ("POST", "/v1/access-requests/x/review"),
           ("POST", "/v1/sessions/assume"), ("DELETE", "/v1/sessions"),
           ("POST", "/v1/sessions"), ("POST", "/v1/mfa/totp"), ("POST", "/v1/mfa/devices"),
           ("DELETE", "/v1/mfa/devices/x"), ("POST", "/v1/certs"),
           ("DELETE", "/v1/sessions/all")]
    for method, path in api:
        response, _ = await e.call(method, path, cookie=alice, origin=EVIL,
                                   headers={"Content-Type": "application/json"},
                                   data=b'{"roles": ["billing-access"], "reason": "x"}')
        assert response.code == 403, (method, path, response.code)
    _, body = await e.call("GET", "/web/requests", cookie=alice)
    assert b"data-request=" not in body          # no request was created
    response, _ = await e.call("GET", "/web/apps", cookie=alice)
    assert response.code == 200                  # and the session still works


@pytest_twisted.ensureDeferred
async def test_static_assets_revalidate_and_favicon(env):  # noqa: F811
    """Static files carry an ETag with no-cache (304 on a match); /favicon.ico is served."""
    e = await env()
    response, body = await e.call("GET", "/static/app.css")
    etag = header(response, "etag")
    assert response.code == 200 and etag and header(response, "cache-control") == \
        "public, no-cache"
    again, body = await e.call("GET", "/static/app.css", headers={"If-None-Match": etag})
    assert again.code == 304 and body == b""
    icon, body = await e.call("GET", "/favicon.ico")
    assert icon.code == 200 and body.startswith(b"<svg")
    assert attrs  # imported for fixtures that evolve records


@pytest_twisted.ensureDeferred
async def test_account_shows_me_and_signs_out_everywhere(env):  # noqa: F811
    """The account page lists roles and both of alice's sessions; "sign out everywhere"
    ends both (the other browser's cookie opens nothing) and is audited."""
    import json
    e = await env()
    one, two = await e.login("alice", "alice-pw"), await e.login("alice", "alice-pw")
    bob = await e.login("bob", "bob-pw")
    _, body = await e.call("GET", "/web/account", cookie=one)
    page = body.decode()
    assert "dev" in page and page.count("<code>") >= 2 and "this browser" in page
    _, raw = await e.call("GET", "/v1/account", cookie=two)
    me = json.loads(raw)
    assert me["user"] == "alice" and me["roles"] == ["dev"] and len(me["sessions"]) == 2
    assert sum(s["current"] for s in me["sessions"]) == 1
    response, _ = await e.call("POST", "/web/account/sessions/end", cookie=one)
    assert response.code == 303 and header(response, "location") == "/web/login"
    for cookie in (one, two):
        response, _ = await e.call("GET", "/web/apps", cookie=cookie)
        assert response.code == 302
    response, _ = await e.call("GET", "/web/apps", cookie=bob)
    assert response.code == 200                  # nobody else's session ended
    events = await e.events("session.web.end")
    assert any(ev.fields.get("everywhere") for ev in events)
