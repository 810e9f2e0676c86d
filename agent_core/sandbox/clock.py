"""The clock of the step being answered: lets the tool host stop it while a person decides (approvals).

While a step waits for Approve/Deny its process is idle (it uses no CPU, so its CPU limit does not run either), and
its wall-clock timeout must not run: a person may take minutes. `pool._converse` sets the step's deadline and
`run_batch_locally` the step slot it holds; both are context variables of the task answering the step's tool
calls, so `paused()` called from inside a tool call finds them. The slot is given back while waiting, so a run
waiting for a decision does not keep other runs' steps from starting.
"""

from __future__ import annotations

import asyncio
import contextlib
from contextvars import ContextVar
from typing import AsyncIterator

STEP_DEADLINE: ContextVar[asyncio.Timeout | None] = ContextVar("autocode_step_deadline", default=None)


class StepSlot:
    """A step's hold on the semaphore that bounds steps running at once; knows whether it holds it, so a slot given
    back during a wait and not taken again (the run was cancelled meanwhile) is not released twice."""

    def __init__(self, semaphore: asyncio.Semaphore):
        self.semaphore = semaphore
        self.held = False

    async def acquire(self) -> None:
        await self.semaphore.acquire()
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.semaphore.release()


STEP_SLOT: ContextVar[StepSlot | None] = ContextVar("autocode_step_slot", default=None)


@contextlib.asynccontextmanager
async def paused() -> AsyncIterator[None]:
    """Stop the current step's timeout and give back its slot for the block; both resume after it, the timeout
    with the time it had left."""
    loop = asyncio.get_running_loop()
    deadline, slot = STEP_DEADLINE.get(), STEP_SLOT.get()
    when = deadline.when() if deadline is not None else None
    remaining = None if when is None else max(0.0, when - loop.time())
    if remaining is not None:
        deadline.reschedule(None)
    if slot is not None:
        slot.release()
    try:
        yield
    finally:
        if slot is not None:
            await slot.acquire()  # cancelled here: not held, and not released again by its owner
        if remaining is not None:
            deadline.reschedule(loop.time() + remaining)


__all__ = ["STEP_DEADLINE", "STEP_SLOT", "StepSlot", "paused"]
