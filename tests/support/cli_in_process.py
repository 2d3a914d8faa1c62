"""The user's CLI run in-process against a web env served over real TLS.

`cli` blocks (it does its own HTTP), so tests call it through `in_thread` while the
reactor serves the web app; APPTUNNEL_HOME is the only environment it sees.
"""

from __future__ import annotations

import io

import attrs
from twisted.internet.interfaces import IListeningPort

from apptunnel.cli.context import Io
from apptunnel.cli.main import prepare
from tests.support.tls_listener import listen_tls
from tests.support.waiting import in_thread


@attrs.define
class Run:
    code: int
    out: str
    err: str


def cli(home, *argv: str, stdin: str = "") -> Run:
    """The CLI in-process, blocking (call it through in_thread while a server runs)."""
    out, err = io.StringIO(), io.StringIO()
    code = prepare(list(argv), Io(io.StringIO(stdin), out, err, {"APPTUNNEL_HOME": str(home)}))
    return Run(code, out.getvalue(), err.getvalue())


async def serve(env) -> tuple[IListeningPort, str]:
    """The web env on a TLS port: (listening port, proxy address for --proxy)."""
    port = await listen_tls(env)
    return port, f"apptunnel.localhost:{port.getHost().port}"


async def login(env, home, proxy, *extra, password="alice-pw") -> Run:
    """`apptunnel login` as alice, the password on stdin."""
    return await in_thread(cli, home, "login", "--proxy", proxy, "--user", "alice",
                           "--password-stdin", *extra, stdin=password + "\n")
