"""AccessPolicy: every outcome, the decision cache, revision invalidation and the lock-audit
throttle, on fakes and a Clock (no storage, no reactor)."""

from __future__ import annotations

import attrs
import pytest
from twisted.internet.task import Clock

from apptunnel.auth.access import (
    LIVE, AccessPolicy, Allow, Deny, Facts, LiveRecheck, NeedsMore,
)
from apptunnel.auth.callers import Caller
from apptunnel.auth.directory import REMOVED_MESSAGE
from apptunnel.auth.locks import LOCK_AUDIT_INTERVAL, LockAudit
from apptunnel.auth.rbac import parse_role
from apptunnel.backend.records import Lock
from apptunnel.catalog import AppInfo
from tests.support.access_fakes import NOW, Locks, Roles, Users, cert, run
from tests.support.audit_fake import Audit

GRAFANA = AppInfo("grafana", "http://127.0.0.1:3000", {"env": "dev"}, "grafana.example.com")
PROD = AppInfo("prod", "http://127.0.0.1:3001", {"env": "prod"}, "prod.example.com")


@attrs.define
class World:
    clock: Clock
    roles: Roles
    locks: Locks
    users: Users
    audit: Audit
    policy: AccessPolicy

    def decide(self, caller, app=GRAFANA, facts=Facts(client_ip="10.0.0.1", method="GET", path="/")):
        return run(self.policy.decide(caller, app, facts, self.clock.seconds()))


@pytest.fixture
def w():
    clock = Clock()
    clock.advance(NOW)
    roles, locks, users, audit = Roles(), Locks(), Users(alice=("dev",), bob=("dev", "ops")), Audit()
    policy = AccessPolicy(roles=roles, audit=audit, clock=clock, locks=locks, users=users)
    return World(clock, roles, locks, users, audit, policy)


def test_allow_carries_the_roles_that_allowed_it(w):
    """Allow names the rule and the caller as it acts now."""
    decision = w.decide(cert())
    assert isinstance(decision, Allow)
    assert decision.roles == ("dev",) and decision.reason == "allowed by role 'dev'"
    assert w.audit.events == []


def test_rbac_denial_is_403_and_audited_with_the_request_facts(w):
    """No role allows prod: 403, code rbac, one access.denied with ip, method and path."""
    decision = w.decide(cert(), PROD)
    assert decision == Deny(403, "rbac", "no role allows access to this app")
    assert w.audit.of("access.denied") == [{
        "actor": "alice", "target": "prod", "outcome": "failure",
        "reason": "no role allows access to this app", "client_ip": "10.0.0.1",
        "method": "GET", "path": "/"}]


def test_a_lock_refuses_with_its_message_and_audits_lock_enforced(w):
    """A lock on the user: 403 with the lock's text; lock.enforced, not access.denied."""
    w.locks.all.append(Lock("l1", "alice", None, "incident", NOW, None, "admin"))
    decision = w.decide(cert())
    assert isinstance(decision, Deny)
    assert (decision.status, decision.code, decision.message) == (
        403, "locked", "your access is locked: incident")
    assert [f["lock"] for f in w.audit.of("lock.enforced")] == ["l1"]
    assert w.audit.of("access.denied") == []


def test_lock_audit_is_throttled_per_user_and_app_on_the_clock(w):
    """A retry loop gives one lock.enforced per (user, app) per interval."""
    w.locks.all.append(Lock("l1", "alice", None, "", NOW, None, "admin"))
    for _ in range(5):
        w.decide(cert())
    w.decide(cert(), PROD)
    assert [f["target"] for f in w.audit.of("lock.enforced")] == ["grafana", "prod"]
    w.clock.advance(LOCK_AUDIT_INTERVAL)
    w.decide(cert())
    assert len(w.audit.of("lock.enforced")) == 3


def test_the_lock_throttle_is_shared_with_whoever_else_refuses(w):
    """Sessions and the policy share one LockAudit: a refusal by either counts for both."""
    shared = LockAudit(w.audit, w.clock)
    policy = AccessPolicy(roles=w.roles, audit=w.audit, clock=w.clock, locks=w.locks,
                          users=w.users, lock_audit=shared)
    lock = Lock("l1", "alice", None, "", NOW, None, "admin")
    w.locks.all.append(lock)
    shared.enforced(lock, "alice", "grafana", "app session")
    run(policy.decide(cert(), GRAFANA, Facts(), NOW))
    assert len(w.audit.of("lock.enforced")) == 1


