"""Scale-out: the Celery app, the job a worker runs, and `autocode worker`.

With `AUTOCODE_REDIS_URL` set, `serve` sends the steps of each iteration as one job (with the run's working files)
to `autocode worker` processes on any number of machines; `agent_core/sandbox/remote.py` is the serve side. A
worker runs the job in its own local sandbox pool, answers tool calls with its own trusted tool host, and reports
back through Redis lists that only `serve` reads: step started/finished, LLM calls (for usage and budgets, with
each `llm()` call's clipped prompt and reply for the audit), done. A job carries the run's budget (limits set on
`serve`, usage at the job's start); the worker's tool host applies it to every `llm()` call as `serve` would.

Redis keys of a job (all expire): `autocode:job:{id}:events` (the reports), `:beat` (the worker is alive, refreshed
every second), `:claim` (who took it, set once with SET NX: a worker's name, or `GAVE_UP` when serve gave up on the
job or the run was cancelled before a worker took it; a redelivered copy of a claimed job, and a job serve gave up
on, is dropped, so no job runs twice and none runs after serve stopped waiting) and `:cancel` (serve gave up on it
or the run was cancelled: the worker kills the step at once). `autocode:queue` (a sorted set by time sent) holds
the jobs no worker has claimed yet, for the "waiting for a worker: N jobs ahead" line.

Trusted tool calls are journaled in serve's database (tools/journal.py): the worker's tool host asks serve before
each call (`tool_begin`, answered on `:tool:{n}`) and reports after (`tool_finish`), so a job sent again after its
worker was lost gets the recorded results instead of calling again. Every Redis command of a job rides out an
outage of up to AUTOCODE_REDIS_GRACE seconds (agent_core/redis_outage.py).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import socket
import io
import itertools
import tarfile
import tempfile
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any

from celery import Celery

from agent_core.approvals import ToolDenied
from agent_core.budget import BudgetLimits, CountedUsage, RunBudget
from agent_core.config import Settings
from agent_core.helper import ask_helper
from agent_core.llm import CallContext, LLMClient
from agent_core.redis_outage import UNREACHABLE, Outage, RedisUnreachable
from agent_core.sandbox import Limits, PlannedStep, SandboxUnavailable, StepBatch, StepResult
from agent_core.sandbox.clock import paused
from agent_core.sandbox.pool import SandboxExecutor
from tools.host import ToolHost
from tools.journal import CallKey, Recorded, recorded
from storage.db import now
from tools.registry import build_toolset

log = logging.getLogger(__name__)

TASK_NAME = "autocode.run_batch"
KEY_TTL_S = 3600
BEAT_EVERY_S = 1.0
BEAT_TTL_S = 5
CANCEL_POLL_S = 0.2
QUEUE_KEY = "autocode:queue"  # jobs sent and not claimed yet, scored by when they were sent
GAVE_UP = "serve:gave-up"  # the claim serve takes on a job it stopped waiting for: no worker may start it


def job_key(job_id: str, part: str) -> str:
    return f"autocode:job:{job_id}:{part}"


def celery_app(settings: Settings) -> Celery:
    """The Celery app both sides share: late acks, redelivery of jobs whose worker died, JSON only."""
    app = Celery("autocode", broker=settings.redis_url)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,  # results travel in the job's Redis list, read by serve alone
        task_serializer="json", accept_content=["json"],
        worker_prefetch_multiplier=1,  # a worker takes a job only when it has a free slot
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        broker_transport_options={
            # A job taken by a worker that died before claiming it goes back to the queue after this long.
            # Copies of claimed jobs restored this way are dropped by the claim, so a short timeout is safe.
            "visibility_timeout": int(settings.job_margin),
            "unacked_restore_interval": 2, "unacked_restore_throttle": 1,
        },
    )
    return app


def encode_job(job_id: str, run_id: str, iteration: int, batch: StepBatch, workdir: bytes | None,
               budget: dict[str, Any], inputs: bytes | None = None, model: str | None = None) -> dict[str, Any]:
    """`budget` is the run's `RunBudget.snapshot()`; `inputs` the tar of its input files (agent_core.inputs);
    `model` the run's (its channel's setting), which its `llm()` calls are sent to."""
    return {
        "job_id": job_id, "run_id": run_id, "iteration": iteration,
        "steps": [asdict(step) for step in batch.steps], "outputs": batch.outputs,
        "limits": asdict(batch.limits), "tool_names": batch.tool_names,
        "workdir": base64.b64encode(workdir).decode() if workdir else None,
        "budget": budget,
        "inputs": base64.b64encode(inputs).decode() if inputs else None,
        "model": model,
    }


async def place_inputs(sandbox: Any, data: bytes) -> None:
    """Put a job's input files into the worker's sandbox as serve's own pool does (`put_inputs`: root-owned, 0444,
    in a read-only inputs/): unpacked first into a private temporary directory (tarfile's `data` filter; the tar
    comes from serve), then handed over by path."""
    from agent_core.inputs import InputFile

    with tempfile.TemporaryDirectory(prefix="autocode-job-inputs-") as directory:
        def unpack() -> list[InputFile]:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
                members = [m for m in tar.getmembers() if m.isfile()]
                tar.extractall(directory, members=members, filter="data")
            return [InputFile(m.name, Path(directory, m.name), m.size) for m in members]

        await sandbox.put_inputs(await asyncio.to_thread(unpack))


def without_inputs(workdir: bytes) -> bytes:
    """The working files a job brings back, less inputs/ (the next job gets them read-only from `inputs` again)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(workdir), mode="r:") as source, tarfile.open(fileobj=out, mode="w") as tar:
        for member in source:
            if member.name == "inputs" or member.name.startswith(("inputs/", "./inputs")):
                continue
            tar.addfile(member, source.extractfile(member) if member.isfile() else None)
    return out.getvalue()


