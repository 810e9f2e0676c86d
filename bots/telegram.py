"""Telegram adapter (python-telegram-bot v22): private chats, groups and forum topics.

Updates come by long polling (default) or, with TELEGRAM_WEBHOOK_URL, at `POST /telegram/webhook` of `serve`
(checked against the secret token given to setWebhook). A task is stored with the scheduler before the update is
acknowledged; the chat then sees one progress message edited as steps run (paced per chat), which then becomes
the answer (in a private chat a longer answer is first streamed with sendMessageDraft, then sent as a new message
that replaces the progress message); the execution log is one reply to it (a `.md` document, bots/run_log.py,
with a summary caption), and the run's files follow as photos or documents. `/settings` shows and (for admins)
changes the chat's settings (agent_core/channel_settings.py).
PTB's AIORateLimiter spaces the requests and honours RetryAfter.

Documents and photos users send (the caption is the task): the run is submitted *held* before the update handler
returns, then each file is fetched — getFile, then its bytes streamed with httpx from the configured Bot API
server's file URL, or read from a `--local` server's directory — into agent_core/uploads.py, by the one delivery
that stored the run. The public Bot API's 20 MB limit and AUTOCODE_INPUT_MAX_MB are told to the chat.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import re
import secrets
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Coroutine
from urllib.parse import urlsplit

import httpx

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from telegram import (
    BotCommand, CallbackQuery, Chat, InlineKeyboardButton, InlineKeyboardMarkup, InputFile, Message, MessageEntity,
    ReplyParameters, Update, User,
)
from telegram.constants import ChatType, ParseMode
from telegram.error import BadRequest, Forbidden, InvalidToken, TelegramError
from telegram.ext import AIORateLimiter, Application, ApplicationBuilder, ContextTypes, TypeHandler

from agent_core import uploads
from agent_core.budget import monthly_status
from agent_core.channel_settings import SettingError, scope_of
from agent_core.pricing import prices_for, spend
from agent_core.events import ApprovalDecided, ApprovalRequested, RunEvent, RunFinished
from agent_core.scheduler import INTERRUPTED_MESSAGE
from bots import Runtime
from bots.telegram_routines import PREFIX as ROUTINE_PREFIX, TelegramRoutines
from bots.permissions import may_act_on_run, may_change_settings, refusal_text
from bots.run_log import log_to_post
from bots.telegram_render import (
    SETTINGS_USAGE, AnswerPlan, FilesReceived, Progress, answer_plan, approval_text, draft_texts, failure_text,
    html_to_plain,
    log_caption, settings_text,
)

log = logging.getLogger(__name__)
# httpx logs every request URL at INFO, and Bot API URLs contain the token.
logging.getLogger("httpx").setLevel(logging.WARNING)
# PTB logs its Bot API URL (token included) at DEBUG from these loggers.
_PTB_BOT_LOGGERS = ("telegram.Bot", "telegram.ext.ExtBot")

NAME = "telegram"
WEBHOOK_PATH = "/telegram/webhook"
SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"
ALLOWED_UPDATES = ["message", "callback_query"]
COMMANDS = [
    ("run", "Run a task: /run what to do"),
    ("cancel", "Cancel your running task"),
    ("history", "Recent tasks in this conversation"),
    ("usage", "LLM tokens and their cost"),
    ("settings", "This chat's settings (model, tools, budget)"),
    ("every", "A task on a schedule: /every monday 9:00 TASK"),
    ("routines", "This chat's routines (tasks on a schedule)"),
    ("reset", "Forget this conversation's history and files"),
    ("help", "How to use AutoCode"),
]
HELP = (
    "I am AutoCode: I plan a task as small Python steps, run them in a sandbox and answer.\n\n"
    "In a private chat, just send the task. In a group, use /run TASK, mention me, or reply to one of my "
    "messages. Each forum topic is its own conversation.\n\n"
    "Send a document or photo with the task as its caption (in a private chat, a file alone will do): the steps "
    "read it, and follow-ups here can use it again.\n\n"
    "/cancel stops your running task · /history lists recent tasks · /usage shows tokens and their cost · "
    "/settings shows this chat's model, tools and budget (admins change them) · "
    "/every monday 9:00 TASK repeats a task on a schedule, /routines lists them · "
    "/reset forgets this conversation's history and files."
)
FILES_TASK = "Analyse the attached file and tell me what it contains."
PUBLIC_API_HOST = "api.telegram.org"
PUBLIC_API_FILE_MB = 20  # what the public Bot API downloads; a local Bot API server in --local mode lifts it
PUBLIC_API_HINT = ("Telegram's public Bot API serves bots files up to 20 MB; the operator can lift that with a "
                   "local Bot API server in --local mode (TELEGRAM_API_URL; see \"Files\" in docs/telegram.md).")
LOCAL_MODE_HINT = ("The Bot API server gave a path on its own disk (--local mode) that AutoCode cannot read: mount "
                   "its working directory into serve at the same path (see \"Files\" in docs/telegram.md).")
DOWNLOAD_CHUNK = 256 * 1024
PRIVATE_EDIT_SECONDS = 1.0  # ~1 message/s per chat
GROUP_EDIT_SECONDS = 3.0  # groups allow ~20 messages/min
DRAFT_SECONDS = 0.4  # between the drafts of a streamed answer (private chats)
DRAFT_MIN_CHARS = 160  # a shorter answer is sent at once: streaming it would only delay it
CONNECT_RETRY_S = 15  # when the Bot API is unreachable at start
IMAGE_TYPES = {"image/png", "image/jpeg", "image/gif", "image/webp"}
MAX_PHOTO_BYTES = 10 * 1024 * 1024
SEEN_UPDATES = 4096
_COMMAND = re.compile(r"^/([A-Za-z0-9_]{1,32})(?:@([A-Za-z0-9_]{1,64}))?(?:\s+(.*))?$", re.DOTALL)
_STATUS_MARKS = {"held": "📥", "queued": "🕒", "running": "⏳", "succeeded": "✅", "failed": "❌", "cancelled": "🚫",
                 "interrupted": "⚠️"}


def parse_command(text: str) -> tuple[str, str | None, str] | None:
    """`/name@target rest` → (name, target, rest); None when the text is not a command."""
    match = _COMMAND.match(text.strip())
    if match is None:
        return None
    name, target, rest = match.groups()
    return name.lower(), target, (rest or "").strip()


def conversation_key(chat_id: int, thread_id: int | None) -> str:
    return f"telegram:{chat_id}" if thread_id is None else f"telegram:{chat_id}:{thread_id}"


def _topic(message: Message) -> int | None:
    """The forum topic of a message (only real topic messages: replies in plain groups carry thread ids too)."""
    return message.message_thread_id if message.is_topic_message and message.message_thread_id else None


def _files_of(message: Message) -> list[tuple[str, str, int | None]]:
    """(name the user gave, file_id, stated size) of a message's document, or of its photo's largest size."""
    if message.document is not None:
        document = message.document
        return [(document.file_name or f"document-{document.file_unique_id}", document.file_id, document.file_size)]
    if message.photo:
        largest = max(message.photo, key=lambda size: (size.width * size.height, size.file_size or 0))
        return [(f"photo-{largest.file_unique_id}.jpg", largest.file_id, largest.file_size)]
    return []


def size_refusal(files: list[tuple[str, str, int | None]], max_mb: int, max_files: int,
                 public_api: bool) -> str | None:
    """The reply when the sizes Telegram states for a message's files are over a limit (nothing is downloaded or
    run then): AUTOCODE_INPUT_MAX_MB, the public Bot API's 20 MB, AUTOCODE_INPUT_MAX_FILES."""
    for name, _, size in files:
        if size is not None and size > max_mb * 1024 * 1024:
            return (f"{name} is {size / 1048576:.1f} MB, over the limit of {max_mb} MB a file "
                    "(AUTOCODE_INPUT_MAX_MB); nothing was run.")
        if size is not None and size > PUBLIC_API_FILE_MB * 1024 * 1024 and public_api:
            return f"{name} is {size / 1048576:.1f} MB. {PUBLIC_API_HINT} Nothing was run."
    if len(files) > max_files:
        return f"More than the {max_files} files a task can take (AUTOCODE_INPUT_MAX_FILES); nothing was run."
    return None


