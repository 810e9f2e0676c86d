"""A fake Telegram Bot API server for tests (standard library only), over real HTTP on 127.0.0.1.

python-telegram-bot talks to it through its own HTTP client (`ApplicationBuilder().base_url(...)`): requests
arrive as `POST /bot<token>/<method>` with a form body (values of structured parameters JSON-encoded), a
multipart body when files are uploaded, or JSON. The server answers like Telegram does — `{"ok": true,
"result": ...}` or `{"ok": false, "error_code", "description", "parameters"}` — and records every call.

What it models: getMe, getUpdates (queued updates, a short long-poll, `offset` confirms), sendMessage,
editMessageText, deleteMessage, sendMessageDraft (private chats only; `drafts_supported = False` answers it 404 like
a Bot API server that predates it), sendDocument, sendPhoto, answerCallbackQuery, setMyCommands, setWebhook,
deleteWebhook, getWebhookInfo, sendChatAction, getFile and file downloads at `GET /file/bot<token>/<file_path>` (404 for a
wrong token, as Telegram; see add_file); HTML parse-mode validation and the 4,096-character limit (400 Bad Request
like Telegram); scripted 429s with `parameters.retry_after` for the next N calls of a method.

    with FakeTelegram() as tg:
        tg.queue(tg.text_update(tg.private_chat(42), "hello"))
        ...  # point TELEGRAM_API_URL at tg.api_url
"""

from __future__ import annotations

import html
import itertools
import json
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qsl

from tests.fakes.base import BodyHandler, FakeService, QuietServer

__all__ = ["FakeTelegram", "Call", "visible_text"]

MAX_TEXT = 4096
PUBLIC_DOWNLOAD_LIMIT = 20 * 1024 * 1024  # getFile refuses bigger files ("file is too big")
SERVE_CHUNK = 64 * 1024
NOT_FOUND = b'{"ok":false,"error_code":404,"description":"Not Found"}'
# Parameters whose form value is a plain string (everything else is JSON-encoded by the client).
_STRING_PARAMS = {"text", "caption", "parse_mode", "url", "secret_token", "callback_query_id", "action",
                  "ip_address", "language_code"}
_HTML_TAGS = {"b", "strong", "i", "em", "u", "ins", "s", "strike", "del", "span", "tg-spoiler", "a", "code", "pre",
              "blockquote", "tg-emoji"}
_ENTITY = re.compile(r"&(#\d+|#x[0-9a-fA-F]+|lt|gt|amp|quot);")


@dataclass
class Call:
    """One Bot API request as received, with the answer it got."""

    method: str
    params: dict[str, Any]
    files: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # field -> (filename, data)
    at: float = 0.0  # time.monotonic()
    status: int = 0
    result: Any = None

    @property
    def ok(self) -> bool:
        return self.status == 200

    @property
    def chat_id(self) -> int | None:
        value = self.params.get("chat_id")
        return int(value) if value is not None else None

    @property
    def reply_to(self) -> int | None:
        """The message id this one replies to (reply_parameters or the reply_to_message_id shortcut)."""
        parameters = self.params.get("reply_parameters") or {}
        return parameters.get("message_id") or self.params.get("reply_to_message_id")


