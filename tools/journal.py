"""The journal of trusted tool calls: no call's side effect happens twice because a step ran again.

A step on a Celery worker runs again when its worker is lost (the job is sent again, from the same working files),
and its code makes the same calls in the same order. Each call a step makes therefore has an idempotency key: the
run, the iteration, the step (its name: names are unique within a plan, so it stands for its position) and the
call's number within the step (1, 2, … in the order the step makes them). The tool host (tools/host.py) asks the
journal before it calls and tells it after:

- `begin` records the call as `started` (with which attempt asked, and a digest of the tool and its arguments)
  before the tool runs. If the key is already recorded as finished, the recorded result (value or error) is the
  answer and the tool is not called again. If it is recorded as started by another attempt and never finished
  (the worker died during the call), nobody knows whether its side effect happened: the step gets `CallUncertain`
  ("send_email may or may not have run …") instead of a second call, and the evaluator and the user see it.
- `finish` records the value or the error.

The records live in serve's SQLite (table `tool_calls`, storage/db.py). In-process, `StorageJournal` writes them
directly; a worker asks serve through Redis (agent_core/jobs.py `_RemoteJournal`, answered by
agent_core/sandbox/remote.py with `answer_begin`/`answer_finish` below), and waits for the answer before calling.
`llm()` calls are journaled too (a step run again gets the same reply, and no tokens are spent twice); an
unfinished one is simply asked again, since it changes nothing outside.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Protocol

from storage.db import Storage


@dataclass
class StepCalls:
    """The step now running in this task (set by run_batch_locally): numbers its tool calls."""

    iteration: int
    step: str
    numbers: itertools.count = field(default_factory=lambda: itertools.count(1))


CURRENT_STEP: ContextVar[StepCalls | None] = ContextVar("autocode_current_step", default=None)


@dataclass(frozen=True)
class CallKey:
    run_id: str
    iteration: int
    step: str
    number: int

    def as_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "iteration": self.iteration, "step": self.step, "number": self.number}


@dataclass(frozen=True)
class Recorded:
    """What `begin` found: `go` (recorded as started now: call it), `done` (its value), `failed` (its error),
    `unknown` (started by another attempt, never finished), `different` (this call number was another call)."""

    status: str
    value: Any = None
    error: str = ""
    tool: str = ""


class CallUncertain(Exception):
    """The call was started once and never reported back: it is not repeated blindly."""


class RecordedFailure(Exception):
    """A call that failed the first time fails again with the same text, without running again."""


def replayed_failure(error: str) -> RecordedFailure:
    """The recorded failure as the step saw it the first time ("LookupError: no x" raises as a LookupError-named
    exception with the text "no x"; "ToolError: …" as the ToolError the step can catch)."""
    name, _, message = error.partition(": ")
    if message and name.isidentifier():
        # raised_in_step_as: a ToolError or ToolDenied reaches the step as one again (others ignore it)
        return type(name, (RecordedFailure,), {"raised_in_step_as": name})(message)
    return RecordedFailure(error)


class ToolJournal(Protocol):
    run_id: str

    async def begin(self, key: CallKey, tool: str, digest: str, mode: str = "take") -> Recorded:
        """`mode`: "take" records the call as started by this attempt (when not recorded yet); "peek" only looks;
        "retake" takes over a call another attempt started and never finished (for calls that may be repeated)."""

    async def finish(self, key: CallKey, ok: bool, value: Any, error: str) -> None: ...


def call_digest(tool: str, args: list[Any], kwargs: dict[str, Any]) -> str:
    text = json.dumps([tool, args, kwargs], sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def answer_begin(storage: Storage, key: dict[str, Any], tool: str, digest: str, attempt: str,
                 mode: str = "take") -> dict[str, Any]:
    """Serve's side of `begin`, as a JSON-able answer (in-process and for workers alike)."""
    row = storage.begin_tool_call({**key, "tool": tool, "digest": digest, "attempt": attempt}, insert=mode == "take")
    if row is None:
        return {"status": "go"}
    if row["tool"] != tool or row["digest"] != digest:
        return {"status": "different", "tool": row["tool"]}
    if row["status"] == "done":
        return {"status": "done", "value": json.loads(row["result_json"]) if row["result_json"] else None}
    if row["status"] == "failed":
        return {"status": "failed", "error": row["error"] or ""}
    if row["attempt"] == attempt:  # the same attempt asks again (its answer was lost): it has not called yet
        return {"status": "go"}
    if mode == "retake":
        storage.retake_tool_call(key, attempt)
        return {"status": "go"}
    return {"status": "unknown", "tool": row["tool"]}


def answer_finish(storage: Storage, key: dict[str, Any], ok: bool, value: Any, error: str) -> None:
    storage.finish_tool_call(key, "done" if ok else "failed",
                             json.dumps(value, ensure_ascii=False) if ok else None, None if ok else error)


def recorded(answer: dict[str, Any]) -> Recorded:
    return Recorded(str(answer.get("status")), answer.get("value"), str(answer.get("error") or ""),
                    str(answer.get("tool") or ""))


class StorageJournal:
    """The journal of an in-process run: serve's own database, written directly."""

    def __init__(self, storage: Storage, run_id: str, attempt: str = "serve"):
        self.storage = storage
        self.run_id = run_id
        self.attempt = attempt

    async def begin(self, key: CallKey, tool: str, digest: str, mode: str = "take") -> Recorded:
        return recorded(answer_begin(self.storage, key.as_dict(), tool, digest, self.attempt, mode))

    async def finish(self, key: CallKey, ok: bool, value: Any, error: str) -> None:
        answer_finish(self.storage, key.as_dict(), ok, value, error)


__all__ = ["CURRENT_STEP", "CallKey", "CallUncertain", "RecordedFailure", "Recorded", "StepCalls", "StorageJournal",
           "ToolJournal", "answer_begin", "answer_finish", "call_digest"]