def test_a_removed_user_is_nobody(w):
    """A credential of a user who no longer exists: 403 'your user account no longer exists'."""
    del w.users.entries["alice"]
    decision = w.decide(cert())
    assert decision == Deny(403, "user_removed", "user removed", REMOVED_MESSAGE)
    assert w.audit.of("access.denied")[0]["reason"] == "user removed"


def test_roles_are_capped_by_what_the_user_holds_now(w):
    """A certificate claiming ops for a user who holds only dev acts as dev."""
    decision = w.decide(cert(roles=("dev", "ops")), PROD)
    assert isinstance(decision, Deny) and decision.code == "rbac"
    allowed = w.decide(cert(user="bob", roles=("dev", "ops"), credential="fp-2"), PROD)
    assert isinstance(allowed, Allow) and allowed.roles == ("dev", "ops")


def test_a_cached_decision_touches_no_storage(w):
    """The second request of a credential within the TTL does no lookup and no role read."""
    w.decide(cert())
    lookups, role_reads = w.users.lookups, w.roles.calls
    for _ in range(3):
        assert isinstance(w.decide(cert()), Allow)
    assert (w.users.lookups, w.roles.calls) == (lookups, role_reads)
    assert isinstance(w.policy.recall("fp-1", "alice", GRAFANA, Facts(), NOW), Allow)


def test_the_cache_expires_and_a_credential_never_outlives_itself(w):
    """After the TTL the policy asks again; an entry never outlasts the credential."""
    w.decide(cert())
    w.clock.advance(5.0)
    assert w.policy.recall("fp-1", "alice", GRAFANA, Facts(), w.clock.seconds()) is None
    w.decide(cert(credential="short", expires=w.clock.seconds() + 1))
    w.clock.advance(1.0)
    assert w.policy.recall("short", "alice", GRAFANA, Facts(), w.clock.seconds()) is None


def test_a_user_change_invalidates_cached_decisions(w):
    """A new directory revision for the user: the next request is decided afresh."""
    assert isinstance(w.decide(cert(user="bob", roles=("dev", "ops"), credential="b"), PROD), Allow)
    w.users.set("bob", ("dev",))
    decision = w.decide(cert(user="bob", roles=("dev", "ops"), credential="b"), PROD)
    assert isinstance(decision, Deny) and decision.code == "rbac"


def test_forget_drops_one_entry_or_all(w):
    """forget(credential, app) after a logout; forget() after roles were edited."""
    w.decide(cert())
    w.decide(cert(credential="fp-2"))
    w.policy.forget("fp-1", "grafana")
    assert w.policy.recall("fp-1", "alice", GRAFANA, Facts(), NOW) is None
    assert w.policy.recall("fp-2", "alice", GRAFANA, Facts(), NOW) is not None
    w.policy.forget()
    assert w.policy.recall("fp-2", "alice", GRAFANA, Facts(), NOW) is None


def test_the_cache_is_bounded(w):
    """A flood of credentials never grows the cache past its bound."""
    policy = AccessPolicy(roles=w.roles, audit=w.audit, clock=w.clock, users=w.users, max_cached=3)
    for i in range(10):
        run(policy.decide(cert(credential=f"c{i}"), GRAFANA, Facts(), NOW))
    assert sum(policy.recall(f"c{i}", "alice", GRAFANA, Facts(), NOW) is not None
               for i in range(10)) <= 3


def test_a_websocket_from_a_wrong_origin_is_refused_even_when_cached(w):
    """The router's origin verdict is a per-request fact, applied after the cache."""
    w.decide(cert())
    facts = Facts(client_ip="1.2.3.4", method="GET", path="/ws", upgrade=True, origin_ok=False)
    decision = w.decide(cert(), GRAFANA, facts)
    assert decision == Deny(403, "origin", "WebSocket origin mismatch")
    assert w.audit.of("access.denied")[-1]["reason"] == "WebSocket origin mismatch"
    assert isinstance(w.decide(cert(), GRAFANA, facts._replace(origin_ok=True)), Allow)


