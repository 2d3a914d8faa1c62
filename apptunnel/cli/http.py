"""HTTPS from the user's CLI to the proxy: blocking `requests`, our trust rules, one-line errors.

The CLI is not reactor code, so it uses `requests`. Two things differ from a plain session:

* ``localhost`` and ``*.localhost`` are dialled at 127.0.0.1 (RFC 6761; see DESIGN.md),
  while SNI and certificate checks still use the name the user gave. This is done by the
  adapter choosing the pool's address, never by patching the resolver.
* Trust comes from one ``ssl.SSLContext`` we build: only the pinned cluster CA, or the
  system trust store, or nothing (``--insecure``). The client certificate goes into the
  same context, so requests' own CA bundle never widens what we trust.

Before anything secret is sent to a proxy known only by its pin, :func:`fetch_chain`
reads the certificate chain it presents without trusting it, for ``check_chain``.
"""

from __future__ import annotations

import json
import os
import re
import select
import socket
import ssl
import tempfile
import time
import warnings
from typing import Any
from urllib.parse import urlsplit

import requests
import urllib3
from cryptography import x509
from OpenSSL import SSL
from requests.adapters import HTTPAdapter

from apptunnel.cli.context import CliError
from apptunnel.net import is_ip, loopback_host, split_host_port

__all__ = ["ProxyClient", "fetch_chain", "tls_context"]

_SSL_SOURCE = re.compile(r"\s*\(_ssl\.c:\d+\)?")

TIMEOUT = 15.0
MAX_RESPONSE = 1024 * 1024


