"""Admin and audit rules of roles (``allow.rules`` / ``deny.rules``): strict parsing with
key paths, and one pure check, RoleSet.allows(kind, verb), where deny wins."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from apptunnel.auth.rbac import RESOURCE_KINDS, VERBS, RoleError, RoleSet, parse_role


def role(name="r", allow=None, deny=None):
    spec = {}
    if allow is not None:
        spec["allow"] = {"rules": allow}
    if deny is not None:
        spec["deny"] = {"rules": deny}
    return parse_role({"kind": "role", "metadata": {"name": name}, "spec": spec})


def test_auditor_reads_events_and_nothing_else():
    """The documented auditor rule allows list/read on events only."""
    roles = RoleSet([role(allow=[{"resources": ["event"], "verbs": ["list", "read"]}])])
    assert roles.allows("event", "list") and roles.allows("event", "read")
    assert not roles.allows("event", "delete")
    assert not roles.allows("user", "list")


def test_no_rules_no_access():
    """A role without rules (an app role) grants no admin verb at all."""
    plain = parse_role({"kind": "role", "metadata": {"name": "apps"},
                        "spec": {"allow": {"app_labels": {"*": "*"}}}})
    assert not RoleSet([plain]).allows("event", "list")
    assert not RoleSet([]).allows("user", "read")


def test_wildcards_expand_to_every_kind_and_verb():
    admin = RoleSet([role(allow=[{"resources": ["*"], "verbs": ["*"]}])])
    assert all(admin.allows(k, v) for k in RESOURCE_KINDS for v in VERBS)
    assert not admin.allows("nonsense", "list")


def test_deny_in_another_role_wins():
    admin = role("admin", allow=[{"resources": ["*"], "verbs": ["*"]}])
    no_users = role("no-users", deny=[{"resources": ["user"], "verbs": ["delete"]}])
    roles = RoleSet([admin, no_users])
    assert not roles.allows("user", "delete")
    assert roles.allows("user", "update")


@given(st.sets(st.sampled_from(RESOURCE_KINDS), min_size=1),
       st.sets(st.sampled_from(VERBS), min_size=1),
       st.sets(st.sampled_from(RESOURCE_KINDS), min_size=1),
       st.sets(st.sampled_from(VERBS), min_size=1),
       st.sampled_from(RESOURCE_KINDS), st.sampled_from(VERBS))
def test_allows_is_allow_minus_deny(ak, av, dk, dv, kind, verb):
    """For any rules: allowed exactly when an allow covers it and no deny does."""
    r = role(allow=[{"resources": sorted(ak), "verbs": sorted(av)}],
             deny=[{"resources": sorted(dk), "verbs": sorted(dv)}])
    expected = (kind in ak and verb in av) and not (kind in dk and verb in dv)
    assert RoleSet([r]).allows(kind, verb) is expected


@pytest.mark.parametrize("rules, message", [
    ("event", "spec.allow.rules: expected a list"),
    ([{"verbs": ["list"]}], "spec.allow.rules[0].resources: required"),
    ([{"resources": ["event"]}], "spec.allow.rules[0].verbs: required"),
    ([{"resources": [], "verbs": ["list"]}], "spec.allow.rules[0].resources: expected a non-empty"),
    ([{"resources": ["events"], "verbs": ["list"]}],
     "spec.allow.rules[0].resources[0]: unknown resource 'events'"),
    ([{"resources": ["event"], "verbs": ["list", "get"]}],
     "spec.allow.rules[0].verbs[1]: unknown verb 'get'"),
    ([{"resources": ["event"], "verbs": ["list"], "where": "x"}],
     "spec.allow.rules[0].where: rule conditions are not supported"),
    ([{"resources": ["event"], "verbs": ["list"], "extra": 1}],
     "spec.allow.rules[0].extra: unknown key"),
    (["event"], "spec.allow.rules[0]: expected a mapping"),
])
def test_bad_rules_name_the_key_path(rules, message):
    with pytest.raises(RoleError) as info:
        role(allow=rules)
    assert str(info.value).startswith(message), str(info.value)


def test_deny_rules_parse_with_their_own_path():
    with pytest.raises(RoleError, match=r"^spec.deny.rules\[0\].verbs\[0\]"):
        role(deny=[{"resources": ["event"], "verbs": ["write"]}])


def test_example_admin_and_auditor_roles():
    """etc/roles/admin.yaml and auditor.yaml say what the operator guide says."""
    from pathlib import Path

    from apptunnel.config import load_yaml_documents

    here = Path(__file__).parents[2] / "etc" / "roles"
    admin = RoleSet([parse_role(d) for d in load_yaml_documents(str(here / "admin.yaml"))])
    auditor = RoleSet([parse_role(d) for d in load_yaml_documents(str(here / "auditor.yaml"))])
    assert admin.allows("role", "update") and admin.allows("event", "read")
    assert auditor.allows("event", "list") and auditor.allows("access_request", "list")
    assert not auditor.allows("user", "list") and not auditor.allows("lock", "create")
