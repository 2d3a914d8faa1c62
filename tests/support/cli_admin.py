"""The admin `apptunnel` CLI run in-process on the test reactor against a proxy config,
plus a direct look at the backend it wrote to.

`config_path` is that proxy config (SQLite and an audit file under the test's tmp_path),
shared by the in-process tests and the real-process ones in tests/integration/test_cli.py;
import it by name.
"""

from __future__ import annotations

import io
import os
import pwd
from pathlib import Path

import attrs
import pytest
from twisted.internet import defer, reactor

from apptunnel.backend import open_backend
from apptunnel.cli.context import Io
from apptunnel.cli.main import run
from apptunnel.config import load_proxy_config

TIMEOUT = 30
# The audit actor of admin verbs: the real account, whatever $USER says ("tester" below).
ACCOUNT = pwd.getpwuid(os.getuid()).pw_name


@attrs.frozen
class Result:
    code: int
    out: str
    err: str


async def cli(config: str, *argv: str, stdin: str = "") -> Result:
    """Run the CLI in-process on the test reactor; every output is checked for tracebacks."""
    out, err = io.StringIO(), io.StringIO()
    streams = Io(stdin=io.StringIO(stdin), stdout=out, stderr=err, environ={"USER": "tester"})
    d = defer.ensureDeferred(run(reactor, ["--config", config, *argv], streams))
    code = await d.addTimeout(TIMEOUT, reactor)
    result = Result(code, out.getvalue(), err.getvalue())
    assert "Traceback" not in result.out + result.err
    for line in result.err.splitlines():
        assert line.startswith(("apptunnel: error: ", "apptunnel: warning: ")), line
    return result


async def stored(config: str, fn):
    """Look at the backend directly, the way the proxy would see it."""
    backend = open_backend(load_proxy_config(config), reactor)
    try:
        return await defer.ensureDeferred(fn(backend)).addTimeout(TIMEOUT, reactor)
    finally:
        await defer.ensureDeferred(backend.close()).addTimeout(TIMEOUT, reactor)


def one_error(result: Result, code: int) -> str:
    """The one `apptunnel: error:` line of a run that exited with `code`."""
    assert result.code == code, result
    lines = result.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("apptunnel: error: "), result.err
    return lines[0]


REPO = Path(__file__).resolve().parents[2]   # the checkout: etc/ examples, cwd of a real run


@pytest.fixture
def config_path(tmp_path) -> str:
    """proxy.yaml for the admin verbs: data (SQLite) and audit.jsonl under tmp_path."""
    path = tmp_path / "proxy.yaml"
    path.write_text(
        "cluster_name: test-cluster\n"
        "data_dir: data\n"
        "public_addr: apptunnel.localhost:3080\n"
        "web_listen_addr: 127.0.0.1:0\n"
        "diag_addr: 127.0.0.1:0\n"
        "tunnel_listen_addr: 127.0.0.1:3024\n"
        "audit: {file: audit.jsonl}\n"
    )
    return str(path)
