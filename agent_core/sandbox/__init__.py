"""Where generated code runs: one small interface, the isolation behind it.

A run opens a `Sandbox` (its own worker, uid and working directory); each step is one generated function run
in a fresh, confined process forked from that worker. The step gets its input as JSON, may call trusted tools
through `on_call` (answered by the server, so secrets stay outside), and returns a JSON dict.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Protocol

from agent_core.sandbox.clock import STEP_SLOT, StepSlot
from tools.journal import CURRENT_STEP, StepCalls

if TYPE_CHECKING:
    from agent_core.inputs import InputFile

ToolCallHandler = Callable[[str, list[Any], dict[str, Any]], Awaitable[Any]]


class SandboxUnavailable(Exception):
    """No sandbox could be started (the operator must fix the host); the message says why."""


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 60.0
    memory_mb: int = 1024
    max_output_kb: int = 256
    max_log_kb: int = 64
    file_size_mb: int = 256
    max_procs: int = 64


@dataclass
class StepRequest:
    code: str
    function: str
    input: dict[str, Any] | None  # None: the first step, called without arguments
    limits: Limits = field(default_factory=Limits)
    tool_names: list[str] = field(default_factory=list)  # trusted tools exposed as stubs
    on_call: ToolCallHandler | None = None
    libraries: list[str] = field(default_factory=list)  # declared libraries it imports: loaded once per run


@dataclass
class StepResult:
    ok: bool
    output: dict[str, Any] | None = None
    error: str | None = None
    traceback: str | None = None
    stdout: str = ""
    stderr: str = ""
    duration_ms: int = 0
    worker: str | None = None  # the remote worker that ran it (None: this process)


@dataclass
class PlannedStep:
    """One checked subtask of a batch: its input is the output of `input_from` (an earlier step or `outputs`)."""

    name: str  # the subtask's tool_name, which is also its function's name
    code: str
    input_from: str | None
    libraries: list[str] = field(default_factory=list)


@dataclass
class StepBatch:
    """The steps of one iteration, run in order until one fails: the unit a remote worker executes."""

    steps: list[PlannedStep]
    outputs: dict[str, dict[str, Any]]  # outputs of earlier steps the batch's steps read
    limits: Limits = field(default_factory=Limits)
    tool_names: list[str] = field(default_factory=list)
    iteration: int = 0  # the run's iteration it belongs to (labels a worker's LLM calls)
    # Who decides calls of `confirm` tools (Approvals.ask bound to the run): a remote batch's worker asks serve
    # through it; a local batch's tool host holds the same callable.
    approve: Callable[[str, list[Any], dict[str, Any]], Awaitable[None]] | None = field(default=None, repr=False)


class BatchProgress(Protocol):
    """Told as a batch runs, so progress reaches the user step by step."""

    async def started(self, step: PlannedStep) -> None: ...

    async def finished(self, step: PlannedStep, result: StepResult) -> None: ...

    async def restarted(self) -> None:
        """The batch is starting over (its worker was lost): forget what `finished` reported for it."""


async def run_batch_locally(sandbox: "Sandbox", batch: StepBatch, on_call: ToolCallHandler | None,
                            progress: BatchProgress, gate: Any = None) -> list[StepResult]:
    """Run a batch step by step on `sandbox`; `gate` (an asyncio.Semaphore) bounds steps running at once."""
    outputs = dict(batch.outputs)
    results: list[StepResult] = []
    for step in batch.steps:
        await progress.started(step)
        request = StepRequest(
            code=step.code, function=step.name, input=None if step.input_from is None else outputs[step.input_from],
            limits=batch.limits, tool_names=batch.tool_names, on_call=on_call, libraries=step.libraries,
        )
        calls = CURRENT_STEP.set(StepCalls(batch.iteration, step.name))  # numbers its tool calls (tools/journal.py)
        try:
            if gate is None:
                result = await sandbox.run_step(request)
            else:
                slot = StepSlot(gate)  # given back while a tool call waits for a person (clock.paused)
                await slot.acquire()
                token = STEP_SLOT.set(slot)
                try:
                    result = await sandbox.run_step(request)
                finally:
                    STEP_SLOT.reset(token)
                    slot.release()
        finally:
            CURRENT_STEP.reset(calls)
        results.append(result)
        await progress.finished(step, result)
        if not result.ok:
            break
        outputs[step.name] = result.output or {}
    return results


@dataclass(frozen=True)
class Artifact:
    """A file a run's steps wrote under outputs/."""

    name: str
    data: bytes
    mime: str


@dataclass
class CollectedOutputs:
    artifacts: list[Artifact]
    skipped: list[str]  # files left behind, with the reason (size cap, not a regular file); the first few only
    left_out: int | None = 0  # how many files were left behind in all (None: unknown, collection failed)


class Sandbox(Protocol):
    """One run's isolated environment; steps of the run share its working directory."""

    async def run_step(self, request: StepRequest) -> StepResult:
        """Never raises for anything the step's code does."""

    async def run_batch(self, batch: StepBatch, on_call: ToolCallHandler | None, progress: BatchProgress,
                        gate: Any = None) -> list[StepResult]:
        """Run the batch's steps in order until one fails (see `run_batch_locally`)."""

    async def collect_outputs(self, max_file_bytes: int, max_total_bytes: int,
                              max_files: int = 1000) -> CollectedOutputs:
        """The regular files under outputs/ within the caps (at most `max_files`), never following a link."""

    async def put_inputs(self, files: "list[InputFile]") -> None:
        """Place `files` under inputs/ in the working directory, read-only for the steps (once, before any step;
        names already made safe by agent_core.inputs). Raises SandboxUnavailable when they cannot be placed."""

    async def close(self) -> None: ...


class Executor(Protocol):
    name: str

    async def start(self) -> None:
        """Pre-start warm workers (optional: `open` starts one when none is warm)."""

    async def open(self, run_id: str) -> Sandbox: ...

    async def stop(self) -> None: ...

    def describe(self) -> dict[str, Any]:
        """Backend and protections in force, and why (for `autocode doctor` and health checks)."""


__all__ = [
    "Artifact", "BatchProgress", "CollectedOutputs", "Executor", "Limits", "PlannedStep", "Sandbox",
    "SandboxUnavailable", "StepBatch", "StepRequest", "StepResult", "ToolCallHandler", "run_batch_locally",
]
