"""How much LLM use a run may make, and the one place that decides whether its next LLM call may go ahead.

A run has these limits (`BudgetLimits`): tokens per run (AUTOCODE_MAX_TOKENS_PER_RUN), tokens per user per day
(AUTOCODE_DAILY_TOKENS_PER_USER, all of the user's runs of the last 24 hours), `llm()` helper calls per step
(AUTOCODE_LLM_CALLS_PER_STEP), the size of one helper prompt (AUTOCODE_LLM_PROMPT_MAX_CHARS), and two budgets in
money per calendar month (UTC), priced by agent_core/pricing.py: the user's (AUTOCODE_MONTHLY_BUDGET_PER_USER) and
the channel's or chat's (its `budget` setting, agent_core/channel_settings.py). A `RunBudget` holds them with the
run's usage and answers two questions:

- `admit_helper`: may this `llm()` call from a step go ahead? Asked before every helper call, by the tool host
  on `serve` and on a remote worker alike. A refusal raises `BudgetExceeded`, which the step's code sees as an
  exception (and may catch).
- `check_run_call`: may the run make its next LLM call of its own (planner, evaluator)? A refusal stops the run.

On `serve` the usage is read from the database at each question (`StoredUsage`), so it counts every recorded call
of the run, and of the user's other runs for the daily budget. A remote worker gets the usage at the job's start
(`snapshot`) and adds the tokens (and their cost) of the helper calls it makes (`CountedUsage`).

A new run is refused at submission when a money budget is spent already (`money_refusal`, asked by the scheduler
like the daily token budget); `monthly_status` is what a user's or channel's month looks like against its budget.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timedelta, timezone
from typing import Any, Protocol

from agent_core.config import Settings
from agent_core.llm import LLMError
from agent_core.pricing import (
    Price, PriceTable, Spend, format_usd, iso, month_start, next_month_start, prices_for, spend,
)
from storage.db import Storage

log = logging.getLogger(__name__)

CHARS_PER_TOKEN = 4  # a helper call's prompt is estimated at this many characters a token before it is sent
DAILY_WINDOW = timedelta(days=1)


class BudgetExceeded(LLMError):
    """An LLM call was refused because it would go past one of the run's limits; the message names the limit."""


@dataclass(frozen=True)
class BudgetLimits:
    """A run's limits; 0 for a token limit or a budget means none."""

    run_tokens: int = 0
    daily_tokens: int = 0
    calls_per_step: int = 20
    mcp_calls_per_step: int = 50  # calls of MCP tools (tools/mcp_host.py) one step may make
    prompt_max_chars: int = 20_000
    user_month_usd: float = 0.0  # the user's budget for this calendar month
    scope_month_usd: float = 0.0  # the channel's or chat's budget for this calendar month

    @classmethod
    def from_settings(cls, settings: Settings, user: str = "", scope_month_usd: float | None = None) -> "BudgetLimits":
        """The limits of a run of `user` (runs without a user, e.g. `autocode run`, have no daily or monthly user
        budget) in a scope whose monthly budget is `scope_month_usd` (None: none)."""
        return cls(
            run_tokens=settings.max_tokens_per_run,
            daily_tokens=settings.daily_tokens_per_user if user else 0,
            calls_per_step=settings.llm_calls_per_step,
            mcp_calls_per_step=settings.mcp_calls_per_step,
            prompt_max_chars=settings.llm_prompt_max_chars,
            user_month_usd=settings.monthly_budget_per_user if user else 0.0,
            scope_month_usd=scope_month_usd or 0.0,
        )

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "BudgetLimits":
        """Limits as a snapshot carries them; fields this version does not know are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class Usage(Protocol):
    """Use so far: the run's tokens, its user's in the last 24 hours, and what its user and its scope spent in money
    this calendar month."""

    def run_tokens(self) -> int: ...

    def daily_tokens(self) -> int: ...

    def user_month_usd(self) -> float: ...

    def scope_month_usd(self) -> float: ...


def daily_since(moment: datetime | None = None) -> str:
    """The start of the daily budget's window (ISO time, comparable with the stored `started_at`)."""
    return ((moment or datetime.now(timezone.utc)) - DAILY_WINDOW).isoformat(timespec="milliseconds")


def daily_tokens_used(storage: Storage, user: str) -> int:
    """Tokens of all of `user`'s runs in the last 24 hours."""
    usage = storage.tokens_used(user=user, since=daily_since())
    return usage["prompt_tokens"] + usage["completion_tokens"]


def month_spend(storage: Storage, prices: PriceTable, *, user: str | None = None, scope: str | None = None,
                moment: datetime | None = None) -> Spend:
    """What `user`'s runs, or the runs of `scope`, cost in the calendar month (UTC) of `moment` (default: now)."""
    start = month_start(moment)
    return spend(storage, prices, user=user, scope=scope, since=iso(start), until=iso(next_month_start(start)))


