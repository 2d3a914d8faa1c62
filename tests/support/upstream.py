"""Real upstream apps for end-to-end tests: a threaded HTTP/1.1 server and a WebSocket echo.

They run in threads of the test process (the proxy and agent are separate processes), so
plain blocking servers are fine here.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

CHUNK = 64 * 1024


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep test output quiet
        pass

    def _send(self, status: int, body: bytes, content_type: str = "application/json", extra=()):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in extra:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_POST(self):
        length = int(self.headers.get("Content-Length", "0"))
        received = 0
        while received < length:
            chunk = self.rfile.read(min(CHUNK, length - received))
            if not chunk:
                break
            received += len(chunk)
        self._send(200, json.dumps({"received": received}).encode())

    def do_GET(self):
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        if url.path == "/big":
            size = int(query.get("mb", ["1"])[0]) * 1024 * 1024
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size))
            self.end_headers()
            block = b"x" * CHUNK
            for _ in range(size // CHUNK):
                self.wfile.write(block)
            return
        if url.path == "/chunked":
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (b"one ", b"two ", b"three"):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
            return
        if url.path == "/sse":
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            for n in range(3):
                self.wfile.write(b"data: tick %d\n\n" % n)
                self.wfile.flush()
                time.sleep(0.5)
            self.close_connection = True
            return
        if url.path == "/endless":
            # A response the test never reads: bounded so the thread ends by itself.
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            deadline = time.monotonic() + 30
            try:
                while time.monotonic() < deadline:
                    self.wfile.write(b"y" * CHUNK)
            except OSError:
                pass
            self.close_connection = True
            return
        if url.path == "/redirect":
            host, port = self.server.server_address[:2]
            self._send(302, b"", "text/plain", [("Location", f"http://{host}:{port}/echo?from=redirect")])
            return
        headers = [[name, value] for name, value in self.headers.items()]
        self._send(200, json.dumps({"path": self.path, "headers": headers}).encode())


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        """Clients that hang up mid-response (tests that stop reading) are not errors."""
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class HttpUpstream:
    """An HTTP/1.1 app on 127.0.0.1:<free port> that echoes what it received."""

    def __init__(self):
        self.server = _Server(("127.0.0.1", 0), _Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


class WebSocketEcho:
    """A real WebSocket server (the `websockets` library) echoing every message."""

    def __init__(self):
        from websockets.sync.server import serve

        def echo(conn):
            for message in conn:
                conn.send(message)

        self.server = serve(echo, "127.0.0.1", 0)
        self.port = self.server.socket.getsockname()[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.shutdown()
