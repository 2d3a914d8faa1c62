"""A throwaway OpenLDAP directory (Debian's slapd) on loopback, for the LDAP connector.

Started from a slapd.conf (no cn=config), seeded with slapadd, serving ``ldap://`` (with
StartTLS) and ``ldaps://`` with a certificate from a CA of its own (``ca.crt``; a second,
unrelated CA is ``wrong-ca.crt``). ``memberOf`` comes from the dynlist overlay, so groups
loaded by slapadd count. ``pause()``/``resume()`` SIGSTOP/SIGCONT it (a hung directory).

Directory (base ``dc=example,dc=org``): the service account ``cn=svc-apptunnel`` (password
in ``bind-password``, with a trailing newline as editors write it); people ``alice``
(groups devs, admins), ``bob`` (group staff: maps to no role), ``carol`` and ``dave``
(devs); each has ``mail`` NAME@example.org and the password NAME + ``-pw``.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.support.system import require_program

BASE = "dc=example,dc=org"
SERVICE_DN = f"cn=svc-apptunnel,{BASE}"
SERVICE_PASSWORD = "svc-secret"
GROUPS = {"devs": ("alice", "carol", "dave"), "admins": ("alice",), "staff": ("bob",)}
PEOPLE = {name: f"{name}@example.org" for name in ("alice", "bob", "carol", "dave")}


def group_dn(name: str) -> str:
    return f"cn={name},ou=groups,{BASE}"


def password(user: str) -> str:
    return f"{user}-pw"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ssha(secret: str) -> str:
    salt = os.urandom(8)
    digest = hashlib.sha1(secret.encode() + salt).digest()
    return "{SSHA}" + base64.b64encode(digest + salt).decode()


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ca(cn: str):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                         False), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def _server_cert(ca_key, ca_cert):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name("localhost"))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


def _pem(cert) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _seed() -> str:
    entries = [
        f"dn: {BASE}\nobjectClass: dcObject\nobjectClass: organization\ndc: example\no: Example",
        f"dn: ou=people,{BASE}\nobjectClass: organizationalUnit\nou: people",
        f"dn: ou=groups,{BASE}\nobjectClass: organizationalUnit\nou: groups",
        f"dn: {SERVICE_DN}\nobjectClass: person\nobjectClass: simpleSecurityObject\n"
        f"cn: svc-apptunnel\nsn: service\nuserPassword: {_ssha(SERVICE_PASSWORD)}",
    ]
    for user, mail in PEOPLE.items():
        entries.append(f"dn: uid={user},ou=people,{BASE}\nobjectClass: inetOrgPerson\n"
                       f"uid: {user}\ncn: {user.title()}\nsn: {user.title()}\nmail: {mail}\n"
                       f"userPassword: {_ssha(password(user))}")
    for group, members in GROUPS.items():
        lines = "".join(f"member: uid={m},ou=people,{BASE}\n" for m in members)
        entries.append(f"dn: {group_dn(group)}\nobjectClass: groupOfNames\ncn: {group}\n"
                       + lines.rstrip("\n"))
    return "\n\n".join(entries) + "\n"


class Slapd:
    """One slapd process in a temp dir; ``url``, ``tls_url``, ``ca_file`` for connectors."""

    def __init__(self) -> None:
        self.slapd = require_program("/usr/sbin/slapd", "slapd")
        self.slapadd = require_program("/usr/sbin/slapadd", "slapd")
        self.dir = tempfile.mkdtemp(prefix="slapd-")
        self.port, self.tls_port = free_port(), free_port()
        self.proc: subprocess.Popen | None = None
        self._paused = False

    @property
    def url(self) -> str:
        return f"ldap://localhost:{self.port}"

    @property
    def tls_url(self) -> str:
        return f"ldaps://localhost:{self.tls_port}"

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def start(self) -> "Slapd":
        d = self.dir
        os.makedirs(self.path("db"))
        ca_key, ca_cert = _ca("Test LDAP CA")
        key, cert = _server_cert(ca_key, ca_cert)
        _, wrong = _ca("Unrelated CA")
        for name, data in (("ca.crt", _pem(ca_cert)), ("wrong-ca.crt", _pem(wrong)),
                           ("server.crt", _pem(cert)), ("server.key", _key_pem(key)),
                           ("bind-password", f"{SERVICE_PASSWORD}\n".encode()),
                           ("seed.ldif", _seed().encode())):
            with open(self.path(name), "wb") as f:
                f.write(data)
        conf = "\n".join([
            "include /etc/ldap/schema/core.schema",
            "include /etc/ldap/schema/cosine.schema",
            "include /etc/ldap/schema/inetorgperson.schema",
            "include /etc/ldap/schema/dyngroup.schema",
            "modulepath /usr/lib/ldap",
            "moduleload back_mdb",
            "moduleload dynlist",
            f"pidfile {d}/slapd.pid",
            f"argsfile {d}/slapd.args",
            f"TLSCACertificateFile {d}/ca.crt",
            f"TLSCertificateFile {d}/server.crt",
            f"TLSCertificateKeyFile {d}/server.key",
            "database mdb",
            "maxsize 10485760",
            f'suffix "{BASE}"',
            f'rootdn "cn=admin,{BASE}"',
            f"rootpw {_ssha('admin-pw')}",
            f"directory {d}/db",
            "index objectClass,uid,mail,member eq",
            "overlay dynlist",
            "dynlist-attrset groupOfURLs memberURL member+memberOf@groupOfNames",
            "access to attrs=userPassword by self write by anonymous auth by * none",
            "access to * by users read by * none",
        ]) + "\n"
        with open(self.path("slapd.conf"), "w") as f:
            f.write(conf)
        subprocess.run([self.slapadd, "-q", "-f", self.path("slapd.conf"), "-l",
                        self.path("seed.ldif")], check=True, capture_output=True, timeout=30)
        self._log = open(self.path("slapd.log"), "wb")
        self.proc = subprocess.Popen(
            [self.slapd, "-f", self.path("slapd.conf"), "-d", "0", "-h",
             f"ldap://127.0.0.1:{self.port}/ ldaps://127.0.0.1:{self.tls_port}/"],
            stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        for port in (self.port, self.tls_port):
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"slapd exited {self.proc.returncode}; see {d}/slapd.log")
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError("slapd did not listen within 10 s") from None
                    time.sleep(0.02)
        return self

    def pause(self) -> None:
        """SIGSTOP: connections are accepted by the kernel, nothing ever answers."""
        self.proc.send_signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)
        self._paused = False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            if self._paused:
                self.resume()
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if getattr(self, "_log", None) is not None:
            self._log.close()
        shutil.rmtree(self.dir, ignore_errors=True)
