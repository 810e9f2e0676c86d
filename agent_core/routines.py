"""Routines (issue 23): a task that runs on its own schedule and re-uses the code that worked.

A routine holds a task, the conversation its runs post to, a schedule (a cron expression read in an IANA time zone),
an owner (whose budget its runs spend), active/paused, a count of failed runs in a row, and its pinned plan: the
subtasks and code of a run that succeeded, versioned in `routine_plans`. Its run re-runs that plan without asking the
planner (agent_core/loop.py takes it from `pinned_plan`); the evaluator judges the fresh outputs and words the answer,
and repairs a step that fails as in any run. `after_run` then pins a repaired plan that succeeded as the next version,
or pauses the routine after MAX_FAILURES failed runs in a row, and returns what its post must say.

Firing times come from cronsim over `zoneinfo` (09:00 Europe/Rome stays 09:00 across a DST change); nothing here does
cron arithmetic. `fire` starts one firing (serve's clock, agent_core/routine_clock.py, and `routines run` use it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from itertools import islice
from typing import Any, Callable
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from agent_core.plan import Plan
from storage.db import Storage

MAX_FAILURES = 3  # failed runs in a row that pause a routine
INTERVAL_SAMPLE = 400  # firings looked at to find a schedule's shortest gap (covers a day of a 5-minute schedule)
# The keys of a run's routing (reply_to) that say where its conversation is; the rest is state of that one run
# (its progress message, whether its answer was delivered) and must not be copied to the routine's runs.
ROUTE_KEYS = ("team", "channel", "user", "thread_ts", "enterprise", "chat_id", "thread_id")


class RoutineError(ValueError):
    """A routine that cannot be made or changed as asked; the message is the sentence for the user."""


@dataclass(frozen=True)
class Schedule:
    """A cron expression read in an IANA time zone."""

    cron: str
    tz: str

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.tz)

    def upcoming(self, after: datetime, count: int = 1) -> list[datetime]:
        """The next `count` firings strictly after `after`, as aware UTC datetimes."""
        local = after.astimezone(self.zone).replace(microsecond=0)
        return [moment.astimezone(timezone.utc) for moment in islice(CronSim(self.cron, local), count)]

    def next_after(self, after: datetime) -> datetime:
        return self.upcoming(after, 1)[0]

    def local(self, moment: datetime) -> str:
        """A firing as the routine's people read it: local time with the zone's abbreviation."""
        return moment.astimezone(self.zone).strftime("%Y-%m-%d %H:%M %Z")


def parse_schedule(cron: str, tz: str, min_interval: float, now: datetime | None = None) -> Schedule:
    """The schedule, or RoutineError with the sentence saying what is wrong: an unknown zone, a cron cronsim does not
    read, one that never fires, or one firing more often than `min_interval` seconds (AUTOCODE_ROUTINE_MIN_INTERVAL)."""
    cron = " ".join((cron or "").split())
    tz = (tz or "").strip() or "UTC"
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise RoutineError(f"Unknown time zone {tz!r}: give an IANA name such as Europe/Rome or America/New_York.") \
            from None
    schedule = Schedule(cron, tz)
    try:
        firings = schedule.upcoming(now or datetime.now(timezone.utc), INTERVAL_SAMPLE)
    except CronSimError as exc:
        raise RoutineError(f"{cron!r} is not a cron expression ({exc}): give five fields, minute hour day-of-month "
                           "month day-of-week, e.g. '0 9 * * 1' for Mondays at 09:00.") from None
    if not firings:
        raise RoutineError(f"{cron!r} never fires (no date matches it).")
    gaps = [(b - a).total_seconds() for a, b in zip(firings, firings[1:])]
    if gaps and min(gaps) < min_interval:
        raise RoutineError(f"{cron!r} fires as often as every {min(gaps):g} seconds; a routine may fire at most once "
                           f"every {min_interval:g} seconds (AUTOCODE_ROUTINE_MIN_INTERVAL).")
    return schedule


def schedule_of(routine: dict[str, Any]) -> Schedule:
    return Schedule(routine["cron"], routine["tz"])


def iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds")


def parse_iso(text: str) -> datetime:
    return datetime.fromisoformat(text)


def _scope(conversation: str) -> str:
    from agent_core.channel_settings import scope_of

    return scope_of(conversation)


# --- making routines --------------------------------------------------------------------------------------------
def _check_cap(storage: Storage, conversation: str, cap: int) -> None:
    scope = _scope(conversation)
    if sum(1 for r in storage.routines() if _scope(r["conversation"]) == scope) >= cap:
        raise RoutineError(f"This channel has {cap} routines already, the most one may have "
                           "(AUTOCODE_ROUTINES_PER_CHANNEL); remove one first.")


def create_from_run(storage: Storage, settings: Any, run_id: str, cron: str, tz: str | None = None) -> dict[str, Any]:
    """A routine repeating a run that succeeded: its task, conversation, owner and routing; its final plan pinned as
    version 1."""
    run = storage.get_run(run_id)
    if run is None:
        raise RoutineError(f"There is no run {run_id}.")
    if run["status"] != "succeeded":
        raise RoutineError(f"Run {run_id} {run['status']}: a routine repeats the code of a run that succeeded.")
    plan = Plan.model_validate_json(run["plan_json"]) if run["plan_json"] else None
    if plan is None or plan.direct:
        raise RoutineError(f"Run {run_id} answered without running code, so there is no code to repeat; make the "
                           "routine with its task instead.")
    schedule = parse_schedule(cron, tz or settings.routine_tz, settings.routine_min_interval)
    _check_cap(storage, run["conversation"], settings.routines_per_channel)
    route = {k: v for k, v in json.loads(run["reply_to_json"] or "{}").items() if k in ROUTE_KEYS}
    routine_id = storage.add_routine({
        "task": run["task"], "conversation": run["conversation"], "cron": schedule.cron, "tz": schedule.tz,
        "owner": run["user"] or "", "adapter": run["adapter"] or "cli", "reply_to_json": json.dumps(route),
        "from_run_id": run_id, "next_fire_at": iso(schedule.next_after(datetime.now(timezone.utc))),
    })
    storage.add_routine_plan(routine_id, plan.model_dump_json(), run_id)
    return storage.get_routine(routine_id)


def create_with_task(storage: Storage, settings: Any, conversation: str, task: str, cron: str, tz: str | None = None,
                     *, owner: str = "", adapter: str = "cli", reply_to: dict[str, Any] | None = None) -> dict[str, Any]:
    """A routine with a task and no plan yet: its first run plans as any run, and pins its plan when it succeeds."""
    task, conversation = (task or "").strip(), (conversation or "").strip()
    if not task:
        raise RoutineError("The routine's task is empty.")
    if not conversation:
        raise RoutineError("Give the conversation the routine's runs post to (e.g. --conversation console).")
    schedule = parse_schedule(cron, tz or settings.routine_tz, settings.routine_min_interval)
    _check_cap(storage, conversation, settings.routines_per_channel)
    routine_id = storage.add_routine({
        "task": task, "conversation": conversation, "cron": schedule.cron, "tz": schedule.tz, "owner": owner,
        "adapter": adapter, "reply_to_json": json.dumps({k: v for k, v in (reply_to or {}).items() if k in ROUTE_KEYS}),
        "next_fire_at": iso(schedule.next_after(datetime.now(timezone.utc))),
    })
    return storage.get_routine(routine_id)


def pause(storage: Storage, routine_id: str) -> dict[str, Any]:
    routine = _get(storage, routine_id)
    storage.update_routine(routine_id, state="paused")
    return {**routine, "state": "paused"}


def resume(storage: Storage, routine_id: str) -> dict[str, Any]:
    """Active again, its failures forgotten, next firing counted from now (no firing missed while paused runs)."""
    routine = _get(storage, routine_id)
    next_fire = iso(schedule_of(routine).next_after(datetime.now(timezone.utc)))
    storage.update_routine(routine_id, state="active", failures=0, next_fire_at=next_fire)
    return storage.get_routine(routine_id)


def remove(storage: Storage, routine_id: str) -> None:
    _get(storage, routine_id)
    storage.delete_routine(routine_id)


def _get(storage: Storage, routine_id: str) -> dict[str, Any]:
    routine = storage.get_routine(routine_id)
    if routine is None:
        raise RoutineError(f"There is no routine {routine_id}.")
    return routine


def describe(storage: Storage, routine: dict[str, Any]) -> dict[str, Any]:
    """What `routines list/show` and GET /api/routines tell of a routine."""
    schedule = schedule_of(routine)
    firings = storage.routine_runs(routine["id"], limit=1)
    last = firings[0] if firings else None
    next_fire = routine["next_fire_at"] if routine["state"] == "active" else None
    return {
        "id": routine["id"], "task": routine["task"], "conversation": routine["conversation"],
        "cron": routine["cron"], "tz": routine["tz"], "state": routine["state"], "owner": routine["owner"],
        "plan_version": routine["plan_version"], "failures": routine["failures"], "next_fire_at": next_fire,
        "next_fire_local": schedule.local(parse_iso(next_fire)) if next_fire else None,
        "from_run_id": routine["from_run_id"],
        "last_result": None if last is None else {
            "run_id": last["run_id"], "outcome": last["outcome"], "status": last["run_status"],
            "scheduled_for": last["scheduled_for"], "fired_at": last["fired_at"], "note": last["note"]},
    }


# --- firing ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Firing:
    run_id: str | None
    outcome: str  # started | overlap | refused
    message: str = ""


# submit(task, conversation, user, adapter, reply_to) -> (run_id or None, refusal sentence)
Submit = Callable[[str, str, str, str, dict[str, Any]], "tuple[str | None, str]"]


def fire(storage: Storage, routine: dict[str, Any], submit: Submit, scheduled_for: str | None = None) -> Firing:
    """Start one run of the routine through `submit` (serve: the run scheduler, so budgets and queues apply), with
    its pinned plan version; or record why not: its previous run is still going (overlap), or `submit` refused
    (a budget). A skipped firing is noted for the routine's next post."""
    fired_at = iso(datetime.now(timezone.utc))
    active = storage.active_routine_run(routine["id"])
    if active is not None:
        message = (f"The firing of {_when(routine, scheduled_for or fired_at)} was skipped: the routine's previous "
                   f"run {active['id']} was still {active['status']}.")
        return _skipped(storage, routine, "overlap", message, scheduled_for)
    route = json.loads(routine["reply_to_json"] or "{}")
    if route.get("channel"):
        route["kind"] = "routine"
    run_id, refusal = submit(routine["task"], routine["conversation"], routine["owner"] or "",
                             routine["adapter"] or "cli", route)
    if run_id is None:
        return _skipped(storage, routine, "refused", f"The firing of {_when(routine, scheduled_for or fired_at)} "
                        f"was skipped: {refusal}", scheduled_for)
    # Before the event loop runs again: the dispatcher must find the run marked as the routine's, with its plan.
    storage.update_run(run_id, routine_id=routine["id"], plan_version=routine["plan_version"] or None)
    storage.add_routine_run({"routine_id": routine["id"], "run_id": run_id, "scheduled_for": scheduled_for,
                             "fired_at": fired_at, "outcome": "started"})
    storage.update_routine(routine["id"], last_fired_at=fired_at)
    return Firing(run_id, "started")


