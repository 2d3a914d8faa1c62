"""Access requests (issue 11): the pure rules (auth/access_requests.py), the watcher that
ends elevations on time (auth/request_watch.py), the access policy's grants and live
re-check, the service's refusals and the webhook's retries, on a MemoryBackend and a
Clock (no network, no reactor)."""

from __future__ import annotations

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from apptunnel.auth.access import AccessPolicy, Allow, Deny, Facts, LiveRecheck
from apptunnel.auth.access_requests import (
    APPROVED,
    DENIED,
    EXPIRED,
    PENDING,
    RequestError,
    apply_review,
    current_state,
    expired,
    granted_roles,
    may_see,
    new_request,
    new_request_id,
    plan_request,
    review_problem,
    roles_for_app,
    valid_request_id,
)
from apptunnel.auth.callers import Caller
from apptunnel.auth.directory import Entry, effective_identity
from apptunnel.auth.rbac import RoleSet, parse_role
from apptunnel.auth.request_service import AccessRequestService, RequestNotices
from apptunnel.auth.request_watch import RequestWatcher
from apptunnel.auth.request_webhook import RequestWebhook, backoff, safe_url
from apptunnel.backend.memory import MemoryBackend
from apptunnel.backend.records import AccessRequest, Review
from apptunnel.catalog import AppInfo

NOW = 1_000_000.0
PROD = AppInfo("prod", "http://127.0.0.1:1", {"env": "prod"})
DEV = AppInfo("dev", "http://127.0.0.1:2", {"env": "dev"})


def role(name, spec):
    return parse_role({"kind": "role", "metadata": {"name": name}, "spec": spec})


ROLES = {
    "dev": role("dev", {"allow": {"app_labels": {"env": "dev"},
                                  "request": {"roles": ["prod", "db"], "max_duration": "2h"}}}),
    "strict": role("strict", {"options": {"request_access": "reason"},
                              "allow": {"request": {"roles": ["prod"], "max_duration": "30m",
                                                    "thresholds": [{"approve": 2, "deny": 2}]}}}),
    "prod": role("prod", {"allow": {"app_labels": {"env": "prod"}}}),
    "db": role("db", {"allow": {"app_labels": {"env": "db"}}}),
    "reviewer": role("reviewer", {"allow": {"review_requests": {"roles": ["prod"]}}}),
}


def held(*names):
    return RoleSet([ROLES[n] for n in names])


def request(**kw) -> AccessRequest:
    plan = plan_request(held("dev"), kw.pop("roles", ["prod"]), kw.pop("apps", ()), "why",
                        None, 3600.0)
    return attrs.evolve(new_request(new_request_id(), kw.pop("user", "alice"), plan, NOW), **kw)


# -- the rules --------------------------------------------------------------------------


def test_ids_are_128_random_bits_in_hex():
    """Never sequential, never guessable: 32 hex digits from the system's CSPRNG."""
    ids = {new_request_id() for _ in range(200)}
    assert len(ids) == 200 and all(valid_request_id(i) for i in ids)
    assert not valid_request_id("../" + "a" * 29) and not valid_request_id(42)


