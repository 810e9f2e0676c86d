"""A Slack channel's settings (agent_core/channel_settings.py) in Slack: `/autocode settings …` and the settings
modal the App Home opens (bots/slack_home.py).

- `/autocode settings` shows the channel's effective settings (which of them the channel set, what may be
  chosen); `/autocode settings set NAME VALUE` and `/autocode settings reset [NAME]` change them. Everyone may
  read, only SLACK_ADMIN_USERS may change (bots/permissions.py). Replies are ephemeral; a refused value gets
  SettingError's sentence.
- The modal: model (a select of AUTOCODE_MODEL and AUTOCODE_MODELS), max iterations, tools (by name), sandbox
  network (only when the operator has it on), the monthly budget and the channel's instructions. On submission every changed field is set
  through `ChannelSettings.set`; a refused one is shown under its field (`response_action: errors`) and nothing
  of that submission is kept.

Pure view building (`settings_modal`, `submitted_values`) is separate from the listener so it can be read and
tested on its own; every text from users or the operator's configuration is escaped for mrkdwn or sent as
plain_text, and clipped to Block Kit's limits.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from agent_core.channel_settings import MAX_INSTRUCTIONS_CHARS, ChannelSettings, EffectiveSettings, SettingError
from bots import slack_render as render
from bots.permissions import may_change_settings

if TYPE_CHECKING:
    from bots.slack import SlackAdapter

log = logging.getLogger(__name__)

SETTINGS_VIEW = "autocode_settings"  # the modal's callback_id
OPTIONS_MAX = 100  # Block Kit: options of a select
OPTION_CHARS = 75  # Block Kit: an option's text
ERROR_CHARS = 200
NOT_ADMIN = "Only AutoCode admins (SLACK_ADMIN_USERS) can change settings."
USAGE = ("`/autocode settings` shows this channel's settings; admins change them with "
         "`/autocode settings set NAME VALUE` or `/autocode settings reset [NAME]` "
         "(NAME: model, max_iterations, tools, network, budget, instructions), or in AutoCode's Home tab.")


def is_settings_command(words: list[str]) -> bool:
    """`/autocode settings`, `… settings set …`, `… settings reset …` (anything else is a task)."""
    return bool(words) and words[0].lower() == "settings" and (
        len(words) == 1 or words[1].lower() in ("set", "reset", "show", "help"))


def place(scope: str) -> str:
    """How a scope is named in mrkdwn: `<#C…>` for a channel (Slack shows its name), else "this conversation"."""
    channel = scope.rsplit(":", 1)[-1]
    return f"<#{channel}>" if channel[:1] in ("C", "G") and channel.isalnum() else "this conversation"


def plain(text: str, limit: int = 75) -> dict[str, Any]:
    return {"type": "plain_text", "text": render.clip(text, limit), "emoji": False}


def _option(value: str) -> dict[str, Any]:
    return {"text": plain(value, OPTION_CHARS), "value": value[:150]}


def describe(effective: EffectiveSettings) -> str:
    """The settings in one mrkdwn line, with which of them the channel set."""
    text = render.escape(effective.describe())
    if effective.overridden:
        return f"{text}\n_Set here: {render.escape(', '.join(effective.overridden))}; the rest are the server's._"
    return f"{text}\n_All are the server's defaults._"


def settings_modal(scope: str, effective: EffectiveSettings, channels: ChannelSettings) -> dict[str, Any]:
    """The modal that changes a scope's settings (`private_metadata`: the scope)."""
    choices = channels.choices()
    blocks: list[dict[str, Any]] = [render.section(
        f"Settings of {place(scope)}. What is not set here is the server's default.")]
    models = list(choices.models)[:OPTIONS_MAX]
    model_select: dict[str, Any] = {"type": "static_select", "action_id": "value",
                                    "options": [_option(m) for m in models]}
    if effective.model in models:
        model_select["initial_option"] = _option(effective.model)
    blocks.append({"type": "input", "block_id": "model", "label": plain("Model"), "element": model_select})
    low, high = choices.max_iterations
    blocks.append({"type": "input", "block_id": "max_iterations", "label": plain("Max iterations"),
                   "hint": plain(f"{low} to {high}: plan, run, evaluate and repair at most this often", 150),
                   "element": {"type": "number_input", "action_id": "value", "is_decimal_allowed": False,
                               "min_value": str(low), "max_value": str(high),
                               "initial_value": str(effective.max_iterations)}})
    tools = list(choices.tools)[:OPTIONS_MAX]
    if tools:
        enabled = tools if effective.tools is None else [t for t in tools if t in effective.tools]
        select: dict[str, Any] = {"type": "multi_static_select", "action_id": "value",
                                  "options": [_option(t) for t in tools], "placeholder": plain("No tools")}
        if enabled:
            select["initial_options"] = [_option(t) for t in enabled]
        blocks.append({"type": "input", "block_id": "tools", "label": plain("Tools"), "optional": True,
                       "element": select})
    if choices.network_allowed:
        on_off = [{"text": plain("On"), "value": "on"}, {"text": plain("Off"), "value": "off"}]
        blocks.append({"type": "input", "block_id": "network", "label": plain("Sandbox network"),
                       "element": {"type": "radio_buttons", "action_id": "value", "options": on_off,
                                   "initial_option": on_off[0 if effective.network else 1]}})
    else:
        blocks.append(render.context("Sandbox network: off (the server has it off for all runs)."))
    budget: dict[str, Any] = {"type": "plain_text_input", "action_id": "value", "placeholder": plain("none")}
    if effective.budget_usd:
        budget["initial_value"] = f"{effective.budget_usd:.2f}"
    blocks.append({"type": "input", "block_id": "budget", "label": plain("Monthly budget (USD)"),
                   "optional": True, "hint": plain("New tasks are refused once the channel's runs cost this "
                                                   "much in a month; empty for no budget", 150),
                   "element": budget})
    instructions: dict[str, Any] = {"type": "plain_text_input", "action_id": "value", "multiline": True,
                                    "max_length": MAX_INSTRUCTIONS_CHARS,
                                    "placeholder": plain("e.g. revenue is in cents; our fiscal year starts in April",
                                                         150)}
    if effective.instructions:
        instructions["initial_value"] = effective.instructions
    blocks.append({"type": "input", "block_id": "instructions", "label": plain("Instructions for this channel"),
                   "optional": True, "hint": plain("What the planner and the evaluator should know about this "
                                                   "channel's data; empty for none", 150),
                   "element": instructions})
    return {"type": "modal", "callback_id": SETTINGS_VIEW, "private_metadata": scope[:3000],
            "title": plain("Channel settings", 24), "submit": plain("Save", 24), "close": plain("Cancel", 24),
            "blocks": blocks}


