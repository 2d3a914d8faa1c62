"""`apptunnel request ...` and `apptunnel login --request-id`: access requests for users.

Every verb talks to the proxy of the saved login with its certificate (the JSON API of
web/access_requests.py). `request create` waits for the decision by polling, bounded by
``--timeout``, and once approved gets the elevated certificate exactly as
`login --request-id` does: a fresh key, a certificate with the extra roles that ends when
the elevation (or the current login) does, saved as the profile.
"""

from __future__ import annotations

import argparse
import re
import time
from typing import Callable

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from apptunnel.auth.pins import cert_pin
from apptunnel.cli.context import CliError, Io, UsageError, duration_arg
from apptunnel.cli.login import check_certificate_answer
from apptunnel.cli.output import clean, human_duration, iso, json_text, table
from apptunnel.cli.profile import Profile, home_dir, require_profile

POLL_INTERVAL = 2.0
DEFAULT_WAIT = 600.0
_ID_RE = re.compile(r"[0-9a-f]{32}")


def add_parsers(verbs: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    request = verbs.add_parser("request", parents=[common],
                               help="ask for more roles for a while, and review requests")
    sub = request.add_subparsers(dest="request_verb", metavar="VERB", required=True)

    create = sub.add_parser("create", parents=[common], help="request roles (or one app)")
    what = create.add_mutually_exclusive_group(required=True)
    what.add_argument("--roles", metavar="A,B", help="the roles to request")
    what.add_argument("--app", metavar="NAME",
                      help="request the roles that open this app (they open it alone)")
    create.add_argument("--reason", default="", help="why (some roles require one)")
    create.add_argument("--ttl", metavar="DURATION",
                        help="how long the elevation lasts once approved, e.g. 2h "
                             "(capped by the roles' max_duration)")
    create.add_argument("--nowait", action="store_true",
                        help="print the request and return without waiting for review")
    create.add_argument("--timeout", metavar="DURATION",
                        help=f"how long to wait for the decision (default "
                             f"{human_duration(DEFAULT_WAIT)})")
    create.add_argument("--format", choices=("text", "json"), default="text")
    create.set_defaults(user_handler=create_request)

    ls = sub.add_parser("ls", parents=[common], help="your requests and those you may review")
    ls.add_argument("--format", choices=("text", "json"), default="text")
    ls.set_defaults(user_handler=list_requests)

    show = sub.add_parser("show", parents=[common], help="one request with its reviews")
    show.add_argument("id")
    show.add_argument("--format", choices=("text", "json"), default="text")
    show.set_defaults(user_handler=show_request)

    review = sub.add_parser("review", parents=[common], help="approve or deny a request")
    review.add_argument("id")
    verdict = review.add_mutually_exclusive_group(required=True)
    verdict.add_argument("--approve", action="store_true")
    verdict.add_argument("--deny", action="store_true")
    review.add_argument("--reason", default="")
    review.add_argument("--format", choices=("text", "json"), default="text")
    review.set_defaults(user_handler=review_request)


# -- verbs --------------------------------------------------------------------------------


def create_request(args: argparse.Namespace, io: Io, now: Callable[[], float] = time.time,
                   sleep: Callable[[float], None] = time.sleep) -> int:
    profile = require_profile(io.environ, now())
    body: dict = {"reason": args.reason}
    if args.roles is not None:
        roles = [r.strip() for r in args.roles.split(",") if r.strip()]
        if not roles:
            raise UsageError("--roles: name at least one role")
        body["roles"] = roles
    else:
        body["app"] = args.app
    ttl = duration_arg("--ttl", args.ttl)
    if ttl is not None:
        body["ttl"] = ttl
    timeout = duration_arg("--timeout", args.timeout) or DEFAULT_WAIT
    request = _call(profile, "POST", "/v1/access-requests", body)
    if args.nowait:
        _print(io, args.format, request)
        return 0
    if args.format == "text":
        io.out(f"request {request['id']} for {', '.join(request['roles'])}: "
               f"waiting for {request['approvals_needed']} approval(s)...\n")
    deadline = now() + timeout
    while request["state"] == "pending":
        if now() >= deadline:
            raise CliError(f"request {request['id']} is still pending after "
                           f"{human_duration(timeout)}; `apptunnel request show "
                           f"{request['id']}`, then `apptunnel login --request-id "
                           f"{request['id']}` once it is approved")
        sleep(min(POLL_INTERVAL, max(0.0, deadline - now())))
        request = _call(profile, "GET", f"/v1/access-requests/{request['id']}")
    if request["state"] != "approved":
        why = next((r["reason"] for r in reversed(request["reviews"]) if r["reason"]), "")
        raise CliError(f"request {request['id']} was {request['state']}"
                       + (f": {clean(why)}" if why else ""))
    answer = _elevate(profile, request["id"], io)
    if args.format == "json":
        io.out(json_text({**request, "certificate_expires": iso(answer["expires"])}))
    else:
        io.out(f"approved: logged in as {answer['user']} (roles: "
               f"{', '.join(answer['roles'])}) until {iso(answer['expires'])}\n")
    return 0


def list_requests(args: argparse.Namespace, io: Io, now: Callable[[], float] = time.time) -> int:
    answer = _call(require_profile(io.environ, now()), "GET", "/v1/access-requests")
    requests = answer.get("requests") if isinstance(answer, dict) else None
    if not isinstance(requests, list):
        raise CliError("the proxy sent an unexpected answer")
    if args.format == "json":
        io.out(json_text(requests))
        return 0
    rows = [(r["id"], r["user"], ",".join(r["roles"]), ",".join(r["apps"]) or "-", r["state"],
             iso(r["created"]), r["reason"] or "-") for r in requests]
    io.out(table(("ID", "USER", "ROLES", "APPS", "STATE", "CREATED", "REASON"), rows))
    return 0


def show_request(args: argparse.Namespace, io: Io, now: Callable[[], float] = time.time) -> int:
    profile = require_profile(io.environ, now())
    _print(io, args.format, _call(profile, "GET", f"/v1/access-requests/{_id(args.id)}"))
    return 0


def review_request(args: argparse.Namespace, io: Io, now: Callable[[], float] = time.time) -> int:
    profile = require_profile(io.environ, now())
    request = _call(profile, "POST", f"/v1/access-requests/{_id(args.id)}/review",
                    {"approve": bool(args.approve), "reason": args.reason})
    _print(io, args.format, request)
    return 0


def login_with_request(args: argparse.Namespace, io: Io,
                       now: Callable[[], float] = time.time) -> int:
    """`apptunnel login --request-id ID`: the current login's certificate gets one with
    the request's roles (no password while it is valid)."""
    profile = require_profile(io.environ, now())
    if args.proxy and args.proxy != profile.proxy:
        raise UsageError(f"--request-id uses the saved login of {profile.proxy}; "
                         f"log in to {args.proxy} first")
    answer = _elevate(profile, _id(args.request_id), io)
    io.out(f"logged in to {profile.proxy} as {answer['user']} (roles: "
           f"{', '.join(answer['roles'])}), valid until {iso(answer['expires'])}\n")
    return 0


# -- helpers ------------------------------------------------------------------------------


def _elevate(profile: Profile, request_id: str, io: Io) -> dict:
    """A fresh key and an elevated certificate for it, saved as the profile."""
    key = ec.generate_private_key(ec.SECP256R1())
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    answer = _call(profile, "POST", f"/v1/access-requests/{request_id}/certs",
                   {"public_key": public_pem.decode("ascii")})
    pin = (None if profile.ca_pem is None   # every CA of the profile: a host-CA rotation
           else frozenset(cert_pin(c) for c in x509.load_pem_x509_certificates(profile.ca_pem)))
    cert_pem = check_certificate_answer(profile.proxy, answer, key, pin)
    Profile(proxy=profile.proxy, trust=profile.trust, cert_pem=cert_pem,
            key_pem=key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()),
            ca_pem=profile.ca_pem).save(home_dir(io.environ))
    return answer