def _names_of(*ids: Any, username: str | None = None) -> set[str]:
    names = {str(i) for i in ids if i is not None}
    if username:
        names.add(username.lower())
    return names


def _allowlist(values: frozenset[str]) -> set[str]:
    return {v.strip().lstrip("@").lower() for v in values}


class _RedactToken(logging.Filter):
    """Replaces the bot token in log records (even `autocode -v` must not write it anywhere)."""

    def __init__(self, token: str):
        super().__init__()
        self.token = token

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if self.token and self.token in message:
            record.msg, record.args = message.replace(self.token, "<TELEGRAM_BOT_TOKEN>"), None
        return True


class _Pacer:
    """At most one progress edit per interval and chat (slower in groups)."""

    def __init__(self) -> None:
        self._next: dict[int, float] = {}

    def delay(self, chat_id: int) -> float:
        return max(0.0, self._next.get(chat_id, 0.0) - time.monotonic())

    def mark(self, chat_id: int, group: bool) -> None:
        self._next[chat_id] = time.monotonic() + (GROUP_EDIT_SECONDS if group else PRIVATE_EDIT_SECONDS)


@dataclass
class _RunView:
    """One run's rendering: its events queue up here and one task turns them into Telegram calls."""

    run_id: str
    progress: Progress
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    shown: str = ""
    finished_queued: bool = False
    task: asyncio.Task | None = None

    def push(self, event: RunEvent) -> None:
        if isinstance(event, RunFinished):
            self.finished_queued = True
        self.queue.put_nowait(event)


class _CannotConnect(Exception):
    def __init__(self, message: str, retry: bool = True):
        super().__init__(message)
        self.retry = retry


