"""A small SAML 2.0 identity provider of the test suite's own (pysaml2 + xmlsec1).

``python -m tests.support.saml_idp PORT WORKDIR`` serves on 127.0.0.1:PORT:

* ``GET /metadata``: its EntityDescriptor (entity id ``http://127.0.0.1:PORT/metadata``);
* ``GET /sso/redirect?SAMLRequest=..``: parses the AuthnRequest (HTTP-Redirect binding),
  answers a login form carrying a key for it;
* ``POST /login`` (key, username, password, mode): 401 for bad credentials, else the
  auto-POST page with a SAMLResponse for the request, signed (response and assertion)
  with RSA-SHA256 by the IdP's key. ``mode`` makes hostile answers: ``sha1`` signs with
  RSA-SHA1/SHA-1, ``rogue`` signs with another key under the same entity id.

WORKDIR holds ``idp.{key,crt}``, ``rogue.{key,crt}`` and ``users.json``
(``{"alice": {"password": .., "attrs": {"groups": [..]}}}``), and ``sp-metadata.xml``,
re-read on every login (the SP's metadata is fetched from the proxy after this starts).
`SamlIdp` below starts and stops the process for a test module.
"""

from __future__ import annotations

import datetime
import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

SHA256 = ("http://www.w3.org/2001/04/xmldsig-more#rsa-sha256",
          "http://www.w3.org/2001/04/xmlenc#sha256")
SHA1 = ("http://www.w3.org/2000/09/xmldsig#rsa-sha1", "http://www.w3.org/2000/09/xmldsig#sha1")


def _idp(base: str, wd: Path, mode: str):
    from saml2 import BINDING_HTTP_REDIRECT
    from saml2.config import IdPConfig
    from saml2.saml import NAMEID_FORMAT_UNSPECIFIED
    from saml2.server import Server

    sign, digest = SHA1 if mode == "sha1" else SHA256
    key = "rogue" if mode == "rogue" else "idp"
    sp = wd / "sp-metadata.xml"
    conf = IdPConfig()
    conf.load({
        "entityid": f"{base}/metadata",
        "service": {"idp": {
            "endpoints": {"single_sign_on_service": [(f"{base}/sso/redirect",
                                                      BINDING_HTTP_REDIRECT)]},
            "name_id_format": [NAMEID_FORMAT_UNSPECIFIED],
            "policy": {"default": {"lifetime": {"minutes": 5}, "attribute_restrictions": None,
                                   "name_form": "urn:oasis:names:tc:SAML:2.0:attrname-format:basic"}},
            "sign_response": True, "sign_assertion": True,
            "signing_algorithm": sign, "digest_algorithm": digest}},
        "key_file": str(wd / f"{key}.key"), "cert_file": str(wd / f"{key}.crt"),
        "xmlsec_binary": "/usr/bin/xmlsec1",
        "metadata": {"local": [str(sp)]} if sp.exists() else {},
    })
    return Server(config=conf)


def serve(port: int, wd: Path) -> None:
    from saml2 import BINDING_HTTP_POST, BINDING_HTTP_REDIRECT
    from saml2.metadata import create_metadata_string
    from saml2.saml import NAMEID_FORMAT_UNSPECIFIED, NameID

    base = f"http://127.0.0.1:{port}"
    pending: dict[str, tuple] = {}
    users = json.loads((wd / "users.json").read_text())

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _send(self, status: int, body: str, ctype: str = "text/html") -> None:
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            url = urlsplit(self.path)
            q = {k: v[0] for k, v in parse_qs(url.query).items()}
            if url.path == "/metadata":
                conf = _idp(base, wd, "normal").config
                return self._send(200, create_metadata_string(None, config=conf).decode(),
                                  "application/samlmetadata+xml")
            if url.path == "/sso/redirect":
                idp = _idp(base, wd, "normal")
                req = idp.parse_authn_request(q["SAMLRequest"], BINDING_HTTP_REDIRECT)
                key = secrets.token_urlsafe(8)
                pending[key] = (req, q.get("RelayState", ""))
                return self._send(200, f'<form method="post" action="/login">'
                                       f'<input name="key" value="{key}"></form>')
            self._send(404, "not found")

        def do_POST(self):
            form = {k: v[0] for k, v in parse_qs(
                self.rfile.read(int(self.headers["Content-Length"])).decode()).items()}
            name, mode = form.get("username", ""), form.get("mode", "normal")
            user = users.get(name)
            if user is None or user["password"] != form.get("password") \
                    or form.get("key") not in pending:
                return self._send(401, "bad credentials")
            req, relay = pending[form["key"]]
            idp = _idp(base, wd, mode)
            args = idp.response_args(req.message, [BINDING_HTTP_POST])
            binding = args.pop("binding")
            resp = idp.create_authn_response(
                identity=user["attrs"], userid=name,
                name_id=NameID(format=NAMEID_FORMAT_UNSPECIFIED, text=name),
                authn={"class_ref": "urn:oasis:names:tc:SAML:2.0:ac:classes:"
                                    "PasswordProtectedTransport"}, **args)
            body = idp.apply_binding(binding, str(resp), args["destination"], relay,
                                     response=True)["data"]
            self._send(200, body)

    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


# -- the test side ------------------------------------------------------------------------


def _self_signed(wd: Path, name: str) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"test {name}")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2)).sign(key, hashes.SHA256()))
    (wd / f"{name}.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption()))
    (wd / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


class SamlIdp:
    """The IdP process on a free loopback port, with users alice (groups devs, admins;
    mail alice@example.org) and bob (group staff: maps to no role); password NAME-pw."""

    def __init__(self, wd: Path) -> None:
        self.wd = wd
        wd.mkdir(parents=True, exist_ok=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self.metadata_url = f"{self.base}/metadata"
        self.proc: subprocess.Popen | None = None

    def start(self) -> SamlIdp:
        from tests.support.system import require_program
        require_program("/usr/bin/xmlsec1", "xmlsec1")
        for name in ("idp", "rogue"):
            _self_signed(self.wd, name)
        users = {"alice": {"password": "alice-pw", "attrs": {
                     "groups": ["devs", "admins"], "mail": ["alice@example.org"]}},
                 "bob": {"password": "bob-pw", "attrs": {
                     "groups": ["staff"], "mail": ["bob@example.org"]}}}
        (self.wd / "users.json").write_text(json.dumps(users))
        root = Path(__file__).resolve().parents[2]
        self.log = open(self.wd / "idp.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.saml_idp", str(self.port), str(self.wd)],
            cwd=root, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(self.metadata_url, timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the SAML IdP did not start: "
                                   + (self.wd / "idp.log").read_text()[-2000:])
            time.sleep(0.1)

    def trust_sp(self, sp_metadata: str) -> None:
        """The SP's metadata (from the proxy): the IdP re-reads it on every login."""
        (self.wd / "sp-metadata.xml").write_text(sp_metadata)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


if __name__ == "__main__":
    serve(int(sys.argv[1]), Path(sys.argv[2]))
