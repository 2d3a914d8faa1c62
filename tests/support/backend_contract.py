"""The storage contract: tests taking a `backend` fixture, imported by every module that
provides one (tests/unit/test_backend_contract.py: memory and SQLite;
tests/integration/test_backend_postgres.py: PostgreSQL), so the backends cannot drift apart.

Backend-specific behaviour (schema migrations, file modes, two backends on one file) lives
next to the backend's own fixture.
"""

from __future__ import annotations


import attrs
import pytest
import pytest_twisted
from twisted.internet import defer

from apptunnel.backend.base import (
    MAX_SEARCH_LIMIT,
    AlreadyExists,
    BackendError,
    NotFound,
)
from apptunnel.backend.records import (
    AccessRequest,
    Agent,
    AgentTunnel,
    AppSession,
    AuditEvent,
    AuthCode,
    Bot,
    JoinToken,
    KeyRecord,
    Lock,
    MfaDevice,
    ProxyRecord,
    Resource,
    Review,
    Scope,
    User,
    UserLink,
    WebSession,
)
from tests.support.waiting import wait

SCOPE = Scope(apps=("a", "b"), labels=(("team", "x"),))


def user(name="alice", roles=("dev",), traits=None, created=100.0):
    if traits is None:
        traits = {"logins": ("alice", "root")}
    return User(name, "argon-hash", tuple(roles), traits, created)


def web(id_hash="w1", user_name="alice", expires=1000.0):
    return WebSession(id_hash, user_name, ("dev",), {"team": ("sre",)}, 10.0, expires)


def app_session(id_hash="a1", web_session="w1", user_name="alice", app="grafana",
                expires=1000.0):
    return AppSession(id_hash, web_session, user_name, app, 10.0, expires)


def code(code_hash="c1", web_session="w1", expires=1000.0, app="grafana"):
    return AuthCode(code_hash, web_session, app, "/d/1", "statehash", expires)


def event(i, time, type="user.login"):
    return AuditEvent(f"id{i:03d}", time, type, "T1000I", "alice", "proxy", "success",
                      {"n": i, "method": "password"})


def lock(id="l1", user="alice", app=None, expires=None, created=10.0, agent=None):
    return Lock(id, user, app, "incident 42", created, expires, "admin", agent)


def agent(host_id="h1", **kw) -> Agent:
    fields = {"scope": Scope(), "joined": 10.0, "cert_expires": 100.0, "key_pin": "sha256:k"}
    return Agent(host_id=host_id, **{**fields, **kw})


async def sessions_of(b, specs):
    """Store web sessions, a code each and their app sessions:
    {web_hash: (user, [(app_hash, app)])}."""
    for web_hash, (user_name, apps) in specs.items():
        await wait(b.put_web_session(WebSession(web_hash, user_name, (), {}, 1.0, 1000.0)))
        await wait(b.put_auth_code(AuthCode("c-" + web_hash, web_hash, "grafana", "/", "s", 1000.0)))
        for app_hash, app in apps:
            await wait(b.put_app_session(AppSession(app_hash, web_hash, user_name, app, 1.0, 1000.0)))


# -- invite/reset links, second factors, recovery codes ---------------------------------


@pytest_twisted.ensureDeferred
async def test_user_link_is_used_once_and_remembered_as_used(backend):
    """A link is redeemed at most once, not after expiry, and reads back as used."""
    await wait(backend.put_user_link(UserLink("t1", "alice", "invite", 10.0, 100.0)))
    assert await wait(backend.use_user_link("t1", 100.0)) is None          # expired
    used = await wait(backend.use_user_link("t1", 50.0))
    assert used == UserLink("t1", "alice", "invite", 10.0, 100.0, 50.0)
    assert await wait(backend.use_user_link("t1", 51.0)) is None           # used
    assert (await wait(backend.get_user_link("t1"))).used == 50.0
    assert await wait(backend.use_user_link("nope", 1.0)) is None


@pytest_twisted.ensureDeferred
async def test_new_user_link_replaces_the_users_old_ones(backend):
    """A fresh reset link kills the user's earlier links, not other users' links."""
    await wait(backend.put_user_link(UserLink("a1", "alice", "invite", 1.0, 100.0)))
    await wait(backend.put_user_link(UserLink("b1", "bob", "invite", 1.0, 100.0)))
    await wait(backend.put_user_link(UserLink("a2", "alice", "reset", 2.0, 100.0)))
    assert await wait(backend.get_user_link("a1")) is None
    assert await wait(backend.get_user_link("b1")) is not None
    assert (await wait(backend.get_user_link("a2"))).kind == "reset"


@pytest_twisted.ensureDeferred
async def test_expired_links_are_kept_a_while_then_deleted(backend):
    """delete_expired keeps an expired link for LINK_KEEP so a visit still says "expired"."""
    from apptunnel.backend.base import LINK_KEEP
    await wait(backend.put_user_link(UserLink("t", "alice", "reset", 1.0, 100.0)))
    await wait(backend.delete_expired(101.0))
    assert await wait(backend.get_user_link("t")) is not None
    await wait(backend.delete_expired(100.0 + LINK_KEEP))
    assert await wait(backend.get_user_link("t")) is None


@pytest_twisted.ensureDeferred
async def test_mfa_devices_add_list_delete_and_counter_only_grows(backend):
    """Devices are per user and name; the counter moves only forward (replay refused)."""
    dev = MfaDevice("alice", "phone", "totp", "SECRET", 0, 5.0)
    await wait(backend.add_mfa_device(dev))
    with pytest.raises(AlreadyExists):
        await wait(backend.add_mfa_device(dev))
    await wait(backend.add_mfa_device(MfaDevice("bob", "phone", "totp", "B", 0, 5.0)))
    assert await wait(backend.list_mfa_devices("alice")) == [dev]
    assert await wait(backend.advance_mfa_counter("alice", "phone", 7))
    assert not await wait(backend.advance_mfa_counter("alice", "phone", 7))
    assert not await wait(backend.advance_mfa_counter("alice", "phone", 6))
    assert not await wait(backend.advance_mfa_counter("alice", "nope", 9))
    assert (await wait(backend.list_mfa_devices("alice")))[0].counter == 7
    assert await wait(backend.delete_mfa_device("alice", "phone"))
    assert not await wait(backend.delete_mfa_device("alice", "phone"))
    assert await wait(backend.list_mfa_devices("alice")) == []
    assert len(await wait(backend.list_mfa_devices("bob"))) == 1


@pytest_twisted.ensureDeferred
async def test_recovery_codes_work_once_and_are_replaced_as_a_set(backend):
    """Each recovery code hash is taken once; a new set replaces the old one."""
    await wait(backend.set_recovery_codes("alice", ["h1", "h2"]))
    assert await wait(backend.count_recovery_codes("alice")) == 2
    assert await wait(backend.use_recovery_code("alice", "h1"))
    assert not await wait(backend.use_recovery_code("alice", "h1"))
    assert not await wait(backend.use_recovery_code("bob", "h2"))
    await wait(backend.set_recovery_codes("alice", ["h3"]))
    assert not await wait(backend.use_recovery_code("alice", "h2"))
    assert await wait(backend.count_recovery_codes("alice")) == 1


@pytest_twisted.ensureDeferred
async def test_delete_user_removes_links_devices_and_codes(backend):
    """A removed user's links, devices and recovery codes go with them."""
    await wait(backend.create_user(user()))
    await wait(backend.put_user_link(UserLink("t", "alice", "invite", 1.0, 100.0)))
    await wait(backend.add_mfa_device(MfaDevice("alice", "p", "totp", "S", 0, 1.0)))
    await wait(backend.set_recovery_codes("alice", ["h"]))
    await wait(backend.delete_user("alice"))
    assert await wait(backend.get_user_link("t")) is None
    assert await wait(backend.list_mfa_devices("alice")) == []
    assert await wait(backend.count_recovery_codes("alice")) == 0


