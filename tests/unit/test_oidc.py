"""The OIDC connector's decisions on plain values and a Clock (issue 10): the document,
the id_token checks, flows and CLI codes used once, the user name, and the CLI's one-shot
listener (tests/integration/test_oidc.py runs the real provider)."""

from __future__ import annotations

import threading

import jwt
import pytest
import pytest_twisted
import requests
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from twisted.internet.task import Clock

from apptunnel.auth.connectors.oidc import (
    FLOW_TTL,
    CliCodes,
    Flow,
    Flows,
    OidcError,
    OidcSignIn,
    authorization_url,
    check_id_token,
    digest,
    token_header,
    user_claims,
    username_of,
)
from apptunnel.auth.connectors.specs import ConnectorError, parse_connector, public_doc
from apptunnel.auth.errors import AuthError
from apptunnel.auth.throttle import LoginThrottle, Throttled
from apptunnel.backend.memory import MemoryBackend
from apptunnel.cli.context import CliError
from apptunnel.cli.sso import OneShotListener, challenge_of
from tests.support.audit_fake import Audit

NOW = 1_000_000.0
ISSUER = "https://idp.example.com"


def oidc_doc(**change) -> dict:
    spec = {"issuer_url": ISSUER, "client_id": "apptunnel", "client_secret": "s3cret",
            "redirect_url": "https://proxy.example.com/v1/webapi/oidc/callback",
            "scope": ["email", "groups"],
            "claims_to_roles": [{"claim": "groups", "value": "devs", "roles": ["dev"]}]}
    spec.update(change)
    return {"kind": "oidc", "metadata": {"name": "corp"},
            "spec": {k: v for k, v in spec.items() if v is not None}}


def test_oidc_spec_defaults():
    spec = parse_connector(oidc_doc())
    assert spec.kind == "oidc" and spec.scope == ("openid", "email", "groups")
    assert spec.username_claim is None and spec.ca_file is None
    [rule] = spec.claims_to_roles
    assert rule.claim == "groups" and rule.roles == ("dev",) and rule.value.matches("devs")
    assert parse_connector(oidc_doc(issuer_url="http://127.0.0.1:9000")).issuer_url
    assert public_doc(oidc_doc())["spec"]["client_secret"] == "****"


@pytest.mark.parametrize("change,fragment", [
    ({"issuer_url": "http://idp.example.com"}, "spec.issuer_url: http:// only for a loopback"),
    ({"issuer_url": "ftp://idp"}, "spec.issuer_url: expected https://"),
    ({"client_secret": None}, "spec.client_secret: give client_secret or client_secret_file"),
    ({"client_secret_file": "/etc/secret"}, "spec.client_secret: give client_secret or"),
    ({"client_secret": None, "client_secret_file": "secret"},
     "spec.client_secret_file: expected an absolute path"),
    ({"redirect_url": "https://proxy.example.com/callback"}, "spec.redirect_url: expected"),
    ({"redirect_url": "http://proxy.example.com/v1/webapi/oidc/callback"},
     "spec.redirect_url: expected"),
    ({"scope": "email"}, "spec.scope: expected a list"),
    ({"username_claim": ""}, "spec.username_claim: expected a claim name"),
    ({"ca_file": "ca.pem"}, "spec.ca_file: expected an absolute path"),
    ({"claims_to_roles": []}, "spec.claims_to_roles: expected a list"),
    ({"claims_to_roles": [{"value": "x", "roles": ["dev"]}]},
     "spec.claims_to_roles[0].claim: expected a claim name"),
    ({"claims_to_roles": [{"claim": "groups", "value": "^(x$", "roles": ["dev"]}]},
     "spec.claims_to_roles[0].value: invalid regex"),
    ({"claims_to_roles": [{"claim": "groups", "value": "x", "roles": []}]},
     "spec.claims_to_roles[0].roles: expected a non-empty list"),
    ({"claims_to_roles": [{"claim": "groups", "value": "x", "roles": ["dev"], "x": 1}]},
     "spec.claims_to_roles[0].x: unknown key"),
    ({"client_id": None}, "spec.client_id: required"),
    ({"userinfo": True}, "spec.userinfo: unknown key"),
])
def test_bad_oidc_specs_name_the_key(change, fragment):
    with pytest.raises(ConnectorError) as err:
        parse_connector(oidc_doc(**change))
    assert fragment in err.value.message, err.value.message


