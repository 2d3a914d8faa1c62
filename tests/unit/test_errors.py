"""One error root: every room's family derives from ApptunnelError, so the CLI (and the
twistd start-up) catch one type and print one line with the right exit status."""

import io

import pytest

from apptunnel.agent.errors import AgentError
from apptunnel.agent.join import JoinError
from apptunnel.auth.errors import AuthError
from apptunnel.auth.jwt import JwtKeyError
from apptunnel.auth.rbac import RoleError
from apptunnel.backend.base import AlreadyExists, BackendError
from apptunnel.cli.context import CliError, Io, UsageError
from apptunnel.cli.main import report
from apptunnel.config import ConfigError
from apptunnel.errors import ApptunnelError
from apptunnel.proxy.errors import ProxyError
from apptunnel.proxy.http1 import HttpError


def _io():
    return Io(io.StringIO(), io.StringIO(), io.StringIO(), {})


@pytest.mark.parametrize("err, line, status", [
    (CliError("no such user"), "no such user", 1),
    (UsageError("bad --ttl"), "bad --ttl", 2),
    (ConfigError("/etc/p.yaml", "expected a number", key="jwt_ttl"),
     "/etc/p.yaml: jwt_ttl: expected a number", 2),
    (RoleError("spec.allow: unknown key"), "spec.allow: unknown key", 2),
    (AuthError(403, "your access is locked:\nnow"), "your access is locked: now", 1),
    (BackendError("database is locked"), "database is locked", 1),
    (AlreadyExists("user bob exists"), "user bob exists", 1),
    (JoinError("the proxy refused the join"), "the proxy refused the join", 1),
    (JwtKeyError("key does not fit algorithm ES256"), "key does not fit algorithm ES256", 1),
    (HttpError(400, "bad request line"), "400 bad request line", 1),
])
def test_every_family_is_one_line_with_its_status(err, line, status):
    """report() prints each family's one line and returns its exit status."""
    assert isinstance(err, ApptunnelError)
    out = _io()
    assert report(out, err) == status
    assert out.stderr.getvalue() == f"apptunnel: error: {line}\n"


def test_room_roots_derive_from_the_one_root():
    """The rooms' roots: auth, backend, config, cli, proxy, agent."""
    for root in (AuthError, BackendError, ConfigError, CliError, ProxyError, AgentError):
        assert issubclass(root, ApptunnelError)
    assert issubclass(RoleError, AuthError) and issubclass(JoinError, AgentError)
    assert issubclass(JwtKeyError, ValueError)   # start-up code that catches ValueError still does


def test_anything_else_is_an_internal_error_line():
    """A bug still ends as one line, never a traceback."""
    out = _io()
    assert report(out, KeyError("x")) == 1
    assert out.stderr.getvalue() == "apptunnel: error: internal error: KeyError: 'x'\n"
