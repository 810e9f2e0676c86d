"""Typed run events, emitted by the loop and rendered by the console and chat adapters."""

from __future__ import annotations

import dataclasses
import inspect
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Union

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunStarted:
    run_id: str
    conversation: str
    task: str


@dataclass(frozen=True)
class PlanReady:
    run_id: str
    iteration: int
    main_task_thought: str
    steps: list[str]  # tool names in order
    descriptions: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class StepStarted:
    run_id: str
    iteration: int
    index: int  # 1-based position in the plan
    total: int
    tool_name: str
    description: str


@dataclass(frozen=True)
class StepFinished:
    run_id: str
    iteration: int
    index: int
    total: int
    tool_name: str
    ok: bool
    duration_ms: int
    error: str | None = None
    output_preview: str = ""


@dataclass(frozen=True)
class EvaluationDone:
    run_id: str
    iteration: int
    satisfactory: bool
    thoughts: str


@dataclass(frozen=True)
class RepairPlanned:
    run_id: str
    iteration: int  # the iteration about to run
    retry_from: str
    steps: list[str]
    reused: list[str]  # earlier steps whose outputs are kept


@dataclass(frozen=True)
class RunFinished:
    run_id: str
    status: str  # succeeded | failed | cancelled
    answer: str
    error: str | None
    iterations: int
    usage: dict[str, int]


# What the progress lines call the run's LLM calls (their `purpose`).
_CALLERS = {"plan": "planner", "evaluate": "evaluator", "helper": "llm() helper"}


def _caller(purpose: str) -> str:
    return _CALLERS.get(purpose, purpose)


@dataclass(frozen=True)
class LLMWaiting:
    """An LLM call of the run is still waiting: sent NOTICE_AFTER_S after the call began and every NOTICE_EVERY_S
    after (agent_core/llm_wait.py), and when a request is retried. Adapters show it as the progress line, e.g.
    "waiting for the LLM (planner)… 15 s, retry 1 of 2 (HTTP 429)", or while the model writes its reply
    "the LLM is writing (planner)… 412 tokens at 13 tokens/s, 32 s"."""

    run_id: str
    purpose: str  # plan | evaluate | helper
    waited_s: float  # since the call began: its retries, format fallbacks and re-asks included
    attempt: int  # of the request now waiting: 1 its first try, 2 its first retry, …
    attempts: int  # the most a request is tried: 1 + AUTOCODE_LLM_MAX_RETRIES
    reason: str = ""  # why the previous try failed ("timeout", "HTTP 429", "HTTP 503", "connection error")
    tokens: int = 0  # the model is writing: tokens of its reply so far (streamed calls, agent_core/llm_stream.py)
    tokens_per_s: float = 0.0

    def describe(self) -> str:
        if self.tokens:
            rate = f" at {self.tokens_per_s:.0f} tokens/s" if self.tokens_per_s else ""
            return f"the LLM is writing ({_caller(self.purpose)})… {self.tokens:,} tokens{rate}, {self.waited_s:.0f} s"
        line = f"waiting for the LLM ({_caller(self.purpose)})… {self.waited_s:.0f} s"
        if self.attempt > 1:
            line += f", retry {self.attempt - 1} of {self.attempts - 1}"
            if self.reason:
                line += f" ({self.reason})"
        return line


@dataclass(frozen=True)
class LLMWaitOver:
    """An LLM call that had sent LLMWaiting is over (answered, or given up: the error follows elsewhere)."""

    run_id: str
    purpose: str
    waited_s: float
    requests: int  # HTTP requests the call sent
    ok: bool

    def describe(self) -> str:
        tries = f", {self.requests} attempts" if self.requests > 1 else ""
        if self.ok:
            return f"the LLM answered ({_caller(self.purpose)}) after {self.waited_s:.0f} s{tries}"
        return f"no answer from the LLM ({_caller(self.purpose)}) after {self.waited_s:.0f} s{tries}"


@dataclass(frozen=True)
class WorkerWaiting:
    """The run's next steps wait in the job queue for an `autocode worker` (scale-out): sent when a job is not taken
    within 2 s, then every 5 s (agent_core/sandbox/remote.py). Adapters show it as the progress line, like
    LLMWaiting; the wait ends with the next StepStarted, or with the step's failure after AUTOCODE_JOB_QUEUE_TIMEOUT.
    The step's own timeout starts only when a worker takes the job."""

    run_id: str
    ahead: int  # jobs queued before this one
    waited_s: float

    def describe(self) -> str:
        ahead = f"{self.ahead} job{'s' if self.ahead != 1 else ''} ahead" if self.ahead else "next in line"
        return f"waiting for a worker: {ahead} ({self.waited_s:.0f} s)"


@dataclass(frozen=True)
class ApprovalRequested:
    """A step called a tool declared with `"confirm": True` and waits: the requester (or an admin) decides with
    Approve / Deny (agent_core/approvals.py). `arguments` is the call as text, fitted to ARGUMENTS_CHARS; `call` its
    parts (name or None, value as JSON), which adapters fit to their platform's limit (agent_core/call_text.py).
    Untrusted (the generated code chose them): adapters escape them."""

    run_id: str
    number: int  # 1-based within the run: POST /api/runs/{id}/approvals/{number}
    tool: str
    arguments: str
    timeout_s: float
    call: tuple[tuple[str | None, str], ...] = ()


@dataclass(frozen=True)
class ApprovalDecided:
    run_id: str
    number: int
    tool: str
    decision: str  # approved | denied | timeout | cancelled | interrupted
    by: str  # who decided ("" for a timeout or a cancellation)


RunEvent = Union[RunStarted, PlanReady, StepStarted, StepFinished, EvaluationDone, RepairPlanned, LLMWaiting,
                 LLMWaitOver, WorkerWaiting, ApprovalRequested, ApprovalDecided, RunFinished]
Subscriber = Callable[[RunEvent], Union[None, Awaitable[None]]]


def event_type(event: RunEvent) -> str:
    """snake_case name, e.g. "step_finished" or "llm_waiting", used in storage and JSON."""
    return _WORD_START.sub("_", type(event).__name__).lower()


_WORD_START = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")  # RunStarted, LLMWaiting


def event_data(event: RunEvent) -> dict[str, Any]:
    return dataclasses.asdict(event)


class EventBus:
    """Fan-out to subscribers; a failing subscriber is logged and never breaks the run."""

    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        self._subscribers.append(subscriber)
        return lambda: self._subscribers.remove(subscriber)

    async def emit(self, event: RunEvent) -> None:
        for subscriber in list(self._subscribers):
            try:
                result = subscriber(event)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("run event subscriber failed on %s", event_type(event))
