"""TLS as a Twisted protocol wrapper, on ``ssl.SSLObject`` and memory BIOs, server or client.

Twisted's own layer (``TLSMemoryBIOProtocol`` over pyOpenSSL) spends most of its time in
the Python around OpenSSL: cffi calls, a ``WantReadError`` per read, a 32 KiB buffer per
``recv``, a ``callLater`` per connection and turn to batch small writes. Here the standard
library's ``SSLObject`` is the sans-IO engine (bytes in, bytes out, no socket) and
``TlsProtocol`` is a thin adapter with one write path, the same at both ends (a client
differs only in sending its ClientHello when the connection is made and in checking the
server's certificate and name, which its context and ``server_hostname`` decide):

* a write is encrypted at once and its records leave in one write to the TCP transport
  (no timer: the caller already writes whole messages, ``writeSequence`` joins first);
  except on connections made with a ``batch_clock`` (the tunnel, at both ends), where a reactor
  turn's writes, one frame per relayed request, are encrypted and sent together at the
  end of the turn, as Twisted's layer did: without it the agent woke for each frame and
  spent twice the CPU per request;
* a read feeds the incoming BIO and takes out plaintext in a loop bounded by what is
  buffered (``MemoryBIO.pending`` + ``SSLObject.pending()``), so the common case ends
  without an exception;
* a handshake failure or garbage is one log line and a closed connection (an alert is
  sent when OpenSSL has one); nothing raises into the reactor.

What the wrapped protocol sees is what Twisted's layer gave it: ``ISSLTransport`` with
``getPeerCertificate`` (here a ``cryptography`` ``x509.Certificate``, read once per
connection), ``negotiatedProtocol``, producers, ``loseConnection`` that sends close_notify
once everything written is out, ``abortConnection``; unknown attributes are looked up on
the TCP transport (``setTcpNoDelay``, ``bufferSize`` ...), as ``ProtocolWrapper`` does, and
``.transport`` is the TCP transport, for helpers that walk down to the socket.

Which context a connection gets is asked per connection (``contexts()``): at accept
time for a listener, a CA rotation swaps what new connections get, open ones keep theirs;
at each dial for a client (``TlsClientEndpoint``), so a reconnect presents a renewed
certificate and trusts the current set of CAs.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable

from cryptography import x509
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import (IConsumer, IDelayedCall, IHandshakeListener,
                                         IListeningPort, INegotiated, IProtocolFactory,
                                         IPushProducer, IReactorTime, ISSLTransport,
                                         IStreamClientEndpoint, IStreamServerEndpoint,
                                         ISystemHandle)
from twisted.internet.defer import Deferred, fail
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import directlyProvides, implementer, providedBy

__all__ = ["ContextSource", "TlsClientEndpoint", "TlsClientFactory", "TlsProtocol",
           "TlsServerEndpoint", "TlsServerFactory", "client_failure", "describe_error"]

_log = Logger()

ContextSource = Callable[[], ssl.SSLContext]

MAX_RECORD = 16384       # the most plaintext one TLS record (and one SSLObject.read) holds
# With a clock, writes wait for the end of the reactor turn and leave together (as
# Twisted's layer did for every connection), unless this much is waiting already.
BATCH_LIMIT = 64 * 1024
# The most plaintext handed to the wrapped protocol in one dataReceived.
MAX_DELIVERY = 256 * 1024
_UNREAD = object()       # the peer certificate before it was asked for


@implementer(IPushProducer)
class _ProducerGate:
    """The application's streaming producer as the TCP transport sees it.

    Two things can pause it: the TCP transport (its buffer is full) and this layer (writes
    held until the handshake is done). It is paused while either wants it paused, and
    paused/resumed only on a change, so neither undoes the other's pause.
    """

    def __init__(self, producer: IPushProducer) -> None:
        self.producer = producer
        self._tcp_full = False
        self._held = False

    def pauseProducing(self) -> None:
        if not (self._tcp_full or self._held):
            self.producer.pauseProducing()
        self._tcp_full = True

    def resumeProducing(self) -> None:
        self._tcp_full = False
        if not self._held:
            self.producer.resumeProducing()

    def stopProducing(self) -> None:
        self.producer.stopProducing()

    def hold(self) -> None:
        if not (self._tcp_full or self._held):
            self.producer.pauseProducing()
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            if not self._tcp_full:
                self.producer.resumeProducing()


@implementer(ISSLTransport, IConsumer, IPushProducer, INegotiated, ISystemHandle)
class TlsProtocol(Protocol):
    """One TLS connection, server or client: ciphertext below (``transport``), plaintext
    above (``wrappedProtocol``, which may be re-pointed to hand the connection over).

    States: handshaking (``_handshake_done`` False; writes are held), open, closing
    (``disconnecting``: close_notify sent once held writes and the producer are done),
    and finished (``_finished``: no more TLS in or out, the TCP connection is closing).
    ``_writable`` is the one flag the write path reads: open, or closing with a producer.
    """

    disconnecting = False    # our loseConnection was called (not the TCP transport's flag)
    _handshake_done = False
    _finished = False        # TLS is over: error, abort, or close_notify exchanged
    _writable = False        # write() may encrypt at once
    _close_sent = False      # our close_notify went out
    _close_seen = False      # the peer's close_notify came in
    _reason: Failure | None = None
    _producer = None         # what registerProducer was given (streaming or not)
    _gate: _ProducerGate | None = None

    def __init__(self, factory: Factory, wrapped: Protocol, context: ssl.SSLContext,
                 clock: IReactorTime | None = None, *, server_side: bool = True,
                 server_hostname: str | None = None) -> None:
        self.factory = factory
        self._clock = clock              # set: a turn's writes are encrypted and sent together
        self._batch: list[bytes] = []
        self._batch_size = 0
        self._batch_call: IDelayedCall | None = None
        self.wrappedProtocol = wrapped
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        # A client's context checks the server's chain and, with ``server_hostname`` (a
        # name: SAN and SNI; an IP address: IP SANs, no SNI), that it names the host dialled.
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=server_side,
                                     server_hostname=None if server_side else server_hostname)
        self._server_side = server_side
        self._held: list[bytes] = []     # written before the handshake was done
        self._cert = _UNREAD

    # -- the connection below -----------------------------------------------------------

    def makeConnection(self, transport) -> None:
        # Whatever the TCP transport provides (ITCPTransport, ISystemHandle ...) plus TLS.
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        self.wrappedProtocol.makeConnection(self)
        if not self._server_side and not self._finished:
            self._handshake()   # the ClientHello (what connectionMade wrote is held)

    def dataReceived(self, data: bytes) -> None:
        if self._finished:
            return   # after an error or an abort: nothing more is read
        self._incoming.write(data)
        if not self._handshake_done and not self._handshake():
            return
        self._deliver()

    def connectionLost(self, reason: Failure) -> None:
        if not self._finished and self._handshake_done:
            # The TCP connection ended: hand over what is still buffered, then judge the
            # end (a close_notify before it is clean; without one, it was cut).
            self._incoming.write_eof()
            self._deliver()
        self._finished = True
        self._writable = False
        self._drop_batch()
        self.connected = False
        if self._reason is not None:
            reason = self._reason
        elif reason.check(ConnectionDone) and not (self._close_seen or self._close_sent):
            reason = Failure(ConnectionLost("the peer closed without a TLS close_notify"))
        self._reason = None
        wrapped, self.wrappedProtocol = self.wrappedProtocol, None
        if wrapped is not None:
            wrapped.connectionLost(reason)

    # -- reading ------------------------------------------------------------------------

    def _handshake(self) -> bool:
        """Move the handshake on with what was received; True once it is done."""
        try:
            self._tls.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return False
        except (ssl.SSLError, ValueError) as err:
            self._fail("TLS handshake failed", err)
            return False
        self._handshake_done = True
        self._flush()
        if self._held:   # first what was written while handshaking, in order
            held, self._held = self._held, []
            self._encrypt(b"".join(held))
            if self._finished:
                return False
        self._writable = not self.disconnecting or self._producer is not None
        if self._gate is not None:
            self._gate.release()
        wrapped = self.wrappedProtocol
        if IHandshakeListener.providedBy(wrapped):
            wrapped.handshakeCompleted()
        if self.disconnecting and self._producer is None:
            self._shutdown()
        return not self._finished

    def _deliver(self) -> None:
        """Hand what complete records hold to the wrapped protocol, the records of one
        read together (up to ``MAX_DELIVERY``): a 64 KiB read is one call, not four."""
        incoming, tls = self._incoming, self._tls
        chunks: list[bytes] = []
        held = 0
        closed = error = None
        while not self._finished:
            size = incoming.pending + tls.pending()
            if not size:
                break
            try:
                data = tls.read(size if size < MAX_RECORD else MAX_RECORD)
            except ssl.SSLWantReadError:
                break   # a record is not complete yet
            except ssl.SSLZeroReturnError:
                data = b""
            except ssl.SSLEOFError:
                # The TCP connection ended without a close_notify: connectionLost says so.
                break
            except (ssl.SSLError, ValueError) as err:
                error = err
                break
            if not data:
                closed = True
                break
            chunks.append(data)
            held += len(data)
            if held >= MAX_DELIVERY:
                self._hand_over(chunks)
                chunks, held = [], 0
        if chunks:
            self._hand_over(chunks)
        if self._finished:
            return
        if error is not None:
            self._fail("TLS connection failed", error)
        elif closed:
            self._peer_closed()
        elif self._outgoing.pending:
            self._flush()   # a post-handshake message (a key update) wants an answer

    def _hand_over(self, chunks: list[bytes]) -> None:
        if not self._finished:
            self.wrappedProtocol.dataReceived(chunks[0] if len(chunks) == 1 else b"".join(chunks))

    def _peer_closed(self) -> None:
        """The peer's close_notify: answer it and close, as Twisted's layer does."""
        self._close_seen = True
        self._finished = True
        self._writable = False
        self._send_close_notify()
        self.transport.loseConnection()

    def _fail(self, what: str, err: Exception) -> None:
        """A TLS error (a bad handshake, garbage, a certificate refused): the alert OpenSSL
        made (if any) to the peer, and the connection closed. A server logs one line (who
        came and why it failed); a client's owner says it, from ``connectionLost``'s
        reason (``client_failure``), with what it was dialling for."""
        if self._server_side:
            _log.info("{what} with {peer}: {reason}", what=what, peer=_peer(self.transport),
                      reason=describe_error(err))
        self._reason = Failure(err)
        self._finished = True
        self._writable = False
        self._drop_batch()
        self._flush()
        self.transport.loseConnection()

    # -- writing ------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self._writable:
            if data:
                if self._clock is None:
                    self._encrypt(data)
                else:
                    self._add_to_batch(data)
            return
        if self._finished or (self.disconnecting and self._producer is None):
            return   # after loseConnection (and no producer), as Twisted's layer: dropped
        if not self._handshake_done:
            if data:
                self._hold(bytes(data))
            return
        if data:   # closing, a producer still registered
            if self._clock is None:
                self._encrypt(data)
            else:
                self._add_to_batch(data)

    def writeSequence(self, data) -> None:
        self.write(b"".join(data))

    def _encrypt(self, data: bytes) -> None:
        """Encrypt ``data`` and send its records in one write."""
        try:
            self._tls.write(data)
        except (ssl.SSLError, ValueError) as err:
            self._fail("TLS write failed", err)
            return
        self.transport.write(self._outgoing.read())

    def _add_to_batch(self, data: bytes) -> None:
        self._batch.append(data)
        self._batch_size += len(data)
        if self._batch_size >= BATCH_LIMIT:
            self._send_batch()
        elif self._batch_call is None:
            self._batch_call = self._clock.callLater(0, self._send_batch)

    def _send_batch(self) -> None:
        """Encrypt and send what this turn wrote, in as few records as it fills."""
        call, self._batch_call = self._batch_call, None
        if call is not None and call.active():
            call.cancel()
        batch = self._batch
        if not batch:
            return
        self._batch, self._batch_size = [], 0
        if not self._finished:
            self._encrypt(batch[0] if len(batch) == 1 else b"".join(batch))

    def _drop_batch(self) -> None:
        call, self._batch_call = self._batch_call, None
        if call is not None and call.active():
            call.cancel()
        self._batch, self._batch_size = [], 0

    def _hold(self, data: bytes) -> None:
        self._held.append(data)
        if self._gate is not None:
            self._gate.hold()

    def _flush(self) -> None:
        if self._outgoing.pending:
            self.transport.write(self._outgoing.read())

    # -- closing ------------------------------------------------------------------------

    def loseConnection(self) -> None:
        """close_notify once what was written (held writes, a producer) is out; the TCP
        connection closes when the peer answers with its own or closes."""
        if self.disconnecting or not self.connected:
            return
        self.disconnecting = True
        if self._producer is None:
            self._writable = False
        if not self._handshake_done and not self._held:
            # Nothing written can reach the peer before a handshake that may never come.
            self.abortConnection()
            return
        if self._handshake_done and self._producer is None:
            self._shutdown()

    def abortConnection(self) -> None:
        self.disconnecting = True
        self._finished = True
        self._writable = False
        self._held = []
        self._drop_batch()
        self.transport.abortConnection()

    def _shutdown(self) -> None:
        if self._finished:
            return
        self._send_close_notify()
        if self._close_seen:
            self._finished = True
            self.transport.loseConnection()

    def _send_close_notify(self) -> None:
        if self._close_sent:
            return
        self._send_batch()   # what was written goes before the close_notify
        self._close_sent = True
        try:
            self._tls.unwrap()
        except (ssl.SSLError, ValueError):
            pass   # sent; the peer's answer is still to come (or TLS already failed)
        self._flush()

    # -- producers ----------------------------------------------------------------------

    def registerProducer(self, producer, streaming: bool) -> None:
        if self._finished:
            producer.stopProducing()
            return
        if streaming:
            gate = _ProducerGate(producer)
            self.transport.registerProducer(gate, True)
            self._gate = gate
            if self._held:
                gate.hold()
        else:
            # A pull producer is asked for more when the TCP buffer is empty; held
            # writes never reach that buffer, so it is not asked before the handshake.
            self.transport.registerProducer(producer, False)
        self._producer = producer
        if self.disconnecting:
            self._writable = self._handshake_done and not self._finished

    def unregisterProducer(self) -> None:
        if self._producer is None:
            return
        self._producer = None
        self._gate = None
        self.transport.unregisterProducer()
        if self.disconnecting:
            self._writable = False
            if self._handshake_done and not self._held:
                self._shutdown()

    # What the wrapped protocol pauses is reading: the TCP transport's.
    def pauseProducing(self) -> None:
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.transport.resumeProducing()

    def stopProducing(self) -> None:
        self.loseConnection()

    def stopConsuming(self) -> None:
        self.unregisterProducer()
        self.loseConnection()

    # -- what the wrapped protocol may ask ----------------------------------------------

    def getPeerCertificate(self) -> x509.Certificate | None:
        """The peer's certificate OpenSSL verified (a server: the client's, None without
        one; a client: the server's), None before the handshake; parsed once per
        connection, it is read per request."""
        cert = self._cert
        if cert is _UNREAD:
            if not self._handshake_done:
                return None
            der = self._tls.getpeercert(binary_form=True)
            cert = self._cert = x509.load_der_x509_certificate(der) if der else None
        return cert

    @property
    def batching(self) -> bool:
        """Whether a reactor turn's writes leave together (made with a ``batch_clock``)."""
        return self._clock is not None

    @property
    def negotiatedProtocol(self) -> bytes | None:
        chosen = self._tls.selected_alpn_protocol()
        return chosen.encode("ascii") if chosen else None

    def getHandle(self) -> ssl.SSLObject:
        return self._tls

    def getHost(self):
        return self.transport.getHost()

    def getPeer(self):
        return self.transport.getPeer()

    def logPrefix(self) -> str:
        wrapped = self.wrappedProtocol
        name = wrapped.__class__.__name__ if wrapped is not None else "closed"
        return f"{name} (TLS)"

    def __getattr__(self, name: str):
        # As ProtocolWrapper (and Twisted's TLS layer): the TCP transport answers the rest.
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.transport, name)


