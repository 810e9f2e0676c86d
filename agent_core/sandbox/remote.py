"""The serve side of scale-out: an `Executor` whose sandboxes send each batch of steps to `autocode worker`s.

A run's working files live in `serve` between iterations (a capped tar) and travel with every job, so any worker
can take the next one. Nothing waits forever: a job has `steps × step timeout + AUTOCODE_JOB_MARGIN` seconds; a
worker that stops beating mid-job is taken as lost and the job is sent again once (from the same files), then the
step fails with a clear message.
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

from kombu.exceptions import OperationalError
from redis.exceptions import RedisError

from agent_core.budget import RunBudget
from agent_core.channel_settings import run_settings
from agent_core.config import Settings
from agent_core.jobs import KEY_TTL_S, TASK_NAME, celery_app, encode_job, job_key
from agent_core.sandbox import (
    BatchProgress, CollectedOutputs, PlannedStep, SandboxUnavailable, StepBatch, StepRequest, StepResult,
    ToolCallHandler,
)
from agent_core.sandbox.pool import _read_archive
from storage.db import Storage

if TYPE_CHECKING:
    from agent_core.inputs import InputFile

log = logging.getLogger(__name__)

ATTEMPTS = 2  # a job whose worker is lost mid-way is sent once more


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
            except (RedisError, OperationalError) as exc:
                log.error("run %s: Redis failed while its steps ran: %s", self.run_id, type(exc).__name__)
                result = StepResult(ok=False, error=(
                    f"SandboxError: lost the connection to the job queue (Redis at "
                    f"{redis_location(self.settings.redis_url)}); please try again"))
                await progress.restarted()  # what this attempt reported is void: the batch failed as a whole
                await progress.finished(batch.steps[0], result)
                return [result]
            if outcome == "lost" and attempt < ATTEMPTS:
                log.warning("run %s: the worker running its steps was lost; sending the job again", self.run_id)
                await progress.restarted()
                continue
            if stuck is not None:
                error = ("SandboxError: the worker running this step was lost (killed or crashed) twice; please "
                         "try again") if outcome == "lost" else (
                    f"TimeoutError: no worker finished this step in time; are `autocode worker` processes running "
                    f"and reaching Redis at {redis_location(self.settings.redis_url)}?")
                result = StepResult(ok=False, error=error)
                results.append(result)
                await progress.finished(stuck, result)
            return results
        raise AssertionError("unreachable")

    async def _attempt(self, batch: StepBatch, progress: BatchProgress
                       ) -> tuple[str, list[StepResult], PlannedStep | None]:
        """Send the batch as a job and follow its reports: (outcome, results, the step left without a result)."""
        job_id = uuid.uuid4().hex
        budget = RunBudget.for_run(self.settings, self.executor.storage, self.run_id).snapshot()
        ran_with = run_settings(self.executor.storage.get_run(self.run_id))  # the channel's model, for llm()
        job = encode_job(job_id, self.run_id, batch.iteration, batch, self.workdir, budget, self.inputs,
                         model=ran_with.model if ran_with else None)
        deadline = time.monotonic() + len(batch.steps) * batch.limits.timeout_s + self.settings.job_margin
        steps = {step.name: step for step in batch.steps}
        results: list[StepResult] = []
        beat_seen = False
        deciding: set[asyncio.Task] = set()  # approvals the worker's steps wait for (answered on serve)
        await self.executor.send(job)
        try:
            while True:
                if deciding:  # a person's time is not the job's: the deadline waits too
                    deadline = max(deadline, time.monotonic() + batch.limits.timeout_s + self.settings.job_margin)
                message = await self._next_message(job_id)
                if message is None:  # nothing for a second: is anyone still working on it?
                    alive = bool(await self.redis.exists(job_key(job_id, "beat")))
                    beat_seen = beat_seen or alive
                    lost = beat_seen and not alive
                    if lost or time.monotonic() > deadline:
                        await self._abandon(job_id)
                        return "lost" if lost else "timeout", results, batch.steps[len(results)]
                    continue
                kind = message.get("type")
                if kind == "started":
                    beat_seen = True
                    await progress.started(steps[message["step"]])
                elif kind == "finished":
                    result = StepResult(**message["result"])
                    results.append(result)
                    await progress.finished(steps[message["step"]], result)
                elif kind == "llm_call":
                    self.executor.storage.add_llm_call(message["record"])
                elif kind == "mcp_call":  # an MCP tool call of a step on the worker (tools/mcp_host.py)
                    self.executor.storage.add_mcp_call(message["record"])
                elif kind == "approval":
                    task = asyncio.create_task(self._decide(job_id, batch, message))
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
            await asyncio.shield(self._abandon(job_id))  # the worker kills the step at once
            raise
        finally:
            for task in deciding:
                task.cancel()  # ends the wait (ApprovalDecided "cancelled") if the job ended without its step

    async def _decide(self, job_id: str, batch: StepBatch, message: dict[str, Any]) -> None:
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
        await self.redis.rpush(key, json.dumps(reply))
        await self.redis.expire(key, KEY_TTL_S)

    async def _next_message(self, job_id: str) -> dict[str, Any] | None:
        popped = await self.redis.blpop([job_key(job_id, "events")], timeout=1)
        if popped is None:
            return None
        try:
            return json.loads(popped[1])
        except ValueError:
            log.warning("run %s: unreadable report from a worker", self.run_id)
            return {}

    async def _abandon(self, job_id: str) -> None:
        await self.redis.set(job_key(job_id, "cancel"), "1", ex=KEY_TTL_S)
        await self.redis.delete(job_key(job_id, "events"))

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


class _Quiet:
    async def started(self, step: PlannedStep) -> None:
        pass

    async def finished(self, step: PlannedStep, result: StepResult) -> None:
        pass

    async def restarted(self) -> None:
        pass


__all__ = ["RemoteExecutor", "RemoteSandbox", "redis_location"]
