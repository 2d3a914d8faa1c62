"""The access-request JSON API (web/access_requests.py mounted by web/routes.py) in memory:
who may call it, hostile bodies and ids, and the web session that assumes a request."""

from __future__ import annotations

import json

import pytest_twisted

from tests.support.requests_env import env  # noqa: F401  (the fixture)



async def call(e, method, path, cookie=None, body=None, **kwargs):
    headers = {"Content-Type": "application/json"} if body is not None else {}
    data = json.dumps(body).encode() if body is not None else None
    response, raw = await e.call(method, path, cookie=cookie, headers=headers, data=data,
                                 **kwargs)
    return response.code, json.loads(raw) if raw else None


@pytest_twisted.ensureDeferred
async def test_request_review_assume_opens_the_app_in_the_web_session(env):
    """alice requests billing-access, bob approves, alice's web session assumes it:
    /v1/apps lists billing; the audit has create, review and assume."""
    e = await env()
    alice, bob = await e.login("alice", "alice-pw"), await e.login("bob", "bob-pw")
    code, apps = await call(e, "GET", "/v1/apps", alice)
    assert "billing" not in {a["name"] for a in apps["apps"]}
    code, created = await call(e, "POST", "/v1/access-requests", alice,
                               {"roles": ["billing-access"], "reason": "invoice run"})
    assert code == 200 and created["state"] == "pending", created
    code, listed = await call(e, "GET", "/v1/access-requests", bob)
    assert [r["id"] for r in listed["requests"]] == [created["id"]]
    code, reviewed = await call(e, "POST", f"/v1/access-requests/{created['id']}/review", bob,
                                {"approve": True, "reason": "ok"})
    assert code == 200 and reviewed["state"] == "approved"
    code, answer = await call(e, "POST", "/v1/sessions/assume", alice,
                              {"request_id": created["id"]})
    assert code == 200 and "billing-access" in answer["roles"]
    code, apps = await call(e, "GET", "/v1/apps", alice)
    assert "billing" in {a["name"] for a in apps["apps"]}
    for kind in ("create", "review", "assume"):
        assert await e.events(f"access_request.{kind}")


@pytest_twisted.ensureDeferred
async def test_hostile_callers_and_bodies_are_refused(env):
    """No credential 401; a cross-origin POST 403; not JSON 415; garbage 400; another
    user's request and made-up ids are 404 alike; bob cannot assume alice's request."""
    e = await env()
    alice, bob = await e.login("alice", "alice-pw"), await e.login("bob", "bob-pw")
    assert (await call(e, "GET", "/v1/access-requests"))[0] == 401
    assert (await call(e, "POST", "/v1/access-requests", None, {"roles": ["x"]}))[0] == 401
    code, _ = await call(e, "POST", "/v1/access-requests", alice, {"roles": ["billing-access"]},
                         origin="https://evil.example")
    assert code == 403
    response, _ = await e.call("POST", "/v1/access-requests", cookie=alice, data=b"roles=x")
    assert response.code == 415
    for body in ({"roles": "billing-access,,"}, {"roles": [1]}, {"roles": ["billing-access"],
                                                                 "ttl": "1h"},
                 {"app": ["x"]}, {"roles": ["reviewer"]}):
        code, answer = await call(e, "POST", "/v1/access-requests", alice, body)
        assert code in (400, 403), (body, code, answer)
    code, created = await call(e, "POST", "/v1/access-requests", alice,
                               {"roles": ["billing-access"]})
    rid = created["id"]
    other = rid[:-1] + ("1" if rid[-1] == "0" else "0")   # a well-formed id that is not it
    for path in (f"/v1/access-requests/{other}", "/v1/access-requests/..%2f..%2fetc"):
        assert (await call(e, "GET", path, bob))[0] == 404
    code, _ = await call(e, "POST", f"/v1/access-requests/{rid}/review", alice,
                         {"approve": True})
    assert code == 403
    code, _ = await call(e, "POST", f"/v1/access-requests/{rid}/review", bob,
                         {"approve": "yes"})
    assert code == 400
    await call(e, "POST", f"/v1/access-requests/{rid}/review", bob, {"approve": True})
    code, answer = await call(e, "POST", "/v1/sessions/assume", bob, {"request_id": rid})
    assert code == 404 and answer["error"] == "no such access request"
    code, _ = await call(e, "POST", "/v1/sessions/assume", alice, {"request_id": rid},
                         origin="https://evil.example")
    assert code == 403