def test_plan_checks_the_roles_the_requester_may_ask_for():
    """Only requestable roles, never ones already held, never none; a reason when a role
    says so; the TTL capped by the smallest max_duration; thresholds from the roles."""
    plan = plan_request(held("dev"), ["prod"], (), "incident", None, 43200.0)
    assert (plan.roles, plan.ttl, plan.approve, plan.deny) == (("prod",), 7200.0, 1, 1)
    assert plan_request(held("dev"), ["prod"], (), "", 60, 43200.0).ttl == 60.0
    with pytest.raises(RequestError, match="do not allow requesting role 'reviewer'"):
        plan_request(held("dev"), ["reviewer"], (), "", None, 43200.0)
    with pytest.raises(RequestError, match="already hold"):
        plan_request(held("dev", "prod"), ["prod"], (), "", None, 43200.0)
    with pytest.raises(RequestError, match="at least one role"):
        plan_request(held("dev"), [], (), "", None, 43200.0)
    with pytest.raises(RequestError, match="require a reason"):
        plan_request(held("dev", "strict"), ["prod"], (), "  ", None, 43200.0)
    strict = plan_request(held("dev", "strict"), ["prod"], (), "why", 86400, 43200.0)
    assert (strict.ttl, strict.approve, strict.deny) == (1800.0, 2, 1)
    for bad in ("a\nb", "x" * 2000, 5):
        with pytest.raises(RequestError):
            plan_request(held("dev"), ["prod"], (), bad, None, 43200.0)
    for ttl in (0, -1, True, "1h"):
        with pytest.raises(RequestError):
            plan_request(held("dev"), ["prod"], (), "", ttl, 43200.0)


def test_roles_for_an_app_are_the_requestable_roles_that_open_it():
    """`--app prod` asks for the requestable roles whose allow matches the app."""
    candidates = [ROLES["prod"], ROLES["db"]]
    assert roles_for_app(candidates, PROD.labels, {}) == ("prod",)
    assert roles_for_app(candidates, {"env": "other"}, {}) == ()


def test_review_problems():
    """Never your own, only roles you may review, once each, only while pending."""
    r = request()
    ok = frozenset({"prod"})
    assert "own request" in review_problem(r, "alice", ok, NOW).message
    assert "reviewing requests for role 'prod'" in review_problem(r, "bob", frozenset(), NOW
                                                                  ).message
    assert review_problem(r, "bob", ok, NOW) is None
    once = apply_review(attrs.evolve(r, approve=2), Review("bob", True, "", NOW))
    assert "already reviewed" in review_problem(once, "bob", ok, NOW).message
    done = apply_review(r, Review("bob", True, "", NOW))
    assert "already approved" in review_problem(done, "carol", ok, NOW).message
    assert "already expired" in review_problem(r, "bob", ok, r.expires).message


@settings(max_examples=200, deadline=None)
@given(approve=st.integers(1, 4), deny=st.integers(1, 4),
       verdicts=st.lists(st.booleans(), min_size=1, max_size=10))
def test_thresholds_decide_whichever_count_is_reached_first(approve, deny, verdicts):
    """For any sequence of distinct reviewers: the request is denied when the denials
    reach their threshold first, approved when the approvals do, and pending until one
    does; once decided, it never changes and nobody may review it again."""
    r = attrs.evolve(request(), approve=approve, deny=deny)
    yes = no = 0
    for i, verdict in enumerate(verdicts):
        reviewer = f"r{i}"
        problem = review_problem(r, reviewer, frozenset({"prod"}), NOW)
        if r.state != PENDING:
            assert problem is not None
            continue
        assert problem is None
        r = apply_review(r, Review(reviewer, verdict, "", NOW + i))
        yes, no = yes + verdict, no + (not verdict)
        if no >= deny:
            assert r.state == DENIED
        elif yes >= approve:
            assert r.state == APPROVED and r.expires == NOW + i + r.ttl
        else:
            assert r.state == PENDING


def test_granted_roles_only_for_the_owner_while_approved_and_on_its_apps():
    """An approved request grants its roles to its own user's credentials that assumed
    it, until it ends; one made for an app grants them on that app only."""
    r = apply_review(request(), Review("bob", True, "", NOW))
    scoped = apply_review(request(apps=("prod",)), Review("bob", True, "", NOW))
    pending = request()
    known = {x.id: x for x in (r, scoped, pending)}
    assert granted_roles(known, "alice", [r.id], "dev", NOW) == (("prod",), r.expires)
    assert granted_roles(known, "mallory", [r.id], "dev", NOW) == ((), None)
    assert granted_roles(known, "alice", [pending.id, "f" * 32], "dev", NOW) == ((), None)
    assert granted_roles(known, "alice", [r.id], "dev", r.expires) == ((), None)
    assert granted_roles(known, "alice", [scoped.id], "prod", NOW)[0] == ("prod",)
    assert granted_roles(known, "alice", [scoped.id], "dev", NOW) == ((), None)
    assert granted_roles(known, "alice", [scoped.id], None, NOW) == ((), None)
    assert current_state(r, r.expires) == EXPIRED and expired(r, r.expires).state == EXPIRED
    assert expired(r, NOW) is None


