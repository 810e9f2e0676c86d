"""Where generated code runs: one small interface, backends behind it.

A step is one generated function run in a fresh child process. The child gets its input as JSON, may call
trusted tools through `on_call` (answered by the parent, so secrets stay outside), and returns a JSON dict.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Protocol

ToolCallHandler = Callable[[str, list[Any], dict[str, Any]], Awaitable[Any]]


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 60.0
    memory_mb: int = 1024
    max_output_kb: int = 256
    max_log_kb: int = 64
    file_size_mb: int = 256


@dataclass
class StepRequest:
    code: str
    function: str
    input: dict[str, Any] | None  # None: the first step, called without arguments
    workdir: Path
    limits: Limits = field(default_factory=Limits)
    tool_names: list[str] = field(default_factory=list)  # trusted tools exposed as stubs
    on_call: ToolCallHandler | None = None


@dataclass
class StepResult:
    ok: bool
    output: dict[str, Any] | None = None
    error: str | None = None
    traceback: str | None = None
    stdout: str = ""
    stderr: str = ""
    duration_ms: int = 0


class Executor(Protocol):
    """Runs one step in isolation; never raises for anything the step's code does."""

    name: str

    async def run_step(self, request: StepRequest) -> StepResult: ...


def default_executor() -> Executor:
    from agent_core.sandbox.subprocess_backend import SubprocessExecutor

    return SubprocessExecutor()


__all__ = ["Executor", "Limits", "StepRequest", "StepResult", "ToolCallHandler", "default_executor"]
