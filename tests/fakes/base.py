"""The plumbing every fake HTTP service of the tests shares: a threaded server on 127.0.0.1 that stays quiet
about clients going away, a handler that reads the request body and hands it to `_handle`, and the life cycle
(start, stop, context manager) of the fake that owns them."""

from __future__ import annotations

import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self


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


class FakeService:
    """A fake service on 127.0.0.1 (an ephemeral port), served by a daemon thread; a context manager.
    Subclasses set `handler` and keep their state; handlers reach it as `self.server.fake`."""

    handler: type[BodyHandler]
    _server: QuietServer | None = None
    _thread: threading.Thread | None = None

    def start(self) -> Self:
        if self._server is None:
            server = QuietServer(("127.0.0.1", 0), self.handler)
            server.fake = self
            self._server = server
            self._thread = threading.Thread(target=server.serve_forever, args=(0.05,), name=type(self).__name__,
                                            daemon=True)
            self._thread.start()
        return self

    def _release_waiters(self) -> None:
        """Hook: wake handlers that are waiting (long polls, scripted delays) so that stop() is quick."""

    def stop(self) -> None:
        if self._server is None:
            return
        self._release_waiters()
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def origin(self) -> str:
        """http://127.0.0.1:PORT of the running fake."""
        assert self._server is not None, f"{type(self).__name__} is not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}"
