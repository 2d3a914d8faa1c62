"""Several proxy processes on one machine (``workers: N``): one Python process is one core.

Workers are the issue-13 proxies (one backend, a registry with heartbeats, agents keeping
a tunnel to every live proxy), on one machine with the kernel balancing instead of an L4
balancer:

- The twistd process is worker 0. Once it serves (keys made, schema migrated, so nothing
  races on a first start) it spawns workers 1..N-1 as fresh ``twistd apptunnel --worker
  I`` processes (``reactor.spawnProcess``, not ``os.fork``: a fork of a running reactor
  shares its epoll descriptor, waker pipe and thread pools with the child). A worker that
  exits is started again after a backoff (1 s doubling to 30 s, reset after a minute of
  life), one log line each time; stopping worker 0 stops them (SIGTERM, then SIGKILL after
  ``STOP_TIMEOUT``). Each child's stdin is a pipe from worker 0: when it closes (worker 0
  killed with -9) the child stops too, so no orphan keeps the ports.
- Every worker binds the shared listeners (web_listen_addr, tunnel_listen_addr) with
  ``SO_REUSEPORT``: the kernel spreads new connections over the workers.
- What must reach one worker is its own (``WorkerPlace``): its proxy id (worker 0 keeps
  DATA_DIR/proxy_id, worker I a stable id derived from it), its audit journal and chain,
  a private tunnel port (tunnel port + 1 + I, advertised to agents as advertise_tunnel_addr's
  port + 1 + I, so an agent that dialled the shared port keeps a tunnel to every worker),
  its diag listener (diag_addr's port + I) and control socket (``control-I.sock``; worker 0
  relays the CLI's ``refresh`` to every worker before it answers).
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
from collections.abc import Callable

import attrs
from twisted.application.service import Service
from twisted.internet import defer, error
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.protocol import ProcessProtocol, Protocol
from twisted.logger import FileLogObserver, Logger, eventAsText
from zope.interface import implementer

from apptunnel.config import ProxyConfig
from apptunnel.net import split_host_port
from apptunnel.tls.layer import ContextSource, TlsServerEndpoint, TlsServerFactory

__all__ = ["SharedPortEndpoint", "WorkerPlace", "WorkerSupervisor", "child_log_observer",
           "control_name", "public_endpoint", "restart_delay", "share", "watch_parent",
           "worker_place"]

log = Logger()

STOP_TIMEOUT = 20.0        # a stopping worker drains its tunnels (go_away) within this
RESTART_FIRST = 1.0
RESTART_MAX = 30.0
STABLE_AFTER = 60.0        # a worker that lived this long starts again after RESTART_FIRST
MAX_LINE = 16 * 1024       # a child's log line is cut here (the relay's only buffer)
JOURNAL = "audit-journal"
CONTROL = "control.sock"


@attrs.frozen
class WorkerPlace:
    """What belongs to one worker alone; worker 0 of one worker is today's proxy exactly."""

    index: int
    count: int
    proxy_id: str
    journal_dir: str
    control_name: str
    private_tunnel: tuple[str, int] | None   # (host, port) only this worker binds
    config: ProxyConfig                      # diag_addr and advertise_tunnel_addr its own


def worker_place(config: ProxyConfig, index: int, base_id: str) -> WorkerPlace:
    """Worker ``index``'s own id, files and ports (pure: the decision, not the binding)."""
    if not 0 <= index < config.workers:
        raise ValueError(f"worker {index} of {config.workers}")
    if config.workers == 1:
        return WorkerPlace(0, 1, base_id, os.path.join(config.data_dir, JOURNAL), CONTROL,
                           None, config)
    advertise_host, advertise_port = split_host_port(config.advertise_tunnel_addr)
    diag = config.diag_addr
    if diag is not None:
        host, port = split_host_port(diag)
        diag = _join(host, port + index)
    suffix = "" if index == 0 else f"-{index}"
    return WorkerPlace(
        index=index, count=config.workers,
        proxy_id=worker_proxy_id(base_id, index),
        journal_dir=os.path.join(config.data_dir, JOURNAL + suffix),
        control_name=control_name(index),
        private_tunnel=(config.tunnel_listen_host, config.tunnel_listen_port + 1 + index),
        config=attrs.evolve(config, diag_addr=diag, advertise_tunnel_addr=_join(
            advertise_host, advertise_port + 1 + index)),
    )


def control_name(index: int) -> str:
    """Worker 0 keeps the socket the CLI asks (and relays); worker I has its own."""
    return CONTROL if index == 0 else f"control-{index}.sock"