@pytest_twisted.ensureDeferred
async def test_enroll_only_web_session_round_trips(backend):
    """A web session marked enroll-only reads back so; the default is a full session."""
    await wait(backend.put_web_session(WebSession("e", "alice", (), {}, 1.0, 9.0, True)))
    assert (await wait(backend.get_web_session("e"))).enroll_only is True
    await wait(backend.put_web_session(web()))
    assert (await wait(backend.get_web_session("w1"))).enroll_only is False


# -- access requests ----------------------------------------------------------------------


def access_request(id="a" * 32, user="alice", state="pending", created=1.0, **kw):
    return AccessRequest(id=id, user=user, roles=kw.pop("roles", ("prod",)),
                         apps=kw.pop("apps", ()), reason=kw.pop("reason", "incident 42"),
                         state=state, created=created, ttl=kw.pop("ttl", 60.0),
                         expires=kw.pop("expires", 100.0), **kw)


@pytest_twisted.ensureDeferred
async def test_access_request_round_trips_and_ids_are_unique(backend):
    """A request reads back equal (reviews, apps, counts); a second one with the same id
    is AlreadyExists; unknown ids are None."""
    r = access_request(apps=("grafana",), approve=2, deny=1,
                       reviews=(Review("bob", True, "ok", 2.0),))
    await wait(backend.put_access_request(r))
    assert await wait(backend.get_access_request(r.id)) == r
    with pytest.raises(AlreadyExists):
        await wait(backend.put_access_request(r))
    assert await wait(backend.get_access_request("b" * 32)) is None


@pytest_twisted.ensureDeferred
async def test_access_requests_list_by_user_and_state_oldest_first(backend):
    """Listing filters by user and by states, oldest first."""
    await wait(backend.put_access_request(access_request("c" * 32, created=3.0)))
    await wait(backend.put_access_request(access_request("a" * 32, created=1.0)))
    await wait(backend.put_access_request(access_request("b" * 32, user="bob",
                                                         state="approved", created=2.0)))
    assert [r.id for r in await wait(backend.list_access_requests())] == \
        ["a" * 32, "b" * 32, "c" * 32]
    assert [r.id for r in await wait(backend.list_access_requests(user="alice"))] == \
        ["a" * 32, "c" * 32]
    assert [r.id for r in await wait(backend.list_access_requests(states=("approved",)))] == \
        ["b" * 32]
    assert await wait(backend.list_access_requests(states=())) == []


@pytest_twisted.ensureDeferred
async def test_access_request_update_is_compare_and_set(backend):
    """An update names the state and review count it read: a racing second update
    (another reviewer, another proxy) fails instead of losing the first one's review."""
    r = access_request()
    await wait(backend.put_access_request(r))
    one = attrs.evolve(r, reviews=(Review("bob", True, "", 2.0),), state="approved")
    two = attrs.evolve(r, reviews=(Review("carol", False, "", 2.0),), state="denied")
    assert await wait(backend.update_access_request(one, "pending", 0)) is True
    assert await wait(backend.update_access_request(two, "pending", 0)) is False
    assert await wait(backend.get_access_request(r.id)) == one
    assert await wait(backend.update_access_request(access_request("d" * 32), "pending", 0)) \
        is False


@pytest_twisted.ensureDeferred
async def test_web_session_keeps_the_requests_it_assumed(backend):
    """A web session's assumed request ids read back; the default is none."""
    await wait(backend.put_web_session(web()))
    assert (await wait(backend.get_web_session("w1"))).requests == ()
    await wait(backend.put_web_session(attrs.evolve(web(), requests=("a" * 32,))))
    assert (await wait(backend.get_web_session("w1"))).requests == ("a" * 32,)


@pytest_twisted.ensureDeferred
async def test_finished_access_requests_are_swept_a_week_after(backend):
    """Denied and expired requests go a while after they ended; pending ones stay."""
    await wait(backend.put_access_request(access_request("a" * 32, state="denied")))
    await wait(backend.put_access_request(access_request("b" * 32)))
    await wait(backend.delete_expired(100.0 + 8 * 86400))
    assert [r.id for r in await wait(backend.list_access_requests())] == ["b" * 32]


# -- users ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_user_round_trip(backend):
    """A created user reads back equal, with tuples for roles and trait values."""
    await wait(backend.create_user(user()))
    got = await wait(backend.get_user("alice"))
    assert got == user()
    assert isinstance(got.traits["logins"], tuple)
    assert await wait(backend.get_user("bob")) is None


@pytest_twisted.ensureDeferred
async def test_records_come_back_as_storage_gives_them(backend):
    """Lists in traits become tuples, tuples in documents lists, integer times floats, keys
    sorted; what a caller keeps of its own record cannot change what is stored."""
    traits = {"b": ["2"], "a": ["1"]}
    await wait(backend.create_user(User("u", None, ["r"], traits, 5)))
    traits["a"].append("planted")
    got = await wait(backend.get_user("u"))
    assert got == User("u", None, ("r",), {"a": ("1",), "b": ("2",)}, 5.0)
    assert list(got.traits) == ["a", "b"] and isinstance(got.created, float)
    doc = {"z": (1, 2), "a": {"y": 1, "x": 2}}
    await wait(backend.put_resource(Resource("role", "r", doc)))
    stored = await wait(backend.get_resource("role", "r"))
    assert stored.doc == {"a": {"x": 2, "y": 1}, "z": [1, 2]}
    assert list(stored.doc) == ["a", "z"] and list(stored.doc["a"]) == ["x", "y"]
    await wait(backend.append_audit([AuditEvent("e", 3, "t", "c", "a", "t", "ok", {"l": (1,)})]))
    [e] = await wait(backend.search_audit())
    assert e.fields == {"l": [1]} and isinstance(e.time, float)


@pytest_twisted.ensureDeferred
async def test_changing_a_record_read_back_changes_nothing_stored(backend):
    """Records are frozen, but their dicts are not: what a reader does to them stays its own."""
    await wait(backend.create_user(user()))
    await wait(backend.put_web_session(web("w1")))
    await wait(backend.put_resource(Resource("role", "r", {"spec": {"allow": {}}})))
    await wait(backend.append_audit([event(1, 1.0)]))
    (await wait(backend.get_user("alice"))).traits["logins"] = ("root",)
    (await wait(backend.list_users()))[0].traits.clear()
    (await wait(backend.get_web_session("w1"))).traits["team"] = ("evil",)
    (await wait(backend.get_resource("role", "r"))).doc["spec"]["allow"]["*"] = "*"
    (await wait(backend.list_resources("role")))[0].doc.clear()
    (await wait(backend.search_audit()))[0].fields["n"] = 99
    assert await wait(backend.get_user("alice")) == user()
    assert await wait(backend.get_web_session("w1")) == web("w1")
    assert (await wait(backend.get_resource("role", "r"))).doc == {"spec": {"allow": {}}}
    assert await wait(backend.search_audit()) == [event(1, 1.0)]


@pytest_twisted.ensureDeferred
async def test_a_connector_user_keeps_its_connector(backend):
    """A user made by a connector's sign-in names it after create, update and list; local
    users name none."""
    await wait(backend.create_user(User("lu", None, ("dev",), {}, 1.0, connector="corp-ldap")))
    assert (await wait(backend.get_user("lu"))).connector == "corp-ldap"
    await wait(backend.update_user(User("lu", None, ("ops",), {}, 1.0, connector="corp-ldap")))
    [got] = await wait(backend.list_users())
    assert got.connector == "corp-ldap" and got.roles == ("ops",)
    await wait(backend.create_user(user()))
    assert (await wait(backend.get_user("alice"))).connector == ""


@pytest_twisted.ensureDeferred
async def test_create_user_twice_is_already_exists(backend):
    """Creating a user whose name exists raises AlreadyExists."""
    await wait(backend.create_user(user()))
    with pytest.raises(AlreadyExists):
        await wait(backend.create_user(user(roles=("admin",))))
    assert (await wait(backend.get_user("alice"))).roles == ("dev",)


