"""The bot's two calls to the proxy: join (token) and renew (certificate). Blocking:
the service runs them in a thread.

The join trusts nothing until the proxy is proven: the chain the proxy presents is read
on a connection that sends nothing and checked against the CA pin from ``bots add``;
only then does the token go out, on a new connection that trusts that CA alone, and the
CA in the answer must have the pin too. A renewal presents the current certificate on a
connection that trusts the stored CA alone. The HTTPS client and its trust rules are the
CLI's (apptunnel/cli/http.py: ``*.localhost`` on loopback, one SSLContext, bounded
answers), so the bot and ``apptunnel login`` reach a proxy the same way.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding

from apptunnel.auth.trust_set import TrustSetError, pinned_with_trusted
from apptunnel.auth.pins import cert_pin, check_chain
from apptunnel.cli.http import ProxyClient, fetch_chain, tls_context
from apptunnel.errors import ApptunnelError


class BotCallFailed(ApptunnelError):
    """A join or renewal did not give a certificate. ``final``: retrying cannot help
    (the proxy refused: a bad or used token, an expired, locked or removed bot)."""

    def __init__(self, message: str, final: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.final = final


def join(proxy: str, pin: str, token: str, public_key: str, ttl: float,
         now: float) -> tuple[bytes, bytes]:
    """(cert_pem, ca_pem) for one use of ``token``."""
    try:
        chain = fetch_chain(proxy)
    except ApptunnelError as err:
        raise BotCallFailed(str(err)) from None
    problem = check_chain(chain, pin, now)
    if problem is not None:
        raise BotCallFailed(f"the proxy at {proxy} is not the cluster of join.ca_pin: "
                            f"{problem} (the token was not sent)", final=True)
    ca_pem = next(c for c in chain if cert_pin(c) == pin).public_bytes(Encoding.PEM)
    answer = _call(ProxyClient(proxy, tls_context(ca_pem)), "/v1/bots/join",
                   {"token": token, "public_key": public_key, "ttl": ttl})
    return _certificate(answer, {pin})


def renew(proxy: str, ca_pem: bytes, cert_pem: bytes, key_pem: bytes, public_key: str,
          ttl: float) -> tuple[bytes, bytes]:
    """(cert_pem, ca_pem) for the holder of ``cert_pem`` (never a token)."""
    client = ProxyClient(proxy, tls_context(ca_pem, client=(cert_pem, key_pem)))
    answer = _call(client, "/v1/bots/renew", {"public_key": public_key, "ttl": ttl})
    return _certificate(answer, {cert_pin(c) for c in x509.load_pem_x509_certificates(ca_pem)})


def _call(client: ProxyClient, path: str, body: dict) -> dict:
    try:
        status, answer = client.call("POST", path, body)
    except ApptunnelError as err:
        raise BotCallFailed(str(err)) from None
    finally:
        client.close()
    if status != 200 or not isinstance(answer, dict):
        why = answer.get("error") if isinstance(answer, dict) else None
        raise BotCallFailed(f"the proxy refused: {why or f'HTTP {status}'}",
                            final=status in (400, 401, 403, 404))
    return answer


def _certificate(answer: dict, pins: set[str]) -> tuple[bytes, bytes]:
    """(cert_pem, the ca.crt to keep) from a join or renewal answer whose ``ca`` is one we
    trust (``pins``); ca.crt holds the other host CAs named in ``trusted_cas`` too, so
    the bot follows a host-CA rotation."""
    cert, ca = answer.get("cert"), answer.get("ca")
    # ``issuer``: the user CA that signed the certificate, once a user-CA rotation split it
    # from ``ca`` (the pinned CA the proxy is verified against); older proxies omit it.
    issuer = answer.get("issuer") or ca
    if not isinstance(cert, str) or not isinstance(ca, str) or not isinstance(issuer, str):
        raise BotCallFailed("the proxy's answer has no certificate")
    try:
        ca_cert = x509.load_pem_x509_certificate(ca.encode("ascii"))
        leaf = x509.load_pem_x509_certificate(cert.encode("ascii"))
        leaf.verify_directly_issued_by(x509.load_pem_x509_certificate(issuer.encode("ascii")))
    except (ValueError, TypeError, UnicodeEncodeError, InvalidSignature) as err:
        raise BotCallFailed(f"the proxy's certificate is unusable: {err}") from None
    pin = cert_pin(ca_cert)
    if pin not in pins:
        raise BotCallFailed("the proxy answered with a CA that does not have the pin")
    try:
        kept = pinned_with_trusted(ca.encode("ascii"), answer.get("trusted_cas"), pin)
    except TrustSetError as err:
        raise BotCallFailed(f"the proxy answered with {err}") from None
    return cert.encode("ascii"), kept
