"""`workers: N` (proxy/workers.py): the config key, what each worker owns, the supervisor's
start/restart/stop on a fake spawn and a Clock, and the shared listener's SO_REUSEPORT."""

from __future__ import annotations

import os
import re
import socket

import attrs
import pytest
from twisted.internet import error
from twisted.internet.testing import MemoryReactor, MemoryReactorClock
from twisted.python.failure import Failure

from apptunnel.config import ConfigError, load_proxy_config
from apptunnel.proxy import workers as workers_mod
from apptunnel.proxy.workers import (
    MAX_LINE, RESTART_MAX, STABLE_AFTER, STOP_TIMEOUT, SharedPortEndpoint, WorkerSupervisor,
    restart_delay, share, worker_place, worker_proxy_id)
from tests.support.config_files import PROXY_OK, write

BASE_ID = "0123456789abcdef"


def load(tmp_path, extra: str = ""):
    return load_proxy_config(write(tmp_path, PROXY_OK + extra, "proxy.yaml"))


# -- config ------------------------------------------------------------------------------

def test_one_worker_is_the_default(tmp_path):
    """Without the key the proxy is one process, as before."""
    assert load(tmp_path).workers == 1


def test_workers_count_and_auto(tmp_path):
    """A count is taken as given; `auto` is one worker per CPU."""
    assert load(tmp_path, "workers: 2\n").workers == 2
    assert load(tmp_path, "workers: auto\n").workers == (os.cpu_count() or 1)


@pytest.mark.parametrize("extra, message", [
    ("workers: 0\n", "proxy.yaml:6: workers: must be from 1 to"),
    ("workers: many\n", "workers: expected a whole number, got 'many'"),
    ("workers: true\n", "workers: expected a whole number"),
    (f"workers: {(os.cpu_count() or 1) * 4 + 1}\n", "workers: must be from 1 to"),
    ("workers: 2\ndiag_addr: 127.0.0.1:0\n", "2 workers need a fixed port in diag_addr (not 0)"),
    ("workers: 2\nadvertise_tunnel_addr: apptunnel.localhost:65534\n",
     "2 workers need advertise_tunnel_addr's port + 2 to be a port"),
])
def test_workers_mistakes_are_one_line(tmp_path, extra, message):
    """A bad count, or ports the workers cannot derive theirs from, is one line."""
    with pytest.raises(ConfigError) as err:
        load(tmp_path, extra)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_port_zero_listeners_refuse_several_workers(tmp_path):
    """An ephemeral web or tunnel port cannot be shared by several processes."""
    text = PROXY_OK.replace("127.0.0.1:3080", "127.0.0.1:0") + "workers: 2\n"
    with pytest.raises(ConfigError, match="need a fixed port in web_listen_addr"):
        load_proxy_config(write(tmp_path, text, "proxy.yaml"))


# -- what each worker owns -----------------------------------------------------------------

def test_one_worker_owns_what_the_proxy_owned(tmp_path):
    """workers: 1 changes nothing: DATA_DIR/proxy_id, the journal, control.sock, the ports."""
    config = load(tmp_path)
    place = worker_place(config, 0, BASE_ID)
    assert place.config is config
    assert place.proxy_id == BASE_ID
    assert place.journal_dir == os.path.join(config.data_dir, "audit-journal")
    assert place.control_name == "control.sock"
    assert place.private_tunnel is None


def test_each_worker_has_its_own_id_files_and_ports(tmp_path):
    """Worker I: a stable 16-hex id (0 keeps the file's), its own journal and control
    socket, tunnel port + 1 + I (advertised likewise) and diag port + I."""
    config = load(tmp_path, "workers: 3\ndiag_addr: 127.0.0.1:3090\n")
    places = [worker_place(config, i, BASE_ID) for i in range(3)]
    assert places[0].proxy_id == BASE_ID
    assert len({p.proxy_id for p in places}) == 3
    assert all(re.fullmatch(r"[0-9a-f]{16}", p.proxy_id) for p in places)
    assert worker_proxy_id(BASE_ID, 2) == places[2].proxy_id      # stable across restarts
    assert len({p.journal_dir for p in places}) == 3
    assert [p.control_name for p in places] == ["control.sock", "control-1.sock",
                                                "control-2.sock"]
    assert [p.private_tunnel for p in places] == [("127.0.0.1", 3025), ("127.0.0.1", 3026),
                                                  ("127.0.0.1", 3027)]
    assert [p.config.advertise_tunnel_addr for p in places] == [
        "127.0.0.1:3025", "127.0.0.1:3026", "127.0.0.1:3027"]
    assert [p.config.diag_addr for p in places] == [
        "127.0.0.1:3090", "127.0.0.1:3091", "127.0.0.1:3092"]
    assert all(p.config.web_listen_addr == config.web_listen_addr for p in places)


