"""Sign-in with a SAML 2.0 identity provider: SP-initiated, HTTP-Redirect out, HTTP-POST back.

pysaml2 (with ``xmlsec1``) does the XML and the signatures; it blocks, so every call into
it runs in a small dedicated thread pool behind a bounded, fair queue (the argon2 queue's
rules, `auth/passwords.HashQueue`), never on the reactor. `SamlSignIn` is the reactor side.

What a response must be before anyone is signed in, and why:

* an answer to a request *we* made, accepted once: `start` stores the request id in the
  backend (so a restart or another proxy sees the same set) and in a ``__Host-`` cookie of
  the browser that started it (so a response obtained by someone else cannot be pushed
  into a victim's browser: login CSRF); the ACS *takes* the id from the backend before
  verifying, so a replayed response, before or after a restart, finds nothing to answer;
* signed twice by the IdP's key from its metadata (``want_response_signed`` and
  ``want_assertions_signed``): a stripped, tampered or foreign-key signature is refused;
* with SHA-256 or stronger signature and digest algorithms: pysaml2 accepts SHA-1, so
  every ``SignatureMethod``/``DigestMethod`` in the document is checked here first;
* for our entity id (``service_provider_issuer``: audience) and now (NotBefore /
  NotOnOrAfter, pysaml2's own clock with its default slack);
* for ``apptunnel login --auth``: the CLI's return (loopback port, state, the digest of
  its verifier; `cli_codes.CliReturn`) is kept in the backend row of the request, never
  in RelayState, and handed back by `acs` so the web layer sends a one-time code to the
  CLI instead of opening a web session;
* naming a user: the NameID is the user name; every attribute is a claim (unknown
  attribute names are kept, ``allow_unknown_attributes``), then `ExternalSignIn`.

Every ACS attempt is audited (method ``saml``, the connector); each failure counts against
the client address in the sign-in throttle. pysaml2 logs through `logging` to stderr;
its logger is silenced here, and our one log line per refusal says why.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import logging
import os
import shutil
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from defusedxml import ElementTree
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.defer import TimeoutError as DeadlinePassed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from apptunnel.auth.connectors.cli_codes import CliReturn
from apptunnel.auth.connectors.signin import ExternalIdentity, ExternalSignIn, audit_login
from apptunnel.auth.connectors.specs import SamlSpec
from apptunnel.auth.errors import AuthError
from apptunnel.auth.names import USER_NAME
from apptunnel.auth.passwords import HashQueue
from apptunnel.auth.throttle import LoginThrottle, Throttled
from apptunnel.backend.records import SamlRequest

if TYPE_CHECKING:
    from apptunnel.audit import AuditLog
    from apptunnel.auth.connectors.store import ConnectorStore
    from apptunnel.backend.base import Backend
    from apptunnel.backend.records import User

# pysaml2 reports through `logging` (to stderr without a handler): keep it out of our logs.
_saml2_log = logging.getLogger("saml2")
_saml2_log.addHandler(logging.NullHandler())
_saml2_log.propagate = False

SP_KEY = "saml-sp.key"
SP_CERT = "saml-sp.crt"
XMLSEC = shutil.which("xmlsec1") or "/usr/bin/xmlsec1"   # Debian package xmlsec1
REQUEST_TTL = 600.0          # how long an IdP may take to answer (the user types there)
METADATA_TTL = 600.0         # IdP metadata fetched from entity_descriptor_url is kept this long
METADATA_TIMEOUT = 10.0
MAX_METADATA = 1024 * 1024
MAX_RESPONSE = 256 * 1024    # base64 SAMLResponse, checked before decoding
CONCURRENT_CHECKS = 4
QUEUED_CHECKS = 32
CHECK_TIMEOUT = 20.0
# Each start writes a backend row before anyone signed in: at most this many per client
# address per minute (the sign-in throttle's machinery, counting starts, not failures).
STARTS_PER_ADDRESS = 30
STARTS_WINDOW = 60.0
FAILED = "the identity provider's answer could not be accepted; sign in again"

_DSIG = "http://www.w3.org/2000/09/xmldsig#"
_STRONG = frozenset({
    "http://www.w3.org/2001/04/xmldsig-more#rsa-sha256",
    "http://www.w3.org/2001/04/xmldsig-more#rsa-sha384",
    "http://www.w3.org/2001/04/xmldsig-more#rsa-sha512",
    "http://www.w3.org/2001/04/xmldsig-more#ecdsa-sha256",
    "http://www.w3.org/2001/04/xmldsig-more#ecdsa-sha384",
    "http://www.w3.org/2001/04/xmldsig-more#ecdsa-sha512",
    "http://www.w3.org/2001/04/xmlenc#sha256",
    "http://www.w3.org/2001/04/xmldsig-more#sha384",
    "http://www.w3.org/2001/04/xmlenc#sha512",
})


class SamlRefused(Exception):
    """A response that signs nobody in; the message is for the log and the audit."""


def new_sp_pem(cluster_name: str, now: float) -> tuple[bytes, bytes]:
    """A new SP key and self-signed certificate (key_pem, cert_pem) for the key store."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{cluster_name} SAML SP"[:64])])
    start = datetime.datetime.fromtimestamp(now - 3600, datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(start + datetime.timedelta(days=3650))
            .sign(key, hashes.SHA256()))
    return (key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()),
            cert.public_bytes(serialization.Encoding.PEM))


