"""App resources, resource selectors, dynamic labels and the checks around them (issue 11).

Pure parts (selectors, config parsing, messages, the resource-definition rule, label
values) directly; the proxy's watcher on a memory backend and a Clock; the decision cache
and live re-checks with the fakes of test_auth_access.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings, strategies as st
from twisted.internet.task import Clock

from apptunnel import messages
from apptunnel.agent.labels import MAX_VALUE, label_value
from apptunnel.auth.access import AccessPolicy, Allow, Deny, Facts, LiveRecheck
from apptunnel.auth.rbac import RoleError, parse_label_selector, selector_matches
from apptunnel.backend.records import Resource
from apptunnel.catalog import AppInfo
from apptunnel.config import ConfigError, app_from_resource, load_agent_config
from apptunnel.messages import Announce, AnnounceOk, AppAnnouncement, AppResources, Hello, MessageError
from apptunnel.proxy.app_resources import AppResources as Watcher
from apptunnel.proxy.app_resources import resource_refusal
from apptunnel.proxy.registry import AgentRegistry
from tests.support.memory import MemoryBackend
from tests.support.access_fakes import NOW, Locks, Roles, Users, cert, run
from tests.support.audit_fake import Audit

AGENT = """\
data_dir: data
proxy_addr: 127.0.0.1:3024
"""


def agent_config(tmp_path, text):
    path = tmp_path / "agent.yaml"
    path.write_text(AGENT + text)
    return load_agent_config(str(path))


def wiki(**spec):
    return {"kind": "app", "metadata": {"name": "wiki", "labels": {"env": "dev"}},
            "spec": {"uri": "http://127.0.0.1:8080", **spec}}


# -- selectors --------------------------------------------------------------------------


@pytest.mark.parametrize("selector, labels, expected", [
    ({"env": "dev"}, {"env": "dev", "team": "a"}, True),
    ({"env": "dev"}, {"env": "prod"}, False),
    ({"env": ["dev", "^stage-.*$"]}, {"env": "stage-2"}, True),
    ({"env": "*"}, {"team": "a"}, False),            # the key must be there
    ({"*": "*"}, {}, True),
    ({"env": "dev", "team": "a"}, {"env": "dev"}, False),
    ({}, {"env": "dev"}, False),                      # empty matches nothing
])
def test_a_selector_matches_by_a_roles_rules(selector, labels, expected):
    """Exact, any, ^regex$ and lists, every key; an empty selector matches nothing."""
    assert selector_matches(parse_label_selector("resources[0].labels", selector), labels) is expected


def test_a_selector_takes_no_trait_templates():
    """An agent has no user whose traits a template could expand."""
    with pytest.raises(RoleError, match="trait templates"):
        parse_label_selector("s", {"env": "{{internal.env}}"})


def test_resources_in_the_agent_config(tmp_path):
    """resources: label selectors kept as {key: [values]}, as the hello carries them."""
    config = agent_config(tmp_path, "resources:\n  - labels: {env: dev, team: [a, b]}\n")
    assert config.resources == ({"env": ["dev"], "team": ["a", "b"]},)
    assert agent_config(tmp_path, "").resources == ()


@pytest.mark.parametrize("text, key", [
    ("resources: {labels: {env: dev}}\n", "resources"),
    ("resources: [dev]\n", "resources[0]"),
    ("resources: [{labels: {env: dev}, name: x}]\n", "resources[0].name"),
    ("resources: [{}]\n", "resources[0].labels"),
    ("resources: [{labels: {}}]\n", "resources[0].labels"),
    ("resources: [{labels: {env: 'dev*'}}]\n", "resources[0].labels.env"),
    ("resources: [{labels: {env: '^(unclosed$'}}]\n", "resources[0].labels.env"),
])
def test_bad_resource_selectors_are_one_line_naming_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError) as info:
        agent_config(tmp_path, text)
    assert key in str(info.value) and "agent.yaml:" in str(info.value)
    assert "\n" not in str(info.value)


# -- dynamic labels in the config --------------------------------------------------------


def test_dynamic_labels_are_parsed(tmp_path):
    config = agent_config(tmp_path, """\
apps:
  - name: web
    uri: http://127.0.0.1:80
    labels: {env: dev}
    dynamic_labels:
      commit: {command: [git, -C, /srv/app, rev-parse, HEAD], period: 1m}
      up: {command: [uptime]}
