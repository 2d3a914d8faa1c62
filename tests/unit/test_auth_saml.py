"""The SAML connector on memory and a Clock (issue 10): its document, the algorithm check
pysaml2 lacks, and the ACS's one-time request ids, audit and throttle. Real signatures,
a real IdP and the browser's redirects are in tests/integration/test_saml.py."""

from __future__ import annotations

import os
import stat

import pytest
import pytest_twisted
from twisted.internet.defer import maybeDeferred
from twisted.internet.task import Clock

from apptunnel.auth.connectors.saml import FAILED, SamlSignIn, SpKeys, weak_algorithm
from apptunnel.auth.connectors.signin import ExternalSignIn
from apptunnel.auth.connectors.specs import ConnectorError, SamlSpec, parse_connector
from apptunnel.auth.connectors.store import ConnectorStore
from apptunnel.auth.errors import AuthError
from apptunnel.auth.throttle import LoginThrottle, Throttled
from apptunnel.backend.records import Resource, SamlRequest
from tests.support.audit_fake import Audit
from tests.support.connector_docs import ACS, saml_doc
from tests.support.memory import MemoryBackend
from tests.support.waiting import wait

NOW = 1_000_000.0
IDP_XML = '<md:EntityDescriptor xmlns:md="urn:oasis:names:tc:SAML:2.0:metadata"/>'


def test_a_saml_document_parses_with_teleports_shape_and_defaults():
    """The issuer defaults to the ACS; each rule names its attribute; roles map from it."""
    spec = parse_connector(saml_doc())
    assert isinstance(spec, SamlSpec) and spec.kind == "saml"
    assert spec.service_provider_issuer == ACS and spec.display == "okta"
    assert [r.claim for r in spec.attributes_to_roles] == ["groups", "groups"]
    inline = parse_connector(saml_doc(entity_descriptor_url=None, entity_descriptor=IDP_XML,
                                      service_provider_issuer="urn:apptunnel"))
    assert inline.entity_descriptor == IDP_XML and inline.entity_descriptor_url is None
    assert inline.service_provider_issuer == "urn:apptunnel"


@pytest.mark.parametrize("change,fragment", [
    ({"acs": "http://apptunnel.example.com/v1/webapi/saml/acs/okta"}, "spec.acs: must be https"),
    ({"acs": "https://apptunnel.example.com/acs"}, "spec.acs: must be https://PUBLIC_ADDR"),
    ({"entity_descriptor": IDP_XML}, "spec.entity_descriptor_url: give exactly one"),
    ({"entity_descriptor_url": None}, "spec.entity_descriptor_url: give exactly one"),
    ({"entity_descriptor_url": None, "entity_descriptor": "<x/>"},
     "spec.entity_descriptor: expected the IdP's metadata"),
    ({"entity_descriptor_url": "http://idp.example.com/m"},
     "spec.entity_descriptor_url: must be https://"),
    ({"attributes_to_roles": []}, "spec.attributes_to_roles: expected a list"),
    ({"attributes_to_roles": [{"value": "devs", "roles": ["dev"]}]},
     "spec.attributes_to_roles[0].name: expected an attribute name"),
    ({"attributes_to_roles": [{"name": "g", "value": "^(x$", "roles": ["dev"]}]},
     "spec.attributes_to_roles[0].value: invalid regex"),
    ({"attributes_to_roles": [{"name": "g", "group": "x", "roles": ["dev"]}]},
     "spec.attributes_to_roles[0].group: unknown key"),
    ({"service_provider_issuer": ""}, "spec.service_provider_issuer: expected a non-empty"),
    ({"signing_key": "x"}, "spec.signing_key: unknown key"),
])
def test_bad_saml_specs_name_the_key(change, fragment):
    with pytest.raises(ConnectorError) as err:
        parse_connector(saml_doc(**change))
    assert fragment in err.value.message, err.value.message


def test_loopback_idps_may_use_http():
    spec = parse_connector(saml_doc(entity_descriptor_url="http://127.0.0.1:9/metadata"))
    assert spec.entity_descriptor_url == "http://127.0.0.1:9/metadata"


