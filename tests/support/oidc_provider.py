"""The test suite's OpenID provider: npm ``oidc-provider`` (tests/support/oidc/op.mjs).

``make test`` installs the package into tests/support/oidc/node_modules (``npm ci``
from the committed lock file). The provider's login page checks passwords (each
account's ``password``); consent is automatic.

The provider sits behind a small forwarding server of ours (`Front`), which is the
issuer everybody sees (``http://127.0.0.1:FRONT``): it passes every request through
unchanged, except that a test may set ``front.replace_id_token`` to a function that
rewrites the id_token of the next token responses (a tampered token, one signed by
another key, ``alg: none``, a token minted for another client). The tokens stay the real
provider's in every other respect, so each test attacks exactly one check.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from tests.support.cluster import free_port, wait_until
from tests.support.system import require_program

HERE = pathlib.Path(__file__).parent / "oidc"


class Front:
    """Forwards to the provider; may rewrite the id_token of token responses."""

    def __init__(self, backend_port: int) -> None:
        self.replace_id_token = None
        front = self

        class Handler(BaseHTTPRequestHandler):
            def _forward(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("content-length", "connection")}
                session = requests.Session()      # one per request: no cookie jar shared
                session.trust_env = False
                r = session.request(self.command, f"http://127.0.0.1:{backend_port}{self.path}",
                                    data=body, headers=headers, allow_redirects=False,
                                    timeout=10)
                content = r.content
                if self.path.startswith("/token") and r.ok and front.replace_id_token:
                    answer = json.loads(content)
                    answer["id_token"] = front.replace_id_token(answer["id_token"])
                    content = json.dumps(answer).encode()
                self.send_response(r.status_code)
                for name, value in r.raw.headers.items():
                    if name.lower() not in ("content-length", "transfer-encoding",
                                            "connection", "content-encoding", "keep-alive"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(content)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(content)

            do_GET = do_POST = _forward

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class OidcProvider:
    def __init__(self, clients: list[dict], accounts: dict) -> None:
        self.port = free_port()
        self.front: Front | None = None
        self.issuer = ""
        self._config = {"clients": clients, "accounts": accounts}
        self._proc: subprocess.Popen | None = None

    def start(self) -> OidcProvider:
        node = require_program("node", "nodejs")
        if not (HERE / "node_modules" / "oidc-provider").is_dir():
            reason = "oidc-provider is not installed (`make test` runs npm ci in tests/support/oidc)"
            if os.environ.get("CI") == "true":
                pytest.fail(reason)
            pytest.skip(reason)
        self.front = Front(self.port)
        self.issuer = f"http://127.0.0.1:{self.front.port}"
        env = {**os.environ, "OP_PORT": str(self.port), "OP_ISSUER": self.issuer,
               "OP_CONFIG": json.dumps(self._config)}
        self._proc = subprocess.Popen([node, "op.mjs"], cwd=HERE, env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        session = requests.Session()
        session.trust_env = False

        def ready():
            if self._proc.poll() is not None:
                raise AssertionError("oidc-provider exited")
            try:
                return session.get(self.issuer + "/.well-known/openid-configuration",
                                   timeout=1).ok
            except requests.RequestException:
                return False
        wait_until(ready, 15, "oidc-provider")
        return self

    def stop(self) -> None:
        if self.front is not None:
            self.front.stop()
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)