def job_budget(job: dict[str, Any], settings: Settings) -> RunBudget:
    """The run's budget a job carries; a job from an older `serve` without one gets this worker's caps."""
    if job.get("budget"):
        return RunBudget.from_snapshot(job["budget"], job["run_id"])
    return RunBudget(BudgetLimits.from_settings(settings), CountedUsage(), job["run_id"])


def result_to_json(result: StepResult) -> dict[str, Any]:
    return asdict(result)


class JobRunner:
    """The worker side: an asyncio loop in its own thread with the sandbox pool, running jobs handed over by
    Celery's threads. Sandboxes are started from this one long-lived thread, so their die-with-parent
    protection follows the worker process, not a pool thread."""

    def __init__(self, settings: Settings, name: str):
        self.settings = settings
        self.name = name
        self.toolset = build_toolset(settings.tools_file, settings.mcp_result_kb)
        self.executor = SandboxExecutor.from_settings(settings)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="autocode-jobs", daemon=True)
        self._thread.start()
        self._call(self._start())

    def _call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    async def _start(self) -> None:
        import redis.asyncio as aioredis

        self.redis = aioredis.from_url(self.settings.redis_url)
        self.llm = LLMClient(self.settings) if self.settings.llm_configured else None
        self.slots = asyncio.Semaphore(self.settings.sandbox_slots)
        await self.executor.start()

    def run(self, job: dict[str, Any]) -> None:
        """Called in a Celery thread; returns when the job's report is complete."""
        self._call(self._run(job))

    def close(self) -> None:
        self._call(self._close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)

    async def _close(self) -> None:
        await self.executor.stop()
        if self.toolset.mcp_host is not None:
            await self.toolset.mcp_host.close()  # the MCP servers stop with the worker
        if self.llm is not None:
            await self.llm.close()
        await self.redis.aclose()

    async def _run(self, job: dict[str, Any]) -> None:
        job_id = job["job_id"]
        redis = Outage(self.settings.redis_grace, f"job {job_id} of run {job['run_id']}")
        try:
            # The claim decides, atomically, between this worker, another (a redelivered copy) and serve (which
            # takes the claim itself when it stops waiting for a worker): only one of them gets it.
            if not await redis(lambda: self.redis.set(job_key(job_id, "claim"), self.name, nx=True, ex=KEY_TTL_S)):
                holder = await redis(lambda: self.redis.get(job_key(job_id, "claim")))
                holder = holder.decode() if isinstance(holder, bytes) else holder
                log.info("job %s: %s; dropping this copy", job_id,
                         "serve gave up waiting for it" if holder == GAVE_UP else f"already taken by {holder}")
                return
            await redis(lambda: self.redis.zrem(QUEUE_KEY, job_id))
        except RedisUnreachable:
            log.error("job %s: Redis stayed unreachable; not started", job_id)
            return
        work = asyncio.current_task()
        assert work is not None
        watchers = [asyncio.create_task(self._beat(job_id)), asyncio.create_task(self._watch_cancel(job_id, work))]
        try:
            await _Publisher(self.redis, job_id, redis)({"type": "claimed", "worker": self.name})
            await self._execute(job, redis)
        except asyncio.CancelledError:
            log.info("job %s of run %s cancelled by serve", job_id, job["run_id"])
        except RedisUnreachable:
            log.error("job %s of run %s: Redis stayed unreachable past AUTOCODE_REDIS_GRACE; its reports are lost",
                      job_id, job["run_id"])
        finally:
            for watcher in watchers:
                watcher.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)
            try:
                await self.redis.delete(job_key(job_id, "beat"))
            except UNREACHABLE:
                pass  # it expires

    async def _execute(self, job: dict[str, Any], redis: Outage) -> None:
        job_id, run_id = job["job_id"], job["run_id"]
        publish = _Publisher(self.redis, job_id, redis)
        batch = StepBatch([PlannedStep(**step) for step in job["steps"]], job["outputs"],
                          Limits(**job["limits"]), job["tool_names"], job.get("iteration", 0))
        try:
            sandbox = await self.executor.open(run_id)
        except SandboxUnavailable as exc:
            log.error("job %s: no sandbox: %s", job_id, exc)
            await publish({"type": "failed", "worker": self.name,
                           "error": "The sandbox could not start on a worker; the operator can run `autocode "
                                    "doctor` there."})
            return
        try:
            if job.get("workdir"):
                await sandbox.restore(base64.b64decode(job["workdir"]))
            if job.get("inputs"):
                await place_inputs(sandbox, base64.b64decode(job["inputs"]))
            budget = job_budget(job, self.settings)
            helper = _BudgetedHelper(self.llm, publish, CallContext(run_id, job["iteration"], model=job.get("model")),
                                     budget)
            context = {"run_id": run_id, "iteration": job["iteration"]}

            async def record_mcp(record: dict[str, Any]) -> None:
                await publish({"type": "mcp_call", "record": {**record, **context, "started_at": now()}})

            host = ToolHost(self.toolset, helper, self.settings.tool_timeout, budget,
                            approve=_RemoteApprover(self.redis, publish, job_id, redis),
                            journal=_RemoteJournal(self.redis, publish, job_id, run_id, redis), record_mcp=record_mcp)
            await sandbox.run_batch(batch, host.call, _PublishedProgress(publish, self.name, budget), gate=self.slots)
            data, skipped = await sandbox.archive(self.settings.job_transfer_mb * 1024 * 1024)
            if job.get("inputs"):
                data = without_inputs(data)
            await publish({"type": "done", "worker": self.name, "workdir": base64.b64encode(data).decode(),
                           "skipped": skipped})
        except RedisUnreachable:
            raise  # its reports cannot reach serve: run() logs it
        except Exception as exc:  # the worker's sandbox broke (an OSError of its own too: not an outage): serve turns this into the step's failure
            log.exception("job %s of run %s failed", job_id, run_id)
            await publish({"type": "failed", "worker": self.name,
                           "error": f"SandboxError: the worker {self.name} could not finish the job ({type(exc).__name__})"})
        finally:
            await asyncio.shield(sandbox.close())

    async def _beat(self, job_id: str) -> None:
        """Every second: the job's heartbeat, and its claim again (a Redis that restarted without its data forgot
        both; serve waits for them after an outage before taking the worker as lost)."""
        while True:
            try:
                await self.redis.set(job_key(job_id, "beat"), self.name, ex=BEAT_TTL_S)
                await self.redis.set(job_key(job_id, "claim"), self.name, nx=True, ex=KEY_TTL_S)
            except UNREACHABLE:
                pass  # the publishes and the claim wait for Redis; the beat is simply sent again
            await asyncio.sleep(BEAT_EVERY_S)

    async def _watch_cancel(self, job_id: str, work: asyncio.Task) -> None:
        while True:
            try:
                if await self.redis.exists(job_key(job_id, "cancel")):
                    break
            except UNREACHABLE:
                pass
            await asyncio.sleep(CANCEL_POLL_S)
        work.cancel()  # the sandbox kills the running step's whole process tree


