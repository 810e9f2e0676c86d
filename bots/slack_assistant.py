"""Slack's assistant surface ("Agents & AI Apps"): Bolt's AsyncAssistant middleware, mounted by bots/slack.py.

- `assistant_thread_started`: the thread is recorded as an assistant thread (with the context Slack sends: the
  channel the user was viewing) and gets the suggested prompts (AUTOCODE_SLACK_SUGGESTED_PROMPTS).
- A user message in a thread: the same path as any other direct message (`SlackAdapter._on_post`: same runs,
  conversation `slack:{team}:{channel}:{thread_ts}`, workspace, history and files). The first task of an assistant
  thread sets its title. A reply in a DM thread that is not an assistant thread (a workspace without the feature,
  or a thread from before it) is handled exactly as before (`SlackAdapter._on_message`).
- While a run of an assistant thread works, the thread's status line follows its events (`status_for`):
  "planning…", "running step 2/3: closest_pair", "checking the result…", "repairing from …", a slow LLM or an
  approval being waited for; cleared once the answer is delivered. Statuses are sent in order, one call at a
  time per run, after the run's progress message (a post in the thread clears Slack's status line).
- `assistant_thread_context_changed`: the new context is saved (Bolt's default listener, our store).

The thread context store is a table in the adapter's SQLite file (autocode.slack.db), so no message metadata or
extra Web API call is needed to remember it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from slack_bolt.context.assistant.thread_context import AssistantThreadContext
from slack_bolt.context.assistant.thread_context_store.async_store import AsyncAssistantThreadContextStore
from slack_bolt.context.set_status.async_set_status import AsyncSetStatus
from slack_bolt.middleware.assistant.async_assistant import AsyncAssistant
from slack_sdk.errors import SlackApiError

from agent_core.events import (
    ApprovalDecided, ApprovalRequested, EvaluationDone, LLMWaitOver, LLMWaiting, PlanReady, RepairPlanned, RunEvent,
    RunFinished, RunStarted, StepFinished, StepStarted, WorkerWaiting,
)
from bots import slack_render as render

if TYPE_CHECKING:
    from bots.slack import SlackAdapter

log = logging.getLogger(__name__)

STATUS_CHARS = 100  # a status is one short line
TITLE_CHARS = 80
PROMPTS_TITLE = "AutoCode writes and runs Python for you. Try:"
PENDING_MAX = 3  # statuses waiting to be sent beyond this are skipped to the newest (a slow Slack never lags far)


class AssistantThreads(AsyncAssistantThreadContextStore):
    """Which DM threads are assistant threads, and each one's context (Bolt's thread context store)."""

    def __init__(self, path: Path):
        self._db = sqlite3.connect(str(path), check_same_thread=False, timeout=30)
        self._lock = threading.Lock()
        with self._lock, self._db:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS autocode_slack_assistant_threads (channel TEXT, "
                             "thread_ts TEXT, team TEXT, user TEXT, context_json TEXT, "
                             "PRIMARY KEY (channel, thread_ts))")

    def started(self, channel: str, thread_ts: str, team: str, user: str, context: dict[str, Any]) -> None:
        with self._lock, self._db:
            self._db.execute("INSERT OR REPLACE INTO autocode_slack_assistant_threads VALUES (?, ?, ?, ?, ?)",
                             (channel, thread_ts, team, user, json.dumps(context or {})))

    def known(self, channel: str, thread_ts: str) -> bool:
        """Whether Slack told us this thread is an assistant thread (assistant_thread_started)."""
        with self._lock:
            row = self._db.execute("SELECT 1 FROM autocode_slack_assistant_threads WHERE channel = ? AND "
                                   "thread_ts = ?", (channel, thread_ts)).fetchone()
        return row is not None

    async def save(self, *, channel_id: str, thread_ts: str, context: dict[str, str]) -> None:
        with self._lock, self._db:
            self._db.execute("UPDATE autocode_slack_assistant_threads SET context_json = ? WHERE channel = ? AND "
                             "thread_ts = ?", (json.dumps(context or {}), channel_id, thread_ts))

    async def find(self, *, channel_id: str, thread_ts: str) -> AssistantThreadContext | None:
        with self._lock:
            row = self._db.execute("SELECT context_json FROM autocode_slack_assistant_threads WHERE channel = ? "
                                   "AND thread_ts = ?", (channel_id, thread_ts)).fetchone()
        context = json.loads(row[0] or "{}") if row else {}
        return AssistantThreadContext(context) if context.get("channel_id") else None

    def close(self) -> None:
        self._db.close()


class StatusLine:
    """The status an assistant thread shows for one run, from its events (`apply` returns the new text, or None
    when it does not change; "" clears it). A slow LLM call or an approval wait shows over the run's own state
    until the run moves on."""

    def __init__(self) -> None:
        self.base = ""
        self.waiting = ""
        self.shown: str | None = None
        self.final = False

    def apply(self, event: RunEvent) -> str | None:
        if not isinstance(event, (LLMWaiting, WorkerWaiting)):
            self.waiting = ""
        match event:
            case RunStarted():
                self.base = "planning…"
            case PlanReady():
                pass
            case StepStarted(index=i, total=n, tool_name=name):
                self.base = f"running step {i}/{n}: {name}"
            case StepFinished(index=i, total=n, ok=ok):
                if not ok or i == n:
                    self.base = "checking the result…"
            case EvaluationDone(satisfactory=ok):
                if not ok:
                    self.base = "repairing…"
            case RepairPlanned(retry_from=name):
                self.base = f"repairing from {name}…"
            case LLMWaiting() | WorkerWaiting():
                self.waiting = event.describe()
            case ApprovalRequested(tool=tool):
                self.waiting = f"waiting for an approval of {tool} (in the thread)"
            case ApprovalDecided() | LLMWaitOver():
                pass
            case RunFinished():
                self.final = True
                self.base = ""
        text = render.clip((self.waiting or self.base).replace("\n", " "), STATUS_CHARS) if not self.final else ""
        if text == self.shown:
            return None
        self.shown = text
        return text


class _RunStatus:
    """The statuses of one run still to be sent, in order."""

    def __init__(self, route: dict[str, Any]):
        self.route = route
        self.line = StatusLine()
        self.pending: list[str] = []
        self.wake = asyncio.Event()
        self.task: asyncio.Task | None = None


class SlackAssistant:
    """The assistant surface of a SlackAdapter (see the module docstring): `middleware` is mounted with
    `app.assistant(...)`."""

    def __init__(self, adapter: "SlackAdapter"):
        self.adapter = adapter
        self.prompts = [{"title": title, "message": message}
                        for title, message in adapter.settings.slack_suggested_prompts]
        self.threads = AssistantThreads(adapter.store_path)
        self.middleware = AsyncAssistant(thread_context_store=self.threads, logger=log)
        self.middleware.thread_started(self._on_thread_started)
        self.middleware.user_message(self._on_user_message)
        self._runs: dict[str, _RunStatus | None] = {}  # None: not a run of an assistant thread
        adapter.runtime.events.subscribe(self._on_event)

    def close(self) -> None:
        self.threads.close()

    # --- listeners ---------------------------------------------------------------------------------------------
    async def _on_thread_started(self, event: dict[str, Any], body: dict[str, Any], context: dict[str, Any],
                                 set_suggested_prompts: Callable[..., Awaitable[Any]]) -> None:
        thread = event.get("assistant_thread") or {}
        channel, thread_ts = str(thread.get("channel_id") or ""), str(thread.get("thread_ts") or "")
        user = str(thread.get("user_id") or "")
        team = body.get("team_id") or context.get("team_id") or ""
        if not channel or not thread_ts:
            return
        self.threads.started(channel, thread_ts, team, user, thread.get("context") or {})
        route = {"team": team, "channel": channel, "user": user, "thread_ts": thread_ts,
                 "enterprise": body.get("enterprise_id")}
        refusal = self.adapter._refusal(team, channel, user)
        if refusal:
            if self.adapter._first_time(f"slack:{team}:assistant:{channel}:{thread_ts}"):  # not again on a retry
                self.adapter._spawn(self.adapter._say(route, refusal), "refusing an assistant thread")
        elif self.prompts:
            self.adapter._spawn(set_suggested_prompts(prompts=self.prompts, title=PROMPTS_TITLE),
                                "setting the suggested prompts")

    async def _on_user_message(self, event: dict[str, Any], body: dict[str, Any], context: dict[str, Any],
                               set_title: Callable[..., Awaitable[Any]]) -> None:
        adapter = self.adapter
        channel, thread_ts = str(event.get("channel") or ""), str(event.get("thread_ts") or "")
        if not event.get("user") or not self.threads.known(channel, thread_ts):
            await adapter._on_message(event, body, context)  # a DM thread as before
            return
        team = body.get("team_id") or event.get("team") or context.get("team_id") or ""
        conversation = adapter.threads.get(team, channel, thread_ts) or f"slack:{team}:{channel}:{thread_ts}"
        first = not adapter.storage.list_runs(conversation, limit=1)
        await adapter._on_post(event, body, context, require_owned=False)
        runs = adapter.storage.list_runs(conversation, limit=1) if first else []  # the thread's first run
        if runs:
            title = render.clip(" ".join(runs[0]["task"].split()), TITLE_CHARS)
            adapter._spawn(set_title(title), "setting the assistant thread's title")

    # --- the status line -------------------------------------------------------------------------------------
    def _status_of(self, run_id: str) -> _RunStatus | None:
        if run_id in self._runs:
            return self._runs[run_id]
        run = self.adapter.storage.get_run(run_id)
        status = None
        if run is not None and run["adapter"] == self.adapter.name:
            route = self.adapter.storage.reply_to(run_id)
            if route.get("thread_ts") and self.threads.known(route.get("channel", ""), route["thread_ts"]):
                status = _RunStatus(route)
        if len(self._runs) > 10000:
            self._runs = {k: v for k, v in self._runs.items() if v is not None}
        self._runs[run_id] = status
        return status

    def _on_event(self, event: RunEvent) -> None:
        """Run event subscriber: queues the new status and returns at once (it runs inside the agent loop)."""
        status = self._status_of(event.run_id)
        if status is None:
            return
        text = status.line.apply(event)
        if text is None:
            return
        status.pending.append(text)
        if len(status.pending) > PENDING_MAX:
            status.pending[:] = status.pending[-1:]
        status.wake.set()
        if status.task is None:
            status.task = self.adapter._spawn(self._send(event.run_id, status), f"status of run {event.run_id}")

    async def _send(self, run_id: str, status: _RunStatus) -> None:
        """Send the run's statuses in order, after its progress message; the last one ("") after its answer."""
        adapter = self.adapter
        await adapter._ready.wait()
        view = adapter._view(run_id)
        if view is not None:
            await adapter.runtime.quiet()
            await adapter._ensure_progress(view)
        client = await adapter._client_for(status.route)
        set_status = AsyncSetStatus(client, status.route["channel"], status.route["thread_ts"])
        try:
            while True:
                await status.wake.wait()
                status.wake.clear()
                while status.pending:
                    text = status.pending.pop(0)
                    if text == "" and status.line.final:
                        await self._delivered(run_id)
                    await adapter.runtime.quiet()  # acks first: statuses wait while webhooks are being answered
                    try:
                        await set_status(status=text)
                    except Exception as exc:  # the thread was deleted, a scope is missing: the run goes on
                        reason = exc.response.get("error", "") if isinstance(exc, SlackApiError) and \
                            exc.response is not None else ""
                        log.warning("slack: assistant.threads.setStatus for run %s failed: %s%s", run_id,
                                    type(exc).__name__, f" ({reason})" if reason else "")
                    if text == "" and status.line.final:
                        return
        finally:
            self._runs.pop(run_id, None)

    async def _delivered(self, run_id: str) -> None:
        """Wait until the adapter has posted the run's answer (its render task is over)."""
        view = self.adapter._views.get(run_id)
        task = view.task if view is not None else None
        if task is not None and not task.done():
            await asyncio.wait([task], timeout=120)
