"""tests/unit runs on memory transports, a Clock and the in-memory backend: a unit test that
listens, connects, starts a thread pool or a process fails at once, naming where it belongs.

The modules about SQLite itself and the admin CLI's verbs on their real storage path may
start threads (SQLite's worker, argon2 in the CLI); nothing here may open a socket or run
a process.
"""

from __future__ import annotations

import subprocess

import pytest
from twisted.internet import reactor
from twisted.python.threadpool import ThreadPool

THREADS_ALLOWED = frozenset({
    "test_backend_sqlite", "test_backend_contract", "test_cli", "test_cli_agents",
    "test_cli_locks", "test_cli_connectors", "test_cli_bots", "test_cli_keys",
})
_SOCKETS = ("listenTCP", "connectTCP", "listenSSL", "connectSSL", "listenUNIX",
            "connectUNIX", "listenUDP", "spawnProcess")


def _refuse(what: str):
    def refused(*args, **kwargs):
        raise AssertionError(f"{what} in tests/unit: unit tests run on memory transports and "
                             "a Clock; a test that needs it belongs in tests/integration")
    return refused


@pytest.fixture(autouse=True)
def _memory_only(request, monkeypatch):
    for name in _SOCKETS:
        monkeypatch.setattr(reactor, name, _refuse(f"reactor.{name}"))
    monkeypatch.setattr(subprocess, "Popen", _refuse("a subprocess"))
    if request.module.__name__.rsplit(".", 1)[-1] not in THREADS_ALLOWED:
        monkeypatch.setattr(reactor, "getThreadPool", _refuse("a thread (deferToThread)"))
        monkeypatch.setattr(ThreadPool, "start", _refuse("a thread pool"))
