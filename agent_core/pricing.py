"""Cost in money: a price table per model turns the stored token counts into USD.

The table gives USD per 1M prompt and per 1M completion tokens of each model. It is a TOML file the operator can
edit: the shipped agent_core/prices.toml (OpenAI's list prices, the file says from where and when), or the file
AUTOCODE_PRICES_FILE names, which replaces it. A model without an entry (a local model of Ollama or llama.cpp,
another provider's) costs 0 and is reported as having *no price*, so a total never looks complete when it is not.

Costs are computed from the stored LLM calls (storage/db.py `llm_calls`: each call's model and tokens; every call of
a run is sent with the run's model, agent_core/channel_settings.py), so they can be asked per run, user, scope (a
channel or chat) and month (`spend`), and budgets in money compare against them (agent_core/budget.py).
"""

from __future__ import annotations

import logging
import math
import re
import threading
import tomllib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

from agent_core.config import ConfigError, Settings
from storage.db import Storage

log = logging.getLogger(__name__)

DEFAULT_PRICES_FILE = Path(__file__).with_name("prices.toml")
PER_TOKENS = 1_000_000  # prices are per this many tokens
_DATED_SNAPSHOT = re.compile(r"-\d{4}-\d{2}-\d{2}$")  # gpt-4o-2024-08-06 is priced as gpt-4o


@dataclass(frozen=True)
class Price:
    """USD per 1M prompt tokens and per 1M completion tokens of one model."""

    prompt: float
    completion: float

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.prompt + completion_tokens * self.completion) / PER_TOKENS


class PriceTable:
    """Prices by model name; `price_of` answers None for a model without a price (it costs 0)."""

    def __init__(self, prices: Mapping[str, Price], source: str = ""):
        self.prices = dict(prices)
        self.source = source

    @classmethod
    def parse(cls, text: str, source: str) -> "PriceTable":
        """A table from the text of a prices file; ConfigError naming `source` and the bad entry otherwise."""
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"price table {source} is not valid TOML: {exc}") from None
        models = data.get("models")
        if not isinstance(models, dict):
            raise ConfigError(f'price table {source} needs a [models] table: "model" = {{ prompt = 2.5, '
                              "completion = 10.0 }} (USD per 1M tokens)")
        prices: dict[str, Price] = {}
        for name, entry in models.items():
            if not isinstance(entry, dict) or set(entry) != {"prompt", "completion"}:
                raise ConfigError(f"price table {source}: {name!r} needs exactly prompt and completion "
                                  "(USD per 1M tokens)")
            values = [entry["prompt"], entry["completion"]]
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
                       for v in values):
                raise ConfigError(f"price table {source}: the prices of {name!r} must be numbers of 0 or more")
            prices[name.strip()] = Price(float(values[0]), float(values[1]))
        return cls(prices, source)

    @classmethod
    def load(cls, path: Path) -> "PriceTable":
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read the price table {path} (AUTOCODE_PRICES_FILE): "
                              f"{exc.strerror or exc}") from None
        return cls.parse(text, str(path))

    def price_of(self, model: str) -> Price | None:
        """The model's price: its own entry, else its base name's for a dated snapshot; None: no price."""
        model = (model or "").strip()
        found = self.prices.get(model)
        if found is None and _DATED_SNAPSHOT.search(model):
            found = self.prices.get(_DATED_SNAPSHOT.sub("", model))
        return found

    def cost(self, model: str, prompt_tokens: int, completion_tokens: int) -> float:
        """USD of these tokens of `model` (0 when it has no price)."""
        price = self.price_of(model)
        return price.cost(prompt_tokens, completion_tokens) if price else 0.0


class _Loaded:
    """The table of one file, read again when the file changes (a broken edit keeps the last good table)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tables: dict[Path, tuple[int, PriceTable]] = {}

    def get(self, path: Path) -> PriceTable:
        try:
            stamp = path.stat().st_mtime_ns
        except OSError:
            stamp = -1
        with self._lock:
            known = self._tables.get(path)
            if known is not None and known[0] == stamp:
                return known[1]
            try:
                table = PriceTable.load(path)
            except ConfigError:
                if known is None:
                    raise
                log.exception("price table %s changed and cannot be used; keeping the previous one", path)
                return known[1]
            self._tables[path] = (stamp, table)
            return table


_loaded = _Loaded()


def prices_for(settings: Settings) -> PriceTable:
    """The operator's price table (AUTOCODE_PRICES_FILE, else the shipped agent_core/prices.toml). Raises
    ConfigError when it cannot be read or parsed the first time."""
    return _loaded.get(settings.prices_file or DEFAULT_PRICES_FILE)


@dataclass(frozen=True)
class ModelSpend:
    """One model's share of a spend."""

    model: str
    llm_calls: int
    prompt_tokens: int
    completion_tokens: int
    usd: float
    priced: bool  # False: the model has no price, its tokens count as 0


