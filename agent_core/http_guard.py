"""What every HTTP request to `autocode serve` passes first: a cap on its body, a deadline for reading it, and a
JSON sentence for every API error.

Why one ASGI wrapper around the whole app, not checks in the routes: a route (slack_bolt's handler, python-telegram-
bot's update parsing, `request.json()`) reads the body whole before it can look at it, so an unsigned 600 MB POST
to /slack/events used to sit in serve's memory before its signature was checked. Here the declared length is
refused before anything is read (413), a body sent without one (chunked) is counted as it arrives and cut off at
the cap, and one that trickles in is cut off at its deadline (408): no request holds memory or a connection for
long, whoever sends it. What the app would have answered meanwhile is replaced by that answer.

The caps: 1 MB for the chat platforms' webhooks (a Slack event or a Telegram update is a few KB), 1 MB for the
JSON API, and AUTOCODE_INPUT_MAX_FILES files of AUTOCODE_INPUT_MAX_MB for a multipart submission (its own parser
stops a file at its limit, agent_core/server.py). The deadline is AUTOCODE_BODY_TIMEOUT seconds plus the time the
body's size takes at MIN_RATE, and no more than AUTOCODE_BODY_TIMEOUT between two of its chunks.

An error the app did not answer itself (a bug, a full disk) is one log line here, and the client gets a JSON
sentence from `error_response` (installed as the app's 500 handler): never a traceback, never plain text.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from agent_core.config import Settings
from agent_core.disk import disk_full

log = logging.getLogger(__name__)

WEBHOOK_MAX_BYTES = 1 << 20  # a Slack event or a Telegram update: a few KB
JSON_MAX_BYTES = 1 << 20  # a task is text; a file goes as multipart
MIN_RATE = 64 * 1024  # bytes a second a client sends at the least: a 1 MB body gets 16 s on top of the timeout
_BODILESS = ("GET", "HEAD", "OPTIONS", "DELETE")


class BodyRefused(Exception):
    """The body went over its cap or its deadline while being read; `status` and `message` are the answer."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def json_error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class BodyGuard:
    """The ASGI wrapper (see the module docstring). `app` is the Starlette app."""

    def __init__(self, app: Any, settings: Settings):
        self.app = app
        self.settings = settings
        self.timeout = settings.body_timeout

    def cap(self, scope: dict) -> tuple[int, str]:
        """The most a request's body may be, and what the refusal says."""
        path: str = scope.get("path", "")
        if path.startswith(("/slack/", "/telegram/")):
            return WEBHOOK_MAX_BYTES, "a chat platform's event is never over 1 MB"
        content_type = _header(scope, b"content-type")
        if path == "/api/runs" and content_type.startswith("multipart/form-data"):
            s = self.settings
            return (s.input_max_files * s.input_max_mb * 1024 * 1024 + (1 << 20),
                    f"the request is over {s.input_max_files} files of {s.input_max_mb} MB "
                    "(AUTOCODE_INPUT_MAX_FILES, AUTOCODE_INPUT_MAX_MB); nothing was run")
        return JSON_MAX_BYTES, "a JSON request is never over 1 MB (send files as multipart/form-data)"

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False
        replaced = False  # the app's own answer is dropped: the guard's is sent instead
        reader: _Reader | None = None
        if scope["method"] not in _BODILESS:
            limit, why = self.cap(scope)
            declared = _header(scope, b"content-length")
            if declared.isdigit() and int(declared) > limit:
                log.warning("%s %s: refused a body of %s bytes", scope["method"], scope.get("path"), declared)
                return await self._answer(send, 413, f"The request body is {int(declared) / 1048576:.1f} MB: "
                                                     f"too large ({why}).")
            size = int(declared) if declared.isdigit() else limit
            reader = _Reader(receive, limit, why, self.timeout, self.timeout + size / MIN_RATE)

        async def guarded_send(message: dict) -> None:
            nonlocal started, replaced
            if replaced:
                return
            if message["type"] == "http.response.start":
                if reader is not None and reader.refused is not None:  # whatever a route made of the refusal
                    replaced = True
                    await self._answer(send, reader.refused.status, reader.refused.message)
                    return
                started = True
            await send(message)

        try:
            await self.app(scope, reader or receive, guarded_send)
        except Exception as exc:
            refused = _refusal(exc) or (reader.refused if reader is not None else None)
            if refused is not None:
                log.warning("%s %s: %s", scope["method"], scope.get("path"), refused.message)
            elif disk_full(exc):  # the 500 handler answered (error_response); one line for the operator
                log.error("%s %s: the server's disk is full (%s)", scope["method"], scope.get("path"), exc)
            else:
                log.exception("%s %s failed", scope["method"], scope.get("path"))
            if not started and not replaced:
                if refused is not None:
                    await self._answer(send, refused.status, refused.message)
                else:
                    await self._answer(send, 500, "AutoCode failed to answer this request; the operator can find "
                                                  "why in the server log.")
        else:
            if reader is not None and reader.refused is not None:
                log.warning("%s %s: %s", scope["method"], scope.get("path"), reader.refused.message)

    @staticmethod
    async def _answer(send: Any, status: int, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


class _Reader:
    """`receive` counting the body's bytes against the cap and the deadlines."""

    def __init__(self, receive: Any, limit: int, why: str, idle: float, total: float):
        self.receive = receive
        self.limit = limit
        self.why = why
        self.idle = idle
        self.deadline = time.monotonic() + total
        self.seen = 0
        self.done = False
        self.refused: BodyRefused | None = None

    async def __call__(self) -> dict:
        if self.refused is not None:  # asked again after the refusal: the body is not read any further
            raise self.refused
        if self.done:  # the body is read: what follows is the disconnect, however long it takes
            return await self.receive()
        wait = min(self.idle, self.deadline - time.monotonic())
        try:
            if wait <= 0:
                raise asyncio.TimeoutError
            message = await asyncio.wait_for(self.receive(), wait)
        except asyncio.TimeoutError:
            self.refused = BodyRefused(408, "The request body came in too slowly, so AutoCode stopped waiting "
                                            "for it (AUTOCODE_BODY_TIMEOUT); nothing was done.")
            raise self.refused from None
        if message["type"] == "http.request":
            self.seen += len(message.get("body", b""))
            if self.seen > self.limit:
                self.refused = BodyRefused(413, f"The request body is over {self.limit / 1048576:.0f} MB: too "
                                                f"large ({self.why}).")
                raise self.refused
            self.done = not message.get("more_body", False)
        return message


def _refusal(exc: BaseException) -> BodyRefused | None:
    """The BodyRefused behind `exc`, if a route or library wrapped it in an error of its own."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, BodyRefused):
            return exc
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


def _header(scope: dict, name: bytes) -> str:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1").strip()
    return ""


async def error_response(request: Request, exc: Exception) -> Response:
    """The app's 500 handler: a JSON sentence naming the cause when it is known (a full disk), else pointing at
    the log (BodyGuard logs the error once)."""
    refused = _refusal(exc)
    if refused is not None:
        return json_error(refused.status, refused.message)
    if disk_full(exc):
        return json_error(503, "The server's disk is full, so AutoCode could not store this; nothing was done. "
                               "The operator must free space, then please try again.")
    return json_error(500, "AutoCode failed to answer this request; the operator can find why in the server log.")


async def http_error(request: Request, exc: Exception) -> Response:
    """Starlette's 404/405/…: JSON under /api, plain text elsewhere (run pages are for people)."""
    assert isinstance(exc, HTTPException)
    if request.url.path.startswith(("/api/", "/healthz")):
        return json_error(exc.status_code, str(exc.detail))
    return PlainTextResponse(str(exc.detail), status_code=exc.status_code, headers=exc.headers)


__all__ = ["BodyGuard", "BodyRefused", "error_response", "http_error", "json_error"]
