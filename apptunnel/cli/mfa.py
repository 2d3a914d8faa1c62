"""`apptunnel mfa add|ls|rm`: the logged-in user's second factors, over the proxy's JSON
API with their certificate (like `apps ls`).

`mfa add --type totp` shows the new secret once, as a terminal QR code and the
otpauth:// URI, then reads a confirming code from the terminal or stdin; the proxy stores
the device only when that code matches. The first device also brings ten recovery codes,
printed once.
"""

from __future__ import annotations

import argparse
import io as _io
import time
from typing import Any, Callable

import segno

from apptunnel.cli.context import CliError, Io
from apptunnel.cli.output import clean, iso, json_text, table
from apptunnel.cli.profile import require_profile

__all__ = ["add_parsers"]


def add_parsers(verbs: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    mfa = verbs.add_parser("mfa", parents=[common], help="your second factors")
    sub = mfa.add_subparsers(dest="action", metavar="ACTION", required=True)
    add = sub.add_parser("add", parents=[common], help="enroll a device")
    add.add_argument("--type", choices=("totp",), default="totp")
    add.add_argument("--name", required=True, metavar="NAME")
    add.set_defaults(user_handler=add_device)
    ls = sub.add_parser("ls", parents=[common], help="list your devices")
    ls.add_argument("--format", choices=("text", "json"), default="text")
    ls.set_defaults(user_handler=list_devices)
    rm = sub.add_parser("rm", parents=[common], help="remove a device")
    rm.add_argument("name", metavar="NAME")
    rm.set_defaults(user_handler=remove_device)


def _call(io: Io, now: float, method: str, path: str, body: dict | None = None
          ) -> tuple[int, Any]:
    profile = require_profile(io.environ, now)
    client = profile.client()
    try:
        code, answer = client.call(method, path, body)
    finally:
        client.close()
    if code in (401, 403) or code >= 500:
        raise CliError(f"the proxy at {profile.proxy} refused: {_error(answer)}")
    return code, answer


def _error(answer: Any) -> str:
    if isinstance(answer, dict) and isinstance(answer.get("error"), str):
        return answer["error"][:300]
    return "unexpected answer"


def add_device(args: argparse.Namespace, io: Io, now: Callable[[], float] = time.time) -> int:
    code, answer = _call(io, now(), "POST", "/v1/mfa/totp", {})
    if code != 200 or not isinstance(answer, dict) or not isinstance(answer.get("uri"), str):
        raise CliError(f"could not start the enrollment: {_error(answer)}")
    uri, secret = answer["uri"], str(answer.get("secret", ""))
    qr = _io.StringIO()
    segno.make(uri, error="m").terminal(out=qr, compact=True)
    io.out(f"Scan this with your authenticator app (shown only now):\n{qr.getvalue()}\n"
           f"or add this URI: {clean(uri)}\nkey: {clean(secret)}\n")
    otp = _read_code(io)
    code, answer = _call(io, now(), "POST", "/v1/mfa/devices",
                         {"type": args.type, "name": args.name, "secret": secret, "otp": otp})
    if code != 200 or not isinstance(answer, dict):
        raise CliError(f"device not added: {_error(answer)}")
    io.out(f"Added {args.type} device {clean(args.name)}.\n")
    codes = answer.get("recovery_codes") or []
    if codes:
        io.out("Recovery codes (each works once in place of a device; shown only now):\n")
        io.out("".join(f"  {clean(str(c))}\n" for c in codes))
    return 0


def _read_code(io: Io) -> str:
    """The confirming code: from the terminal when there is one, else a line on stdin."""
    if io.stdin.isatty():
        io.stderr.write("Code shown by the app: ")
        io.stderr.flush()
    line = io.stdin.readline(64)
    code = line.strip()
    if not code:
        raise CliError("no code entered")
    return code


def list_devices(args: argparse.Namespace, io: Io, now: Callable[[], float] = time.time) -> int:
    code, answer = _call(io, now(), "GET", "/v1/mfa/devices")
    if code != 200 or not isinstance(answer, dict) or not isinstance(answer.get("devices"), list):
        raise CliError(f"could not list devices: {_error(answer)}")
    devices = [d for d in answer["devices"] if isinstance(d, dict)]
    if args.format == "json":
        io.out(json_text(answer))
        return 0
    if not devices:
        io.out("No devices.\n")
        return 0
    io.out(table(("NAME", "TYPE", "ADDED"),
                 [(str(d.get("name")), str(d.get("type")), iso(float(d.get("created", 0))))
                  for d in devices]))
    io.out(f"Recovery codes left: {int(answer.get('recovery_codes_left', 0))}\n")
    return 0


def remove_device(args: argparse.Namespace, io: Io, now: Callable[[], float] = time.time) -> int:
    code, answer = _call(io, now(), "DELETE", f"/v1/mfa/devices/{args.name}")
    if code != 204:
        raise CliError(f"device not removed: {_error(answer)}")
    io.out(f"Removed device {clean(args.name)}.\n")
    return 0