""")
    [commit, up] = config.apps[0].dynamic_labels
    assert commit.command == ("git", "-C", "/srv/app", "rev-parse", "HEAD")
    assert (commit.period, commit.timeout) == (60.0, 10.0)
    assert (up.key, up.period) == ("up", 60.0)


@pytest.mark.parametrize("dynamic, key, problem", [
    ("{env: {command: [x]}}", "apps[0].dynamic_labels.env", "also a static label"),
    ("{c: {command: []}}", "apps[0].dynamic_labels.c.command", "argument vector"),
    ("{c: {command: 'git rev-parse HEAD'}}", "apps[0].dynamic_labels.c.command", "no shell"),
    ("{c: {command: [git, '']}}", "apps[0].dynamic_labels.c.command", "non-empty"),
    ("{c: {command: [x], period: 100ms}}", "apps[0].dynamic_labels.c.period", "at least 1s"),
    ("{c: {command: [x], shell: true}}", "apps[0].dynamic_labels.c.shell", "unknown key"),
    ("{c: {period: 1m}}", "apps[0].dynamic_labels.c.command", "required"),
    ("[x]", "apps[0].dynamic_labels", "mapping"),
])
def test_bad_dynamic_labels_are_config_errors(tmp_path, dynamic, key, problem):
    """A key both static and dynamic, a shell string, a period below the floor: one line."""
    with pytest.raises(ConfigError) as info:
        agent_config(tmp_path, "apps:\n  - name: web\n    uri: http://127.0.0.1:80\n"
                               f"    labels: {{env: dev}}\n    dynamic_labels: {dynamic}\n")
    assert f": {key}: " in str(info.value) and problem in str(info.value)


# -- kind: app documents -------------------------------------------------------------------


def test_an_app_resource_reads_like_an_agents_app_entry():
    app = app_from_resource("f: doc 1", wiki(public_addr="wiki.example.com",
                                             rewrite={"headers": ["X-Team: a"]}))
    assert (app.name, app.labels, app.public_addr) == ("wiki", {"env": "dev"}, "wiki.example.com")
    assert app.rewrite_headers == (("X-Team", "a"),)


@pytest.mark.parametrize("change, message", [
    (lambda d: d["spec"].update(uri="ftp://x"), "f: doc 1: spec.uri: expected an http://"),
    (lambda d: d["spec"].update(name="x"), "f: doc 1: spec.name: unknown key"),
    (lambda d: d["spec"].update(labels={}), "f: doc 1: spec.labels: unknown key"),
    (lambda d: d["metadata"].update(name="Wiki_1"), "f: doc 1: metadata.name: expected a DNS label"),
    (lambda d: d["metadata"].update(labels={"env": 5}), "f: doc 1: metadata.labels.env: expected a string"),
    (lambda d: d.pop("spec"), "f: doc 1: spec: required key is missing"),
    (lambda d: d.update(extra=1), "f: doc 1: extra: unknown key"),
    (lambda d: d["spec"].update(rewrite={"headers": ["Connection: close"]}),
     "f: doc 1: spec.rewrite.headers[0]: Connection frames the request"),
    (lambda d: d["spec"].update(dynamic_labels={"env": {"command": ["x"]}}),
     "also a static label"),
])
def test_a_bad_app_resource_is_one_line_naming_the_key(change, message):
    doc = wiki()
    change(doc)
    with pytest.raises(ConfigError) as info:
        app_from_resource("f: doc 1", doc)
    assert message in str(info.value)


# -- messages ------------------------------------------------------------------------------


RECORDS = [
    Hello(host_id="h", version="1", resources=({"env": ["dev"]},)),
    AppResources(resources=(wiki(),)),
    AppResources(),
    Announce(apps=(AppAnnouncement("wiki", "http://127.0.0.1:8080", {"env": "dev"}),)),
    AnnounceOk(refused=(("wiki", "no"),)),
]


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: type(r).__name__)
def test_new_messages_round_trip(record):
    assert messages.parse(json.loads(json.dumps(record.to_dict()))) == record


def test_a_hello_without_selectors_is_the_hello_it_always_was():
    assert "resources" not in Hello(host_id="h", version="1").to_dict()


@pytest.mark.parametrize("message, field", [
    ({"type": "hello", "host_id": "h", "apps": [], "resources": {"env": ["dev"]}}, "hello.resources"),
    ({"type": "hello", "host_id": "h", "apps": [], "resources": [{"env": "dev"}]}, "hello.resources[0]"),
    ({"type": "hello", "host_id": "h", "apps": [], "resources": [{}] * 65}, "hello.resources"),
    ({"type": "app_resources", "resources": [{"kind": "role"}]}, "app_resources.resources[0]"),
    ({"type": "app_resources", "resources": [wiki(), wiki()]}, "duplicate app 'wiki'"),
    ({"type": "app_resources"}, "app_resources.resources"),
    ({"type": "announce", "apps": [{"name": "a", "uri": "x"}]}, "apps[0].uri"),
    ({"type": "announce_ok", "refused": [{"app": 1}]}, "announce_ok.refused"),
])
def test_malformed_new_messages_name_the_field(message, field):
    with pytest.raises(MessageError, match=field.replace("[", r"\[").replace("]", r"\]")):
        messages.parse(message)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["kind", "metadata", "spec", "name", "uri", "labels", "env"])
        | st.text(max_size=6), inner, max_size=4),
    max_leaves=25,
)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["hello", "app_resources", "announce", "announce_ok"]),
       st.dictionaries(st.sampled_from(["host_id", "apps", "resources", "refused", "version"]),
                       _json, max_size=5))
def test_garbage_in_the_new_messages_never_crashes(kind, message):
    """Whatever a peer sends: a record or MessageError; and what the agent then reads of
    an app_resources document is a config or a ConfigError, nothing else."""
    message["type"] = kind
    try:
        record = messages.parse(message)
    except MessageError:
        return
    if isinstance(record, AppResources):
        for doc in record.resources:
            try:
                app_from_resource("app resource", doc)
            except ConfigError:
                pass


# -- the one definition of a resource app ---------------------------------------------------


def announcement(**change):
    """The registration an announcement asks for (address defaulted, as app_info does)."""
    fields = dict(name="wiki", uri="http://127.0.0.1:8080", labels={"env": "dev", "commit": "abc"},
                  public_addr="wiki.apptunnel.localhost")
    fields.update(change)
    return AppInfo(**fields)


RESOURCE = app_from_resource("r", wiki(dynamic_labels={"commit": {"command": ["git", "log"]}}))


@pytest.mark.parametrize("announced, refused", [
    (announcement(), None),
    (announcement(public_addr="WIKI.apptunnel.localhost"), None),
    (announcement(uri="http://10.0.0.1:22"), "differently"),
    (announcement(public_addr="evil.apptunnel.localhost"), "differently"),
    (announcement(rewrite_headers=(("X-User", "admin"),)), "differently"),
    (announcement(labels={"env": "prod", "commit": "abc"}), "label env differs"),
    (announcement(labels={"env": "dev", "commit": "abc", "team": "sre"}), "without label team"),
])
def test_an_announcement_of_a_resource_must_be_that_resource(announced, refused):
    """Only the resource's own dynamic label keys may be added by an agent."""
    reason = resource_refusal(RESOURCE, announced, "wiki.apptunnel.localhost")
    assert (reason is None) if refused is None else (refused in reason)


