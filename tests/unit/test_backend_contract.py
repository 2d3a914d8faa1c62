"""The storage contract (tests/support/backend_contract.py) against the in-memory backend
and SQLite on a file in tmp_path, plus what only these two have.

SQLite-only behaviour (schema migrations, file modes, two backends on one file) is in
test_backend_sqlite.py; PostgreSQL runs the same contract in
tests/integration/test_backend_postgres.py.
"""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from apptunnel.backend import open_backend
from apptunnel.backend.base import Backend, BackendError
from apptunnel.backend.memory import MemoryBackend
from apptunnel.backend.postgres import PostgresBackend
from apptunnel.backend.sqlite import SqliteBackend
from apptunnel.config import ConfigError, load_proxy_config
from tests.support.backend_contract import *  # noqa: F401,F403 - the contract tests
from tests.support.backend_contract import user
from tests.support.waiting import wait


@pytest.fixture(params=["sqlite", "memory"])
def kind(request):
    return request.param


@pytest_twisted.async_yield_fixture
async def backend(kind, tmp_path):
    b = (SqliteBackend(str(tmp_path / "data" / "apptunnel.db"), reactor) if kind == "sqlite"
         else MemoryBackend())
    yield b
    await wait(b.close())


def test_memory_backend_calls_finish_at_once():
    """The memory backend's coroutines complete without the reactor running: a Deferred
    made from one has its result when it is made (what Clock-driven tests rely on)."""
    b = MemoryBackend()
    d = defer.ensureDeferred(b.create_user(user()))
    assert d.called
    got = defer.ensureDeferred(b.get_user("alice"))
    assert got.result == user()


def test_memory_is_not_a_proxy_yaml_backend(tmp_path):
    """The memory backend loses users, tokens and audit on restart and the CLI cannot reach
    it, so proxy.yaml refuses it (an option we parse is an option we enforce)."""
    path = tmp_path / "proxy.yaml"
    path.write_text("cluster_name: t\ndata_dir: data\npublic_addr: apptunnel.localhost:3080\n"
                    "web_listen_addr: 127.0.0.1:3080\ntunnel_listen_addr: 127.0.0.1:3024\n"
                    "backend: {type: memory}\n")
    with pytest.raises(ConfigError, match="backend.type.*expected one of sqlite"):
        load_proxy_config(str(path))
    with pytest.raises(BackendError, match="memory"):
        open_backend(SimpleNamespace(backend_type="memory", backend_path=""), reactor)


@pytest.mark.parametrize("implementation", [SqliteBackend, MemoryBackend, PostgresBackend])
def test_every_protocol_method_is_a_coroutine_taking_the_same_arguments(implementation):
    """Each Backend method exists as a coroutine accepting the protocol's parameters (same
    names, kinds and defaults; an implementation may only add keyword-only ones)."""
    methods = [n for n, f in vars(Backend).items()
               if inspect.iscoroutinefunction(f) and not n.startswith("_")]
    assert len(methods) >= 35
    for name in methods:
        mine = getattr(implementation, name)
        assert inspect.iscoroutinefunction(mine), name
        wanted = inspect.signature(getattr(Backend, name)).parameters
        have = inspect.signature(mine).parameters
        for param in wanted.values():
            assert param.name in have, (name, param.name)
            got = have[param.name]
            assert (got.kind, got.default) == (param.kind, param.default), (name, param.name)
        extra = [p for p in have.values() if p.name not in wanted]
        assert all(p.kind == p.KEYWORD_ONLY and p.default is not p.empty for p in extra), name
