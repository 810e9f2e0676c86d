"""The trusted tool host: answers the calls sandboxed code makes to exact tools and the LLM helper.

It runs in the server process, which holds the operator's secrets and the LLM key; the sandbox only ever
sees JSON arguments going out and JSON results coming back. Each `llm()` call must first be admitted by the run's
budget (calls per step, prompt size, run and daily tokens): a refusal is the step's exception. A call of a tool
declared with `"confirm": True` first waits for a person's decision (`approve`, agent_core/approvals.py); without
an `approve` such a tool is refused, never run unasked. Calls of MCP tools ("server.tool", tools/mcp_host.py) come
through the same entry point: arguments checked, the step's MCP call budget, approval when the tool needs it, the
call recorded by `record_mcp` for audit.

Every call that reaches a tool passes through `_journaled` (one place, whatever the tool's kind): with a `journal`
(tools/journal.py) the call is recorded before it runs and its result after, so a step run again gets the recorded
result instead of a second side effect, and a call that started and never finished is not repeated blindly.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Awaitable, Callable

from agent_core.budget import RunBudget
from tools.journal import CURRENT_STEP, CallKey, CallUncertain, ToolJournal, call_digest, replayed_failure
from tools.registry import ToolSet

LLMHelper = Callable[[str, str], Awaitable[str]]
Approver = Callable[[str, list[Any], dict[str, Any]], Awaitable[None]]  # returns when approved, raises otherwise
McpRecorder = Callable[[dict[str, Any]], Awaitable[None]]  # stores one MCP call's audit record


def _to_json(value: Any) -> Any:
    """Round-trip through JSON so only plain data goes back to the sandbox."""
    return json.loads(json.dumps(value, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v)))


class ToolHost:
    def __init__(self, toolset: ToolSet, llm_helper: LLMHelper, timeout_s: float, budget: RunBudget | None = None,
                 approve: Approver | None = None, journal: ToolJournal | None = None,
                 record_mcp: McpRecorder | None = None):
        """`budget`: the run's, asked before every `llm()` call (None: no limits, for tests of the host alone).
        `approve`: asked before every call of a `confirm` tool (Approvals.ask bound to the run).
        `journal`: records every call made by a step (None: calls are not recorded, for tests of the host alone).
        `record_mcp`: stores each MCP call's audit record."""
        self.toolset = toolset
        self.llm_helper = llm_helper
        self.timeout_s = timeout_s
        self.budget = budget
        self.approve = approve
        self.journal = journal
        self.record_mcp = record_mcp

    @property
    def names(self) -> list[str]:
        return self.toolset.trusted_names

    async def call(self, name: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
        mcp = self.toolset.mcp_host if "." in name else None
        if mcp is not None:
            await mcp.start()  # on a worker, the first call connects this process's servers
        if name not in self.names:  # e.g. a tool the conversation's settings disabled (agent_core/channel_settings.py)
            if mcp is not None:
                mcp.unavailable(name)  # or its server is down: say so
            raise PermissionError(f"{name} is not a tool this run may use")
        if name == "llm":
            prompt = kwargs.pop("prompt", args[0] if args else "")
            system = kwargs.pop("system", args[1] if len(args) > 1 else "")
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError("llm() needs a non-empty prompt string")
            if kwargs:
                raise TypeError(f"llm() got unexpected arguments {sorted(kwargs)}")
            system = str(system or "")

            async def ask() -> Any:
                if self.budget is not None:
                    self.budget.admit_helper(prompt, system)  # raises BudgetExceeded: nothing is sent
                return await asyncio.wait_for(self.llm_helper(prompt, system), self.timeout_s)

            return await self._journaled(name, [prompt, system], {}, ask, repeatable=True)
        if mcp is not None:
            mcp.check(name, args, kwargs)  # bad arguments: the step's ToolError, nobody asked to approve them
        function = None if mcp is not None else self.toolset.exact_function(name)
        confirm = self.toolset.needs_confirmation(name)
        if confirm and self.approve is None:
            raise PermissionError(f"{name} needs a person's approval, and nobody can be asked here")

        def admit() -> None:
            """The step's MCP call budget, only for a call that really goes out (not one answered from the
            journal) and before a person is asked (nobody approves a refused call)."""
            if mcp is not None and self.budget is not None:
                self.budget.admit_tool_call(name)

        async def approve() -> None:
            admit()
            await self.approve(name, list(args), dict(kwargs))  # its time is not the tool's timeout

        async def run() -> Any:
            if not confirm:
                admit()
            if mcp is not None:
                return await mcp.call(name, args, kwargs, self.timeout_s, self.record_mcp)
            assert function is not None
            try:
                value = await asyncio.wait_for(asyncio.to_thread(function, *args, **kwargs), self.timeout_s)
            except TimeoutError:
                raise TimeoutError(f"{name} did not return within {self.timeout_s:g}s") from None
            return _to_json(value)

        return await self._journaled(name, list(args), dict(kwargs), run, before=approve if confirm else None)

    async def _journaled(self, name: str, args: list[Any], kwargs: dict[str, Any], invoke: Any,
                         repeatable: bool = False, before: Any = None) -> Any:
        """The one place every trusted call passes through. `before` (an approval) runs only when the call is not
        already recorded as made; `repeatable` calls (no side effect outside) are made again when unfinished."""
        step = CURRENT_STEP.get()
        if self.journal is None or step is None:
            if before is not None:
                await before()
            return await invoke()
        key = CallKey(self.journal.run_id, step.iteration, step.step, next(step.numbers))
        digest = call_digest(name, args, kwargs)
        if before is not None:
            # A call recorded as made answers from the record, without asking the person again; otherwise the
            # approval comes first, and the call is recorded as started only once approved (a wait that ends with
            # a lost worker did not call the tool).
            found = await self.journal.begin(key, name, digest, "peek")
            if found.status == "go":
                await before()
        found = await self.journal.begin(key, name, digest)
        if found.status == "unknown" and repeatable:
            found = await self.journal.begin(key, name, digest, "retake")
        if found.status == "different" and repeatable:
            return await invoke()  # not recorded (its number holds another call); it changes nothing outside
        if found.status == "done":
            return found.value
        if found.status == "failed":
            raise replayed_failure(found.error)
        if found.status == "unknown":
            raise CallUncertain(
                f"{name} may or may not have run: this step called it before, on a worker that was lost before "
                f"it reported back, so it is not called again (check whether it took effect before asking again)")
        if found.status == "different":
            raise CallUncertain(
                f"{name} was not called: when this step ran before, its call number {key.number} was "
                f"{found.tool or 'another call'} with other arguments; a step that runs again must make the same "
                f"calls, or a side effect could happen twice")
        try:
            value = await invoke()
        except asyncio.CancelledError:
            raise  # the step was killed during the call: it stays `started` (may or may not have run)
        except Exception as exc:
            # Under the name the step catches it by (ToolError, ToolDenied: agent_core/sandbox/pool.py), so that a
            # replay fails the same way.
            name_in_step = getattr(exc, "raised_in_step_as", None) or type(exc).__name__
            await self.journal.finish(key, False, None, f"{name_in_step}: {exc}")
            raise
        await self.journal.finish(key, True, value, "")
        return value
