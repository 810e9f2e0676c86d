"""AutoCode's App Home tab in Slack: `app_home_opened` → `views.publish` of the user's own page.

The page shows the user's recent runs (status, task clipped and escaped, when, tokens, cost, a link to the run page
when the viewer is on and AUTOCODE_PUBLIC_URL is set), their spend this month against AUTOCODE_MONTHLY_BUDGET_PER_USER,
their routines (bots/slack_routines.py: pause, resume, remove), and for admins (SLACK_ADMIN_USERS) the settings of
the workspace's channels that have runs or settings, each with a button opening the settings modal
(bots/slack_settings.py). The page is published after the event is
acknowledged, and again when one of that user's runs finishes or an admin saves settings, for users who opened it
since the server started.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from agent_core.budget import monthly_status
from agent_core.events import RunEvent, RunFinished
from agent_core.pricing import prices_for, spend
from bots import slack_render as render
from bots.slack_settings import SlackSettings, describe, place

if TYPE_CHECKING:
    from bots.slack import SlackAdapter

log = logging.getLogger(__name__)

OPEN_SETTINGS_ACTION = "autocode_settings_open"  # value: the scope
HOME_RUNS = 10
HOME_CHANNELS = 30  # a view holds at most 100 blocks
TASK_CHARS = 80
SECTION_CHARS = 2900  # under Block Kit's 3,000 (a long list of tools)


def when(iso: str | None) -> str:
    """A stored ISO time as Slack's date token (shown in the viewer's time zone), with a UTC fallback."""
    if not iso:
        return ""
    try:
        moment = datetime.fromisoformat(iso)
    except ValueError:
        return render.escape(iso[:16])
    fallback = moment.strftime("%Y-%m-%d %H:%M UTC")
    return f"<!date^{int(moment.timestamp())}^{{date_short_pretty}} {{time}}|{fallback}>"


def run_block(run: dict[str, Any], usage: dict[str, int], cost: str, url: str | None) -> dict[str, Any]:
    """One run as a section: icon, task (a link to its page when there is one), status, time, tokens, cost."""
    task = render.escape(render.clip(" ".join((run.get("task") or "").split()), TASK_CHARS)) or "(no task)"
    title = f"<{url}|{task}>" if url else task
    tokens = usage.get("prompt_tokens", 0) + usage.get("completion_tokens", 0)
    facts = " · ".join(filter(None, (run.get("status") or "", when(run.get("created_at")),
                                     f"{tokens:,} tokens", cost)))
    return render.section(f"{render.STATUS_ICONS.get(run.get('status') or '', '')} *{title}*\n{facts}")


class SlackHome:
    """The App Home of a SlackAdapter; see the module docstring."""

    def __init__(self, adapter: "SlackAdapter", app: Any, settings_ui: SlackSettings):
        self.adapter = adapter
        self.settings_ui = settings_ui
        self._opened: set[tuple[str, str]] = set()  # (team, user) who opened the Home: refreshed after their runs
        app.event("app_home_opened")(self._on_opened)
        app.action(OPEN_SETTINGS_ACTION)(self._on_open_settings)
        settings_ui.on_saved.append(self.refresh)
        adapter.runtime.events.subscribe(self._on_event)

    # --- the page ------------------------------------------------------------------------------------------------
    def view(self, team: str, user: str) -> dict[str, Any]:
        """The user's Home view."""
        adapter = self.adapter
        storage, settings = adapter.storage, adapter.settings
        key = adapter._user_key(team, user)
        prices = prices_for(settings)
        month = monthly_status(storage, settings, user=key)
        budget = f"*This month:* {render.escape(month.describe())}"
        if month.exceeded:
            budget += "\n:warning: Your budget is spent: new tasks are refused until it renews."
        blocks: list[dict[str, Any]] = [
            {"type": "header", "text": {"type": "plain_text", "text": "AutoCode"}},
            render.section(budget),
            {"type": "divider"},
            {"type": "header", "text": {"type": "plain_text", "text": "Your recent runs"}},
        ]
        runs = storage.runs_of_user(key, HOME_RUNS)
        for run in runs:
            cost = spend(storage, prices, run_id=run["id"]).describe()
            blocks.append(run_block(run, storage.usage(run["id"]), cost, adapter.runtime.run_url(run)))
        if not runs:
            blocks.append(render.section("No runs yet. Mention @AutoCode in a channel, send it a message, or use "
                                         "`/autocode TASK`."))
        blocks += self.adapter.routines_ui.home_blocks(team, user)  # bots/slack_routines.py
        if self.settings_ui.may_change(user):
            blocks += self._settings_blocks(team)
        return {"type": "home", "blocks": blocks[:100]}

    def _settings_blocks(self, team: str) -> list[dict[str, Any]]:
        channels = self.settings_ui.channels
        scopes = [s for s in self.adapter.storage.scopes(f"slack:{team}:") if s.count(":") == 2
                  and s.rsplit(":", 1)[-1][:1] in ("C", "G")][:HOME_CHANNELS]
        blocks: list[dict[str, Any]] = [
            {"type": "divider"},
            {"type": "header", "text": {"type": "plain_text", "text": "Channel settings"}},
            render.context("You are an AutoCode admin: change a channel's settings here, or with "
                           "`/autocode settings` in the channel."),
        ]
        for scope in scopes:
            block = render.section(render.clip(f"{place(scope)}: {describe(channels.effective_for_scope(scope))}",
                                               SECTION_CHARS))
            block["accessory"] = render.button("Change", OPEN_SETTINGS_ACTION, scope)
            blocks.append(block)
        if not scopes:
            blocks.append(render.section("No channel has runs or settings yet."))
        return blocks

    async def publish(self, team: str, user: str) -> None:
        client = await self.adapter._client_for({"team": team})
        await client.views_publish(user_id=user, view=self.view(team, user))

    def refresh(self, team: str, user: str) -> None:
        """Publish the user's Home again (after the ack, in the background)."""
        self.adapter._spawn(self.publish(team, user), "publishing the App Home")

    # --- listeners -------------------------------------------------------------------------------------------------
    async def _on_opened(self, event: dict[str, Any], body: dict[str, Any], context: dict[str, Any]) -> None:
        if event.get("tab") not in (None, "home"):
            return
        team = body.get("team_id") or context.get("team_id") or ""
        user = str(event.get("user") or "")
        allowed = self.adapter.settings
        if not user or (allowed.slack_allowed_teams and team not in allowed.slack_allowed_teams) or (
                allowed.slack_allowed_users and user not in allowed.slack_allowed_users):
            return  # (the channel allowlist is about channels, not about a user's own Home)
        self._opened.add((team, user))
        self.refresh(team, user)

    async def _on_open_settings(self, ack: Callable[..., Awaitable[None]], body: dict[str, Any],
                                action: dict[str, Any]) -> None:
        await ack()
        user = (body.get("user") or {}).get("id", "")
        team = (body.get("team") or {}).get("id") or (body.get("user") or {}).get("team_id") or ""
        scope = str(action.get("value") or "")
        if not self.settings_ui.may_change(user) or not scope.startswith(f"slack:{team}:"):
            return  # the button is shown to admins only; a forged press opens nothing
        client = await self.adapter._client_for({"team": team})
        self.adapter._spawn(self.settings_ui.open_modal(client, str(body.get("trigger_id") or ""), scope),
                            "opening the settings modal")

    def _on_event(self, event: RunEvent) -> None:
        if not isinstance(event, RunFinished) or not self._opened:
            return
        run = self.adapter.storage.get_run(event.run_id)
        parts = (run or {}).get("user", "").split(":") if run and run.get("adapter") == self.adapter.name else []
        if len(parts) == 3 and (parts[1], parts[2]) in self._opened:
            self.refresh(parts[1], parts[2])
