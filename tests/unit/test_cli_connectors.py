"""`apptunnel create -f / get / rm` for connectors (issue 10): checked in full at create
time, one line naming the key, no secret ever printed, roles must exist."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import pytest_twisted
import yaml

from apptunnel.backend.records import Resource, User
from tests.support.cli_admin import cli, one_error, stored

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "etc" / "connectors" / "ldap.yaml"


@pytest.fixture
def config_path(tmp_path) -> str:
    path = tmp_path / "proxy.yaml"
    path.write_text("cluster_name: test-cluster\ndata_dir: data\n"
                    "public_addr: apptunnel.localhost:3080\nweb_listen_addr: 127.0.0.1:0\n"
                    "tunnel_listen_addr: 127.0.0.1:3024\n")
    return str(path)


def ldap_doc(tmp_path, **spec) -> dict:
    secret = tmp_path / "bind"
    secret.write_text("svc-secret\n")
    base = {"url": "ldaps://ldap.example.com", "bind_dn": "cn=svc,dc=example,dc=com",
            "bind_password_file": str(secret), "user_search_base": "ou=people,dc=example,dc=com",
            "groups_to_roles": [{"group": "cn=devs,ou=groups,dc=example,dc=com",
                                 "roles": ["dev"]}]}
    base.update(spec)
    return {"kind": "ldap", "metadata": {"name": "corp-ldap"}, "spec": base}


def write(tmp_path, *docs) -> str:
    path = tmp_path / "connectors.yaml"
    path.write_text(yaml.safe_dump_all(list(docs)))
    return str(path)


ROLE = {"kind": "role", "metadata": {"name": "dev"}, "spec": {"allow": {}}}


@pytest_twisted.ensureDeferred
async def test_create_get_and_rm_an_ldap_connector(config_path, tmp_path):
    """create -f stores it (with its role), get connectors lists and prints it, rm removes it."""
    doc = ldap_doc(tmp_path)
    made = await cli(config_path, "create", "-f", write(tmp_path, ROLE, doc))
    assert made.code == 0 and "connector 'corp-ldap' created" in made.out, made
    text = await cli(config_path, "get", "connectors", "--format", "text")
    assert "corp-ldap" in text.out and "ldap" in text.out and "dev" in text.out, text
    for ref in (["connectors", "corp-ldap"], ["connector/corp-ldap"]):
        got = await cli(config_path, "get", *ref, "--format", "json")
        assert json.loads(got.out) == doc, (ref, got)
    assert list(yaml.safe_load_all((await cli(config_path, "get", "connectors")).out)) == [doc]
    again = await cli(config_path, "create", "-f", write(tmp_path, doc))
    assert "already exists (use --force" in one_error(again, 1)
    await stored(config_path, lambda b: b.create_user(
        User("dora", None, ("dev",), {}, 1.0, connector="corp-ldap")))
    removed = await cli(config_path, "rm", "connector/corp-ldap")
    assert removed.code == 0 and "keep their sessions" in removed.err and "dora" in removed.err
    assert await stored(config_path, lambda b: b.get_resource("connector", "corp-ldap")) is None
    assert "no connector named" in one_error(await cli(config_path, "rm", "connector", "corp-ldap"), 1)
    assert "No connectors." in (await cli(config_path, "get", "connectors", "--format", "text")).out


@pytest_twisted.ensureDeferred
async def test_the_example_connector_is_accepted(config_path, tmp_path):
    """etc/connectors/ldap.yaml passes create -f once its role exists (a warning names the
    files this account cannot read)."""
    role = {**ROLE, "metadata": {"name": "sre-apps"}}
    await cli(config_path, "create", "-f", write(tmp_path, role))
    made = await cli(config_path, "create", "-f", str(EXAMPLE))
    assert made.code == 0, made
    assert "spec.bind_password_file: /etc/apptunnel/ldap-bind is not readable" in made.err


@pytest_twisted.ensureDeferred
async def test_a_connector_naming_an_unknown_role_is_refused(config_path, tmp_path):
    """The roles a rule grants must exist (or be created by the same file), like a user's."""
    line = one_error(await cli(config_path, "create", "-f", write(tmp_path, ldap_doc(tmp_path))), 2)
    assert "connector 'corp-ldap': spec.groups_to_roles: role 'dev' does not exist" in line
    assert await stored(config_path, lambda b: b.list_resources("connector")) == []


