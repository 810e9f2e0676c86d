"""Routines in Slack (agent_core/routines.py): `/autocode routines [pause|resume|rm ID]` (bots/routines_chat.py) and
`/autocode every PHRASE`, e.g. `/autocode every monday 9:00 post last week's signups chart`.

"Repeat…" on a succeeded run's message offers common schedules (a select); the chosen one is shown like `every`'s
before Save, and Save makes a routine from that run (its code pinned), for the run's requester or an admin.

`every`: the slash command is acknowledged at once; the phrase is read into a cron and the task with one LLM call
(agent_core/routine_phrases.py) and the user gets an ephemeral message with the cron, the time zone
(AUTOCODE_ROUTINE_TZ) and the next three firings, and Save / Cancel buttons: nothing is saved before Save. The saved
routine belongs to the user who pressed Save (its owner, whose budget its runs spend), posts to the channel, and its
first run plans as any run and pins its plan when it succeeds.
"""

from __future__ import annotations

import json
import secrets
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from agent_core import routines
from agent_core.routine_phrases import read_phrase
from agent_core.routines import RoutineError
from bots import routines_chat
from bots import slack_render as render
from bots.permissions import may_act_on_run

if TYPE_CHECKING:
    from bots.slack import SlackAdapter

SAVE_ACTION = "autocode_routine_save"
DROP_ACTION = "autocode_routine_drop"
CHOOSE_ACTION = "autocode_repeat_when"
HOME_ACTION = "autocode_routine_home"  # value: "pause:ID", "resume:ID" or "rm:ID" (a button of the App Home)
HOME_ROUTINES = 10  # routines the App Home lists (a view holds at most 100 blocks)
VALUE_CHARS = 2000  # Block Kit: a button's value
# What "Repeat…" offers (label, cron): common schedules, read in AUTOCODE_ROUTINE_TZ. Anything else: the CLI.
CHOICES = (
    ("Every day at 09:00", "0 9 * * *"),
    ("Every weekday at 09:00", "0 9 * * 1-5"),
    ("Every Monday at 09:00", "0 9 * * 1"),
    ("Every hour", "0 * * * *"),
    ("On the 1st of each month at 09:00", "0 9 1 * *"),
)


def is_routines_command(words: list[str]) -> bool:
    """`/autocode routines …` (bots/routines_chat.py) or `/autocode every …`."""
    return routines_chat.is_routines_command(words) or (len(words) > 1 and words[0].lower() == "every")


