"""JWT keys, JWKS and the identity tokens stamped on app requests."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
import time

import jwt as pyjwt
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from twisted.internet.task import Clock

from apptunnel.auth.jwt import JWT_CLAIMS, JwtKeyError, JwtKeys, JwtSigner

ISSUER = "test-cluster"
AUD = "https://grafana.apptunnel.localhost:3080"
TTL = 300.0


def b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def b64int(text: str) -> int:
    return int.from_bytes(b64decode(text), "big")


def wall_clock() -> Clock:
    """A Clock at the real time, because PyJWT checks exp/nbf against time.time()."""
    clock = Clock()
    clock.advance(time.time())
    return clock


@pytest.fixture(scope="module", params=["RS256", "ES256", "EdDSA"])
def keys(request, tmp_path_factory):
    return JwtKeys.load_or_create(str(tmp_path_factory.mktemp(request.param)), request.param)


def sign(keys, clock=None, **kw):
    signer = JwtSigner(keys, ISSUER, clock or wall_clock(), TTL)
    args = dict(cache_key="s1", username="alice", roles=("dev", "sre"),
                traits={"logins": ("alice",), "team": ["sre"]}, audience=AUD, claims=None)
    args.update(kw)
    return signer.token(**args)


def verify_by_hand(jwk: dict, token: str) -> dict:
    """A second implementation: check the signature with `cryptography` directly."""
    header_b64, payload_b64, sig_b64 = token.split(".")
    signed = f"{header_b64}.{payload_b64}".encode("ascii")
    sig = b64decode(sig_b64)
    header = json.loads(b64decode(header_b64))
    assert header["kid"] == jwk["kid"] and header["alg"] == jwk["alg"]
    if jwk["kty"] == "RSA":
        public = rsa.RSAPublicNumbers(b64int(jwk["e"]), b64int(jwk["n"])).public_key()
        public.verify(sig, signed, padding.PKCS1v15(), hashes.SHA256())
    elif jwk["kty"] == "EC":
        public = ec.EllipticCurvePublicNumbers(
            b64int(jwk["x"]), b64int(jwk["y"]), ec.SECP256R1()
        ).public_key()
        der = encode_dss_signature(int.from_bytes(sig[:32], "big"),
                                   int.from_bytes(sig[32:], "big"))
        public.verify(der, signed, ec.ECDSA(hashes.SHA256()))
    else:
        ed25519.Ed25519PublicKey.from_public_bytes(b64decode(jwk["x"])).verify(sig, signed)
    return json.loads(b64decode(payload_b64))


def test_token_verifies_with_pyjwt_against_jwks(keys):
    """A token verifies with PyJWT using only the published JWKS, with every claim."""
    token = sign(keys)
    jwks = json.loads(json.dumps(keys.jwks()))     # what /.well-known/jwks.json serves
    key = pyjwt.PyJWKSet.from_dict(jwks)[keys.kid]
    claims = pyjwt.decode(token, key.key, algorithms=[keys.algorithm], audience=AUD,
                          issuer=ISSUER)
    assert set(claims) == set(JWT_CLAIMS)
    assert claims["sub"] == claims["username"] == "alice"
    assert claims["roles"] == ["dev", "sre"]
    assert claims["traits"] == {"logins": ["alice"], "team": ["sre"]}
    assert claims["exp"] - claims["iat"] == TTL and claims["nbf"] == claims["iat"]
    assert len(claims["jti"]) == 32


def test_token_verifies_by_hand_with_cryptography(keys):
    """The signature checks out with a hand-written verifier over header.payload."""
    token = sign(keys)
    payload = verify_by_hand(keys.jwk(), token)
    assert payload["aud"] == AUD and payload["iss"] == ISSUER


def test_tampered_token_fails_by_hand(keys):
    """Changing one claim breaks the signature in the hand-written verifier."""
    header, payload, sig = sign(keys).split(".")
    claims = json.loads(b64decode(payload))
    claims["username"] = "mallory"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    with pytest.raises(InvalidSignature):
        verify_by_hand(keys.jwk(), f"{header}.{forged}.{sig}")


def test_jwks_members_and_kid_thumbprint(keys):
    """The JWK has kid/alg/use, and kid is a prefix of the RFC 7638 thumbprint."""
    (jwk,) = keys.jwks()["keys"]
    assert jwk["use"] == "sig" and jwk["alg"] == keys.algorithm
    required = {"RSA": ("e", "kty", "n"), "EC": ("crv", "kty", "x", "y"),
                "OKP": ("crv", "kty", "x")}[jwk["kty"]]
    canonical = json.dumps({k: jwk[k] for k in required}, sort_keys=True,
                           separators=(",", ":"))
    digest = base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest())
    assert digest.decode().rstrip("=").startswith(jwk["kid"]) and len(jwk["kid"]) >= 16
    assert "d" not in jwk and "p" not in jwk


def test_rsa_key_is_2048_bits(tmp_path):
    """The default RS256 key is 2048-bit RSA."""
    keys = JwtKeys.load_or_create(str(tmp_path), "RS256")
    assert keys.private_key.key_size == 2048


def test_key_file_private_and_reloaded(tmp_path):
    """jwt.key is 0600 and loading it again gives the same kid."""
    first = JwtKeys.load_or_create(str(tmp_path / "d"), "ES256")
    path = tmp_path / "d" / "jwt.key"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert JwtKeys.load_or_create(str(tmp_path / "d"), "ES256").kid == first.kid
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["jwt.key"]


def test_key_algorithm_mismatch_and_garbage(tmp_path):
    """A key of another type, an unknown algorithm or a garbage file is a JwtKeyError."""
    JwtKeys.load_or_create(str(tmp_path), "EdDSA")
    with pytest.raises(JwtKeyError, match="cannot sign RS256"):
        JwtKeys.load_or_create(str(tmp_path), "RS256")
    with pytest.raises(JwtKeyError, match="unsupported JWT algorithm"):
        JwtKeys.load_or_create(str(tmp_path), "HS256")
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "jwt.key").write_text("not a key")
    with pytest.raises(JwtKeyError, match="not an unencrypted PEM"):
        JwtKeys.load_or_create(str(tmp_path / "g"), "EdDSA")


@pytest.fixture(scope="module")
def ed_keys(tmp_path_factory):
    return JwtKeys.load_or_create(str(tmp_path_factory.mktemp("ed")), "EdDSA")


def test_cache_reuse_and_resign_after_two_thirds(ed_keys):
    """The same token is served until 2/3 of its life has passed, then a new one."""
    clock = Clock()
    clock.advance(1_000_000)
    signer = JwtSigner(ed_keys, ISSUER, clock, TTL)
    args = ("s1", "alice", ("dev",), {}, AUD, None)
    first = signer.token(*args)
    clock.advance(TTL * 2 / 3 - 1)
    assert signer.token(*args) == first
    clock.advance(1)
    second = signer.token(*args)
    assert second != first
    claims = pyjwt.decode(second, options={"verify_signature": False})
    assert claims["iat"] == int(clock.seconds())
    assert claims["exp"] == int(clock.seconds()) + TTL


def test_cache_is_per_session_and_audience(ed_keys):
    """Different sessions or apps get their own tokens; forget() drops a session's."""
    signer = JwtSigner(ed_keys, ISSUER, wall_clock(), TTL)
    a = signer.token("s1", "alice", (), {}, AUD, None)
    assert signer.token("s1", "alice", (), {}, AUD, None) == a
    assert signer.token("s2", "alice", (), {}, AUD, None) != a
    other = signer.token("s1", "alice", (), {}, "https://kibana.example", None)
    assert pyjwt.decode(other, options={"verify_signature": False})["aud"] == (
        "https://kibana.example"
    )
    signer.forget("s1")
    assert signer.token("s1", "alice", (), {}, AUD, None) != a


def test_claims_filter(ed_keys):
    """jwt_claims keeps only the chosen optional claims, never dropping exp/aud/iss."""
    token = sign(ed_keys, claims=("username",))
    claims = pyjwt.decode(token, ed_keys.public_key, algorithms=["EdDSA"], audience=AUD)
    assert set(claims) == {"iss", "sub", "aud", "iat", "nbf", "exp", "jti", "username"}
    bare = pyjwt.decode(sign(ed_keys, claims=()), options={"verify_signature": False})
    assert "roles" not in bare and "traits" not in bare and "exp" in bare


def test_expired_token_rejected(ed_keys):
    """A token signed ttl+ seconds ago no longer verifies."""
    clock = Clock()
    clock.advance(time.time() - TTL - 5)
    token = sign(ed_keys, clock=clock)
    with pytest.raises(pyjwt.ExpiredSignatureError):
        pyjwt.decode(token, ed_keys.public_key, algorithms=["EdDSA"], audience=AUD)
