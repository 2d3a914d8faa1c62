"""``ssl.SSLContext``s from plain records of what a listener or a client shows and trusts.

``ServerTls`` and ``ClientTls`` are data (PEM bytes, flags), so they can be compared,
logged without secrets and built in tests; ``server_context`` and ``client_context`` make
the contexts and are where a bad certificate, a key that does not fit it or an unreadable
CA fails (``ssl.SSLError``, an ``OSError``).

``SSLContext.load_cert_chain`` reads files only. The certificate and key are handed to it
through anonymous memory files (``memfd_create``, opened by OpenSSL as
``/proc/self/fd/N``), so the key never touches a filesystem; where that is unavailable,
through 0600 files in a private temporary directory, removed before this returns.
"""

from __future__ import annotations

import contextlib
import os
import ssl
import tempfile
from collections.abc import Iterator

import attrs

__all__ = ["ClientTls", "ServerTls", "client_context", "server_context"]

# Options beyond the defaults of PROTOCOL_TLS_SERVER (which already has no compression,
# server cipher preference and single-use (EC)DH keys): no session tickets (the contexts
# change at a CA rotation and several workers share a port: a ticket could not be resumed
# on another process anyway) and no renegotiation (a client could make us pay for
# handshakes on a connection already admitted). A client context takes the same: it asks
# for no ticket (it never resumes a session) and refuses a server's renegotiation.
_OPTIONS = ssl.OP_NO_TICKET | ssl.OP_NO_RENEGOTIATION


@attrs.frozen(repr=False)
class ServerTls:
    """What a TLS listener shows and whom it lets present a client certificate."""

    cert_pem: bytes                       # our certificate
    key_pem: bytes                        # its private key (unencrypted PEM)
    chain: tuple[bytes, ...] = ()         # further certificates sent after ours
    client_cas: tuple[bytes, ...] = ()    # a client certificate must chain to one of these
    require_client_cert: bool = False     # with client_cas: refuse a client without one
    alpn: tuple[str, ...] = ()            # protocols offered by ALPN, preferred first
    minimum_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2

    def __repr__(self) -> str:   # never the key
        return (f"ServerTls(client_cas={len(self.client_cas)}, "
                f"require_client_cert={self.require_client_cert}, alpn={self.alpn}, "
                f"minimum_version={self.minimum_version.name})")


def server_context(tls: ServerTls) -> ssl.SSLContext:
    """A server context for ``tls``; raises ``ssl.SSLError`` (an OSError) or ValueError on
    a certificate, key or CA that cannot be used."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = tls.minimum_version
    ctx.options |= _OPTIONS
    ctx.num_tickets = 0
    _load_cert_chain(ctx, tls.cert_pem, tls.key_pem, tls.chain)
    if tls.client_cas:
        _load_cas(ctx, tls.client_cas)
        ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    elif tls.require_client_cert:
        raise ValueError("a client certificate cannot be required without client_cas")
    if tls.alpn:
        ctx.set_alpn_protocols(list(tls.alpn))
    return ctx


@attrs.frozen(repr=False)
class ClientTls:
    """What a TLS client trusts and shows: the server's certificate must chain to one of
    ``trusted_cas`` (and, with ``system_cas``, the system's store; nothing else) and name
    the host dialled. ``verify=False`` checks nothing (``proxy app`` after ``login
    --insecure``) and then trusts no CA, so a record cannot seem to pin what it ignores."""

    trusted_cas: tuple[bytes, ...]        # authorities a server may chain to
    cert_pem: bytes | None = None         # our client certificate, if we present one
    key_pem: bytes | None = None          # its private key (unencrypted PEM)
    chain: tuple[bytes, ...] = ()         # further certificates sent after ours
    alpn: tuple[str, ...] = ()            # protocols offered by ALPN, preferred first
    minimum_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2
    system_cas: bool = False              # also the system's trust store (load_default_certs)
    verify: bool = True                   # False: no chain and no name check at all

    def __repr__(self) -> str:   # never the key
        return (f"ClientTls(trusted_cas={len(self.trusted_cas)}, "
                f"system_cas={self.system_cas}, verify={self.verify}, "
                f"client_cert={self.cert_pem is not None}, alpn={self.alpn}, "
                f"minimum_version={self.minimum_version.name})")


def client_context(tls: ClientTls) -> ssl.SSLContext:
    """A client context for ``tls``: the server is verified (chain to ``trusted_cas`` or,
    with ``system_cas``, the system's store; hostname or IP address checked by
    ``wrap_bio(server_hostname=...)``) unless ``verify`` is False; raises ``ssl.SSLError``
    or ValueError on a certificate, key or CA that cannot be used, or a record that trusts
    nothing while verifying, or trusts CAs while not verifying."""
    if tls.verify and not (tls.trusted_cas or tls.system_cas):
        raise ValueError("a TLS client needs at least one trusted CA")
    if not tls.verify and (tls.trusted_cas or tls.system_cas):
        raise ValueError("a TLS client that does not verify the server trusts no CA")
    if (tls.cert_pem is None) != (tls.key_pem is None):
        raise ValueError("a client certificate needs its key, and a key its certificate")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)   # CERT_REQUIRED, check_hostname
    if tls.verify:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.check_hostname = True
    else:
        ctx.check_hostname = False   # before CERT_NONE, which it would refuse
        ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = tls.minimum_version
    ctx.options |= _OPTIONS
    if tls.trusted_cas:
        _load_cas(ctx, tls.trusted_cas)
    if tls.system_cas:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if tls.cert_pem is not None:
        _load_cert_chain(ctx, tls.cert_pem, tls.key_pem, tls.chain)
    if tls.alpn:
        ctx.set_alpn_protocols(list(tls.alpn))
    return ctx


def _load_cert_chain(ctx: ssl.SSLContext, cert_pem: bytes, key_pem: bytes,
                     chain: tuple[bytes, ...]) -> None:
    with _private_file(b"".join(_pem_line_end(pem) for pem in (cert_pem, *chain))) \
            as cert_file, _private_file(key_pem) as key_file:
        ctx.load_cert_chain(cert_file, key_file, password=_no_password)


def _load_cas(ctx: ssl.SSLContext, pems: tuple[bytes, ...]) -> None:
    ctx.load_verify_locations(cadata="".join(_pem_line_end(pem).decode("ascii") for pem in pems))


def _no_password() -> bytes:
    """An encrypted key fails to load instead of OpenSSL asking on the terminal."""
    return b""


def _pem_line_end(pem: bytes) -> bytes:
    return pem if pem.endswith(b"\n") else pem + b"\n"


@contextlib.contextmanager
def _private_file(data: bytes) -> Iterator[str]:
    """A path OpenSSL can open that holds ``data``, readable by this process only, gone
    when the block ends."""
    memfd_create = getattr(os, "memfd_create", None)
    if memfd_create is not None and os.path.isdir("/proc/self/fd"):
        try:
            fd = memfd_create("apptunnel-tls", os.MFD_CLOEXEC)
        except OSError:
            fd = None
        if fd is not None:
            try:
                _write_all(fd, data)
                yield f"/proc/self/fd/{fd}"
            finally:
                os.close(fd)
            return
    folder = tempfile.mkdtemp(prefix="apptunnel-tls-")   # 0700
    path = os.path.join(folder, "pem")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.rmdir(folder)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
