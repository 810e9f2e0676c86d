"""A fake Slack Socket Mode websocket endpoint on 127.0.0.1 (aiohttp in a thread of its own, real websockets).

`FakeSlack.socket_url` (tests/fakes/slack_server.py) is what its `apps.connections.open` hands out; point it at
`FakeSocket.url`. The fake greets each connection with Slack's `hello`, records what the client sends (the acks of
envelopes, as JSON), and can be told to `push` an envelope to every connection, `drop()` them all (a close, as a
server restart does), or refuse new handshakes (`refusing = True`: HTTP 503, as a dead load balancer answers).

    with FakeSocket() as socket:
        slack.socket_url = socket.url
        ...
        socket.wait_connections(1)
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any, Self

from aiohttp import WSMsgType, web


class FakeSocket:
    def __init__(self) -> None:
        self.refusing = False
        self.connections = 0  # handshakes accepted, ever
        self.refused = 0  # handshakes refused
        self.received: list[dict[str, Any]] = []  # JSON the clients sent (acks)
        self._open: set[web.WebSocketResponse] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._port = 0
        self._lock = threading.Lock()

    # -- life cycle -------------------------------------------------------------------------------------
    def start(self) -> Self:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(ready,), name="FakeSocket", daemon=True)
        self._thread.start()
        assert ready.wait(10), "the fake Socket Mode server did not start"
        return self

    def _serve(self, ready: threading.Event) -> None:
        self._loop = loop = asyncio.new_event_loop()
        app = web.Application()
        app.router.add_get("/link", self._link)
        self._runner = web.AppRunner(app, handle_signals=False)
        loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        loop.run_until_complete(site.start())
        self._port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        ready.set()
        loop.run_forever()
        loop.run_until_complete(self._runner.cleanup())
        loop.close()

    def stop(self) -> None:
        if self._loop is None:
            return
        self._call(self._close_all)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._loop = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self._port}/link"

    # -- scripting and inspection -----------------------------------------------------------------------
    def push(self, envelope: dict[str, Any]) -> None:
        """Send an envelope (events_api, slash_commands, interactive…) to every open connection."""
        self._call(lambda: self._send_all(json.dumps(envelope)))

    def drop(self) -> None:
        """Close every open connection (the client must notice and reconnect)."""
        self._call(self._close_all)

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len([ws for ws in self._open if not ws.closed])

    def acks(self) -> list[str]:
        with self._lock:
            return [m["envelope_id"] for m in self.received if "envelope_id" in m]

    def wait_connections(self, count: int, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while self.connections < count:
            assert time.monotonic() < deadline, f"{self.connections} connection(s), expected {count}"
            time.sleep(0.02)

    # -- the server side --------------------------------------------------------------------------------
    def _call(self, make: Any) -> None:
        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(make(), self._loop).result(10)

    async def _send_all(self, text: str) -> None:
        for ws in list(self._open):
            if not ws.closed:
                await ws.send_str(text)

    async def _close_all(self) -> None:
        for ws in list(self._open):
            await ws.close()

    async def _link(self, request: web.Request) -> web.StreamResponse:
        if self.refusing:
            self.refused += 1
            return web.Response(status=503, text="upstream unavailable")
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        with self._lock:
            self.connections += 1
            self._open.add(ws)
        await ws.send_str(json.dumps({"type": "hello", "num_connections": 1,
                                      "debug_info": {"host": "fake-socket"}, "connection_info": {"app_id": "AFAKE"}}))
        try:
            async for message in ws:
                if message.type == WSMsgType.TEXT:
                    try:
                        data = json.loads(message.data)
                    except ValueError:
                        continue
                    with self._lock:
                        self.received.append(data)
        finally:
            with self._lock:
                self._open.discard(ws)
        return ws