def test_effective_identity_adds_only_the_granted_roles():
    """The one cap: credential roles the user still holds, plus what requests grant now."""
    entry = Entry("alice", ("dev",), {}, 1)
    assert effective_identity(("dev", "prod"), {}, entry) == (("dev",), {})
    assert effective_identity(("dev",), {}, entry, ("prod",)) == (("dev", "prod"), {})
    assert effective_identity(("dev",), {}, None, ("prod",)) is None


def test_requesters_see_theirs_and_reviewers_what_they_may_review():
    r = request()
    assert may_see(r, "alice", frozenset())
    assert not may_see(r, "mallory", frozenset())
    assert may_see(r, "bob", frozenset({"prod", "db"}))


# -- the watcher and the policy ---------------------------------------------------------


class Roles:
    async def role_set(self, names):
        return RoleSet([ROLES[n] for n in names if n in ROLES])


class Users:
    def __init__(self, **entries):
        self.entries = {n: Entry(n, tuple(r), {}, 1) for n, r in entries.items()}

    def current(self, name):
        return self.entries.get(name)

    async def lookup(self, name):
        return self.entries.get(name)

    def add_listener(self, fn):
        pass


class Audit:
    def __init__(self):
        self.events = []

    def emit(self, type, **fields):
        self.events.append((type, fields))

    def of(self, type):
        return [f for t, f in self.events if t == type]


def run(d):
    out = []
    (d if isinstance(d, Deferred) else Deferred.fromCoroutine(d)).addBoth(out.append)
    assert out, "waited on something"
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


@attrs.define
class World:
    clock: Clock
    backend: MemoryBackend
    audit: Audit
    watcher: RequestWatcher
    service: AccessRequestService
    policy: AccessPolicy
    sent: list


@pytest.fixture
def w():
    clock, backend, audit, sent = Clock(), MemoryBackend(), Audit(), []
    clock.advance(NOW)
    hook = RequestWebhook("https://hooks.example/secret-path", clock,
                          lambda url, body: succeed(200))
    hook.send = sent.append
    notices = RequestNotices(audit, clock, hook)
    watcher = RequestWatcher(backend, clock, on_expired=notices.expired)
    users = Users(alice=["dev"], bob=["reviewer"], carol=["reviewer"], mallory=["dev"])
    service = AccessRequestService(backend=backend, roles=Roles(), notices=notices,
                                   watcher=watcher, clock=clock,
                                   find_app={"prod": PROD, "dev": DEV}.get,
                                   default_ttl=43200.0, users=users)
    policy = AccessPolicy(roles=Roles(), audit=audit, clock=clock, users=users,
                          requests=watcher)
    return World(clock, backend, audit, watcher, service, policy, sent)


def caller(user="alice", requests=(), credential="c1", roles=("dev",)):
    return Caller(user, roles, {}, "certificate", credential, NOW + 86400, requests=requests)


def approved(w, ttl=60, app=None, reviewer="bob"):
    roles = [] if app else ["prod"]
    r = run(w.service.create(caller(), roles, app, "incident", ttl))
    return run(w.service.review(caller(reviewer, roles=("reviewer",)), r.id, True, "ok"))