class SpKeys:
    """The cluster's SAML service-provider key and certificate, as files pysaml2 can read.

    One pair per cluster; without ``material`` it is made the first time a SAML connector
    needs it (in the SAML pool: generating a key blocks). A proxy passes the pair stored
    in the backend (auth/keystore.py), written here (key 0600) when the files differ, so
    every proxy publishes the same certificate in every SAML connector's metadata.
    """

    def __init__(self, data_dir: str, cluster_name: str, now: float,
                 material: tuple[bytes, bytes] | None = None) -> None:
        self.key_file = os.path.join(data_dir, SP_KEY)
        self.cert_file = os.path.join(data_dir, SP_CERT)
        self._cluster_name = cluster_name
        self._now = now
        self._material = material
        self._lock = threading.Lock()

    def ensure(self) -> SpKeys:
        """Blocking: write the pair if it is missing or not the stored one (once); self."""
        with self._lock:
            if self._material is not None:
                if not self._files_hold(self._material):
                    self._write(*self._material)
            elif not (os.path.exists(self.key_file) and os.path.exists(self.cert_file)):
                self._write(*new_sp_pem(self._cluster_name, self._now))
        return self

    def _files_hold(self, material: tuple[bytes, bytes]) -> bool:
        try:
            with open(self.key_file, "rb") as k, open(self.cert_file, "rb") as c:
                return (k.read(), c.read()) == material
        except OSError:
            return False

    def _write(self, key_pem: bytes, cert_pem: bytes) -> None:
        fd = os.open(self.key_file + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key_pem)
        with open(self.cert_file + ".tmp", "wb") as f:
            f.write(cert_pem)
        os.replace(self.cert_file + ".tmp", self.cert_file)
        os.replace(self.key_file + ".tmp", self.key_file)


# -- the blocking part (runs in a thread) -------------------------------------------------


def sp_config(spec: SamlSpec, keys: SpKeys, idp_metadata: str | None):
    """pysaml2's configuration for this connector (metadata None: for our own metadata)."""
    from saml2 import BINDING_HTTP_POST
    from saml2.config import SPConfig

    keys.ensure()
    conf = SPConfig()
    conf.load({
        "entityid": spec.service_provider_issuer,
        "service": {"sp": {
            "endpoints": {"assertion_consumer_service": [(spec.acs, BINDING_HTTP_POST)]},
            "want_response_signed": True,
            "want_assertions_signed": True,
            "authn_requests_signed": False,
            "allow_unsolicited": False,
        }},
        "key_file": keys.key_file,
        "cert_file": keys.cert_file,
        "xmlsec_binary": XMLSEC,
        "allow_unknown_attributes": True,
        "metadata": {"inline": [idp_metadata]} if idp_metadata is not None else {},
    })
    return conf