# -- the id_token --------------------------------------------------------------------------

SPEC = parse_connector(oidc_doc())
KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def token(key=KEY, alg="RS256", **change) -> str:
    claims = {"iss": ISSUER, "aud": "apptunnel", "sub": "alice", "nonce": "n1",
              "iat": NOW, "exp": NOW + 300, "email": "alice@example.org", "groups": ["devs"]}
    claims.update(change)
    return jwt.encode({k: v for k, v in claims.items() if v is not None}, key, algorithm=alg,
                      headers={"kid": "k1"})


def check(raw: str, now: float = NOW, nonce: str = "n1", key=KEY) -> dict:
    alg, _ = token_header(raw)
    return check_id_token(raw, key.public_key(), alg, SPEC, nonce, now)


def test_a_good_token_gives_its_claims_and_a_user_name():
    claims = check(token())
    values = user_claims(claims)
    assert values["groups"] == ("devs",) and "nonce" not in values and "exp" not in values
    assert username_of(SPEC, values) == "alice@example.org"


@pytest.mark.parametrize("raw,why", [
    (token(aud="other-app"), "Audience doesn't match"),
    (token(iss="https://evil.example.com"), "Invalid issuer"),
    (token(nonce="n2"), "nonce is not this sign-in's"),
    (token(nonce=None), 'missing the "nonce" claim'),
    (token(exp=NOW - 61), "has expired"),
    (token(iat=NOW + 120), "issued in the future"),
    (token(aud=["apptunnel", "other"], azp="other"), "azp is not ours"),
    (token(key=rsa.generate_private_key(public_exponent=65537, key_size=2048)),
     "Signature verification failed"),
])
def test_bad_tokens_are_refused(raw, why):
    with pytest.raises(OidcError) as err:
        check(raw)
    assert why in str(err.value), str(err.value)


def test_the_clock_decides_expiry_with_a_leeway():
    assert check(token(exp=NOW - 30))      # within the minute of skew
    with pytest.raises(OidcError):
        check(token(exp=NOW + 10), now=NOW + 71)


@pytest.mark.parametrize("alg", ["none", "HS256", "HS512"])
def test_algorithms_that_prove_nothing_are_refused_before_any_key(alg):
    if alg == "none":
        raw = jwt.encode({"sub": "x"}, None, algorithm="none", headers={"kid": "k1"})
    else:
        raw = jwt.encode({"sub": "x"}, "s" * 64, algorithm=alg,
                         headers={"kid": "k1"})
    with pytest.raises(OidcError, match="is not accepted"):
        token_header(raw)


def test_ec_tokens_work_and_a_token_without_kid_is_refused():
    key = ec.generate_private_key(ec.SECP256R1())
    assert check(token(key=key, alg="ES256"), key=key)["sub"] == "alice"
    with pytest.raises(OidcError, match="names no key"):
        token_header(jwt.encode({"sub": "x"}, KEY, algorithm="RS256"))


def test_user_name_choice():
    assert username_of(SPEC, {"sub": ("alice",)}) == "alice"        # no email: sub
    with pytest.raises(OidcError, match="not verified"):
        username_of(SPEC, {"email": ("a@x",), "email_verified": ("false",), "sub": ("a",)})
    chosen = parse_connector(oidc_doc(username_claim="preferred_username"))
    assert username_of(chosen, {"preferred_username": ("bob",)}) == "bob"
    for bad in ({}, {"preferred_username": ("a", "b")}, {"preferred_username": ("x y",)}):
        with pytest.raises(OidcError):
            username_of(chosen, bad)


# -- flows and codes ------------------------------------------------------------------------


def test_authorization_url_has_pkce_state_and_nonce():
    url = authorization_url("https://idp/auth", SPEC, "st", "no", "verifier")
    assert "code_challenge_method=S256" in url and f"code_challenge={digest('verifier')}" in url
    assert "state=st" in url and "nonce=no" in url and "scope=openid+email+groups" in url
    assert "verifier" not in url.replace("code_challenge", "")