@dataclass(frozen=True)
class Spend:
    """The LLM use of some runs in money, by model."""

    by_model: tuple[ModelSpend, ...] = ()

    @property
    def usd(self) -> float:
        return sum(m.usd for m in self.by_model)

    @property
    def llm_calls(self) -> int:
        return sum(m.llm_calls for m in self.by_model)

    @property
    def prompt_tokens(self) -> int:
        return sum(m.prompt_tokens for m in self.by_model)

    @property
    def completion_tokens(self) -> int:
        return sum(m.completion_tokens for m in self.by_model)

    @property
    def unpriced_models(self) -> list[str]:
        """Models used without a price (counted as 0): a total with these is not the whole cost."""
        return [m.model for m in self.by_model if not m.priced and (m.prompt_tokens or m.completion_tokens)]

    def describe(self) -> str:
        """E.g. "$0.0123", "$0.0123 (no price: llama3.1:8b)" or "no price (qwen2.5-coder:7b)"."""
        unpriced = self.unpriced_models
        if unpriced and not any(m.priced for m in self.by_model):
            return f"no price ({', '.join(unpriced)})"
        text = format_usd(self.usd)
        return f"{text} (no price: {', '.join(unpriced)})" if unpriced else text

    def to_json(self) -> dict[str, Any]:
        return {"cost_usd": round(self.usd, 6), "no_price_models": self.unpriced_models,
                "by_model": [{"model": m.model, "llm_calls": m.llm_calls, "prompt_tokens": m.prompt_tokens,
                              "completion_tokens": m.completion_tokens, "cost_usd": round(m.usd, 6),
                              "priced": m.priced} for m in self.by_model]}


def spend_of_rows(rows: list[dict[str, Any]], prices: PriceTable) -> Spend:
    """Price rows of `Storage.tokens_by_model` (model, llm_calls, prompt_tokens, completion_tokens)."""
    return Spend(tuple(
        ModelSpend(row["model"], int(row["llm_calls"]), int(row["prompt_tokens"]), int(row["completion_tokens"]),
                   prices.cost(row["model"], int(row["prompt_tokens"]), int(row["completion_tokens"])),
                   prices.price_of(row["model"]) is not None)
        for row in rows))


def spend(storage: Storage, prices: PriceTable, *, run_id: str | None = None, user: str | None = None,
          conversation: str | None = None, scope: str | None = None, since: str | None = None,
          until: str | None = None) -> Spend:
    """What the matching runs' LLM calls cost (the calls made in [since, until) when given, ISO times)."""
    return spend_of_rows(storage.tokens_by_model(run_id=run_id, user=user, conversation=conversation, scope=scope,
                                                 since=since, until=until), prices)


def spend_by(storage: Storage, prices: PriceTable, group_by: str, *, since: str | None = None,
             until: str | None = None) -> dict[str, Spend]:
    """Spend per user, scope or conversation (`group_by`), most expensive first."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for row in storage.tokens_by_model(since=since, until=until, group_by=group_by):
        grouped.setdefault(row["grp"], []).append(row)
    spends = {key: spend_of_rows(rows, prices) for key, rows in grouped.items()}
    return dict(sorted(spends.items(), key=lambda item: (-item[1].usd, -item[1].prompt_tokens, item[0])))


# --- months (budgets are per calendar month, UTC) ----------------------------------------------------------------
def month_start(moment: datetime | None = None) -> datetime:
    moment = moment or datetime.now(timezone.utc)
    return moment.astimezone(timezone.utc).replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def next_month_start(moment: datetime | None = None) -> datetime:
    start = month_start(moment)
    return start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)


def iso(moment: datetime) -> str:
    """An ISO time comparable with the stored `started_at` of LLM calls."""
    return moment.isoformat(timespec="milliseconds")


def month_bounds(month: str | None = None) -> tuple[str, str]:
    """[since, until) of a calendar month "YYYY-MM" (None: this month) as ISO times; ValueError for a bad month."""
    if month:
        try:
            start = datetime.strptime(month.strip(), "%Y-%m").replace(tzinfo=timezone.utc)
        except ValueError:
            raise ValueError(f"a month is written YYYY-MM, e.g. 2026-03, not {month!r}") from None
    else:
        start = month_start()
    return iso(start), iso(next_month_start(start))


def format_usd(amount: float) -> str:
    """Money for people: "$0.00", "$12.35", and below a dollar up to 4 decimals, since a run often costs
    fractions of a cent: "$0.0042", "$0.027", "$0.50"."""
    if amount <= 0:
        return "$0.00"
    if amount < 0.0001:
        return "<$0.0001"
    if amount >= 1:
        return f"${amount:,.2f}"
    digits = f"{amount:.4f}".rstrip("0")
    return "$" + (digits if len(digits.split(".")[1]) >= 2 else f"{amount:.2f}")


__all__ = [
    "DEFAULT_PRICES_FILE", "ModelSpend", "Price", "PriceTable", "Spend", "format_usd", "iso", "month_bounds",
    "month_start", "next_month_start", "prices_for", "spend", "spend_by", "spend_of_rows",
]