class TelegramAdapter:
    """The Telegram front door of `autocode serve`."""

    name = NAME
    start_problem: str | None = None  # why start() left it unconnected (serve's ready line names it), or None

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.settings = runtime.settings
        self.storage = runtime.storage
        self.scheduler = runtime.scheduler
        self.webhook_mode = bool(self.settings.telegram_webhook_url)
        # Telegram sends back whatever secret we register; without one configured, a fresh one per start.
        self._secret = self.settings.telegram_webhook_secret or secrets.token_urlsafe(32)
        self._allowed_chats = _allowlist(self.settings.telegram_allowed_chats)
        self._allowed_users = _allowlist(self.settings.telegram_allowed_users)
        self._admins = frozenset(self.settings.telegram_admin_users)  # numeric ids only: usernames change hands
        self.routines_ui = TelegramRoutines(self)  # /routines, /every
        self.app = self._build_application()
        self._ready = asyncio.Event()
        self._closed = False
        self._retrying: asyncio.Task | None = None
        self._username = ""
        self._bot_id = 0
        self._views: dict[str, _RunView] = {}
        self._done: OrderedDict[str, None] = OrderedDict()  # runs rendered to the end, or not ours
        self._seen: OrderedDict[int, None] = OrderedDict()  # update ids already handled
        self._tasks: set[asyncio.Task] = set()
        self._receiving: dict[str, asyncio.Task] = {}  # held run -> the task fetching its files
        self._pacer = _Pacer()
        self._approval_messages: dict[tuple[str, int], int] = {}  # (run, number) -> the message with the buttons
        self._drafts = True  # sendMessageDraft works here; off once the Bot API server refused it
        runtime.events.subscribe(self._on_event)

    def _build_application(self) -> Application:
        redact = _RedactToken(self.settings.telegram_bot_token or "")
        for name in (*_PTB_BOT_LOGGERS, __name__):
            logging.getLogger(name).addFilter(redact)
        builder = ApplicationBuilder().token(self.settings.telegram_bot_token or "")
        builder = builder.rate_limiter(AIORateLimiter(max_retries=3))
        api = (self.settings.telegram_api_url or "").rstrip("/")
        if api:
            builder = builder.base_url(f"{api}/bot").base_file_url(f"{api}/file/bot")
        if self.webhook_mode:
            builder = builder.updater(None)
        app = builder.build()
        app.add_handler(TypeHandler(Update, self._on_update))
        app.add_error_handler(self._on_error)
        return app

    # --- life cycle ---------------------------------------------------------------------------------------------
    @property
    def routes(self) -> list[BaseRoute]:
        return [Route(WEBHOOK_PATH, self._webhook, methods=["POST"])] if self.webhook_mode else []

    async def start(self) -> None:
        """Connect; when the Bot API cannot be reached, keep serving (other adapters, the API) and retry."""
        try:
            await self._connect()
        except _CannotConnect as exc:
            self.start_problem = str(exc)
            if not exc.retry:
                log.error("%s", exc)
                return
            self.start_problem += f"; retrying every {CONNECT_RETRY_S} s"
            log.error("%s; retrying every %d s", exc, CONNECT_RETRY_S)
            self._retrying = asyncio.create_task(self._keep_connecting(), name="telegram-connect")

    async def _keep_connecting(self) -> None:
        said = ""  # one line per change of what goes wrong, not one per attempt
        while True:
            await asyncio.sleep(CONNECT_RETRY_S)
            try:
                await self._connect()
                return
            except _CannotConnect as exc:
                log.log(logging.DEBUG if str(exc) == said else logging.WARNING, "%s", exc)
                said = str(exc)
                if not exc.retry:
                    return

    @property
    def status(self) -> str:
        """"up", "connecting" (the Bot API unreachable, retried in the background) or "off" (token rejected)."""
        if self._ready.is_set():
            return "up"
        return "connecting" if self._retrying is not None and not self._retrying.done() else "off"

    async def _connect(self) -> None:
        try:
            await self.app.initialize()  # getMe
        except InvalidToken:
            raise _CannotConnect("Telegram rejected TELEGRAM_BOT_TOKEN; check it with @BotFather", retry=False) from None
        except TelegramError as exc:
            raise _CannotConnect(f"telegram: the Bot API is not reachable ({exc})") from None
        self._username, self._bot_id = self.app.bot.username, self.app.bot.id
        self.start_problem = None
        try:
            await self.app.bot.set_my_commands([BotCommand(name, text) for name, text in COMMANDS])
        except TelegramError as exc:
            log.warning("telegram: setMyCommands failed: %s", exc)
        try:
            if self.webhook_mode:
                await self.app.bot.set_webhook(self.settings.telegram_webhook_url, secret_token=self._secret,
                                               allowed_updates=ALLOWED_UPDATES)
            await self.app.start()
            if not self.webhook_mode:  # start_polling deletes any webhook first
                await self.app.updater.start_polling(allowed_updates=ALLOWED_UPDATES,
                                                     error_callback=self._on_polling_error)
        except TelegramError as exc:
            if self.app.running:
                await self.app.stop()
            await self.app.shutdown()
            what = "setWebhook" if self.webhook_mode else "deleteWebhook"
            raise _CannotConnect(f"telegram: {what} failed at start ({exc})") from None
        self._ready.set()
        log.info("telegram: @%s ready (%s)", self._username, "webhook" if self.webhook_mode else "long polling")

    async def stop(self) -> None:
        self._closed = True
        if self._retrying is not None:
            self._retrying.cancel()
            await asyncio.gather(self._retrying, return_exceptions=True)
        if self.app.updater is not None and self.app.updater.running:
            await self.app.updater.stop()
        # Let answers being sent right now go out; views still waiting for events end here.
        finishing = [v.task for v in self._views.values() if v.finished_queued and v.task] + list(self._tasks)
        if finishing:
            await asyncio.wait(finishing, timeout=10)
        ending = [v.task for v in self._views.values() if v.task] + [*self._tasks, *self._receiving.values()]
        for task in ending:
            task.cancel()
        if self.app.running:
            await self.app.stop()
        await self.app.shutdown()

    async def notify_interrupted(self, run: dict[str, Any]) -> None:
        """The run's progress message becomes the stored reason (a held run's says its files never arrived and
        nothing ran: HELD_INTERRUPTED_MESSAGE); without one that can be edited, the reason replies to the task."""
        route = self.storage.reply_to(run["id"])
        if not route.get("chat_id"):
            return
        text = run.get("error") or INTERRUPTED_MESSAGE
        if route.get("progress_message_id") and await self._edit(route, route["progress_message_id"], text,
                                                                 markup=None):
            return
        await self._send(route, text, reply_to=route.get("message_id"))

    # --- incoming ---------------------------------------------------------------------------------------------
    async def _webhook(self, request: Request) -> Response:
        sent = request.headers.get(SECRET_HEADER, "")
        if not hmac.compare_digest(sent.encode(), self._secret.encode()):
            return Response("forbidden", status_code=403)
        if not self._ready.is_set() or self._closed:
            return Response("starting", status_code=503)  # Telegram delivers it again later
        try:
            update = Update.de_json(await request.json(), self.app.bot)
        except (ValueError, TypeError, KeyError):
            return Response("bad update", status_code=400)
        await self.app.process_update(update)  # stores the task before Telegram gets its 200
        return Response("ok")

    async def _on_update(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        if self._already_seen(update.update_id):
            return
        if update.callback_query is not None:
            self._handle_callback(update.callback_query)
        elif update.message is not None:
            self._handle_message(update.update_id, update.message)

    def _already_seen(self, update_id: int) -> bool:
        if update_id in self._seen:
            return True
        self._seen[update_id] = None
        if len(self._seen) > SEEN_UPDATES:
            self._seen.popitem(last=False)
        return False

    def _handle_message(self, update_id: int, message: Message) -> None:
        user = message.from_user
        if user is None or user.is_bot:
            return
        chat = message.chat
        private = chat.type == ChatType.PRIVATE
        route = {"chat_id": chat.id, "thread_id": _topic(message), "message_id": message.message_id,
                 "chat_type": chat.type, "user_id": user.id}
        if message.reply_to_message is not None:  # `/every …` replying to an answer repeats that run
            route["replied_to"] = message.reply_to_message.message_id
        files = _files_of(message)
        text = message.text if message.text is not None else message.caption
        if text is None and not files:
            if private:
                self._spawn(self._send(route, "Please send the task as a text message, or a file with the task "
                                              "as its caption.", reply_to=message.message_id))
            return
        text = text or ""
        command = parse_command(text)
        if command is not None:
            name, target, rest = command
            if target is not None and target.lower() != self._username.lower():
                return  # /cmd@OtherBot
            if name != "run" and not hasattr(self, f"_command_{name}") and not (private or target):
                return  # an unknown general command in a group is probably another bot's
            task: str | None = rest if name == "run" else None
            if files and name != "run":
                return  # a file with another command as its caption: not a task
        else:
            name, task = "", self._addressed_text(message, private)
            if task is None:
                return  # group chatter not meant for the bot
        refusal = self._refusal(chat, user)
        if refusal:
            self._spawn(self._send(route, refusal, reply_to=message.message_id))
            return
        if name and name != "run":
            handler = getattr(self, f"_command_{name}", None)
            reply = handler(route, user, rest) if handler else \
                "I don't know that command; /help lists what I understand."
            self._spawn(self._answer_command(route, reply))
            return
        if files:
            self._submit_with_files(update_id, route, user, (task or "").strip() or FILES_TASK, files)
            return
        self._submit(update_id, route, user, task or "")

    def _addressed_text(self, message: Message, private: bool) -> str | None:
        """The task in a message addressed to the bot (private chat, mention, reply to the bot), else None. A
        document's or photo's caption is its text."""
        text = message.text if message.text is not None else (message.caption or "")
        if private:
            return text
        parse = message.parse_entities if message.text is not None else message.parse_caption_entities
        mentions = [found for entity, found in parse(
            [MessageEntity.MENTION, MessageEntity.TEXT_MENTION]).items()
            if (entity.type == MessageEntity.MENTION and found[1:].lower() == self._username.lower())
            or (entity.user is not None and entity.user.id == self._bot_id)]
        for found in mentions:
            text = text.replace(found, " ", 1)
        replied = message.reply_to_message
        to_bot = (replied is not None and replied.from_user is not None and replied.from_user.id == self._bot_id
                  and replied.forum_topic_created is None)
        return text.strip() if mentions or to_bot else None

    def _refusal(self, chat: Chat, user: User) -> str | None:
        if self._allowed_chats and not _names_of(chat.id, username=chat.username) & self._allowed_chats:
            return "Sorry, AutoCode is not enabled in this chat."
        if self._allowed_users and not _names_of(user.id, username=user.username) & self._allowed_users:
            return "Sorry, you are not on the list of people who may use this AutoCode bot."
        return None

    def _submit(self, update_id: int, route: dict[str, Any], user: User, task: str) -> None:
        if not task.strip():
            self._spawn(self._send(route, "Send /run followed by what you want done, e.g. /run sum 1 to 100.",
                                   reply_to=route["message_id"]))
            return
        submission = self.scheduler.submit(
            task, conversation_key(route["chat_id"], route["thread_id"]), user=f"telegram:{user.id}",
            adapter=NAME, delivery_id=f"telegram:{self._bot_id}:{update_id}", reply_to=route)
        if submission.status == "refused":
            self._spawn(self._send(route, submission.message, reply_to=route["message_id"]))
        elif submission.status == "queued" and submission.run_id:
            run = self.storage.get_run(submission.run_id)
            if run is not None:
                self._open_view(run)
        # duplicate: the first delivery already answers

    def _submit_with_files(self, update_id: int, route: dict[str, Any], user: User, task: str,
                           files: list[tuple[str, str, int | None]]) -> None:
        """A task with a document or photo: sizes Telegram states are checked first (a reply, nothing runs); the
        run is stored held before the update is acknowledged, then each file is fetched (getFile, then its bytes
        streamed) into agent_core/uploads.py — only by the delivery that stored the run, so a retried update never
        downloads twice."""
        too_big = size_refusal(files, self.settings.input_max_mb, self.settings.input_max_files, self._public_api)
        if too_big:
            self._spawn(self._send(route, too_big, reply_to=route["message_id"]))
            return
        route = {**route, "files": [name for name, _, _ in files]}
        submission = self.scheduler.submit(
            task, conversation_key(route["chat_id"], route["thread_id"]), user=f"telegram:{user.id}",
            adapter=NAME, delivery_id=f"telegram:{self._bot_id}:{update_id}", reply_to=route, hold=True)
        if submission.status == "refused":
            self._spawn(self._send(route, submission.message, reply_to=route["message_id"]))
        elif submission.status == "held" and submission.run_id:
            run = self.storage.get_run(submission.run_id)
            if run is not None:
                self._open_view(run)
            task_ = asyncio.create_task(self._receive(submission.run_id, files), name=f"telegram-files-{update_id}")
            self._receiving[submission.run_id] = task_
            task_.add_done_callback(lambda _, run_id=submission.run_id: self._receiving.pop(run_id, None))
        # duplicate: the delivery that stored the run downloads its files and answers

    @property
    def _public_api(self) -> bool:
        """Whether files come from Telegram's public Bot API (its 20 MB download limit applies)."""
        api = self.settings.telegram_api_url
        return not api or (urlsplit(api).hostname or "").lower() == PUBLIC_API_HOST

    async def _receive(self, run_id: str, files: list[tuple[str, str, int | None]]) -> None:
        """Fetch the held run's files into its receiver (which releases or fails the run on leaving)."""
        try:
            await self._ready.wait()
            async with uploads.receiving(self.scheduler, run_id) as receiver:
                for name, file_id, _ in files:
                    await receiver.add(name, self._file_chunks(name, file_id))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("telegram: receiving the files of run %s failed", run_id)
            return
        view = self._views.get(run_id)
        if receiver.released and view is not None:
            view.push(FilesReceived())

    async def _file_chunks(self, name: str, file_id: str) -> AsyncIterator[bytes]:
        """The file's bytes as they arrive. PTB's own `File.download_*` reads a file whole into memory (its
        request class returns the body as bytes), so the bytes are streamed with httpx from the configured Bot API
        server's file URL, or read from disk when a local Bot API server in --local mode gives a path on it. No
        retry: a download cut midway fails the run with a message rather than storing a part twice."""
        try:
            found = await self.app.bot.get_file(file_id)
        except BadRequest as exc:
            if "too big" in exc.message.lower():
                raise uploads.DownloadFailed(f"{name} is too big to download. {PUBLIC_API_HINT} Nothing was run.") \
                    from None
            raise uploads.DownloadFailed(f"Telegram would not hand over {name} ({exc.message}); nothing was run.") \
                from None
        except TelegramError as exc:
            raise uploads.DownloadFailed(f"{name} could not be fetched from Telegram ({type(exc).__name__}); "
                                         "nothing was run. Please send it again.") from None
        where = found.file_path or ""
        if where.startswith("/"):  # PTB leaves an absolute path as it is when that file exists here (--local mode)
            async for chunk in self._local_chunks(name, where):
                yield chunk
            return
        base = self.app.bot.base_file_url  # the token is in it: the bytes come from this server only
        if not where.startswith(base + "/"):
            raise uploads.DownloadFailed(f"{name} has no download link on this Bot API server; nothing was run.")
        try:
            async with httpx.AsyncClient(timeout=httpx.Timeout(60, connect=10)) as client:
                async with client.stream("GET", where) as response:
                    if response.status_code != 200:
                        hint = f" {LOCAL_MODE_HINT}" if where.startswith(base + "//") else " Please send it again."
                        raise uploads.DownloadFailed(f"{name} could not be downloaded (HTTP {response.status_code}); "
                                                     f"nothing was run.{hint}")
                    async for chunk in response.aiter_bytes(DOWNLOAD_CHUNK):
                        yield chunk
        except httpx.HTTPError as exc:  # its text may hold the URL, and so the token: only its kind is told
            raise uploads.DownloadFailed(f"The download of {name} failed ({type(exc).__name__}); nothing was run. "
                                         "Please send it again.") from None

    async def _local_chunks(self, name: str, path: str) -> AsyncIterator[bytes]:
        """A --local Bot API server's file, read from the disk it shares with serve. Only a regular file inside
        the server's directory for this bot (`…/<token>/…`, where it keeps what it downloaded) is read: the path
        comes from another program, and serve's own files must never become a chat's input."""
        resolved = Path(os.path.realpath(path))
        token = self.settings.telegram_bot_token or ""
        if not token or token not in resolved.parts[:-1] or not resolved.is_file():
            raise uploads.DownloadFailed(f"{name}: the Bot API server gave a local path outside its directory for "
                                         "this bot; nothing was run.")
        try:
            handle = await asyncio.to_thread(open, resolved, "rb")
        except OSError as exc:
            raise uploads.DownloadFailed(f"{name} could not be read from the Bot API server's directory "
                                         f"({exc.strerror}); nothing was run. {LOCAL_MODE_HINT}") from None
        try:
            while chunk := await asyncio.to_thread(handle.read, DOWNLOAD_CHUNK):
                yield chunk
        finally:
            handle.close()

    def _handle_callback(self, query: CallbackQuery) -> None:
        self._spawn(self._callback(query))

    async def _callback(self, query: CallbackQuery) -> None:
        data = query.data or ""
        if data.startswith(("approve:", "deny:")):
            await self._approval_callback(query, data)
            return
        if data.startswith(ROUTINE_PREFIX):  # Save / Cancel under an /every proposal
            await self.routines_ui.callback(query, data)
            return
        if not data.startswith("cancel:"):
            await self._answer_query(query, "")
            return
        run_id = data.removeprefix("cancel:")
        run = self.storage.get_run(run_id)
        chat = query.message.chat if query.message is not None else None
        route = self.storage.reply_to(run_id) if run else {}
        if run is None or run["adapter"] != NAME or chat is None or route.get("chat_id") != chat.id:
            await self._answer_query(query, "This task is not known here.")
            return
        refusal = self._refusal(chat, query.from_user)
        if refusal:
            await self._answer_query(query, refusal)
            return
        if not may_act_on_run(run["user"], f"telegram:{query.from_user.id}", str(query.from_user.id), self._admins):
            await self._answer_query(query, refusal_text("cancel", None, "task"), alert=True)
            return
        if run["status"] not in ("held", "queued", "running"):
            await self._answer_query(query, "This task has already finished.")
            return
        await self._answer_query(query, "Cancelling…")
        await self._cancel(run_id)

    # --- approvals of `confirm` tools (agent_core/approvals.py) -----------------------------------------
    async def _show_approval(self, run: dict[str, Any], event: ApprovalRequested | ApprovalDecided) -> None:
        """The call with Approve / Deny for the requester (a reply to the task); once decided, the same message
        says what happened and loses its buttons."""
        route = self.storage.reply_to(run["id"])
        if not route.get("chat_id"):
            return
        key = (run["id"], event.number)
        if isinstance(event, ApprovalRequested):
            text = approval_text(event.tool, event.call, event.arguments, event.timeout_s)
            markup = InlineKeyboardMarkup([[
                InlineKeyboardButton("Approve", callback_data=f"approve:{run['id']}:{event.number}"),
                InlineKeyboardButton("Deny", callback_data=f"deny:{run['id']}:{event.number}")]])
            sent = await self._send(route, text, plain=html_to_plain(text), reply_to=route.get("message_id"),
                                    markup=markup)
            if sent is not None:
                self._approval_messages[key] = sent.message_id
            return
        message_id = self._approval_messages.pop(key, None)
        if message_id is None:
            return
        words = {"approved": "✅ approved", "denied": "🚫 denied", "timeout": "⌛ not approved in time (denied)",
                 "cancelled": "🚫 the task was cancelled", "interrupted": "⚠️ interrupted by a restart"}
        who = f" by {event.by.split(':')[-1]}" if event.by and event.decision in ("approved", "denied") else ""
        await self._edit(route, message_id, f"{event.tool}: {words.get(event.decision, event.decision)}{who}.",
                         markup=None)

    async def _approval_callback(self, query: CallbackQuery, data: str) -> None:
        verb, _, rest = data.partition(":")
        run_id, _, number = rest.rpartition(":")
        run = self.storage.get_run(run_id)
        chat = query.message.chat if query.message is not None else None
        route = self.storage.reply_to(run_id) if run else {}
        if run is None or run["adapter"] != NAME or chat is None or route.get("chat_id") != chat.id \
                or not number.isdigit():
            await self._answer_query(query, "This approval is not known here.")
            return
        if not may_act_on_run(run["user"], f"telegram:{query.from_user.id}", str(query.from_user.id), self._admins):
            await self._answer_query(query, "Only the person who asked for this task (or an admin) may decide.",
                                     alert=True)
            return
        who = f"telegram:{query.from_user.username or query.from_user.id}"
        decided = self.runtime.approvals.decide(run_id, int(number), verb == "approve", who)
        await self._answer_query(query, decided.message)

    async def _cancel(self, run_id: str) -> str | None:
        """Cancel the run; a held run's download stops too (its receiver then finds it no longer held)."""
        status = await self.scheduler.cancel(run_id)
        receiving = self._receiving.get(run_id)
        if receiving is not None:
            receiving.cancel()
        return status

    async def _answer_query(self, query: CallbackQuery, text: str, alert: bool = False) -> None:
        """Answer a button press: a short toast, or with `alert` a dialog the presser must dismiss."""
        try:
            await query.answer(text or None, show_alert=alert or None)
        except TelegramError as exc:
            log.warning("telegram: answerCallbackQuery failed: %s", exc)

    async def _on_error(self, update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        log.error("telegram: handling an update failed: %r", context.error, exc_info=context.error)

    def _on_polling_error(self, error: TelegramError) -> None:
        log.warning("telegram: getUpdates failed (PTB retries): %s", error)

    # --- commands (they return the reply text) ----------------------------------------------------------------
    def _command_start(self, route: dict[str, Any], user: User, rest: str = "") -> str:
        return HELP

    _command_help = _command_start

    def _command_reset(self, route: dict[str, Any], user: User, rest: str = "") -> str:
        removed = self.storage.clear_conversation(conversation_key(route["chat_id"], route["thread_id"]))
        return f"History and files cleared ({removed} messages). The next task starts fresh."

    def _command_history(self, route: dict[str, Any], user: User, rest: str = "") -> str:
        runs = self.storage.list_runs(conversation_key(route["chat_id"], route["thread_id"]), limit=10)
        if not runs:
            return "No tasks yet in this conversation."
        lines = [f"{_STATUS_MARKS.get(r['status'], '·')} {(r['created_at'] or '')[:16].replace('T', ' ')} "
                 f"{' '.join(r['task'].split())[:80]}" for r in runs]
        return "Recent tasks here (newest first):\n" + "\n".join(lines)

    def _command_usage(self, route: dict[str, Any], user: User, rest: str = "") -> str:
        """Tokens (last 24 h against the daily budget), this month's cost against the user's money budget
        (AUTOCODE_MONTHLY_BUDGET_PER_USER) and the chat's (its settings), and this conversation's totals."""
        conversation = conversation_key(route["chat_id"], route["thread_id"])
        key = f"telegram:{user.id}"
        used = self.scheduler.daily_tokens(key)
        budget = self.settings.daily_tokens_per_user
        lines = [f"Your LLM tokens in the last 24 hours: {used:,}" + (f" of {budget:,}." if budget else ".")]
        here = self.storage.tokens_used(conversation=conversation)
        totals = (f"This conversation: {here['runs']} tasks, {here['llm_calls']} LLM calls, "
                  f"{here['prompt_tokens'] + here['completion_tokens']:,} tokens")
        try:
            prices = prices_for(self.settings)
        except Exception as exc:  # an unreadable price table: tokens only
            log.warning("telegram: /usage without prices: %s", exc)
            return "\n".join([*lines, totals + "."])
        scope = scope_of(conversation)
        chat_budget = self.scheduler.agent.channel_settings.effective_for_scope(scope).budget_usd
        lines.append(f"You: {monthly_status(self.storage, self.settings, user=key).describe()}.")
        chat = monthly_status(self.storage, self.settings, scope=scope, budget_usd=chat_budget)
        lines.append(f"This chat: {chat.describe()}.")
        lines.append(f"{totals}, {spend(self.storage, prices, conversation=conversation).describe()}.")
        return "\n".join(lines)

    def _command_settings(self, route: dict[str, Any], user: User, rest: str = "") -> str:
        """`/settings` shows the chat's effective settings and what may be chosen; `/settings set NAME VALUE`
        and `/settings reset [NAME]` change them, for TELEGRAM_ADMIN_USERS only (agent_core/channel_settings.py:
        the values are checked there, and its SettingError sentence is the reply). A forum's topics share the
        chat's settings."""
        store = self.scheduler.agent.channel_settings
        scope = scope_of(conversation_key(route["chat_id"], route["thread_id"]))
        words = rest.split(None, 2)
        verb = words[0].lower() if words else ""
        admin = may_change_settings(str(user.id), self._admins)
        if not verb:
            return settings_text(store.effective_for_scope(scope), store.choices(), admin)
        if verb not in ("set", "reset") or (verb == "set" and len(words) < 3):
            return SETTINGS_USAGE
        if not admin:
            return ("Only an AutoCode admin (TELEGRAM_ADMIN_USERS) can change this chat's settings; /settings "
                    "shows them.")
        by = f"telegram:{user.id}"
        try:
            if verb == "set":
                effective = store.set(scope, words[1], words[2], by=by)
                done = f"Set {words[1]} for this chat."
            else:
                effective = store.reset(scope, words[1] if len(words) > 1 else None, by=by)
                done = f"Reset {words[1]} to the default." if len(words) > 1 else "All settings reset to the defaults."
        except SettingError as exc:
            return str(exc)
        return done + "\n\n" + settings_text(effective, store.choices(), admin)

    def _command_routines(self, route: dict[str, Any], user: User, rest: str = "") -> str:
        return self.routines_ui.routines(route, user, rest)  # bots/telegram_routines.py

    def _command_every(self, route: dict[str, Any], user: User, rest: str = "") -> str:
        return self.routines_ui.every(route, user, rest)

    def _command_cancel(self, route: dict[str, Any], user: User, rest: str = "") -> str:
        """Cancels (in the background) the user's active runs here; in a private chat, every active run."""
        mine = f"telegram:{user.id}"
        active = [r for r in self.storage.list_runs(conversation_key(route["chat_id"], route["thread_id"]))
                  if r["status"] in ("held", "queued", "running")
                  and (route["chat_type"] == ChatType.PRIVATE or r["user"] == mine)]
        if not active:
            return "Nothing of yours is running here."
        for run in active:
            self._spawn(self._cancel(run["id"]))
        return f"Cancelling {len(active)} task{'s' if len(active) > 1 else ''}."

    async def _answer_command(self, route: dict[str, Any], text: str) -> None:
        await self._send(route, text, reply_to=route["message_id"])

    # --- run events → the chat ------------------------------------------------------------------------------
    def _on_event(self, event: RunEvent) -> None:
        if self._closed or event.run_id in self._done:
            return
        if isinstance(event, (ApprovalRequested, ApprovalDecided)):
            run = self.storage.get_run(event.run_id)
            if run is not None and run["adapter"] == NAME:
                self._spawn(self._show_approval(run, event))
            return
        view = self._views.get(event.run_id)
        if view is None:
            run = self.storage.get_run(event.run_id)
            if run is None or run["adapter"] != NAME:
                self._forget(event.run_id)  # another adapter's run: no more lookups for it
                return
            view = self._open_view(run)
        view.push(event)

    def _open_view(self, run: dict[str, Any]) -> _RunView:
        view = self._views.get(run["id"])
        if view is None:
            route = self.storage.reply_to(run["id"])
            progress = Progress(run["task"], status="held" if run["status"] == "held" else "queued",
                                files=list(route.get("files") or []))
            view = _RunView(run["id"], progress)
            self._views[run["id"]] = view
            view.task = asyncio.create_task(self._render(view), name=f"telegram-run-{run['id']}")
            view.task.add_done_callback(lambda _, run_id=run["id"]: self._closed_view(run_id))
        return view

    def _closed_view(self, run_id: str) -> None:
        self._views.pop(run_id, None)
        self._forget(run_id)

    def _forget(self, run_id: str) -> None:
        self._done[run_id] = None
        if len(self._done) > SEEN_UPDATES:
            self._done.popitem(last=False)

    async def _render(self, view: _RunView) -> None:
        """Show the run's progress (paced edits of one message), then its answer, log and files."""
        try:
            await self._ready.wait()
            await self.runtime.quiet()
            route = self.storage.reply_to(view.run_id)
            if not route.get("chat_id"):
                return
            group = route.get("chat_type") != ChatType.PRIVATE
            if not route.get("progress_message_id"):
                view.shown = view.progress.render()
                sent = await self._send(route, view.shown, reply_to=route.get("message_id"),
                                        markup=self._cancel_markup(view.run_id))
                if sent is not None:
                    route = self.storage.update_reply_to(view.run_id, progress_message_id=sent.message_id)
                self._pacer.mark(route["chat_id"], group)
            while view.progress.finished is None:
                dirty = view.progress.render() != view.shown
                try:
                    event = await asyncio.wait_for(view.queue.get(),
                                                   self._pacer.delay(route["chat_id"]) if dirty else None)
                except TimeoutError:
                    await self._show_progress(view, route, group, final=False)
                    continue
                view.progress.apply(event)
                while not view.queue.empty() and view.progress.finished is None:
                    view.progress.apply(view.queue.get_nowait())
            await self._deliver(view, route, group)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("telegram: rendering run %s failed", view.run_id)

    async def _show_progress(self, view: _RunView, route: dict[str, Any], group: bool, final: bool) -> None:
        text = view.progress.render()
        if text == view.shown:
            return
        if not route.get("progress_message_id"):  # it could not be sent: nothing to edit
            view.shown = text
            return
        if final:
            await asyncio.sleep(self._pacer.delay(route["chat_id"]))
        markup = None if final else self._cancel_markup(view.run_id)
        await self._edit(route, route["progress_message_id"], text, markup=markup)
        view.shown = text
        self._pacer.mark(route["chat_id"], group)

    async def _deliver(self, view: _RunView, route: dict[str, Any], group: bool) -> None:
        """The end of a run: the progress message becomes the answer (its first part; further parts and answer.md
        reply to it), then the log (one document with a summary caption) and the run's files reply to the answer.
        When the progress message could not be sent or edited, the answer goes out as a reply to the task."""
        finished = view.progress.finished
        assert finished is not None
        run = self.storage.get_run(view.run_id) or {"id": view.run_id, "task": view.progress.task}
        text = finished.answer if finished.status == "succeeded" and finished.answer else \
            "\n\n".join(p for p in (failure_text(finished.status, finished.error), finished.answer) if p)
        link = self.runtime.run_url(run)
        plan = answer_plan(text, link)
        # In a private chat the answer is first streamed as drafts; the Bot API persists a draft only by a new
        # message (sendMessage), so then the answer is sent and the progress message removed instead of edited.
        drafted = not group and finished.status == "succeeded" and await self._draft(route, view.run_id, plan, link)
        answer_id = None if drafted else await self._answer_in_place(route, plan.parts[0])
        rest = plan.parts[1:] if answer_id is not None else plan.parts
        for html_text, plain in rest:
            sent = await self._send(route, html_text, plain=plain, reply_to=answer_id or route.get("message_id"))
            if sent is not None and answer_id is None:
                answer_id = sent.message_id
        if plan.document is not None:
            await self._send_file(route, "answer.md", "text/markdown", plan.document, answer_id, photo=False)
        if answer_id is not None:
            route = self.storage.update_reply_to(view.run_id, answer_message_id=answer_id)
        if drafted:
            await self._remove_progress(view, route, group)
        reply_to = answer_id or route.get("message_id")
        await self._send_log(route, view.run_id, reply_to)
        for artifact in self.storage.artifacts(view.run_id, with_data=True):
            await self._send_file(route, artifact["name"], artifact["mime"], artifact["data"], reply_to)

    async def _answer_in_place(self, route: dict[str, Any], part: tuple[str, str]) -> int | None:
        """Edit the progress message into the answer's first part (HTML, else its plain text; no Cancel button
        any more). Returns that message's id, or None when there is no progress message or Telegram would not
        edit it (the caller then sends the answer as new messages)."""
        message_id = route.get("progress_message_id")
        if not message_id:
            return None
        await asyncio.sleep(self._pacer.delay(route["chat_id"]))
        html_text, plain = part
        edited = await self._edit(route, message_id, html_text, markup=None, plain=plain)
        self._pacer.mark(route["chat_id"], route.get("chat_type") != ChatType.PRIVATE)
        return message_id if edited else None

    async def _draft(self, route: dict[str, Any], run_id: str, plan: AnswerPlan, link: str | None) -> bool:
        """Stream the answer's first part as a few growing drafts (sendMessageDraft, private chats only), paced.
        True when at least one was shown: the final answer must then be sent as a new message, which replaces the
        draft. A server that refuses drafts (an older Bot API, or a bot not allowed them) is not asked again until
        restart; any failure stops drafting this answer, never the answer."""
        if not self._drafts:
            return False
        plain = plan.parts[0][1]
        if link:
            plain = plain.removesuffix(f"\n\nFull log: {link}")
        shown = False
        draft_id = zlib.crc32(run_id.encode()) % 2**31 or 1
        for text in draft_texts(plain, DRAFT_MIN_CHARS):
            try:
                await self.app.bot.send_message_draft(route["chat_id"], draft_id, text,
                                                      message_thread_id=route.get("thread_id"))
            except (BadRequest, Forbidden, InvalidToken) as exc:  # InvalidToken: a 404, the method is unknown
                self._drafts = False
                log.warning("telegram: sendMessageDraft refused (%s); answers go out without drafts", exc)
                return shown
            except TelegramError as exc:
                log.warning("telegram: sendMessageDraft failed (%s); sending the answer", exc)
                return shown
            shown = True
            await asyncio.sleep(DRAFT_SECONDS)
        return shown

    async def _remove_progress(self, view: _RunView, route: dict[str, Any], group: bool) -> None:
        """After a drafted answer went out as a new message: delete the progress message, or when Telegram will
        not, show its final state (without the Cancel button)."""
        if not route.get("progress_message_id"):
            return
        try:
            if await self.app.bot.delete_message(route["chat_id"], route["progress_message_id"]):
                return
        except TelegramError as exc:
            log.warning("telegram: deleteMessage in chat %s failed: %s", route["chat_id"], exc)
        await self._show_progress(view, route, group, final=True)

    async def _send_log(self, route: dict[str, Any], run_id: str, reply_to: int | None) -> None:
        """The run's execution log as one reply: a `.md` document (bots/run_log.py: every step in full) whose
        caption sums the run up. A run that did nothing (cancelled while queued) gets none."""
        found = log_to_post(self.storage, self.settings, run_id)
        if found is None:
            return
        caption, plain = log_caption(found)
        await self._send_file(route, found.filename, "text/markdown", found.document.encode(), reply_to,
                              photo=False, caption=(caption, plain))

    # --- Telegram calls (failures are logged, never raised into the run) ------------------------------------
    def _cancel_markup(self, run_id: str) -> InlineKeyboardMarkup:
        return InlineKeyboardMarkup([[InlineKeyboardButton("Cancel", callback_data=f"cancel:{run_id}")]])

    @staticmethod
    def _where(route: dict[str, Any], reply_to: int | None) -> dict[str, Any]:
        where: dict[str, Any] = {"chat_id": route["chat_id"]}
        if route.get("thread_id"):
            where["message_thread_id"] = route["thread_id"]
        if reply_to:
            where["reply_parameters"] = ReplyParameters(reply_to, allow_sending_without_reply=True)
        return where

    async def _send(self, route: dict[str, Any], text: str, *, plain: str | None = None, reply_to: int | None = None,
                    markup: InlineKeyboardMarkup | None = None) -> Message | None:
        """A message; with `plain` the text is HTML and `plain` is what goes out if Telegram rejects the markup."""
        where = self._where(route, reply_to)
        try:
            if plain is None:
                return await self.app.bot.send_message(text=text, reply_markup=markup, **where)
            try:
                return await self.app.bot.send_message(text=text, parse_mode=ParseMode.HTML, reply_markup=markup,
                                                       **where)
            except BadRequest as exc:
                log.warning("telegram: HTML message rejected (%s); sending it as plain text", exc.message)
                return await self.app.bot.send_message(text=plain, reply_markup=markup, **where)
        except TelegramError as exc:
            log.warning("telegram: sendMessage to chat %s failed: %s", route["chat_id"], exc)
            return None

    async def _edit(self, route: dict[str, Any], message_id: int, text: str,
                    markup: InlineKeyboardMarkup | None, plain: str | None = None) -> bool:
        """Edit a message's text; with `plain` the text is HTML and `plain` goes out if Telegram rejects the
        markup. True when the message shows the text (also when it already did)."""
        where = {"chat_id": route["chat_id"], "message_id": message_id, "reply_markup": markup}
        try:
            try:
                if plain is None:
                    await self.app.bot.edit_message_text(text, **where)
                else:
                    await self.app.bot.edit_message_text(text, parse_mode=ParseMode.HTML, **where)
                return True
            except BadRequest as exc:
                if "not modified" in exc.message.lower():
                    return True
                if plain is None:
                    raise
                log.warning("telegram: HTML edit rejected (%s); editing as plain text", exc.message)
                await self.app.bot.edit_message_text(plain, **where)
                return True
        except BadRequest as exc:
            if "not modified" in exc.message.lower():
                return True
            log.warning("telegram: editMessageText in chat %s failed: %s", route["chat_id"], exc)
        except TelegramError as exc:
            log.warning("telegram: editMessageText in chat %s failed: %s", route["chat_id"], exc)
        return False

    async def _send_file(self, route: dict[str, Any], name: str, mime: str, data: bytes, reply_to: int | None,
                         photo: bool = True, caption: tuple[str, str] | None = None) -> None:
        """Images as photos (a document when Telegram will not take them as one), everything else as documents.
        The caption is the file's name, or `caption` as (HTML, plain fallback if Telegram rejects the markup)."""
        where = self._where(route, reply_to)
        text, mode = (caption[0], ParseMode.HTML) if caption else (name[:1024], None)
        try:
            if photo and mime in IMAGE_TYPES and len(data) <= MAX_PHOTO_BYTES:
                try:
                    await self.app.bot.send_photo(photo=InputFile(data, filename=name), caption=text,
                                                  parse_mode=mode, **where)
                    return
                except BadRequest as exc:
                    log.warning("telegram: sendPhoto %s rejected (%s); sending it as a document", name, exc.message)
            try:
                await self.app.bot.send_document(document=InputFile(data, filename=name), caption=text,
                                                 parse_mode=mode, **where)
            except BadRequest as exc:
                if caption is None:
                    raise
                log.warning("telegram: caption of %s rejected (%s); sending it as plain text", name, exc.message)
                await self.app.bot.send_document(document=InputFile(data, filename=name), caption=caption[1],
                                                 **where)
        except TelegramError as exc:
            log.warning("telegram: sending %s to chat %s failed: %s", name, route["chat_id"], exc)

    def _spawn(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        """Telegram calls that must not hold up the update (or the webhook's 200): run them beside it."""
        task = asyncio.create_task(self._guarded(coroutine))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _guarded(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        try:
            await self._ready.wait()
            await coroutine
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("telegram: background call failed")