class _WrappingFactory(Factory):
    """What the server and client factories share: the wrapped factory starts and stops
    with this one, and logs under its own name marked "(TLS)"."""

    noisy = False
    wrappedFactory: IProtocolFactory

    def doStart(self) -> None:
        self.wrappedFactory.doStart()

    def doStop(self) -> None:
        self.wrappedFactory.doStop()

    def logPrefix(self) -> str:
        inner = self.wrappedFactory
        prefix = inner.logPrefix() if hasattr(inner, "logPrefix") else type(inner).__name__
        return f"{prefix} (TLS)"


class TlsServerFactory(_WrappingFactory):
    """Wraps ``wrapped`` factory's protocols in TLS with the context current at accept.

    ``batch_clock``: writes made in one reactor turn are sent together at its end
    (``BATCH_LIMIT``). For connections that carry many streams (tunnels), where one turn
    writes a frame for each of many requests: one record and one send instead of one
    each, and the peer wakes once to read them. A client connection writes one whole
    response a turn, and a timer per connection and turn would cost more than it saves.
    """

    def __init__(self, contexts: ContextSource, wrapped: IProtocolFactory,
                 batch_clock: IReactorTime | None = None) -> None:
        self._contexts = contexts
        self._clock = batch_clock
        self.wrappedFactory = wrapped

    def buildProtocol(self, addr) -> TlsProtocol | None:
        inner = self.wrappedFactory.buildProtocol(addr)
        if inner is None:
            return None
        return TlsProtocol(self, inner, self._contexts(), self._clock)


