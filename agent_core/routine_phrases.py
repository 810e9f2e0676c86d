"""Everyday schedule phrases for routines: "every monday 9:00 post the signups chart" → a cron expression and the
task, with one LLM call (no maintained library turns English into cron; cronsim then checks the expression and
computes the firings, agent_core/routines.py). What the user sees before anything is saved is `Proposal.describe()`:
the cron, the time zone and the next three firings in local time.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

from pydantic import BaseModel, ConfigDict

from agent_core.llm import CallContext, LLMClient, LLMError
from agent_core.plan import ReplyError, strict_object
from agent_core.routines import RoutineError, parse_schedule

SCHEMA = strict_object({"cron": {"type": "string"}, "task": {"type": "string"}})
SYSTEM = (
    "You turn a request for a recurring task into a standard five-field cron expression (minute hour day-of-month "
    "month day-of-week; day-of-week 0-6 with 0 = Sunday, or MON-SUN) and the task itself. The request starts with "
    "when the task should run (e.g. 'every monday 9:00', 'every weekday at 9', 'every 2 hours', 'on the 1st of "
    "each month') and goes on with what to do. Times are local: do not convert time zones. Reply with JSON: "
    '{"cron": "...", "task": "what to do, in the user\'s words, without the schedule"}. If the request has no '
    'schedule you can express in cron, reply {"cron": "", "task": ""}.'
)


class _Reply(BaseModel):
    model_config = ConfigDict(extra="ignore")

    cron: str = ""
    task: str = ""


@dataclass(frozen=True)
class Proposal:
    """A schedule read from a phrase, checked, not yet saved."""

    cron: str
    tz: str
    task: str
    next_firings: list[str]  # local time, as the routine's people read it

    def describe(self) -> str:
        return (f"`{self.cron}` in {self.tz}; next: {', '.join(self.next_firings)}.")


async def read_phrase(llm: LLMClient, phrase: str, tz: str, min_interval: float, model: str | None = None,
                      with_task: bool = True) -> Proposal:
    """The cron and task of `phrase` (one LLM call), checked by `routines.parse_schedule`; RoutineError with the
    sentence for the user when the model could not be asked, found no schedule, or one AutoCode refuses. With
    `with_task` false the phrase is only a schedule (repeating a run: its task is known)."""
    phrase = " ".join((phrase or "").split())
    if not phrase:
        raise RoutineError("Say when and what, e.g. `every monday 9:00 post last week's signups chart`.")

    def check(reply: _Reply) -> None:
        if with_task and reply.cron.strip() and not reply.task.strip():
            raise ReplyError("task is empty: give what to do without the schedule")

    try:
        reply = await llm.structured(
            purpose="schedule", messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": phrase}],
            schema_name="schedule", schema=SCHEMA, shape_hint='{"cron": "0 9 * * 1", "task": "..."}', model=_Reply,
            validate=check, context=CallContext(model=model))
    except LLMError as exc:
        raise RoutineError(f"The schedule could not be read: {exc}") from None
    if not reply.cron.strip():
        raise RoutineError(f"No schedule found in {phrase!r}; start with when, e.g. `every weekday at 9 …`.")
    try:
        schedule = parse_schedule(reply.cron, tz, min_interval)
    except RoutineError as exc:
        raise RoutineError(f"I read the schedule as `{reply.cron.strip()}`, but: {exc}") from None
    firings = schedule.upcoming(datetime.now(timezone.utc), 3)
    return Proposal(schedule.cron, schedule.tz, reply.task.strip(), [schedule.local(f) for f in firings])
