"""Role parsing and app access decisions."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apptunnel.auth.rbac import Decision, RoleError, RoleSet, parse_role


def role(name="r", allow=None, deny=None, options=None, **extra_allow):
    spec: dict = {}
    if allow is not None:
        spec["allow"] = {"app_labels": allow, **extra_allow}
    if deny is not None:
        spec["deny"] = {"app_labels": deny}
    if options is not None:
        spec["options"] = options
    return parse_role({"kind": "role", "metadata": {"name": name}, "spec": spec})


TRAITS = {"team": ["sre", "db"], "env": "staging", "evil": ["*", ".*", "^.*$"]}

# (allow selector, app labels, expected)
MATCH_TABLE = [
    ({"env": "prod"}, {"env": "prod"}, True),
    ({"env": "prod"}, {"env": "production"}, False),
    ({"env": "prod"}, {"env": "PROD"}, False),
    ({"env": "prod"}, {}, False),
    ({"env": "*"}, {"env": "anything"}, True),
    ({"env": "*"}, {"team": "x"}, False),
    ({"env": ["staging", "prod"]}, {"env": "prod"}, True),
    ({"env": ["staging", "prod"]}, {"env": "dev"}, False),
    ({"env": "^dev-.*$"}, {"env": "dev-42"}, True),
    ({"env": "^dev-.*$"}, {"env": "xdev-42"}, False),
    ({"env": "^dev$"}, {"env": "dev\n"}, False),
    ({"env": "^(a|b)$"}, {"env": "ab"}, False),
    ({"env": ["staging", "^dev-[0-9]+$"]}, {"env": "dev-7"}, True),
    ({"env": "prod", "team": "sre"}, {"env": "prod", "team": "sre"}, True),
    ({"env": "prod", "team": "sre"}, {"env": "prod", "team": "db"}, False),
    ({"env": "prod", "team": "sre"}, {"env": "prod"}, False),
    ({"*": "*"}, {}, True),
    ({"*": "*"}, {"env": "prod"}, True),
    ({"*": "*", "env": "dev"}, {"env": "prod"}, False),
    ({}, {"env": "prod"}, False),
    ({"team": "{{internal.team}}"}, {"team": "db"}, True),
    ({"team": "{{external.team}}"}, {"team": "sre"}, True),
    ({"team": "{{internal.team}}"}, {"team": "web"}, False),
    ({"team": "{{ internal.env }}"}, {"team": "staging"}, True),
    ({"team": "{{internal.missing}}"}, {"team": ""}, False),
    ({"team": "{{internal.missing}}"}, {"team": "{{internal.missing}}"}, False),
    ({"team": "team-{{internal.team}}"}, {"team": "team-sre"}, True),
    ({"team": "^{{internal.team}}-[0-9]+$"}, {"team": "db-12"}, True),
    ({"team": "^{{internal.team}}-[0-9]+$"}, {"team": "web-12"}, False),
    # Trait values are literal: an IdP-supplied "*" or ".*" never becomes a wildcard.
    ({"team": "{{internal.evil}}"}, {"team": "prod"}, False),
    ({"team": "{{internal.evil}}"}, {"team": "*"}, True),
    ({"team": "^{{internal.evil}}$"}, {"team": "prod"}, False),
    ({"team": "^{{internal.evil}}$"}, {"team": ".*"}, True),
]


@pytest.mark.parametrize("allow,labels,expected", MATCH_TABLE)
def test_matching_table(allow, labels, expected):
    """Each label selector matches exactly the apps the contract says it does."""
    decision = RoleSet([role("r", allow=allow)]).check_app(labels, TRAITS)
    assert decision.allowed is expected, decision


def test_deny_wins_over_allow():
    """A matching deny in any role beats every allow, and the reason names that role."""
    roles = RoleSet([
        role("everything", allow={"*": "*"}),
        role("no-prod", allow={"team": "sre"}, deny={"env": "prod"}),
    ])
    assert roles.check_app({"env": "prod", "team": "sre"}, {}) == Decision(
        False, "denied by role 'no-prod'"
    )
    assert roles.check_app({"env": "dev"}, {}) == Decision(True, "allowed by role 'everything'")


def test_deny_with_regex_and_template():
    """Deny selectors use the same value forms as allow."""
    roles = RoleSet([role("r", allow={"*": "*"}, deny={"owner": "^{{internal.blocked}}$"})])
    assert not roles.check_app({"owner": "bob"}, {"blocked": ["bob"]}).allowed
    assert roles.check_app({"owner": "bob"}, {"blocked": ["alice"]}).allowed


def test_default_deny():
    """No roles, or roles without allow rules, allow nothing."""
    assert RoleSet([]).check_app({"env": "dev"}, {}) == Decision(False, "user has no roles")
    decision = RoleSet([role("empty"), role("only-deny", deny={"env": "prod"})]).check_app(
        {"env": "dev"}, {}
    )
    assert decision == Decision(False, "no role allows access to this app")


@settings(max_examples=50, deadline=None)
@given(
    labels=st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=4),
    traits=st.dictionaries(st.text(max_size=5), st.lists(st.text(max_size=5)), max_size=3),
)
def test_everything_denied_when_denied(labels, traits):
    """A `"*": "*"` deny denies every app whatever the allows and traits."""
    roles = RoleSet([role("a", allow={"*": "*"}), role("d", deny={"*": "*"})])
    assert not roles.check_app(labels, traits).allowed


def test_max_session_ttl():
    """max_session_ttl parses durations and takes the minimum, default for unset roles."""
    roles = RoleSet([
        role("a", allow={}, options={"max_session_ttl": "8h"}),
        role("b", allow={}, options={"max_session_ttl": "1h30m"}),
    ])
    assert roles.max_session_ttl(43200.0) == 5400.0
    long_and_unset = RoleSet([
        role("a", options={"max_session_ttl": "7d"}),
        role("b"),
    ])
    assert long_and_unset.max_session_ttl(43200.0) == 43200.0
    assert RoleSet([]).max_session_ttl(60.0) == 60.0
    assert role("n", options={"max_session_ttl": 90}).max_session_ttl == 90.0


def test_supported_options_parse():
    """A role with every supported option parses; unsupported ones set to their defaults
    (MFA false, no request roles) are accepted too."""
    r = parse_role({
        "kind": "role",
        "metadata": {"name": "sre-apps"},
        "spec": {
            "options": {"max_session_ttl": "8h", "require_session_mfa": False},
            "allow": {
                "app_labels": {"team": "sre", "env": ["staging", "^dev-.*$"], "*": "*"},
                "request": {"roles": []},
                "review_requests": None,
            },
            "deny": {"app_labels": {"env": "prod"}},
        },
    })
    assert r.name == "sre-apps" and r.max_session_ttl == 8 * 3600
    assert RoleSet([r]).check_app({"team": "sre", "env": "dev-1"}, {}).allowed
    assert not RoleSet([r]).check_app({"team": "sre", "env": "prod"}, {}).allowed


UNSUPPORTED = [
    ({"options": {"request_access": "always"}},
     "spec.options.request_access: request_access 'always' is not supported"),
    ({"allow": {"request": {"roles": ["prod-apps"], "search_as_roles": ["x"]}}},
     "spec.allow.request.search_as_roles: resource-based access requests"),
    ({"allow": {"request": {"claims_to_roles": []}}},
     "spec.allow.request.claims_to_roles: claims_to_roles in access requests"),
    ({"allow": {"review_requests": {"roles": ["a"], "where": "x"}}},
     "spec.allow.review_requests.where: conditions (where)"),
    ({"deny": {"request": {"roles": ["a"], "max_duration": "1h"}}},
     "spec.deny.request.max_duration: max_duration only exists under allow.request"),
    ({"allow": {"request": {"roles": ["a"], "thresholds": [{"approve": 1, "filter": "x"}]}}},
     "spec.allow.request.thresholds[0].filter: named or filtered thresholds"),
]


@pytest.mark.parametrize("spec,message", UNSUPPORTED)
def test_options_nothing_enforces_are_refused_naming_the_option(spec, message):
    """An option whose feature does not exist is an error, never silently ignored."""
    with pytest.raises(RoleError) as info:
        parse_role({"kind": "role", "metadata": {"name": "r"}, "spec": spec})
    assert str(info.value).startswith(message), str(info.value)
    assert "remove this option" in str(info.value)


def test_access_request_rules_parse_and_combine():
    """Issue 11: request/review_requests/request_access parse into what the core enforces;
    a deny names roles nobody holding the role may request or review."""
    dev = parse_role({"kind": "role", "metadata": {"name": "dev"}, "spec": {
        "options": {"request_access": "reason"},
        "allow": {"request": {"roles": ["prod", "db"], "max_duration": "2h",
                              "thresholds": [{"approve": 2, "deny": 1}]},
                  "review_requests": {"roles": ["prod"]}}}})
    no_db = parse_role({"kind": "role", "metadata": {"name": "no-db"}, "spec": {
        "deny": {"request": {"roles": ["db"]}, "review_requests": {"roles": ["prod"]}}}})
    assert dev.allow_requests.max_duration == 7200.0
    assert dev.allow_requests.thresholds[0].approve == 2
    assert RoleSet([dev]).requestable() == ("prod", "db")
    assert RoleSet([dev, no_db]).requestable() == ("prod",)
    assert RoleSet([dev]).reviewable() == {"prod"}
    assert RoleSet([dev, no_db]).reviewable() == frozenset()
    assert RoleSet([dev]).reason_required() and not RoleSet([no_db]).reason_required()
    assert RoleSet([dev, no_db]).granting(["db"]) == (dev,)


def test_require_session_mfa_is_accepted_and_asked_only_by_roles_that_allow_the_app():
    """Issue 10: the option is enforced now (auth/access.py), so it parses; the RoleSet
    asks for a second factor only for apps a role with the option allows (as Teleport)."""
    mfa = parse_role({"kind": "role", "metadata": {"name": "prod"},
                      "spec": {"options": {"require_session_mfa": True},
                               "allow": {"app_labels": {"env": "prod"}}}})
    plain = parse_role({"kind": "role", "metadata": {"name": "all"},
                        "spec": {"allow": {"app_labels": {"*": "*"}}}})
    assert mfa.require_session_mfa and not plain.require_session_mfa
    roles = RoleSet([plain, mfa])
    assert roles.session_mfa({"env": "prod"}, {})
    assert not roles.session_mfa({"env": "dev"}, {})
    assert not RoleSet([plain]).session_mfa({"env": "prod"}, {})


def doc_with(spec=None, **top):
    doc = {"kind": "role", "metadata": {"name": "r"}, "spec": spec or {}}
    doc.update(top)
    return doc


PARSE_ERRORS = [
    ("not a dict", "role: expected a mapping"),
    (doc_with(kind="user"), "kind: expected 'role'"),
    (doc_with(metadata={"name": ""}), "metadata.name: invalid role name"),
    (doc_with(metadata={"name": "a b"}), "metadata.name: invalid role name"),
    (doc_with(metadata={"name": "r", "owner": "x"}), "metadata.owner: unknown key"),
    (doc_with(extra=1), "extra: unknown key"),
    (doc_with({"allow": {"app_labels": {"env": "^(prod$"}}}),
     "spec.allow.app_labels.env: invalid regex"),
    (doc_with({"allow": {"app_labels": {"env": ["dev", "^[z-a]$"]}}}),
     "spec.allow.app_labels.env[1]: invalid regex"),
    (doc_with({"deny": {"app_labels": {"env": "prod-*"}}}),
     "spec.deny.app_labels.env: 'prod-*': \"*\" only works alone"),
    (doc_with({"deny": {"app_labels": {"env": "^prod"}}}),
     "spec.deny.app_labels.env: '^prod': a regex must start with ^ and end with $"),
    (doc_with({"allow": {"app_labels": {"env": 3}}}),
     "spec.allow.app_labels.env: expected a string, got int"),
    (doc_with({"allow": {"app_labels": {"env": []}}}),
     "spec.allow.app_labels.env: empty list"),
    (doc_with({"allow": {"app_labels": {"*": "prod"}}}),
     "spec.allow.app_labels.*: the wildcard key only accepts"),
    (doc_with({"allow": {"app_labels": {"team": "{{internal.team}}-{{internal.x}}"}}}),
     "spec.allow.app_labels.team: '{{internal.team}}-{{internal.x}}': expected exactly one"),
    (doc_with({"allow": {"app_labels": {"team": "{{user.team}}"}}}),
     "spec.allow.app_labels.team: '{{user.team}}': expected exactly one"),
    (doc_with({"allow": {"app_labels": {"team": "^{{internal.team}}($"}}}),
     "spec.allow.app_labels.team: invalid regex"),
    (doc_with({"allow": {"app_labels": ["env"]}}),
     "spec.allow.app_labels: expected a mapping, got list"),
    (doc_with({"allow": {"apps": {}}}), "spec.allow.apps: unknown key"),
    (doc_with({"allow": {"request": {"roles": "prod"}}}),
     "spec.allow.request.roles: expected a list"),
    (doc_with({"allow": {"request": {"roles": ["prod-*"]}}}),
     "spec.allow.request.roles[0]: role name patterns are not supported"),
    (doc_with({"allow": {"request": {"roles": ["a"], "thresholds": [{"approve": 0}]}}}),
     "spec.allow.request.thresholds[0].approve: expected a whole number"),
    (doc_with({"allow": {"request": {"roles": ["a"], "max_duration": "soon"}}}),
     "spec.allow.request.max_duration: invalid duration"),
    (doc_with({"allow": {"request": {"roles": ["a"], "ttl": 1}}}),
     "spec.allow.request.ttl: unknown key"),
    (doc_with({"options": {"max_session_ttl": "8 hours"}}),
     "spec.options.max_session_ttl: invalid duration"),
    (doc_with({"options": {"max_session_ttl": "0s"}}),
     "spec.options.max_session_ttl: duration must be positive"),
    (doc_with({"options": {"require_session_mfa": "yes"}}),
     "spec.options.require_session_mfa: expected true or false"),
    (doc_with({"options": {"mfa": True}}), "spec.options.mfa: unknown key"),
]


@pytest.mark.parametrize("doc,message", PARSE_ERRORS)
def test_parse_errors_name_the_key_path(doc, message):
    """An invalid role is one RoleError whose message starts at the offending key."""
    with pytest.raises(RoleError) as info:
        parse_role(doc)
    assert str(info.value).startswith(message), str(info.value)


def test_example_roles_in_etc_load():
    """The example roles shipped in etc/roles parse: they show only what works."""
    from pathlib import Path

    from apptunnel.config import load_yaml_documents

    files = sorted((Path(__file__).parents[2] / "etc" / "roles").glob("*.yaml"))
    assert files
    for path in files:
        for doc in load_yaml_documents(str(path)):
            parse_role(doc)