@implementer(IStreamServerEndpoint)
class TlsServerEndpoint:
    """TLS on any stream server endpoint (TCP, a shared port), contexts asked per accept."""

    def __init__(self, endpoint: IStreamServerEndpoint, contexts: ContextSource,
                 batch_clock: IReactorTime | None = None) -> None:
        self._endpoint = endpoint
        self._contexts = contexts
        self._clock = batch_clock

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        return self._endpoint.listen(TlsServerFactory(self._contexts, factory, self._clock))



class TlsClientFactory(_WrappingFactory):
    """Wraps ``wrapped`` factory's protocols in client TLS with ``context``, checking that
    the server's certificate names ``server_hostname``; ``batch_clock`` as for
    ``TlsServerFactory`` (a tunnel's writes batched per reactor turn)."""

    def __init__(self, context: ssl.SSLContext, server_hostname: str,
                 wrapped: IProtocolFactory, batch_clock: IReactorTime | None = None) -> None:
        self._context = context
        self._hostname = server_hostname
        self._clock = batch_clock
        self.wrappedFactory = wrapped

    def buildProtocol(self, addr) -> TlsProtocol | None:
        inner = self.wrappedFactory.buildProtocol(addr)
        if inner is None:
            return None
        return TlsProtocol(self, inner, self._context, self._clock, server_side=False,
                           server_hostname=self._hostname)


