"""`apptunnel login`, `status` and `logout`: the user's short-lived certificate.

Login makes a fresh EC P-256 key here (it never leaves the machine), proves the user's
password to the proxy and gets back a certificate from the cluster CA naming the user,
their roles and traits, valid for at most the session lifetime their roles allow.

Trust on first contact: with ``--ca-pin`` the proxy's presented chain is checked against
the pin on a connection that sends nothing, and only then is the password sent, on a new
connection that trusts that CA alone. Without a pin the system trust store decides;
``--insecure`` skips every check and says so loudly.
"""

from __future__ import annotations

import argparse
import getpass
import re
import time
import webbrowser
from typing import Callable

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from apptunnel.auth.trust_set import TrustSetError, pinned_with_trusted
from apptunnel.auth.pins import cert_pin, check_chain, parse_pin
from apptunnel.auth.passwords import MAX_PASSWORD_LENGTH
from apptunnel.cli.context import CliError, Io, UsageError, duration_arg
from apptunnel.cli.http import ProxyClient, fetch_chain, tls_context
from apptunnel.cli.output import clean, human_duration, iso, json_text
from apptunnel.cli.sso import OneShotListener
from apptunnel.cli.profile import (
    NOT_LOGGED_IN,
    TRUST_INSECURE,
    TRUST_PINNED,
    TRUST_SYSTEM,
    Profile,
    home_dir,
)

__all__ = ["add_parsers", "login", "logout", "status"]


INSECURE_WARNING = (
    "--insecure: NOT verifying the proxy's TLS certificate (no CA pin check, no trust "
    "store check, no hostname check); anyone on the network path can impersonate the "
    "proxy and read your password"
)


NO_PIN_HINT = (
    "; a proxy with its own cluster CA needs --ca-pin sha256:... (the proxy logs it at "
    "start-up: \"serving ... CA pin sha256:...\"; `apptunnel tokens add` and `make demo` "
    "print it too)"
)

NO_TERMINAL = ("no terminal to ask for the password: give it on stdin with --password-stdin "
               "(e.g. `apptunnel login ... --password-stdin < password-file`)")


