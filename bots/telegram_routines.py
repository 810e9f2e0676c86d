"""Routines in Telegram (agent_core/routines.py): `/routines [pause|resume|rm ID]` (bots/routines_chat.py) and
`/every PHRASE`, e.g. `/every monday 9:00 post last week's signups chart`; sent as a reply to one of AutoCode's
answers (`/every monday 9:00`), it repeats that run: its code is pinned (Telegram's "Repeat…" on an answer).

`/every` reads the phrase into a cron and the task with one LLM call (agent_core/routine_phrases.py) and replies with
the cron, the time zone (AUTOCODE_ROUTINE_TZ) and the next three firings, with Save / Cancel buttons: nothing is
saved before Save, and only the person who asked may press it. A button's callback data holds 64 bytes, so the
proposal waits here in memory under a random token (a restart forgets it: the user sends /every again). The saved
routine posts to the chat (or forum topic) it was asked in; its owner is the person who saved it.
"""

from __future__ import annotations

import json
import secrets
from typing import TYPE_CHECKING, Any

from telegram import CallbackQuery, InlineKeyboardButton, InlineKeyboardMarkup, User

from agent_core import routines
from agent_core.channel_settings import scope_of
from agent_core.routine_phrases import read_phrase
from agent_core.routines import RoutineError
from bots import routines_chat
from bots.permissions import may_act_on_run

if TYPE_CHECKING:
    from bots.telegram import TelegramAdapter

PREFIX = "routine:"
PENDING_MAX = 200  # proposals kept at once; the oldest is forgotten first


class TelegramRoutines:
    def __init__(self, adapter: "TelegramAdapter"):
        self.adapter = adapter
        self.storage, self.settings = adapter.storage, adapter.settings
        self._pending: dict[str, dict[str, Any]] = {}

    def _conversation(self, route: dict[str, Any]) -> str:
        from bots.telegram import conversation_key

        return conversation_key(route["chat_id"], route["thread_id"])

    def routines(self, route: dict[str, Any], user: User, rest: str) -> str:
        words = ["routines", *rest.split()]
        if not routines_chat.is_routines_command(words):
            return "Send /routines to list this chat's routines, or /routines pause|resume|rm ID."
        return routines_chat.reply(self.storage, scope_of(self._conversation(route)), words,
                                   actor=f"telegram:{user.id}", actor_id=str(user.id), admins=self.adapter._admins,
                                   command="/routines")

    def every(self, route: dict[str, Any], user: User, rest: str) -> str:
        if not rest.strip():
            return "Say when and what, e.g. /every monday 9:00 post last week's signups chart."
        run = self._answered_run(route)
        if run is not None and not may_act_on_run(run["user"], f"telegram:{user.id}", str(user.id),
                                                  self.adapter._admins):
            return "Only the person who asked for that task or an AutoCode admin can repeat it."
        self.adapter._spawn(self._propose(route, user.id, "every " + rest.strip(), run))
        return "Reading the schedule…"

    def _answered_run(self, route: dict[str, Any]) -> dict[str, Any] | None:
        """The run whose answer (or progress message) the command replies to, in this conversation."""
        replied = route.get("replied_to")
        if not replied:
            return None
        for run in self.storage.list_runs(self._conversation(route), limit=100):
            where = json.loads(run["reply_to_json"] or "{}")
            if run["adapter"] == "telegram" and replied in (where.get("answer_message_id"),
                                                            where.get("progress_message_id")):
                return run
        return None

    async def _propose(self, route: dict[str, Any], user_id: int, phrase: str, run: dict[str, Any] | None) -> None:
        agent = self.adapter.scheduler.agent
        model = agent.channel_settings.effective(self._conversation(route)).model
        try:
            proposal = await read_phrase(agent.llm, phrase, self.settings.routine_tz,
                                         self.settings.routine_min_interval, model, with_task=run is None)
        except RoutineError as exc:
            await self.adapter._send(route, str(exc), reply_to=route.get("message_id"))
            return
        while len(self._pending) >= PENDING_MAX:
            self._pending.pop(next(iter(self._pending)))
        token = secrets.token_hex(6)
        self._pending[token] = {"proposal": proposal, "user": user_id, "route": route,
                                "from_run": run["id"] if run else None}
        markup = InlineKeyboardMarkup([[InlineKeyboardButton("Save routine", callback_data=f"{PREFIX}save:{token}"),
                                        InlineKeyboardButton("Cancel", callback_data=f"{PREFIX}drop:{token}")]])
        what = f"“{run['task']}” (that answer's code)" if run else f"“{proposal.task}”"
        text = f"Repeat {what} on {proposal.describe().replace('`', '')} Save it as a routine of this chat?"
        await self.adapter._send(route, text, reply_to=route.get("message_id"), markup=markup)

    async def callback(self, query: CallbackQuery, data: str) -> None:
        """A press of Save or Cancel under a proposal."""
        action, _, token = data.removeprefix(PREFIX).partition(":")
        pending = self._pending.get(token)
        if pending is None:
            await self.adapter._answer_query(query, "This proposal is no longer known; send /every again.")
            return
        if query.from_user.id != pending["user"]:
            await self.adapter._answer_query(query, "Only the person who asked can save or cancel this routine.",
                                             alert=True)
            return
        self._pending.pop(token, None)
        route = pending["route"]
        if action != "save":
            await self.adapter._answer_query(query, "Not saved.")
            return
        proposal = pending["proposal"]
        try:
            if pending["from_run"]:
                routine = routines.create_from_run(self.storage, self.settings, pending["from_run"], proposal.cron,
                                                   proposal.tz)
            else:
                routine = routines.create_with_task(
                    self.storage, self.settings, self._conversation(route), proposal.task, proposal.cron,
                    proposal.tz, owner=f"telegram:{query.from_user.id}", adapter="telegram",
                    reply_to={"chat_id": route["chat_id"], "thread_id": route["thread_id"]})
        except RoutineError as exc:
            await self.adapter._answer_query(query, str(exc), alert=True)
            return
        await self.adapter._answer_query(query, "Saved.")
        how = "re-runs that answer's code" if pending["from_run"] else \
            "first run plans the task; later runs re-use that code"
        await self.adapter._send(route, f"Saved routine {routine['id']}: “{routine['task']}” on {routine['cron']} "
                                        f"({routine['tz']}). It {how}. /routines lists this chat's routines.")