@pytest_twisted.ensureDeferred
async def test_update_and_list_users(backend):
    """update_user replaces fields but not the creation time; list_users is sorted by name;
    unknown user is NotFound."""
    await wait(backend.create_user(user("carol")))
    await wait(backend.create_user(user("alice")))
    await wait(backend.update_user(user("alice", roles=("admin", "dev"), traits={},
                                        created=999.0)))
    users = await wait(backend.list_users())
    assert [u.name for u in users] == ["alice", "carol"]
    assert users[0].roles == ("admin", "dev") and users[0].traits == {}
    assert users[0].created == 100.0
    with pytest.raises(NotFound):
        await wait(backend.update_user(user("nobody")))
    assert await wait(backend.get_user("nobody")) is None


@pytest_twisted.ensureDeferred
async def test_delete_user_removes_sessions(backend):
    """delete_user drops the user's web sessions, app sessions and auth codes only."""
    await wait(backend.create_user(user("alice")))
    await wait(backend.create_user(user("bob")))
    await wait(backend.put_web_session(web("w1", "alice")))
    await wait(backend.put_web_session(web("w2", "bob")))
    await wait(backend.put_app_session(app_session("a1", "w1", "alice")))
    await wait(backend.put_app_session(app_session("a2", "w2", "bob")))
    await wait(backend.put_auth_code(code("c1", "w1")))
    await wait(backend.put_auth_code(code("c2", "w2")))

    assert await wait(backend.delete_user("alice")) is True
    assert await wait(backend.delete_user("alice")) is False
    assert await wait(backend.get_user("alice")) is None
    assert await wait(backend.get_web_session("w1")) is None
    assert await wait(backend.get_app_session("a1")) is None
    assert await wait(backend.take_auth_code("c1")) is None
    assert await wait(backend.get_web_session("w2")) is not None
    assert await wait(backend.get_app_session("a2")) is not None
    assert await wait(backend.take_auth_code("c2")) is not None


# -- resources --------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_resources_upsert_list_delete(backend):
    """put_resource upserts; list is per kind and sorted; delete reports whether it existed."""
    doc = {"kind": "role", "metadata": {"name": "dev"}, "spec": {"allow": {}}}
    await wait(backend.put_resource(Resource("role", "dev", doc)))
    await wait(backend.put_resource(Resource("role", "admin", {"v": 1})))
    await wait(backend.put_resource(Resource("connector", "dev", {"v": 2})))
    await wait(backend.put_resource(Resource("role", "admin", {"v": 3})))

    assert await wait(backend.get_resource("role", "dev")) == Resource("role", "dev", doc)
    roles = await wait(backend.list_resources("role"))
    assert roles == [Resource("role", "admin", {"v": 3}), Resource("role", "dev", doc)]
    assert await wait(backend.list_resources("app")) == []
    assert await wait(backend.delete_resource("role", "dev")) is True
    assert await wait(backend.delete_resource("role", "dev")) is False
    assert await wait(backend.get_resource("role", "dev")) is None
    assert await wait(backend.get_resource("connector", "dev")) is not None


# -- join tokens and agents -------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_tokens(backend):
    """Join tokens add, read, list by creation time, refuse duplicates and delete."""
    t1 = JoinToken("h1", "app", 500.0, 20.0)
    t2 = JoinToken("h2", "app", 600.0, 10.0, uses_left=3, scope=SCOPE)
    await wait(backend.add_token(t1))
    await wait(backend.add_token(t2))
    with pytest.raises(AlreadyExists):
        await wait(backend.add_token(t1))
    assert await wait(backend.get_token("h1")) == t1
    assert await wait(backend.get_token("h2")) == t2
    assert await wait(backend.list_tokens()) == [t2, t1]
    assert await wait(backend.delete_token("h1")) is True
    assert await wait(backend.delete_token("h1")) is False
    assert await wait(backend.get_token("h1")) is None


@pytest_twisted.ensureDeferred
async def test_single_use_token_has_one_winner_among_concurrent_joins(backend):
    """Two joins racing for a single-use token: exactly one gets it, with the token's scope."""
    await wait(backend.add_token(JoinToken("t", "app", 1000.0, 1.0, uses_left=1, scope=SCOPE)))
    results = await wait(defer.gatherResults([
        defer.ensureDeferred(backend.redeem_token("t", 5.0, agent("h1"))),
        defer.ensureDeferred(backend.redeem_token("t", 5.0, agent("h2"))),
    ]))
    winners = [r for r in results if r is not None]
    assert len(winners) == 1 and winners[0].scope == SCOPE
    assert (await wait(backend.get_token("t"))).uses_left == 0
    assert await wait(backend.list_agents()) == [winners[0]]


@pytest_twisted.ensureDeferred
async def test_token_uses_count_down(backend):
    """Each redemption takes one use; the last use leaves 0 and nothing redeems after it."""
    await wait(backend.add_token(JoinToken("t", "app", 1000.0, 1.0, uses_left=2)))
    assert await wait(backend.redeem_token("t", 5.0, agent("h1"))) is not None
    assert (await wait(backend.get_token("t"))).uses_left == 1
    assert await wait(backend.redeem_token("t", 5.0, agent("h2"))) is not None
    assert await wait(backend.redeem_token("t", 5.0, agent("h3"))) is None
    assert [a.host_id for a in await wait(backend.list_agents())] == ["h1", "h2"]


@pytest_twisted.ensureDeferred
async def test_expired_unknown_and_unlimited_tokens(backend):
    """Expired or unknown tokens redeem nothing; a token without a limit keeps working."""
    await wait(backend.add_token(JoinToken("old", "app", 10.0, 1.0)))
    await wait(backend.add_token(JoinToken("open", "app", 1000.0, 1.0)))
    assert await wait(backend.redeem_token("old", 10.0, agent())) is None
    assert await wait(backend.redeem_token("nope", 5.0, agent())) is None
    for host in ("h1", "h2", "h3"):
        assert (await wait(backend.redeem_token("open", 5.0, agent(host)))).scope == Scope()
    assert (await wait(backend.get_token("open"))).uses_left is None


@pytest_twisted.ensureDeferred
async def test_redeem_for_a_host_recorded_with_another_key_takes_no_use(backend):
    """A host id known with another key is AlreadyExists; the token keeps its use and the
    record its key. The same key joins again (a re-join replaces the record)."""
    await wait(backend.add_token(JoinToken("t", "app", 1000.0, 1.0, uses_left=1, scope=SCOPE)))
    await wait(backend.put_agent(agent("h1", peer="first")))
    with pytest.raises(AlreadyExists):
        await wait(backend.redeem_token("t", 5.0, agent("h1", key_pin="other")))
    assert (await wait(backend.get_token("t"))).uses_left == 1
    assert (await wait(backend.get_agent("h1"))).key_pin == "sha256:k"
    again = await wait(backend.redeem_token("t", 5.0, agent("h1", peer="second")))
    assert again.scope == SCOPE and again.peer == "second"
    assert await wait(backend.get_agent("h1")) == again


@pytest_twisted.ensureDeferred
async def test_agents_put_get_list(backend):
    """put_agent upserts by host id; list_agents is sorted by host id; unknown is None."""
    await wait(backend.put_agent(agent("h2")))
    await wait(backend.put_agent(agent("h1", apps=("x", "y"), scope=SCOPE)))
    await wait(backend.put_agent(agent("h2", peer="10.0.0.2:5", last_seen=3.0)))
    assert await wait(backend.list_agents()) == [
        agent("h1", apps=("x", "y"), scope=SCOPE), agent("h2", peer="10.0.0.2:5", last_seen=3.0)]
    assert await wait(backend.get_agent("h1")) == agent("h1", apps=("x", "y"), scope=SCOPE)
    assert await wait(backend.get_agent("ghost")) is None


