"""How the agent ends its connection to an app: a FIN when the client left cleanly.

A real proxy and agent (installed commands) in front of a raw-socket HTTP/1.1 app that
answers keep-alive requests and then records how the agent's side ended: ``recv`` returning
``b""`` is a FIN, ``ECONNRESET`` a reset (what the app logs as "Connection reset by peer").
"""

from __future__ import annotations

import http.client
import socket
import ssl
import threading

import pytest

from tests.support.cli_user import ca_pin, log_in, online_apps, start
from tests.support.cluster import Cluster, free_port, wait_until
from tests.support.localhost import localhost_resolution

PASSWORD = "correct horse battery staple"
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"


class KeepAliveApp:
    """Answers every request on a connection with ``ok`` and records each connection's end."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.endings: list[str] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        buf = b""
        ending = "timeout"
        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    ending = "fin"
                    break
                buf += data
                while b"\r\n\r\n" in buf:
                    _, buf = buf.split(b"\r\n\r\n", 1)
                    conn.sendall(RESPONSE)
        except ConnectionResetError:
            ending = "reset"
        except OSError as err:
            ending = f"error {err}"
        finally:
            conn.close()
            with self._lock:
                self.endings.append(ending)

    def stop(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def app():
    a = KeepAliveApp()
    yield a
    a.stop()


@pytest.fixture(scope="module")
def cluster(app):
    c = Cluster([{"name": "keep", "uri": f"http://127.0.0.1:{app.port}", "labels": {"env": "dev"}},
                 {"name": "keeptcp", "uri": f"tcp://127.0.0.1:{app.port}", "labels": {"env": "dev"}}])
    try:
        c.start_proxy()
        c.add_role({"kind": "role", "metadata": {"name": "dev"},
                    "spec": {"allow": {"app_labels": {"env": "dev"}}}})
        c.add_user("alice", ["dev"], PASSWORD)
        c.start_agent()
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def home(cluster, tmp_path_factory):
    """alice logged in, once both apps are online."""
    h = tmp_path_factory.mktemp("alice") / ".apptunnel"
    log_in(cluster, "alice", h, PASSWORD, ca_pin(cluster))
    wait_until(lambda: online_apps(h) == {"keep", "keeptcp"}, 30, "both apps to be online")
    return h


def _requests_then_leave(conn: http.client.HTTPConnection, count: int = 2) -> None:
    """`count` keep-alive requests on one connection, then a clean close by the client."""
    try:
        for _ in range(count):
            conn.request("GET", "/")
            response = conn.getresponse()
            assert response.status == 200 and response.read() == b"ok"
    finally:
        conn.close()


def _ending_after(app: KeepAliveApp, leave) -> str:
    """Run `leave` (requests, then the client goes away) and say how the app's side ended."""
    before = len(app.endings)
    leave()
    wait_until(lambda: len(app.endings) > before, 15, "the app's connection to end")
    return app.endings[before]


@pytest.mark.parametrize("name", ["keep", "keeptcp"])
def test_client_leaving_proxy_app_ends_the_app_connection_with_a_fin(cluster, home, app, name):
    """A keep-alive client of `proxy app` that leaves cleanly: the app sees a FIN, not a reset."""
    local = free_port()
    proxy = start(home, name, str(local))
    try:
        ending = _ending_after(app, lambda: _requests_then_leave(
            http.client.HTTPConnection("127.0.0.1", local, timeout=20)))
    finally:
        proxy.stop()
    assert ending == "fin"


def test_browser_leaving_ends_the_app_connection_with_a_fin(cluster, home, app):
    """A client on the app's own subdomain (certificate login, as `apps config` prints) that
    leaves between requests: the app sees a FIN, not a reset."""
    context = ssl.create_default_context(cafile=str(home / "ca.crt"))
    context.load_cert_chain(str(home / "user.crt"), str(home / "user.key"))
    host = "keep.apptunnel.localhost"
    with localhost_resolution():
        ending = _ending_after(app, lambda: _requests_then_leave(http.client.HTTPSConnection(
            host, cluster.web_port, context=context, timeout=20)))
    assert ending == "fin"
