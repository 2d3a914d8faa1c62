"""A throwaway PostgreSQL 15 server for tests (TESTBED.md §1): initdb into a fresh
directory under /tmp, one postmaster on a free loopback port, a fresh database per caller,
stopped and removed at the end. Skips (fails under CI=true) when PostgreSQL is missing.

Why /tmp and not tmp_path: pytest's tmp_path is under a 0700 directory the postgres user
cannot enter, and the unix socket path must stay short. Why setpriv: it execs, so the Popen
pid is the postmaster itself and SIGINT reaches it (runuser does not pass signals on).
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import tempfile
import time

from tests.support.cluster import free_port
from tests.support.system import require_program

PGBIN = "/usr/lib/postgresql/15/bin"
READY_TIMEOUT = 15.0
STOP_TIMEOUT = 15.0
ADMIN_USER = "postgres"


class PostgresServer:
    """One running postmaster. `new_database()` gives each test its own database, owned by
    a login role with a password. TCP connections (the proxy's) must give the password
    (scram-sha-256); the superuser's psql here uses the unix socket (trust)."""

    def __init__(self) -> None:
        require_program(f"{PGBIN}/initdb", "postgresql")
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="pg-")
        self._as_pg: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
            self._as_pg = ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "--"]
        self._names = itertools.count(1)
        self.log_path = os.path.join(self.dir, "postgres.log")
        self.proc: subprocess.Popen | None = None

    def start(self) -> "PostgresServer":
        subprocess.run(self._as_pg + [f"{PGBIN}/initdb", "-D", f"{self.dir}/data", "-U", ADMIN_USER,
                                      "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-locale", "--no-sync"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60)
        return self.resume()

    def pause(self) -> None:
        """Stop the server (fast shutdown) but keep its data: `resume` starts it again."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(STOP_TIMEOUT)

    def resume(self) -> "PostgresServer":
        """Start the server on the existing data directory and wait until it is ready."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self._as_pg + [f"{PGBIN}/postgres", "-D", f"{self.dir}/data", "-p", str(self.port),
                               "-c", "listen_addresses=127.0.0.1",
                               "-c", f"unix_socket_directories={self.dir}",
                               "-c", "fsync=off", "-c", "synchronous_commit=off",
                               "-c", "full_page_writes=off"],
                stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited {self.proc.returncode}: {self.log_tail()}")
            ready = subprocess.run([f"{PGBIN}/pg_isready", "-q", "-h", "127.0.0.1", "-p", str(self.port)],
                                   timeout=5).returncode == 0
            if ready:
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"postgres not ready in {READY_TIMEOUT}s: {self.log_tail()}")
            time.sleep(0.05)

    def psql(self, *sql: str, database: str = "postgres") -> str:
        """Run statements as the superuser; returns psql's unaligned, tuples-only output."""
        args = [f"{PGBIN}/psql", "-h", self.dir, "-p", str(self.port), "-U", ADMIN_USER,
                "-d", database, "-v", "ON_ERROR_STOP=1", "-X", "-q", "-A", "-t"]
        for statement in sql:
            args += ["-c", statement]
        done = subprocess.run(args, capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            raise RuntimeError(f"psql failed: {done.stderr.strip()}")
        return done.stdout

    def new_database(self, password: str = "secret") -> dict[str, str]:
        """A fresh database and its owner role: {"dbname", "user", "password", "dsn"}.
        The dsn carries no password (tests pass it separately, as password_file does)."""
        n = next(self._names)
        name, role = f"db{n}", f"app{n}"
        self.psql(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'",
                  f"CREATE DATABASE {name} OWNER {role}")
        dsn = f"host=127.0.0.1 port={self.port} dbname={name} user={role}"
        return {"dbname": name, "user": role, "password": password, "dsn": dsn}

    def log_tail(self, n: int = 20) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        """Fast shutdown (SIGINT), SIGKILL if it overstays; then remove the directory."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT)
        shutil.rmtree(self.dir, ignore_errors=True)
