"""The run scheduler: a durable queue in SQLite, one active run per conversation, a global cap, cancellation,
daily token budgets and monthly money budgets (the user's, the channel's) at submission (a running run counts them
too, see agent_core/budget.py), and recovery of runs a crash left behind.

A run submitted with `hold=True` is stored (and de-duplicated by its delivery id) but `held`: the dispatcher does not
start it until `release(run_id)` (its files are in the conversation's workspace) or ends it with `fail_held(run_id,
message)`. agent_core/uploads.py is the one caller of both; a held run found at start-up is interrupted.

Start-up recovery is the database owner's alone (storage/owner.py): `start()` owns the database first (serve owns it
before building anything, and hands its lock over), so a second scheduler on the same database refuses to start
instead of interrupting the first one's live runs."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from agent_core import history
from agent_core.budget import daily_tokens_used, money_refusal
from agent_core.channel_settings import scope_of
from agent_core.disk import disk_full
from agent_core.events import RunFinished
from agent_core.loop import DISK_FULL_MESSAGE, Agent
from storage.db import DuplicateDelivery
from storage.owner import DatabaseOwner
from storage.processes import is_alive_elsewhere

log = logging.getLogger(__name__)

# Called with the run row when a run a crash left `running` is marked `interrupted`, so the adapter that owns the
# conversation can tell its user.
InterruptedNotifier = Callable[[dict], Awaitable[None]]
INTERRUPTED_MESSAGE = "AutoCode restarted while this task was running; please send it again."
HELD_INTERRUPTED_MESSAGE = ("AutoCode restarted while this task's files were being received; nothing was run. "
                            "Please send the task and its files again.")
CANCELLED_MESSAGE = "The run was cancelled."
DISK_FULL_REFUSAL = ("The server's disk is full, so AutoCode could not take this task; nothing was run. The operator "
                     "must free space; then please send it again.")
FINAL = ("succeeded", "failed", "cancelled", "interrupted")
RETRY_FIRST_S, RETRY_MAX_S = 0.5, 5.0  # an end that could not be written is tried again this often


@dataclass(frozen=True)
class Submission:
    run_id: str | None
    status: str  # queued | held | duplicate | refused
    message: str = ""
    reason: str = ""  # when refused: empty | budget | shutting_down | disk_full


class RunScheduler:
    """Owns every run's life after submission. Create it, `await start()`, `submit(...)`, `await stop()`."""

    def __init__(self, agent: Agent, owner: DatabaseOwner | None = None):
        self.agent = agent
        # The database's lock (storage/owner.py): serve's, or taken by `start()` and given up by `stop()`.
        self.owner = owner
        self._own_lock = False
        self.storage = agent.storage
        self.settings = agent.settings
        self.accepting = False
        self._running: dict[str, asyncio.Task] = {}
        self._wake = asyncio.Event()
        self._dispatcher: asyncio.Task | None = None
        self._notifiers: dict[str, InterruptedNotifier] = {}
        # Awaited before runs start (the server waits here, briefly, while HTTP requests are being answered).
        self.yield_to: Callable[[], Awaitable[None]] | None = None
        self._unannounced: list[str] = []
        # Runs whose end could not be written (a full disk): run id -> (status, message), written by `_retry_ends`
        # as soon as the database takes it; their conversations stay busy and nothing dispatches them meanwhile.
        self._unwritten: dict[str, tuple[str, str]] = {}
        self._retrying: asyncio.Task | None = None
        self._stopping = False

    def on_interrupted(self, adapter: str, notify: InterruptedNotifier) -> None:
        self._notifiers[adapter] = notify

    # --- submission -----------------------------------------------------------------------------------------
    def submit(self, task: str, conversation: str, *, user: str = "", adapter: str = "api",
               delivery_id: str | None = None, reply_to: dict | None = None, hold: bool = False) -> Submission:
        """Store the task as a queued run (before the adapter acknowledges it); never starts a second run for
        the same delivery; refuses users over their daily token budget, and users or channels over their monthly
        budget in money (the message says the budget and the spend). With `hold`, the run is stored `held`
        (not started) until `release` or `fail_held`: the adapter receives its files meanwhile."""
        if not self.accepting:
            return Submission(None, "refused", "AutoCode is shutting down; please try again in a minute.",
                              "shutting_down")
        task = task.strip()
        if not task:
            return Submission(None, "refused", "The task is empty.", "empty")
        if user and self.settings.daily_tokens_per_user:
            used = self.daily_tokens(user)
            if used >= self.settings.daily_tokens_per_user:
                return Submission(None, "refused", (
                    f"You have used {used} of your {self.settings.daily_tokens_per_user} LLM tokens for today; "
                    "please try again tomorrow."), "budget")
        scope_budget = self.agent.channel_settings.effective(conversation).budget_usd
        if (user and self.settings.monthly_budget_per_user) or scope_budget:
            refusal = money_refusal(self.storage, self.settings, user=user, scope=scope_of(conversation),
                                    scope_budget_usd=scope_budget)
            if refusal:
                return Submission(None, "refused", refusal, "budget")
        try:
            run_id = self.storage.create_run(conversation, task, status="held" if hold else "queued", user=user,
                                             adapter=adapter,
                                             delivery_id=delivery_id, reply_to=reply_to)
        except DuplicateDelivery as duplicate:
            return Submission(duplicate.run_id, "duplicate", "This delivery already started a run.")
        except Exception as exc:  # the adapters tell the user the refusal's sentence, the API answers 503 with it
            if not disk_full(exc):
                raise
            log.error("a task in %s was refused: the disk is full (%s)", conversation, exc)
            return Submission(None, "refused", DISK_FULL_REFUSAL, "disk_full")
        if hold:
            return Submission(run_id, "held")
        self._wake.set()
        return Submission(run_id, "queued")

    # --- held runs (agent_core/uploads.py) ------------------------------------------------------------------------
    def release(self, run_id: str) -> bool:
        """A held run may start now (its files are stored); False if it is no longer held (cancelled, failed,
        interrupted by a stop meanwhile)."""
        run = self.storage.get_run(run_id)
        if run is None or run["status"] != "held":
            return False
        self.storage.update_run(run_id, status="queued")
        self._wake.set()
        return True

    async def fail_held(self, run_id: str, message: str) -> bool:
        """End a held run as failed with `message` for the user, and its RunFinished event, so the adapter renders
        it like any failed run. False if it is no longer held. Never raises for a full disk: the end is then
        written as soon as the database can take it."""
        run = self.storage.get_run(run_id)
        if run is None or run["status"] != "held":
            return False
        await self._end(run_id, "failed", message)  # written later if the disk is full now
        return True

    def daily_tokens(self, user: str) -> int:
        """Tokens of the user's runs in the last 24 hours (the window the daily budget counts)."""
        return daily_tokens_used(self.storage, user)

    # --- cancellation ------------------------------------------------------------------------------------------
    async def cancel(self, run_id: str) -> str | None:
        """Cancel a queued, held or running run; returns its status afterwards (None: no such run). A run always
        ends: one whose task is gone (it crashed, or its end could not be written) is ended here, and an end the
        database cannot take now is written as soon as it can (`cancelled` is reported meanwhile)."""
        run = self.storage.get_run(run_id)
        if run is None:
            return None
        if run["status"] in ("queued", "held"):  # record it first, so nothing dispatches it in between
            await self._end(run_id, "cancelled", "Cancelled before it started.")
        task = self._running.get(run_id)
        if task is not None:
            task.cancel()  # the loop kills the step's process tree and records `cancelled`
            await asyncio.gather(task, return_exceptions=True)
        if (self.storage.get_run(run_id) or {}).get("status") not in FINAL:  # nothing left to record it
            await self._end(run_id, "cancelled", CANCELLED_MESSAGE)
        self._wake.set()
        if run_id in self._unwritten:
            return self._unwritten[run_id][0]
        return self.storage.get_run(run_id)["status"]

    # --- ends the database could not take ----------------------------------------------------------------------
    @property
    def unwritten_ends(self) -> list[str]:
        """Runs ended in memory whose end the database has not taken yet (a full disk); /healthz reports them."""
        return list(self._unwritten)

    async def _end(self, run_id: str, status: str, message: str) -> bool:
        """End a run not yet final as `status` with `message` for its user, and announce it (RunFinished). If the
        database cannot take it now, keep it and try again in the background until it can (`_retry_ends`);
        True once written."""
        pending = self._unwritten.get(run_id)
        if pending is not None and pending[0] == "cancelled":  # a cancel replaces a pending failure, not the reverse
            status, message = pending
        if pending is not None:
            self._unwritten[run_id] = (status, message)
        try:
            written = await self._write_end(run_id, status, message)
        except Exception as exc:
            level = logging.ERROR if disk_full(exc) else logging.WARNING
            log.log(level, "run %s: could not record its end (%s); trying again until the database takes it",
                    run_id, exc)
            self._unwritten.setdefault(run_id, (status, message))
            if self._stopping:
                return False  # what is still unwritten is interrupted at the next start
            if self._retrying is None or self._retrying.done():
                self._retrying = asyncio.create_task(self._retry_ends(), name="autocode-unwritten-ends")
            return False
        self._unwritten.pop(run_id, None)
        return written

    async def _write_end(self, run_id: str, status: str, message: str) -> bool:
        run = self.storage.get_run(run_id)
        if run is None or run["status"] in FINAL:
            return False
        self.storage.end_pending_approvals(run_id, "interrupted" if status == "interrupted" else "cancelled")
        self.storage.finish_run(run_id, status, None, message, run.get("iterations") or 0)
        self._note_end(run, status)
        log.info("run %s ended %s: %s", run_id, status, message)
        if status == "interrupted":  # told through its adapter's notifier, like every interrupted run
            if run_id not in self._unannounced:
                self._unannounced.append(run_id)
            return True
        event = RunFinished(run_id, status, "", message, run.get("iterations") or 0, self.storage.usage(run_id))
        try:
            await self.agent.emit(event)
        except Exception as exc:  # the end is stored; the adapters still hear of it
            log.warning("run %s: its end event was not stored (%s)", run_id, exc)
            await self.agent.events.emit(event)
        return True

    async def _retry_ends(self) -> None:
        delay = RETRY_FIRST_S
        while self._unwritten:
            await asyncio.sleep(delay)
            for run_id, (status, message) in list(self._unwritten.items()):
                try:
                    await self._write_end(run_id, status, message)
                except Exception:
                    delay = min(delay * 2, RETRY_MAX_S)
                    break
                self._unwritten.pop(run_id, None)
                log.info("run %s: its end is recorded now (%s)", run_id, status)
                self._wake.set()  # its conversation is free
                if status == "interrupted":
                    await self.announce_interrupted()

    # --- life cycle ----------------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Mark runs a crash left `running` as interrupted, then accept and dispatch. Tell their users with
        `announce_interrupted()` once the adapters are up. DatabaseBusy (nothing changed) when another process
        owns the database."""
        if self.owner is None or not self.owner.held:
            self.owner = DatabaseOwner.acquire(self.storage.path)
            self._own_lock = True
        self._unannounced = self._recover()
        if self._unwritten:  # a full disk at start: recorded `interrupted` (and announced) once it can be
            self._retrying = asyncio.create_task(self._retry_ends(), name="autocode-unwritten-ends")
        self.accepting = True
        self._dispatcher = asyncio.create_task(self._dispatch(), name="autocode-dispatcher")

    def _recover(self) -> list[str]:
        """What a crash left (the owner's alone): runs `running` or `held` are interrupted, and the temporary files
        of uploads it cut off removed."""
        from agent_core.uploads import remove_leftovers

        remove_leftovers(self.storage)
        interrupted = []
        for run in self.storage.runs_with_status("running"):
            if is_alive_elsewhere(run.get("runner")):  # e.g. `autocode run` beside this serve: still running
                continue
            log.warning("run %s was interrupted by a restart", run["id"])
            if self._interrupt(run["id"]):
                interrupted.append(run["id"])
        for run in self.storage.runs_with_status("held"):  # its files' download died with the process
            log.warning("held run %s was interrupted by a restart", run["id"])
            if self._interrupt(run["id"], HELD_INTERRUPTED_MESSAGE):
                interrupted.append(run["id"])
        return interrupted

    async def announce_interrupted(self) -> None:
        """Tell the users of interrupted runs (found at start, or cut off by `stop`), through the adapter owning
        each conversation."""
        interrupted, self._unannounced = self._unannounced, []
        for run_id in interrupted:
            run = self.storage.get_run(run_id)
            notify = self._notifiers.get(run["adapter"] or "")
            if notify is not None:
                try:
                    await notify(run)
                except Exception:
                    log.exception("could not tell %s about interrupted run %s", run["adapter"], run["id"])

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting; let running runs finish within `grace` seconds; mark the rest interrupted."""
        self.accepting = False
        self._stopping = True
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            await asyncio.gather(self._dispatcher, return_exceptions=True)
        if self._retrying is not None:  # one last try below; what is still unwritten is interrupted at next start
            self._retrying.cancel()
            await asyncio.gather(self._retrying, return_exceptions=True)
        for run_id, (status, message) in list(self._unwritten.items()):
            await self._end(run_id, status, message)
        running = list(self._running.items())
        if running:
            grace = self.settings.shutdown_grace if grace is None else grace
            await asyncio.wait([task for _, task in running], timeout=grace)
        for run_id, task in running:
            if not task.done():
                # Before the cancel: an approval it waits on ends `interrupted` (the cancel would record `cancelled`).
                try:
                    self.storage.end_pending_approvals(run_id, "interrupted")
                except Exception as exc:  # a full disk: the next start ends them
                    log.error("run %s: could not end its pending approvals (%s)", run_id, exc)
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                if self._interrupt(run_id):
                    self._unannounced.append(run_id)
        for run in self.storage.runs_with_status("held"):  # a receiver still downloading finds it no longer held
            if self._interrupt(run["id"], HELD_INTERRUPTED_MESSAGE):
                self._unannounced.append(run["id"])
        await self.announce_interrupted()  # the adapters are still up
        if self._own_lock and self.owner is not None:
            self.owner.release()
            self.owner, self._own_lock = None, False

    def _interrupt(self, run_id: str, message: str = INTERRUPTED_MESSAGE) -> bool:
        """Record the run `interrupted` (and, if its task is in the history, a note that it ended); False if the
        database could not take it (then `_retry_ends` writes and announces it as soon as it can, or the next start
        does)."""
        run = self.storage.get_run(run_id) or {}
        try:
            self.storage.end_pending_approvals(run_id, "interrupted")  # a decision now could reach no step
            self.storage.finish_run(run_id, "interrupted", None, message, run.get("iterations") or 0)
        except Exception as exc:  # a full disk: written by _retry_ends as soon as it can be (or at the next start)
            log.error("run %s: could not record it interrupted (%s); trying again until the database takes it",
                      run_id, exc)
            self._unwritten.setdefault(run_id, ("interrupted", message))
            return False
        self._note_end(run, "interrupted")
        return True

    def _note_end(self, run: dict[str, Any], kind: str) -> None:
        """A run ended here, not by its loop: if its task is in the history (it was running), a neutral note that
        it got no answer (agent_core/history.py), as the loop leaves."""
        if run.get("status") != "running" or not run.get("conversation"):
            return
        try:
            self.storage.add_message(run["conversation"], "assistant", history.note(kind), run["id"])
        except Exception as exc:  # the run's end stands; the history only misses its note
            log.error("run %s: could not note its end in the history (%s)", run["id"], exc)

    @property
    def running(self) -> list[str]:
        return list(self._running)

    # --- dispatching ---------------------------------------------------------------------------------------------
    async def _dispatch(self) -> None:
        while True:
            self._wake.clear()
            if self.yield_to is not None and self._eligible():
                await self.yield_to()  # acknowledgements in flight first: starting runs would delay them
            for run in self._eligible():
                task = asyncio.create_task(self._execute(run["id"]), name=f"run-{run['id']}")
                self._running[run["id"]] = task
                # A done callback, not a `finally`: a task cancelled before it ever ran must free its slot too.
                task.add_done_callback(lambda _, run_id=run["id"]: self._release(run_id))
            await self._wake.wait()

    def _release(self, run_id: str) -> None:
        self._running.pop(run_id, None)
        self._wake.set()

    def _eligible(self) -> list[dict]:
        """Queued runs that may start now: the oldest of each idle conversation, within the global cap."""
        free = self.settings.max_concurrent_runs - len(self._running)
        if free <= 0:
            return []
        busy = {row["conversation"] for row in self.storage.runs_with_status("running")}
        picked: list[dict] = []
        for run in self.storage.runs_with_status("queued"):
            if run["conversation"] in busy or run["id"] in self._running or run["id"] in self._unwritten:
                busy.add(run["conversation"])  # later tasks of a conversation wait for the earlier ones
                continue
            busy.add(run["conversation"])
            picked.append(run)
            if len(picked) == free:
                break
        return picked

    async def _execute(self, run_id: str) -> None:
        if (self.storage.get_run(run_id) or {}).get("status") != "queued":
            return  # cancelled between dispatch and start
        try:
            await self.agent.execute(run_id)
        except asyncio.CancelledError:
            pass  # the run is recorded as cancelled by the loop (cancel() ends it if the loop could not)
        except Exception as exc:  # its end was not recorded: end it here, or as soon as the database can take it
            if disk_full(exc):
                log.error("run %s: the disk is full (%s)", run_id, exc)
                message = DISK_FULL_MESSAGE
            else:
                log.exception("run %s crashed outside the loop", run_id)
                message = f"Internal error ({type(exc).__name__}); see the server log for run {run_id}."
            await asyncio.shield(self._end(run_id, "failed", message))