def add_parsers(verbs: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    login_p = verbs.add_parser("login", parents=[common],
                               help="sign in at a proxy and get a short-lived user certificate")
    login_p.add_argument("--proxy", metavar="HOST:PORT",
                         help="the proxy's public address, e.g. apptunnel.localhost:3080")
    login_p.add_argument("--request-id", metavar="ID",
                         help="with the current login: a certificate with the roles of this "
                              "approved access request (no password while it is valid)")
    login_p.add_argument("--user", metavar="NAME",
                         help="your user name (not for a browser connector: OIDC, SAML)")
    login_p.add_argument("--password-stdin", action="store_true",
                         help="read the password from stdin (else it is asked for)")
    login_p.add_argument("--otp", metavar="CODE",
                         help="the code of your authenticator app, when the proxy asks for "
                              "one (else it is asked for on the terminal)")
    login_p.add_argument("--auth", metavar="CONNECTOR",
                         help="sign in through this connector: LDAP asks for the password "
                              "like a local one; OIDC and SAML open the browser")
    login_p.add_argument("--no-browser", action="store_true",
                         help="with a browser connector: print the sign-in URL instead of "
                              "opening a browser")
    login_p.add_argument("--ttl", metavar="DURATION",
                         help="ask for a shorter certificate lifetime, e.g. 1h")
    login_p.add_argument("--ca-pin", metavar="sha256:HEX",
                         help="the cluster CA pin (from `apptunnel tokens add` or the web UI)")
    login_p.add_argument("--insecure", action="store_true",
                         help="do not verify the proxy's certificate at all (testing only)")
    login_p.set_defaults(user_handler=login)

    status_p = verbs.add_parser("status", parents=[common], help="show who is logged in")
    status_p.add_argument("--format", choices=("text", "json"), default="text")
    status_p.set_defaults(user_handler=status)

    logout_p = verbs.add_parser("logout", parents=[common], help="remove the saved login")
    logout_p.set_defaults(user_handler=logout)


def login(args: argparse.Namespace, io: Io, now: Callable[[], float] = time.time) -> int:
    """Check the proxy, send the password with a fresh public key, save the certificate."""
    if args.request_id:
        from apptunnel.cli.requests import login_with_request

        return login_with_request(args, io, now)
    if not args.proxy:
        raise UsageError("the following arguments are required: --proxy")
    if args.insecure and args.ca_pin:
        raise UsageError("--insecure and --ca-pin exclude each other")
    ttl = duration_arg("--ttl", args.ttl)
    pin = _pin(args.ca_pin)
    if pin is not None:
        ca_pem = _pinned_ca(args.proxy, pin, now())
        trust, context = TRUST_PINNED, tls_context(ca_pem)
    elif args.insecure:
        io.warn(INSECURE_WARNING)
        ca_pem, trust, context = None, TRUST_INSECURE, tls_context(None, insecure=True)
    else:
        ca_pem, trust, context = None, TRUST_SYSTEM, tls_context(None)
    client = ProxyClient(args.proxy, context, insecure=trust == TRUST_INSECURE,
                         tls_hint=NO_PIN_HINT if trust == TRUST_SYSTEM else "")
    key = ec.generate_private_key(ec.SECP256R1())
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    if args.auth and _browser_connector(client, args.auth):
        try:
            code, answer = _browser_login(args, io, client, public_pem, ttl)
        finally:
            client.close()
        return _finish(args, io, code, answer, key, pin, trust, ca_pem)
    if not args.user:
        client.close()
        raise UsageError("--user is required (except with --auth for a browser connector)")
    password = _password(args, io)
    body = {"username": args.user, "password": password,
            "public_key": public_pem.decode("ascii")}
    if ttl is not None:
        body["ttl"] = ttl
    if args.otp:
        body[_factor_field(args.otp)] = args.otp
    if args.auth:
        body["connector"] = args.auth
    try:
        code, answer = client.call("POST", "/v1/certs", body)
        if _second_factor_asked(code, answer) and not args.otp:
            code_text = _ask_code(args, answer)    # the proxy wants a second factor
            body[_factor_field(code_text)] = code_text
            code, answer = client.call("POST", "/v1/certs", body)
    finally:
        client.close()
    return _finish(args, io, code, answer, key, pin, trust, ca_pem)


def _finish(args: argparse.Namespace, io: Io, code: int, answer, key, pin: str | None,
            trust: str, ca_pem: bytes | None) -> int:
    """The proxy's answer to a certificate request: saved as the profile, or CliError."""
    if _second_factor_asked(code, answer):
        raise CliError(f"login to {args.proxy} failed: {_error_text(answer)}")
    if code == 401:
        why = "invalid username or password" if args.user else _error_text(answer)
        raise CliError(f"login to {args.proxy} failed: {why}")
    if code in (429, 503):   # throttled or busy: the proxy's message says how long to wait
        raise CliError(f"login to {args.proxy} failed: {_error_text(answer)}")
    if code != 200 or not isinstance(answer, dict):
        raise CliError(f"the proxy at {args.proxy} refused the login: "
                       f"{_error_text(answer)} (HTTP {code})")
    cert_pem = _check_answer(args.proxy, answer, key, pin)
    if ca_pem is not None and pin is not None:
        try:   # a host-CA rotation: the new CA too, for when the proxies switch to it
            ca_pem = pinned_with_trusted(ca_pem, answer.get("trusted_cas"), pin)
        except TrustSetError as err:
            raise CliError(f"the proxy at {args.proxy} answered with {err}") from None
    profile = Profile(
        proxy=args.proxy, trust=trust,
        cert_pem=cert_pem,
        key_pem=key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()),
        ca_pem=ca_pem,
    )
    profile.save(home_dir(io.environ))
    roles, _ = profile.identity()
    io.out(f"logged in to {args.proxy} as {profile.user} (roles: {', '.join(roles) or '-'}), "
           f"valid until {iso(profile.expires)}\n")
    return 0