def sp_metadata(spec: SamlSpec, keys: SpKeys) -> str:
    """Our EntityDescriptor for the IdP's administrator (entity id, ACS, certificate)."""
    from saml2.metadata import create_metadata_string
    return create_metadata_string(None, config=sp_config(spec, keys, None)).decode("utf-8")


def idp_entity_id(conf) -> str:
    """The one IdP the metadata describes; SamlRefused if none or several."""
    ids = [eid for eid in conf.metadata.identity_providers()]
    if len(ids) != 1:
        raise SamlRefused(f"the IdP metadata must describe exactly one IdP, found {len(ids)}")
    return ids[0]


def authn_request(conf) -> tuple[str, str]:
    """(request id, URL of the IdP's SSO endpoint carrying the AuthnRequest)."""
    from saml2 import BINDING_HTTP_REDIRECT
    from saml2.client import Saml2Client

    client = Saml2Client(config=conf)
    try:
        request_id, info = client.prepare_for_authenticate(
            entityid=idp_entity_id(conf), relay_state="", binding=BINDING_HTTP_REDIRECT)
        return request_id, dict(info["headers"])["Location"]
    except SamlRefused:
        raise
    except Exception as err:  # noqa: BLE001 - e.g. no HTTP-Redirect SSO endpoint
        raise SamlRefused(f"cannot make a request for this IdP: "
                          f"{type(err).__name__}: {err}"[:300]) from None


def weak_algorithm(xml: bytes) -> str | None:
    """The first signature or digest algorithm in the document that is not SHA-256 or
    stronger (SHA-1 above all), or None. Checked before pysaml2, which accepts SHA-1."""
    try:
        root = ElementTree.fromstring(xml)
    except Exception:  # noqa: BLE001 - defusedxml raises several kinds: all mean garbage
        return "not well-formed XML"
    for elem in root.iter():
        if elem.tag in (f"{{{_DSIG}}}SignatureMethod", f"{{{_DSIG}}}DigestMethod"):
            algorithm = elem.get("Algorithm", "")
            if algorithm not in _STRONG:
                return algorithm or "none"
    return None


def verify_response(conf, connector: str, saml_response: str, request_id: str
                    ) -> ExternalIdentity:
    """The identity a SAML response proves, if it answers ``request_id``; SamlRefused else."""
    from saml2 import BINDING_HTTP_POST
    from saml2.client import Saml2Client

    try:
        xml = base64.b64decode(saml_response, validate=True)
    except (binascii.Error, ValueError):
        raise SamlRefused("SAMLResponse is not base64") from None
    weak = weak_algorithm(xml)
    if weak is not None:
        raise SamlRefused(f"weak or missing signature algorithm: {weak}")
    client = Saml2Client(config=conf)
    try:
        response = client.parse_authn_request_response(
            saml_response, BINDING_HTTP_POST, outstanding={request_id: "/"})
    except Exception as err:  # noqa: BLE001 - pysaml2 raises dozens of kinds, all a refusal
        raise SamlRefused(f"{type(err).__name__}: {err}"[:300]) from None
    if response is None or response.assertion is None or response.name_id is None:
        raise SamlRefused("no signed assertion naming a user")
    if response.in_response_to != request_id:
        raise SamlRefused("the response answers another request")
    name = (response.name_id.text or "").strip()
    if not USER_NAME.match(name):
        raise SamlRefused(f"NameID {name[:64]!r} is not a valid user name")
    claims = {}
    for attribute, values in (response.get_identity() or {}).items():
        if isinstance(values, (list, tuple)):
            claims[str(attribute)] = tuple(str(v) for v in values if isinstance(v, str))
    return ExternalIdentity(connector, "saml", name, claims)


# -- the reactor side ---------------------------------------------------------------------