SIGNED = """<r xmlns:ds="http://www.w3.org/2000/09/xmldsig#"><ds:Signature><ds:SignedInfo>
<ds:SignatureMethod Algorithm="{sig}"/><ds:Reference><ds:DigestMethod Algorithm="{digest}"/>
</ds:Reference></ds:SignedInfo></ds:Signature></r>"""


@pytest.mark.parametrize("sig,digest,weak", [
    ("http://www.w3.org/2001/04/xmldsig-more#rsa-sha256", "http://www.w3.org/2001/04/xmlenc#sha256", None),
    ("http://www.w3.org/2000/09/xmldsig#rsa-sha1", "http://www.w3.org/2001/04/xmlenc#sha256",
     "http://www.w3.org/2000/09/xmldsig#rsa-sha1"),
    ("http://www.w3.org/2001/04/xmldsig-more#rsa-sha256", "http://www.w3.org/2000/09/xmldsig#sha1",
     "http://www.w3.org/2000/09/xmldsig#sha1"),
    ("", "http://www.w3.org/2001/04/xmlenc#sha256", "none"),
])
def test_sha1_signatures_and_digests_are_found_anywhere(sig, digest, weak):
    """pysaml2 accepts SHA-1: every SignatureMethod and DigestMethod is checked first."""
    assert weak_algorithm(SIGNED.format(sig=sig, digest=digest).encode()) == weak


def test_garbage_and_entity_bombs_are_not_well_formed():
    bomb = b'<!DOCTYPE x [<!ENTITY a "aaaa">]><x>&a;</x>'
    assert weak_algorithm(b"<not xml") == "not well-formed XML"
    assert weak_algorithm(bomb) == "not well-formed XML"


def test_the_sp_key_is_made_once_per_cluster_and_private(tmp_path):
    keys = SpKeys(str(tmp_path), "c", NOW)
    assert not os.path.exists(keys.key_file)        # nothing until SAML needs it
    keys.ensure()
    assert stat.S_IMODE(os.stat(keys.key_file).st_mode) == 0o600
    before = open(keys.cert_file).read()
    SpKeys(str(tmp_path), "c", NOW).ensure()
    assert open(keys.cert_file).read() == before


def make(backend, throttle, audit, clock) -> SamlSignIn:
    return SamlSignIn(connectors=ConnectorStore(backend, clock),
                      signin=ExternalSignIn(backend, audit, clock), backend=backend,
                      throttle=throttle, audit=audit, clock=clock,
                      keys=SpKeys("/nonexistent", "c", NOW),
                      fetch=lambda url: None,
                      run_in_thread=lambda f, *args: maybeDeferred(f, *args))


@pytest_twisted.ensureDeferred
async def test_the_acs_refuses_unknown_spent_and_foreign_requests_audited_and_counted():
    """Without a request this browser started (none, unknown, another connector's or spent)
    nothing is verified: 401, audited with method and connector, and every failure counts
    against the address until the throttle answers 429."""
    backend, audit, clock = MemoryBackend(), Audit(), Clock()
    clock.advance(NOW)
    await wait(backend.put_resource(Resource("connector", "okta", saml_doc())))
    await wait(backend.put_saml_request(SamlRequest("id-other", "elsewhere", "/", NOW + 60)))
    saml = make(backend, LoginThrottle(5, 4, 60.0), audit, clock)
    for request_id in (None, "id-unknown", "id-other", "id-unknown"):
        with pytest.raises(AuthError) as err:
            await wait(saml.acs("okta", "PHg+", request_id, "10.0.0.1", "10.0.0.1:5"))
        assert err.value.status == 401 and err.value.message == FAILED
    with pytest.raises(Throttled):
        await wait(saml.acs("okta", "PHg+", "id-x", "10.0.0.1", "10.0.0.1:5"))
    with pytest.raises(AuthError) as err:   # another address is not held back
        await wait(saml.acs("okta", "PHg+", "id-x", "10.0.0.2", "10.0.0.2:5"))
    assert err.value.status == 401
    logins = [e for e in audit.events if e[0] == "user.login"]
    assert len(logins) == 6 and all(e[2] == "failure" for e in logins)
    assert all(e[3]["method"] == "saml" and e[3]["connector"] == "okta" for e in logins)
    assert [e[3]["reason"] for e in logins[:3]] == [
        "no sign-in was started in this browser",
        "unknown, expired or already answered request",
        "unknown, expired or already answered request"]
    assert logins[4][3]["reason"] == "throttled"