def tls_context(ca_pem: bytes | None, insecure: bool = False,
                client: tuple[bytes, bytes] | None = None) -> ssl.SSLContext:
    """A client context trusting only `ca_pem` (or the system store when None, or nothing)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=None)
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif ca_pem is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # no default roots
        context.load_verify_locations(cadata=ca_pem.decode("ascii"))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if client is not None:
        _load_client_cert(context, *client)
    return context


def _load_client_cert(context: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    """`load_cert_chain` wants paths: use a private temp file, removed at once."""
    fd, path = tempfile.mkstemp(prefix="apptunnel-client-", suffix=".pem")
    try:
        with os.fdopen(fd, "wb") as f:  # mkstemp files are 0600
            f.write(cert_pem + b"\n" + key_pem)
        context.load_cert_chain(path)
    finally:
        os.unlink(path)


class _LoopbackAdapter(HTTPAdapter):
    """Connects `*.localhost` to 127.0.0.1 and verifies TLS with our context and the real name."""

    def __init__(self, context: ssl.SSLContext, insecure: bool) -> None:
        self._context = context
        self._insecure = insecure
        super().__init__(max_retries=0)

    def get_connection_with_tls_context(self, request, verify, proxies=None, cert=None):
        parts = urlsplit(request.url)
        host = parts.hostname or ""
        return self.poolmanager.connection_from_host(
            loopback_host(host), parts.port or 443, scheme="https",
            pool_kwargs={
                "ssl_context": self._context,
                "server_hostname": host,
                "assert_hostname": False if self._insecure else host,
            },
        )

    def cert_verify(self, conn, url, verify, cert) -> None:
        """Trust and client certificate are already in our context; add nothing."""


class ProxyClient:
    """JSON calls to one proxy; every failure is a CliError naming the proxy."""

    def __init__(self, proxy: str, context: ssl.SSLContext, insecure: bool = False,
                 tls_hint: str = "") -> None:
        """`tls_hint` is added to a failed certificate check (e.g. how to pin the CA)."""
        try:
            self._host, self._port = split_host_port(proxy, default_port=443)
        except ValueError as err:
            raise CliError(f"--proxy: {err}", code=2) from None
        self.proxy = proxy
        self._insecure = insecure
        self._tls_hint = tls_hint
        self._session = requests.Session()
        self._session.trust_env = False  # no HTTPS_PROXY detours for credentials
        self._session.mount("https://", _LoopbackAdapter(context, insecure))
        netloc = self._host if self._port == 443 else f"{self._host}:{self._port}"
        self._session.headers["Host"] = netloc
        self._base = f"https://{netloc}"

    def call(self, method: str, path: str, body: dict | None = None) -> tuple[int, Any]:
        """(status, decoded JSON body or None)."""
        try:
            with warnings.catch_warnings():
                if self._insecure:  # the user was already warned, once and clearly
                    warnings.simplefilter("ignore", urllib3.exceptions.InsecureRequestWarning)
                response = self._session.request(method, self._base + path, json=body,
                                                 timeout=TIMEOUT, allow_redirects=False,
                                                 stream=True)
            raw = response.raw.read(MAX_RESPONSE + 1, decode_content=True)
            response.close()
        except requests.exceptions.SSLError as err:
            raise CliError(f"TLS verification of the proxy at {self.proxy} failed: "
                           f"{_reason(err)}{self._tls_hint}") from None
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as err:
            raise CliError(f"cannot reach the proxy at {self.proxy}: {_reason(err)}") from None
        except requests.exceptions.RequestException as err:
            raise CliError(f"request to the proxy at {self.proxy} failed: {_reason(err)}") from None
        if len(raw) > MAX_RESPONSE:
            raise CliError(f"the proxy at {self.proxy} sent a response larger than "
                           f"{MAX_RESPONSE} bytes")
        try:
            data = json.loads(raw) if raw else None
        except ValueError:
            data = None
        return response.status_code, data

    def close(self) -> None:
        self._session.close()


def fetch_chain(proxy: str, timeout: float = TIMEOUT) -> list[x509.Certificate]:
    """The certificate chain the proxy presents, read WITHOUT trusting it (for a pin check).

    Only the handshake happens on this connection; nothing is sent after it.
    """
    try:
        host, port = split_host_port(proxy, default_port=443)
    except ValueError as err:
        raise CliError(f"--proxy: {err}", code=2) from None
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.set_verify(SSL.VERIFY_NONE, None)
    try:
        sock = socket.create_connection((loopback_host(host), port), timeout=timeout)
    except OSError as err:
        raise CliError(f"cannot reach the proxy at {proxy}: "
                       f"{err.strerror or err.__class__.__name__}") from None
    try:
        connection = SSL.Connection(context, sock)
        if not is_ip(host):
            connection.set_tlsext_host_name(host.encode("idna"))
        connection.set_connect_state()
        _handshake(connection, sock, time.monotonic() + timeout)
        chain = [c.to_cryptography() for c in (connection.get_peer_cert_chain() or [])]
        try:
            connection.shutdown()
        except SSL.Error:
            pass
    except (SSL.Error, OSError) as err:
        raise CliError(f"TLS handshake with the proxy at {proxy} failed: "
                       f"{_ssl_reason(err)}") from None
    finally:
        sock.close()
    return chain


def _handshake(connection: SSL.Connection, sock: socket.socket, deadline: float) -> None:
    """Drive the handshake on a socket with a timeout (non-blocking inside), up to `deadline`."""
    while True:
        try:
            connection.do_handshake()
            return
        except SSL.WantReadError:
            wait_read = True
        except SSL.WantWriteError:
            wait_read = False
        left = deadline - time.monotonic()
        if left <= 0:
            raise OSError("the TLS handshake timed out")
        if wait_read:
            ready = select.select([sock], [], [], left)[0]
        else:
            ready = select.select([], [sock], [], left)[1]
        if not ready:
            raise OSError("the TLS handshake timed out")


def _ssl_reason(err: Exception) -> str:
    if isinstance(err, SSL.Error) and err.args and isinstance(err.args[0], list) and err.args[0]:
        return str(err.args[0][0][-1])
    return str(err) or err.__class__.__name__


def _reason(err: Exception) -> str:
    """The innermost useful text of a requests/urllib3 error, on one line."""
    text = str(err)
    for marker in ("Caused by ", "] "):
        if marker in text:
            text = text.rsplit(marker, 1)[-1]
    text = _SSL_SOURCE.sub("", text)   # "... chain (_ssl.c:1006)": OpenSSL's source line
    return " ".join(text.strip("()'\" ").split())[:300] or err.__class__.__name__