def test_an_approved_request_elevates_the_credential_that_assumed_it_until_it_ends(w):
    """Approve: a credential naming the request opens prod (the decision is cached no
    longer than the elevation); at its end the watcher tells listeners, the decision
    is a denial, and the request is recorded expired once, audited and sent."""
    r = approved(w)
    assert r.state == APPROVED and r.expires == NOW + 60
    assert isinstance(run(w.policy.decide(caller(), PROD, Facts(), w.clock.seconds())), Deny)
    elevated = caller(requests=(r.id,), credential="c2")
    decision = run(w.policy.decide(elevated, PROD, Facts(), w.clock.seconds()))
    assert isinstance(decision, Allow) and decision.roles == ("dev", "prod")
    heard = []
    w.watcher.add_listener(heard.append)
    w.clock.advance(60)
    assert heard == ["alice"]
    assert isinstance(run(w.policy.decide(elevated, PROD, Facts(), w.clock.seconds())), Deny)
    assert run(w.backend.get_access_request(r.id)).state == EXPIRED
    run(w.watcher.refresh())
    assert len(w.audit.of("access_request.expire")) == 1
    assert [d["state"] for d in w.sent] == [PENDING, APPROVED, EXPIRED]
    assert set(w.sent[0]) == {"id", "user", "roles", "apps", "state", "reason", "reviews"}


def test_someone_elses_request_id_grants_nothing(w):
    """mallory's credential naming alice's approved request: no prod."""
    r = approved(w)
    forged = caller("mallory", requests=(r.id,))
    assert isinstance(run(w.policy.decide(forged, PROD, Facts(), NOW)), Deny)
    with pytest.raises(RequestError, match="no such access request"):
        run(w.service.assumable(caller("mallory"), r.id))


def test_a_request_for_an_app_opens_that_app_only(w):
    """--app prod: the roles that open prod, granted on prod alone."""
    r = approved(w, app="prod")
    assert r.roles == ("prod",) and r.apps == ("prod",)
    elevated = caller(requests=(r.id,))
    assert isinstance(run(w.policy.decide(elevated, PROD, Facts(), NOW)), Allow)
    with pytest.raises(RequestError, match="no role you may request opens dev"):
        run(w.service.create(caller(), [], "dev", "x", None))
    with pytest.raises(RequestError, match="no app named"):
        run(w.service.create(caller(), [], "nope", "x", None))


def test_live_recheck_cuts_a_connection_when_the_elevation_ends(w):
    """A live connection of the elevated credential is refused at the elevation's end,
    not at the next poll."""
    r = approved(w)

    class Conn:
        caller = caller(requests=(r.id,))
        app_name = "prod"
        cut = None

        def refused(self, deny):
            self.cut = deny

    conn = Conn()
    LiveRecheck(w.policy, w.clock, lambda: [conn], {"prod": PROD}.get)
    run(w.policy.decide(conn.caller, PROD, Facts(), NOW))
    w.clock.advance(59)
    assert conn.cut is None
    w.clock.advance(1)
    assert isinstance(conn.cut, Deny) and conn.cut.code == "rbac"


def test_service_refusals(w):
    """Self-review, a reviewer without review_requests, a second review and an unknown
    or malformed id are refused; others' requests are invisible (404 like unknown)."""
    r = run(w.service.create(caller(), ["prod"], None, "x", None))
    for who, roles, message in (("alice", ("dev",), "own request"),
                                ("mallory", ("dev",), "no such access request")):
        with pytest.raises(RequestError, match=message):
            run(w.service.review(caller(who, roles=roles), r.id, True, ""))
    for rid in ("0" * 32, "../x", ""):
        with pytest.raises(RequestError, match="no such access request"):
            run(w.service.show(caller("bob"), rid))
    assert [x.id for x in run(w.service.list(caller("bob")))] == [r.id]
    assert run(w.service.list(caller("mallory"))) == []


def test_two_watchers_record_an_expiry_once(w):
    """Two proxies on one store: only the one whose compare-and-set wins audits it."""
    r = approved(w)
    other_audit = Audit()
    other = RequestWatcher(w.backend, w.clock,
                           on_expired=RequestNotices(other_audit, w.clock).expired)
    run(other.refresh())
    w.clock.advance(61)
    run(other.refresh())
    run(w.watcher.refresh())
    assert len(w.audit.of("access_request.expire")) + \
        len(other_audit.of("access_request.expire")) == 1
    assert run(w.backend.get_access_request(r.id)).state == EXPIRED