def status(args: argparse.Namespace, io: Io, now: Callable[[], float] = time.time) -> int:
    """Who is logged in where; exit 1 when nobody is or the certificate has expired."""
    profile = Profile.load(home_dir(io.environ))
    if profile is None:
        raise CliError(NOT_LOGGED_IN)
    roles, traits = profile.identity()
    moment = now()
    expired = profile.expired(moment)
    if args.format == "json":
        io.out(json_text({
            "user": profile.user,
            "proxy": profile.proxy,
            "roles": list(roles),
            "traits": {k: list(v) for k, v in sorted(traits.items())},
            "expires": iso(profile.expires),
            "expired": expired,
            "trust": profile.trust,
        }))
    else:
        if expired:
            validity = "expired: run apptunnel login"
        else:
            validity = (f"{iso(profile.expires)} "
                        f"(in {human_duration(profile.expires - moment)})")
        trait_text = "; ".join(f"{k}={','.join(v)}" for k, v in sorted(traits.items()))
        lines = [
            ("Logged in as", profile.user),
            ("Proxy", profile.proxy),
            ("Roles", ", ".join(roles) or "-"),
            ("Traits", trait_text or "-"),
            ("Valid until", validity),
            ("TLS trust", _trust_text(profile)),
        ]
        io.out("".join(f"{label + ':':<14}{clean(value)}\n" for label, value in lines))
    return 1 if expired else 0


def logout(args: argparse.Namespace, io: Io) -> int:
    """Remove the saved key and certificate (nothing on the proxy outlives them)."""
    home = home_dir(io.environ)
    try:
        profile = Profile.load(home)
    except CliError:  # a damaged profile is exactly what logout must be able to remove
        profile = None
    if not Profile.remove(home):
        io.out("not logged in\n")
        return 0
    where = f" of {profile.proxy}" if profile is not None else ""
    io.out(f"logged out{where}\n")
    return 0


# -- helpers ----------------------------------------------------------------------------


def _browser_connector(client: ProxyClient, name: str) -> bool:
    """Whether the proxy lists ``name`` as a connector signed in at through the browser."""
    code, answer = client.call("GET", "/v1/connectors")
    if code != 200 or not isinstance(answer, dict):
        return False     # an older proxy: only LDAP connectors, asked for a password
    return any(isinstance(c, dict) and c.get("name") == name
               and c.get("kind") in ("oidc", "saml")
               for c in answer.get("connectors") or ())


def _browser_login(args: argparse.Namespace, io: Io, client: ProxyClient, public_pem: bytes,
                   ttl: float | None) -> tuple[int, object]:
    """Sign in in the browser, wait for the one-shot callback, exchange its code."""
    listener = OneShotListener()
    url = listener.start_url(args.proxy, args.auth)
    io.out(f"Sign in at {args.auth} in your browser:\n  {url}\n")
    io.stdout.flush()
    if not args.no_browser:
        try:
            webbrowser.open(url)
        except webbrowser.Error:
            pass
    sso_code = listener.wait()
    body = {"sso_code": sso_code, "code_verifier": listener.verifier,
            "public_key": public_pem.decode("ascii")}
    if ttl is not None:
        body["ttl"] = ttl
    return client.call("POST", "/v1/certs", body)


def _pinned_ca(proxy: str, pin: str, now: float) -> bytes:
    """The pinned CA's PEM from the proxy's presented chain, or CliError before any secret."""
    chain = fetch_chain(proxy)
    problem = check_chain(chain, pin, now)
    if problem is not None:
        raise CliError(f"refusing the proxy at {proxy}: {problem} "
                       "(check --ca-pin; the password was not sent)")
    anchor = next(cert for cert in chain if cert_pin(cert) == pin)
    return anchor.public_bytes(serialization.Encoding.PEM)