def submitted_values(view: dict[str, Any]) -> dict[str, Any]:
    """The fields of a submitted settings modal: model, max_iterations (text), tools (list), network ("on" /
    "off"), budget (text or None); absent fields are left out."""
    values: dict[str, Any] = {}
    for block_id, actions in ((view.get("state") or {}).get("values") or {}).items():
        field = (actions or {}).get("value") or {}
        kind = field.get("type")
        if kind in ("static_select", "radio_buttons"):
            values[block_id] = (field.get("selected_option") or {}).get("value")
        elif kind == "multi_static_select":
            values[block_id] = [o.get("value") for o in field.get("selected_options") or []]
        else:
            values[block_id] = field.get("value")
    return values


def changes(values: dict[str, Any], current: EffectiveSettings, tools: list[str]) -> list[tuple[str, Any]]:
    """(name, text for ChannelSettings.set) of each field that differs from the current settings."""
    found: list[tuple[str, Any]] = []
    if "model" in values and values["model"] != current.model:
        found.append(("model", str(values["model"] or "")))
    if "max_iterations" in values and str(values["max_iterations"] or "").strip() != str(current.max_iterations):
        found.append(("max_iterations", str(values["max_iterations"] or "")))
    if "tools" in values:
        chosen = [t for t in values["tools"] if t]
        now = tools if current.tools is None else list(current.tools)
        if set(chosen) != set(now):
            found.append(("tools", "all" if set(chosen) == set(tools) else (",".join(chosen) or "none")))
    if "network" in values and (values["network"] == "on") != current.network:
        found.append(("network", str(values["network"] or "")))
    if "budget" in values:
        text = (values["budget"] or "").strip()
        if text != (f"{current.budget_usd:.2f}" if current.budget_usd else ""):
            found.append(("budget", text or "none"))
    if "instructions" in values:
        text = (values["instructions"] or "").strip()
        if text != current.instructions:
            found.append(("instructions", text or "none"))
    return found


