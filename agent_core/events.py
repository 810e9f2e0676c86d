"""Typed run events, emitted by the loop and rendered by the console and chat adapters."""

from __future__ import annotations

import dataclasses
import inspect
import logging
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


RunEvent = Union[RunStarted, PlanReady, StepStarted, StepFinished, EvaluationDone, RepairPlanned, RunFinished]
Subscriber = Callable[[RunEvent], Union[None, Awaitable[None]]]


def event_type(event: RunEvent) -> str:
    """snake_case name, e.g. "step_finished", used in storage and JSON."""
    name = type(event).__name__
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name).lstrip("_")


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