@pytest_twisted.ensureDeferred
async def test_agent_state_updates_and_only_proxy(backend):
    """Connection state is written per field; only_proxy leaves a row another proxy owns."""
    await wait(backend.put_agent(agent(proxy_id="p1")))
    assert await wait(backend.update_agent("h1", connected_since=20.0, apps=("a",), peer="x:1"))
    assert not await wait(backend.update_agent("h1", connected_since=None, only_proxy="p2"))
    stored = await wait(backend.get_agent("h1"))
    assert (stored.connected_since, stored.apps, stored.peer) == (20.0, ("a",), "x:1")
    assert await wait(backend.update_agent("h1", connected_since=None, only_proxy="p1"))
    assert (await wait(backend.get_agent("h1"))).connected_since is None
    assert not await wait(backend.update_agent("ghost", last_seen=1.0))


@pytest_twisted.ensureDeferred
async def test_an_agents_version_is_kept(backend):
    """version (what its hello said it runs) is stored by put and update, '' by default."""
    await wait(backend.put_agent(agent(proxy_id="p1")))
    assert (await wait(backend.get_agent("h1"))).version == ""
    assert await wait(backend.update_agent("h1", version="0.9.1"))
    assert (await wait(backend.get_agent("h1"))).version == "0.9.1"
    await wait(backend.put_agent(agent("h2", version="1.0")))
    assert (await wait(backend.get_agent("h2"))).version == "1.0"


@pytest_twisted.ensureDeferred
async def test_an_agents_draining_state_is_kept(backend):
    """draining (its tunnel is going away) is stored by put and update, false by default."""
    await wait(backend.put_agent(agent(proxy_id="p1")))
    assert (await wait(backend.get_agent("h1"))).draining is False
    assert await wait(backend.update_agent("h1", draining=True, only_proxy="p1"))
    assert (await wait(backend.get_agent("h1"))).draining is True
    await wait(backend.put_agent(agent(proxy_id="p1", draining=False)))
    assert [a.draining for a in await wait(backend.list_agents())] == [False]


@pytest_twisted.ensureDeferred
async def test_update_agent_refuses_other_fields(backend):
    """Only connection state can change: the scope or key of an agent never does, and an
    update naming nothing is an error too."""
    await wait(backend.put_agent(agent()))
    for bad in ({"scope": SCOPE}, {"key_pin_typo": "x"}, {}, {"only_proxy": "p1"}):
        with pytest.raises(BackendError, match="unknown fields"):
            await wait(backend.update_agent("h1", **bad))
    assert await wait(backend.get_agent("h1")) == agent()


# -- sessions and auth codes ------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_web_session_delete_ends_app_sessions(backend):
    """delete_web_session removes its app sessions and codes and returns the app hashes."""
    await wait(backend.put_web_session(web("w1")))
    await wait(backend.put_web_session(web("w2")))
    assert await wait(backend.get_web_session("w1")) == web("w1")
    await wait(backend.put_app_session(app_session("a1", "w1")))
    await wait(backend.put_app_session(app_session("a2", "w1", app="kibana")))
    await wait(backend.put_app_session(app_session("a3", "w2")))
    await wait(backend.put_auth_code(code("c1", "w1")))

    ended = await wait(backend.delete_web_session("w1"))
    assert sorted(ended) == ["a1", "a2"]
    assert await wait(backend.get_web_session("w1")) is None
    assert await wait(backend.get_app_session("a1")) is None
    assert await wait(backend.take_auth_code("c1")) is None
    assert await wait(backend.get_app_session("a3")) == app_session("a3", "w2")
    assert await wait(backend.delete_web_session("w1")) == []


@pytest_twisted.ensureDeferred
async def test_web_session_put_upserts(backend):
    """Putting a web session with a known hash replaces it."""
    await wait(backend.put_web_session(web("w1")))
    await wait(backend.put_web_session(web("w1", expires=2000.0)))
    assert await wait(backend.get_web_session("w1")) == web("w1", expires=2000.0)


@pytest_twisted.ensureDeferred
async def test_app_session_put_get_delete(backend):
    """App sessions round-trip, upsert on the same hash, and delete once."""
    await wait(backend.put_app_session(app_session("a1")))
    await wait(backend.put_app_session(app_session("a1", expires=2000.0)))
    assert await wait(backend.get_app_session("a1")) == app_session("a1", expires=2000.0)
    assert await wait(backend.delete_app_session("a1")) is True
    assert await wait(backend.delete_app_session("a1")) is False
    assert await wait(backend.get_app_session("a1")) is None


@pytest_twisted.ensureDeferred
async def test_mfa_verified_round_trips_on_codes_and_app_sessions(backend):
    """Per-session MFA (issue 10): the hand-off and the app session it starts keep the
    mark that a fresh second factor was given; records without it read as not verified."""
    verified = attrs.evolve(app_session("a1"), mfa_verified=True)
    await wait(backend.put_app_session(verified))
    await wait(backend.put_app_session(app_session("a2")))
    assert await wait(backend.get_app_session("a1")) == verified
    assert (await wait(backend.get_app_session("a2"))).mfa_verified is False
    await wait(backend.put_app_session(app_session("a1")))   # an upsert may clear it
    assert (await wait(backend.get_app_session("a1"))).mfa_verified is False
    marked = attrs.evolve(code("c1"), mfa_verified=True)
    await wait(backend.put_auth_code(marked))
    await wait(backend.put_auth_code(code("c2")))
    assert await wait(backend.take_auth_code("c1")) == marked
    assert (await wait(backend.take_auth_code("c2"))).mfa_verified is False


@pytest_twisted.ensureDeferred
async def test_take_auth_code_is_one_time(backend):
    """take_auth_code returns the code once, and of many racing takes exactly one wins."""
    await wait(backend.put_auth_code(code("c1")))
    with pytest.raises(AlreadyExists):
        await wait(backend.put_auth_code(code("c1")))
    assert await wait(backend.take_auth_code("c1")) == code("c1")
    assert await wait(backend.take_auth_code("c1")) is None

    await wait(backend.put_auth_code(code("c2")))
    results = await defer.gatherResults([wait(backend.take_auth_code("c2")) for _ in range(5)])
    assert [r for r in results if r is not None] == [code("c2")]


@pytest_twisted.ensureDeferred
async def test_delete_user_sessions_ends_only_that_users_sessions(backend):
    """All of alice's web sessions, app sessions and codes go; bob's stay."""
    await sessions_of(backend, {
        "w1": ("alice", [("a1", "grafana"), ("a2", "wiki")]),
        "w2": ("alice", [("a3", "grafana")]),
        "w3": ("bob", [("b1", "grafana")]),
    })
    ended = await wait(backend.delete_user_sessions("alice"))
    assert sorted(ended) == ["a1", "a2", "a3"]
    for gone in ("w1", "w2"):
        assert await wait(backend.get_web_session(gone)) is None
        assert await wait(backend.take_auth_code("c-" + gone)) is None
    assert await wait(backend.get_web_session("w3")) is not None
    assert await wait(backend.get_app_session("b1")) is not None
    assert await wait(backend.take_auth_code("c-w3")) is not None
    assert await wait(backend.delete_user_sessions("alice")) == []


@pytest_twisted.ensureDeferred
async def test_delete_app_sessions_for_everyone_or_one_user(backend):
    """App sessions on one app end (for one user when given); web sessions survive."""
    await sessions_of(backend, {
        "w1": ("alice", [("a1", "grafana"), ("a2", "wiki")]),
        "w2": ("bob", [("b1", "grafana"), ("b2", "wiki")]),
    })
    assert await wait(backend.delete_app_sessions("wiki", "alice")) == ["a2"]
    assert await wait(backend.get_app_session("b2")) is not None
    assert await wait(backend.take_auth_code("c-w1")) is not None   # a grafana code: kept
    assert sorted(await wait(backend.delete_app_sessions("grafana"))) == ["a1", "b1"]
    assert await wait(backend.take_auth_code("c-w2")) is None        # grafana codes: gone
    assert await wait(backend.get_web_session("w1")) is not None
    assert await wait(backend.get_web_session("w2")) is not None
    assert await wait(backend.get_app_session("b2")) is not None


