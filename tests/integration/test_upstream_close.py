"""How the agent ends its connection to an app: a FIN when the client left cleanly.

A real proxy and agent (installed commands) in front of a raw-socket HTTP/1.1 app that
answers keep-alive requests and then records how the agent's side ended: ``recv`` returning
``b""`` is a FIN, ``ECONNRESET`` a reset (what the app logs as "Connection reset by peer").
"""

from __future__ import annotations

import http.client
import socket
import threading

import pytest

from tests.support.cli_user import ca_pin, log_in, start
from tests.support.cluster import Cluster, free_port, wait_until

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
    h = tmp_path_factory.mktemp("alice") / ".apptunnel"
    log_in(cluster, "alice", h, PASSWORD, ca_pin(cluster))
    return h


def _requests_then_leave(port: int, count: int = 2) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        for _ in range(count):
            conn.request("GET", "/")
            response = conn.getresponse()
            assert response.status == 200 and response.read() == b"ok"
    finally:
        conn.close()


@pytest.mark.parametrize("name", ["keep", "keeptcp"])
def test_client_leaving_ends_the_app_connection_with_a_fin(cluster, home, app, name):
    """A keep-alive client that leaves cleanly: the app sees a FIN, not a reset."""
    local = free_port()
    def online():
        proxy = start(home, name, str(local))
        return proxy
    proxy = wait_until(online, 30, "proxy app to start")
    try:
        before = len(app.endings)
        wait_until(lambda: _try(local), 30, "a first request through the tunnel")
        wait_until(lambda: len(app.endings) > before, 15, "the app's connection to end")
        before = len(app.endings)
        _requests_then_leave(local)
        wait_until(lambda: len(app.endings) > before, 15, "the app's connection to end")
        assert app.endings[before:] == ["fin"], app.endings
    finally:
        proxy.stop()


def _try(port: int) -> bool:
    try:
        _requests_then_leave(port, 1)
        return True
    except (OSError, AssertionError, http.client.HTTPException):
        return False
