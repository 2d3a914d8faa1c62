"""Connectors on memory and a Clock (issue 10): rules to roles, claims to traits, the one
sign-in path for external identities, and LDAP sign-in's throttle, bounds and deadline
(the directory itself is faked here; tests/integration/test_ldap.py uses a real slapd)."""

from __future__ import annotations

import re

import pytest
import pytest_twisted
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from apptunnel.auth.connectors.ldap import DirectoryError, LdapSignIn, check_password, search_filter
from apptunnel.auth.connectors.mapping import (
    MAX_TRAIT_VALUES,
    RoleRule,
    claims_to_traits,
    roles_for,
    value_matcher,
)
from apptunnel.auth.connectors.signin import ExternalIdentity, ExternalSignIn
from apptunnel.auth.connectors.specs import ConnectorError, parse_connector, public_doc
from apptunnel.auth.connectors.store import ConnectorStore
from apptunnel.auth.directory import UserDirectory
from apptunnel.auth.errors import AuthError
from apptunnel.auth.throttle import LoginThrottle, Throttled
from apptunnel.backend.records import Resource, User
from tests.support.audit_fake import Audit
from tests.support.memory import MemoryBackend
from tests.support.waiting import wait

NOW = 1_000_000.0
DEVS = "cn=devs,ou=groups,dc=example,dc=org"


def ldap_doc(**spec) -> dict:
    base = {"url": "ldaps://ldap.example.org", "bind_dn": "cn=svc,dc=example,dc=org",
            "bind_password_file": "/nonexistent/bind", "user_search_base": "dc=example,dc=org",
            "groups_to_roles": [{"group": DEVS, "roles": ["dev"]},
                                {"group": "^cn=.*-admins,ou=groups,dc=example,dc=org$",
                                 "roles": ["admin", "dev"]}],
            "attributes_to_traits": {"mail": "email"}, "timeout": "3s"}
    base.update(spec)
    return {"kind": "ldap", "metadata": {"name": "corp-ldap"}, "spec": base}


# -- mapping -----------------------------------------------------------------------------


def test_rules_grant_the_union_of_matching_roles_in_rule_order():
    """Exact values, ^regex$ full matches; every matching rule adds its roles once."""
    spec = parse_connector(ldap_doc())
    assert roles_for(spec.groups_to_roles, {"groups": (DEVS,)}) == ("dev",)
    groups = ("cn=db-admins,ou=groups,dc=example,dc=org", DEVS)
    assert roles_for(spec.groups_to_roles, {"groups": groups}) == ("dev", "admin")
    assert roles_for(spec.groups_to_roles, {"groups": ("cn=staff,dc=example,dc=org",)}) == ()
    assert roles_for(spec.groups_to_roles, {}) == ()


def test_group_dns_compare_as_dns_and_regexes_match_whole_values():
    """Case and spaces around separators do not matter for a DN; a regex must match it all."""
    exact = value_matcher(DEVS, dn=True)
    assert exact.matches("CN=Devs, OU=groups ,dc=example,dc=org")
    assert not exact.matches("cn=devs2,ou=groups,dc=example,dc=org")
    regex = value_matcher("^cn=a.*$")
    assert regex.matches("cn=abc") and not regex.matches("xcn=abc")
    plain = value_matcher("admins")
    assert plain.matches("admins") and not plain.matches("Admins")
    rules = [RoleRule("groups", value_matcher("^dev$"), ("dev",))]
    assert roles_for(rules, {"groups": ("developers",)}) == ()


def test_claims_become_bounded_traits():
    """Valid trait names only, values de-duplicated, at most MAX_TRAIT_VALUES each."""
    claims = {"groups": tuple(f"g{i}" for i in range(1000)) + ("g1",), "email": ("a@x",),
              "bad name": ("x",), "empty": ()}
    traits = claims_to_traits(claims)
    assert set(traits) == {"groups", "email"}
    assert len(traits["groups"]) == MAX_TRAIT_VALUES and traits["email"] == ("a@x",)


def test_public_doc_hides_secrets_and_keeps_file_paths():
    doc = {"kind": "oidc", "spec": {"client_secret": "s3cret", "client_secret_file": "/f",
                                    "nested": [{"password": "p"}]}}
    shown = public_doc(doc)
    assert shown["spec"]["client_secret"] == "****" and shown["spec"]["client_secret_file"] == "/f"
    assert shown["spec"]["nested"][0]["password"] == "****" and "s3cret" not in str(shown)