def test_watcher_polls_approvals_made_elsewhere(w):
    """An approval written by another proxy reaches this one's grants at the next poll."""
    r = approved(w)
    fresh = RequestWatcher(w.backend, w.clock)
    assert fresh.granted("alice", [r.id], "prod", NOW) == ((), None)
    run(fresh.refresh())
    assert fresh.granted("alice", [r.id], "prod", NOW)[0] == ("prod",)


# -- the webhook ------------------------------------------------------------------------


def test_webhook_retries_with_backoff_then_gives_up_with_one_line(capsys):
    """Failures are retried after 1, 2, 4... seconds, a bounded number of times; giving
    up logs one line without the URL's path; send never raises or blocks."""
    from twisted.logger import globalLogPublisher

    clock, calls, lines = Clock(), [], []
    observer = lines.append
    globalLogPublisher.addObserver(observer)
    try:
        hook = RequestWebhook("https://hooks.example:8443/T0k3n/xyz?k=secret", clock,
                              lambda url, body: calls.append(clock.seconds()) or fail(
                                  OSError("refused")), attempts=4)
        hook.send({"id": "r1", "state": "approved"})
        assert calls == [0.0] and hook.in_flight == 1
        clock.pump([0.5] * 20)
        assert calls == [0.0, 1.0, 3.0, 7.0] and hook.in_flight == 0
    finally:
        globalLogPublisher.removeObserver(observer)
    from twisted.logger import formatEvent

    gave_up = [formatEvent(e) for e in lines if "gave up" in (e.get("log_format") or "")]
    assert len(gave_up) == 1
    assert "r1" in gave_up[0] and "hooks.example:8443" in gave_up[0]
    assert "T0k3n" not in gave_up[0] and "secret" not in gave_up[0]
    assert safe_url("https://h/a?b") == "https://h/..." and backoff(10) == 30.0


def test_webhook_succeeds_after_a_failure_and_bounds_what_is_in_flight():
    clock, answers = Clock(), [503, 200]
    hook = RequestWebhook("https://h/x", clock, lambda url, body: succeed(answers.pop(0)),
                          max_in_flight=1)
    hook.send({"id": "a"})
    hook.send({"id": "b"})       # dropped: one already in flight
    clock.advance(1)
    assert answers == [] and hook.in_flight == 0


def test_pending_requests_per_user_are_bounded(w):
    """A user cannot fill storage with requests nobody reviews."""
    from apptunnel.auth.request_service import MAX_PENDING_PER_USER

    for _ in range(MAX_PENDING_PER_USER):
        run(w.service.create(caller(), ["prod"], None, "x", None))
    with pytest.raises(RequestError, match="pending requests") as info:
        run(w.service.create(caller(), ["prod"], None, "x", None))
    assert info.value.status == 429


# -- configuration ----------------------------------------------------------------------


@pytest.mark.parametrize("body,problem", [
    ("access_requests: {webhook_url: 'http://h/x'}",
     "access_requests.webhook_url: expected an https:// URL"),
    ("access_requests: {webhook_url: 'https://u:p@h/x'}", "must not hold a user name or password"),
    ("access_requests: {webhook_url: 'https://h:99999/x'}", "invalid port"),
    ("access_requests: {}", "access_requests.webhook_url: required key is missing"),
    ("access_requests: {webhook_url: 'https://h/x', retries: 3}",
     "access_requests.retries: unknown key"),
])
def test_config_refuses_what_is_not_enforced(tmp_path, body, problem):
    """One line `file:line: key: problem` for each bad access_requests setting."""
    from apptunnel.config import ConfigError, load_proxy_config

    path = tmp_path / "proxy.yaml"
    path.write_text(f"data_dir: {tmp_path}\npublic_addr: a.localhost:3080\n{body}\n")
    with pytest.raises(ConfigError) as info:
        load_proxy_config(str(path))
    text = str(info.value)
    assert text.startswith(f"{path}:") and problem in text and "\n" not in text


