"""`apptunnel login --auth NAME` for a browser connector (OIDC, SAML): the one-shot listener.

The CLI listens on 127.0.0.1 only, on a random port, for exactly one valid callback: the
proxy sends the browser there at the end of the sign-in with a one-time code and the
random state this run made (anything else gets a 400 and the wait goes on, a bounded
number of times, until the deadline). The code alone is worth nothing: the CLI exchanges
it over the API together with a verifier only this process knows (the proxy was given
its SHA-256 when the flow started), so a code seen in a browser's history, a log or by
another local process cannot be turned into a certificate. No certificate or session
secret ever travels in a URL.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import socket
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, HTTPServer
from urllib.parse import parse_qs, quote, urlsplit

from apptunnel.cli.context import CliError

LISTEN_TIMEOUT = 300.0
MAX_REQUESTS = 32
DONE_PAGE = (b"<!doctype html><meta charset=utf-8><title>apptunnel</title>"
             b"<p>Signed in. You can close this window and return to the terminal.</p>")


def challenge_of(verifier: str) -> str:
    raw = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


class OneShotListener:
    """An HTTP listener on 127.0.0.1 waiting for ``/callback?code=...&state=STATE``."""

    def __init__(self) -> None:
        self.state = secrets.token_urlsafe(24)
        self.verifier = secrets.token_urlsafe(32)
        self.code: str | None = None
        listener = self

        class Handler(BaseHTTPRequestHandler):
            timeout = 5       # a client that sends nothing does not hold the wait

            def do_GET(self):
                parts = urlsplit(self.path)
                query = parse_qs(parts.query)
                code, state = query.get("code", [""])[0], query.get("state", [""])[0]
                if parts.path != "/callback" or not code or len(code) > 128 or \
                        not hmac.compare_digest(state.encode(), listener.state.encode()) \
                        or listener.code is not None:
                    self._answer(400, b"not a sign-in callback of this apptunnel login")
                    return
                listener.code = code
                self._answer(200, DONE_PAGE)

            def _answer(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self._server = HTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]

    def start_url(self, proxy: str, connector: str) -> str:
        return (f"https://{proxy}/web/sso/{quote(connector, safe='')}?cli_port={self.port}"
                f"&cli_state={self.state}&cli_challenge={challenge_of(self.verifier)}")

    def wait(self, timeout: float = LISTEN_TIMEOUT,
             now: Callable[[], float] = time.monotonic) -> str:
        """The one-time code of the first valid callback; CliError at the deadline."""
        deadline = now() + timeout
        try:
            for _ in range(MAX_REQUESTS):
                left = deadline - now()
                if left <= 0:
                    break
                self._server.timeout = left
                self._server.handle_request()
                if self.code is not None:
                    return self.code
        except (OSError, socket.timeout):
            pass
        finally:
            self._server.server_close()
        raise CliError(f"no sign-in came back within {int(timeout)} s; run apptunnel login "
                       "again")
