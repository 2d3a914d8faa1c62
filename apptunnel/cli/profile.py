"""The user's login profile: where they signed in, their key and short-lived certificate.

One profile lives in ``~/.apptunnel/`` (``$APPTUNNEL_HOME`` relocates it): the directory
is 0700, ``user.key`` 0600. ``profile.json`` says which proxy and how to trust it;
``ca.crt`` is present when the proxy's CA was pinned at login. Who the user is (name,
roles, traits, expiry) is read from the certificate itself, so it can never disagree with
what the proxy will see.
"""

from __future__ import annotations

import json
import os
from typing import Mapping

import attrs
from cryptography import x509
from cryptography.x509.oid import NameOID

from apptunnel.auth.ca import user_identity
from apptunnel.files import write_file
from apptunnel.auth.errors import AuthError
from apptunnel.cli.context import CliError
from apptunnel.cli.http import ProxyClient, tls_context
from apptunnel.local_proxy import TRUST_INSECURE, TRUST_PINNED, TRUST_SYSTEM  # noqa: F401

__all__ = ["NOT_LOGGED_IN", "Profile", "home_dir", "require_profile"]

NOT_LOGGED_IN = "not logged in: run apptunnel login"

# Trust modes for the proxy's web certificate: TRUST_PINNED, TRUST_SYSTEM, TRUST_INSECURE
# (defined once, in apptunnel/local_proxy.py, which the bot shares).

_FILES = ("profile.json", "user.crt", "user.key", "ca.crt")


def home_dir(environ: Mapping[str, str]) -> str:
    """Where profiles live: ``$APPTUNNEL_HOME``, else ``~/.apptunnel``."""
    explicit = environ.get("APPTUNNEL_HOME")
    if explicit:
        return explicit
    home = environ.get("HOME") or os.path.expanduser("~")
    return os.path.join(home, ".apptunnel")


@attrs.frozen
class Profile:
    """A saved login. ``ca_pem`` is None unless ``trust`` is pinned."""

    proxy: str            # host:port as given to login
    trust: str
    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes | None

    @property
    def cert(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)

    @property
    def user(self) -> str:
        names = self.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(names[0].value) if names else ""

    @property
    def expires(self) -> float:
        return self.cert.not_valid_after_utc.timestamp()

    def identity(self) -> tuple[tuple[str, ...], dict[str, tuple[str, ...]]]:
        """(roles, traits) as the certificate carries them."""
        try:
            return user_identity(self.cert)
        except AuthError:
            return (), {}

    def expired(self, now: float) -> bool:
        return now >= self.expires

    def require_valid(self, now: float) -> None:
        """CliError telling the user to log in again once the certificate has expired."""
        if self.expired(now):
            raise CliError(f"your certificate for {self.proxy} expired: run apptunnel login")

    def client(self) -> ProxyClient:
        """A client for this profile's proxy: its trust mode, our certificate presented."""
        context = tls_context(self.ca_pem, insecure=self.trust == TRUST_INSECURE,
                              client=(self.cert_pem, self.key_pem))
        return ProxyClient(self.proxy, context, insecure=self.trust == TRUST_INSECURE)

    # -- files -----------------------------------------------------------------------

    @classmethod
    def load(cls, home: str) -> Profile | None:
        """The saved profile, None when nobody is logged in; CliError if it is damaged."""
        meta_path = os.path.join(home, "profile.json")
        if not os.path.exists(meta_path):
            return None
        try:
            with open(meta_path, "rb") as f:
                meta = json.loads(f.read(64 * 1024))
            proxy, trust = meta["proxy"], meta["trust"]
            if not isinstance(proxy, str) or trust not in (TRUST_PINNED, TRUST_SYSTEM,
                                                           TRUST_INSECURE):
                raise ValueError("unknown proxy or trust mode")
            cert_pem = _read(home, "user.crt")
            key_pem = _read(home, "user.key")
            ca_pem = _read(home, "ca.crt") if trust == TRUST_PINNED else None
            profile = cls(proxy=proxy, trust=trust, cert_pem=cert_pem, key_pem=key_pem,
                          ca_pem=ca_pem)
            profile.cert  # noqa: B018 - parse now, so damage is reported here
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CliError(f"{home}: the saved login is unreadable ({err}); "
                           "run apptunnel logout, then apptunnel login") from None
        return profile

    def save(self, home: str) -> None:
        """Write the profile; the key is 0600 from its first byte, the directory 0700."""
        os.makedirs(home, mode=0o700, exist_ok=True)
        os.chmod(home, 0o700)
        write_file(os.path.join(home, "user.key"), self.key_pem, 0o600)
        write_file(os.path.join(home, "user.crt"), self.cert_pem, 0o644)
        if self.ca_pem is not None:
            write_file(os.path.join(home, "ca.crt"), self.ca_pem, 0o644)
        elif os.path.exists(os.path.join(home, "ca.crt")):
            os.unlink(os.path.join(home, "ca.crt"))
        meta = json.dumps({"proxy": self.proxy, "trust": self.trust}, indent=2) + "\n"
        # Written last: its presence means a complete profile.
        write_file(os.path.join(home, "profile.json"), meta.encode("utf-8"), 0o644)

    @staticmethod
    def remove(home: str) -> bool:
        """Delete the profile's files; False when there was nothing to delete."""
        removed = False
        for name in _FILES:
            path = os.path.join(home, name)
            if os.path.exists(path):
                os.unlink(path)
                removed = True
        return removed


def require_profile(environ: Mapping[str, str], now: float) -> Profile:
    """The saved profile with a certificate valid at `now`; CliError telling what to do if not."""
    profile = Profile.load(home_dir(environ))
    if profile is None:
        raise CliError(NOT_LOGGED_IN)
    profile.require_valid(now)
    return profile


def _read(home: str, name: str) -> bytes:
    with open(os.path.join(home, name), "rb") as f:
        return f.read(64 * 1024)
