"""A fake Slack Web API on 127.0.0.1 for tests (standard library only, real HTTP, one thread per request).

The real `slack_sdk` clients (Bolt's and ours) talk to it through `SLACK_API_URL=<fake.api_url>`. Every call is
recorded with its method, merged params (query, form or JSON; form fields that hold JSON are kept as strings) and
headers. It answers the methods AutoCode uses; anything else gets `{"ok": true}`. `rate_limit(method, times)` makes
the next `times` calls of a method answer 429 with `Retry-After`, as Slack does.

Files users send: `add_file(name, data, token=...)` keeps the bytes (or a path to them) and returns the file object
a `message`/`app_mention` event carries in `files` (id, name, mimetype, size, url_private, url_private_download,
both on this server). `GET` on those URLs serves the bytes only with `Authorization: Bearer <that token>`; as Slack
does, a wrong token gets a 200 text/html sign-in page, no token a 401, an unknown file a 404. Each download is
recorded (method "download", params file and sent = bytes written before the client was done); `files.info`
answers the full object (what a Slack Connect stub, `add_file(..., connect=True)`, must be completed with).

Files the app uploads (files_upload_v2) are kept by id with their name and where they were shared
(`uploaded(id)`, bytes in `uploads()`); an image block (`slack_file: {id}`) in chat.postMessage/chat.update naming a
file not shared in that channel is refused with `invalid_blocks`. Streamed messages (chat.startStream /
appendStream / stopStream) are kept by ts (`streams()`); `fail_stream(channel, after=N)` makes appends fail after N,
`no_streaming(channel)` refuses chat.startStream. `delay_images(channel, n)` refuses the next n messages with an
image (a fresh upload not ready yet), `limit_messages(channel, chars)` answers `msg_too_long` above a size.
Socket Mode: `apps.connections.open` answers `socket_url` for `app_token` (APP_TOKEN) and `invalid_auth` for any
other token.

    with FakeSlack() as slack:
        env["SLACK_API_URL"] = slack.api_url
        ...
        assert slack.calls_of("chat.postMessage")
"""

from __future__ import annotations

import functools
import inspect
import itertools
import json
import mimetypes
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from tests.fakes.base import BodyHandler, FakeService, QuietServer

__all__ = ["FakeSlack", "SlackCall", "APP_TOKEN", "BOT_USER_ID", "BOT_ID", "TEAM_ID", "signature_problem", "view_problem", "view_text"]

TEAM_ID = "T0FAKE"
# The parameters `AsyncWebClient.chat_postEphemeral` (slack_sdk 3.x) can send; Slack requires channel, user and one
# of text/blocks/attachments/markdown_text.
EPHEMERAL_PARAMS = {"channel", "user", "text", "as_user", "attachments", "blocks", "thread_ts", "icon_emoji",
                    "icon_url", "link_names", "username", "parse", "markdown_text"}
BOT_USER_ID = "UAUTOCODE"
APP_TOKEN = "xapp-1-AFAKE-1-fake"
BOT_ID = "BAUTOCODE"
SIGN_IN_PAGE = (b"<!DOCTYPE html><html lang=\"en-US\"><head><title>Slack</title></head><body><h1>Sign in to "
                b"Fake</h1><form action=\"/signin\" method=\"post\"><input name=\"email\"></form></body></html>")
SERVE_CHUNK = 1 << 16
# Params every Web API method takes besides its own: the token (slack_sdk sends it as a header; forms may carry
# it) and team_id, which a client built with `team_id=` (Bolt does, per request) adds to every call.
COMMON_PARAMS = {"token", "team_id"}
VIEW_BLOCKS_MAX = 100
VIEW_TEXT_MAX = 24  # a modal's title, submit and close
SUGGESTED_PROMPTS_MAX = 4


@functools.cache
def client_signature(method: str) -> inspect.Signature | None:
    """The signature of the `AsyncWebClient` method that calls Web API `method`, or None if it has none."""
    from slack_sdk.web.async_client import AsyncWebClient

    function = getattr(AsyncWebClient, method.replace(".", "_"), None)
    return inspect.signature(function) if callable(function) else None