@pytest_twisted.ensureDeferred
async def test_delete_app_sessions_of_one_user_keeps_other_users_codes(backend):
    """A per-user end takes that user's pending hand-offs to the app, not another user's."""
    await sessions_of(backend, {"w1": ("alice", []), "w2": ("bob", [])})
    assert await wait(backend.delete_app_sessions("grafana", "alice")) == []
    assert await wait(backend.take_auth_code("c-w1")) is None
    assert await wait(backend.take_auth_code("c-w2")) is not None


# -- locks ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_lock_round_trip_and_delete(backend):
    """A stored lock lists back equal (None fields kept); delete says whether it existed."""
    await wait(backend.put_lock(lock("l1", user="alice")))
    await wait(backend.put_lock(lock("l2", user=None, app="grafana", expires=50.0, created=11.0)))
    await wait(backend.put_lock(lock("l3", user="bob", app="grafana", created=12.0)))
    got = await wait(backend.list_locks(20.0))
    assert got == [lock("l1", user="alice"), lock("l2", user=None, app="grafana", expires=50.0,
                                                  created=11.0),
                   lock("l3", user="bob", app="grafana", created=12.0)]
    assert await wait(backend.delete_lock("l1")) is True
    assert await wait(backend.delete_lock("l1")) is False
    assert [x.id for x in await wait(backend.list_locks(20.0))] == ["l2", "l3"]


@pytest_twisted.ensureDeferred
async def test_agent_lock_round_trip_and_replace(backend):
    """A lock on an agent alone is stored; a lock with the same id replaces it; ties in
    creation time list by id."""
    await wait(backend.put_lock(lock("lb", user=None, agent="h1")))
    await wait(backend.put_lock(lock("la", user=None, agent="h2")))
    assert [x.agent for x in await wait(backend.list_locks(0.0))] == ["h2", "h1"]
    await wait(backend.put_lock(lock("lb", user=None, agent="h3", expires=30.0)))
    assert await wait(backend.list_locks(0.0)) == [
        lock("la", user=None, agent="h2"), lock("lb", user=None, agent="h3", expires=30.0)]


@pytest_twisted.ensureDeferred
async def test_list_locks_hides_expired_and_delete_expired_removes_them(backend):
    """Expired locks are not listed; delete_expired drops them but keeps permanent ones."""
    await wait(backend.put_lock(lock("old", expires=50.0)))
    await wait(backend.put_lock(lock("forever")))
    assert [x.id for x in await wait(backend.list_locks(49.0))] == ["forever", "old"]
    assert [x.id for x in await wait(backend.list_locks(50.0))] == ["forever"]
    assert await wait(backend.delete_expired(60.0)) == 1
    assert [x.id for x in await wait(backend.list_locks(0.0))] == ["forever"]


@pytest_twisted.ensureDeferred
async def test_put_lock_refuses_a_lock_on_nothing(backend):
    """A lock with neither user nor app would match nobody: refused with BackendError."""
    with pytest.raises(BackendError, match="needs a user, an app"):
        await wait(backend.put_lock(lock(user=None, app=None)))
    assert await wait(backend.list_locks(0.0)) == []


# -- audit ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_audit_append_and_search(backend):
    """search_audit filters by since/until/type, orders by time and honours limit."""
    await wait(backend.append_audit([event(i, 100.0 + i) for i in range(10)]))
    await wait(backend.append_audit([event(99, 104.5, type="app.request")]))
    await wait(backend.append_audit([]))

    everything = await wait(backend.search_audit())
    assert len(everything) == 11
    assert [e.time for e in everything] == sorted(e.time for e in everything)
    assert everything[0] == event(0, 100.0)

    window = await wait(backend.search_audit(since=103.0, until=106.0))
    assert [e.time for e in window] == [103.0, 104.0, 104.5, 105.0]
    logins = await wait(backend.search_audit(since=103.0, type="user.login", limit=2))
    assert [e.id for e in logins] == ["id003", "id004"]
    requests = await wait(backend.search_audit(type="app.request"))
    assert requests == [event(99, 104.5, type="app.request")]
    assert await wait(backend.search_audit(limit=0)) == []
    assert await wait(backend.search_audit(limit=-5)) == []
    assert len(await wait(backend.search_audit(limit=MAX_SEARCH_LIMIT * 10))) == 11


@pytest_twisted.ensureDeferred
async def test_audit_search_filters_by_actor_target_and_outcome_in_storage(backend):
    """actor/target/outcome match exactly and the limit counts matching events only, so
    a few of bob's events behind many of alice's are found (not lost in a first page)."""
    noise = [AuditEvent(f"a{i:04d}", 10.0 + i, "app.request", "T2100I", "alice", "grafana",
                        "success", {}) for i in range(50)]
    bobs = [AuditEvent(f"b{i}", 100.0 + i, "app.request", "T2100W", "bob", "wiki",
                       "failure" if i % 2 else "success", {}) for i in range(4)]
    await wait(backend.append_audit(noise + bobs))
    found = await wait(backend.search_audit(actor="bob", limit=3))
    assert [e.id for e in found] == ["b0", "b1", "b2"]
    assert [e.id for e in await wait(backend.search_audit(target="wiki", outcome="failure"))] \
        == ["b1", "b3"]
    assert len(await wait(backend.search_audit(target="grafana", limit=5000))) == 50
    assert await wait(backend.search_audit(actor="bob", target="grafana")) == []
    assert await wait(backend.search_audit(actor="b%")) == []   # no LIKE, no wildcards


@pytest_twisted.ensureDeferred
async def test_audit_out_of_order_appends_search_in_time_order(backend):
    """Events appended late with earlier times come back in time order, ties by insertion."""
    await wait(backend.append_audit([event(1, 5.0), event(2, 3.0)]))
    await wait(backend.append_audit([event(3, 3.0), event(4, 1.0)]))
    assert [e.id for e in await wait(backend.search_audit())] == [
        "id004", "id002", "id003", "id001"]


@pytest_twisted.ensureDeferred
async def test_audit_batch_larger_than_one_insert_keeps_every_event_in_order(backend):
    """A batch spanning several multi-row INSERTs stores every event, ties in batch order."""
    batch = [event(i, 7.0) for i in range(1001)]
    await wait(backend.append_audit(batch))
    stored = await wait(backend.search_audit(limit=5000))
    assert stored == batch


@pytest_twisted.ensureDeferred
async def test_audit_stored_ids_are_skipped(backend):
    """Issue 13 (journal replay, retried batches): an id already stored, or repeated in a
    batch, is stored once; the rest of the batch is stored (this pinned AlreadyExists
    before: a retried batch whose commit reply was lost must not fail forever)."""
    await wait(backend.append_audit([event(1, 1.0)]))
    await wait(backend.append_audit([event(2, 2.0), event(1, 1.0)]))
    await wait(backend.append_audit([event(3, 3.0), event(3, 3.0)]))
    assert [e.id for e in await wait(backend.search_audit())] == ["id001", "id002", "id003"]


def chained(proxy, n, prev="0" * 64):
    """n linked events of one proxy (audit/chain.py)."""
    from apptunnel.audit.chain import link
    out = []
    for i in range(1, n + 1):
        e = link(AuditEvent(f"{proxy}-{i}", 10.0 + i, "app.request", "T2100I", "alice",
                            "wiki", "success", {"n": i, "f": 0.1 * i}), proxy, i, prev)
        prev = e.digest
        out.append(e)
    return out