class _Publisher:
    def __init__(self, redis: Any, job_id: str, outage: Outage):
        self.redis = redis
        self.key = job_key(job_id, "events")
        self.outage = outage

    async def __call__(self, message: dict[str, Any]) -> None:
        data = json.dumps(message, default=str)

        async def push() -> None:
            async with self.redis.pipeline(transaction=True) as pipe:
                await pipe.rpush(self.key, data).expire(self.key, KEY_TTL_S).execute()

        await self.outage(push)


async def _wait_reply(redis: Any, outage: Outage, key: str) -> Any:
    """The one reply serve pushes on `key` (an approval's decision, a journal answer)."""
    while (popped := await outage(lambda: redis.blpop([key], timeout=1))) is None:
        pass
    return json.loads(popped[1])


class _PublishedProgress:
    def __init__(self, publish: _Publisher, worker: str, budget: RunBudget):
        self.publish = publish
        self.worker = worker
        self.budget = budget

    async def started(self, step: PlannedStep) -> None:
        self.budget.new_step()  # llm() calls are capped per step
        await self.publish({"type": "started", "step": step.name})

    async def finished(self, step: PlannedStep, result: StepResult) -> None:
        result.worker = self.worker
        await self.publish({"type": "finished", "step": step.name, "result": result_to_json(result)})

    async def restarted(self) -> None:  # only serve restarts batches
        pass