def test_ldap_spec_defaults_and_loopback_plain_ldap():
    """uid and (uid={username}) by default; plain ldap:// only on loopback; ldap3 gets
    whole seconds."""
    spec = parse_connector(ldap_doc(url="ldap://127.0.0.1:3389", timeout="1.5s"))
    assert spec.port == 3389 and not spec.use_ssl and not spec.start_tls
    assert spec.user_search_filter == "(uid={username})" and spec.username_attribute == "uid"
    assert spec.timeout == 1.5 and spec.whole_seconds == 2
    with pytest.raises(ConnectorError, match="clear text"):
        parse_connector(ldap_doc(url="ldap://ldap.example.org"))
    assert parse_connector(ldap_doc(url="ldap://ldap.example.org", start_tls=True)).start_tls


@given(st.text(max_size=40))
def test_a_user_name_is_always_data_in_the_search_filter(name):
    """RFC 4515: whatever is typed, the filter keeps its shape and the name cannot add
    wildcards, parentheses or NULs (``*)(uid=*`` matches nobody)."""
    spec = parse_connector(ldap_doc(user_search_filter="(&(objectClass=person)(uid={username}))"))
    built = search_filter(spec, name)
    assert built.startswith("(&(objectClass=person)(uid=") and built.endswith("))")
    value = built[len("(&(objectClass=person)(uid="):-2]
    assert not re.search(r"[*()\x00]", value)
    assert re.fullmatch(r"(?:[^\\]|\\[0-9a-f]{2})*", value)


def test_an_empty_password_never_reaches_the_directory():
    """check_password refuses "" before reading the bind password or opening a socket."""
    spec = parse_connector(ldap_doc())
    assert check_password(spec, "alice", "") is None


# -- the one sign-in path --------------------------------------------------------------------


@pytest.fixture
def clock():
    c = Clock()
    c.advance(NOW)
    return c


@pytest.fixture
def backend():
    return MemoryBackend()


def identity(name="alice", groups=(DEVS,), mail=("alice@example.org",)):
    return ExternalIdentity("corp-ldap", "ldap", name, {"groups": groups, "email": mail})


@pytest_twisted.ensureDeferred
async def test_an_external_identity_becomes_a_connector_user_the_directory_knows(backend, clock):
    """Roles from the rules, claims as traits, stored as the connector's user, known to the
    directory at once (so the access decision's "user still exists" holds), audited."""
    audit, users = Audit(), UserDirectory(backend, clock)
    signin = ExternalSignIn(backend, audit, clock, users=users)
    rules = parse_connector(ldap_doc()).groups_to_roles
    user = await wait(signin.sign_in(identity(), rules, "10.0.0.1:5"))
    assert user == User("alice", None, ("dev",), {"groups": (DEVS,),
                                                  "email": ("alice@example.org",)},
                        NOW, connector="corp-ldap")
    assert await wait(backend.get_user("alice")) == user
    assert users.current("alice").roles == ("dev",)
    assert audit.events == [("user.login", "alice", "success",
                             {"method": "ldap", "connector": "corp-ldap",
                              "client": "10.0.0.1:5"})]
    changed = []
    users.add_listener(lambda name, entry: changed.append((name, entry.roles)))
    admins = ("cn=db-admins,ou=groups,dc=example,dc=org",)
    again = await wait(signin.sign_in(identity(groups=admins), rules))
    assert again.roles == ("admin", "dev") and again.created == NOW
    assert changed == [("alice", ("admin", "dev"))]


@pytest_twisted.ensureDeferred
async def test_claims_mapping_to_no_role_are_refused_with_a_message_and_audited(backend, clock):
    """No matching rule: 403 saying so, a user.login failure with method and connector,
    and nothing stored."""
    audit = Audit()
    signin = ExternalSignIn(backend, audit, clock)
    with pytest.raises(AuthError) as err:
        await wait(signin.sign_in(identity(groups=("cn=staff,dc=example,dc=org",)),
                                  parse_connector(ldap_doc()).groups_to_roles))
    assert err.value.status == 403 and "maps to a role" in err.value.message
    assert "corp-ldap" in err.value.message
    assert audit.events == [("user.login", "alice", "failure",
                             {"method": "ldap", "connector": "corp-ldap", "client": "",
                              "reason": "no role"})]
    assert await wait(backend.get_user("alice")) is None