def test_config_reads_the_webhook_and_a_bad_ca_file_is_one_line(tmp_path):
    from apptunnel.config import ConfigError, load_proxy_config
    from apptunnel.proxy.service import _request_webhook

    path = tmp_path / "proxy.yaml"
    path.write_text(f"data_dir: {tmp_path}\npublic_addr: a.localhost:3080\naccess_requests:\n"
                    "  webhook_url: https://hooks.example/x\n  ca_file: missing.pem\n")
    config = load_proxy_config(str(path))
    assert config.access_requests.webhook_url == "https://hooks.example/x"
    assert config.access_requests.ca_file == str(tmp_path / "missing.pem")
    with pytest.raises(ConfigError, match="access_requests: ca_file: cannot load"):
        _request_webhook(config, Clock())
    (tmp_path / "missing.pem").write_text("not a certificate")
    with pytest.raises(ConfigError, match="access_requests: ca_file: cannot load"):
        _request_webhook(config, Clock())


def test_an_approval_noted_during_a_poll_is_not_undone_by_it(w):
    """A poll that read storage before an approval on this proxy must not drop the grant
    (and cut the connections it just opened) until the next poll."""
    r = run(w.service.create(caller(), ["prod"], None, "x", None))
    slow = Deferred()
    real = w.backend.list_access_requests

    async def stale(**kw):
        found = await real(**kw)
        await slow
        return found

    w.backend.list_access_requests = stale
    polling = Deferred.fromCoroutine(w.watcher.refresh())
    w.backend.list_access_requests = real
    approved_now = run(w.service.review(caller("bob", roles=("reviewer",)), r.id, True, ""))
    heard = []
    w.watcher.add_listener(heard.append)
    slow.callback(None)
    assert polling.called
    assert w.watcher.granted("alice", [r.id], "prod", NOW)[0] == ("prod",)
    assert heard == [] and approved_now.state == APPROVED


def test_a_live_recheck_of_an_older_caller_does_not_hide_a_newly_assumed_request(w):
    """A web session assumes a request: its app session's live connection is re-checked
    with the caller it started with, and that answer must not be what the app session's
    next request (the same credential, now naming the request) gets from the cache."""
    r = run(w.service.create(caller(), ["prod"], None, "x", None))

    class Conn:
        caller = Caller("alice", ("dev",), {}, "session", "app-session-1", NOW + 3600)
        app_name = "dev"

        def refused(self, deny):
            raise AssertionError(deny)

    LiveRecheck(w.policy, w.clock, lambda: [Conn()], {"dev": DEV, "prod": PROD}.get)
    assert run(w.policy.decide(Conn.caller, DEV, Facts(), NOW)).roles == ("dev",)
    run(w.service.review(caller("bob", roles=("reviewer",)), r.id, True, ""))
    w.service.assumed(caller(), run(w.service.assumable(caller(), r.id)), "web session")
    now_naming = attrs.evolve(Conn.caller, requests=(r.id,))
    assert run(w.policy.decide(now_naming, DEV, Facts(), NOW)).roles == ("dev", "prod")


def test_a_refusal_says_how_to_ask_when_a_requestable_role_opens_the_app(w):
    """Denied by RBAC, but a role the user may request opens the app: the message says
    how to ask; for an app no requestable role opens, the default refusal stays."""
    denied = run(w.policy.decide(caller(), PROD, Facts(), NOW))
    assert isinstance(denied, Deny) and "apptunnel request create --app prod" in denied.message
    other = AppInfo("other", "http://127.0.0.1:3", {"env": "other"})
    assert run(w.policy.decide(caller(), other, Facts(), NOW)).message == ""