def worker_proxy_id(base_id: str, index: int) -> str:
    """Worker 0 is DATA_DIR/proxy_id; worker I a stable id of the same shape derived from
    it, so its audit chain and registry row continue across restarts."""
    if index == 0:
        return base_id
    return hashlib.sha256(f"{base_id}/worker/{index}".encode()).hexdigest()[:16]


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def share(limit: int, workers: int) -> int:
    """One worker's part of a count kept in each worker's memory (the sign-in throttle):
    the kernel spreads a client's connections over the workers, so N workers admit about
    N shares; rounded up, so together they admit at most ``limit + workers - 1``."""
    return max(1, -(-limit // workers))


def restart_delay(failures: int) -> float:
    """Seconds before starting a worker that exited ``failures`` times in a row."""
    return min(RESTART_MAX, RESTART_FIRST * 2 ** max(0, failures - 1))


# -- the shared listeners -----------------------------------------------------------------

@implementer(IStreamServerEndpoint)
class SharedPortEndpoint:
    """A TCP (or TLS) listener other workers bind too: ``SO_REUSEPORT`` before ``bind``,
    then handed to the reactor (``adoptStreamPort``). Linux lets only sockets of the same
    user share a port, so another account cannot join in and take connections.
    ``tls``: where each accepted connection's ``ssl.SSLContext`` comes from (None: TCP);
    ``batch_writes``: a turn's writes leave together (TlsServerFactory's ``batch_clock``)."""

    def __init__(self, reactor, port: int, interface: str, tls: ContextSource | None = None,
                 backlog: int = 50, batch_writes: bool = False) -> None:
        self._reactor = reactor
        self._port = port
        self._interface = interface
        self._tls = tls
        self._backlog = backlog
        self._batch_writes = batch_writes

    def listen(self, factory) -> defer.Deferred:
        return defer.execute(self._listen, factory)

    def _listen(self, factory):
        family = socket.AF_INET6 if ":" in self._interface else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((self._interface, self._port))
            sock.listen(self._backlog)
            sock.setblocking(False)
            if self._tls is not None:
                factory = TlsServerFactory(self._tls, factory,
                                           self._reactor if self._batch_writes else None)
            # The reactor takes its own duplicate of the descriptor; ours is closed below.
            return self._reactor.adoptStreamPort(sock.fileno(), family, factory)
        except OSError as err:
            raise error.CannotListenError(self._interface, self._port, err) from None
        finally:
            sock.close()


def public_endpoint(reactor, workers: int, port: int, interface: str, tls: ContextSource,
                    batch_writes: bool = False):
    """A TLS listener: shared (SO_REUSEPORT) when there are several workers, else a plain
    TCP port. ``tls`` gives each accepted connection its ``ssl.SSLContext``;
    ``batch_writes`` (tunnel ports): a reactor turn's writes leave together."""
    if workers > 1:
        return SharedPortEndpoint(reactor, port, interface, tls, batch_writes=batch_writes)
    return TlsServerEndpoint(TCP4ServerEndpoint(reactor, port, interface=interface), tls,
                             reactor if batch_writes else None)


# -- worker 0: the supervisor --------------------------------------------------------------

Spawn = Callable[..., object]   # reactor.spawnProcess's signature


def child_argv(config_path: str, index: int) -> list[str]:
    """The same twistd plugin in a fresh interpreter, logging plain lines to stdout (worker 0
    stamps and relays them) and with no pid file (worker 0 owns the one twistd made)."""
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
            "--nodaemon", "--pidfile=", f"--logger={__name__}.child_log_observer",
            "apptunnel", "--config", config_path, "--worker", str(index)]


class WorkerSupervisor(Service):
    """Worker 0's children: started once worker 0 serves, restarted with backoff when they
    exit, stopped with it."""

    def __init__(self, reactor, config: ProxyConfig, spawn: Spawn | None = None,
                 refresh_child: Callable[[int], defer.Deferred] | None = None) -> None:
        self._reactor = reactor
        self._config = config
        self._spawn = spawn or reactor.spawnProcess
        self._refresh_child = refresh_child
        self._children: dict[int, _Child] = {}
        self._failures: dict[int, int] = {}
        self._restarts: dict[int, object] = {}
        self._stopping = False

    def pids(self) -> dict[int, int]:
        """Live children's pids by worker index."""
        return {i: c.pid for i, c in self._children.items() if c.pid is not None}

    def startService(self) -> None:
        super().startService()
        for index in range(1, self._config.workers):
            self._start(index)

    def _start(self, index: int) -> None:
        self._restarts.pop(index, None)
        if self._stopping:
            return
        child = _Child(self, self._reactor, index)
        self._children[index] = child
        argv = child_argv(self._config.path, index)
        try:
            self._spawn(child, argv[0], argv, env=None, path=os.getcwd(),
                        childFDs={0: "w", 1: "r", 2: "r"})
        except OSError as err:   # no process or descriptor to spare: try again later
            self.ended(child, f"could not be started ({err.strerror or err})")
            return
        log.info("worker {index} started (pid {pid})", index=index, pid=child.pid)

    def ended(self, child: "_Child", status: str) -> None:
        if self._children.get(child.index) is child:
            del self._children[child.index]
        if self._stopping:
            return
        lived = self._reactor.seconds() - child.started
        failures = 1 if lived >= STABLE_AFTER else self._failures.get(child.index, 0) + 1
        self._failures[child.index] = failures
        delay = restart_delay(failures)
        log.warn("worker {index} (pid {pid}) {status}; starting it again in {delay:.0f} s",
                 index=child.index, pid=child.pid, status=status, delay=delay)
        self._restarts[child.index] = self._reactor.callLater(delay, self._start, child.index)

    def refresh(self) -> defer.Deferred:
        """Ask every live child to re-read locks, users and roles (the control socket's
        ``refresh`` on worker 0); a child that does not answer in time is logged."""
        if self._refresh_child is None:
            return defer.succeed(None)
        asks = []
        for index in sorted(self._children):
            d = defer.maybeDeferred(self._refresh_child, index)
            d.addErrback(lambda f, i=index: log.info(
                "worker {index} did not confirm refresh ({error}): it sees the change at "
                "its next poll", index=i, error=f.getErrorMessage()))
            asks.append(d)
        return defer.gatherResults(asks)

    def stopService(self) -> defer.Deferred:
        super().stopService()
        self._stopping = True
        for call in self._restarts.values():
            if call.active():
                call.cancel()
        self._restarts.clear()
        return defer.gatherResults([c.stop() for c in list(self._children.values())])


class _Child(ProcessProtocol):
    """One child process: relays its output lines into worker 0's log."""

    def __init__(self, supervisor: WorkerSupervisor, reactor, index: int) -> None:
        self._supervisor = supervisor
        self._reactor = reactor
        self.index = index
        self.started = reactor.seconds()
        self._partial = {1: b"", 2: b""}
        self._ended: list[defer.Deferred] = []
        self._done = False
        self._kill = None

    pid: int | None = None   # kept after exit, for the log line

    def connectionMade(self) -> None:
        self.pid = self.transport.pid

    def childDataReceived(self, fd: int, data: bytes) -> None:
        lines = (self._partial.get(fd, b"") + data).split(b"\n")
        self._partial[fd] = lines.pop()[:MAX_LINE]
        for line in lines:
            self._relay(line)

    def _relay(self, line: bytes) -> None:
        text = line[:MAX_LINE].decode("utf-8", "replace").rstrip()
        if text:
            log.info("worker {index}: {line}", index=self.index, line=text)

    def processEnded(self, reason) -> None:
        for rest in self._partial.values():
            self._relay(rest)
        self._done = True
        if self._kill is not None and self._kill.active():
            self._kill.cancel()
        value = reason.value
        if isinstance(value, error.ProcessTerminated) and value.signal is not None:
            status = f"was killed by signal {value.signal}"
        else:
            status = f"exited with status {getattr(value, 'exitCode', 0) or 0}"
        self._supervisor.ended(self, status)
        waiting, self._ended = self._ended, []
        for d in waiting:
            d.callback(None)

    def stop(self) -> defer.Deferred:
        """SIGTERM (a clean twistd shutdown), SIGKILL if it is not gone in STOP_TIMEOUT."""
        if self._done:
            return defer.succeed(None)
        d = defer.Deferred()
        self._ended.append(d)
        self._signal("TERM")
        self._kill = self._reactor.callLater(STOP_TIMEOUT, self._signal, "KILL")
        return d

    def _signal(self, name: str) -> None:
        try:
            self.transport.signalProcess(name)
        except error.ProcessExitedAlready:
            pass


# -- workers 1..N-1 -------------------------------------------------------------------------

class _ParentWatch(Protocol):
    """A child's stdin is a pipe from worker 0: end of file means worker 0 is gone."""

    def __init__(self, reactor) -> None:
        self._reactor = reactor

    def dataReceived(self, data: bytes) -> None:
        pass   # worker 0 writes nothing; anything is ignored

    def connectionLost(self, reason) -> None:
        if not self._reactor.running:
            return
        log.warn("worker 0 is gone: stopping this worker")
        try:
            self._reactor.stop()
        except error.ReactorNotRunning:   # already stopping (SIGTERM from worker 0)
            pass


def watch_parent(reactor):
    """Stop this worker when worker 0's end of its stdin closes."""
    from twisted.internet.stdio import StandardIO

    return StandardIO(_ParentWatch(reactor), stdout=os.open(os.devnull, os.O_WRONLY),
                      reactor=reactor)


def child_log_observer():
    """twistd ``--logger`` for workers 1..N-1: plain lines (worker 0 adds time and index)."""
    return FileLogObserver(sys.stdout, _plain)


def _plain(event) -> str | None:
    text = eventAsText(event, includeTimestamp=False, includeSystem=False)
    return text + "\n" if text else None