@pytest_twisted.ensureDeferred
async def test_a_connector_never_takes_over_a_local_user(backend, clock):
    """A local (or another connector's) user of the same name refuses the sign-in; the
    stored user is untouched."""
    local = User("admin", "argon2-hash", ("admin",), {}, 1.0)
    await wait(backend.create_user(local))
    await wait(backend.create_user(User("bob", None, ("dev",), {}, 1.0, connector="other")))
    audit = Audit()
    signin = ExternalSignIn(backend, audit, clock)
    rules = parse_connector(ldap_doc()).groups_to_roles
    for name in ("admin", "bob"):
        with pytest.raises(AuthError) as err:
            await wait(signin.sign_in(identity(name), rules))
        assert err.value.status == 403 and "belongs to another account" in err.value.message
    assert await wait(backend.get_user("admin")) == local
    assert [e[3]["reason"] for e in audit.events] == ["name taken", "name taken"]


# -- LDAP sign-in: throttle, bounds, deadline --------------------------------------------


class Directory:
    """run_in_thread for check_password: answers the test chooses, or never."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.answer = None          # an ExternalIdentity, None (wrong), an Exception
        self.hang = False

    def __call__(self, fn, spec, username, password):
        assert fn is check_password
        self.calls.append((username, password))
        if self.hang:
            return Deferred()
        if isinstance(self.answer, Exception):
            d = Deferred()
            d.errback(self.answer)
            return d
        return succeed(self.answer)


@pytest.fixture
def ldap_env(backend, clock):
    wait(backend.put_resource(Resource("connector", "corp-ldap", ldap_doc())))
    audit, directory = Audit(), Directory()
    throttle = LoginThrottle(max_per_user=3, max_per_address=10)
    sign_in = LdapSignIn(connectors=ConnectorStore(backend, clock),
                         signin=ExternalSignIn(backend, audit, clock), throttle=throttle,
                         audit=audit, clock=clock, run_in_thread=directory)
    return sign_in, directory, audit


def failures(audit: Audit) -> list[str]:
    return [e[3].get("reason") for e in audit.events if e[2] == "failure"]


@pytest_twisted.ensureDeferred
async def test_ldap_sign_in_success_and_wrong_password(ldap_env):
    sign_in, directory, audit = ldap_env
    directory.answer = identity()
    user = await wait(sign_in.login("corp-ldap", "Alice", "pw", "10.0.0.1"))
    assert user.name == "alice" and user.roles == ("dev",) and user.connector == "corp-ldap"
    directory.answer = None
    with pytest.raises(AuthError) as err:
        await wait(sign_in.login("corp-ldap", "alice", "wrong", "10.0.0.1"))
    assert err.value.status == 401 and err.value.message == "invalid username or password"
    assert failures(audit) == ["invalid credentials"]
    assert all(e[3]["method"] == "ldap" and e[3]["connector"] == "corp-ldap"
               for e in audit.events)


@pytest_twisted.ensureDeferred
async def test_empty_password_and_unknown_connector_are_refused_before_the_directory(ldap_env):
    sign_in, directory, audit = ldap_env
    with pytest.raises(AuthError) as err:
        await wait(sign_in.login("corp-ldap", "alice", "", "10.0.0.1"))
    assert err.value.status == 401
    with pytest.raises(AuthError) as err:
        await wait(sign_in.login("nope", "alice", "pw", "10.0.0.1"))
    assert err.value.status == 400 and "no LDAP connector named 'nope'" in err.value.message
    assert directory.calls == []
    assert failures(audit) == ["empty password", "unknown connector"]


@pytest_twisted.ensureDeferred
async def test_ldap_guesses_are_throttled_like_local_passwords(ldap_env):
    """The shared LoginThrottle: after 3 wrong passwords for alice, 429 without asking
    the directory, audited."""
    sign_in, directory, audit = ldap_env
    for _ in range(3):
        with pytest.raises(AuthError):
            await wait(sign_in.login("corp-ldap", "alice", "wrong", "10.0.0.1"))
    with pytest.raises(Throttled) as err:
        await wait(sign_in.login("corp-ldap", "ALICE", "right", "10.0.0.2"))
    assert err.value.status == 429 and len(directory.calls) == 3
    assert failures(audit)[-1] == "throttled"


@pytest_twisted.ensureDeferred
async def test_a_directory_that_is_down_or_hung_is_503_naming_it_within_the_timeout(ldap_env, clock):
    """Down: 503 at once; hung: 503 once the connector's timeout (3 s) passes on the clock.
    Neither counts as a guess."""
    sign_in, directory, audit = ldap_env
    directory.answer = DirectoryError("LDAPSocketOpenError: connection refused")
    with pytest.raises(AuthError) as err:
        await wait(sign_in.login("corp-ldap", "alice", "pw", "10.0.0.1"))
    assert err.value.status == 503 and "corp-ldap" in err.value.message
    directory.hang = True
    pending = Deferred.fromCoroutine(sign_in.login("corp-ldap", "alice", "pw", "10.0.0.1"))
    clock.advance(2.9)
    assert not pending.called
    clock.advance(0.2)
    failure = []
    pending.addErrback(failure.append)
    assert failure and failure[0].value.status == 503
    assert "corp-ldap" in failure[0].value.message
    assert failures(audit) == ["directory unavailable", "directory unavailable"]
    directory.hang, directory.answer = False, identity()
    for _ in range(3):   # the two outages took no guesses from alice's budget
        assert (await wait(sign_in.login("corp-ldap", "alice", "pw", "10.0.0.1"))).name == "alice"


@pytest_twisted.ensureDeferred
async def test_a_hung_directory_holds_a_bounded_number_of_checks(ldap_env, clock):
    """At most 4 checks run at once; queued ones wait within the deadline, and beyond the
    queue sign-in is busy (503) at once instead of piling up threads."""
    sign_in, directory, audit = ldap_env
    directory.hang = True
    pending = [Deferred.fromCoroutine(sign_in.login("corp-ldap", f"u{i}", "pw", f"10.0.{i}.1"))
               for i in range(40)]
    assert len(directory.calls) == 4
    statuses: dict[int, int] = {}
    for i, d in enumerate(pending):
        d.addErrback(lambda f, i=i: statuses.__setitem__(i, f.value.status))
    assert len(statuses) == 4 and set(statuses.values()) == {503}   # 4 run, 32 wait
    clock.advance(3.1)
    assert len(statuses) == 40 and set(statuses.values()) == {503}
    assert len(directory.calls) == 4   # the queued ones never ran after their deadline
    assert failures(audit).count("busy") == 4


@pytest_twisted.ensureDeferred
async def test_spellings_the_directory_treats_as_one_name_share_one_budget(ldap_env):
    """``alice``, `` ALICE`` and ``alice  `` find one entry (caseIgnoreMatch), so they are
    one name to the throttle: spaces buy no extra guesses."""
    sign_in, directory, audit = ldap_env
    for spelling in ("alice", " ALICE", "alice  "):
        with pytest.raises(AuthError):
            await wait(sign_in.login("corp-ldap", spelling, "wrong", "10.0.0.1"))
    with pytest.raises(Throttled):
        await wait(sign_in.login("corp-ldap", "Alice\t", "wrong", "10.0.0.2"))
    assert len(directory.calls) == 3


@pytest_twisted.ensureDeferred
async def test_a_locked_user_is_refused_after_the_password_matched(backend, clock):
    """Locks name users: an LDAP alice under a lock gets its message, audited "locked",
    and her stored record is not touched."""
    from apptunnel.auth.locks import LockWatcher
    from apptunnel.backend.records import Lock

    await wait(backend.put_lock(Lock("l1", "alice", None, "incident 7", NOW, None, "admin")))
    locks = LockWatcher(backend, clock)
    await wait(locks.refresh())
    audit = Audit()
    signin = ExternalSignIn(backend, audit, clock, locks=locks)
    with pytest.raises(AuthError) as err:
        await wait(signin.sign_in(identity(), parse_connector(ldap_doc()).groups_to_roles))
    assert err.value.status == 403 and "incident 7" in err.value.message
    assert [e[3]["reason"] for e in audit.events] == ["locked"]
    assert await wait(backend.get_user("alice")) is None