# -- label values -----------------------------------------------------------------------------


@pytest.mark.parametrize("output, value", [
    (b"3f2a9c\n", "3f2a9c"),
    (b"  first line  \nsecond\n", "first line"),
    (b"\x1b[31mred\x07\n", "[31mred"),
    (b"x" * 10_000, "x" * MAX_VALUE),
    (b"\xff\xfe ok", "\ufffd\ufffd ok"),
    (b"", ""),
])
def test_a_label_value_is_one_printable_line_capped(output, value):
    assert label_value(output) == value


# -- the proxy's watcher ----------------------------------------------------------------------


def watcher_world():
    backend, clock = MemoryBackend(), Clock()
    watcher = Watcher(backend, clock)
    changes = []
    watcher.add_listener(lambda: changes.append(clock.seconds()))
    return backend, clock, watcher, changes


def put(backend, doc):
    run(backend.put_resource(Resource(kind="app", name=doc["metadata"]["name"], doc=doc)))


def test_the_watcher_polls_and_tells_listeners_only_on_change():
    backend, clock, watcher, changes = watcher_world()
    put(backend, wiki())
    watcher.start()
    assert changes == [0.0] and watcher.app("wiki").labels == {"env": "dev"}
    clock.advance(2.0)
    assert changes == [0.0]                            # nothing changed: nobody told
    prod = wiki()
    prod["metadata"] = {"name": "prod", "labels": {"env": "prod"}}
    put(backend, prod)
    clock.advance(2.0)
    assert changes == [0.0, 4.0]
    selectors = (parse_label_selector("s", {"env": "dev"}),)
    assert [d["metadata"]["name"] for d in watcher.matching(selectors)] == ["wiki"]
    run(backend.delete_resource("app", "wiki"))
    run(watcher.refresh())
    assert watcher.matching(selectors) == [] and watcher.app("wiki") is None
    watcher.stop()