class StoredUsage:
    """Usage read from the database at each question: every recorded call counts, however it was made."""

    def __init__(self, storage: Storage, run_id: str, user: str, scope: str = "", prices: PriceTable | None = None):
        self.storage = storage
        self.run_id = run_id
        self.user = user
        self.scope = scope
        self.prices = prices or PriceTable({})

    def run_tokens(self) -> int:
        usage = self.storage.usage(self.run_id)
        return usage["prompt_tokens"] + usage["completion_tokens"]

    def daily_tokens(self) -> int:
        return daily_tokens_used(self.storage, self.user) if self.user else 0

    def user_month_usd(self) -> float:
        return month_spend(self.storage, self.prices, user=self.user).usd if self.user else 0.0

    def scope_month_usd(self) -> float:
        return month_spend(self.storage, self.prices, scope=self.scope).usd if self.scope else 0.0


class CountedUsage:
    """Usage known at a job's start plus what this process spent since (a remote worker's view)."""

    def __init__(self, run_tokens: int = 0, daily_tokens: int = 0, user_month_usd: float = 0.0,
                 scope_month_usd: float = 0.0):
        self._run = run_tokens
        self._daily = daily_tokens
        self._user_usd = user_month_usd
        self._scope_usd = scope_month_usd

    def add(self, tokens: int, usd: float = 0.0) -> None:
        self._run += tokens
        self._daily += tokens
        self._user_usd += usd
        self._scope_usd += usd

    def run_tokens(self) -> int:
        return self._run

    def daily_tokens(self) -> int:
        return self._daily

    def user_month_usd(self) -> float:
        return self._user_usd

    def scope_month_usd(self) -> float:
        return self._scope_usd


def estimate_tokens(chars: int) -> int:
    return math.ceil(chars / CHARS_PER_TOKEN)


class RunBudget:
    """One run's limits and usage, and the count of `llm()` calls of its current step."""

    def __init__(self, limits: BudgetLimits, usage: Usage, run_id: str = "", price: Price | None = None):
        """`price`: the run's model's (None: no price), to estimate a helper call's cost before it is sent."""
        self.limits = limits
        self.usage = usage
        self.run_id = run_id  # for log lines
        self.price = price
        self.step_calls = 0
        self.step_tool_calls = 0  # MCP tool calls of the current step
        self._refusal_logged = False

    @classmethod
    def for_run(cls, settings: Settings, storage: Storage, run_id: str) -> "RunBudget":
        """The budget of a stored run, its usage read from `storage`; the scope's budget and the model are the
        run's stored settings (agent_core/channel_settings.py, written when the run starts)."""
        run = storage.get_run(run_id) or {}
        user = run.get("user") or ""
        stored = json.loads(run.get("settings_json") or "{}")
        prices = prices_for(settings)
        limits = BudgetLimits.from_settings(settings, user, stored.get("budget_usd"))
        usage = StoredUsage(storage, run_id, user, run.get("scope") or "", prices)
        return cls(limits, usage, run_id, prices.price_of(stored.get("model") or settings.model))

    def snapshot(self) -> dict[str, Any]:
        """Limits and usage now, as JSON: what a remote job carries."""
        return {"limits": asdict(self.limits), "run_tokens": self._run_tokens(),
                "daily_tokens": self._daily_tokens(),
                "user_month_usd": self.usage.user_month_usd() if self.limits.user_month_usd else 0.0,
                "scope_month_usd": self.usage.scope_month_usd() if self.limits.scope_month_usd else 0.0,
                "price": asdict(self.price) if self.price else None}

    @classmethod
    def from_snapshot(cls, data: dict[str, Any], run_id: str = "") -> "RunBudget":
        """A worker's budget for one job: the snapshot's usage plus what the worker adds to it."""
        usage = CountedUsage(int(data["run_tokens"]), int(data["daily_tokens"]),
                             float(data.get("user_month_usd") or 0), float(data.get("scope_month_usd") or 0))
        price = Price(**data["price"]) if data.get("price") else None
        return cls(BudgetLimits.from_json(data["limits"]), usage, run_id, price)

    def call_cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        """USD of a call of the run's model (0 without a price)."""
        return self.price.cost(prompt_tokens, completion_tokens) if self.price else 0.0

    def spent(self, tokens: int, usd: float = 0.0) -> None:
        """Tokens (and their cost, `call_cost`) of a call made here that the usage does not see by itself (a
        worker's `CountedUsage`; the database sees every call recorded on `serve`)."""
        if isinstance(self.usage, CountedUsage):
            self.usage.add(tokens, usd)

    def new_step(self) -> None:
        """A step starts: its `llm()` calls are counted from zero."""
        self.step_calls = 0
        self.step_tool_calls = 0
        self._refusal_logged = False

    def admit_tool_call(self, name: str) -> None:
        """Count one MCP tool call of the current step, or raise `BudgetExceeded` past AUTOCODE_MCP_CALLS_PER_STEP."""
        if self.step_tool_calls >= self.limits.mcp_calls_per_step:
            raise BudgetExceeded(f"This step already made {self.step_tool_calls} MCP tool calls, the most one step "
                                 f"may make (AUTOCODE_MCP_CALLS_PER_STEP); {name} was not called.")
        self.step_tool_calls += 1

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
        cost = self.call_cost(estimate, 0)
        if limits.user_month_usd:
            spent = self.usage.user_month_usd()
            if spent + cost > limits.user_month_usd or spent >= limits.user_month_usd:
                raise BudgetExceeded(f"llm(): the user has spent {format_usd(spent)} of their "
                                     f"{format_usd(limits.user_month_usd)} LLM budget for this month "
                                     "(AUTOCODE_MONTHLY_BUDGET_PER_USER)")
        if limits.scope_month_usd:
            spent = self.usage.scope_month_usd()
            if spent + cost > limits.scope_month_usd or spent >= limits.scope_month_usd:
                raise BudgetExceeded(f"llm(): this channel has spent {format_usd(spent)} of its "
                                     f"{format_usd(limits.scope_month_usd)} LLM budget for this month")

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
        if limits.user_month_usd:
            spent = self.usage.user_month_usd()
            if spent >= limits.user_month_usd:
                raise BudgetExceeded(f"Stopped: {user_over_budget(spent, limits.user_month_usd)}")
        if limits.scope_month_usd:
            spent = self.usage.scope_month_usd()
            if spent >= limits.scope_month_usd:
                raise BudgetExceeded(f"Stopped: {scope_over_budget(spent, limits.scope_month_usd)}")

    def _run_tokens(self) -> int:
        return self.usage.run_tokens() if self.limits.run_tokens else 0

    def _daily_tokens(self) -> int:
        return self.usage.daily_tokens() if self.limits.daily_tokens else 0


