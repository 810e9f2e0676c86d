"""The plumbing every fake HTTP server of the tests shares: a threaded server on 127.0.0.1 that stays quiet
about clients going away, and a handler that reads the request body and hands it to `_handle`."""

from __future__ import annotations

import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the default listen backlog (5) refuses bursts of concurrent clients
    fake: Any  # the fake this server answers for

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Stay quiet when a client (e.g. one that timed out) has gone away."""
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)


class BodyHandler(BaseHTTPRequestHandler):
    """GET and POST both end in `_handle(raw_body)`."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        """Silence the default per-request stderr logging."""

    def do_GET(self) -> None:
        self._handle(b"")

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self._handle(self.rfile.read(length) if length else b"")

    def _handle(self, raw: bytes) -> None:
        raise NotImplementedError
