"""The trusted tool host: answers the calls sandboxed code makes to exact tools and the LLM helper.

It runs in the server process, which holds the operator's secrets and the LLM key; the sandbox only ever
sees JSON arguments going out and JSON results coming back. Each `llm()` call must first be admitted by the run's
budget (calls per step, prompt size, run and daily tokens): a refusal is the step's exception.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Awaitable, Callable

from agent_core.budget import RunBudget
from tools.registry import ToolSet

LLMHelper = Callable[[str, str], Awaitable[str]]


def _to_json(value: Any) -> Any:
    """Round-trip through JSON so only plain data goes back to the sandbox."""
    return json.loads(json.dumps(value, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v)))


class ToolHost:
    def __init__(self, toolset: ToolSet, llm_helper: LLMHelper, timeout_s: float, budget: RunBudget | None = None):
        """`budget`: the run's, asked before every `llm()` call (None: no limits, for tests of the host alone)."""
        self.toolset = toolset
        self.llm_helper = llm_helper
        self.timeout_s = timeout_s
        self.budget = budget

    @property
    def names(self) -> list[str]:
        return self.toolset.trusted_names

    async def call(self, name: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
        if name == "llm":
            prompt = kwargs.pop("prompt", args[0] if args else "")
            system = kwargs.pop("system", args[1] if len(args) > 1 else "")
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError("llm() needs a non-empty prompt string")
            if kwargs:
                raise TypeError(f"llm() got unexpected arguments {sorted(kwargs)}")
            system = str(system or "")
            if self.budget is not None:
                self.budget.admit_helper(prompt, system)  # raises BudgetExceeded: nothing is sent
            return await asyncio.wait_for(self.llm_helper(prompt, system), self.timeout_s)
        function = self.toolset.exact_function(name)
        try:
            value = await asyncio.wait_for(asyncio.to_thread(function, *args, **kwargs), self.timeout_s)
        except TimeoutError:
            raise TimeoutError(f"{name} did not return within {self.timeout_s:g}s") from None
        return _to_json(value)
