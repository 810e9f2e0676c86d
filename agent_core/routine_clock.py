"""serve's routine clock: fires due routines (agent_core/routines.py) through the run scheduler.

The schedule is durable: each routine's `next_fire_at` is in SQLite, so a routine added by `autocode routines add`
in another process, or one due while serve was down, is found by the next tick. A firing found late by more than
AUTOCODE_ROUTINE_GRACE (serve was down) is skipped and noted for the routine's next post; within it, it runs once
(however many firings were missed). Runs are queued like any other: budgets, one run per conversation at a time,
and Celery workers when configured.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timezone
from typing import Any

from agent_core import routines
from agent_core.scheduler import RunScheduler

log = logging.getLogger(__name__)

TICK_S = 1.0  # how often due routines are looked for: firings start within about this


class RoutineClock:
    """Create with the scheduler, `start()` after the scheduler started, `await stop()` before it stops."""

    def __init__(self, scheduler: RunScheduler, tick: float = TICK_S):
        self.scheduler = scheduler
        self.storage = scheduler.storage
        self.settings = scheduler.settings
        self.tick = tick
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="autocode-routine-clock")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            try:
                self.fire_due(datetime.now(timezone.utc))
            except Exception:  # a bad row must not stop every other routine's firings
                log.exception("routine clock: firing due routines failed")
            await asyncio.sleep(self.tick)

    def fire_due(self, now: datetime) -> list[routines.Firing]:
        """Fire (or skip) every active routine due at `now`, and move each one's next firing past `now`."""
        firings = []
        for routine in self.storage.due_routines(routines.iso(now)):
            scheduled = routine["next_fire_at"]
            late = (now - routines.parse_iso(scheduled)).total_seconds()
            try:
                following = routines.iso(routines.schedule_of(routine).next_after(now))
            except Exception as exc:  # a cron or zone this version no longer reads: paused, said why
                log.error("routine %s: its schedule cannot be read (%s); paused", routine["id"], exc)
                self.storage.update_routine(routine["id"], state="paused", next_fire_at=None,
                                            note=f"Its schedule could not be read ({exc}); the routine was paused.")
                continue
            # Moved first: whatever happens to this firing, the routine is not found due again for it.
            self.storage.update_routine(routine["id"], next_fire_at=following)
            if late > self.settings.routine_grace:
                firing = routines.skip_missed(self.storage, routine, scheduled, self.settings.routine_grace)
            else:
                firing = routines.fire(self.storage, routine, self.submit, scheduled)
            log.info("routine %s (due %s): %s %s", routine["id"], scheduled, firing.outcome,
                     firing.run_id or firing.message)
            firings.append(firing)
        return firings

    def submit(self, task: str, conversation: str, user: str, adapter: str,
               reply_to: dict[str, Any]) -> tuple[str | None, str]:
        """routines.Submit through the run scheduler (budgets, queues); the refusal's sentence when it refuses."""
        submission = self.scheduler.submit(task, conversation, user=user, adapter=adapter, reply_to=reply_to)
        return (submission.run_id, "") if submission.status == "queued" else (None, submission.message)