# --- money budgets at submission, and a month's status (App Home, /usage) -----------------------------------------
def _renews() -> str:
    return next_month_start().date().isoformat()


def user_over_budget(spent: float, budget: float) -> str:
    return (f"you have spent {format_usd(spent)} of your {format_usd(budget)} LLM budget for this month "
            f"(AUTOCODE_MONTHLY_BUDGET_PER_USER); it renews on {_renews()}.")


def scope_over_budget(spent: float, budget: float) -> str:
    return (f"this channel has spent {format_usd(spent)} of its {format_usd(budget)} LLM budget for this month "
            f"(its settings); it renews on {_renews()}.")


def money_refusal(storage: Storage, settings: Settings, *, user: str, scope: str,
                  scope_budget_usd: float | None) -> str | None:
    """Why a new run of `user` in `scope` may not start (a monthly money budget is spent), or None."""
    prices = prices_for(settings)
    if user and settings.monthly_budget_per_user:
        spent = month_spend(storage, prices, user=user).usd
        if spent >= settings.monthly_budget_per_user:
            message = user_over_budget(spent, settings.monthly_budget_per_user)
            return message[0].upper() + message[1:]
    if scope and scope_budget_usd:
        spent = month_spend(storage, prices, scope=scope).usd
        if spent >= scope_budget_usd:
            message = scope_over_budget(spent, scope_budget_usd)
            return message[0].upper() + message[1:]
    return None


@dataclass(frozen=True)
class MonthlyStatus:
    """A user's or a scope's spend this calendar month against its budget (None: no budget)."""

    spend: Spend
    budget_usd: float | None
    renews_on: str  # ISO date: the first day of next month (UTC)

    @property
    def exceeded(self) -> bool:
        return self.budget_usd is not None and self.spend.usd >= self.budget_usd

    @property
    def remaining_usd(self) -> float | None:
        return None if self.budget_usd is None else max(0.0, self.budget_usd - self.spend.usd)

    def describe(self) -> str:
        """E.g. "$1.2300 of $5.00 this month (renews 2027-01-01)" or "$0.0042 this month (no budget)"."""
        spent = self.spend.describe()
        if self.budget_usd is None:
            return f"{spent} this month (no budget)"
        return f"{spent} of {format_usd(self.budget_usd)} this month (renews {self.renews_on})"

    def to_json(self) -> dict[str, Any]:
        return {**self.spend.to_json(), "budget_usd": self.budget_usd, "remaining_usd": self.remaining_usd,
                "exceeded": self.exceeded, "renews_on": self.renews_on}


def monthly_status(storage: Storage, settings: Settings, *, user: str | None = None, scope: str | None = None,
                   budget_usd: float | None = None) -> MonthlyStatus:
    """This month of `user` (budget AUTOCODE_MONTHLY_BUDGET_PER_USER) or of `scope` (budget `budget_usd`, its
    setting)."""
    if user is not None:
        budget_usd = settings.monthly_budget_per_user or None
    spent = month_spend(storage, prices_for(settings), user=user, scope=scope)
    return MonthlyStatus(spent, budget_usd or None, _renews())


__all__ = [
    "BudgetExceeded", "BudgetLimits", "CountedUsage", "MonthlyStatus", "RunBudget", "StoredUsage", "daily_since",
    "daily_tokens_used", "estimate_tokens", "money_refusal", "month_spend", "monthly_status",
]