def test_worker_place_keeps_ipv6_brackets_and_diag_off(tmp_path):
    """An IPv6 advertised address stays bracketed; diag_addr off stays off."""
    config = load(tmp_path, "workers: 2\ndiag_addr: off\n"
                            "advertise_tunnel_addr: '[::1]:4000'\n")
    place = worker_place(config, 1, BASE_ID)
    assert place.config.advertise_tunnel_addr == "[::1]:4002"
    assert place.config.diag_addr is None


def test_worker_index_outside_the_count_is_refused(tmp_path):
    config = load(tmp_path, "workers: 2\n")
    with pytest.raises(ValueError):
        worker_place(config, 2, BASE_ID)


def test_each_worker_counts_its_share_of_the_sign_in_throttle():
    """5 failures per user over 2 workers: 3 each (at most 6 in all, not 10); one worker
    keeps the whole limit; a share is never 0."""
    assert share(5, 1) == 5
    assert share(5, 2) == 3
    assert share(20, 4) == 5
    assert share(1, 8) == 1


def test_restart_delay_doubles_to_a_cap():
    """1 s, 2 s, 4 s ... at most RESTART_MAX: a worker that cannot start is no fork loop."""
    assert [restart_delay(n) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 8.0]
    assert restart_delay(50) == RESTART_MAX


# -- the supervisor --------------------------------------------------------------------------

class _FakeProcess:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list[str] = []

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)


class _Spawner:
    def __init__(self) -> None:
        self.spawned: list[tuple[object, list[str], dict]] = []

    def __call__(self, proto, executable, args, env=None, path=None, childFDs=None):
        process = _FakeProcess(1000 + len(self.spawned))
        self.spawned.append((proto, list(args), childFDs))
        proto.makeConnection(process)
        return process


def _exit(proto, code: int = 1) -> None:
    proto.processEnded(Failure(error.ProcessTerminated(exitCode=code)))


def _supervisor(tmp_path, count: int = 3, refresh_child=None):
    clock = MemoryReactorClock()
    spawn = _Spawner()
    config = load(tmp_path, f"workers: {count}\n")
    return clock, spawn, WorkerSupervisor(clock, config, spawn=spawn,
                                          refresh_child=refresh_child)


def test_supervisor_starts_the_other_workers(tmp_path):
    """Workers 1..N-1 start as the same twistd plugin with --worker I and a stdin pipe."""
    clock, spawn, supervisor = _supervisor(tmp_path)
    supervisor.startService()
    assert [args[args.index("--worker") + 1] for _, args, _ in spawn.spawned] == ["1", "2"]
    _, args, fds = spawn.spawned[0]
    assert "apptunnel" in args and "--pidfile=" in args
    assert fds[0] == "w"            # its stdin: end of file when worker 0 is gone
    assert supervisor.pids() == {1: 1000, 2: 1001}


def test_a_worker_that_exits_is_started_again_with_backoff(tmp_path):
    """Quick exits wait 1 s, then 2 s; a worker that lived a minute starts after 1 s again."""
    clock, spawn, supervisor = _supervisor(tmp_path, count=2)
    supervisor.startService()
    _exit(spawn.spawned[-1][0])
    assert supervisor.pids() == {}
    clock.advance(0.9)
    assert len(spawn.spawned) == 1
    clock.advance(0.1)
    assert len(spawn.spawned) == 2
    _exit(spawn.spawned[-1][0])
    clock.advance(1.5)
    assert len(spawn.spawned) == 2       # second quick exit: 2 s
    clock.advance(0.5)
    assert len(spawn.spawned) == 3
    clock.advance(STABLE_AFTER)
    proto = spawn.spawned[-1][0]
    proto.processEnded(Failure(error.ProcessTerminated(signal=9)))
    clock.advance(1.0)
    assert len(spawn.spawned) == 4


def test_a_worker_that_cannot_be_spawned_is_tried_again(tmp_path):
    """spawnProcess failing (no process to spare) is an exit like any other: retried."""
    clock, spawn = MemoryReactorClock(), _Spawner()
    calls = []

    def failing(*args, **kwargs):
        calls.append(args)
        if len(calls) == 1:
            raise OSError(11, "Resource temporarily unavailable")
        return spawn(*args, **kwargs)

    supervisor = WorkerSupervisor(clock, load(tmp_path, "workers: 2\n"), spawn=failing)
    supervisor.startService()
    assert supervisor.pids() == {}
    clock.advance(1.0)
    assert len(calls) == 2 and supervisor.pids() == {1: 1000}


def test_stopping_terms_then_kills_and_restarts_nothing(tmp_path):
    """Stop: SIGTERM each child, SIGKILL one still there after STOP_TIMEOUT; the stop
    completes when all have exited and none is started again."""
    clock, spawn, supervisor = _supervisor(tmp_path)
    supervisor.startService()
    (first, _, _), (second, _, _) = spawn.spawned
    done = supervisor.stopService()
    assert first.transport.signals == ["TERM"] and second.transport.signals == ["TERM"]
    _exit(first, 0)
    assert not done.called
    clock.advance(STOP_TIMEOUT)
    assert second.transport.signals == ["TERM", "KILL"]
    second.processEnded(Failure(error.ProcessTerminated(signal=9)))
    assert done.called
    clock.advance(RESTART_MAX * 2)
    assert len(spawn.spawned) == 2


