"""A fake Slack Web API on 127.0.0.1 for tests (standard library only, real HTTP, one thread per request).

The real `slack_sdk` clients (Bolt's and ours) talk to it through `SLACK_API_URL=<fake.api_url>`. Every call is
recorded with its method, merged params (query, form or JSON; form fields that hold JSON are kept as strings) and
headers. It answers the methods AutoCode uses; anything else gets `{"ok": true}`. `rate_limit(method, times)` makes
the next `times` calls of a method answer 429 with `Retry-After`, as Slack does.

    with FakeSlack() as slack:
        env["SLACK_API_URL"] = slack.api_url
        ...
        assert slack.calls_of("chat.postMessage")
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from tests.fakes.base import BodyHandler, FakeService, QuietServer

__all__ = ["FakeSlack", "SlackCall", "BOT_USER_ID", "BOT_ID", "TEAM_ID"]

TEAM_ID = "T0FAKE"
# The parameters `AsyncWebClient.chat_postEphemeral` (slack_sdk 3.x) can send; Slack requires channel, user and one
# of text/blocks/attachments/markdown_text.
EPHEMERAL_PARAMS = {"channel", "user", "text", "as_user", "attachments", "blocks", "thread_ts", "icon_emoji",
                    "icon_url", "link_names", "username", "parse", "markdown_text"}
BOT_USER_ID = "UAUTOCODE"
BOT_ID = "BAUTOCODE"


@dataclass
class SlackCall:
    """One request: a Web API method (`path` /api/<method>) or a file upload (`method` == "upload")."""

    method: str
    params: dict[str, Any]
    headers: dict[str, str]
    at: float
    body: bytes = b""
    status: int = 200
    response: dict[str, Any] = field(default_factory=dict)

    def json_param(self, name: str) -> Any:
        """A param that Slack clients send as a JSON string in forms (blocks, files) or as JSON itself."""
        value = self.params.get(name)
        return json.loads(value) if isinstance(value, str) else value


class _Handler(BodyHandler):
    server: QuietServer

    def _handle(self, raw: bytes) -> None:
        url = urlsplit(self.path)
        headers = {k.lower(): v for k, v in self.headers.items()}
        params: dict[str, Any] = dict(parse_qsl(url.query))
        kind = headers.get("content-type", "")
        if url.path.startswith("/api/"):
            if kind.startswith("application/json") and raw:
                try:
                    params.update(json.loads(raw))
                except ValueError:
                    pass
            elif kind.startswith("application/x-www-form-urlencoded"):
                params.update(parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True))
            method = url.path.removeprefix("/api/")
        else:
            method = "upload"
            params["path"] = url.path
        call = SlackCall(method, params, headers, time.monotonic(), raw)
        status, payload, extra = self.server.fake._answer(call)
        call.status, call.response = status, payload
        self.server.fake._record(call)
        data = json.dumps(payload).encode() if method != "upload" else b"OK - %d" % len(raw)
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json" if method != "upload" else "text/plain")
            self.send_header("Content-Length", str(len(data)))
            for name, value in extra.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            self.close_connection = True


class FakeSlack(FakeService):
    """In-process fake of the Slack Web API; `api_url` is what `AsyncWebClient(base_url=...)` takes."""

    def __init__(self, team_id: str = TEAM_ID) -> None:
        self.team_id = team_id
        self._lock = threading.Lock()
        self._calls: list[SlackCall] = []
        self._limits: dict[str, list[int]] = {}  # method -> [remaining 429s, retry_after]
        self._clock = itertools.count(1)
        self._files = itertools.count(1)

    # -- life cycle -------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return self.origin

    @property
    def api_url(self) -> str:
        return f"{self.url}/api/"

    # -- scripting and inspection -----------------------------------------------------------------------
    def rate_limit(self, method: str, times: int = 1, retry_after: int = 1) -> None:
        """Answer the next `times` calls of `method` with 429 and `Retry-After: retry_after`."""
        with self._lock:
            self._limits[method] = [times, retry_after]

    @property
    def calls(self) -> list[SlackCall]:
        with self._lock:
            return list(self._calls)

    def calls_of(self, method: str, status: int | None = 200) -> list[SlackCall]:
        """Calls of a method (by default only the ones answered 200; None: all)."""
        return [c for c in self.calls if c.method == method and (status is None or c.status == status)]

    def clear(self) -> None:
        with self._lock:
            self._calls.clear()

    # -- answers ------------------------------------------------------------------------------------------
    def _record(self, call: SlackCall) -> None:
        with self._lock:
            self._calls.append(call)

    def _ts(self) -> str:
        return f"{1700000000 + next(self._clock)}.000100"

    def _answer(self, call: SlackCall) -> tuple[int, dict[str, Any], dict[str, str]]:
        with self._lock:
            limit = self._limits.get(call.method)
            if limit and limit[0] > 0:
                limit[0] -= 1
                return 429, {"ok": False, "error": "ratelimited"}, {"Retry-After": str(limit[1])}
        params = call.params
        if call.method == "auth.test":
            return 200, {"ok": True, "url": "https://fake.slack.test/", "team": "Fake", "user": "autocode",
                         "team_id": self.team_id, "user_id": BOT_USER_ID, "bot_id": BOT_ID}, {}
        if call.method == "chat.postMessage":
            ts = self._ts()
            return 200, {"ok": True, "channel": params.get("channel"), "ts": ts,
                         "message": {"text": params.get("text", ""), "ts": ts, "bot_id": BOT_ID}}, {}
        if call.method == "chat.update":
            return 200, {"ok": True, "channel": params.get("channel"), "ts": params.get("ts"),
                         "text": params.get("text", "")}, {}
        if call.method == "chat.postEphemeral":
            if set(params) - EPHEMERAL_PARAMS:
                return 200, {"ok": False, "error": "invalid_arguments"}, {}
            if not params.get("channel"):
                return 200, {"ok": False, "error": "channel_not_found"}, {}
            if not params.get("user"):
                return 200, {"ok": False, "error": "user_not_found"}, {}
            if not any(params.get(k) for k in ("text", "blocks", "attachments", "markdown_text")):
                return 200, {"ok": False, "error": "no_text"}, {}
            return 200, {"ok": True, "message_ts": self._ts()}, {}
        if call.method == "files.getUploadURLExternal":
            file_id = f"F{next(self._files):08d}"
            return 200, {"ok": True, "upload_url": f"{self.url}/upload/{file_id}", "file_id": file_id}, {}
        if call.method == "files.completeUploadExternal":
            files = call.json_param("files") or []
            return 200, {"ok": True, "files": [{"id": f.get("id"), "title": f.get("title")} for f in files]}, {}
        if call.method == "users.info":
            user = params.get("user", "")
            return 200, {"ok": True, "user": {"id": user, "name": user.lower(), "tz": "UTC"}}, {}
        return 200, {"ok": True}, {}

    # -- helpers for assertions ---------------------------------------------------------------------------
    def uploads(self) -> dict[str, bytes]:
        """Uploaded bytes by file id."""
        return {c.params["path"].rsplit("/", 1)[-1]: c.body for c in self.calls_of("upload")}

    def texts(self, method: str = "chat.postMessage") -> list[str]:
        """The text and every block's text of each successful call of `method`, one string per call."""
        return [message_text(c) for c in self.calls_of(method)]


def message_text(call: SlackCall) -> str:
    """All text a chat.postMessage/chat.update call carries: `text` plus its blocks' texts and button labels."""
    parts = [str(call.params.get("text") or "")]
    for block in call.json_param("blocks") or []:
        text = block.get("text")
        if isinstance(text, dict):
            parts.append(str(text.get("text", "")))
        for element in block.get("elements", []) or []:
            label = element.get("text")
            parts.append(str(label.get("text", "")) if isinstance(label, dict) else str(element.get("text", "")))
    return "\n".join(parts)


FakeSlack.handler = _Handler