@pytest_twisted.ensureDeferred
async def test_audit_chain_fields_round_trip_and_chain_queries(backend):
    """Chain fields are stored as given; audit_chain lists one proxy's chained events in
    storage order (or one seq), audit_chain_head is its highest seq, audit_chains counts
    per proxy with '' for unchained rows."""
    a, b = chained("pa", 5), chained("pb", 2)
    await wait(backend.append_audit([event(1, 1.0)] + a[:3] + b))
    await wait(backend.append_audit(a[3:]))
    assert await wait(backend.search_audit(since=10.0, limit=50)) == sorted(
        a + b, key=lambda e: e.time)
    assert await wait(backend.get_audit_event("pa-2")) == a[1]
    assert await wait(backend.audit_chain("pa")) == a
    assert await wait(backend.audit_chain("pa", offset=2, limit=2)) == a[2:4]
    assert await wait(backend.audit_chain("pa", seq=4)) == [a[3]]
    assert await wait(backend.audit_chain("nobody")) == []
    assert await wait(backend.audit_chain_head("pa")) == a[4]
    assert await wait(backend.audit_chain_head("pb")) == b[1]
    assert await wait(backend.audit_chain_head("nobody")) is None
    assert await wait(backend.audit_chains()) == {"": 1, "pa": 5, "pb": 2}
    (old,) = await wait(backend.search_audit(until=5.0))
    assert (old.proxy_id, old.seq, old.prev, old.digest) == ("", 0, "", "")


@pytest_twisted.ensureDeferred
async def test_unencodable_fields_are_backend_error(backend):
    """A record that cannot be JSON-encoded is one BackendError, not a stray TypeError, and
    stores nothing."""
    bad = AuditEvent("x", 1.0, "t", "c", "a", "t", "success", {"obj": object()})
    with pytest.raises(BackendError, match="cannot encode"):
        await wait(backend.append_audit([event(1, 1.0), bad]))
    with pytest.raises(BackendError, match="cannot encode"):
        await wait(backend.put_resource(Resource("role", "r", {"obj": object()})))
    assert await wait(backend.search_audit()) == []
    assert await wait(backend.get_resource("role", "r")) is None


# -- housekeeping -----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_delete_expired(backend):
    """delete_expired removes everything with expires <= now and counts it; users,
    resources, agents and audit never expire."""
    await wait(backend.create_user(user()))
    await wait(backend.put_agent(agent(cert_expires=1.0)))
    await wait(backend.append_audit([event(1, 1.0)]))
    await wait(backend.put_web_session(web("w-old", expires=50.0)))
    await wait(backend.put_web_session(web("w-new", expires=500.0)))
    await wait(backend.put_app_session(app_session("a-old", "w-old", expires=50.0)))
    await wait(backend.put_auth_code(code("c-old", expires=99.0)))
    await wait(backend.put_auth_code(code("c-new", expires=101.0)))
    await wait(backend.add_token(JoinToken("t-old", "app", 100.0, 0.0)))
    await wait(backend.add_token(JoinToken("t-new", "app", 1000.0, 0.0)))

    assert await wait(backend.delete_expired(100.0)) == 4
    assert await wait(backend.get_web_session("w-new")) is not None
    assert await wait(backend.get_web_session("w-old")) is None
    assert await wait(backend.get_app_session("a-old")) is None
    assert await wait(backend.take_auth_code("c-new")) is not None
    assert await wait(backend.get_token("t-new")) is not None
    assert await wait(backend.get_token("t-old")) is None
    assert await wait(backend.delete_expired(100.0)) == 0
    assert await wait(backend.get_user("alice")) is not None
    assert await wait(backend.get_agent("h1")) is not None
    assert len(await wait(backend.search_audit())) == 1


@pytest_twisted.ensureDeferred
async def test_take_saml_request_is_one_time_per_connector_and_unexpired(backend):
    """A SAML request id is taken once, only by its connector, only before it expires;
    of many racing takes exactly one wins, and delete_expired drops stale ones."""
    from apptunnel.backend.records import SamlRequest
    req = SamlRequest("id-1", "okta", "/app", 1000.0)
    await wait(backend.put_saml_request(req))
    with pytest.raises(AlreadyExists):
        await wait(backend.put_saml_request(req))
    assert await wait(backend.take_saml_request("id-1", "okta", 999.0)) == req
    assert await wait(backend.take_saml_request("id-1", "okta", 999.0)) is None
    cli = SamlRequest("id-c", "okta", "/", 1000.0, "40000 state challenge")
    await wait(backend.put_saml_request(cli))
    assert await wait(backend.take_saml_request("id-c", "okta", 999.0)) == cli
    await wait(backend.put_saml_request(SamlRequest("id-2", "okta", "/", 1000.0)))
    assert await wait(backend.take_saml_request("id-2", "other", 999.0)) is None
    assert await wait(backend.take_saml_request("id-2", "okta", 999.0)) is None   # spent
    await wait(backend.put_saml_request(SamlRequest("id-3", "okta", "/", 1000.0)))
    assert await wait(backend.take_saml_request("id-3", "okta", 1000.0)) is None  # expired
    await wait(backend.put_saml_request(SamlRequest("id-4", "okta", "/", 1000.0)))
    results = await defer.gatherResults(
        [wait(backend.take_saml_request("id-4", "okta", 1.0)) for _ in range(5)])
    assert len([r for r in results if r is not None]) == 1
    await wait(backend.put_saml_request(SamlRequest("id-5", "okta", "/", 10.0)))
    assert await wait(backend.delete_expired(20.0)) >= 1
    assert await wait(backend.take_saml_request("id-5", "okta", 1.0)) is None


# -- bots ---------------------------------------------------------------------------------


def bot_token(hash_: str, bot: str, uses: int = 1, expires: float = 1000.0) -> JoinToken:
    return JoinToken(hash_, "bot", expires, 1.0, uses_left=uses, bot=bot)


@pytest_twisted.ensureDeferred
async def test_bots_are_created_with_their_token_listed_and_removed_with_it(backend):
    """A bot and its join token are stored together; removing the bot removes its tokens."""
    ci = Bot("ci", ("ci-apps",), 1.0)
    await wait(backend.create_bot(ci, bot_token("t1", "ci")))
    with pytest.raises(AlreadyExists):
        await wait(backend.create_bot(ci, bot_token("t2", "ci")))
    assert await wait(backend.get_token("t2")) is None          # nothing of the refused one
    assert await wait(backend.get_bot("ci")) == ci
    assert (await wait(backend.get_token("t1"))).bot == "ci"
    await wait(backend.add_token(JoinToken("agent", "app", 1000.0, 1.0, uses_left=1)))
    assert await wait(backend.list_bots()) == [ci]
    assert await wait(backend.delete_bot("ci")) is True
    assert await wait(backend.delete_bot("ci")) is False
    assert await wait(backend.get_token("t1")) is None
    assert await wait(backend.get_token("agent")) is not None   # agents' tokens stay
    assert await wait(backend.list_bots()) == []


@pytest_twisted.ensureDeferred
async def test_a_bot_token_redeems_once_and_advances_the_generation(backend):
    """One use of a live bot token: generation 1; a second use, an agent token, an expired
    or unknown token redeem nothing."""
    await wait(backend.create_bot(Bot("ci", ("r",), 1.0), bot_token("t", "ci")))
    await wait(backend.create_bot(Bot("old", ("r",), 1.0), bot_token("o", "old", expires=4.0)))
    await wait(backend.add_token(JoinToken("agent", "app", 1000.0, 1.0, uses_left=5)))
    joined = await wait(backend.redeem_bot_token("t", 5.0, 65.0))
    assert joined == Bot("ci", ("r",), 1.0, generation=1, cert_expires=65.0)
    assert await wait(backend.redeem_bot_token("t", 5.0, 65.0)) is None
    assert await wait(backend.redeem_bot_token("agent", 5.0, 65.0)) is None
    assert (await wait(backend.get_token("agent"))).uses_left == 5
    assert await wait(backend.redeem_bot_token("o", 5.0, 65.0)) is None
    assert await wait(backend.redeem_bot_token("nope", 5.0, 65.0)) is None