def test_refresh_asks_every_live_worker_and_survives_a_silent_one(tmp_path):
    """The CLI's refresh reaches each child; one that fails is logged, the rest answer."""
    asked = []

    def refresh_child(index):
        asked.append(index)
        if index == 2:
            raise RuntimeError("no answer")

    clock, spawn, supervisor = _supervisor(tmp_path, refresh_child=refresh_child)
    supervisor.startService()
    d = supervisor.refresh()
    assert asked == [1, 2]
    assert d.called and not isinstance(d.result, Failure)


def test_child_output_is_relayed_in_bounded_lines(tmp_path, monkeypatch):
    """Each line of a child's output becomes one log line; a line without end is cut."""
    lines = []
    monkeypatch.setattr(workers_mod.log, "info",
                        lambda fmt, **kw: lines.append(kw.get("line")))
    clock, spawn, supervisor = _supervisor(tmp_path, count=2)
    supervisor.startService()
    proto = spawn.spawned[0][0]
    lines.clear()
    proto.childDataReceived(1, b"serving\npart")
    proto.childDataReceived(1, b"ial\n" + b"x" * (MAX_LINE * 3))
    assert lines == ["serving", "partial"]
    proto.childDataReceived(1, b"x" * MAX_LINE)
    _exit(proto)
    assert lines[-1] == "x" * MAX_LINE


def test_a_worker_stops_when_worker_0_is_gone():
    """End of file on its stdin pipe stops a worker's reactor (worker 0 was killed)."""
    stopped = []
    fake = attrs.make_class("R", {"running": attrs.field(default=True)})()
    fake.stop = lambda: stopped.append(True)
    workers_mod._ParentWatch(fake).connectionLost(Failure(error.ConnectionDone()))
    assert stopped == [True]


def test_a_worker_already_stopping_ignores_worker_0_going():
    """The pipe closing while the worker already stops (SIGTERM) is not an error."""
    def stop():
        raise error.ReactorNotRunning()
    fake = attrs.make_class("R", {"running": attrs.field(default=True)})()
    fake.stop = stop
    workers_mod._ParentWatch(fake).connectionLost(Failure(error.ConnectionDone()))


# -- the shared listener -------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_workers_bind_one_port_together():
    """Two SharedPortEndpoints bind the same port (SO_REUSEPORT); the reactor adopts each."""
    reactor = MemoryReactor()
    port = _free_port()
    for _ in range(2):
        SharedPortEndpoint(reactor, port, "127.0.0.1").listen(object())
    assert len(reactor.adoptedPorts) == 2


def test_a_port_held_without_reuseport_is_a_listen_error():
    """A port some other socket holds (no SO_REUSEPORT) fails as CannotListenError."""
    reactor = MemoryReactor()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        d = SharedPortEndpoint(reactor, holder.getsockname()[1], "127.0.0.1").listen(object())
    failure = []
    d.addErrback(failure.append)
    assert failure and failure[0].check(error.CannotListenError)
    assert reactor.adoptedPorts == []


# -- who asks whom to refresh (ProxyService) ------------------------------------------------

def _service_double(index: int, with_children: bool):
    """Just what ProxyService's refresh routing reads: its place, supervisor and askers."""
    from types import SimpleNamespace

    from twisted.internet import defer

    calls: list[str] = []
    workers = (SimpleNamespace(refresh=lambda: calls.append("children")
                               or defer.succeed(None)) if with_children else None)
    double = SimpleNamespace(
        place=SimpleNamespace(index=index), workers=workers,
        refresh_now=lambda: calls.append("self") or defer.succeed(None),
        _refresh_worker=lambda i, wait=None: calls.append(f"worker {i}") or defer.succeed(None))
    from apptunnel.proxy.service import ProxyService

    double._refresh_all = lambda: ProxyService._refresh_all(double)
    return double, calls


@pytest.mark.parametrize("index, with_children, entry, expected", [
    (0, True, "_refresh_control", ["self", "children"]),   # the CLI: every worker
    (0, True, "_refresh_all", ["self", "children"]),       # admin API on worker 0
    (1, False, "_refresh_all", ["self", "worker 0"]),      # admin API on worker 1
    (1, False, "_refresh_control", ["self"]),              # worker 0 asking: no loop back
    (0, False, "_refresh_all", ["self"]),                  # workers: 1, as before
])
def test_refresh_reaches_every_worker_without_a_loop(index, with_children, entry, expected):
    from apptunnel.proxy.service import ProxyService

    double, calls = _service_double(index, with_children)
    d = getattr(ProxyService, entry)(double)
    assert d.called
    assert calls == expected