@pytest_twisted.ensureDeferred
async def test_metadata_and_start_of_an_unknown_connector_are_404():
    backend, audit, clock = MemoryBackend(), Audit(), Clock()
    saml = make(backend, LoginThrottle(), audit, clock)
    for call in (saml.metadata("nope", ""), saml.start("nope", "/", "")):
        with pytest.raises(AuthError) as err:
            await wait(call)
        assert err.value.status == 404


@pytest_twisted.ensureDeferred
async def test_starts_are_limited_per_address_and_an_unreachable_idp_is_503():
    """Each start writes a row before anyone signed in: 30 a minute per address, then 429;
    an IdP whose metadata cannot be fetched is a 503 naming the connector."""
    backend, audit, clock = MemoryBackend(), Audit(), Clock()
    clock.advance(NOW)
    await wait(backend.put_resource(Resource("connector", "okta", saml_doc())))
    saml = make(backend, LoginThrottle(), audit, clock)
    for _ in range(30):
        with pytest.raises(AuthError) as err:
            await wait(saml.start("okta", "/", "10.0.0.1"))
        assert err.value.status == 503 and "okta" in err.value.message
    with pytest.raises(Throttled):
        await wait(saml.start("okta", "/", "10.0.0.1"))
    with pytest.raises(AuthError) as err:
        await wait(saml.start("okta", "/", "10.0.0.2"))
    assert err.value.status == 503


@pytest_twisted.ensureDeferred
async def test_the_clis_return_is_kept_with_the_request_and_handed_back_once(monkeypatch):
    """`apptunnel login --auth okta`: the CLI's port, state and challenge are stored with
    the outstanding request id (backend row, not the IdP's URL or RelayState) and come
    back from the ACS with the user, once; a browser's own sign-in carries none."""
    from apptunnel.auth.connectors import saml as saml_module
    from apptunnel.auth.connectors.cli_codes import CliReturn
    from apptunnel.auth.connectors.signin import ExternalIdentity

    backend, audit, clock = MemoryBackend(), Audit(), Clock()
    clock.advance(NOW)
    await wait(backend.put_resource(Resource("connector", "okta", saml_doc(
        entity_descriptor_url=None, entity_descriptor=IDP_XML))))
    ids = iter(["id-cli", "id-web"])
    monkeypatch.setattr(saml_module, "sp_config", lambda spec, keys, xml: object())
    monkeypatch.setattr(saml_module, "authn_request",
                        lambda conf: (rid := next(ids), f"https://idp.example.com/sso?r={rid}"))
    monkeypatch.setattr(saml_module, "verify_response", lambda conf, connector, response, rid:
                        ExternalIdentity(connector, "saml", "alice", {"groups": ("devs",)}))
    saml = make(backend, LoginThrottle(), audit, clock)
    cli = CliReturn(40000, "s" * 24, "c" * 43)
    request_id, location = await wait(saml.start("okta", "/", "10.0.0.1", cli))
    assert request_id == "id-cli" and cli.state not in location and cli.challenge not in location
    user, target, back = await wait(saml.acs("okta", "PHg+", "id-cli", "10.0.0.1", "c:1"))
    assert (user.name, target, back) == ("alice", "/", cli)
    with pytest.raises(AuthError) as err:      # the request, and with it the return, is spent
        await wait(saml.acs("okta", "PHg+", "id-cli", "10.0.0.1", "c:1"))
    assert err.value.status == 401
    await wait(saml.start("okta", "/app", "10.0.0.1"))
    assert (await wait(saml.acs("okta", "PHg+", "id-web", "10.0.0.1", "c:1")))[1:] == ("/app",
                                                                                       None)


def test_a_kept_cli_return_reads_back_and_garbage_is_none():
    from apptunnel.auth.connectors.cli_codes import CliReturn
    cli = CliReturn(40000, "state-" * 4, "challenge")
    assert CliReturn.from_text(cli.text()) == cli
    assert CliReturn.from_text("") is None and CliReturn.from_text("x y z") is None
    assert CliReturn.from_text("1 2") is None