def signature_problem(method: str, params: dict[str, Any]) -> str | None:
    """Why slack_sdk's `AsyncWebClient` would not send this call, or None: an unknown method, a param its method
    does not name, or a required param missing."""
    signature = client_signature(method)
    if signature is None:
        return f"{method}: no such method on slack_sdk's AsyncWebClient"
    named = {name for name, p in signature.parameters.items()
             if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    unknown = set(params) - named - COMMON_PARAMS
    if unknown:
        return f"{method}: arguments slack_sdk does not have: {', '.join(sorted(unknown))}"
    missing = {name for name in named if signature.parameters[name].default is inspect.Parameter.empty} - set(params)
    if missing:
        return f"{method}: required arguments missing: {', '.join(sorted(missing))}"
    return None


@dataclass
class FakeFile:
    """A file a user shared: its bytes (or where they are) and the only token that may download them."""

    id: str
    name: str
    data: bytes | Path
    token: str
    mimetype: str
    entry: dict[str, Any]  # the full file object (files.info)
    stall: threading.Event | None = None  # set: serve the first chunk, then wait for it before the rest

    @property
    def size(self) -> int:
        return self.data.stat().st_size if isinstance(self.data, Path) else len(self.data)

    def chunks(self) -> Any:
        if isinstance(self.data, bytes):
            for start in range(0, len(self.data), SERVE_CHUNK):
                yield self.data[start:start + SERVE_CHUNK]
            return
        with open(self.data, "rb") as handle:
            while chunk := handle.read(SERVE_CHUNK):
                yield chunk


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
        if url.path.startswith("/files-pri/") and self.command == "GET":
            self._download(url.path, headers)
            return
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

    def _download(self, path: str, headers: dict[str, str]) -> None:
        """GET /files-pri/<team>-<id>/[download/]<name>: the bytes for the right bearer token, streamed."""
        fake = self.server.fake
        file_id = path.split("/")[2].rsplit("-", 1)[-1]
        call = SlackCall("download", {"file": file_id, "path": path, "sent": 0}, headers, time.monotonic())
        item = fake.file(file_id)
        auth = headers.get("authorization", "")
        if item is None:
            status, kind, body = 404, "text/plain", b"file not found"
        elif not auth.startswith("Bearer "):
            status, kind, body = 401, "text/plain", b"not authed"
        elif auth.removeprefix("Bearer ") != item.token:
            status, kind, body = 200, "text/html; charset=utf-8", SIGN_IN_PAGE
        else:
            status, kind, body = 200, item.mimetype, None
        call.status = status
        fake._record(call)
        try:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(item.size if body is None and item else len(body or b"")))
            self.end_headers()
            for chunk in (item.chunks() if body is None and item else [body]):
                self.wfile.write(chunk)
                call.params["sent"] += len(chunk)
                if body is None and item is not None and item.stall is not None:
                    self.wfile.flush()
                    item.stall.wait(30)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            self.close_connection = True


