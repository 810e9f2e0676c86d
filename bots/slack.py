"""Slack adapter: slack-bolt's AsyncApp mounted on `autocode serve` (HTTP `POST /slack/events`), or Socket Mode.

Entry points: `/autocode TASK|help|reset|history|usage|cancel`, `@AutoCode TASK` in a channel (the conversation
lives in that post's thread), direct messages, and follow-ups in a thread AutoCode owns (conversation key
`slack:{team}:{channel}:{thread_root_ts}`). Every request is submitted to the scheduler *before* it is acknowledged
(durable), then answered asynchronously: one progress message updated at most once a second. A run started in a
channel (a slash command, a mention) ends as that message: the answer, with the run's images; a run in a DM or a
thread streams its answer into the thread (chat_stream; a stream that breaks off is finished with one complete
message). The thread then gets the execution log as one message (bots/run_log.py's summary, its detail attached as
one Markdown file) and the run's files.

Replies in a thread AutoCode is part of start a run only when they are for AutoCode
(AUTOCODE_SLACK_THREAD_REPLIES, `addressed`): `mention` — they mention AutoCode; `auto` (default) — they mention
AutoCode, or mention nobody and follow AutoCode's last message in the thread (no other person posted since; tracked
from the message events and AutoCode's own posts in ThreadIndex); `all` — every reply. Teammates talking to each
other in an AutoCode thread cost nothing. Direct messages are always for AutoCode.

Files users send (`file_share` messages, files on mentions): the run is submitted *held* before the ack, then each
file is streamed from Slack (`url_private_download` with the bot token, the workspace's for OAuth installs) into
the run's inputs through agent_core/uploads.py, which releases the run or fails it with a message for the user.
A retried delivery is a duplicate of the held run, so a file is never downloaded twice.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sqlite3
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable
from urllib.parse import urlsplit

import aiohttp
from slack_bolt.adapter.starlette.async_handler import AsyncSlackRequestHandler
from slack_bolt.async_app import AsyncApp
from slack_sdk.errors import SlackApiError
from slack_sdk.signature import SignatureVerifier
from slack_sdk.http_retry.builtin_async_handlers import (
    AsyncConnectionErrorRetryHandler, AsyncRateLimitErrorRetryHandler,
)
from slack_sdk.web.async_client import AsyncWebClient
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from agent_core import uploads
from agent_core.channel_settings import scope_of
from agent_core.config import ConfigError, Settings
from agent_core.disk import disk_full
from agent_core.events import (
    ApprovalDecided, ApprovalRequested, EvaluationDone, LLMWaiting, PlanReady, RepairPlanned, RunEvent, RunFinished,
    RunStarted, StepFinished, StepStarted, WorkerWaiting,
)
from agent_core.scheduler import INTERRUPTED_MESSAGE
from bots import Runtime
from bots import slack_render as render
from bots.slack_assistant import SlackAssistant
from bots.slack_home import SlackHome
from bots.slack_settings import SlackSettings, is_settings_command
from bots.slack_routines import SlackRoutines, is_routines_command
from bots.permissions import may_act_on_run, refusal_text
from bots.run_log import log_to_post

log = logging.getLogger(__name__)

UPDATE_INTERVAL = 1.0  # seconds between chat.update calls on one message
# reply_to["answer"]: the run's progress message becomes its answer (a run started in a channel); otherwise (DMs,
# replies in a thread, re-runs) the answer is streamed as a new message in the thread.
ANSWER_IN_PLACE = "in_place"
STREAM_BUFFER = 600  # characters chat_stream buffers before it calls chat.appendStream
FILES_PER_UPLOAD = 10  # files in one files_upload_v2 call (one message in the thread)
IMAGE_RETRIES = (1.0, 3.0)  # seconds to wait before showing freshly uploaded images again (Slack may need a moment)
IMAGE_MIMES = ("image/png", "image/jpeg", "image/gif")  # what Slack's image blocks show
BOT_SCOPES = ["app_mentions:read", "assistant:write", "channels:history", "chat:write", "commands", "files:read", "files:write",
              "groups:history", "im:history", "mpim:history"]
SUBCOMMANDS = ("help", "reset", "history", "usage", "cancel")
HELP = (
    "*AutoCode* writes and runs Python to do a task, then answers with the result.\n"
    "• `/autocode TASK` — start a task here; AutoCode's message becomes the answer, its execution log goes in the "
    "thread\n"
    "• `@AutoCode TASK` in a channel, or a direct message — same, in that message's thread\n"
    "• Reply in an AutoCode thread to follow up: it remembers the thread's conversation\n"
    "• Attach files (CSV, Excel, JSON, text, images) to a task: its code reads them, and the thread's follow-ups "
    "see them and the files it made\n"
    "• `/autocode history` — your recent runs in this channel · `/autocode usage` — your LLM tokens\n"
    "• `/autocode cancel` — cancel your running tasks here · `/autocode reset` — forget your conversations here\n"
    "• `/autocode every monday 9:00 TASK` — a routine: the task on a schedule (you see it before it is saved); "
    "`/autocode routines` lists this channel's (their owner or an admin can pause, resume or remove one)\n"
    "• `/autocode settings` — this channel's model, iterations, tools, network and budget (admins change them "
    "with `/autocode settings set NAME VALUE` or in AutoCode's Home tab)\n"
    "In a thread, mention AutoCode with `reset`, `cancel`, `history` or `usage` to act on that thread only."
)
_MENTION = re.compile(r"<@[UW][A-Z0-9]+(?:\|[^>]*)?>")
_MENTIONED = re.compile(r"<@([UW][A-Z0-9]+)(?:\|[^>]*)?>|<!(subteam\^[A-Z0-9]+|here|channel|everyone)(?:\|[^>]*)?>")
FILES_TASK = "Analyse the attached file(s) and tell me what they contain."  # a message that is only files
DOWNLOAD_CHUNK = 1 << 18
# No overall deadline (a 50 MB file on a slow link may take minutes), but a stalled connection ends the download.
DOWNLOAD_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=60)
# Hosts Slack serves files from; the bot token is sent to no other (nor to SLACK_API_URL's host when it is set).
SLACK_FILE_DOMAINS = ("slack.com", "slack-gov.com")


class ThreadIndex:
    """Which Slack threads AutoCode owns and the conversation each continues (a slash command's thread root is
    AutoCode's own message, known only after the run was submitted). A small SQLite table next to the DB."""

    def __init__(self, path: Path):
        self._db = sqlite3.connect(str(path), check_same_thread=False, timeout=30)
        self._lock = threading.Lock()
        with self._lock, self._db:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # as the main DB: no fsync per commit on the event loop
            self._db.execute("CREATE TABLE IF NOT EXISTS autocode_slack_threads (team TEXT, channel TEXT, "
                             "thread_ts TEXT, conversation TEXT, PRIMARY KEY (team, channel, thread_ts))")
            # Who posted in the thread since AutoCode's last message (comma list of user ids), for `addressed`.
            self._db.execute("CREATE TABLE IF NOT EXISTS autocode_slack_thread_talk (team TEXT, channel TEXT, "
                             "thread_ts TEXT, since TEXT, PRIMARY KEY (team, channel, thread_ts))")

    def add(self, team: str, channel: str, thread_ts: str, conversation: str) -> None:
        with self._lock, self._db:
            self._db.execute("INSERT OR IGNORE INTO autocode_slack_threads VALUES (?, ?, ?, ?)",
                             (team, channel, thread_ts, conversation))

    def get(self, team: str, channel: str, thread_ts: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT conversation FROM autocode_slack_threads WHERE team = ? AND channel = ? "
                                   "AND thread_ts = ?", (team, channel, thread_ts)).fetchone()
        return row[0] if row else None

    def spoke(self, team: str, channel: str, thread_ts: str) -> None:
        """AutoCode posted in the thread: nobody has spoken since."""
        with self._lock, self._db:
            self._db.execute("INSERT OR REPLACE INTO autocode_slack_thread_talk VALUES (?, ?, ?, '')",
                             (team, channel, thread_ts))

    def heard(self, team: str, channel: str, thread_ts: str, user: str) -> None:
        """A person posted in the thread (in arrival order, which is what "follows" means here)."""
        with self._lock, self._db:
            row = self._db.execute("SELECT since FROM autocode_slack_thread_talk WHERE team = ? AND channel = ? AND "
                                   "thread_ts = ?", (team, channel, thread_ts)).fetchone()
            since = set(filter(None, (row[0] if row else "").split(",")))
            if user in since:
                return
            since.add(user)
            self._db.execute("INSERT OR REPLACE INTO autocode_slack_thread_talk VALUES (?, ?, ?, ?)",
                             (team, channel, thread_ts, ",".join(sorted(since))))

    def since_autocode(self, team: str, channel: str, thread_ts: str) -> set[str]:
        """The people who posted in the thread since AutoCode's last message there (empty: AutoCode spoke last, or
        nothing is recorded, as for threads from before this was tracked)."""
        with self._lock:
            row = self._db.execute("SELECT since FROM autocode_slack_thread_talk WHERE team = ? AND channel = ? AND "
                                   "thread_ts = ?", (team, channel, thread_ts)).fetchone()
        return set(filter(None, (row[0] if row else "").split(",")))

    def close(self) -> None:
        self._db.close()


def addressed(mode: str, text: str, bot_user: str, user: str, since_autocode: set[str]) -> bool:
    """Whether a reply in a thread AutoCode is part of is for AutoCode (AUTOCODE_SLACK_THREAD_REPLIES): `all` —
    always; `mention` — it mentions AutoCode; `auto` — it mentions AutoCode, or it mentions nobody (no person,
    user group, @here/@channel) and nobody but its author posted since AutoCode's last message in the thread."""
    if mode == "all":
        return True
    mentioned = {m.group(1) or m.group(2) for m in _MENTIONED.finditer(text or "")}
    if bot_user and bot_user in mentioned:
        return True
    if mode == "mention" or mentioned:
        return False
    return since_autocode <= {user}


class RunView:
    """One run's progress message: the state to show, and a flag that a render is due."""

    def __init__(self, progress: render.Progress):
        self.progress = progress
        self.dirty = asyncio.Event()
        self.lock = asyncio.Lock()
        self.last_update = float("-inf")
        self.rendered_final = False  # the message shows the final state
        self.task: asyncio.Task | None = None

    def apply(self, event: RunEvent) -> None:
        p = self.progress
        p.waiting = ""  # whatever the run does next, the LLM call that waited is over
        match event:
            case LLMWaiting() | WorkerWaiting():
                p.waiting = event.describe()
            case ApprovalRequested(tool=tool):
                p.waiting = f"waiting for an approval of {tool} (in the thread)"
            case RunStarted():
                p.status = "running"
            case PlanReady(iteration=iteration, steps=steps):
                p.iteration, p.plan, p.steps, p.note = iteration, list(steps), {}, ""
            case RepairPlanned(iteration=iteration, retry_from=name, steps=steps, reused=reused):
                kept = f" (keeping {', '.join(reused)})" if reused else ""
                p.iteration, p.plan, p.steps = iteration, list(steps), {}
                p.note = f"Repairing from {name}{kept}"
            case StepStarted(index=i, total=n, tool_name=name):
                p.status = "running"
                p.steps[i] = render.step_line(i, n, name, "running")
            case StepFinished(index=i, total=n, tool_name=name, ok=ok, duration_ms=ms, error=error):
                detail = f"({ms} ms)" if ok else f"({ms} ms): {render.clip(error or 'failed', 200)}"
                p.steps[i] = render.step_line(i, n, name, "ok" if ok else "failed", detail)
            case EvaluationDone(satisfactory=ok, thoughts=thoughts):
                p.note = "Evaluator: satisfied" if ok else f"Evaluator: not yet — {render.clip(thoughts, 200)}"
            case RunFinished(status=status, error=error, iterations=iterations, usage=usage):
                p.status, p.error, p.usage = status, error, dict(usage)
                p.iteration = iterations or p.iteration
        self.dirty.set()


class SlackAdapter:
    """The Slack side of AutoCode; see the module docstring."""

    name = "slack"

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.settings = settings = runtime.settings
        self.storage, self.scheduler = runtime.storage, runtime.scheduler
        self.socket_mode = bool(settings.slack_app_token)
        self.oauth = bool(settings.slack_client_id and settings.slack_client_secret)
        if not self.socket_mode and not settings.slack_signing_secret:
            raise ConfigError("SLACK_SIGNING_SECRET is required for Slack's HTTP mode (or set SLACK_APP_TOKEN for "
                              "Socket Mode); see docs/slack.md")
        if not self.oauth and not settings.slack_bot_token:
            raise ConfigError("SLACK_BOT_TOKEN is required (or SLACK_CLIENT_ID and SLACK_CLIENT_SECRET for a "
                              "multi-workspace install); see docs/slack.md")
        db = Path(settings.db_path)
        self.store_path = db.with_name(db.stem + ".slack.db")
        self.threads = ThreadIndex(self.store_path)
        self.installation_store: Any = None
        self.client = self._web_client(None if self.oauth else settings.slack_bot_token)
        self._team_clients: dict[str, AsyncWebClient] = {}
        self.app = self._build_app()
        self.handler = AsyncSlackRequestHandler(self.app)
        self._socket: Any = None
        self._session: aiohttp.ClientSession | None = None
        self._ready = asyncio.Event()
        self._views: dict[str, RunView] = {}
        self._not_ours: set[str] = set()
        self._tasks: set[asyncio.Task] = set()
        self._handled: OrderedDict[str, None] = OrderedDict()  # deliveries answered without a run (refusals…)
        self._asked: dict[tuple[str, int], tuple[ApprovalRequested, asyncio.Task]] = {}  # approval message posts
        runtime.events.subscribe(self._on_event)

    # --- construction ------------------------------------------------------------------------------------
    def _web_client(self, token: str | None) -> AsyncWebClient:
        base = self.settings.slack_api_url or AsyncWebClient.BASE_URL
        return AsyncWebClient(token=token, base_url=base if base.endswith("/") else base + "/", retry_handlers=[
            AsyncConnectionErrorRetryHandler(), AsyncRateLimitErrorRetryHandler(max_retry_count=5)])

    def _build_app(self) -> AsyncApp:
        settings = self.settings
        options: dict[str, Any] = dict(
            signing_secret=settings.slack_signing_secret, client=self.client, process_before_response=True,
            request_verification_enabled=bool(settings.slack_signing_secret), name="autocode",
        )
        if self.oauth:
            from slack_bolt.oauth.async_oauth_settings import AsyncOAuthSettings
            from slack_sdk.oauth.installation_store.sqlite3 import SQLite3InstallationStore
            from slack_sdk.oauth.state_store.sqlite3 import SQLite3OAuthStateStore

            self.installation_store = SQLite3InstallationStore(database=str(self.store_path),
                                                               client_id=settings.slack_client_id or "")
            options["oauth_settings"] = AsyncOAuthSettings(
                client_id=settings.slack_client_id, client_secret=settings.slack_client_secret, scopes=BOT_SCOPES,
                installation_store=self.installation_store,
                state_store=SQLite3OAuthStateStore(database=str(self.store_path), expiration_seconds=600),
                install_path="/slack/install", redirect_uri_path="/slack/oauth_redirect",
            )
        # Bolt reads SLACK_BOT_TOKEN itself and warns that our client (holding that same token) wins: expected.
        logging.disable(logging.WARNING)  # (Bolt sets its logger's level itself; this is synchronous, at boot)
        try:
            app = AsyncApp(**options)
        finally:
            logging.disable(logging.NOTSET)
        self.assistant = SlackAssistant(self)  # assistant threads (bots/slack_assistant.py)
        app.assistant(self.assistant.middleware)
        self.settings_ui = SlackSettings(self, app)  # /autocode settings, the settings modal
        self.home = SlackHome(self, app, self.settings_ui)  # the App Home tab
        self.routines_ui = SlackRoutines(self, app)  # /autocode routines, /autocode every …
        app.command("/autocode")(self._on_command)
        app.event("app_mention")(self._on_mention)
        app.event("message")(self._on_message)
        app.action(render.CANCEL_ACTION)(self._on_cancel)
        app.action(render.RERUN_ACTION)(self._on_rerun)
        app.action(render.APPROVE_ACTION)(self._on_approval)
        app.action(render.DENY_ACTION)(self._on_approval)
        app.action("autocode_full_log")(self._ack_only)
        return app

    # --- Adapter protocol ------------------------------------------------------------------------------------
    @property
    def routes(self) -> list[BaseRoute]:
        routes: list[BaseRoute] = []
        if not self.socket_mode:
            routes.append(Route("/slack/events", self._endpoint, methods=["POST"]))
        if self.oauth:
            routes.append(Route("/slack/install", self._endpoint, methods=["GET"]))
            routes.append(Route("/slack/oauth_redirect", self._endpoint, methods=["GET"]))
        return routes

    async def _endpoint(self, request: Request) -> Response:
        """slack_bolt's handler, after the signature is checked on the body (capped by agent_core/http_guard.py):
        bolt parses a body before verifying it, so an unsigned malformed one was a 500 with a traceback."""
        if request.method == "POST" and self.settings.slack_signing_secret:
            body = await request.body()  # kept by the request: bolt reads it again from there
            if not SignatureVerifier(self.settings.slack_signing_secret).is_valid_request(body, request.headers):
                return JSONResponse({"error": "invalid or stale Slack signature"}, status_code=401)
        try:
            return await self.handler.handle(request)
        except ValueError as exc:  # a signed body bolt cannot parse (not JSON, a broken `payload`)
            log.warning("slack: a malformed request body (%s)", exc)
            return JSONResponse({"error": "the Slack request body is malformed"}, status_code=400)

    async def start(self) -> None:
        # One pooled HTTP session for every Web API call (a session per call costs a connection setup each).
        self._session = aiohttp.ClientSession()
        for client in (self.client, *self._team_clients.values()):
            client.session = self._session
        if not self.oauth:
            try:  # shows a wrong token or API URL at boot, not at the first message
                identity = await self.client.auth_test()
                log.info("slack: connected to team %s as %s", identity.get("team_id"), identity.get("user_id"))
            except Exception as exc:
                log.error("slack: auth.test failed (%s); check SLACK_BOT_TOKEN and SLACK_API_URL", _short(exc))
        if self.socket_mode:  # connected in the background: never holds serve up (bots/slack_socket.py)
            from bots.slack_socket import SocketModeSupervisor

            self._socket = SocketModeSupervisor(self.app, self.settings.slack_app_token or "")
            await self._socket.start()
        self._ready.set()

    @property
    def status(self) -> str:
        """"up", "connecting" (Socket Mode not connected yet, retrying in the background) or "off" (Slack rejected
        SLACK_APP_TOKEN): what serve's start-up line says of this adapter."""
        state = self._socket.status if self._socket is not None else "connected"
        return {"connected": "up", "off": "off"}.get(state, "connecting")

    async def stop(self) -> None:
        if self._socket is not None:
            await self._socket.stop()
        pending = [t for t in self._tasks if not t.done()]
        if pending:  # let in-flight posts finish briefly; the rest is restartable from reply_to
            await asyncio.wait(pending, timeout=5)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
        self.threads.close()
        self.assistant.close()

    async def notify_interrupted(self, run: dict[str, Any]) -> None:
        route = self.storage.reply_to(run["id"])
        if not route.get("channel"):
            return
        client = await self._client_for(route)
        if route.get("progress_ts"):
            progress = self._progress_from_row(run)
            await self._update(client, route, progress)
        await self._approvals_interrupted(client, route, run["id"])
        # The stored reason: a held run's says its files never arrived and nothing ran (HELD_INTERRUPTED_MESSAGE).
        await client.chat_postMessage(channel=route["channel"], thread_ts=route.get("thread_ts"),
                                      text=f":warning: {render.escape(run.get('error') or INTERRUPTED_MESSAGE)}")

    # --- helpers -------------------------------------------------------------------------------------------
    def _spawn(self, coro: Awaitable[Any], what: str) -> asyncio.Task:
        """Work after the ack; failures are logged (short), never shown to users as traces."""

        async def guarded() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if disk_full(exc):  # not a bug: one line (the scheduler ends the runs once the disk has room)
                    log.error("slack: %s failed: the server's disk is full (%s)", what, exc)
                else:
                    log.exception("slack: %s failed", what)

        task = asyncio.ensure_future(guarded())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _first_time(self, delivery: str) -> bool:
        """True once per delivery id for replies that create no run (refusals, thread commands)."""
        if delivery in self._handled:
            return False
        self._handled[delivery] = None
        while len(self._handled) > 5000:
            self._handled.popitem(last=False)
        return True

    def _refusal(self, team: str, channel: str, user: str) -> str | None:
        s = self.settings
        if s.slack_allowed_teams and team not in s.slack_allowed_teams:
            return "Sorry, AutoCode is not enabled for this workspace."
        if s.slack_allowed_channels and channel not in s.slack_allowed_channels:
            return "Sorry, AutoCode is not enabled in this channel. Ask your admin to add it."
        if s.slack_allowed_users and user not in s.slack_allowed_users:
            return "Sorry, you are not on AutoCode's list of allowed users. Ask your admin to add you."
        return None

    async def _client_for(self, route: dict[str, Any]) -> AsyncWebClient:
        """The app's client (one workspace) or the installing workspace's bot token (OAuth)."""
        if not self.oauth:
            return self.client
        team = route.get("team") or ""
        client = self._team_clients.get(team)
        if client is None:
            bot = await self.installation_store.async_find_bot(
                enterprise_id=route.get("enterprise"), team_id=team, is_enterprise_install=False)
            if bot is None:
                raise RuntimeError(f"AutoCode is not installed in Slack team {team}")
            client = self._team_clients[team] = self._web_client(bot.bot_token)
            client.session = self._session
        return client

    @staticmethod
    def _user_key(team: str, user: str) -> str:
        return f"slack:{team}:{user}"

    # --- listeners -----------------------------------------------------------------------------------------
    async def _ack_only(self, ack: Callable[..., Awaitable[None]]) -> None:
        await ack()

    async def _on_command(self, ack: Callable[..., Awaitable[None]], command: dict[str, Any],
                          context: dict[str, Any]) -> None:
        team = command.get("team_id") or context.get("team_id") or ""
        channel, user, text = command.get("channel_id", ""), command.get("user_id", ""), command.get("text") or ""
        refusal = self._refusal(team, channel, user)
        if refusal:
            await ack(text=refusal, response_type="ephemeral")
            return
        words = text.strip().split()
        if is_settings_command(words):
            await ack(text=self.settings_ui.command(team, channel, user, words), response_type="ephemeral")
            return
        if is_routines_command(words):  # bots/slack_routines.py
            await ack(text=self.routines_ui.command(team, channel, user, words, command.get("enterprise_id")),
                      response_type="ephemeral")
            return
        if not words or (len(words) == 1 and words[0].lower() in SUBCOMMANDS):
            word = words[0].lower() if words else "help"
            await ack(text=self._channel_command(word, team, channel, user), response_type="ephemeral")
            return
        trigger = command.get("trigger_id", "")
        conversation = f"slack:{team}:{channel}:cmd-{trigger}"
        route = {"team": team, "channel": channel, "user": user, "kind": "command", "answer": ANSWER_IN_PLACE,
                 "enterprise": command.get("enterprise_id")}
        submission = self.scheduler.submit(text, conversation, user=self._user_key(team, user), adapter=self.name,
                                           delivery_id=f"slack:cmd:{trigger}", reply_to=route)
        if submission.status == "refused":
            await ack(text=submission.message, response_type="ephemeral")
            return
        if submission.status == "duplicate":
            await ack(text="That task is already queued.", response_type="ephemeral")
            return
        await ack(text=f":hourglass: Queued: {render.escape(render.clip(text, 200))}", response_type="ephemeral")
        self._spawn(self._open(submission.run_id), "posting the progress message")

    async def _on_mention(self, event: dict[str, Any], body: dict[str, Any], context: dict[str, Any]) -> None:
        await self._on_post(event, body, context, require_owned=False)

    async def _on_message(self, event: dict[str, Any], body: dict[str, Any], context: dict[str, Any]) -> None:
        if event.get("subtype") not in (None, "file_share") or event.get("bot_id") or not event.get("user"):
            return  # edits, joins, bots (including ourselves); a message with files is a post like any other
        if event.get("channel_type") == "im":
            await self._on_post(event, body, context, require_owned=False)
        elif event.get("thread_ts") and event.get("thread_ts") != event.get("ts"):
            team = body.get("team_id") or event.get("team") or context.get("team_id") or ""
            channel, root, user = event.get("channel", ""), event["thread_ts"], event.get("user", "")
            if self.threads.get(team, channel, root) is None:
                return  # not a thread AutoCode is part of
            since = self.threads.since_autocode(team, channel, root)
            self.threads.heard(team, channel, root, user)
            if addressed(self.settings.slack_thread_replies, event.get("text") or "", _bot_user(body, context),
                         user, since):
                await self._on_post(event, body, context, require_owned=True)
        # top-level channel posts: only mentions (app_mention) start a task

    async def _on_post(self, event: dict[str, Any], body: dict[str, Any], context: dict[str, Any], *,
                       require_owned: bool) -> None:
        team = body.get("team_id") or event.get("team") or context.get("team_id") or ""
        channel, user, ts = event.get("channel", ""), event.get("user", ""), event.get("ts", "")
        root = event.get("thread_ts") or ts
        owned = self.threads.get(team, channel, root)
        if require_owned and owned is None:
            return
        delivery = f"slack:{team}:{channel}:{ts}"  # app_mention and message for one post collapse here
        route = {"team": team, "channel": channel, "user": user, "thread_ts": root, "kind": "thread",
                 "enterprise": body.get("enterprise_id")}
        if not event.get("thread_ts") and event.get("channel_type") != "im":
            route["answer"] = ANSWER_IN_PLACE  # a mention in a channel: its progress message becomes the answer
        refusal = self._refusal(team, channel, user)
        if refusal:
            if self._first_time(delivery):
                self._spawn(self._ephemeral(route, refusal), "posting a refusal")
            return
        task = _MENTION.sub("", event.get("text") or "").strip()
        files = [entry for entry in event.get("files") or [] if isinstance(entry, dict)]
        conversation = owned or f"slack:{team}:{channel}:{root}"
        words = task.split()
        word = words[0].lower() if len(words) == 1 else ""
        if (not words and not files) or word in SUBCOMMANDS:
            if self._first_time(delivery):
                reply = self._thread_command(word or "help", conversation, team, user)
                self._spawn(self._say(route, reply), "answering a thread command")
            return
        if files:
            over = over_limits(files, self.settings)
            if over:  # from the sizes Slack states: nothing is stored or downloaded
                if self._first_time(delivery):
                    self._spawn(self._say(route, render.escape(over)), "refusing files over the limits")
                return
            task = task or FILES_TASK
            route["files"] = [file_label(entry) for entry in files]
        # With files the run is held (stored, not started) until they are received, after the ack; a retried
        # delivery is a "duplicate" of it and downloads nothing.
        submission = self.scheduler.submit(task, conversation, user=self._user_key(team, user), adapter=self.name,
                                           delivery_id=delivery, reply_to=route, hold=bool(files))
        if submission.status in ("queued", "held"):
            self.threads.add(team, channel, root, conversation)
            self._spawn(self._open(submission.run_id), "posting the progress message")
            if submission.status == "held":
                self._spawn(self._receive(submission.run_id, route, files), f"receiving files of {submission.run_id}")
        elif submission.status == "refused" and self._first_time(delivery):
            self._spawn(self._say(route, submission.message), "posting a refusal")

    async def _on_cancel(self, ack: Callable[..., Awaitable[None]], body: dict[str, Any],
                         action: dict[str, Any]) -> None:
        await ack()  # cancelling waits for the step's processes to die: after the ack
        team, channel, user = _action_place(body)
        route = {"team": team, "channel": channel, "user": user,
                 "enterprise": (body.get("enterprise") or {}).get("id")}
        refusal = self._refusal(team, channel, user)
        if refusal:
            self._spawn(self._ephemeral(route, refusal), "posting a refusal")
            return
        run = self.storage.get_run(str(action.get("value", "")))
        if run is None or run["adapter"] != self.name:
            return
        denied = self._not_theirs(run, team, user, "cancel")
        if denied:
            self._spawn(self._ephemeral({**route, "thread_ts": _action_thread(body)}, denied), "posting a refusal")
            return
        self._spawn(self._cancel(run["id"], route), "cancelling a run")

    async def _on_rerun(self, ack: Callable[..., Awaitable[None]], body: dict[str, Any],
                        action: dict[str, Any]) -> None:
        team, channel, user = _action_place(body)
        refusal = self._refusal(team, channel, user)
        run = self.storage.get_run(str(action.get("value", "")))
        if refusal or run is None or run["adapter"] != self.name:
            await ack()
            if refusal:
                self._spawn(self._ephemeral({"team": team, "channel": channel, "user": user}, refusal), "refusal")
            return
        denied = self._not_theirs(run, team, user, "re-run")
        if denied:
            await ack()
            route = {"team": team, "channel": channel, "user": user, "thread_ts": _action_thread(body),
                     "enterprise": (body.get("enterprise") or {}).get("id")}
            self._spawn(self._ephemeral(route, denied), "posting a refusal")
            return
        old = self.storage.reply_to(run["id"])
        route = {"team": team, "channel": channel, "user": user, "thread_ts": old.get("thread_ts"), "kind": "rerun",
                 "enterprise": old.get("enterprise")}
        submission = self.scheduler.submit(run["task"], run["conversation"], user=self._user_key(team, user),
                                           adapter=self.name, delivery_id=f"slack:rerun:{body.get('trigger_id')}",
                                           reply_to=route)
        await ack()
        if submission.status == "queued":
            self._spawn(self._open(submission.run_id), "posting the progress message")
        elif submission.status == "refused":
            self._spawn(self._ephemeral(route, submission.message), "posting a refusal")

    def _not_theirs(self, run: dict[str, Any], team: str, user: str, action: str, thing: str = "run") -> str | None:
        """None when `user` may `action` the run (they asked, or SLACK_ADMIN_USERS lists them), else what to tell
        them."""
        if may_act_on_run(run["user"], self._user_key(team, user), user, self.settings.slack_admin_users):
            return None
        requester = (run["user"] or "").rsplit(":", 1)[-1] if (run["user"] or "").startswith("slack:") else ""
        return refusal_text(action, f"<@{requester}>" if requester else None, thing)

    # --- files users send ---------------------------------------------------------------------------------------
    async def _receive(self, run_id: str, route: dict[str, Any], files: list[dict[str, Any]]) -> None:
        """After the ack: stream each file from Slack into the held run's inputs (agent_core/uploads.py). Any
        failure fails the run with its message (DownloadFailed, over a limit), rendered like any failed run."""
        async with uploads.receiving(self.scheduler, run_id) as receiver:
            client = await self._client_for(route)
            for entry in files:
                entry = await self._file_info(client, entry)
                over = over_limits([entry], self.settings)  # a Slack Connect stub states its size only now
                if over:
                    raise uploads.InputRefused(over)
                name, url = download_source(entry, self.settings)
                await receiver.add(name, self._file_chunks(url, name, client.token or "", entry))
        if receiver.failure is None and receiver.released:
            log.info("slack: run %s received %d file(s)", run_id, len(receiver.files))

    @staticmethod
    async def _file_info(client: AsyncWebClient, entry: dict[str, Any]) -> dict[str, Any]:
        """The file object with its download link: Slack Connect files come as a stub (`file_access:
        check_file_info`, no name, no link) that files.info completes."""
        if entry.get("file_access") != "check_file_info" or not entry.get("id"):
            return entry
        try:
            response = await client.files_info(file=str(entry["id"]))
        except SlackApiError as exc:
            reason = exc.response.get("error", "") if exc.response is not None else ""
            raise uploads.DownloadFailed(
                f"Slack did not let AutoCode read the attached file {entry['id']} ({reason or 'no access'}); files "
                "shared from another organization through Slack Connect may not be open to apps. Download it and "
                "attach it yourself. Nothing was run.") from None
        return dict(response.get("file") or entry)

    async def _file_chunks(self, url: str, name: str, token: str, entry: dict[str, Any]) -> AsyncIterator[bytes]:
        """The file's bytes as Slack sends them, chunk by chunk (never whole in memory). One GET, never retried: a
        download cut midway fails the run rather than storing a half or a second copy. aiohttp drops the
        Authorization header on a redirect to another origin."""
        if self._session is None:
            raise uploads.DownloadFailed(f"AutoCode's Slack connection is not up yet, so {name} was not fetched; "
                                         "please send it again in a minute. Nothing was run.")
        try:
            async with self._session.get(url, headers={"Authorization": f"Bearer {token}"},
                                         timeout=DOWNLOAD_TIMEOUT) as response:
                if response.status != 200:
                    raise uploads.DownloadFailed(download_refusal(name, response.status))
                mimetype = str(entry.get("mimetype") or "")
                if response.content_type == "text/html" and "html" not in mimetype:
                    # What Slack answers (200, a sign-in page) when the token may not read the file.
                    raise uploads.DownloadFailed(
                        f"Slack answered a sign-in page instead of {name}: AutoCode's token may not read it (the app "
                        "needs the files:read scope; reinstall it after adding the scope). Nothing was run.")
                async for chunk in response.content.iter_chunked(DOWNLOAD_CHUNK):
                    yield chunk
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise uploads.DownloadFailed(f"Downloading {name} from Slack failed ({type(exc).__name__}); nothing was "
                                         "run. Please send it again.") from None

    # --- commands --------------------------------------------------------------------------------------------
    def _user_runs_here(self, team: str, channel: str, user: str, limit: int = 500) -> list[dict[str, Any]]:
        prefix, who = f"slack:{team}:{channel}:", self._user_key(team, user)
        return [r for r in self.storage.list_runs(limit=limit)
                if r["adapter"] == self.name and r["user"] == who and r["conversation"].startswith(prefix)]

    def _usage_text(self, team: str, user: str, scope: str | None = None) -> str:
        """The user's LLM use: tokens, this month's cost against their budget, and (in a channel) the channel's."""
        from agent_core.budget import monthly_status

        key = self._user_key(team, user)
        total = self.storage.tokens_used(user=key)
        text = (f"You have used {total['prompt_tokens'] + total['completion_tokens']:,} LLM tokens in "
                f"{total['runs']} runs ({total['llm_calls']} LLM calls).")
        budget = self.settings.daily_tokens_per_user
        if budget:
            text += f" Last 24 hours: {self.scheduler.daily_tokens(key):,} of your {budget:,} daily tokens."
        text += f"\nYou: {render.escape(monthly_status(self.storage, self.settings, user=key).describe())}."
        if scope:
            channel_budget = self.scheduler.agent.channel_settings.effective_for_scope(scope).budget_usd
            here = monthly_status(self.storage, self.settings, scope=scope, budget_usd=channel_budget)
            text += f"\nThis channel: {render.escape(here.describe())}."
        return text

    def _history_text(self, runs: list[dict[str, Any]], scope: str) -> str:
        if not runs:
            return f"No AutoCode runs {scope} yet."
        lines = [f"*Recent runs {scope}:*"]
        for run in runs[:10]:
            icon = render.STATUS_ICONS.get(run["status"], "")
            url = self.runtime.run_url(run)
            task = render.escape(render.clip(run["task"].replace("\n", " "), 80))
            lines.append(f"{icon} {f'<{url}|{task}>' if url else task} · {run['created_at'][:16].replace('T', ' ')}")
        return "\n".join(lines)

    def _channel_command(self, word: str, team: str, channel: str, user: str) -> str:
        """`/autocode help|reset|history|usage|cancel` (answered in the ack, so it must stay cheap)."""
        if word == "usage":
            return self._usage_text(team, user, f"slack:{team}:{channel}")
        runs = self._user_runs_here(team, channel, user)
        if word == "history":
            return self._history_text(runs, "of yours in this channel")
        if word == "reset":
            conversations = {r["conversation"] for r in runs}
            files = sum(self._kept_files(c) for c in conversations)
            removed = sum(self.storage.clear_conversation(c) for c in conversations)  # messages and workspace
            return (f"Forgot {removed} messages and {files} files of your {len(conversations)} AutoCode "
                    "conversations in this channel; new tasks start fresh.")
        if word == "cancel":
            active = [r for r in runs if r["status"] in render.ACTIVE]
            for run in active:
                self._spawn(self._cancel(run["id"], None), "cancelling a run")
            return f"Cancelling {len(active)} run(s)." if active else "You have no running tasks in this channel."
        return HELP

    def _thread_command(self, word: str, conversation: str, team: str, user: str) -> str:
        """The same words said to AutoCode inside a thread act on that thread's conversation."""
        if word == "usage":
            return self._usage_text(team, user, scope_of(conversation))
        runs = [r for r in self.storage.list_runs(conversation) if r["adapter"] == self.name]
        if word == "history":
            return self._history_text(runs, "in this thread")
        if word == "reset":
            files = self._kept_files(conversation)
            removed = self.storage.clear_conversation(conversation)  # its messages and its workspace
            return (f"Forgot this thread's history ({removed} messages) and its files ({files}); the next task "
                    "starts fresh.")
        if word == "cancel":  # only the caller's own runs: others' are theirs (or an admin's, by the button)
            mine = self._user_key(team, user)
            active = [r for r in runs if r["status"] in render.ACTIVE and r["user"] == mine]
            for run in active:
                self._spawn(self._cancel(run["id"], None), "cancelling a run")
            return f"Cancelling {len(active)} run(s)." if active else "Nothing of yours is running in this thread."
        return HELP

    def _kept_files(self, conversation: str) -> int:
        """The files a conversation's workspace holds for the user (uploads and outputs; not AutoCode's own
        results/run-N.json records)."""
        return sum(1 for row in self.storage.workspace_files(conversation) if row["kind"] != "result")

    async def _cancel(self, run_id: str, route: dict[str, Any] | None) -> None:
        status = await self.scheduler.cancel(run_id)
        if status != "cancelled" and route is not None:
            await self._ephemeral(route, f"That run already {status}.")

    # --- posting ---------------------------------------------------------------------------------------------
    async def _say(self, route: dict[str, Any], text: str) -> None:
        client = await self._client_for(route)
        await client.chat_postMessage(channel=route["channel"], thread_ts=route.get("thread_ts"), text=text,
                                      blocks=render.sections(text)[: render.MAX_BLOCKS])
        self._spoke(route)

    def _spoke(self, route: dict[str, Any]) -> None:
        """Record that AutoCode posted in the route's thread (a reply right after it is for AutoCode: `addressed`)."""
        if route.get("thread_ts"):
            self.threads.spoke(route.get("team") or "", route["channel"], route["thread_ts"])

    async def _ephemeral(self, route: dict[str, Any], text: str) -> None:
        client = await self._client_for(route)
        await client.chat_postEphemeral(channel=route["channel"], user=route["user"], text=text,
                                        thread_ts=route.get("thread_ts"))

    def _progress_from_row(self, run: dict[str, Any]) -> render.Progress:
        route = self.storage.reply_to(run["id"])
        progress = render.Progress(run["id"], run["task"], user=route.get("user", ""), url=self.runtime.run_url(run),
                                   files=[str(name) for name in route.get("files") or []])
        if run["status"] not in render.ACTIVE:
            progress.status, progress.error, progress.iteration = run["status"], run["error"], run["iterations"] or 0
            progress.usage = self.storage.usage(run["id"])
        return progress

    def _view(self, run_id: str) -> RunView | None:
        """The view of one of our runs (created on first sight), None for other adapters' runs."""
        view = self._views.get(run_id)
        if view is not None or run_id in self._not_ours:
            return view
        run = self.storage.get_run(run_id)
        if run is None or run["adapter"] != self.name:
            if len(self._not_ours) > 10000:
                self._not_ours.clear()
            self._not_ours.add(run_id)
            return None
        view = self._views[run_id] = RunView(self._progress_from_row(run))
        return view

    def _on_event(self, event: RunEvent) -> None:
        """Run event subscriber: records the state and returns at once (it runs inside the agent loop)."""
        view = self._view(event.run_id)
        if view is None:
            return
        view.apply(event)
        self._kick(view)
        if isinstance(event, ApprovalRequested):
            task = self._spawn(self._ask(view, event), f"asking to approve {event.tool}")
            self._asked[(event.run_id, event.number)] = (event, task)
        elif isinstance(event, ApprovalDecided):
            self._spawn(self._decided(event), f"showing the decision on {event.tool}")

    # --- approvals -----------------------------------------------------------------------------------------
    async def _ask(self, view: RunView, event: ApprovalRequested) -> None:
        """Post the call with Approve / Deny in the run's thread (its ts kept in reply_to)."""
        route = await self._ensure_progress(view)
        client = await self._client_for(route)
        shown = render.approval_call(event.tool, event.call, arguments=event.arguments)
        blocks = render.approval_blocks(event.run_id, event.number, event.tool, shown,
                                        requester=route.get("user", ""), timeout_s=event.timeout_s)
        response = await client.chat_postMessage(channel=route["channel"], thread_ts=route.get("thread_ts"),
                                                 blocks=blocks, text=render.fallback_text(blocks))
        self._spoke(route)
        self.storage.update_reply_to(event.run_id, **{f"approval_{event.number}_ts": response["ts"]})

    async def _decided(self, event: ApprovalDecided) -> None:
        """Replace the buttons by who decided what (also for a timeout, a cancel, a restart)."""
        asked, task = self._asked.pop((event.run_id, event.number), (None, None))
        if task is None or asked is None:
            return
        await task  # the request's message is posted before it is updated
        route = self.storage.reply_to(event.run_id)
        ts = route.get(f"approval_{event.number}_ts")
        if not ts:
            return
        client = await self._client_for(route)
        blocks = render.approval_blocks(event.run_id, event.number, event.tool,
                                        render.approval_call(asked.tool, asked.call, arguments=asked.arguments),
                                        decision=event.decision, by=event.by, timeout_s=asked.timeout_s)
        await client.chat_update(channel=route["channel"], ts=ts, blocks=blocks, text=render.fallback_text(blocks))

    async def _approvals_interrupted(self, client: AsyncWebClient, route: dict[str, Any], run_id: str) -> None:
        """A restart ended the run while approvals waited: their messages say so, and lose their buttons (this
        process never saw them asked, so no ApprovalDecided reaches `_decided`)."""
        for approval in self.storage.approvals(run_id):
            ts = route.get(f"approval_{approval['number']}_ts")
            if not ts or approval["status"] != "interrupted":
                continue
            shown = render.approval_call(approval["tool"] or "", None, approval.get("call_json"),
                                         approval.get("arguments") or "")
            blocks = render.approval_blocks(run_id, approval["number"], approval["tool"] or "", shown,
                                            decision="interrupted")
            try:
                await client.chat_update(channel=route["channel"], ts=ts, blocks=blocks,
                                         text=render.fallback_text(blocks))
            except Exception as exc:
                log.warning("slack: could not update approval %s of run %s: %s", approval["number"], run_id,
                            _short(exc))

    async def _on_approval(self, ack: Callable[..., Awaitable[None]], body: dict[str, Any],
                           action: dict[str, Any]) -> None:
        """Approve / Deny: only the requester or an admin decides; anyone else is told so and nothing changes."""
        await ack()
        team, channel, user = _action_place(body)
        route = {"team": team, "channel": channel, "user": user, "thread_ts": _action_thread(body),
                 "enterprise": (body.get("enterprise") or {}).get("id")}
        refusal = self._refusal(team, channel, user)
        if refusal:
            self._spawn(self._ephemeral(route, refusal), "posting a refusal")
            return
        parsed = render.parse_approval_value(str(action.get("value", "")))
        run = self.storage.get_run(parsed[0]) if parsed else None
        if parsed is None or run is None or run["adapter"] != self.name:
            return
        denied = self._not_theirs(run, team, user, "approve or deny", "call")
        if denied:
            self._spawn(self._ephemeral(route, denied), "posting a refusal")
            return
        decided = self.runtime.approvals.decide(run["id"], parsed[1], action.get("action_id") == render.APPROVE_ACTION,
                                                self._user_key(team, user))
        if not decided.ok:
            self._spawn(self._ephemeral(route, render.escape(decided.message)), "saying it was already decided")

    def _kick(self, view: RunView) -> None:
        if view.task is None:
            view.task = self._spawn(self._render_run(view), f"rendering run {view.progress.run_id}")

    async def _open(self, run_id: str) -> None:
        view = self._view(run_id)
        if view is not None:
            view.dirty.set()
            self._kick(view)

    async def _ensure_progress(self, view: RunView) -> dict[str, Any]:
        """The run's routing, with its progress message posted (once; kept in reply_to for restarts)."""
        run_id = view.progress.run_id
        async with view.lock:
            route = self.storage.reply_to(run_id)
            if route.get("progress_ts"):
                return route
            client = await self._client_for(route)
            blocks = render.progress_blocks(view.progress)
            view.dirty.clear()
            view.rendered_final = view.progress.final
            response = await client.chat_postMessage(channel=route["channel"], thread_ts=route.get("thread_ts"),
                                                     text=render.fallback_text(blocks), blocks=blocks)
            view.last_update = asyncio.get_running_loop().time()
            changes = {"progress_ts": response["ts"]}
            if not route.get("thread_ts"):  # a slash command: our message starts the thread
                changes["thread_ts"] = response["ts"]
                run = self.storage.get_run(run_id) or {}
                self.threads.add(route["team"], route["channel"], response["ts"], run.get("conversation", ""))
            self.threads.spoke(route["team"], route["channel"], changes.get("thread_ts") or route["thread_ts"])
            return self.storage.update_reply_to(run_id, **changes)

    async def _update(self, client: AsyncWebClient, route: dict[str, Any], progress: render.Progress) -> None:
        blocks = render.progress_blocks(progress)
        await client.chat_update(channel=route["channel"], ts=route["progress_ts"], text=render.fallback_text(blocks),
                                 blocks=blocks)

    async def _render_run(self, view: RunView) -> None:
        """Post, then update the progress message at most once per UPDATE_INTERVAL (coalescing events in
        between; the final state is always rendered), then deliver the answer, log and artifacts. A run answered
        in place skips the final progress state: its message goes straight to the answer."""
        await self._ready.wait()
        await self.runtime.quiet()
        route = await self._ensure_progress(view)
        client = await self._client_for(route)
        loop = asyncio.get_running_loop()
        in_place = _in_place(route)
        while not view.rendered_final:
            await view.dirty.wait()
            delay = view.last_update + UPDATE_INTERVAL - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            await self.runtime.quiet()
            view.dirty.clear()
            final = view.progress.final
            if final and in_place and view.progress.status != "interrupted":
                break  # _deliver turns the message into the answer
            try:
                await self._update(client, route, view.progress)
            except Exception as exc:  # e.g. the message was deleted: keep going, the answer still follows
                log.warning("slack: chat.update failed for run %s: %s", view.progress.run_id, _short(exc))
            view.last_update = loop.time()
            view.rendered_final = final
        if view.progress.status != "interrupted":
            delay = view.last_update + UPDATE_INTERVAL - loop.time()
            if in_place and delay > 0:  # the pace of updates holds for the answer too
                await asyncio.sleep(delay)
            await self._deliver(client, route, view.progress.run_id)
        self._views.pop(view.progress.run_id, None)

    async def _deliver(self, client: AsyncWebClient, route: dict[str, Any], run_id: str) -> None:
        """The answer (the progress message updated into it, or a message streamed into the thread), then the
        execution log as one message with its detail attached, then the run's files; images also appear in an
        answered-in-place message."""
        run = self.storage.get_run(run_id)
        if run is None or route.get("delivered"):
            return
        progress = self._progress_from_row(run)
        answer = run["answer"] or ""
        if _in_place(route):
            files = await self._answer_in_place(client, route, progress, answer)
            answer_ts = route["progress_ts"]
        else:
            answer_ts, files = await self._answer_in_thread(client, route, run, progress.url)
        self._spoke(route)
        self.storage.update_reply_to(run_id, answer_ts=answer_ts, delivered=True)
        await self._post_log(client, route, run_id, progress.url)
        stored = self.storage.artifacts(run_id, with_data=True)
        artifacts = [render.Attachment(a["name"], a["data"], a["name"]) for a in stored]
        images = {a["name"] for a in stored if a["mime"] in IMAGE_MIMES}
        uploaded = await self._upload(client, route, run_id, [*files, *artifacts])
        shown = [(file_id, name) for file_id, name in uploaded if name in images]
        if shown and _in_place(route):
            await self._show_images(client, route, progress, answer, shown)

    async def _answer_in_place(self, client: AsyncWebClient, route: dict[str, Any], progress: render.Progress,
                               answer: str) -> list[render.Attachment]:
        """Update the progress message into the answer; a message Slack finds too long is sent shorter (the
        rest in answer.md), and if the message cannot be updated at all the answer goes into the thread."""
        rendered = render.final_blocks(progress, answer)
        for attempt in (rendered, render.final_blocks(progress, answer, room=render.SHORT_ANSWER_CHARS)):
            try:
                await client.chat_update(channel=route["channel"], ts=route["progress_ts"], blocks=attempt.blocks,
                                         text=render.fallback_text(attempt.blocks))
                return attempt.files
            except SlackApiError as exc:
                if _api_error(exc) not in ("msg_too_long", "invalid_blocks") or attempt is not rendered:
                    log.warning("slack: the answer of run %s could not replace its message: %s", progress.run_id,
                                _short(exc))
                    break
        fallback = render.thread_answer_blocks(progress.status, answer, progress.error, progress.url)
        await client.chat_postMessage(channel=route["channel"], thread_ts=route.get("thread_ts"),
                                      blocks=fallback.blocks, text=render.fallback_text(fallback.blocks))
        return fallback.files

    async def _answer_in_thread(self, client: AsyncWebClient, route: dict[str, Any], run: dict[str, Any],
                                url: str | None) -> tuple[str | None, list[render.Attachment]]:
        """A succeeded answer streamed into the thread (chat_stream); a failure, or a stream Slack does not offer
        or that breaks off, as one complete message: the streamed message updated, else a new one. Never half."""
        answer, channel, thread = run["answer"] or "", route["channel"], route.get("thread_ts")
        complete = render.thread_answer_blocks(run["status"], answer, run["error"], url)
        streamer = None
        if run["status"] == "succeeded" and answer.strip() and thread:
            text, files = render.stream_text(answer)
            try:
                streamer = await client.chat_stream(channel=channel, thread_ts=thread, buffer_size=STREAM_BUFFER,
                                                    recipient_team_id=route.get("team") or None,
                                                    recipient_user_id=route.get("user") or None)
                for piece in render.stream_pieces(text):
                    await streamer.append(markdown_text=piece)
                await streamer.stop(blocks=render.stream_footer(url) or None)
                return streamer.ts, files
            except Exception as exc:
                log.warning("slack: streaming the answer of run %s failed (%s); sending it whole", run["id"],
                            _short(exc))
            if streamer is not None and streamer.ts:
                try:
                    await client.chat_update(channel=channel, ts=streamer.ts, blocks=complete.blocks,
                                             text=render.fallback_text(complete.blocks))
                    return streamer.ts, complete.files
                except Exception as exc:
                    log.warning("slack: finishing the streamed answer of run %s failed: %s", run["id"], _short(exc))
        response = await client.chat_postMessage(channel=channel, thread_ts=thread, blocks=complete.blocks,
                                                 text=render.fallback_text(complete.blocks))
        if streamer is not None and streamer.ts:
            try:  # the half-streamed message goes: the complete answer is below
                await client.chat_delete(channel=channel, ts=streamer.ts)
            except Exception as exc:
                log.warning("slack: could not remove a broken stream of run %s: %s", run["id"], _short(exc))
        return response["ts"], complete.files

    async def _post_log(self, client: AsyncWebClient, route: dict[str, Any], run_id: str, url: str | None) -> None:
        """The execution log as one message in the thread: the summary, with the detail document attached."""
        logged = log_to_post(self.storage, self.settings, run_id)
        if logged is None:
            return
        summary = render.log_summary(logged, url)
        try:
            await client.files_upload_v2(channel=route["channel"], thread_ts=route.get("thread_ts"),
                                         filename=logged.filename, content=logged.document.encode(),
                                         title=f"Execution log of run {run_id}", initial_comment=summary)
        except Exception as exc:  # the summary still reaches the thread; the run page has the detail
            log.warning("slack: upload of the log of run %s failed: %s", run_id, _short(exc))
            await client.chat_postMessage(channel=route["channel"], thread_ts=route.get("thread_ts"), text=summary,
                                          blocks=render.sections(summary)[: render.MAX_BLOCKS])
        self._spoke(route)

    async def _upload(self, client: AsyncWebClient, route: dict[str, Any], run_id: str,
                      items: list[render.Attachment]) -> list[tuple[str, str]]:
        """Upload files into the thread, up to FILES_PER_UPLOAD a message; (Slack file id, name) of each uploaded.
        A group Slack refuses is retried file by file, and a file that still fails is named in the thread."""
        uploaded: list[tuple[str, str]] = []
        channel, thread = route["channel"], route.get("thread_ts")
        for start in range(0, len(items), FILES_PER_UPLOAD):
            group = items[start:start + FILES_PER_UPLOAD]
            try:
                response = await client.files_upload_v2(channel=channel, thread_ts=thread, file_uploads=[
                    {"filename": item.filename, "content": item.data, "title": item.title} for item in group])
                uploaded += [(str(f.get("id")), item.filename) for f, item in zip(response.get("files") or [], group)]
                continue
            except Exception as exc:
                log.warning("slack: upload of %d files failed for run %s: %s", len(group), run_id, _short(exc))
            for item in group:
                try:
                    response = await client.files_upload_v2(channel=channel, thread_ts=thread, filename=item.filename,
                                                            content=item.data, title=item.title)
                    uploaded += [(str(f.get("id")), item.filename) for f in (response.get("files") or [])[:1]]
                except Exception as exc:
                    log.warning("slack: upload of %s failed for run %s: %s", item.filename, run_id, _short(exc))
                    await client.chat_postMessage(channel=channel, thread_ts=thread,
                                                  text=f"Could not upload `{render.escape(item.filename)}` to Slack.")
        if items:
            self._spoke(route)
        return uploaded

    async def _show_images(self, client: AsyncWebClient, route: dict[str, Any], progress: render.Progress,
                           answer: str, images: list[tuple[str, str]]) -> None:
        """Add the run's images (uploaded into the thread) to the answer message. Slack may take a moment before
        a new file can be shown (invalid_blocks): tried again after IMAGE_RETRIES; the thread has them anyway."""
        for wait in (0.0, *IMAGE_RETRIES):
            await asyncio.sleep(wait)
            for room in (render.MESSAGE_CHARS, render.SHORT_ANSWER_CHARS):
                blocks = render.final_blocks(progress, answer, images, room=room).blocks
                try:
                    await client.chat_update(channel=route["channel"], ts=route["progress_ts"], blocks=blocks,
                                             text=render.fallback_text(blocks))
                    return
                except SlackApiError as exc:
                    error = _api_error(exc)
                    if error != "msg_too_long":
                        break
            if error != "invalid_blocks":
                break
        log.warning("slack: the images of run %s are in its thread only (%s)", progress.run_id, error)


def file_label(entry: dict[str, Any]) -> str:
    """The name a user gave a file (a Slack Connect stub has only its id)."""
    return str(entry.get("name") or entry.get("title") or entry.get("id") or "file")


def over_limits(files: list[dict[str, Any]], settings: Settings) -> str | None:
    """What to tell the user when the files, by the count and sizes Slack states, are over AUTOCODE_INPUT_MAX_FILES
    or AUTOCODE_INPUT_MAX_MB (None: within them, or sizes not stated; the streaming cap stays the backstop)."""
    if len(files) > settings.input_max_files:
        return (f"That is {len(files)} files; a task can take at most {settings.input_max_files} "
                "(AUTOCODE_INPUT_MAX_FILES). Nothing was run.")
    for entry in files:
        size = entry.get("size")
        if isinstance(size, int) and size > settings.input_max_mb * 1024 * 1024:
            return (f"{file_label(entry)} is {size / 1048576:.1f} MB, over the limit of {settings.input_max_mb} MB a "
                    "file (AUTOCODE_INPUT_MAX_MB). Nothing was run.")
    return None


def download_source(entry: dict[str, Any], settings: Settings) -> tuple[str, str]:
    """(name, download URL) of a Slack file object; DownloadFailed with the user's message when AutoCode cannot
    or must not fetch it: a link to an external file (Google Drive…), no download link (Slack Connect), a
    deleted file, or a link to a host that is not Slack's (the bot token is never sent there)."""
    name = file_label(entry)
    if entry.get("is_external") or entry.get("mode") == "external":
        where = f" ({entry['external_type']})" if entry.get("external_type") else ""
        raise uploads.DownloadFailed(f"{name} is a link to a file stored outside Slack{where}, so AutoCode cannot "
                                     "fetch it; attach the file itself. Nothing was run.")
    if entry.get("mode") == "tombstone":
        raise uploads.DownloadFailed(f"{name} was deleted from Slack before AutoCode could fetch it. Nothing was run.")
    url = str(entry.get("url_private_download") or entry.get("url_private") or "")
    if not url:
        raise uploads.DownloadFailed(f"Slack gave no download link for {name} (files shared through Slack Connect "
                                     "or from outside Slack may have none); download it and attach it yourself. "
                                     "Nothing was run.")
    if not may_send_token(url, settings.slack_api_url):
        raise uploads.DownloadFailed(f"The link of {name} does not point to Slack, so AutoCode did not fetch it (it "
                                     "sends its token to Slack only). Nothing was run.")
    return name, url


def may_send_token(url: str, api_url: str | None) -> bool:
    """Whether a file URL is Slack's (https, slack.com or slack-gov.com), or on the host of a configured
    SLACK_API_URL (a proxy, an Enterprise gateway, the tests' fake), so the bot token may go with the request."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if api_url:
        api = urlsplit(api_url)
        if (parts.scheme, parts.netloc.lower()) == (api.scheme, api.netloc.lower()):
            return True
    return parts.scheme == "https" and any(host == d or host.endswith("." + d) for d in SLACK_FILE_DOMAINS)


def download_refusal(name: str, status: int) -> str:
    """The user's message for a download Slack answered with `status` instead of the bytes."""
    reason = {401: "AutoCode's token was refused (the app needs the files:read scope)",
              403: "AutoCode may not read it (the app needs the files:read scope and access to the channel)",
              404: "Slack no longer has it (deleted?)"}.get(status, "Slack could not serve it right now")
    return f"Could not download {name}: HTTP {status}, {reason}. Nothing was run."


def _bot_user(body: dict[str, Any], context: dict[str, Any]) -> str:
    """AutoCode's own user id in this workspace (Bolt's context, else the event's bot authorization)."""
    if context.get("bot_user_id"):
        return str(context["bot_user_id"])
    for entry in body.get("authorizations") or []:
        if entry.get("is_bot") and entry.get("user_id"):
            return str(entry["user_id"])
    return ""


def _action_place(body: dict[str, Any]) -> tuple[str, str, str]:
    """(team, channel, user) of a block action payload."""
    user = body.get("user") or {}
    team = (body.get("team") or {}).get("id") or user.get("team_id") or ""
    return team, (body.get("channel") or {}).get("id", ""), user.get("id", "")


def _action_thread(body: dict[str, Any]) -> str | None:
    """The thread of the message whose button was pressed (None: a top-level message), for replies beside it."""
    return (body.get("container") or {}).get("thread_ts") or (body.get("message") or {}).get("thread_ts")


def _in_place(route: dict[str, Any]) -> bool:
    """Whether the run's progress message becomes its answer (runs from before reply_to said so: slash commands)."""
    return route.get("answer") == ANSWER_IN_PLACE or route.get("kind") == "command"


def _api_error(exc: BaseException) -> str:
    """The `error` of a Slack API refusal ("" for other failures)."""
    response = getattr(exc, "response", None)
    try:
        return str(response.get("error") or "") if response is not None else ""
    except Exception:
        return ""


def _short(exc: BaseException) -> str:
    """An error in one line, without tokens or response bodies."""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