def skip_missed(storage: Storage, routine: dict[str, Any], scheduled_for: str, grace_s: float) -> Firing:
    message = (f"The firing of {_when(routine, scheduled_for)} was skipped: AutoCode was not running then, and it is "
               f"more than {_duration(grace_s)} late (AUTOCODE_ROUTINE_GRACE).")
    return _skipped(storage, routine, "missed", message, scheduled_for)


def _skipped(storage: Storage, routine: dict[str, Any], outcome: str, message: str,
             scheduled_for: str | None) -> Firing:
    storage.add_routine_run({"routine_id": routine["id"], "run_id": None, "scheduled_for": scheduled_for,
                             "outcome": outcome, "note": message})
    fresh = storage.get_routine(routine["id"]) or routine
    storage.update_routine(routine["id"], note=" ".join(filter(None, [fresh["note"], message])))
    return Firing(None, outcome, message)


def _when(routine: dict[str, Any], stamp: str) -> str:
    return schedule_of(routine).local(parse_iso(stamp))


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:g} h" if seconds >= 3600 else f"{seconds / 60:g} min"


# --- the loop's hooks --------------------------------------------------------------------------------------------
def pinned_plan(storage: Storage, run: dict[str, Any]) -> Plan | None:
    """The plan a routine's run re-runs instead of asking the planner (None: the run plans as any run)."""
    if not run.get("routine_id") or not run.get("plan_version"):
        return None
    pinned = storage.routine_plan(run["routine_id"], run["plan_version"])
    return Plan.model_validate_json(pinned["plan_json"]) if pinned else None


