"""Where generated code runs: one small interface, the isolation behind it.

A run opens a `Sandbox` (its own worker, uid and working directory); each step is one generated function run
in a fresh, confined process forked from that worker. The step gets its input as JSON, may call trusted tools
through `on_call` (answered by the server, so secrets stay outside), and returns a JSON dict.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Protocol

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


@dataclass(frozen=True)
class Artifact:
    """A file a run's steps wrote under outputs/."""

    name: str
    data: bytes
    mime: str


@dataclass
class CollectedOutputs:
    artifacts: list[Artifact]
    skipped: list[str]  # files left behind, with the reason (size cap, not a regular file)


class Sandbox(Protocol):
    """One run's isolated environment; steps of the run share its working directory."""

    async def run_step(self, request: StepRequest) -> StepResult:
        """Never raises for anything the step's code does."""

    async def collect_outputs(self, max_file_bytes: int, max_total_bytes: int) -> CollectedOutputs: ...

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
    "Artifact", "CollectedOutputs", "Executor", "Limits", "Sandbox", "SandboxUnavailable", "StepRequest",
    "StepResult", "ToolCallHandler",
]
