"""tests/unit/conftest.py keeps unit tests on memory transports: sockets, processes and
(outside the SQLite and CLI storage modules) threads are refused with a pointer to
tests/integration."""

from __future__ import annotations

import subprocess
import sys

import pytest
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.threads import deferToThread

from apptunnel.backend.sqlite import SqliteBackend


def test_sockets_processes_and_threads_are_refused(tmp_path):
    """Listening, connecting, a subprocess, deferToThread and SQLite's worker all fail."""
    for attempt in (
        lambda: reactor.listenTCP(0, Factory()),
        lambda: reactor.connectTCP("127.0.0.1", 9, Factory()),
        lambda: subprocess.run([sys.executable, "-c", "pass"]),
        lambda: deferToThread(lambda: None),
        lambda: SqliteBackend(str(tmp_path / "x.db"), reactor),
    ):
        with pytest.raises(AssertionError, match="belongs in tests/integration"):
            attempt()
    failures = []
    TCP4ServerEndpoint(reactor, 0).listen(Factory()).addErrback(failures.append)
    assert "belongs in tests/integration" in str(failures[0].value)