def after_run(storage: Storage, run_id: str, status: str, answer: str, error: str | None) -> tuple[str, str | None]:
    """A routine's run ended: pin its plan when it succeeded with a new one (a repair, or the first run of a routine
    made with a task), count it when it failed (MAX_FAILURES in a row pause the routine), and return the answer and
    error with what the post must also say (the new version, the pause, firings skipped since the last post)."""
    run = storage.get_run(run_id) or {}
    routine = storage.get_routine(run["routine_id"]) if run.get("routine_id") else None
    if routine is None:
        return answer, error
    notes = [routine["note"]] if routine["note"] else []
    changes: dict[str, Any] = {"note": None}
    if status == "succeeded":
        changes["failures"] = 0
        plan = Plan.model_validate_json(run["plan_json"]) if run["plan_json"] else None
        pinned = storage.routine_plan(routine["id"], routine["plan_version"]) if routine["plan_version"] else None
        if plan is not None and not plan.direct and (
                pinned is None or Plan.model_validate_json(pinned["plan_json"]) != plan):
            version = storage.add_routine_plan(routine["id"], plan.model_dump_json(), run_id)
            notes.append(f"Routine {routine['id']}: " + (
                f"plan version {version} pinned (repaired from version {pinned['version']}); its next runs re-use it."
                if pinned else f"this run's plan is pinned as version {version}; its next runs re-use its code."))
    elif status == "failed":
        failures = (routine["failures"] or 0) + 1
        changes["failures"] = failures
        if failures >= MAX_FAILURES and routine["state"] == "active":
            changes["state"] = "paused"
            notes.append(f"Routine {routine['id']} is paused: its last {failures} runs failed. Resume it with "
                         f"`autocode routines resume {routine['id']}` once the cause is fixed.")
    storage.update_routine(routine["id"], **changes)
    if not notes:
        return answer, error
    note = "\n".join(notes)
    if status == "succeeded" or not error:
        return (f"{answer}\n\n{note}" if answer else note), error
    return answer, f"{error}\n\n{note}"


__all__ = ["RoutineError", "Schedule", "parse_schedule", "create_from_run", "create_with_task", "pause", "resume",
           "remove", "describe", "fire", "skip_missed", "pinned_plan", "after_run", "Firing", "MAX_FAILURES"]
