"""The agent <-> proxy control vocabulary: typed records, one parser, one error type."""

import json

import pytest
from hypothesis import given, settings, strategies as st

from apptunnel import messages
from apptunnel.messages import (
    AppAnnouncement,
    Hello,
    HelloOk,
    HelloRefused,
    Join,
    JoinOk,
    JoinRefused,
    MessageError,
    Renew,
    RenewOk,
    RenewRefused,
    parse,
)

RECORDS = [
    Join(token="s3cret", csr="-----BEGIN CERTIFICATE REQUEST-----", host_id="host-1"),
    JoinOk(cert="CERT", ca="CA"),
    JoinRefused("invalid or expired join token"),
    Hello(host_id="host-1", version="1.0", apps=(
        AppAnnouncement("grafana", "http://127.0.0.1:3000", {"env": "dev"}, None,
                        (("X-Team", "sre"),), ("sub", "roles")),
        AppAnnouncement("db", "tcp://127.0.0.1:5432", tcp_ports=((5432, 5432), (6000, 6010))),
    )),
    HelloOk(proxy_id="p-1"),
    HelloOk(proxy_id="p-1", refused=(("wiki", "its join token allows only apps grafana"),)),
    HelloRefused("this agent is locked"),
    HelloRefused("join again", rejoin=True),
    Renew(csr="CSR"),
    RenewOk(cert="CERT"),
    RenewRefused("renewal too soon"),
]


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: type(r).__name__)
def test_every_message_round_trips_through_json(record):
    """to_dict() is plain JSON, and parse() gives back the same record."""
    wire = json.loads(json.dumps(record.to_dict()))
    assert wire["type"] == record.TYPE
    assert parse(wire) == record


def test_wire_forms_stay_as_documented():
    """Optional fields are left out as before: no refused/rejoin/tcp_ports when empty."""
    assert HelloOk("p").to_dict() == {"type": "hello_ok", "proxy_id": "p"}
    assert HelloRefused("no").to_dict() == {"type": "hello_error", "message": "no"}
    assert "tcp_ports" not in AppAnnouncement("a", "http://x").to_dict()


def test_a_join_token_never_shows_in_a_repr():
    """The token is a secret: a record printed into a log line does not carry it."""
    assert "s3cret" not in repr(RECORDS[0])


@pytest.mark.parametrize("message, field", [
    ({"type": "join", "token": 5, "csr": "x", "host_id": "h"}, "join.token"),
    ({"type": "join", "token": "", "csr": "x", "host_id": "h"}, "join.token"),
    ({"type": "join", "token": "t" * 513, "csr": "x", "host_id": "h"}, "join.token"),
    ({"type": "join", "token": "t", "host_id": "h"}, "join.csr"),
    ({"type": "join", "token": "t", "csr": "x", "host_id": None}, "join.host_id"),
    ({"type": "join_ok", "cert": "c"}, "join_ok.ca"),
    ({"type": "hello", "host_id": 1, "apps": []}, "hello.host_id"),
    ({"type": "hello", "host_id": "h", "apps": "grafana"}, "apps must be a list"),
    ({"type": "hello", "host_id": "h", "apps": [{"name": "Bad_Name", "uri": "http://x"}]},
     "apps[0].name"),
    ({"type": "hello", "host_id": "h", "apps": [{"name": "a", "uri": "ftp://x"}]},
     "apps[0].uri"),
    ({"type": "hello", "host_id": "h", "apps": [{"name": "a", "uri": "http://[x"}]},
     "apps[0].uri"),
    ({"type": "hello", "host_id": "h",
      "apps": [{"name": "a", "uri": "http://x", "labels": {"k": 1}}]}, "apps[0].labels"),
    ({"type": "hello", "host_id": "h",
      "apps": [{"name": "a", "uri": "http://x", "rewrite_headers": [["Bad Name", "v"]]}]},
     "apps[0].rewrite_headers"),
    ({"type": "hello", "host_id": "h",
      "apps": [{"name": "a", "uri": "http://x", "rewrite_headers": [["X", "a\r\nb"]]}]},
     "apps[0].rewrite_headers"),
    ({"type": "hello", "host_id": "h",
      "apps": [{"name": "a", "uri": "http://x", "jwt_claims": ["password"]}]},
     "apps[0].jwt_claims"),
    ({"type": "hello", "host_id": "h",
      "apps": [{"name": "a", "uri": "http://x", "tcp_ports": [[1, 2]]}]}, "apps[0].tcp_ports"),
    ({"type": "hello", "host_id": "h",
      "apps": [{"name": "a", "uri": "http://x"}, {"name": "a", "uri": "http://y"}]},
     "duplicate app"),
    ({"type": "hello_ok", "proxy_id": "p", "refused": [{"app": 1}]}, "hello_ok.refused"),
    ({"type": "renew"}, "renew.csr"),
    ({"type": "renew", "csr": ["x"]}, "renew.csr"),
    ({"type": "renew_ok", "cert": None}, "renew_ok.cert"),
    ({"type": "ping"}, "unknown message type 'ping'"),
    ({}, "unknown message type None"),
    (["join"], "unknown message type None"),
])
def test_malformed_messages_raise_one_error_naming_the_field(message, field):
    """Wrong types, sizes and forms: MessageError whose text names the field."""
    with pytest.raises(MessageError) as caught:
        parse(message)
    assert field in str(caught.value)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                               max_size=4),
    max_leaves=20,
)
_keys = st.sampled_from(["type", "token", "csr", "host_id", "cert", "ca", "message", "apps",
                         "version", "proxy_id", "refused", "rejoin", "name", "uri"])
_types = st.sampled_from([cls.TYPE for cls in messages._TYPES.values()]) | st.text(max_size=8)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_keys, _json, max_size=8), _types)
def test_garbage_parses_or_raises_message_error(message, kind):
    """Whatever a peer sends, parse() returns a record or raises MessageError, nothing else."""
    message["type"] = kind
    try:
        record = parse(message)
    except MessageError:
        return
    assert record.TYPE == kind