@pytest_twisted.ensureDeferred
async def test_get_connectors_never_prints_a_secret(config_path, tmp_path):
    """A stored document holding a secret (written by hand or a later version) shows ****."""
    doc = {"kind": "oidc", "metadata": {"name": "corp"},
           "spec": {"issuer_url": "https://idp.example.com", "client_secret": "hunter2"}}
    await stored(config_path, lambda b: b.put_resource(Resource("connector", "corp", doc)))
    for fmt in ("yaml", "json", "text"):
        got = await cli(config_path, "get", "connectors", "--format", fmt)
        assert got.code == 0 and "hunter2" not in got.out, (fmt, got)
    assert "****" in (await cli(config_path, "get", "connector/corp")).out


@pytest.mark.parametrize("change,fragment", [
    ({"url": "http://ldap.example.com"}, "spec.url: expected ldaps://"),
    ({"url": "ldap://ldap.example.com"}, "spec.url: ldap:// sends passwords in clear text"),
    ({"url": "ldaps://ldap.example.com", "start_tls": True}, "spec.start_tls: not with ldaps://"),
    ({"url": "ldaps://ldap.example.com/dc=x"}, "spec.url: only scheme, host and port"),
    ({"bind_password_file": "relative/path"}, "spec.bind_password_file: expected an absolute"),
    ({"bind_password": "x"}, "spec.bind_password: unknown key"),
    ({"user_search_filter": "uid={username}"}, "spec.user_search_filter: must be in parentheses"),
    ({"user_search_filter": "(uid=x)"}, "spec.user_search_filter: expected an LDAP filter"),
    ({"user_search_filter": "(&(uid={username})"}, "spec.user_search_filter: not a valid LDAP"),
    ({"groups_to_roles": []}, "spec.groups_to_roles: expected a list"),
    ({"groups_to_roles": [{"group": "^cn=(x$", "roles": ["dev"]}]},
     "spec.groups_to_roles[0].group: invalid regex"),
    ({"groups_to_roles": [{"group": "cn=x", "roles": ["no such"]}]},
     "spec.groups_to_roles[0].roles[0]: invalid role name"),
    ({"groups_to_roles": [{"group": "cn=x", "role": ["dev"]}]},
     "spec.groups_to_roles[0].role: unknown key"),
    ({"attributes_to_traits": {"mail": "groups"}}, "spec.attributes_to_traits.mail: the trait"),
    ({"attributes_to_traits": ["mail"]}, "spec.attributes_to_traits: expected a mapping"),
    ({"timeout": "0.5s"}, "spec.timeout: must be between 1s and 60s"),
    ({"timeout": "soon"}, "spec.timeout: invalid duration"),
    ({"ca_file": "ca.pem"}, "spec.ca_file: expected an absolute path"),
])
@pytest_twisted.ensureDeferred
async def test_bad_ldap_specs_are_one_line_naming_the_key(config_path, tmp_path, change, fragment):
    """Every problem is found at create time: exit 2, file, doc number and key; nothing stored."""
    path = write(tmp_path, ROLE, ldap_doc(tmp_path, **change))
    line = one_error(await cli(config_path, "create", "-f", path), 2)
    assert f"{path}: doc 2: " in line and fragment in line, line
    assert await stored(config_path, lambda b: b.list_resources("role")) == []


@pytest_twisted.ensureDeferred
async def test_saml_connectors_are_created_and_their_roles_must_exist(config_path, tmp_path):
    """A SAML document is stored (with its role); a rule naming a missing role is refused
    naming spec.attributes_to_roles."""
    from tests.support.connector_docs import saml_doc
    line = one_error(await cli(config_path, "create", "-f", write(tmp_path, saml_doc())), 2)
    assert "connector 'okta': spec.attributes_to_roles: role 'dev' does not exist" in line
    roles = [{"kind": "role", "metadata": {"name": n}, "spec": {}} for n in ("dev", "admin")]
    made = await cli(config_path, "create", "-f", write(tmp_path, *roles, saml_doc()))
    assert made.code == 0, made
    [stored_doc] = await stored(config_path, lambda b: b.list_resources("connector"))
    assert stored_doc.doc["kind"] == "saml"
    listed = await cli(config_path, "get", "connectors", "--format", "text")
    assert "okta" in listed.out and "https://idp.example.com/metadata" in listed.out


@pytest_twisted.ensureDeferred
async def test_the_example_saml_connector_is_accepted(config_path, tmp_path):
    """etc/connectors/saml.yaml passes create -f once its role exists."""
    role = {**ROLE, "metadata": {"name": "sre-apps"}}
    await cli(config_path, "create", "-f", write(tmp_path, role))
    made = await cli(config_path, "create", "-f", str(EXAMPLE.parent / "saml.yaml"))
    assert made.code == 0, made