class SlackSettings:
    """`/autocode settings` and the settings modal of a SlackAdapter."""

    def __init__(self, adapter: "SlackAdapter", app: Any):
        self.adapter = adapter
        self.channels: ChannelSettings = adapter.scheduler.agent.channel_settings
        self.on_saved: list[Callable[[str, str], None]] = []  # (team, user) after a saved modal (Home refresh)
        app.view(SETTINGS_VIEW)(self._on_submission)

    def may_change(self, user: str) -> bool:
        return may_change_settings(user, self.adapter.settings.slack_admin_users)

    # --- /autocode settings ----------------------------------------------------------------------------------
    def command(self, team: str, channel: str, user: str, words: list[str]) -> str:
        """The ephemeral reply to `/autocode settings [set NAME VALUE | reset [NAME]]` in `channel`."""
        scope = f"slack:{team}:{channel}"
        action = words[1].lower() if len(words) > 1 else "show"
        if action in ("show", "help"):
            return self._shown(scope, user)
        if not self.may_change(user):
            return NOT_ADMIN
        by = self.adapter._user_key(team, user)
        try:
            if action == "set":
                if len(words) < 4:
                    return f"Give a setting and its value, e.g. `/autocode settings set model gpt-4o`.\n{USAGE}"
                effective = self.channels.set(scope, words[2], " ".join(words[3:]), by=by)
                return f"Set {render.escape(words[2])} of {place(scope)}: {describe(effective)}"
            effective = self.channels.reset(scope, words[2] if len(words) > 2 else None, by=by)
        except SettingError as exc:
            return f":warning: {render.escape(render.clip(str(exc), 1000))}"
        what = render.escape(words[2]) if len(words) > 2 else "all settings"
        return f"Reset {what} of {place(scope)}: {describe(effective)}"

    def _shown(self, scope: str, user: str) -> str:
        effective = self.channels.effective_for_scope(scope)
        choices = self.channels.choices()
        low, high = choices.max_iterations
        lines = [f"*Settings of {place(scope)}:* {describe(effective)}",
                 render.escape(f"Models: {', '.join(choices.models)} · iterations {low}–{high} · tools: "
                               f"{', '.join(choices.tools) or 'none'} · network "
                               f"{'on or off' if choices.network_allowed else 'off (the server has it off)'}")]
        lines.append(USAGE if self.may_change(user) else "Only AutoCode admins can change them.")
        return "\n".join(lines)

    # --- the modal ---------------------------------------------------------------------------------------------
    async def open_modal(self, client: Any, trigger_id: str, scope: str) -> None:
        """Open the settings modal of `scope` (the caller checked that the user may change it)."""
        view = settings_modal(scope, self.channels.effective_for_scope(scope), self.channels)
        await client.views_open(trigger_id=trigger_id, view=view)

    def apply(self, scope: str, values: dict[str, Any], by: str) -> dict[str, str]:
        """Set each changed field; {} when all were accepted, else each refused field's sentence (and nothing of
        the submission is kept)."""
        before = self.channels.storage.channel_settings(scope)
        current = self.channels.effective_for_scope(scope)
        errors: dict[str, str] = {}
        for name, value in changes(values, current, list(self.channels.choices().tools)):
            try:
                self.channels.set(scope, name, value, by=by)
            except SettingError as exc:
                errors[name] = render.clip(str(exc), ERROR_CHARS)
        if errors:
            self.channels.storage.put_channel_settings(scope, before, by)
        return errors

    async def _on_submission(self, ack: Callable[..., Awaitable[None]], body: dict[str, Any],
                             view: dict[str, Any]) -> None:
        user = (body.get("user") or {}).get("id", "")
        team = (body.get("team") or {}).get("id") or (body.get("user") or {}).get("team_id") or ""
        scope = str(view.get("private_metadata") or "")
        values = submitted_values(view)
        first = next(iter(values), "model")
        if not scope.startswith(f"slack:{team}:"):
            await ack(response_action="errors", errors={first: "These settings belong to another workspace."})
            return
        if not self.may_change(user) or self.adapter._refusal(team, scope.rsplit(":", 1)[-1], user):
            await ack(response_action="errors", errors={first: NOT_ADMIN})
            return
        errors = self.apply(scope, values, self.adapter._user_key(team, user))
        if errors:
            await ack(response_action="errors", errors=errors)
            return
        await ack()
        for callback in self.on_saved:
            callback(team, user)