def _call(profile: Profile, method: str, path: str, body: dict | None = None) -> dict:
    client = profile.client()
    try:
        code, answer = client.call(method, path, body)
    finally:
        client.close()
    if code == 200 and isinstance(answer, dict):
        return answer
    if isinstance(answer, dict) and isinstance(answer.get("error"), str):
        raise CliError(clean(answer["error"][:300]))
    raise CliError(f"the proxy at {profile.proxy} answered HTTP {code}")


def _print(io: Io, fmt: str, request: dict) -> None:
    if fmt == "json":
        io.out(json_text(request))
        return
    reviews = "; ".join(f"{r['author']} {'approved' if r['approve'] else 'denied'}"
                        + (f" ({r['reason']})" if r["reason"] else "")
                        for r in request["reviews"]) or "-"
    lines = [("ID", request["id"]), ("User", request["user"]),
             ("Roles", ", ".join(request["roles"])),
             ("Apps", ", ".join(request["apps"]) or "-"), ("State", request["state"]),
             ("Reason", request["reason"] or "-"),
             ("Needs", f"{request['approvals_needed']} approval(s), "
                       f"{request['denials_needed']} denial(s) refuse"),
             ("Elevation", human_duration(request["ttl"])),
             ("Until" if request["state"] == "approved" else "Expires", iso(request["expires"])),
             ("Reviews", reviews)]
    io.out("".join(f"{label + ':':<11}{clean(value)}\n" for label, value in lines))


def _id(text: str) -> str:
    if not _ID_RE.fullmatch(text or ""):
        raise UsageError(f"not an access request id: {clean(text)[:80]!r}")
    return text