def test_without_an_app_the_question_is_may_they_act_at_all(w):
    """app None (/v1/certs, /v1/apps): a user lock or a removed user refuses, roles capped."""
    decision = w.decide(cert(roles=("dev", "ops")), None, Facts(where="certificate"))
    assert isinstance(decision, Allow) and decision.roles == ("dev",)
    w.locks.all.append(Lock("l1", None, "grafana", "", NOW, None, "admin"))
    assert isinstance(w.decide(cert(), None, Facts()), Allow)   # an app lock is not a user lock
    w.locks.all.append(Lock("l2", "alice", None, "", NOW, None, "admin"))
    assert w.decide(cert(), None, Facts()).code == "locked"
    del w.users.entries["bob"]
    assert w.decide(cert(user="bob"), None, Facts()).code == "user_removed"


def test_the_catalogue_lists_allowed_apps_without_auditing(w):
    """allowed_apps keeps the order given and emits nothing for the apps left out."""
    apps = [PROD, GRAFANA]
    assert run(w.policy.allowed_apps(cert(), apps, NOW)) == [GRAFANA]
    bob = cert(user="bob", roles=("dev", "ops"), credential="b")
    assert run(w.policy.allowed_apps(bob, apps, NOW)) == apps
    assert w.audit.events == []


def test_needs_more_exists_for_the_next_features():
    """NeedsMore is a plain value the entry points already treat as 'not allowed'."""
    assert NeedsMore("mfa") != NeedsMore("access_request")


def test_without_locks_or_directory_only_rbac_decides():
    """Each collaborator is optional: without them, RBAC on the credential's own roles."""
    audit = Audit()
    policy = AccessPolicy(roles=Roles(), audit=audit, clock=Clock())
    assert isinstance(run(policy.decide(cert(roles=("ops",)), PROD, Facts(), NOW)), Allow)


class Conn:
    def __init__(self, caller, app_name):
        self.caller, self.app_name, self.refusals = caller, app_name, []

    def refused(self, deny):
        self.refusals.append(deny)


def test_live_recheck_cuts_what_the_policy_now_refuses(w):
    """A lock cuts the covered connections (one lock.enforced each); a user change re-asks."""
    conns = [Conn(cert(), "grafana"), Conn(cert(credential="fp-2"), "grafana"),
             Conn(cert(user="bob", roles=("dev", "ops"), credential="b"), "prod")]
    LiveRecheck(w.policy, w.clock, lambda: conns, {"grafana": GRAFANA, "prod": PROD}.get,
                locks=w.locks, users=w.users)
    lock = Lock("l1", "alice", None, "", NOW, None, "admin")
    w.locks.all.append(lock)
    w.locks.listener(lock)
    assert [len(c.refusals) for c in conns] == [1, 1, 0]
    assert [f["where"] for f in w.audit.of("lock.enforced")] == [LIVE, LIVE]
    w.users.set("bob", ("dev",))
    w.users.listener("bob", w.users.entries["bob"])
    assert conns[2].refusals[0].code == "rbac"
    assert w.audit.of("access.denied")[-1]["where"] == LIVE


def test_revoked_answers_from_memory_for_a_session_that_was_still_opening(w):
    """A lock or a removal seen between the decision and the stream opening refuses it."""
    assert w.policy.revoked("alice", "grafana") is None
    w.locks.all.append(Lock("l1", "alice", "grafana", "incident", NOW, None, "admin"))
    assert w.policy.revoked("alice", "grafana").message == "your access is locked: incident"
    assert w.policy.revoked("alice", "prod") is None
    del w.users.entries["bob"]
    assert w.policy.revoked("bob", "grafana") == Deny(403, "user_removed", "user removed",
                                                      REMOVED_MESSAGE)
    assert w.audit.events == []   # a question, not a refusal: the caller audits what it does


# -- per-session MFA (issue 10) ------------------------------------------------------------


def mfa_world(w):
    """alice holds "prod-mfa" (prod apps, require_session_mfa) and "dev" (no MFA)."""
    w.roles.roles["prod-mfa"] = parse_role({
        "kind": "role", "metadata": {"name": "prod-mfa"},
        "spec": {"options": {"require_session_mfa": True},
                 "allow": {"app_labels": {"env": "prod"}}}})
    w.users.set("alice", ("dev", "prod-mfa"))
    return w


