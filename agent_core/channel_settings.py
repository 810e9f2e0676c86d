"""Settings per channel or chat: model, iterations, tools, sandbox network, a monthly budget and the channel's own
instructions (context for the planner and the evaluator: "revenue is in cents"), stored in SQLite.

A conversation's settings are those of its *scope* (`scope_of`): a Slack channel holds many threads (conversation
`slack:{team}:{channel}:{thread}` → scope `slack:{team}:{channel}`), a Telegram chat many topics
(`telegram:{chat}[:{topic}]` → `telegram:{chat}`); any other conversation is its own scope. A scope stores only
the values set for it (table `channel_settings`); the others are the operator's (`Settings`). What may be chosen is
the operator's too (`Choices`): a model of AUTOCODE_MODELS (and AUTOCODE_MODEL), 1 to MAX_ITERATIONS iterations,
tools by name from the operator's toolset, network on only when AUTOCODE_SANDBOX_NETWORK is on.

`ChannelSettings` is the API the CLI, the HTTP API and the chat adapters (Slack App Home, `/autocode settings`,
Telegram `/settings`) call: `effective(conversation)` / `effective_for_scope(scope)`, `set(scope, name, value)`
(validated: `SettingError` with a sentence for the user), `reset(scope[, name])`, `choices()`. The effective
settings apply to each run (agent_core/loop.py: the model of every LLM request, the iterations, the toolset) and
are stored with it (`runs.settings_json`, `run_settings`), so its log and cost use what it ran with.

Sandbox network: the executors set the sandbox's network for all runs (AUTOCODE_SANDBOX_NETWORK), not per run. So
`network on` is refused while the operator has it off, and `network off` is stored but, while the operator has it
on, not applied: the effective settings say so (`EffectiveSettings.network_applied`, and the text rendering).
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field, replace
from typing import Any

from agent_core.config import Settings
from storage.db import Storage
from tools.registry import ToolSet

log = logging.getLogger(__name__)

MAX_ITERATIONS = 10  # the most a channel may set (or AUTOCODE_MAX_ITERATIONS if higher, which is the default)
SETTING_NAMES = ("model", "max_iterations", "tools", "network", "budget", "instructions")
MAX_INSTRUCTIONS_CHARS = 2000  # a channel's own instructions: context, not a document
# Control characters other than newline, and the bidirectional overrides that make text read other than it is.
_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_ON = {"on", "true", "yes", "1", "enabled"}
_OFF = {"off", "false", "no", "0", "disabled"}
_NONE = {"none", "off", "no", "unlimited", "0", ""}


class SettingError(ValueError):
    """A setting that cannot be set: the message says why and what may be chosen, safe to show to users."""


def scope_of(conversation: str) -> str:
    """The scope whose settings apply to `conversation` (see the module's docstring)."""
    parts = conversation.split(":")
    if parts[0] == "slack" and len(parts) >= 4:
        return ":".join(parts[:3])
    if parts[0] == "telegram" and len(parts) >= 3:
        return ":".join(parts[:2])
    if parts[0] == "console" and len(parts) >= 2:  # `autocode run` without --conversation: console:run-…
        return "console"
    return conversation


# --- tools by name ---------------------------------------------------------------------------------------------------
def tool_names(toolset: ToolSet) -> list[str]:
    """The names a channel enables tools by: libraries and guides by their library names, exact tools and the
    `llm()` helper by their function names."""
    names: dict[str, None] = {}
    for tool in toolset.tools:
        if tool.kind == "mcp" and tool.mcp is not None:
            names[tool.mcp.name] = None  # an MCP server is enabled or disabled as a whole
        else:
            names.update(dict.fromkeys(tool.functions if tool.kind in ("exact", "llm") else tool.lib_names))
    return list(names)


def restrict_toolset(toolset: ToolSet, enabled: frozenset[str] | set[str] | None) -> ToolSet:
    """The tools of `toolset` named in `enabled` (None: all of them). A disabled library cannot be imported by a
    step, a disabled function is neither described to the planner nor answered by the tool host."""
    if enabled is None:
        return toolset
    kept = []
    for tool in toolset.tools:
        if tool.kind == "mcp":
            if tool.mcp is not None and tool.mcp.name in enabled:
                kept.append(tool)
        elif tool.kind in ("exact", "llm"):
            functions = {name: sig for name, sig in tool.functions.items() if name in enabled}
            if functions:
                kept.append(replace(tool, functions=functions))
        else:
            libs = [lib for lib in tool.lib_names if lib in enabled]
            if libs:
                kept.append(replace(tool, lib_names=libs))
    return ToolSet(kept, mcp_host=toolset.mcp_host)  # its own cache of callables: none of a disabled function


# --- what may be chosen, what applies ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Choices:
    """What a scope's settings may be set to (for menus: Slack App Home, Telegram /settings)."""

    models: tuple[str, ...]
    tools: tuple[str, ...]
    max_iterations: tuple[int, int]  # lowest, highest
    network_allowed: bool  # the operator's sandbox network is on

    def to_json(self) -> dict[str, Any]:
        return {"models": list(self.models), "tools": list(self.tools),
                "max_iterations": list(self.max_iterations), "network_allowed": self.network_allowed}


@dataclass(frozen=True)
class EffectiveSettings:
    """The settings a run of a scope gets: the scope's values where set (`overridden`), else the operator's."""

    scope: str
    model: str
    max_iterations: int
    tools: tuple[str, ...] | None  # enabled tool names; None: all of the operator's tools
    network: bool  # the scope's choice (off when the operator's network is off)
    network_applied: bool  # what the run's sandbox has: the operator's AUTOCODE_SANDBOX_NETWORK
    budget_usd: float | None  # the scope's monthly budget; None: none
    overridden: tuple[str, ...] = field(default=())
    instructions: str = ""  # the channel's own instructions (clean text, see `clean_instructions`); "": none

    def describe(self) -> str:
        """One line for logs and run pages, e.g. "model gpt-4o · 3 iterations · tools: all · network off ·
        budget $5.00/month"."""
        from agent_core.pricing import format_usd

        tools = "all" if self.tools is None else (", ".join(self.tools) or "none")
        network = "network on" if self.network else "network off"
        if self.network != self.network_applied:
            network += " (not applied: the sandbox's network is on for all runs)"
        budget = f"budget {format_usd(self.budget_usd)}/month" if self.budget_usd else "no budget"
        iterations = f"{self.max_iterations} iteration{'' if self.max_iterations == 1 else 's'}"
        parts = [f"model {self.model}", iterations, f"tools: {tools}", network, budget]
        if self.instructions:
            parts.append(f"instructions: {len(self.instructions):,} characters")
        return " · ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {"scope": self.scope, "model": self.model, "max_iterations": self.max_iterations,
                "tools": None if self.tools is None else list(self.tools), "network": self.network,
                "network_applied": self.network_applied, "budget_usd": self.budget_usd,
                "overridden": list(self.overridden), "instructions": self.instructions}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "EffectiveSettings":
        tools = data.get("tools")
        return cls(str(data.get("scope") or ""), str(data["model"]), int(data["max_iterations"]),
                   None if tools is None else tuple(tools), bool(data.get("network")),
                   bool(data.get("network_applied", data.get("network"))), data.get("budget_usd"),
                   tuple(data.get("overridden") or ()), clean_instructions(data.get("instructions") or ""))