class FakeSlack(FakeService):
    """In-process fake of the Slack Web API; `api_url` is what `AsyncWebClient(base_url=...)` takes."""

    def __init__(self, team_id: str = TEAM_ID, *, strict: bool = True) -> None:
        self.team_id = team_id
        self.strict = strict
        self._views = itertools.count(1)
        self._lock = threading.Lock()
        self._calls: list[SlackCall] = []
        self._limits: dict[str, list[int]] = {}  # method -> [remaining 429s, retry_after]
        self._clock = itertools.count(1)
        self._files = itertools.count(1)
        self._shared: dict[str, FakeFile] = {}  # files users shared, by id
        self._uploaded: dict[str, dict[str, Any]] = {}  # files the app uploaded, by id: filename, then where shared
        self._streams: dict[str, dict[str, Any]] = {}  # streamed messages by ts: channel, text, state, appends
        self._stream_faults: dict[str, list[Any]] = {}  # channel -> [appends that succeed, error]
        self._no_streaming: set[str] = set()  # channels where chat.startStream answers an error
        self._image_delays: dict[str, int] = {}  # channel -> messages with image blocks still refused
        self._message_limits: dict[str, int] = {}  # channel -> longest blocks (JSON characters) a message may have
        # Socket Mode: apps.connections.open answers `socket_url` (tests/fakes/slack_socket_server.py) for this
        # app-level token, invalid_auth for any other
        self.app_token = APP_TOKEN
        self.socket_url: str | None = None
        self.socket_opens = 0

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

    def add_file(self, name: str, data: bytes | Path, *, token: str, mimetype: str | None = None,
                 user: str = "UALICE", connect: bool = False, stall: bool = False, **overrides: Any) -> dict[str, Any]:
        """Share a file: `token` is the only bearer token that may download it. Returns the file object for an
        event's `files` (a Slack Connect stub with `connect`: id and `file_access: check_file_info` only).
        With `stall`, a download sends the first chunk and waits for `release()`. `overrides` change the object
        (e.g. size=None to state no size, url_private_download=None)."""
        file_id = f"F{next(self._files):08d}"
        mimetype = mimetype or mimetypes.guess_type(name)[0] or "application/octet-stream"
        base = f"{self.url}/files-pri/{self.team_id}-{file_id}"
        item = FakeFile(file_id, name, data, token, mimetype, {}, threading.Event() if stall else None)
        entry: dict[str, Any] = {
            "id": file_id, "created": int(time.time()), "timestamp": int(time.time()), "name": name, "title": name,
            "mimetype": mimetype, "filetype": name.rsplit(".", 1)[-1] if "." in name else "", "user": user,
            "user_team": self.team_id, "mode": "hosted", "is_external": False, "external_type": "",
            "is_public": False, "size": item.size, "url_private": f"{base}/{quote(name)}",
            "url_private_download": f"{base}/download/{quote(name)}",
            "permalink": f"https://fake.slack.test/files/{user}/{file_id}/{quote(name)}",
        }
        for key, value in overrides.items():
            if value is None:
                entry.pop(key, None)
            else:
                entry[key] = value
        item.entry = entry
        with self._lock:
            self._shared[file_id] = item
        if connect:
            return {"id": file_id, "mode": "file_access", "file_access": "check_file_info", "created": 0,
                    "timestamp": 0, "user": ""}
        return dict(entry)

    @property
    def rejected(self) -> list[SlackCall]:
        """Calls that failed the signature check (see `signature_problem`); their response says why."""
        return [c for c in self.calls if c.response.get("signature_problem")]

    def assert_signatures(self) -> None:
        """Fail when any call was sent with arguments slack_sdk's client would not send."""
        problems = [c.response["signature_problem"] for c in self.rejected]
        assert not problems, "calls slack_sdk would not make: " + "; ".join(problems)

    def stop(self) -> None:
        super().stop()
        if self.strict:
            self.assert_signatures()

    def published(self, user: str) -> dict[str, Any] | None:
        """The last home view `views.publish` published for `user` (None: none yet)."""
        calls = [c for c in self.calls_of("views.publish") if c.params.get("user_id") == user]
        return calls[-1].json_param("view") if calls else None

    def statuses(self, channel: str, thread_ts: str) -> list[str]:
        """The statuses `assistant.threads.setStatus` set on a thread, in order ("" clears)."""
        return [str(c.params.get("status", "")) for c in self.calls_of("assistant.threads.setStatus")
                if c.params.get("channel_id") == channel and c.params.get("thread_ts") == thread_ts]

    def fail_stream(self, channel: str, after: int, error: str = "message_not_in_streaming_state") -> None:
        """In `channel`, answer chat.appendStream with `error` once `after` appends succeeded (a stream that
        dies mid-way, as long idle ones do)."""
        with self._lock:
            self._stream_faults[channel] = [after, error]

    def no_streaming(self, channel: str) -> None:
        """In `channel`, chat.startStream answers `not_allowed_token_type` (a workspace without streaming)."""
        with self._lock:
            self._no_streaming.add(channel)

    def delay_images(self, channel: str, times: int = 1) -> None:
        """In `channel`, refuse the next `times` messages showing an image with `invalid_blocks`, as Slack does
        for a file uploaded a moment ago."""
        with self._lock:
            self._image_delays[channel] = times

    def limit_messages(self, channel: str, chars: int) -> None:
        """In `channel`, answer `msg_too_long` to messages whose blocks are over `chars` (as JSON): the practical
        limit Slack applies, well under the documented one."""
        with self._lock:
            self._message_limits[channel] = chars

    def streams(self, channel: str | None = None) -> dict[str, dict[str, Any]]:
        """Streamed messages (of a channel) by ts: channel, thread_ts, text (every markdown chunk so far), state
        (streaming | stopped), appends (chat.appendStream calls answered ok)."""
        with self._lock:
            return {ts: dict(m) for ts, m in self._streams.items() if channel is None or m["channel"] == channel}

    def uploaded(self, file_id: str) -> dict[str, Any] | None:
        """A file the app uploaded: filename, title, channel, thread_ts and initial_comment of its message."""
        with self._lock:
            entry = self._uploaded.get(file_id)
            return dict(entry) if entry else None

    def release(self) -> None:
        """Let stalled downloads go on."""
        with self._lock:
            stalls = [item.stall for item in self._shared.values() if item.stall is not None]
        for stall in stalls:
            stall.set()

    def _release_waiters(self) -> None:
        self.release()

    def file(self, file_id: str) -> FakeFile | None:
        with self._lock:
            return self._shared.get(unquote(file_id))

    def downloads(self, file_id: str | None = None) -> list[SlackCall]:
        """Download requests (any answer), of one file or all."""
        return [c for c in self.calls_of("download", status=None) if file_id is None or c.params["file"] == file_id]

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
        if call.method == "apps.connections.open":  # the app-level token comes as the bearer token
            self.socket_opens += 1
            if call.headers.get("authorization") != f"Bearer {self.app_token}":
                return 200, {"ok": False, "error": "invalid_auth"}, {}
            if not self.socket_url:
                return 200, {"ok": False, "error": "internal_error"}, {}
            return 200, {"ok": True, "url": self.socket_url}, {}
        if call.method not in ("upload", "download"):
            problem = signature_problem(call.method, params)
            if problem is not None:
                known = client_signature(call.method) is not None
                return 200, {"ok": False, "error": "invalid_arguments" if known else "unknown_method",
                             "signature_problem": problem, "response_metadata": {"messages": [problem]}}, {}
        if call.method.startswith("assistant.threads.") or call.method.startswith("views."):
            return self._answer_surface(call)
        if call.method in ("chat.postMessage", "chat.update"):
            channel, blocks = str(params.get("channel") or ""), call.json_param("blocks") or []
            unknown = self._unknown_images(blocks, channel)
            with self._lock:
                if not unknown and self._image_delays.get(channel) and any(
                        isinstance(b, dict) and b.get("type") == "image" for b in blocks):
                    self._image_delays[channel] -= 1
                    unknown = "(not ready yet)"
                limit = self._message_limits.get(channel)
            if unknown:
                return 200, {"ok": False, "error": "invalid_blocks",
                             "errors": [f"invalid slack file {unknown} [json-pointer:/blocks/slack_file]"]}, {}
            if limit is not None and len(json.dumps(blocks)) > limit:
                return 200, {"ok": False, "error": "msg_too_long"}, {}
        if call.method.startswith("chat.") and call.method.endswith("Stream"):
            return self._stream(call)
        if call.method == "auth.test":
            return 200, {"ok": True, "url": "https://fake.slack.test/", "team": "Fake", "user": "autocode",
                         "team_id": self.team_id, "user_id": BOT_USER_ID, "bot_id": BOT_ID}, {}
        if call.method == "chat.postMessage":
            ts = self._ts()
            return 200, {"ok": True, "channel": params.get("channel"), "ts": ts,
                         "message": {"text": params.get("text", ""), "ts": ts, "bot_id": BOT_ID}}, {}
        if call.method == "chat.update":
            with self._lock:
                stream = self._streams.get(str(params.get("ts")))
                if stream is not None:  # an update replaces what a stream wrote
                    stream["state"], stream["updated"] = "stopped", True
            return 200, {"ok": True, "channel": params.get("channel"), "ts": params.get("ts"),
                         "text": params.get("text", "")}, {}
        if call.method == "chat.delete":
            return 200, {"ok": True, "channel": params.get("channel"), "ts": params.get("ts")}, {}
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
            with self._lock:
                self._uploaded[file_id] = {"filename": params.get("filename"), "channel": None}
            return 200, {"ok": True, "upload_url": f"{self.url}/upload/{file_id}", "file_id": file_id}, {}
        if call.method == "files.completeUploadExternal":
            files = call.json_param("files") or []
            with self._lock:
                if any(f.get("id") not in self._uploaded for f in files):
                    return 200, {"ok": False, "error": "file_not_found"}, {}
                for f in files:
                    self._uploaded[f["id"]].update(title=f.get("title"), channel=params.get("channel_id"),
                                                   thread_ts=params.get("thread_ts"),
                                                   initial_comment=params.get("initial_comment"))
                named = [{"id": f["id"], "name": self._uploaded[f["id"]]["filename"], "title": f.get("title")}
                         for f in files]
            return 200, {"ok": True, "files": named}, {}
        if call.method == "files.info":
            item = self.file(str(params.get("file", "")))
            if item is None:
                return 200, {"ok": False, "error": "file_not_found"}, {}
            return 200, {"ok": True, "file": dict(item.entry), "comments": [], "response_metadata": {}}, {}
        if call.method == "users.info":
            user = params.get("user", "")
            return 200, {"ok": True, "user": {"id": user, "name": user.lower(), "tz": "UTC"}}, {}
        return 200, {"ok": True}, {}

    def _answer_surface(self, call: SlackCall) -> tuple[int, dict[str, Any], dict[str, str]]:
        """The assistant thread and view methods, checked as Slack checks them."""
        params, method = call.params, call.method
        if method.startswith("assistant.threads."):
            if not params.get("channel_id"):
                return 200, {"ok": False, "error": "channel_not_found"}, {}
            if method == "assistant.threads.setSuggestedPrompts":
                prompts = call.json_param("prompts")
                if not isinstance(prompts, list) or not 1 <= len(prompts) <= SUGGESTED_PROMPTS_MAX or not all(
                        isinstance(p, dict) and p.get("title") and p.get("message") for p in prompts):
                    return 200, {"ok": False, "error": "invalid_prompts"}, {}
            if method == "assistant.threads.setTitle" and not params.get("title"):
                return 200, {"ok": False, "error": "invalid_title"}, {}
            return 200, {"ok": True}, {}
        view = call.json_param("view")
        problem = view_problem(view, "home" if method == "views.publish" else "modal")
        if method == "views.open" and not (params.get("trigger_id") or params.get("interactivity_pointer")):
            problem = "trigger_id is required"
        if method == "views.update" and not (params.get("view_id") or params.get("external_id")):
            problem = "view_id or external_id is required"
        if problem:
            return 200, {"ok": False, "error": "invalid_arguments", "response_metadata": {"messages": [problem]}}, {}
        answered = dict(view, id=params.get("view_id") or f"V{next(self._views):08d}", team_id=self.team_id)
        return 200, {"ok": True, "view": answered}, {}

    def _unknown_images(self, blocks: list[dict[str, Any]], channel: str) -> str:
        """The id of a `slack_file` image block whose file the app did not upload and share in `channel` ("" when
        all are): Slack shows a file only to those it was shared with."""
        with self._lock:
            for block in blocks:
                file_id = (block.get("slack_file") or {}).get("id") if isinstance(block, dict) else None
                if file_id is not None and (self._uploaded.get(file_id) or {}).get("channel") != channel:
                    return str(file_id)
        return ""

    def _stream(self, call: SlackCall) -> tuple[int, dict[str, Any], dict[str, str]]:
        """chat.startStream / appendStream / stopStream as Slack answers them: a stream is a reply in a thread
        (recipient ids are required in channels), appended to while streaming, then stopped."""
        params = call.params
        channel = str(params.get("channel") or "")
        text = str(params.get("markdown_text") or "") + "".join(
            str(chunk.get("text") or "") for chunk in params.get("chunks") or []
            if isinstance(chunk, dict) and chunk.get("type") == "markdown_text")
        with self._lock:
            if call.method == "chat.startStream":
                if channel in self._no_streaming:
                    return 200, {"ok": False, "error": "not_allowed_token_type"}, {}
                if not params.get("thread_ts"):
                    return 200, {"ok": False, "error": "invalid_arguments"}, {}
                if channel.startswith(("C", "G")) and not (params.get("recipient_team_id")
                                                            and params.get("recipient_user_id")):
                    return 200, {"ok": False, "error": "missing_recipient_team_id"}, {}
                ts = self._ts()
                self._streams[ts] = {"channel": channel, "thread_ts": params["thread_ts"], "text": text,
                                     "state": "streaming", "appends": 0, "blocks": None}
                return 200, {"ok": True, "channel": channel, "ts": ts}, {}
            stream = self._streams.get(str(params.get("ts") or ""))
            if stream is None or stream["channel"] != channel:
                return 200, {"ok": False, "error": "message_not_found"}, {}
            if stream["state"] != "streaming":
                return 200, {"ok": False, "error": "message_not_in_streaming_state"}, {}
            fault = self._stream_faults.get(channel)
            if call.method == "chat.appendStream":
                if fault is not None and stream["appends"] >= fault[0]:
                    stream["state"] = "broken"
                    return 200, {"ok": False, "error": fault[1]}, {}
                stream["text"] += text
                stream["appends"] += 1
                return 200, {"ok": True, "channel": channel, "ts": params["ts"]}, {}
            stream["text"] += text
            stream["state"], stream["blocks"] = "stopped", call.json_param("blocks")
            return 200, {"ok": True, "channel": channel, "ts": params["ts"],
                         "message": {"text": stream["text"], "ts": params["ts"], "bot_id": BOT_ID}}, {}

    # -- helpers for assertions ---------------------------------------------------------------------------
    def uploads(self) -> dict[str, bytes]:
        """Uploaded bytes by file id."""
        return {c.params["path"].rsplit("/", 1)[-1]: c.body for c in self.calls_of("upload")}

    def texts(self, method: str = "chat.postMessage") -> list[str]:
        """The text and every block's text of each successful call of `method`, one string per call."""
        return [message_text(c) for c in self.calls_of(method)]