def test_session_mfa_role_needs_more_until_the_credential_carries_it(w):
    """A role that allows the app and asks for MFA: NeedsMore("mfa") without a fresh
    factor for THIS app; a credential verified for another app does not count; one for
    this app is allowed; apps the role does not cover need nothing (as Teleport)."""
    mfa_world(w)
    plain = cert(roles=("dev", "prod-mfa"))
    decision = w.decide(plain, PROD)
    assert isinstance(decision, NeedsMore) and decision.kind == "mfa"
    assert "needs a second factor" in decision.message
    assert isinstance(w.decide(plain, GRAFANA), Allow)
    other = Caller("alice", ("dev", "prod-mfa"), {}, "session", "app-2", NOW + 60, "grafana")
    assert isinstance(w.decide(other, PROD), NeedsMore)
    verified = Caller("alice", ("dev", "prod-mfa"), {}, "session", "app-1", NOW + 60, "prod")
    assert isinstance(w.decide(verified, PROD), Allow)
    assert w.audit.of("access.denied") == []


def test_session_mfa_needs_more_is_cached_per_credential_and_follows_the_user(w):
    """The cached NeedsMore stays NeedsMore; removing the MFA role from the user
    (a directory revision) re-decides at once: no MFA role, no prompt, no access."""
    mfa_world(w)
    plain = cert(roles=("dev", "prod-mfa"))
    assert isinstance(w.decide(plain, PROD), NeedsMore)
    assert isinstance(w.decide(plain, PROD), NeedsMore)
    w.users.set("alice", ("dev", "ops"))
    assert isinstance(w.decide(plain, PROD), Deny)


def test_one_app_mfa_certificate_opens_only_its_app(w):
    """A certificate bound to prod (mfa_app) is allowed on prod, refused on every other
    app (even one that asks no MFA) and for "may act at all" (no API, no renewal)."""
    mfa_world(w)
    bound = Caller("alice", ("dev", "prod-mfa"), {}, "certificate", "fp-b", NOW + 3600, "prod")
    assert isinstance(w.decide(bound, PROD), Allow)
    refused = w.decide(bound, GRAFANA)
    assert isinstance(refused, Deny) and refused.code == "mfa_binding"
    assert refused.message == "this certificate only opens prod"
    assert [e["target"] for e in w.audit.of("access.denied")] == ["grafana"]
    assert isinstance(w.decide(bound, None), Deny)


def test_session_mfa_never_allows_what_rbac_denies(w):
    """The MFA question comes after RBAC: a deny role wins, verified or not."""
    mfa_world(w)
    w.users.set("alice", ("prod-mfa", "no-prod"))
    verified = Caller("alice", ("prod-mfa", "no-prod"), {}, "session", "a", NOW + 60, "prod")
    assert isinstance(w.decide(verified, PROD), Deny)
    assert isinstance(w.decide(cert(roles=("prod-mfa", "no-prod")), PROD), Deny)


def test_live_recheck_does_not_cut_a_started_session_for_needs_more(w):
    """A role starting to ask for MFA does not end sessions already running (Teleport);
    a refusal still does."""
    mfa_world(w)
    cut = []

    @attrs.define
    class Conn:
        caller: Caller
        app_name: str

        def refused(self, deny):
            cut.append(deny)

    conns = [Conn(cert(roles=("dev", "prod-mfa")), "prod")]
    LiveRecheck(w.policy, w.clock, lambda: conns, {"prod": PROD}.get, users=w.users)
    w.users.set("alice", ("dev", "prod-mfa"))
    w.users.listener("alice", w.users.current("alice"))
    assert cut == []
    w.users.set("alice", ("dev",))
    w.users.listener("alice", w.users.current("alice"))
    assert len(cut) == 1 and isinstance(cut[0], Deny)


def test_the_catalogue_lists_apps_that_ask_for_a_second_factor(w):
    """Allowed but needing a factor is still the user's app: listed, opening it prompts."""
    mfa_world(w)
    listed = run(w.policy.allowed_apps(cert(roles=("dev", "prod-mfa")), [GRAFANA, PROD], NOW))
    assert listed == [GRAFANA, PROD]