@implementer(IStreamClientEndpoint)
class TlsClientEndpoint:
    """TLS on any stream client endpoint, as ``wrapClientTLS``: the context is asked of
    ``contexts`` at each ``connect`` (so a reconnect uses the certificate and the trusted
    CAs current then), and the Deferred fires with the wrapped protocol once TCP is
    connected (the handshake follows; writes wait for it)."""

    def __init__(self, endpoint: IStreamClientEndpoint, contexts: ContextSource,
                 server_hostname: str, batch_clock: IReactorTime | None = None) -> None:
        self._endpoint = endpoint
        self._contexts = contexts
        self._hostname = server_hostname
        self._clock = batch_clock

    def connect(self, factory: IProtocolFactory) -> Deferred:
        """Failures (a context that cannot be made, a refused connection) are errbacks;
        ``cancel()`` cancels the dial below."""
        try:
            context = self._contexts()
        except Exception:  # noqa: BLE001 - an endpoint fails by errback, never by raising
            return fail()
        tls = TlsClientFactory(context, self._hostname, factory, self._clock)
        return self._endpoint.connect(tls).addCallback(lambda protocol: protocol.wrappedProtocol)

def _peer(transport) -> str:
    try:
        address = transport.getPeer()
    except Exception:  # noqa: BLE001 - a transport without addresses: log what there is
        return "an unknown peer"
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    return f"{host}:{port}" if host is not None and port is not None else str(address)


def client_failure(err: BaseException, peer: str) -> str | None:
    """One line for a client whose TLS connection to ``peer`` ("the proxy") failed: its
    certificate refused by our check, or another TLS error (ours refused, garbage); None
    when ``err`` is not a TLS error."""
    if isinstance(err, ssl.SSLCertVerificationError):
        return f"{peer}'s certificate was refused: {describe_error(err)}"
    if isinstance(err, ssl.SSLError):
        return f"TLS with {peer} failed: {describe_error(err)}"
    return None


def describe_error(err: Exception) -> str:
    """What went wrong, for the log or a user: the certificate check's verdict, else
    OpenSSL's reason ("wrong version number", "http request", "no shared cipher")."""
    text = getattr(err, "verify_message", None) or getattr(err, "reason", None)
    if text:
        return str(text).replace("_", " ").lower()
    return str(err) or type(err).__name__