class SlackRoutines:
    def __init__(self, adapter: "SlackAdapter", app: Any):
        self.adapter = adapter
        self.storage, self.settings = adapter.storage, adapter.settings
        app.action(SAVE_ACTION)(self._on_save)
        app.action(DROP_ACTION)(self._on_drop)
        app.action(render.REPEAT_ACTION)(self._on_repeat)
        app.action(CHOOSE_ACTION)(self._on_choose)
        app.action(HOME_ACTION)(self._on_home_action)

    def command(self, team: str, channel: str, user: str, words: list[str], enterprise: str | None) -> str:
        """The ephemeral reply to `/autocode routines …`, or the acknowledgement of `/autocode every …` (whose
        proposal follows as another ephemeral message)."""
        if words[0].lower() != "every":
            return routines_chat.reply(
                self.storage, f"slack:{team}:{channel}", words, actor=self.adapter._user_key(team, user),
                actor_id=user, admins=self.settings.slack_admin_users, command="`/autocode routines`",
                escape=render.escape)
        route = {"team": team, "channel": channel, "user": user, "enterprise": enterprise}
        self.adapter._spawn(self._propose(route, " ".join(words)), "reading a routine's schedule")
        return "Reading the schedule…"

    async def _propose(self, route: dict[str, Any], phrase: str) -> None:
        conversation = f"slack:{route['team']}:{route['channel']}:routine"
        model = self.adapter.scheduler.agent.channel_settings.effective(conversation).model
        try:
            proposal = await read_phrase(self.adapter.scheduler.agent.llm, phrase, self.settings.routine_tz,
                                         self.settings.routine_min_interval, model)
        except RoutineError as exc:
            await self.adapter._ephemeral(route, render.escape(str(exc)))
            return
        value = json.dumps({"cron": proposal.cron, "tz": proposal.tz, "task": proposal.task})
        if len(value) > VALUE_CHARS:
            await self.adapter._ephemeral(route, "That task is too long for a routine made here; make it with "
                                                 "`autocode routines add`.")
            return
        await self._offer(route, proposal.task, proposal.describe(), value)

    async def _offer(self, route: dict[str, Any], task: str, schedule: str, value: str) -> None:
        """The proposal: task, cron, zone and next three firings, with Save (carrying `value`) and Cancel."""
        text = (f"Repeat *{render.escape(task)}* on {render.escape(schedule)} "
                "Save it as a routine of this channel?")
        client = await self.adapter._client_for(route)
        await client.chat_postEphemeral(channel=route["channel"], user=route["user"], text=text, blocks=[
            {"type": "section", "text": {"type": "mrkdwn", "text": text}},
            {"type": "actions", "elements": [
                {"type": "button", "action_id": SAVE_ACTION, "style": "primary", "value": value,
                 "text": {"type": "plain_text", "text": "Save routine"}},
                {"type": "button", "action_id": DROP_ACTION, "value": "drop",
                 "text": {"type": "plain_text", "text": "Cancel"}},
            ]},
        ])

    async def _on_save(self, ack: Callable[..., Awaitable[None]], body: dict[str, Any], action: dict[str, Any]) -> None:
        await ack()
        user_info = body.get("user") or {}
        team = (body.get("team") or {}).get("id") or user_info.get("team_id") or ""
        channel, user = (body.get("channel") or {}).get("id", ""), user_info.get("id", "")
        route = {"team": team, "channel": channel, "user": user}
        refusal = self.adapter._refusal(team, channel, user)
        if refusal:
            self.adapter._spawn(self.adapter._ephemeral(route, refusal), "refusal")
            return
        try:
            chosen = json.loads(action.get("value") or "")
            if chosen.get("from_run"):
                denied = self._denied(str(chosen["from_run"]), team, user)
                if denied:
                    self.adapter._spawn(self.adapter._ephemeral(route, denied), "refusal")
                    return
                routine = routines.create_from_run(self.storage, self.settings, str(chosen["from_run"]),
                                                   str(chosen["cron"]), str(chosen["tz"]))
                said = (f"Saved routine {routine['id']}: this run's code runs again on `{render.escape(routine['cron'])}` "
                        f"({render.escape(routine['tz'])}). `/autocode routines` lists this channel's routines.")
                self.adapter._spawn(self.adapter._ephemeral(route, said), "routine saved")
                return
            routine = routines.create_with_task(
                self.storage, self.settings, f"slack:{team}:{channel}:routine-{secrets.token_hex(4)}",
                str(chosen["task"]), str(chosen["cron"]), str(chosen["tz"]), owner=self.adapter._user_key(team, user),
                adapter=self.adapter.name, reply_to=route)
            said = (f"Saved routine {routine['id']}: {render.escape(routine['task'])} on `{render.escape(routine['cron'])}` "
                    f"({render.escape(routine['tz'])}). Its first run plans the task; later runs re-use that code. "
                    "`/autocode routines` lists this channel's routines.")
        except (ValueError, KeyError, TypeError):
            said = "That button's routine could not be read; please send `/autocode every …` again."
        except RoutineError as exc:
            said = render.escape(str(exc))
        self.adapter._spawn(self.adapter._ephemeral(route, said), "routine saved")

    async def _on_drop(self, ack: Callable[..., Awaitable[None]], body: dict[str, Any]) -> None:
        await ack()

    # --- the App Home's section (bots/slack_home.py) ----------------------------------------------------------------
    def home_blocks(self, team: str, user: str) -> list[dict[str, Any]]:
        """"Your routines": the user's routines in this workspace, each with Pause/Resume and Remove."""
        key = self.adapter._user_key(team, user)
        mine = [r for r in self.storage.routines() if r["owner"] == key][:HOME_ROUTINES]
        blocks: list[dict[str, Any]] = [{"type": "divider"},
                                        {"type": "header", "text": {"type": "plain_text", "text": "Your routines"}}]
        if not mine:
            blocks.append(render.section("No routines yet: `/autocode every monday 9:00 TASK`, or *Repeat…* on an "
                                         "answer."))
        for routine in mine:
            item = routines.describe(self.storage, routine)
            task = render.escape(render.clip(" ".join(item["task"].split()), 80))
            blocks.append(render.section(
                f"*{task}*\n`{render.escape(item['cron'])}` ({render.escape(item['tz'])}) · {item['state']} · next "
                f"{render.escape(item['next_fire_local'] or '-')} · plan v{item['plan_version'] or '-'}"))
            toggle = "resume" if routine["state"] == "paused" else "pause"
            blocks.append({"type": "actions", "elements": [
                render.button(toggle.capitalize(), HOME_ACTION, f"{toggle}:{routine['id']}"),
                render.button("Remove", HOME_ACTION, f"rm:{routine['id']}", "danger")]})
        return blocks

    async def _on_home_action(self, ack: Callable[..., Awaitable[None]], body: dict[str, Any],
                              action: dict[str, Any]) -> None:
        await ack()
        place = self._place(body)
        verb, _, routine_id = str(action.get("value", "")).partition(":")
        routine = self.storage.get_routine(routine_id)
        if routine is None or verb not in routines_chat.ACTIONS or not may_act_on_run(
                routine["owner"], self.adapter._user_key(place["team"], place["user"]), place["user"],
                self.settings.slack_admin_users):
            return  # the buttons are shown to the owner only; a forged or stale press changes nothing
        if verb == "rm":
            routines.remove(self.storage, routine_id)
        else:
            (routines.pause if verb == "pause" else routines.resume)(self.storage, routine_id)
        self.adapter.home.refresh(place["team"], place["user"])

    def _denied(self, run_id: str, team: str, user: str) -> str | None:
        """Why `user` may not make a routine of the run (None: they may): it is not this adapter's, or not theirs."""
        run = self.storage.get_run(run_id)
        if run is None or run["adapter"] != self.adapter.name:
            return "That run is not known here."
        if not may_act_on_run(run["user"], self.adapter._user_key(team, user), user, self.settings.slack_admin_users):
            return "Only the person who asked for this run or an AutoCode admin can repeat it."
        return None

    @staticmethod
    def _place(body: dict[str, Any]) -> dict[str, Any]:
        user = body.get("user") or {}
        team = (body.get("team") or {}).get("id") or user.get("team_id") or ""
        container = body.get("container") or {}
        return {"team": team, "channel": (body.get("channel") or {}).get("id", ""), "user": user.get("id", ""),
                "thread_ts": container.get("thread_ts")}

    async def _on_repeat(self, ack: Callable[..., Awaitable[None]], body: dict[str, Any],
                         action: dict[str, Any]) -> None:
        """"Repeat…": the common schedules to choose from (ephemeral), for the run's requester or an admin."""
        await ack()
        route = self._place(body)
        run_id = str(action.get("value", ""))
        denied = self.adapter._refusal(route["team"], route["channel"], route["user"]) or \
            self._denied(run_id, route["team"], route["user"])
        if denied:
            self.adapter._spawn(self.adapter._ephemeral(route, denied), "refusal")
            return
        options = [{"text": {"type": "plain_text", "text": label}, "value": f"{run_id}|{cron}"}
                   for label, cron in CHOICES]
        text = f"Repeat this run on a schedule ({self.settings.routine_tz}):"
        client = await self.adapter._client_for(route)
        self.adapter._spawn(client.chat_postEphemeral(
            channel=route["channel"], user=route["user"], text=text, thread_ts=route.get("thread_ts"), blocks=[
                {"type": "section", "text": {"type": "mrkdwn", "text": text},
                 "accessory": {"type": "static_select", "action_id": CHOOSE_ACTION, "options": options,
                               "placeholder": {"type": "plain_text", "text": "When?"}}}]), "repeat choices")

    async def _on_choose(self, ack: Callable[..., Awaitable[None]], body: dict[str, Any],
                         action: dict[str, Any]) -> None:
        """A schedule chosen for "Repeat…": shown (cron, zone, next three firings) with Save / Cancel."""
        await ack()
        route = self._place(body)
        run_id, _, cron = str((action.get("selected_option") or {}).get("value", "")).partition("|")
        run = self.storage.get_run(run_id)
        try:
            schedule = routines.parse_schedule(cron, self.settings.routine_tz, self.settings.routine_min_interval)
        except RoutineError as exc:
            self.adapter._spawn(self.adapter._ephemeral(route, render.escape(str(exc))), "refusal")
            return
        if run is None:
            self.adapter._spawn(self.adapter._ephemeral(route, "That run is not known here."), "refusal")
            return
        firings = schedule.upcoming(datetime.now(timezone.utc), 3)
        described = f"`{schedule.cron}` in {schedule.tz}; next: {', '.join(schedule.local(f) for f in firings)}."
        value = json.dumps({"from_run": run_id, "cron": schedule.cron, "tz": schedule.tz})
        self.adapter._spawn(self._offer(route, run["task"], described, value), "repeat proposal")