def _check_answer(proxy: str, answer: dict, key: ec.EllipticCurvePrivateKey,
                  pin: str | frozenset[str] | None) -> bytes:
    """The certificate from the proxy's answer, if it is for our key and from the right CA
    (``pin``: the one pinned, or any of a profile's CAs after a host-CA rotation)."""
    try:
        cert_text, ca_text = answer.get("cert"), answer.get("ca")
        # ``issuer``: the user CA that signed it, once a user-CA rotation split it from
        # ``ca`` (what the proxy is pinned and verified by); older proxies omit it.
        issuer_text = answer.get("issuer") or ca_text
        if not all(isinstance(t, str) for t in (cert_text, ca_text, issuer_text)):
            raise ValueError("the answer has no cert and ca")
        cert = x509.load_pem_x509_certificate(cert_text.encode("ascii"))
        ca = x509.load_pem_x509_certificate(ca_text.encode("ascii"))
        pins = {pin} if isinstance(pin, str) else pin
        if pins is not None and cert_pin(ca) not in pins:
            raise ValueError(f"the CA it returned does not match --ca-pin {pin}"
                             if isinstance(pin, str) else "the CA it returned is not one "
                             "the profile trusts")
        ours = serialization.PublicFormat.SubjectPublicKeyInfo
        if cert.public_key().public_bytes(serialization.Encoding.DER, ours) != \
                key.public_key().public_bytes(serialization.Encoding.DER, ours):
            raise ValueError("the certificate is not for our key")
        cert.verify_directly_issued_by(x509.load_pem_x509_certificate(issuer_text.encode("ascii")))
    except (ValueError, TypeError, UnicodeError, InvalidSignature) as err:
        raise CliError(f"the proxy at {proxy} answered with a bad certificate: "
                       f"{err or 'signature check failed'}") from None
    return cert.public_bytes(serialization.Encoding.PEM)


check_certificate_answer = _check_answer   # also for `login --request-id` (cli/requests.py)


def _password(args: argparse.Namespace, io: Io) -> str:
    if not args.password_stdin:
        if not _have_terminal():   # getpass would warn and read stdin, echoing it
            raise UsageError(NO_TERMINAL)
        try:
            return getpass.getpass(f"Password for {args.user} at {args.proxy}: ")
        except (EOFError, KeyboardInterrupt):
            raise CliError("no password entered") from None
    text = io.password_line(MAX_PASSWORD_LENGTH)
    if not text:
        raise UsageError("--password-stdin: no password on stdin")
    return text


def _factor_field(text: str) -> str:
    """Six digits are an authenticator code; anything else is taken for a recovery code."""
    return "otp" if re.fullmatch(r"[0-9 ]{6,8}", text.strip()) else "recovery_code"


def _second_factor_asked(code: int, answer) -> bool:
    return code == 401 and isinstance(answer, dict) and isinstance(answer.get("mfa_required"),
                                                                   list)


def _ask_code(args: argparse.Namespace, answer: dict) -> str:
    """The code for a second factor, asked on the terminal (``--otp`` for scripts)."""
    kinds = [str(k) for k in answer["mfa_required"]]
    if "otp" not in kinds and "recovery_code" not in kinds:
        raise CliError(f"login to {args.proxy} needs a second factor this CLI cannot give "
                       f"({', '.join(kinds) or 'none enrolled'})")
    if not _have_terminal():
        raise UsageError("the proxy asks for a second factor: give the code with --otp CODE")
    try:
        return getpass.getpass(f"Code from your authenticator app for {args.user}: ").strip()
    except (EOFError, KeyboardInterrupt):
        raise CliError("no code entered") from None


def _have_terminal() -> bool:
    """True when getpass can prompt on the controlling terminal (it opens /dev/tty)."""
    try:
        with open("/dev/tty", "rb"):
            return True
    except OSError:
        return False

def _pin(text: str | None) -> str | None:
    if text is None:
        return None
    try:
        return parse_pin(text)
    except ValueError as err:
        raise UsageError(f"--ca-pin: {err}") from None


def _trust_text(profile: Profile) -> str:
    if profile.trust == TRUST_PINNED and profile.ca_pem is not None:
        return f"cluster CA {cert_pin(x509.load_pem_x509_certificate(profile.ca_pem))}"
    if profile.trust == TRUST_INSECURE:
        return "NONE (--insecure: the proxy's certificate is not verified)"
    return "system trust store"


def _error_text(answer) -> str:
    if isinstance(answer, dict) and isinstance(answer.get("error"), str):
        return answer["error"][:300]
    return "unexpected answer"