def clean_instructions(text: str) -> str:
    """A channel's instructions as they may reach a prompt or a log: untrusted text without control characters
    (newlines kept, tabs as spaces, \\r\\n as \\n) or bidirectional overrides, trimmed, at most
    MAX_INSTRUCTIONS_CHARS characters."""
    text = str(text).replace("\r\n", "\n").replace("\r", "\n").replace("\t", " ")
    return _CONTROL.sub("", text).strip()[:MAX_INSTRUCTIONS_CHARS]


def run_settings(run: dict[str, Any] | None) -> EffectiveSettings | None:
    """The settings a stored run ran with (None for a run that has not started, or from before settings)."""
    if not run or not run.get("settings_json"):
        return None
    try:
        return EffectiveSettings.from_json(json.loads(run["settings_json"]))
    except (ValueError, KeyError, TypeError):
        log.warning("run %s: its stored settings are unreadable", run.get("id"))
        return None


class ChannelSettings:
    """Reads, validates and stores the settings of scopes; see the module's docstring."""

    def __init__(self, storage: Storage, settings: Settings, toolset: ToolSet):
        self.storage = storage
        self.settings = settings
        self.toolset = toolset

    def choices(self) -> Choices:
        highest = max(MAX_ITERATIONS, self.settings.max_iterations)
        return Choices(self.settings.allowed_models, tuple(tool_names(self.toolset)), (1, highest),
                       self.settings.sandbox_network)

    def effective(self, conversation: str) -> EffectiveSettings:
        """The settings a run in `conversation` gets now."""
        return self.effective_for_scope(scope_of(conversation))

    def effective_for_scope(self, scope: str) -> EffectiveSettings:
        stored = self.storage.channel_settings(scope)
        choices = self.choices()
        operator = self.settings
        kept: dict[str, Any] = {}
        for name, value in stored.items():  # a value the operator no longer offers falls back to the default
            try:
                kept[name] = self._checked(name, value, choices)
            except SettingError as exc:
                log.warning("settings of %s: ignoring %s: %s", scope, name, exc)
        tools = kept.get("tools")
        network = kept.get("network", operator.sandbox_network) and operator.sandbox_network
        return EffectiveSettings(
            scope=scope, model=kept.get("model", operator.model),
            max_iterations=kept.get("max_iterations", operator.max_iterations),
            tools=None if tools is None else tuple(tools), network=network,
            network_applied=operator.sandbox_network, budget_usd=kept.get("budget"),
            overridden=tuple(n for n in SETTING_NAMES if n in kept), instructions=kept.get("instructions", ""),
        )

    def set(self, scope: str, name: str, value: Any, by: str = "") -> EffectiveSettings:
        """Set one setting of `scope` from text ("gpt-4o", "5", "off", "$5", "numpy,llm", "-geocode") or a value
        of its type; returns the new effective settings. SettingError (nothing stored) for a bad name or value."""
        name = name.strip().lower().replace("-", "_")
        name = {"iterations": "max_iterations", "model_name": "model", "monthly_budget": "budget"}.get(name, name)
        if name not in SETTING_NAMES:
            raise SettingError(f"There is no setting {name!r}; the settings are {', '.join(SETTING_NAMES)}.")
        stored = self.storage.channel_settings(scope)
        parsed = self._parse(name, value, stored)
        if parsed is None:
            stored.pop(name, None)  # no budget, all tools: the defaults
        else:
            stored[name] = parsed
        self.storage.put_channel_settings(scope, stored, by)
        log.info("settings of %s: %s set to %r by %s", scope, name, parsed, by or "?")
        return self.effective_for_scope(scope)

    def reset(self, scope: str, name: str | None = None, by: str = "") -> EffectiveSettings:
        """Forget the scope's value of `name` (None: all of them): the operator's defaults apply again."""
        stored = self.storage.channel_settings(scope)
        if name is None:
            stored = {}
        else:
            key = name.strip().lower().replace("-", "_")
            if key not in SETTING_NAMES:
                raise SettingError(f"There is no setting {name!r}; the settings are {', '.join(SETTING_NAMES)}.")
            stored.pop(key, None)
        self.storage.put_channel_settings(scope, stored, by)
        return self.effective_for_scope(scope)

    def toolset_for(self, effective: EffectiveSettings) -> ToolSet:
        """The toolset a run with these settings may use."""
        return restrict_toolset(self.toolset, None if effective.tools is None else frozenset(effective.tools))

    # --- validation ------------------------------------------------------------------------------------------------
    def _parse(self, name: str, value: Any, stored: dict[str, Any]) -> Any:
        """The value to store for `name` (None: the default), from text or a typed value."""
        text = value.strip() if isinstance(value, str) else None
        if name == "tools" and text is not None:
            return self._parse_tools(text, stored.get("tools"))
        if name == "instructions" and text is not None and text.lower() in ("", "none"):
            return None
        if name == "budget" and text is not None:
            if text.lower() in _NONE:
                return None
            try:
                value = float(text.removeprefix("$").removesuffix("/month").strip())
            except ValueError:
                raise SettingError(f"The budget is an amount in USD per month, e.g. 5 or 12.50 (or none), not "
                                   f"{text!r}.") from None
        if name == "budget" and value is None:
            return None
        if name == "max_iterations" and text is not None:
            try:
                value = int(text)
            except ValueError:
                raise SettingError(f"max_iterations is a whole number from 1 to {MAX_ITERATIONS}, not "
                                   f"{text!r}.") from None
        if name == "network" and text is not None:
            if text.lower() not in _ON | _OFF:
                raise SettingError(f"network is on or off, not {text!r}.")
            value = text.lower() in _ON
        return self._checked(name, value, self.choices())

    def _parse_tools(self, text: str, current: list[str] | None) -> list[str] | None:
        """"all", "none", "a,b" (exactly these), or "-a,+b" (changes to the current tools)."""
        available = tool_names(self.toolset)
        items = [item.strip() for item in text.replace(" ", ",").split(",") if item.strip()]
        if text.lower() in ("all", "*", "default"):
            return None
        if text.lower() == "none":
            return []
        if items and all(item[0] in "+-" for item in items):
            chosen = list(available if current is None else current)
            for item in items:
                tool = item[1:]
                self._known_tool(tool, available)
                if item[0] == "-" and tool in chosen:
                    chosen.remove(tool)
                elif item[0] == "+" and tool not in chosen:
                    chosen.append(tool)
            return self._checked("tools", chosen, self.choices())
        if any(item[0] in "+-" for item in items):
            raise SettingError("Give the tools to enable (numpy,llm), or changes only (-geocode,+pandas), not both.")
        return self._checked("tools", items, self.choices())

    @staticmethod
    def _known_tool(tool: str, available: list[str]) -> None:
        if tool not in available:
            raise SettingError(f"There is no tool {tool!r}; the tools are {', '.join(available) or 'none'} "
                               "(or all, none).")

    def _checked(self, name: str, value: Any, choices: Choices) -> Any:
        """`value` if the operator offers it for `name`, else SettingError saying what may be chosen."""
        if name == "model":
            if not isinstance(value, str) or value.strip() not in choices.models:
                raise SettingError(f"{value!r} is not one of the models this server offers: "
                                   f"{', '.join(choices.models)} (AUTOCODE_MODELS).")
            return value.strip()
        if name == "max_iterations":
            low, high = choices.max_iterations
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise SettingError(f"max_iterations is a whole number from {low} to {high}, not {value!r}.")
            return value
        if name == "tools":
            if value is None:
                return None
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise SettingError("tools is a list of tool names, all or none.")
            for tool in value:
                self._known_tool(tool, list(choices.tools))
            return [tool for tool in choices.tools if tool in value]  # the operator's order, no duplicates
        if name == "network":
            if not isinstance(value, bool):
                raise SettingError(f"network is on or off, not {value!r}.")
            if value and not choices.network_allowed:
                raise SettingError("The sandbox network cannot be turned on here: the operator has it off for all "
                                   "runs (AUTOCODE_SANDBOX_NETWORK=off).")
            return value
        if name == "budget":
            if value is None:
                return None
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0:
                raise SettingError(f"The budget is an amount in USD per month, e.g. 5 or 12.50 (or none), not "
                                   f"{value!r}.")
            return float(value) or None  # 0: no budget
        if name == "instructions":
            if not isinstance(value, str):
                raise SettingError("instructions are text (or none).")
            cleaned = clean_instructions(value[:MAX_INSTRUCTIONS_CHARS * 4])
            kept = _CONTROL.sub("", value.replace("\t", " ")).strip()
            if len(kept) > MAX_INSTRUCTIONS_CHARS:
                raise SettingError(f"The instructions are {len(kept):,} characters; at most "
                                   f"{MAX_INSTRUCTIONS_CHARS:,} fit (a few sentences of context: units, "
                                   "definitions, conventions).")
            return cleaned or None
        raise SettingError(f"There is no setting {name!r}; the settings are {', '.join(SETTING_NAMES)}.")


__all__ = [
    "MAX_INSTRUCTIONS_CHARS", "MAX_ITERATIONS", "SETTING_NAMES", "clean_instructions", "ChannelSettings", "Choices", "EffectiveSettings", "SettingError",
    "restrict_toolset", "run_settings", "scope_of", "tool_names",
]
