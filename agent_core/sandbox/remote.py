"""The serve side of scale-out: an `Executor` whose sandboxes send each batch of steps to `autocode worker`s.

A run's working files live in `serve` between iterations (a capped tar) and travel with every job, so any worker
can take the next one. Nothing waits forever: a job may wait AUTOCODE_JOB_QUEUE_TIMEOUT seconds for a worker (the
user is told how many jobs are ahead), after which serve takes its claim itself, so it never starts; once a worker
has claimed it, it has `steps × step timeout + AUTOCODE_JOB_MARGIN` seconds; a worker that stops beating mid-job is
taken as lost and the job is sent again once (from the same files), then the step fails with a clear message.
Serve answers the workers' tool-call journal questions from its database (tools/journal.py), and rides out Redis
outages of up to AUTOCODE_REDIS_GRACE seconds (agent_core/redis_outage.py).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import time
import uuid
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit


from agent_core.budget import RunBudget
from agent_core.channel_settings import run_settings
from agent_core.config import Settings
from agent_core.jobs import (
    BEAT_TTL_S, GAVE_UP, KEY_TTL_S, QUEUE_KEY, TASK_NAME, celery_app, encode_job, job_key,
)
from agent_core.redis_outage import UNREACHABLE, Outage, RedisUnreachable
from agent_core.sandbox import (
    BatchProgress, CollectedOutputs, PlannedStep, SandboxUnavailable, StepBatch, StepRequest, StepResult,
    ToolCallHandler,
)
from agent_core.sandbox.pool import _read_archive
from storage.db import Storage
from tools.journal import answer_begin, answer_finish

if TYPE_CHECKING:
    from agent_core.inputs import InputFile

log = logging.getLogger(__name__)

ATTEMPTS = 2  # a job whose worker is lost mid-way is sent once more
WAITING_NOTICE_AFTER_S = 2.0  # a job not taken by then: "waiting for a worker: N jobs ahead", then every …
WAITING_NOTICE_EVERY_S = 5.0


def redis_location(url: str | None) -> str:
    """host:port/db of a Redis URL, without credentials (for logs and health checks)."""
    parts = urlsplit(url or "")
    return f"{parts.hostname or '?'}:{parts.port or 6379}{parts.path or ''}"


class RemoteExecutor:
    """Sandboxes on `autocode worker` processes, reached through Celery on Redis."""

    name = "celery"

    def __init__(self, settings: Settings, storage: Storage):
        self.settings = settings
        self.storage = storage  # the LLM calls workers make for `llm()` are stored with their runs
        self.app = celery_app(settings)
        self.redis: Any = None

    async def start(self) -> None:
        import redis.asyncio as aioredis

        self.redis = aioredis.from_url(self.settings.redis_url)
        try:
            await self.redis.ping()
        except Exception as exc:
            raise SandboxUnavailable(
                f"cannot reach Redis at {redis_location(self.settings.redis_url)} ({type(exc).__name__}); "
                "check AUTOCODE_REDIS_URL") from None

    async def open(self, run_id: str) -> "RemoteSandbox":
        if self.redis is None:
            await self.start()
        return RemoteSandbox(self, run_id)

    async def stop(self) -> None:
        if self.redis is not None:
            await self.redis.aclose()
            self.redis = None

    async def health(self) -> str:
        try:
            await self.redis.ping()
            return "ok"
        except Exception as exc:
            return f"error: {type(exc).__name__}"

    def describe(self) -> dict[str, Any]:
        return {
            "backend": "celery", "fallback_reason": None, "uid_drop": None,
            "network": "on" if self.settings.sandbox_network else "off",
            "redis": redis_location(self.settings.redis_url),
            "protections": ["steps run in the sandbox of `autocode worker` processes (see `autocode doctor` there)"],
            "probe": {},
        }

    async def send(self, job: dict[str, Any]) -> None:
        """Queue the job (and note it in `autocode:queue`, which counts the jobs ahead of a waiting one)."""
        now = time.time()
        async with self.redis.pipeline(transaction=True) as pipe:
            await (pipe.zremrangebyscore(QUEUE_KEY, 0, now - KEY_TTL_S)  # left by a serve that stopped
                   .zadd(QUEUE_KEY, {job["job_id"]: now}).execute())
        await asyncio.to_thread(self.app.send_task, TASK_NAME, args=[job], task_id=job["job_id"])


class RemoteSandbox:
    """One run's sandbox, spread over jobs: its working files are kept here between them."""

    def __init__(self, executor: RemoteExecutor, run_id: str):
        self.executor = executor
        self.settings = executor.settings
        self.redis = executor.redis
        self.run_id = run_id
        self.workdir: bytes | None = None
        self.inputs: bytes | None = None  # the run's input files as a tar, placed read-only by every job's worker

    async def run_step(self, request: StepRequest) -> StepResult:
        """A single step as a batch of one (its input travels as an output named `__input__`)."""
        step = PlannedStep(request.function, request.code, None if request.input is None else "__input__",
                           request.libraries)
        outputs = {} if request.input is None else {"__input__": request.input}
        results = await self.run_batch(StepBatch([step], outputs, request.limits, request.tool_names),
                                       request.on_call, _Quiet())
        return results[0] if results else StepResult(ok=False, error="SandboxError: the step did not run")

    async def run_batch(self, batch: StepBatch, on_call: ToolCallHandler | None, progress: BatchProgress,
                        gate: Any = None) -> list[StepResult]:
        """Tool calls are answered by the worker's own tool host, so `on_call` and `gate` are not used here."""
        for attempt in range(1, ATTEMPTS + 1):
            try:
                outcome, results, stuck = await self._attempt(batch, progress)
            except (RedisUnreachable, *UNREACHABLE) as exc:
                log.error("run %s: Redis failed while its steps ran: %s", self.run_id, type(exc).__name__)
                result = StepResult(ok=False, error=(
                    f"SandboxError: lost the connection to the job queue (Redis at "
                    f"{redis_location(self.settings.redis_url)}) for over {self.settings.redis_grace:g} s "
                    f"(AUTOCODE_REDIS_GRACE); please try again"))
                await progress.restarted()  # what this attempt reported is void: the batch failed as a whole
                await progress.finished(batch.steps[0], result)
                return [result]
            if outcome == "lost" and attempt < ATTEMPTS:
                log.warning("run %s: the worker running its steps was lost; sending the job again", self.run_id)
                await progress.restarted()
                continue
            if stuck is not None:
                if outcome == "lost":
                    error = ("SandboxError: the worker running this step was lost (killed or crashed) twice; please "
                             "try again")
                elif outcome == "queued":
                    error = (f"TimeoutError: no worker took this step within {self.settings.job_queue_timeout:g} s "
                             f"(AUTOCODE_JOB_QUEUE_TIMEOUT); are `autocode worker` processes running and reaching "
                             f"Redis at {redis_location(self.settings.redis_url)}? It was not run.")
                else:
                    error = (f"TimeoutError: the worker running this step did not finish it in time (its steps' "
                             f"timeouts plus AUTOCODE_JOB_MARGIN={self.settings.job_margin:g} s)")
                result = StepResult(ok=False, error=error)
                results.append(result)
                await progress.finished(stuck, result)
            return results
        raise AssertionError("unreachable")

    async def _attempt(self, batch: StepBatch, progress: BatchProgress
                       ) -> tuple[str, list[StepResult], PlannedStep | None]:
        """Send the batch as a job and follow its reports: (outcome, results, the step left without a result).

        Outcomes: done, failed (the worker said so), queued (no worker took it within AUTOCODE_JOB_QUEUE_TIMEOUT:
        serve took its claim, so none ever will), lost (its worker stopped beating), timeout (taken, not finished
        within its steps' timeouts plus AUTOCODE_JOB_MARGIN, counted from when a worker took it)."""
        job_id = uuid.uuid4().hex
        redis = Outage(self.settings.redis_grace, f"run {self.run_id}")
        budget = RunBudget.for_run(self.settings, self.executor.storage, self.run_id).snapshot()
        ran_with = run_settings(self.executor.storage.get_run(self.run_id))  # the channel's model, for llm()
        job = encode_job(job_id, self.run_id, batch.iteration, batch, self.workdir, budget, self.inputs,
                         model=ran_with.model if ran_with else None)
        bound = len(batch.steps) * batch.limits.timeout_s + self.settings.job_margin
        sent_at = time.monotonic()
        queue_deadline = sent_at + self.settings.job_queue_timeout
        deadline: float | None = None  # set when a worker claims the job: queue time is not the steps' time
        next_notice = sent_at + WAITING_NOTICE_AFTER_S
        steps = {step.name: step for step in batch.steps}
        results: list[StepResult] = []
        beat_seen = False
        checked_recovery = float("-inf")  # the last outage after which the queued job was looked for
        deciding: set[asyncio.Task] = set()  # approvals the worker's steps wait for (answered on serve)
        await redis(lambda: self.executor.send(job))
        try:
            while True:
                lost_before = redis.lost_s
                if deciding and deadline is not None:  # a person's time is not the job's: the deadline waits too
                    deadline = max(deadline, time.monotonic() + batch.limits.timeout_s + self.settings.job_margin)
                message = await self._next_message(job_id, redis)
                if redis.lost_s > lost_before:  # Redis was down: the outage is nobody's time
                    queue_deadline += redis.lost_s - lost_before
                    if deadline is not None:
                        deadline += redis.lost_s - lost_before
                now = time.monotonic()
                if message is None and deadline is None:  # not claimed yet, as far as we know
                    holder = await redis(lambda: self.redis.get(job_key(job_id, "claim")))
                    if holder is not None:
                        deadline = now + bound
                        continue
                    if now > queue_deadline:
                        # Taking the claim ourselves decides atomically against a worker taking it now.
                        if await redis(lambda: self.redis.set(job_key(job_id, "claim"), GAVE_UP, nx=True,
                                                              ex=KEY_TTL_S)):
                            await redis(lambda: self.redis.zrem(QUEUE_KEY, job_id))
                            log.warning("run %s: no worker took its job within %g s; given up", self.run_id,
                                        self.settings.job_queue_timeout)
                            return "queued", results, batch.steps[0]
                        continue  # a worker took it just now
                    if (redis.recovered_at > checked_recovery and redis.since_recovery() > BEAT_TTL_S
                            and await redis(lambda: self.redis.zscore(QUEUE_KEY, job_id)) is None):
                        # Redis restarted without its data: the queued job is gone. Send it again (same id: the
                        # claim still lets only one worker run it).
                        log.warning("run %s: its queued job was lost with Redis's data; sending it again", self.run_id)
                        await redis(lambda: self.executor.send(job))
                    if redis.recovered_at > checked_recovery and redis.since_recovery() > BEAT_TTL_S:
                        checked_recovery = redis.recovered_at  # once per outage
                    if now >= next_notice:
                        next_notice = now + WAITING_NOTICE_EVERY_S
                        ahead = await redis(lambda: self.redis.zrank(QUEUE_KEY, job_id))
                        await _tell_waiting(progress, ahead, now - sent_at)
                    continue
                if message is None:  # nothing for a second: is anyone still working on it?
                    alive = bool(await redis(lambda: self.redis.exists(job_key(job_id, "beat"))))
                    beat_seen = beat_seen or alive
                    # After an outage the worker needs a moment to beat again (a restarted Redis may have lost it).
                    lost = beat_seen and not alive and redis.since_recovery() > BEAT_TTL_S + 1
                    if lost or (deadline is not None and now > deadline):
                        await self._abandon(job_id, redis)
                        return "lost" if lost else "timeout", results, batch.steps[len(results)]
                    continue
                kind = message.get("type")
                if kind == "claimed":
                    beat_seen = True
                    if deadline is None:
                        deadline = now + bound
                elif kind == "started":
                    beat_seen = True
                    if deadline is None:
                        deadline = now + bound
                    await progress.started(steps[message["step"]])
                elif kind == "finished":
                    result = StepResult(**message["result"])
                    results.append(result)
                    await progress.finished(steps[message["step"]], result)
                elif kind == "tool_begin":
                    await self._answer_tool_begin(job_id, message, redis)
                elif kind == "tool_finish":
                    key = {**message["key"], "run_id": self.run_id}
                    answer_finish(self.executor.storage, key, bool(message.get("ok")), message.get("value"),
                                  str(message.get("error") or ""))
                elif kind == "llm_call":
                    self.executor.storage.add_llm_call(message["record"])
                elif kind == "mcp_call":  # an MCP tool call of a step on the worker (tools/mcp_host.py)
                    self.executor.storage.add_mcp_call(message["record"])
                elif kind == "approval":
                    task = asyncio.create_task(self._decide(job_id, batch, message, redis))
                    deciding.add(task)
                    task.add_done_callback(deciding.discard)
                elif kind == "done":
                    self._keep_workdir(message)
                    return "done", results, None
                elif kind == "failed":
                    if len(results) < len(batch.steps):
                        result = StepResult(ok=False, error=message.get("error") or "SandboxError",
                                            worker=message.get("worker"))
                        results.append(result)
                        await progress.finished(batch.steps[len(results) - 1], result)
                    return "failed", results, None
        except asyncio.CancelledError:
            await asyncio.shield(self._abandon(job_id, redis))  # the worker kills the step at once
            raise
        finally:
            for task in deciding:
                task.cancel()  # ends the wait (ApprovalDecided "cancelled") if the job ended without its step

    async def _answer_tool_begin(self, job_id: str, message: dict[str, Any], redis: Outage) -> None:
        """A worker's step is about to call a trusted tool: record it (tools/journal.py), or answer from the record."""
        key = {**message["key"], "run_id": self.run_id}
        answer = answer_begin(self.executor.storage, key, str(message.get("tool")), str(message.get("digest")),
                              job_id, str(message.get("mode") or "take"))
        reply = job_key(job_id, f"tool:{message.get('number')}")

        async def push() -> None:
            async with self.redis.pipeline(transaction=True) as pipe:
                await pipe.rpush(reply, json.dumps(answer)).expire(reply, KEY_TTL_S).execute()

        await redis(push)

    async def _decide(self, job_id: str, batch: StepBatch, message: dict[str, Any], redis: Outage) -> None:
        """A step on the worker called a `confirm` tool: ask here (where the adapters and Approvals live) and
        send the decision back on the job's approval list, which the worker's tool host waits on."""
        reply: dict[str, Any] = {"approved": True}
        try:
            if batch.approve is None:
                raise PermissionError(f"{message.get('tool')} needs a person's approval, and nobody can be asked")
            await batch.approve(str(message.get("tool")), list(message.get("args") or []),
                                dict(message.get("kwargs") or {}))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # ToolDenied, or the refusal above: the step gets it
            reply = {"approved": False, "error": str(exc), "denied": type(exc).__name__ == "ToolDenied"}
        key = job_key(job_id, f"approval:{message.get('number')}")

        async def push() -> None:
            async with self.redis.pipeline(transaction=True) as pipe:
                await pipe.rpush(key, json.dumps(reply)).expire(key, KEY_TTL_S).execute()

        await redis(push)

    async def _next_message(self, job_id: str, redis: Outage) -> dict[str, Any] | None:
        popped = await redis(lambda: self.redis.blpop([job_key(job_id, "events")], timeout=1))
        if popped is None:
            return None
        try:
            return json.loads(popped[1])
        except ValueError:
            log.warning("run %s: unreadable report from a worker", self.run_id)
            return {}

    async def _abandon(self, job_id: str, redis: Outage) -> None:
        """Stop the job: a worker running it kills its step, and none may start it any more."""
        async def stop() -> None:
            async with self.redis.pipeline(transaction=True) as pipe:
                await (pipe.set(job_key(job_id, "claim"), GAVE_UP, nx=True, ex=KEY_TTL_S)
                       .set(job_key(job_id, "cancel"), "1", ex=KEY_TTL_S)
                       .zrem(QUEUE_KEY, job_id).delete(job_key(job_id, "events")).execute())

        try:
            await redis(stop)
        except (RedisUnreachable, *UNREACHABLE):
            log.error("run %s: could not tell the workers to stop job %s (Redis unreachable)", self.run_id, job_id)

    def _keep_workdir(self, message: dict[str, Any]) -> None:
        data = base64.b64decode(message.get("workdir") or "")
        self.workdir = data or None
        for note in message.get("skipped") or []:
            log.warning("run %s: working file left behind on the worker: %s", self.run_id, note)

    async def collect_outputs(self, max_file_bytes: int, max_total_bytes: int,
                              max_files: int = 1000) -> CollectedOutputs:
        """The files under outputs/ of the working directory the last job brought back (see `Sandbox`)."""
        if self.workdir is None:
            return CollectedOutputs([], [])
        artifacts, skipped, total = [], [], 0
        for artifact in _read_archive(io.BytesIO(self.workdir), None, 1 << 62):
            if not artifact.name.startswith("outputs/"):
                continue
            name = artifact.name.removeprefix("outputs/")
            if len(artifacts) >= max_files:
                skipped.append(f"{name} (over the cap of {max_files} files)")
            elif len(artifact.data) > max_file_bytes or total + len(artifact.data) > max_total_bytes:
                skipped.append(f"{name} ({len(artifact.data)} bytes: over the size cap)")
            else:
                total += len(artifact.data)
                artifacts.append(type(artifact)(name, artifact.data, artifact.mime))
        return CollectedOutputs(artifacts, skipped[:20], len(skipped))

    async def put_inputs(self, files: "list[InputFile]") -> None:
        """The input files travel with every job apart from the working files, and the worker places them with its
        sandbox's `put_inputs` (root-owned, 0444, as on serve's own pool) before any step; the working files a job
        brings back leave inputs/ out (agent_core/jobs.py), so a step can never change them for a later job either.

        Why they travel with the job rather than being fetched by the worker: the working files already make this
        trip (base64 in the job, within AUTOCODE_JOB_TRANSFER_MB), any worker can take any job with nothing shared,
        and for a 50 MB file it is one Redis write and read per iteration (well under a second on a LAN), against a
        fetch path back to `serve` (a new authenticated endpoint, its own timeouts and retries) that would be needed
        for every job anyway. Inputs over the transfer cap are refused here with a clear message."""
        from agent_core.inputs import write_inputs_tar

        cap = self.settings.job_transfer_mb * 1024 * 1024
        total = sum(f.size for f in files)
        if total > cap:
            raise SandboxUnavailable(f"the input files ({total / 1048576:.1f} MB) are over what a job carries to a worker "
                               f"(AUTOCODE_JOB_TRANSFER_MB={self.settings.job_transfer_mb})")
        buffer = io.BytesIO()  # the job holds it in memory anyway (it is sent base64 in the job)
        await asyncio.to_thread(write_inputs_tar, files, buffer)
        self.inputs = buffer.getvalue()

    async def close(self) -> None:
        self.workdir = self.inputs = None


async def _tell_waiting(progress: BatchProgress, ahead: int | None, waited_s: float) -> None:
    """"waiting for a worker: N jobs ahead" for the run's user (progress.waiting, when the progress has one)."""
    waiting = getattr(progress, "waiting", None)
    if waiting is not None:
        await waiting(ahead or 0, waited_s)


class _Quiet:
    async def started(self, step: PlannedStep) -> None:
        pass

    async def finished(self, step: PlannedStep, result: StepResult) -> None:
        pass

    async def restarted(self) -> None:
        pass


__all__ = ["RemoteExecutor", "RemoteSandbox", "redis_location"]