def view_problem(view: Any, kind: str) -> str | None:
    """What Slack would refuse in a view of `kind` ("home" or "modal"), or None."""
    if not isinstance(view, dict) or view.get("type") != kind:
        return f"view must be a {kind} view"
    blocks = view.get("blocks")
    if not isinstance(blocks, list) or len(blocks) > VIEW_BLOCKS_MAX:
        return f"a view holds a list of at most {VIEW_BLOCKS_MAX} blocks"
    if kind == "modal":
        for key in ("title", "submit", "close"):
            label = view.get(key)
            if key == "title" and label is None:
                return "a modal needs a title"
            if label is not None and (not isinstance(label, dict) or len(str(label.get("text", ""))) > VIEW_TEXT_MAX):
                return f"{key} must be plain_text of at most {VIEW_TEXT_MAX} characters"
        if any(b.get("type") == "input" for b in blocks) and view.get("submit") is None:
            return "a modal with inputs needs a submit button"
    for block in blocks:
        text = block.get("text") if isinstance(block, dict) else None
        if isinstance(text, dict) and len(str(text.get("text", ""))) > 3000:
            return "a section's text is at most 3000 characters"
    if len(str(view.get("private_metadata", ""))) > 3000:
        return "private_metadata is at most 3000 characters"
    return None


def view_text(view: dict[str, Any] | None) -> str:
    """All text of a view's blocks (sections, fields, context elements, headers, button labels), one string."""
    parts: list[str] = []
    for block in (view or {}).get("blocks", []):
        for piece in [block.get("text"), *(block.get("fields") or []), *(block.get("elements") or []),
                      (block.get("accessory") or {}).get("text"), block.get("label")]:
            if isinstance(piece, dict):
                inner = piece.get("text")
                parts.append(str(inner.get("text", "")) if isinstance(inner, dict) else str(inner or ""))
    return "\n".join(parts)


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