class _MarkupChecker(HTMLParser):
    """Telegram's HTML rules, roughly: known tags only, properly nested, entities from a short list."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=False)
        self.stack: list[str] = []
        self.text: list[str] = []
        self.error = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in _HTML_TAGS:
            self.error = self.error or f"unsupported start tag \"{tag}\""
        self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.error = self.error or f"unmatched end tag \"{tag}\""
        else:
            self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def handle_entityref(self, name: str) -> None:
        self.text.append(html.unescape(f"&{name};"))

    def handle_charref(self, name: str) -> None:
        self.text.append(html.unescape(f"&#{name};"))


def _parse_html(text: str) -> tuple[str, str]:
    """(visible text, error) of an HTML-mode message."""
    stray = [m.start() for m in re.finditer("&", text) if not _ENTITY.match(text, m.start())]
    if stray:
        return "", f"can't parse entities: unsupported entity at byte offset {stray[0]}"
    if re.search(r"<(?![/a-zA-Z])", text):
        return "", "can't parse entities: unexpected \"<\""
    checker = _MarkupChecker()
    checker.feed(text)
    checker.close()
    if checker.error or checker.stack:
        return "", f"can't parse entities: {checker.error or 'unclosed tag ' + checker.stack[-1]}"
    return "".join(checker.text), ""


def visible_text(call: Call) -> str:
    """What a chat member sees of a sendMessage / editMessageText call (markup removed)."""
    text = call.params.get("text") or call.params.get("caption") or ""
    if str(call.params.get("parse_mode") or "").upper() == "HTML":
        return _parse_html(text)[0]
    return text


class ApiError(Exception):
    def __init__(self, code: int, description: str, parameters: dict[str, Any] | None = None):
        super().__init__(description)
        self.code, self.description, self.parameters = code, description, parameters


class _Handler(BodyHandler):
    server: QuietServer

    def _handle(self, raw: bytes) -> None:
        if self.path.startswith("/file/"):  # file downloads: bytes, not JSON
            status, known = self.server.fake._download(self.path)
            body = NOT_FOUND if known is None else known["data"]
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json" if known is None else "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                for start in range(0, len(body), SERVE_CHUNK):
                    self.wfile.write(body[start:start + SERVE_CHUNK])
                    if start == 0 and known is not None and known["stall"] is not None:
                        self.wfile.flush()
                        known["stall"].wait(30)  # the first chunk is out; the rest waits for release()
            except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
                self.close_connection = True
            return
        status, payload = self.server.fake._dispatch(self.path, self.headers.get("Content-Type") or "", raw)
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            self.close_connection = True


def _decode_params(content_type: str, raw: bytes) -> tuple[dict[str, Any], dict[str, tuple[str, bytes]]]:
    """Parameters and uploaded files of a request, whatever encoding the client chose."""
    files: dict[str, tuple[str, bytes]] = {}
    if content_type.startswith("application/json"):
        body = json.loads(raw or b"{}")
        return (body if isinstance(body, dict) else {}), files
    form: dict[str, str] = {}
    if content_type.startswith("multipart/form-data"):
        message = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + raw)
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            payload = part.get_payload(decode=True) or b""
            filename = part.get_filename()
            if filename is not None:
                files[name] = (filename, payload)
            else:
                form[name] = payload.decode()
    else:
        form = dict(parse_qsl(raw.decode(), keep_blank_values=True))
    params: dict[str, Any] = {}
    for name, value in form.items():
        if name in _STRING_PARAMS:
            params[name] = value
            continue
        try:
            params[name] = json.loads(value)
        except ValueError:
            params[name] = value
    return params, files


class FakeTelegram(FakeService):
    """In-process Bot API with one bot; thread-safe; every call recorded in `calls`."""

    def __init__(self, token: str = "123456:TEST-fake-token", username: str = "AutoCodeTestBot"):
        self.token = token
        self.bot_id = int(token.split(":", 1)[0])
        self.username = username
        self.calls: list[Call] = []
        self.webhook: dict[str, Any] = {"url": ""}
        self._updates: list[dict[str, Any]] = []
        self._chats: dict[int, dict[str, Any]] = {}
        self._message_ids: dict[int, itertools.count] = {}
        self._update_ids = itertools.count(1000)
        self._user_ids = itertools.count(5000)
        self._failures: dict[str, list[tuple[ApiError, Callable[[dict[str, Any]], bool]]]] = {}
        self._queries: set[str] = set()  # callback query ids handed out and not answered yet
        self._files: dict[str, dict[str, Any]] = {}  # file_id -> {"data", "path", "size", "too_big", ...}
        self.downloads: list[str] = []  # file paths served over HTTP (right token only)
        self._local_dir: Path | None = None
        self.drafts_supported = True  # False: sendMessageDraft is an unknown method (404), as on older servers
        self._deleted: set[tuple[int, int]] = set()  # (chat, message) deleted by the bot
        self._cond = threading.Condition()

    # -- lifecycle ---------------------------------------------------------------------------------------
    def _release_waiters(self) -> None:
        self.release()
        with self._cond:
            self._cond.notify_all()

    def stop(self) -> None:
        super().stop()
        if self._local_dir is not None:
            shutil.rmtree(self._local_dir, ignore_errors=True)
            self._local_dir = None

    @property
    def api_url(self) -> str:
        """TELEGRAM_API_URL for the adapter (it appends `/bot<token>/<method>`)."""
        return self.origin

    # -- scripting -----------------------------------------------------------------------------------------
    def bot_user(self) -> dict[str, Any]:
        return {"id": self.bot_id, "is_bot": True, "first_name": "AutoCode", "username": self.username,
                "can_join_groups": True, "can_read_all_group_messages": False, "supports_inline_queries": False}

    def user(self, user_id: int | None = None, name: str = "Ada") -> dict[str, Any]:
        return {"id": user_id or next(self._user_ids), "is_bot": False, "first_name": name,
                "username": name.lower()}

    def private_chat(self, user: dict[str, Any]) -> dict[str, Any]:
        return self._chat({"id": user["id"], "type": "private", "first_name": user["first_name"]})

    def group_chat(self, chat_id: int, title: str = "Team", forum: bool = False) -> dict[str, Any]:
        chat = {"id": chat_id, "type": "supergroup", "title": title}
        if forum:
            chat["is_forum"] = True
        return self._chat(chat)

    def _chat(self, chat: dict[str, Any]) -> dict[str, Any]:
        with self._cond:
            self._chats[chat["id"]] = chat
        return chat

    def _next_message_id(self, chat_id: int) -> int:
        with self._cond:
            counter = self._message_ids.setdefault(chat_id, itertools.count(1))
            return next(counter)

    def message(self, chat: dict[str, Any], user: dict[str, Any], text: str, *, thread_id: int | None = None,
                reply_to: dict[str, Any] | None = None, entities: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """A user's text message (commands get their bot_command entity, like Telegram adds)."""
        message: dict[str, Any] = {"message_id": self._next_message_id(chat["id"]), "date": int(time.time()),
                                   "chat": chat, "from": user, "text": text}
        found = list(entities or [])
        if text.startswith("/"):
            found.insert(0, {"type": "bot_command", "offset": 0, "length": len(text.split()[0])})
        if found:
            message["entities"] = found
        if thread_id is not None:
            message["message_thread_id"] = thread_id
            message["is_topic_message"] = True
        if reply_to is not None:
            message["reply_to_message"] = reply_to
        return message

    # -- files users send ------------------------------------------------------------------------------
    def add_file(self, data: bytes, *, size: int | None = None, too_big: bool | None = None, missing: bool = False,
                 stall: bool = False, local: bool = False, local_path: str | None = None) -> dict[str, Any]:
        """Register a file's bytes; returns {file_id, file_unique_id, file_size} for a document or photo size.

        `size` states another size than the bytes' (the message's file_size). getFile refuses a file over 20 MB
        (by that size) with "Bad Request: file is too big", as the public Bot API and a local server without
        `--local` do; `too_big` forces that answer either way. `missing`: getFile answers but the download is a
        404. `stall`: the download sends its first chunk, then waits for `release()`. `local`: the server is in
        `--local` mode for this file — getFile returns an absolute path on this machine
        (`<local_dir>/<token>/documents/file_N.bin`, written there; `local_path` names another) and nothing is
        served over HTTP for it; no size limit."""
        stated = len(data) if size is None else size
        with self._cond:
            number = len(self._files) + 1
            file_id = f"FILEID{number:04d}"
            path = f"documents/file_{number}.bin"
            if local:
                target = Path(local_path) if local_path else self.local_dir / self.token / path
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
                path = str(target)
            self._files[file_id] = {
                "data": data, "path": path, "unique_id": f"U{number:04d}", "size": stated, "missing": missing,
                "too_big": (stated > PUBLIC_DOWNLOAD_LIMIT and not local) if too_big is None else too_big,
                "stall": threading.Event() if stall else None, "local": local}
        return {"file_id": file_id, "file_unique_id": f"U{number:04d}", "file_size": stated}

    @property
    def local_dir(self) -> Path:
        """The `--local` server's working directory (made on first use, removed by stop())."""
        if self._local_dir is None:
            self._local_dir = Path(tempfile.mkdtemp(prefix="fake-telegram-bot-api-"))
        return self._local_dir

    def release(self) -> None:
        """Let stalled downloads go on."""
        with self._cond:
            stalls = [f["stall"] for f in self._files.values() if f["stall"] is not None]
        for stall in stalls:
            stall.set()

    def document(self, chat: dict[str, Any], user: dict[str, Any], file: dict[str, Any], name: str,
                 mime: str = "text/csv", caption: str | None = None, **extra: Any) -> dict[str, Any]:
        """A message with a document (and its caption: the task)."""
        message = self.message(chat, user, "", **extra)
        message.pop("text", None)
        message.pop("entities", None)
        message["document"] = {**file, "file_name": name, "mime_type": mime}
        self._caption(message, caption)
        return message

    def photo(self, chat: dict[str, Any], user: dict[str, Any], sizes: list[tuple[dict[str, Any], int, int]],
              caption: str | None = None, **extra: Any) -> dict[str, Any]:
        """A message with a photo in several sizes: [(file, width, height), …], smallest first as Telegram sends."""
        message = self.message(chat, user, "", **extra)
        message.pop("text", None)
        message.pop("entities", None)
        message["photo"] = [{**file, "width": w, "height": h} for file, w, h in sizes]
        self._caption(message, caption)
        return message

    @staticmethod
    def _caption(message: dict[str, Any], caption: str | None) -> None:
        if caption:
            message["caption"] = caption
            if caption.startswith("/"):
                message["caption_entities"] = [{"type": "bot_command", "offset": 0,
                                                "length": len(caption.split()[0])}]

    def _api_getFile(self, params: dict[str, Any], files: dict) -> dict[str, Any]:
        with self._cond:
            known = self._files.get(str(params.get("file_id")))
        if known is None:
            raise ApiError(400, "Bad Request: invalid file_id")
        if known["too_big"]:
            raise ApiError(400, "Bad Request: file is too big")
        return {"file_id": params["file_id"], "file_unique_id": known["unique_id"], "file_size": known["size"],
                "file_path": known["path"]}

    def _download(self, path: str) -> tuple[int, dict[str, Any] | None]:
        """GET /file/bot<token>/<file_path>: the file, or 404 (wrong token, unknown path, a `--local` file)."""
        match = re.fullmatch(r"/file/bot([^/]+)/(.+)", path.split("?", 1)[0])
        if match is None or match.group(1) != self.token:
            return 404, None
        with self._cond:
            known = next((f for f in self._files.values() if f["path"] == match.group(2) and not f["missing"]
                          and not f["local"]), None)
            if known is not None:
                self.downloads.append(match.group(2))
        return (404, None) if known is None else (200, known)

    def update(self, **content: Any) -> dict[str, Any]:
        """An update with a fresh update_id, e.g. `update(message=...)` or `update(callback_query=...)`."""
        return {"update_id": next(self._update_ids), **content}

    def callback(self, user: dict[str, Any], message: dict[str, Any], data: str) -> dict[str, Any]:
        """A button press by `user` on `message` (answerable once, as on Telegram)."""
        query = {"id": f"cb{next(self._update_ids)}", "from": user, "chat_instance": "ci", "data": data,
                 "message": message}
        with self._cond:
            self._queries.add(query["id"])
        return query

    def queue(self, *updates: dict[str, Any]) -> None:
        """Serve these from getUpdates (in order; the same dict twice is delivered twice)."""
        with self._cond:
            self._updates.extend(updates)
            self._cond.notify_all()

    def fail_next(self, method: str, times: int = 1, *, code: int = 429, retry_after: int = 1,
                  description: str = "", when: Callable[[dict[str, Any]], bool] | None = None) -> None:
        """Answer the next `times` calls of `method` (those whose parameters satisfy `when`) with an error;
        a 429 carries `parameters.retry_after` like Telegram's flood control."""
        parameters = {"retry_after": retry_after} if code == 429 else None
        text = description or (f"Too Many Requests: retry after {retry_after}" if code == 429 else "Bad Request")
        with self._cond:
            self._failures.setdefault(method, []).extend(
                (ApiError(code, text, parameters), when or (lambda params: True)) for _ in range(times))

    # -- inspection -----------------------------------------------------------------------------------------
    def calls_of(self, method: str, chat_id: int | None = None, ok: bool | None = True) -> list[Call]:
        with self._cond:
            calls = list(self.calls)
        return [c for c in calls if c.method == method and (chat_id is None or c.chat_id == chat_id)
                and (ok is None or c.ok == ok)]

    def sent_to(self, chat_id: int) -> list[Call]:
        """Successful calls that put something into a chat, in order."""
        with self._cond:
            calls = list(self.calls)
        return [c for c in calls if c.ok and c.chat_id == chat_id and c.method.startswith(("send", "edit"))]

    # -- the API ----------------------------------------------------------------------------------------------
    def _dispatch(self, path: str, content_type: str, raw: bytes) -> tuple[int, dict[str, Any]]:
        match = re.fullmatch(r"/bot([^/]+)/(\w+)", path.split("?", 1)[0])
        if match is None:
            return 404, {"ok": False, "error_code": 404, "description": "Not Found"}
        token, method = match.groups()
        try:
            params, files = _decode_params(content_type, raw)
        except ValueError:
            return 400, {"ok": False, "error_code": 400, "description": "Bad Request: can't parse request"}
        call = Call(method, params, files, time.monotonic())
        try:
            if token != self.token:
                raise ApiError(401, "Unauthorized")
            self._scripted_failure(method, params)
            handler: Callable[[dict[str, Any], dict[str, tuple[str, bytes]]], Any] | None = getattr(
                self, f"_api_{method}", None)
            if handler is None:
                raise ApiError(404, "Not Found: method not found")
            call.status, call.result = 200, handler(params, files)
            payload: dict[str, Any] = {"ok": True, "result": call.result}
        except ApiError as error:
            call.status = error.code
            payload = {"ok": False, "error_code": error.code, "description": error.description}
            if error.parameters:
                payload["parameters"] = error.parameters
        if method != "getUpdates" or call.result:  # empty long polls would drown the log
            with self._cond:
                self.calls.append(call)
        return call.status, payload

    def _scripted_failure(self, method: str, params: dict[str, Any]) -> None:
        with self._cond:
            pending = self._failures.get(method) or []
            found = next((i for i, (_, when) in enumerate(pending) if when(params)), None)
            error = pending.pop(found)[0] if found is not None else None
        if error is not None:
            raise error

    def _api_getMe(self, params: dict[str, Any], files: dict) -> dict[str, Any]:
        return self.bot_user()

    def _api_getUpdates(self, params: dict[str, Any], files: dict) -> list[dict[str, Any]]:
        if self.webhook["url"]:
            raise ApiError(409, "Conflict: can't use getUpdates method while webhook is active")
        offset = int(params.get("offset") or 0)
        wait = min(float(params.get("timeout") or 0), 0.5)
        deadline = time.monotonic() + wait
        with self._cond:
            while True:
                if offset:  # confirms every update before it, like Telegram
                    self._updates = [u for u in self._updates if u["update_id"] >= offset]
                if self._updates or time.monotonic() >= deadline or self._server is None:
                    batch = self._updates[: int(params.get("limit") or 100)]
                    self._updates = self._updates[len(batch):] if not offset else self._updates
                    return [json.loads(json.dumps(u)) for u in batch]
                self._cond.wait(max(0.0, deadline - time.monotonic()))

    def _api_setWebhook(self, params: dict[str, Any], files: dict) -> bool:
        self.webhook = {"url": params.get("url") or "", "secret_token": params.get("secret_token"),
                        "allowed_updates": params.get("allowed_updates")}
        return True

    def _api_deleteWebhook(self, params: dict[str, Any], files: dict) -> bool:
        self.webhook = {"url": ""}
        return True

    def _api_getWebhookInfo(self, params: dict[str, Any], files: dict) -> dict[str, Any]:
        return {"url": self.webhook["url"], "has_custom_certificate": False, "pending_update_count": 0}

    def _api_setMyCommands(self, params: dict[str, Any], files: dict) -> bool:
        return True

    def _api_sendChatAction(self, params: dict[str, Any], files: dict) -> bool:
        return True

    def _api_answerCallbackQuery(self, params: dict[str, Any], files: dict) -> bool:
        """Telegram's checks: a query id it handed out, answered once; text of at most 200 characters."""
        with self._cond:
            known = params.get("callback_query_id") in self._queries
            self._queries.discard(params.get("callback_query_id"))
        if not known:
            raise ApiError(400, "Bad Request: query is too old and response timeout expired or query ID is invalid")
        if len(params.get("text") or "") > 200:
            raise ApiError(400, "Bad Request: MESSAGE_TOO_LONG")
        return True

    def _check_text(self, params: dict[str, Any], key: str, limit: int) -> None:
        text = params.get(key)
        if text is None:
            if key == "text":
                raise ApiError(400, "Bad Request: message text is empty")
            return
        visible = text
        if str(params.get("parse_mode") or "").upper() == "HTML":
            visible, error = _parse_html(text)
            if error:
                raise ApiError(400, f"Bad Request: {error}")
        if key == "text" and not visible.strip():
            raise ApiError(400, "Bad Request: message text is empty")
        if len(visible) > limit:
            raise ApiError(400, "Bad Request: message is too long" if key == "text" else
                           "Bad Request: message caption is too long")

    def _new_message(self, params: dict[str, Any], **content: Any) -> dict[str, Any]:
        chat_id = int(params["chat_id"])
        with self._cond:
            chat = self._chats.get(chat_id) or {"id": chat_id, "type": "private" if chat_id > 0 else "supergroup"}
        message: dict[str, Any] = {"message_id": self._next_message_id(chat_id), "date": int(time.time()),
                                   "chat": chat, "from": self.bot_user(), **content}
        if params.get("message_thread_id"):
            message["message_thread_id"] = int(params["message_thread_id"])
            message["is_topic_message"] = True
        if params.get("reply_markup"):
            message["reply_markup"] = params["reply_markup"]
        return message

    def _api_sendMessage(self, params: dict[str, Any], files: dict) -> dict[str, Any]:
        self._check_text(params, "text", MAX_TEXT)
        return self._new_message(params, text=params["text"])

    def _api_sendMessageDraft(self, params: dict[str, Any], files: dict) -> bool:
        """Bot API 9.3+: a draft (0-4,096 characters; empty shows "Thinking…") in a private chat; draft_id != 0."""
        if not self.drafts_supported:
            raise ApiError(404, "Not Found")
        chat_id = int(params["chat_id"])
        with self._cond:
            chat = self._chats.get(chat_id) or {"type": "private" if chat_id > 0 else "supergroup"}
        if chat["type"] != "private":
            raise ApiError(400, "Bad Request: TEXTDRAFT_PEER_INVALID")
        if not int(params.get("draft_id") or 0):
            raise ApiError(400, "Bad Request: draft_id must be non-zero")
        if params.get("text"):
            self._check_text(params, "text", MAX_TEXT)
        return True

    def _api_deleteMessage(self, params: dict[str, Any], files: dict) -> bool:
        chat_id, message_id = int(params["chat_id"]), int(params["message_id"])
        with self._cond:
            sent = [c for c in self.calls if c.ok and c.method.startswith("send") and c.chat_id == chat_id
                    and isinstance(c.result, dict) and c.result.get("message_id") == message_id]
            if not sent or (chat_id, message_id) in self._deleted:
                raise ApiError(400, "Bad Request: message to delete not found")
            self._deleted.add((chat_id, message_id))
        return True

    def deleted(self, chat_id: int, message_id: int) -> bool:
        with self._cond:
            return (chat_id, message_id) in self._deleted

    def _api_editMessageText(self, params: dict[str, Any], files: dict) -> dict[str, Any]:
        self._check_text(params, "text", MAX_TEXT)
        previous = [c for c in self.calls_of("sendMessage", int(params["chat_id"]))
                    if c.result["message_id"] == int(params["message_id"])]
        if not previous or self.deleted(int(params["chat_id"]), int(params["message_id"])):
            raise ApiError(400, "Bad Request: message to edit not found")
        edits = [c for c in self.calls_of("editMessageText", int(params["chat_id"]))
                 if int(c.params["message_id"]) == int(params["message_id"])]
        last = (edits or previous)[-1].params
        if last.get("text") == params.get("text") and last.get("reply_markup") == params.get("reply_markup"):
            raise ApiError(400, "Bad Request: message is not modified: specified new message content and reply "
                                "markup are exactly the same as a current content and reply markup of the message")
        return {**previous[0].result, "text": params["text"], "edit_date": int(time.time())}

    def _upload(self, files: dict[str, tuple[str, bytes]], field_name: str) -> tuple[str, bytes]:
        if field_name not in files:
            raise ApiError(400, f"Bad Request: there is no {field_name} in the request")
        name, data = files[field_name]
        if not data:
            raise ApiError(400, "Bad Request: file must be non-empty")
        return name, data

    def _api_sendDocument(self, params: dict[str, Any], files: dict) -> dict[str, Any]:
        self._check_text(params, "caption", 1024)
        name, data = self._upload(files, "document")
        return self._new_message(params, document={"file_id": f"doc-{len(self.calls)}", "file_unique_id": "u",
                                                   "file_name": name, "file_size": len(data)})

    def _api_sendPhoto(self, params: dict[str, Any], files: dict) -> dict[str, Any]:
        self._check_text(params, "caption", 1024)
        name, data = self._upload(files, "photo")
        if not data.startswith((b"\x89PNG", b"\xff\xd8", b"GIF8", b"RIFF")):
            raise ApiError(400, "Bad Request: IMAGE_PROCESS_FAILED")
        return self._new_message(params, photo=[{"file_id": f"photo-{len(self.calls)}", "file_unique_id": "p",
                                                 "width": 4, "height": 4, "file_size": len(data)}])


FakeTelegram.handler = _Handler
