"""Approvals: a call of a tool declared with `"confirm": True` waits for a person's Approve or Deny.

The seed's own example of a trusted tool is `send_email`; a code agent must not send mail because generated code
decided to. When a step calls such a tool, the tool host (tools/host.py) asks `Approvals.ask`, which

- stores a pending approval (table `approvals`: the run, its number in the run, the tool, the whole call as text
  and its parts as JSON) and emits ApprovalRequested, which each adapter renders to the requester: Slack buttons,
  a Telegram inline keyboard, a y/N prompt in `autocode chat`/`run`; the API answers
  `POST /api/runs/{id}/approvals/{n}`. Each shows the call fitted to its platform's limit by
  agent_core/call_text.py: every argument named, each long value clipped in its middle, so that a long first
  argument cannot hide a later `to=` from the person deciding; the run page shows the whole call;
- stops the step's timeout and gives back its step slot while it waits (agent_core/sandbox/clock.py): a person
  may take minutes, and other runs' steps should not wait for them;
- resolves with the first decision (`decide`), or denies after AUTOCODE_APPROVAL_TIMEOUT seconds; a cancelled run
  ends its wait at once; a restart marks the pending approval `interrupted` with the run (scheduler; a stop does
  so before it cancels the run, so the cancel does not record `cancelled`);
- emits ApprovalDecided and, unless approved, raises ToolDenied, which the step receives as its own `ToolDenied`
  exception (a builtin there): it may catch it and go on, and the tool has done nothing.

Who may decide is the adapter's business (the requester or an admin: bots/permissions.py); `decide` records who.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from agent_core import call_text
from agent_core.events import ApprovalDecided, ApprovalRequested, RunEvent
from agent_core.sandbox.clock import paused
from storage.db import Storage

log = logging.getLogger(__name__)

ARGUMENTS_CHARS = 2000  # ApprovalRequested.arguments: the call fitted for a generic display (adapters fit `call`)
DECISIONS = ("approved", "denied")


class ToolDenied(Exception):
    """The call was not approved; the message is for the step (and its log)."""

    raised_in_step_as = "ToolDenied"  # agent_core/sandbox/pool.py raises it in the step under this name


@dataclass(frozen=True)
class Decided:
    """What `decide` did: `ok` when this decision settled the approval; `message` says what happened."""

    ok: bool
    message: str


def render_call(tool: str, args: list[Any], kwargs: dict[str, Any], limit: int = ARGUMENTS_CHARS) -> str:
    """The call as a person reads it: `send_email(to="a@b.c", subject="Q3")`, values as JSON, within `limit`:
    every argument named, each long value clipped in its middle (agent_core/call_text.py). Untrusted text
    (generated code chose the values): renderers escape it for their platform."""
    return call_text.fit(tool, call_text.parts_of(args, kwargs), limit)


class Approvals:
    """Pending approvals of the runs in this process (one per Agent)."""

    def __init__(self, storage: Storage, emit: Callable[[RunEvent], Awaitable[None]], timeout_s: float):
        self.storage = storage
        self.emit = emit
        self.timeout_s = timeout_s
        self.approve_all_as: str | None = None  # `autocode run --yes`: every call approved, recorded under this name
        self._waiting: dict[tuple[str, int], asyncio.Future[tuple[str, str]]] = {}

    async def ask(self, run_id: str, tool: str, args: list[Any], kwargs: dict[str, Any]) -> None:
        """Wait for the decision on one call; returns when approved, raises ToolDenied otherwise."""
        parts = call_text.parts_of(args, kwargs)
        arguments = call_text.fit(tool, parts, ARGUMENTS_CHARS)
        number = self.storage.add_approval(run_id, tool, call_text.whole(tool, parts), call_text.encode(parts))
        future: asyncio.Future[tuple[str, str]] = asyncio.get_running_loop().create_future()
        self._waiting[(run_id, number)] = future
        decision, by = "timeout", ""
        try:
            async with paused():  # from the request on: rendering it may take a while too
                if self.approve_all_as is not None:
                    self.decide(run_id, number, True, self.approve_all_as)
                else:
                    await self.emit(ApprovalRequested(run_id, number, tool, arguments, self.timeout_s,
                                                      tuple(parts)))
                try:
                    decision, by = await asyncio.wait_for(asyncio.shield(future), self.timeout_s)
                except TimeoutError:
                    decision, by = "timeout", ""
        except asyncio.CancelledError:
            if self.storage.decide_approval(run_id, number, "cancelled"):
                await asyncio.shield(self.emit(ApprovalDecided(run_id, number, tool, "cancelled", "")))
            raise
        finally:
            self._waiting.pop((run_id, number), None)
        if decision == "timeout":
            self.storage.decide_approval(run_id, number, "timeout")
        await self.emit(ApprovalDecided(run_id, number, tool, decision, by))
        log.info("run %s: approval %s of %s: %s%s", run_id, number, tool, decision, f" by {by}" if by else "")
        if decision == "approved":
            return
        if decision == "timeout":
            raise ToolDenied(f"{tool} was not run: nobody approved it within {self.timeout_s:g} s")
        raise ToolDenied(f"{tool} was not run: {by or 'the requester'} denied it")

    def decide(self, run_id: str, number: int, approve: bool, by: str) -> Decided:
        """Settle a pending approval (the first decision counts). The caller checked that `by` may decide."""
        decision = "approved" if approve else "denied"
        rows = [a for a in self.storage.approvals(run_id) if a["number"] == number]
        if not rows:
            return Decided(False, "There is no such approval.")
        if rows[0]["status"] != "pending" or not self.storage.decide_approval(run_id, number, decision, by):
            row = [a for a in self.storage.approvals(run_id) if a["number"] == number][0]
            return Decided(False, f"Already {row['status']}" + (f" by {row['decided_by']}." if row["decided_by"] else "."))
        future = self._waiting.get((run_id, number))
        if future is not None and not future.done():
            future.set_result((decision, by))
        return Decided(True, f"{rows[0]['tool']}: {decision}.")

    def pending(self, run_id: str) -> list[dict[str, Any]]:
        return [a for a in self.storage.approvals(run_id) if a["status"] == "pending"]


__all__ = ["ApprovalDecided", "ApprovalRequested", "Approvals", "Decided", "ToolDenied", "render_call"]