@pytest_twisted.ensureDeferred
async def test_advance_bot_is_a_compare_and_set_on_the_generation(backend):
    """Of two renewals from the same certificate generation exactly one wins."""
    await wait(backend.create_bot(Bot("ci", ("r",), 1.0), bot_token("t", "ci")))
    await wait(backend.redeem_bot_token("t", 5.0, 65.0))
    results = await wait(defer.gatherResults([
        defer.ensureDeferred(backend.advance_bot("ci", 1, 70.0)),
        defer.ensureDeferred(backend.advance_bot("ci", 1, 71.0)),
    ]))
    winners = [r for r in results if r is not None]
    assert len(winners) == 1 and winners[0].generation == 2
    assert await wait(backend.advance_bot("ci", 1, 80.0)) is None
    assert await wait(backend.advance_bot("nobody", 0, 80.0)) is None
    assert (await wait(backend.get_bot("ci"))).generation == 2


@pytest_twisted.ensureDeferred
async def test_closed_backend_raises(backend):
    """Calls after close() raise BackendError; close() twice is harmless."""
    b = backend
    await wait(b.create_user(user()))
    await wait(b.close())
    await wait(b.close())
    for call in (b.get_user("alice"), b.list_locks(0.0), b.append_audit([event(1, 1.0)]),
                 b.search_audit(), b.delete_expired(0.0)):
        with pytest.raises(BackendError, match="closed"):
            await wait(call)


@pytest_twisted.ensureDeferred
async def test_list_user_web_sessions_names_only_that_users(backend):
    """A user's web sessions read back (the account page); nobody else's."""
    for record in (web("w1"), web("w2"), web("w3", user_name="bob")):
        await wait(backend.put_web_session(record))
    mine = await wait(backend.list_user_web_sessions("alice"))
    assert sorted(s.id_hash for s in mine) == ["w1", "w2"]
    assert mine[0] == web(mine[0].id_hash)
    assert await wait(backend.list_user_web_sessions("nobody")) == []
    await wait(backend.put_web_session(attrs.evolve(web("w4"), method="oidc:corp")))
    assert (await wait(backend.get_web_session("w4"))).method == "oidc:corp"


@pytest_twisted.ensureDeferred
async def test_audit_search_pages_newest_first_and_by_request_id(backend):
    """The audit viewer's questions: pages (offset) newest first, the events of one
    request id (a field, matched exactly), and one event by its id."""
    events = [event(i, 100.0 + i) for i in range(7)]
    events[3] = attrs.evolve(events[3], fields={"request_id": "req-abc", "n": 3})
    events[5] = attrs.evolve(events[5], fields={"request_id": "req-abc%", "n": 5})
    await wait(backend.append_audit(events))
    newest = await wait(backend.search_audit(newest_first=True, limit=3))
    assert [e.id for e in newest] == ["id006", "id005", "id004"]
    page2 = await wait(backend.search_audit(newest_first=True, limit=3, offset=3))
    assert [e.id for e in page2] == ["id003", "id002", "id001"]
    assert [e.id for e in await wait(backend.search_audit(offset=5))] == ["id005", "id006"]
    assert await wait(backend.search_audit(offset=50)) == []
    assert [e.id for e in await wait(backend.search_audit(request_id="req-abc"))] == ["id003"]
    assert await wait(backend.search_audit(request_id="req-%")) == []
    assert await wait(backend.get_audit_event("id003")) == events[3]
    assert await wait(backend.get_audit_event("nope")) is None


# -- cluster keys (auth/keystore.py) ------------------------------------------------------


def key(kind="jwt", id="k1", state="current", created=1.0, **kw):
    return KeyRecord(kind, id, state, f"material-{id}", "ES256", created, **kw)


@pytest_twisted.ensureDeferred
async def test_add_key_is_insert_if_absent_and_one_current_per_kind(backend):
    assert await backend.add_key(key())
    assert not await backend.add_key(key(state="next"))            # same (kind, id)
    assert not await backend.add_key(key(id="k2"))                 # a second current
    assert await backend.add_key(key(kind="ca", id="k2"))          # another kind
    assert await backend.add_key(key(id="k3", state="next", created=2.0, activate_at=9.0))
    assert not await backend.add_key(key(id="k4", state="next"))   # a second next
    assert [k.id for k in await backend.list_keys("jwt")] == ["k1", "k3"]
    assert [k.id for k in await backend.list_keys()] == ["k1", "k2", "k3"]
    stored = (await backend.list_keys("jwt"))[1]
    assert stored == key(id="k3", state="next", created=2.0, activate_at=9.0)
    assert isinstance(stored.created, float)


@pytest_twisted.ensureDeferred
async def test_set_key_states_is_all_or_nothing_compare_and_set(backend):
    await backend.add_key(key())
    await backend.add_key(key(id="k2", state="next", created=2.0))
    swap = [("current", key(state="retired", retire_at=50.0)),
            ("next", key(id="k2", created=2.0, activate_at=10.0))]
    resealed = attrs.evolve(key(id="k2", created=2.0, activate_at=10.0), material="sealed")
    assert await backend.set_key_states(swap)
    states = {k.id: (k.state, k.activate_at, k.retire_at) for k in await backend.list_keys()}
    assert states == {"k1": ("retired", None, 50.0), "k2": ("current", 10.0, None)}
    assert await backend.set_key_states([("current", resealed)])
    assert (await backend.list_keys("jwt"))[1] == resealed
    # The last change expects k1 current (it is not): the first two are rolled back.
    assert not await backend.set_key_states([
        ("current", key(id="k2", state="retired", created=2.0)),
        ("retired", key(state="retired", retire_at=99.0)),
        ("current", key(state="next")),
    ])
    states = {k.id: (k.state, k.retire_at) for k in await backend.list_keys()}
    assert states == {"k1": ("retired", 50.0), "k2": ("current", None)}
    assert await backend.delete_key("jwt", "k1")
    assert not await backend.delete_key("jwt", "k1")
    assert [k.id for k in await backend.list_keys()] == ["k2"]
# -- several proxies ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_proxies_heartbeat_upserts_and_stale_rows_are_not_listed(backend):
    """A proxy's row is replaced by its next heartbeat; rows older than `since` are not
    listed; a clean stop deletes the row (once)."""
    await wait(backend.heartbeat_proxy(ProxyRecord("p2", "10.0.0.2:3024", "1.0", 5.0, 5.0)))
    await wait(backend.heartbeat_proxy(ProxyRecord("p1", "10.0.0.1:3024", "1.0", 1.0, 1.0)))
    await wait(backend.heartbeat_proxy(ProxyRecord("p1", "10.0.0.1:3025", "1.1", 1.0, 9.5)))
    assert await wait(backend.list_proxies(0.0)) == [
        ProxyRecord("p1", "10.0.0.1:3025", "1.1", 1.0, 9.5),
        ProxyRecord("p2", "10.0.0.2:3024", "1.0", 5.0, 5.0)]
    assert [p.proxy_id for p in await wait(backend.list_proxies(6.0))] == ["p1"]
    assert await wait(backend.delete_proxy("p1")) is True
    assert await wait(backend.delete_proxy("p1")) is False
    assert [p.proxy_id for p in await wait(backend.list_proxies(0.0))] == ["p2"]


@pytest_twisted.ensureDeferred
async def test_agent_tunnels_one_row_per_agent_and_proxy(backend):
    """An agent's tunnel to each proxy is its own row; a reconnect replaces it; removing
    one leaves the agent's tunnels to other proxies."""
    await wait(backend.put_agent_tunnel(AgentTunnel("h1", "p2", "10.0.0.9:1", 3.0)))
    await wait(backend.put_agent_tunnel(AgentTunnel("h1", "p1", "10.0.0.9:2", 2.0)))
    await wait(backend.put_agent_tunnel(AgentTunnel("h0", "p1", "10.0.0.8:1", 1.0)))
    await wait(backend.put_agent_tunnel(AgentTunnel("h1", "p1", "10.0.0.9:3", 4.0)))
    assert await wait(backend.list_agent_tunnels()) == [
        AgentTunnel("h0", "p1", "10.0.0.8:1", 1.0), AgentTunnel("h1", "p1", "10.0.0.9:3", 4.0),
        AgentTunnel("h1", "p2", "10.0.0.9:1", 3.0)]
    assert await wait(backend.delete_agent_tunnel("h1", "p1")) is True
    assert await wait(backend.delete_agent_tunnel("h1", "p1")) is False
    assert [(t.host_id, t.proxy_id) for t in await wait(backend.list_agent_tunnels())] == [
        ("h0", "p1"), ("h1", "p2")]


