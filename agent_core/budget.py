"""How much LLM use a run may make, and the one place that decides whether its next LLM call may go ahead.

A run has four limits (`BudgetLimits`): tokens per run (AUTOCODE_MAX_TOKENS_PER_RUN), tokens per user per day
(AUTOCODE_DAILY_TOKENS_PER_USER, all of the user's runs of the last 24 hours), `llm()` helper calls per step
(AUTOCODE_LLM_CALLS_PER_STEP) and the size of one helper prompt (AUTOCODE_LLM_PROMPT_MAX_CHARS). A `RunBudget`
holds them with the run's usage and answers two questions:

- `admit_helper`: may this `llm()` call from a step go ahead? Asked before every helper call, by the tool host
  on `serve` and on a remote worker alike. A refusal raises `BudgetExceeded`, which the step's code sees as an
  exception (and may catch).
- `check_run_call`: may the run make its next LLM call of its own (planner, evaluator)? A refusal stops the run.

On `serve` the usage is read from the database at each question (`StoredUsage`), so it counts every recorded call
of the run, and of the user's other runs for the daily budget. A remote worker gets the usage at the job's start
(`snapshot`) and adds the tokens of the helper calls it makes (`CountedUsage`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Protocol

from agent_core.config import Settings
from agent_core.llm import LLMError
from storage.db import Storage

log = logging.getLogger(__name__)

CHARS_PER_TOKEN = 4  # a helper call's prompt is estimated at this many characters a token before it is sent
DAILY_WINDOW = timedelta(days=1)


class BudgetExceeded(LLMError):
    """An LLM call was refused because it would go past one of the run's limits; the message names the limit."""


@dataclass(frozen=True)
class BudgetLimits:
    """A run's limits; 0 for a token limit means none."""

    run_tokens: int = 0
    daily_tokens: int = 0
    calls_per_step: int = 20
    prompt_max_chars: int = 20_000

    @classmethod
    def from_settings(cls, settings: Settings, user: str = "") -> "BudgetLimits":
        """The limits of a run of `user` (runs without a user, e.g. `autocode run`, have no daily budget)."""
        return cls(
            run_tokens=settings.max_tokens_per_run,
            daily_tokens=settings.daily_tokens_per_user if user else 0,
            calls_per_step=settings.llm_calls_per_step,
            prompt_max_chars=settings.llm_prompt_max_chars,
        )


class Usage(Protocol):
    """Tokens used so far: by the run, and by its user in the last 24 hours."""

    def run_tokens(self) -> int: ...

    def daily_tokens(self) -> int: ...


def daily_since(moment: datetime | None = None) -> str:
    """The start of the daily budget's window (ISO time, comparable with the stored `started_at`)."""
    return ((moment or datetime.now(timezone.utc)) - DAILY_WINDOW).isoformat(timespec="milliseconds")


def daily_tokens_used(storage: Storage, user: str) -> int:
    """Tokens of all of `user`'s runs in the last 24 hours."""
    usage = storage.tokens_used(user=user, since=daily_since())
    return usage["prompt_tokens"] + usage["completion_tokens"]


class StoredUsage:
    """Usage read from the database at each question: every recorded call counts, however it was made."""

    def __init__(self, storage: Storage, run_id: str, user: str):
        self.storage = storage
        self.run_id = run_id
        self.user = user

    def run_tokens(self) -> int:
        usage = self.storage.usage(self.run_id)
        return usage["prompt_tokens"] + usage["completion_tokens"]

    def daily_tokens(self) -> int:
        return daily_tokens_used(self.storage, self.user) if self.user else 0


class CountedUsage:
    """Usage known at a job's start plus what this process spent since (a remote worker's view)."""

    def __init__(self, run_tokens: int = 0, daily_tokens: int = 0):
        self._run = run_tokens
        self._daily = daily_tokens

    def add(self, tokens: int) -> None:
        self._run += tokens
        self._daily += tokens

    def run_tokens(self) -> int:
        return self._run

    def daily_tokens(self) -> int:
        return self._daily


def estimate_tokens(chars: int) -> int:
    return math.ceil(chars / CHARS_PER_TOKEN)


