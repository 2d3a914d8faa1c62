"""`make demo` as a newcomer meets it: every `$ ` line of its banner and every demo line of
README.rst works when pasted, and every way of stopping the demo stops all of it.

The demo runs from the installed package under a small Makefile with the same recipe as
the real one (the real `demo` target also reinstalls the package, which a test must not
do), in a temp dir, on free ports. Commands run through `bash -c` exactly as printed,
each bounded in time; `# keeps running` commands are started in the background and
stopped by the PID we hold.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.support.cluster import free_port, wait_until
from tests.support.system import require_program

REPO = Path(__file__).resolve().parents[2]
VENV = Path(sys.executable).parent.parent
START_TIMEOUT = 120
STOP_TIMEOUT = 40     # the demo stops three children, each within 10 s
COMMAND_TIMEOUT = 60


class Demo:
    """`make demo` (or the demo alone) in its own session; the banner read from a pipe."""

    def __init__(self, root: Path, via_make: bool = True) -> None:
        self.root = root
        self.via_make = via_make
        self.ports = {name: free_port() for name in ("web", "tunnel", "app", "http", "tcp")}
        recipe = [sys.executable, "-m", "apptunnel.demo", "--dir", str(root / "demo-data"),
                  "--port", str(self.ports["web"]), "--tunnel-port", str(self.ports["tunnel"]),
                  "--app-port", str(self.ports["app"]),
                  "--proxy-app-port", str(self.ports["http"]),
                  "--tcp-app-port", str(self.ports["tcp"])]
        if via_make:
            (root / "Makefile").write_text("demo:\n\t" + shlex.join(recipe) + "\n")
            argv = [require_program("make", "make"), "demo"]
        else:
            argv = recipe
        # cwd: a temp dir, so the installed package is imported, as `make demo` users get it
        self.proc = subprocess.Popen(argv, cwd=root, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        self.lines: list[str] = []
        self.banner_done = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self.banner_done.wait(START_TIMEOUT):
            self.kill()
            raise AssertionError("the demo printed no banner:\n" + "\n".join(self.lines[-40:]))
        self.demo_pid = self._demo_pid()
        self.children = descendants(self.proc.pid)

    def _read(self) -> None:
        """Read until the banner's last line, then close the pipe: like a terminal that is
        gone, so a demo that stops by printing would fail (BrokenPipeError)."""
        stream = self.proc.stdout
        for raw in stream:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.lines.append(line)
            if line.startswith("demo: error:"):
                break
            if "Press Ctrl-C to stop." in line:
                self.lines.append(stream.readline().decode("utf-8", "replace").rstrip("\n"))
                break
        stream.close()
        self.banner_done.set()

    def _demo_pid(self) -> int:
        for pid in [self.proc.pid, *descendants(self.proc.pid)]:
            if b"apptunnel.demo" in cmdline(pid):
                return pid
        raise AssertionError("no apptunnel.demo process")

    def commands(self) -> list[str]:
        return [line.strip()[2:] for line in self.lines if line.strip().startswith("$ ")]

    def kill(self) -> None:
        with_group(self.proc.pid, signal.SIGKILL)
        for pid in descendants(self.proc.pid):
            with_pid(pid, signal.SIGKILL)


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def descendants(root: int) -> list[int]:
    """Every process below `root`, from /proc (children of children included)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def running(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def with_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def with_pid(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def assert_all_stopped(demo: Demo) -> None:
    """Within STOP_TIMEOUT no process the demo started is running; else kill them and fail."""
    watched = [demo.proc.pid, *demo.children]
    try:
        wait_until(lambda: not any(running(pid) for pid in watched), STOP_TIMEOUT,
                   "the demo and all its children to stop")
    except AssertionError:
        left = {pid: cmdline(pid).replace(b"\0", b" ")[:100] for pid in watched if running(pid)}
        demo.kill()
        for pid in left:
            with_pid(pid, signal.SIGKILL)
        raise AssertionError(f"still running after the stop: {left}") from None
    demo.proc.wait(5)
    # proxy, agent, sample app (and the demo itself under make)
    assert len(demo.children) >= (4 if demo.via_make else 3), demo.children


def shell(line: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", line], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=COMMAND_TIMEOUT, stdin=subprocess.DEVNULL)


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def run_pasted(lines: list[str], env: dict, cwd: Path) -> dict[str, str]:
    """Run each line as pasted; a `# keeps running` one in the background until the end.
    Returns each line's stdout; any failure fails the test naming the line."""
    outputs, background = {}, []
    try:
        for line in lines:
            if "# keeps running" in line:
                command = line.split("#", 1)[0].strip()
                port = int(re.search(r"--port (\d+)", command).group(1))
                child = subprocess.Popen(["bash", "-c", "exec " + command], env=env, cwd=cwd,
                                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
                background.append(child)
                wait_until(lambda: child.poll() is None and port_open(port), 30,
                           f"`{command}` to listen")
                continue
            result = shell(line, env, cwd)
            assert result.returncode == 0, (line, result.stdout, result.stderr)
            assert "Traceback" not in result.stdout + result.stderr, (line, result.stderr)
            outputs[line] = result.stdout
    finally:
        for child in background:
            with_group(child.pid, signal.SIGTERM)
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                with_group(child.pid, signal.SIGKILL)
                child.wait(5)
    return outputs


def readme_demo_lines(ports: dict[str, int]) -> list[str]:
    """The commands of README.rst's demo block, on the test's ports."""
    text = (REPO / "README.rst").read_text()
    body = text.split(".. demo-commands", 1)[1].split("::\n\n", 1)[1]
    lines = []
    for line in body.splitlines():
        if not line.startswith("    "):
            break
        lines.append(line.strip())
    assert len(lines) >= 8, lines
    swap = {"3080": ports["web"], "8082": ports["http"], "15432": ports["tcp"]}
    return [re.sub(r"\b(3080|8082|15432)\b", lambda m: str(swap[m.group(1)]), line)
            for line in lines]


def whoami(output: str) -> dict:
    return json.loads(output)["identity"]


def test_banner_and_readme_lines_work_then_sigterm_to_makes_group_stops_all(tmp_path):
    """Every `$ ` line of the banner and README's demo block works as pasted; then SIGTERM
    to make's process group (with make's pipe gone) stops the demo and all its children."""
    require_program("curl", "curl")
    demo = Demo(tmp_path)
    try:
        banner = "\n".join(demo.lines)
        pin = (tmp_path / "demo-data" / "ca-pin").read_text()
        assert re.fullmatch(r"sha256:[0-9a-f]{64}", pin)
        assert f"CA pin      {pin}" in banner
        assert f"{VENV}/bin" in banner and "--config" in banner
        commands = demo.commands()
        assert any(" login " in c and "--ca-pin " + pin in c for c in commands), commands

        env = {**os.environ, "APPTUNNEL_HOME": str(tmp_path / "home")}
        env.pop("APPTUNNEL_CONFIG", None)
        outputs = run_pasted(commands, env, tmp_path)
        listed = next(out for line, out in outputs.items() if line.endswith("apps ls"))
        assert "hello " in listed and "hello-tcp" in listed
        curl_line = next(out for line, out in outputs.items() if line.endswith("apps config hello"))
        assert whoami(shell(curl_line.strip() + "api/whoami", env, tmp_path).stdout)["username"] \
            == "demo"
        answers = [out for line, out in outputs.items()
                   if line.startswith("curl") and "/api/whoami" in line]
        identities = [whoami(out) for out in answers]
        assert len(identities) == 3, answers
        # proxy app hello and the browser-style curl reach the app as demo, JWT verified;
        # the TCP app relays bytes to the same app, which then sees no identity
        assert sum(1 for i in identities if i.get("username") == "demo" and i.get("verified")) == 2
        users = next(out for line, out in outputs.items() if line.endswith("users ls"))
        assert "demo" in users

        (tmp_path / ".venv").symlink_to(VENV)   # README's paths, from the checkout's root
        readme = run_pasted(readme_demo_lines(demo.ports), env, tmp_path)
        assert any("hello-tcp" in out for out in readme.values()), readme
        assert sum(1 for line, out in readme.items() if "api/whoami" in line and
                   whoami(out).get("username") == "demo") >= 2, readme
    except AssertionError as failure:
        alive = {pid: cmdline(pid).replace(b"\0", b" ")[:80] for pid in demo.children}
        logs = "\n".join(f"--- {log.name} (end)\n" + "\n".join(
            log.read_text(errors="replace").splitlines()[-15:])
            for log in sorted((tmp_path / "demo-data").glob("*.log")))
        demo.kill()
        raise AssertionError(f"{failure}\nchildren still there: {alive}\n{logs}") from None
    except BaseException:
        demo.kill()
        raise
    assert demo.proc.stdout.closed   # as when make's terminal or pipe is gone
    with_group(demo.proc.pid, signal.SIGTERM)
    assert_all_stopped(demo)


@pytest.mark.parametrize("how", ["ctrl-c to make's group", "sigterm to the demo"])
def test_every_way_of_stopping_the_demo_stops_all_of_it(tmp_path, how):
    """Ctrl-C (SIGINT to the group) and SIGTERM to the demo process alone: nothing survives."""
    demo = Demo(tmp_path, via_make=how.endswith("group"))
    if how.startswith("ctrl-c"):
        with_group(demo.proc.pid, signal.SIGINT)
    else:
        with_pid(demo.demo_pid, signal.SIGTERM)
    assert_all_stopped(demo)


def test_a_reader_that_stops_after_the_banner_does_not_stop_the_demo(tmp_path):
    """The banner (larger than a pipe write) to a reader that went away is a BrokenPipe the
    demo survives, at exit too (the banner printed outside `_say` stopped everything in one
    run out of four; every print of the demo now goes through it)."""
    code = ("import sys; from apptunnel.demo import _say; _say('x' * 200000); _say('more'); "
            "print('still here', file=sys.stderr)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    proc.stdout.read(10)
    proc.stdout.close()   # the reader is gone with most of the banner unread
    _, err = proc.communicate(timeout=COMMAND_TIMEOUT)
    assert proc.returncode == 0 and b"still here" in err, err
    assert b"Traceback" not in err and b"BrokenPipe" not in err, err   # not even at exit