def pairs(tunnels: list[AgentTunnel]) -> list[tuple[str, str]]:
    return [(t.host_id, t.proxy_id) for t in tunnels]


@pytest_twisted.ensureDeferred
async def test_a_proxys_tunnel_rows_go_with_it(backend):
    """Issue 13: agent_tunnels rows never outlive their proxy. A heartbeat of a new run
    (later `started`) deletes the rows of the earlier run (killed) and keeps its own; a
    clean stop deletes all of the proxy's rows; forget_proxies removes proxies silent
    since `before` with their rows, and leaves live ones (and other proxies' rows)."""
    await wait(backend.heartbeat_proxy(ProxyRecord("p1", "10.0.0.1:3024", "1.0", 1.0, 1.0)))
    await wait(backend.heartbeat_proxy(ProxyRecord("p2", "10.0.0.2:3024", "1.0", 1.0, 1.0)))
    await wait(backend.heartbeat_proxy(ProxyRecord("p3", "10.0.0.3:3024", "1.0", 1.0, 20.0)))
    for host, proxy, since in (("h1", "p1", 2.0), ("h2", "p1", 3.0), ("h1", "p2", 2.0),
                               ("h1", "p3", 2.0)):
        await wait(backend.put_agent_tunnel(AgentTunnel(host, proxy, "10.0.0.9:1", since)))
    # p1 restarted at 10 (kill -9, same id): h2 reconnected at 11, h1 has not yet.
    await wait(backend.put_agent_tunnel(AgentTunnel("h2", "p1", "10.0.0.9:2", 11.0)))
    await wait(backend.heartbeat_proxy(ProxyRecord("p1", "10.0.0.1:3024", "1.0", 10.0, 10.0)))
    assert pairs(await wait(backend.list_agent_tunnels())) == [
        ("h1", "p2"), ("h1", "p3"), ("h2", "p1")]
    # p1 stops cleanly: its rows go with its registration.
    assert await wait(backend.delete_proxy("p1")) is True
    assert pairs(await wait(backend.list_agent_tunnels())) == [("h1", "p2"), ("h1", "p3")]
    # p2 was killed and never came back: forgotten once silent since before 15; p3 stays.
    assert await wait(backend.forget_proxies(15.0)) == ["p2"]
    assert await wait(backend.forget_proxies(15.0)) == []
    assert [p.proxy_id for p in await wait(backend.list_proxies(0.0))] == ["p3"]
    assert pairs(await wait(backend.list_agent_tunnels())) == [("h1", "p3")]


# -- a chain several processes extend (the admin CLI's) -------------------------------------


def unchained(prefix: str, n: int, t: float = 50.0) -> list[AuditEvent]:
    return [AuditEvent(f"{prefix}-{i}", t + i, "user.create", "T4000I", "root", f"u{i}",
                       "success", {"n": i}) for i in range(1, n + 1)]


async def verify_one(backend, chain: str):
    from apptunnel.audit.verify import verify_chain
    return await wait(defer.ensureDeferred(verify_chain(backend, chain)))


@pytest_twisted.ensureDeferred
async def test_append_audit_chained_extends_the_stored_head_and_skips_stored_ids(backend):
    """Issue 13: append_audit_chained links events after the chain's stored head (seq 1
    on an empty chain), returns what it stored, skips ids already stored (a retry), and
    the chain verifies; other chains and unchained events are untouched."""
    from apptunnel.audit.chain import link

    first = unchained("a", 3)
    stored = await wait(backend.append_audit_chained("cli", first, link))
    assert [(e.id, e.proxy_id, e.seq) for e in stored] == [
        ("a-1", "cli", 1), ("a-2", "cli", 2), ("a-3", "cli", 3)]
    assert stored[0].prev == "0" * 64 and stored[1].prev == stored[0].digest
    # A retry of the last batch (reply lost) with one new event: only the new one goes in.
    again = await wait(backend.append_audit_chained("cli", first[2:] + unchained("b", 1), link))
    assert [(e.id, e.seq, e.prev) for e in again] == [("b-1", 4, stored[2].digest)]
    await wait(backend.append_audit(chained("pa", 2) + [event(1, 1.0)]))
    assert await wait(backend.audit_chain("cli")) == stored + again
    assert await wait(backend.audit_chains()) == {"": 1, "cli": 4, "pa": 2}
    report = await verify_one(backend, "cli")
    assert report.problem is None and report.events == 4


@pytest_twisted.ensureDeferred
async def test_signin_states_are_read_by_kind_taken_once_and_bounded(backend):
    """A pending sign-in step (auth/signin_states.py) is read only as its kind and while
    live, taken once of many racing takes, dropped by delete_expired, and a kind holds at
    most ``limit`` steps: expired ones go first, then the oldest."""
    from apptunnel.backend.records import SignInState
    step = SignInState("h1", "mfa", '{"user": "alice"}', 1000.0)
    await wait(backend.put_signin_state(step, 10.0, 100))
    with pytest.raises(AlreadyExists):
        await wait(backend.put_signin_state(step, 10.0, 100))
    assert await wait(backend.get_signin_state("mfa", "h1", 999.0)) == step
    assert await wait(backend.get_signin_state("mfa", "h1", 999.0)) == step   # a read keeps it
    assert await wait(backend.get_signin_state("oidc", "h1", 999.0)) is None
    assert await wait(backend.get_signin_state("mfa", "h1", 1000.0)) is None  # expired
    assert await wait(backend.take_signin_state("oidc", "h1", 999.0)) is None  # not its kind
    assert await wait(backend.take_signin_state("mfa", "h1", 999.0)) == step
    assert await wait(backend.take_signin_state("mfa", "h1", 999.0)) is None   # spent
    assert await wait(backend.get_signin_state("mfa", "h1", 999.0)) is None
    await wait(backend.put_signin_state(SignInState("h2", "mfa", "{}", 1000.0), 10.0, 100))
    assert await wait(backend.take_signin_state("mfa", "h2", 1000.0)) is None  # expired
    await wait(backend.put_signin_state(SignInState("h3", "mfa", "{}", 1000.0), 10.0, 100))
    results = await defer.gatherResults(
        [wait(backend.take_signin_state("mfa", "h3", 11.0)) for _ in range(5)])
    assert sum(r is not None for r in results) == 1
    # The bound: three steps of a kind; an expired one goes before any live one.
    for key, expires in (("b1", 50.0), ("b2", 300.0), ("b3", 200.0)):
        await wait(backend.put_signin_state(SignInState(key, "webauthn", "{}", expires), 10.0, 3))
    await wait(backend.put_signin_state(SignInState("x1", "oidc", "{}", 500.0), 10.0, 3))
    await wait(backend.put_signin_state(SignInState("b4", "webauthn", "{}", 400.0), 100.0, 3))
    assert await wait(backend.get_signin_state("webauthn", "b1", 10.0)) is None
    for key in ("b2", "b3", "b4"):
        assert await wait(backend.get_signin_state("webauthn", key, 100.0)) is not None
    await wait(backend.put_signin_state(SignInState("b5", "webauthn", "{}", 600.0), 100.0, 3))
    assert await wait(backend.get_signin_state("webauthn", "b3", 100.0)) is None  # the oldest
    for key in ("b2", "b4", "b5"):
        assert await wait(backend.get_signin_state("webauthn", key, 100.0)) is not None
    assert await wait(backend.get_signin_state("oidc", "x1", 100.0)) is not None  # other kind
    assert await wait(backend.delete_expired(1000.0)) >= 4
    assert await wait(backend.get_signin_state("webauthn", "b5", 100.0)) is None