@pytest_twisted.ensureDeferred
async def test_flows_are_taken_once_and_expire_on_any_proxy():
    """A flow started on one proxy is taken by another on the same store (the callback may
    reach either), once, before FLOW_TTL; the store keeps at most max_flows."""
    from apptunnel.auth.connectors.cli_codes import CliReturn
    from apptunnel.backend.memory import MemoryBackend
    clock, backend = Clock(), MemoryBackend()
    clock.advance(NOW)
    flows, other_proxy = Flows(backend, clock, max_flows=2), Flows(backend, clock, max_flows=2)
    flow = Flow("corp", "n", "v", digest("b"), "/", CliReturn(40000, "st", "ch"), NOW + FLOW_TTL)
    await flows.put("s1", flow)
    assert await other_proxy.take("s1") == flow and await flows.take("s1") is None
    await flows.put("s2", attrs_evolve(flow, cli=None))
    clock.advance(FLOW_TTL)
    assert await flows.take("s2") is None
    for state in ("a", "b", "c"):
        clock.advance(1)
        await flows.put(state, attrs_evolve(flow, expires=clock.seconds() + FLOW_TTL))
    assert await flows.take("a") is None and await flows.take("c") is not None   # bounded


def attrs_evolve(flow, **change):
    import attrs
    return attrs.evolve(flow, **change)


@pytest_twisted.ensureDeferred
async def test_cli_codes_need_the_verifier_and_are_spent_either_way():
    clock = Clock()
    codes = CliCodes(clock)
    code = await codes.issue("alice", digest("verifier"))
    assert await codes.redeem(code, "wrong") is None
    assert await codes.redeem(code, "verifier") is None
    code = await codes.issue("alice", digest("verifier"))
    assert await codes.redeem(code, "verifier") == "alice"
    code = await codes.issue("alice", digest("verifier"))
    clock.advance(61)
    assert await codes.redeem(code, "verifier") is None


@pytest_twisted.ensureDeferred
async def test_bad_callbacks_count_in_the_login_throttle_per_address_and_are_audited():
    """Twenty callbacks with made-up states from one address: each 400 and audited; the
    next is 429 even with a live flow, while another address is still heard."""
    clock = Clock()
    clock.advance(NOW)
    audit = Audit()
    oidc = OidcSignIn(connectors=None, signin=None, throttle=LoginThrottle(), audit=audit,
                      clock=clock, http_for=lambda ca: None, backend=MemoryBackend())
    for i in range(20):
        with pytest.raises(AuthError) as err:
            await oidc.finish(f"made-up-{i}", "code", None, "b", "10.0.0.1", "10.0.0.1:5")
        assert err.value.status == 400
    with pytest.raises(Throttled):
        await oidc.finish("another", "code", None, "b", "10.0.0.1", "10.0.0.1:5")
    with pytest.raises(AuthError) as err:
        await oidc.finish("another", "code", None, "b", "10.0.0.2", "10.0.0.2:5")
    assert err.value.status == 400
    reasons = [e[3].get("reason") for e in audit.events]
    assert reasons.count("unknown or used state") == 21 and reasons.count("throttled") == 1
    assert all(e[0] == "user.login" and e[2] == "failure" and e[3]["method"] == "oidc"
               for e in audit.events)


# -- the CLI's one-shot listener -------------------------------------------------------------


def test_one_shot_listener_binds_loopback_and_takes_one_valid_callback():
    listener = OneShotListener()
    assert listener._server.server_address[0] == "127.0.0.1"
    url = listener.start_url("proxy.example.com:3080", "corp")
    assert f"cli_port={listener.port}" in url and listener.verifier not in url
    assert f"cli_challenge={challenge_of(listener.verifier)}" in url
    answers = []

    def client():
        s = requests.Session()
        s.trust_env = False
        base = f"http://127.0.0.1:{listener.port}/callback"
        answers.append(s.get(f"{base}?code=c1&state=wrong", timeout=5).status_code)
        answers.append(s.get(f"{base}?code=c2&state={listener.state}", timeout=5).status_code)

    thread = threading.Thread(target=client)
    thread.start()
    assert listener.wait(timeout=10) == "c2"
    thread.join(5)
    assert answers == [400, 200]


def test_one_shot_listener_times_out():
    ticks = iter([0.0, 0.0, 5.0, 5.0])
    listener = OneShotListener()
    with pytest.raises(CliError, match="no sign-in came back"):
        listener.wait(timeout=0.2, now=lambda: next(ticks, 5.0))