class RunBudget:
    """One run's limits and usage, and the count of `llm()` calls of its current step."""

    def __init__(self, limits: BudgetLimits, usage: Usage, run_id: str = ""):
        self.limits = limits
        self.usage = usage
        self.run_id = run_id  # for log lines
        self.step_calls = 0
        self._refusal_logged = False

    @classmethod
    def for_run(cls, settings: Settings, storage: Storage, run_id: str) -> "RunBudget":
        """The budget of a stored run, its usage read from `storage`."""
        user = (storage.get_run(run_id) or {}).get("user") or ""
        return cls(BudgetLimits.from_settings(settings, user), StoredUsage(storage, run_id, user), run_id)

    def snapshot(self) -> dict[str, Any]:
        """Limits and usage now, as JSON: what a remote job carries."""
        return {"limits": asdict(self.limits), "run_tokens": self._run_tokens(),
                "daily_tokens": self._daily_tokens()}

    @classmethod
    def from_snapshot(cls, data: dict[str, Any], run_id: str = "") -> "RunBudget":
        """A worker's budget for one job: the snapshot's usage plus what the worker adds to it."""
        usage = CountedUsage(int(data["run_tokens"]), int(data["daily_tokens"]))
        return cls(BudgetLimits(**data["limits"]), usage, run_id)

    def spent(self, tokens: int) -> None:
        """Tokens of a call made here that the usage does not see by itself (a worker's `CountedUsage`; the
        database sees every call recorded on `serve`)."""
        if isinstance(self.usage, CountedUsage):
            self.usage.add(tokens)

    def new_step(self) -> None:
        """A step starts: its `llm()` calls are counted from zero."""
        self.step_calls = 0
        self._refusal_logged = False

    def admit_helper(self, prompt: str, system: str) -> None:
        """Count one `llm()` call of the current step, or raise `BudgetExceeded` naming the limit it would break.

        The call's prompt tokens are estimated from its characters; its reply's are known only afterwards, so a
        call admitted just under a token limit can end a little past it (the run's next own call is then refused).
        """
        try:
            self._admit(len(prompt) + len(system))
        except BudgetExceeded as refusal:
            if not self._refusal_logged:  # once per step: a step in a loop would flood the log
                log.warning("run %s: %s", self.run_id or "?", refusal)
                self._refusal_logged = True
            raise
        self.step_calls += 1

    def _admit(self, chars: int) -> None:
        limits = self.limits
        if self.step_calls >= limits.calls_per_step:
            raise BudgetExceeded(f"llm(): this step already made {self.step_calls} calls (AUTOCODE_LLM_CALLS_PER_STEP)")
        if chars > limits.prompt_max_chars:
            raise BudgetExceeded(f"llm(): the prompt and system text have {chars} characters, over the limit of "
                                 f"{limits.prompt_max_chars} (AUTOCODE_LLM_PROMPT_MAX_CHARS)")
        estimate = estimate_tokens(chars)
        if limits.run_tokens:
            used = self.usage.run_tokens()
            if used + estimate > limits.run_tokens:
                raise BudgetExceeded(f"llm(): the run has used {used} of its {limits.run_tokens} LLM tokens; this "
                                     f"call (~{estimate} tokens) would go past them (AUTOCODE_MAX_TOKENS_PER_RUN)")
        if limits.daily_tokens:
            used = self.usage.daily_tokens()
            if used + estimate > limits.daily_tokens:
                raise BudgetExceeded(f"llm(): the user has used {used} of their {limits.daily_tokens} LLM tokens for "
                                     f"today; this call (~{estimate} tokens) would go past them "
                                     "(AUTOCODE_DAILY_TOKENS_PER_USER)")

    def check_run_call(self) -> None:
        """Raise `BudgetExceeded` (which stops the run) when the run may not make another LLM call of its own."""
        limits = self.limits
        if limits.run_tokens:
            used = self.usage.run_tokens()
            if used >= limits.run_tokens:
                raise BudgetExceeded(
                    f"Stopped: the run used {used} LLM tokens, its limit is {limits.run_tokens} "
                    "(AUTOCODE_MAX_TOKENS_PER_RUN).")
        if limits.daily_tokens:
            used = self.usage.daily_tokens()
            if used >= limits.daily_tokens:
                raise BudgetExceeded(
                    f"Stopped: you have used {used} of your {limits.daily_tokens} LLM tokens for today "
                    "(AUTOCODE_DAILY_TOKENS_PER_USER); please try again tomorrow.")

    def _run_tokens(self) -> int:
        return self.usage.run_tokens() if self.limits.run_tokens else 0

    def _daily_tokens(self) -> int:
        return self.usage.daily_tokens() if self.limits.daily_tokens else 0


__all__ = [
    "BudgetExceeded", "BudgetLimits", "CountedUsage", "RunBudget", "StoredUsage", "daily_since", "daily_tokens_used",
    "estimate_tokens",
]