async def fetch_metadata(url: str) -> bytes:
    """GET the IdP's metadata with treq (the system's CAs), bounded in size."""
    import treq
    from twisted.web.iweb import UNKNOWN_LENGTH
    response = await treq.get(url, timeout=METADATA_TIMEOUT)
    if response.code != 200:
        raise ValueError(f"HTTP {response.code}")
    if response.length is not None and response.length != UNKNOWN_LENGTH \
            and response.length > MAX_METADATA:
        raise ValueError("metadata larger than 1 MiB")
    chunks: list[bytes] = []
    size = 0

    def collect(data: bytes) -> None:
        nonlocal size
        size += len(data)
        if size > MAX_METADATA:
            raise ValueError("metadata larger than 1 MiB")   # stops the download
        chunks.append(data)

    await treq.collect(response, collect)
    return b"".join(chunks)


class SamlSignIn:
    """SP-initiated SAML sign-in: metadata, start, and the ACS; throttled, bounded, audited."""

    _log = Logger()

    def __init__(self, *, connectors: ConnectorStore, signin: ExternalSignIn,
                 backend: Backend, throttle: LoginThrottle, audit: AuditLog,
                 clock: IReactorTime, keys: SpKeys,
                 fetch: Callable[[str], Any],   # url -> coroutine of bytes
                 run_in_thread: Callable[..., Deferred] | None = None,
                 queue: HashQueue | None = None) -> None:
        self._connectors = connectors
        self._signin = signin
        self._backend = backend
        self._throttle = throttle
        self._audit = audit
        self._clock = clock
        self._keys = keys
        self._fetch = fetch       # treq in the proxy (fetch_metadata)
        self._queue = queue or HashQueue(CONCURRENT_CHECKS, QUEUED_CHECKS, run_in_thread)
        # connector -> (spec, metadata text, pysaml2 config, when the metadata expires)
        self._configs: dict[str, tuple[SamlSpec, str, Any, float]] = {}
        self._own_metadata: dict[str, tuple[SamlSpec, str]] = {}
        self._starts = LoginThrottle(STARTS_PER_ADDRESS, STARTS_PER_ADDRESS, STARTS_WINDOW)

    async def metadata(self, name: str, address: str) -> str:
        """Our SP metadata for connector ``name``; AuthError 404 if there is none."""
        spec = await self._spec(name)
        cached = self._own_metadata.get(name)
        if cached is None or cached[0] != spec:
            cached = (spec, await self._run(address, sp_metadata, spec, self._keys))
            self._own_metadata[name] = cached
        return cached[1]

    async def start(self, name: str, target: str, address: str,
                    cli: CliReturn | None = None) -> tuple[str, str]:
        """(request id, IdP URL) of a new AuthnRequest, stored (with where the CLI waits,
        if the CLI started it) to be answered once."""
        spec = await self._spec(name)
        self._starts.attempt(address, address, self._clock.seconds())   # Throttled: 429
        conf = await self._config(spec, address)
        try:
            request_id, location = await self._run(address, authn_request, conf)
        except SamlRefused as err:
            self._log.warn("SAML connector {name}: {problem}", name=name, problem=str(err))
            raise AuthError(503, f"the identity provider {name} is not usable: {err}") from None
        expires = self._clock.seconds() + REQUEST_TTL
        await self._backend.put_saml_request(
            SamlRequest(request_id, name, target, expires, cli.text() if cli else ""))
        return request_id, location

    async def acs(self, name: str, saml_response: str | None, request_id: str | None,
                  address: str, client: str) -> tuple[User, str, CliReturn | None]:
        """(the signed-in user, where they go next, where the CLI waits if it started the
        sign-in); AuthError 401/403/429 otherwise, each attempt audited and each failure
        counted against ``address``."""
        spec = await self._connectors.saml(name)
        connector = spec.name if spec is not None else name[:64]
        key = f"saml:{request_id or ''}"[:256]
        try:
            self._throttle.attempt(key, address, self._clock.seconds())
        except Throttled as err:
            audit_login(self._audit, "", "saml", connector, client, err.reason)
            raise
        try:
            identity, outstanding = await self._verified(spec, name, saml_response,
                                                         request_id, address)
        except SamlRefused as err:
            self._log.info("SAML sign-in through {connector} from {client} refused: {why}",
                           connector=connector, client=client, why=str(err))
            audit_login(self._audit, "", "saml", connector, client, str(err)[:200])
            raise AuthError(401, FAILED) from None
        except AuthError as err:   # the IdP's metadata or the pool was not available
            audit_login(self._audit, "", "saml", connector, client, err.message[:200])
            raise
        self._throttle.succeeded(key, address)
        user = await self._signin.sign_in(identity, spec.attributes_to_roles, client)
        return user, outstanding.target, CliReturn.from_text(outstanding.cli)

    async def _verified(self, spec: SamlSpec | None, name: str, saml_response: str | None,
                        request_id: str | None, address: str
                        ) -> tuple[ExternalIdentity, SamlRequest]:
        if spec is None:
            raise SamlRefused("no SAML connector of that name")
        if not saml_response or len(saml_response) > MAX_RESPONSE:
            raise SamlRefused("missing or oversized SAMLResponse")
        if not request_id or len(request_id) > 128:
            raise SamlRefused("no sign-in was started in this browser")
        # Taken before the check: whatever the outcome, this id is never answered again.
        outstanding = await self._backend.take_saml_request(request_id, spec.name,
                                                            self._clock.seconds())
        if outstanding is None:
            raise SamlRefused("unknown, expired or already answered request")
        conf = await self._config(spec, address)
        d = self._queue.run(address, verify_response, conf, spec.name, saml_response,
                            request_id)
        d.addTimeout(CHECK_TIMEOUT, self._clock)
        try:
            identity = await d
        except (CancelledError, DeadlinePassed):
            raise SamlRefused("verification took too long") from None
        return identity, outstanding

    async def _spec(self, name: str) -> SamlSpec:
        spec = await self._connectors.saml(name)
        if spec is None:
            raise AuthError(404, f"no SAML connector named {name[:64]!r}")
        return spec

    async def _config(self, spec: SamlSpec, address: str):
        """pysaml2's config for ``spec``, with the IdP metadata (fetched, cached)."""
        now = self._clock.seconds()
        cached = self._configs.get(spec.name)
        if cached is not None and cached[0] == spec and now < cached[3]:
            return cached[2]
        if spec.entity_descriptor is not None:
            xml, until = spec.entity_descriptor, float("inf")
        else:
            try:
                xml = await self._fetch_metadata(spec)
            except Exception as err:  # noqa: BLE001 - any failure: keep the last good copy
                if cached is not None and cached[0] == spec:
                    self._log.warn("SAML connector {name}: cannot refresh the IdP metadata "
                                   "(keeping the last copy): {error}", name=spec.name,
                                   error=str(err)[:300])
                    return cached[2]
                self._log.warn("SAML connector {name}: cannot fetch the IdP metadata from "
                               "{url}: {error}", name=spec.name, url=spec.entity_descriptor_url,
                               error=str(err)[:300])
                raise AuthError(503, f"the identity provider {spec.name} is not answering; "
                                "try again later") from None
            until = now + METADATA_TTL
        try:
            conf = await self._run(address, sp_config, spec, self._keys, xml)
        except Exception as err:  # noqa: BLE001 - pysaml2's metadata errors are many kinds
            self._log.warn("SAML connector {name}: the IdP metadata is not usable: {error}",
                           name=spec.name, error=str(err)[:300])
            raise AuthError(503, f"the identity provider {spec.name} is not usable") from None
        self._configs[spec.name] = (spec, xml, conf, until)
        return conf

    async def _fetch_metadata(self, spec: SamlSpec) -> str:
        d = Deferred.fromCoroutine(self._fetch(spec.entity_descriptor_url))
        d.addTimeout(METADATA_TIMEOUT, self._clock)
        body = await d
        if len(body) > MAX_METADATA:
            raise ValueError("metadata larger than 1 MiB")
        return body.decode("utf-8")

    async def _run(self, address: str, fn: Callable, *args):
        d = self._queue.run(address, fn, *args)
        d.addTimeout(CHECK_TIMEOUT, self._clock)
        try:
            return await d
        except (CancelledError, DeadlinePassed):
            raise AuthError(503, "the proxy is busy; try again") from None