def test_a_resource_that_does_not_parse_is_served_by_nobody():
    """Written behind the CLI's back: logged once, never sent to an agent."""
    backend, clock, watcher, changes = watcher_world()
    put(backend, wiki(uri="file:///etc/passwd"))
    run(watcher.refresh())
    assert watcher.app("wiki") is None
    assert watcher.matching((parse_label_selector("s", {"*": "*"}),)) == []


# -- the decision cache and live connections ----------------------------------------------------


def test_a_decision_cached_on_old_labels_is_not_reused():
    """The cache is keyed on the app's labels too: a dynamic label that changes is decided
    on at once, not after the cache's few seconds."""
    clock = Clock()
    clock.advance(NOW)
    policy = AccessPolicy(roles=Roles(), audit=Audit(), clock=clock, locks=Locks(),
                          users=Users(alice=("dev",)))
    dev = AppInfo("web", "http://127.0.0.1:1", {"env": "dev"}, "web.example.com")
    prod = AppInfo("web", "http://127.0.0.1:1", {"env": "prod"}, "web.example.com")
    assert isinstance(run(policy.decide(cert(), dev, Facts(), NOW)), Allow)
    assert isinstance(run(policy.decide(cert(), prod, Facts(), NOW)), Deny)
    assert policy.recall("fp-1", "alice", dev, Facts(), NOW) is None


class Conn:
    def __init__(self, caller, app_name):
        self.caller, self.app_name, self.refusals = caller, app_name, []

    def refused(self, deny):
        self.refusals.append(deny)


def test_an_apps_new_labels_recheck_its_live_connections():
    """The registry says an app's definition changed: its live connections are decided
    again on the new labels and cut when refused; other apps' are left alone."""
    clock = Clock()
    clock.advance(NOW)
    policy = AccessPolicy(roles=Roles(), audit=Audit(), clock=clock, users=Users(alice=("dev",)))
    registry = AgentRegistry(clock)
    tunnel = object()
    dev = AppInfo("web", "http://127.0.0.1:1", {"env": "dev"}, "web.example.com", agent_id="a")
    other = AppInfo("other", "http://127.0.0.1:2", {"env": "dev"}, "other.example.com",
                    agent_id="a")
    registry.add(tunnel, "a", [dev, other])
    conns = [Conn(cert(), "web"), Conn(cert(credential="fp-2"), "other")]
    LiveRecheck(policy, clock, lambda: conns, registry.app, apps=registry)
    for conn in conns:
        assert isinstance(run(policy.decide(conn.caller, registry.app(conn.app_name), Facts(), NOW)),
                          Allow)
    registry.add(tunnel, "a", [AppInfo("web", "http://127.0.0.1:1", {"env": "prod"},
                                       "web.example.com", agent_id="a"), other])
    assert [len(c.refusals) for c in conns] == [1, 0]
    assert conns[0].refusals[0].code == "rbac"


# -- the examples in etc/ ----------------------------------------------------------------------


def test_the_etc_examples_parse(tmp_path):
    """etc/app-resource.yaml is a valid app resource, and etc/agent.yaml's commented
    resources and dynamic_labels examples are valid once uncommented."""
    from pathlib import Path

    from apptunnel.config import load_yaml_documents

    etc = Path(__file__).resolve().parents[2] / "etc"
    [doc] = load_yaml_documents(str(etc / "app-resource.yaml"))
    assert app_from_resource("etc/app-resource.yaml", doc).dynamic_labels[0].key == "commit"
    uncomment = {"# resources:": "resources:", "#   - labels:": "  - labels:",
                 "    # dynamic_labels:": "    dynamic_labels:",
                 "    #   commit:": "      commit:"}
    lines = []
    for line in (etc / "agent.yaml").read_text().splitlines():
        for commented, plain in uncomment.items():
            if line.startswith(commented):
                line = plain + line[len(commented):]
        lines.append(line)
    text = "\n".join(lines) + "\n"
    path = tmp_path / "agent.yaml"
    path.write_text(text.replace("data_dir: /var/lib/apptunnel/agent", f"data_dir: {tmp_path}"))
    config = load_agent_config(str(path))
    assert config.resources and config.resources[0] == {"env": ["dev"]}
    assert [a.name for a in config.apps if a.dynamic_labels] == ["dev-wiki"]