class _RemoteApprover:
    """Approvals for a worker's tool host: a `confirm` tool call is reported to serve (which asks the requester,
    agent_core/approvals.py) and waits for the decision on the job's approval list. The step's timeout and its
    slot are paused meanwhile (sandbox/clock.py), as on serve; a cancelled job ends the wait with the step."""

    def __init__(self, redis: Any, publish: _Publisher, job_id: str, outage: Outage):
        self.redis, self.publish, self.job_id, self.outage = redis, publish, job_id, outage
        self.numbers = itertools.count(1)

    async def __call__(self, tool: str, args: list[Any], kwargs: dict[str, Any]) -> None:
        number = next(self.numbers)
        async with paused():
            await self.publish({"type": "approval", "number": number, "tool": tool, "args": args, "kwargs": kwargs})
            # serve answers within its approval timeout; a cancel of the job cancels this task
            reply = await _wait_reply(self.redis, self.outage, job_key(self.job_id, f"approval:{number}"))
        if reply.get("approved"):
            return
        if reply.get("denied"):
            raise ToolDenied(reply.get("error") or f"{tool} was not approved")
        raise PermissionError(reply.get("error") or f"{tool} was not approved")


class _RemoteJournal:
    """The journal of a worker's tool calls (tools/journal.py): kept by serve, in its database. `begin` asks serve
    (a `tool_begin` report, answered on the job's `tool:{n}` list) and waits for the answer before the tool may
    run; `finish` reports the result. The attempt is the job's id: serve sends a lost job again under a new one."""

    def __init__(self, redis: Any, publish: _Publisher, job_id: str, run_id: str, outage: Outage):
        self.redis, self.publish, self.job_id, self.run_id, self.outage = redis, publish, job_id, run_id, outage
        self.numbers = itertools.count(1)

    async def begin(self, key: CallKey, tool: str, digest: str, mode: str = "take") -> Recorded:
        number = next(self.numbers)
        await self.publish({"type": "tool_begin", "number": number, "key": key.as_dict(), "tool": tool,
                            "digest": digest, "mode": mode})
        return recorded(await _wait_reply(self.redis, self.outage, job_key(self.job_id, f"tool:{number}")))

    async def finish(self, key: CallKey, ok: bool, value: Any, error: str) -> None:
        await self.publish({"type": "tool_finish", "key": key.as_dict(), "ok": ok, "value": value, "error": error})


class _BudgetedHelper:
    """The `llm()` helper on a worker, for calls the tool host's `budget` admitted (per-step cap, prompt size,
    tokens): each call's record, with its clipped prompt and reply, is reported to serve (which stores it), and its
    tokens are added to the budget's usage so the job's later calls see them."""

    def __init__(self, llm: LLMClient | None, publish: _Publisher, context: CallContext, budget: RunBudget):
        self.llm = llm
        self.publish = publish
        self.context = context
        self.budget = budget

    async def __call__(self, prompt: str, system: str) -> str:
        if self.llm is None:
            raise RuntimeError("llm() is not available: this worker has no LLM configured")
        return await ask_helper(self.llm, prompt, system, self.context, self._report)

    async def _report(self, record: dict[str, Any]) -> None:
        prompt, completion = record.get("prompt_tokens") or 0, record.get("completion_tokens") or 0
        self.budget.spent(prompt + completion, self.budget.call_cost(prompt, completion))
        await self.publish({"type": "llm_call", "record": record})


def run_worker(settings: Settings, concurrency: int | None = None, hostname: str | None = None) -> None:
    """`autocode worker`: consume jobs until stopped (SIGTERM: finish the running jobs, then exit)."""
    name = hostname or f"autocode{os.getpid()}@{socket.gethostname()}"
    runner = JobRunner(settings, name)
    app = celery_app(settings)

    @app.task(name=TASK_NAME, acks_late=True, reject_on_worker_lost=True)
    def run_batch(job: dict[str, Any]) -> None:
        runner.run(job)

    try:
        app.worker_main([
            "worker", "--pool=threads", f"--concurrency={concurrency or settings.sandbox_slots}",
            f"--hostname={name}", "--loglevel=INFO", "--without-gossip", "--without-mingle",
        ])
    finally:
        runner.close()
