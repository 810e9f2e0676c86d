"""Routines in Slack (bots/routines_chat.py): a routine made from a slash command's run posts its fired runs to the
channel; `/autocode routines` lists the channel's routines; pause/resume/rm only by the owner or an admin. A real
`autocode serve` with the Slack adapter on the fake Web API, real sandboxes, the scripted LLM."""

from __future__ import annotations

import json
import sys
from urllib.parse import urlencode
from typing import Any

import pytest

from tests.fakes.slack_server import FakeSlack, message_text
from tests.server_helpers import ScriptedLLM, db_rows
from tests.test_slack import (
    ADMIN, ALICE, BOB, TEAM_ID, TOKEN, action, delivered, in_channel, post, press, slash, start_slack_serve, wait_run,
)
from tests.server_helpers import wait_for

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the server's sandbox needs Linux")


@pytest.fixture(scope="module")
def slack():
    with FakeSlack() as fake:
        yield fake


class ScheduleLLM(ScriptedLLM):
    """ScriptedLLM that also reads schedule phrases: "every monday 9:00 TASK" -> 0 9 * * 1 and TASK; "every second
    …" -> a cron firing every minute (refused: too often); anything else has no schedule."""

    def _respond(self, body: dict[str, Any]) -> dict[str, Any]:
        spec = super()._respond(body)
        with self._lock:
            kind = self.log[-1].kind
        if kind == "schedule":
            phrase = body["messages"][-1]["content"]
            reply = {"cron": "", "task": ""}
            if phrase.startswith("every monday 9:00"):  # with a task, or alone (repeating an answer's run)
                reply = {"cron": "0 9 * * 1", "task": phrase.removeprefix("every monday 9:00").strip()}
            elif phrase.startswith("every second "):
                reply = {"cron": "* * * * *", "task": phrase.removeprefix("every second ")}
            spec = {"json": reply}
        return spec


@pytest.fixture(scope="module")
def llm():
    with ScheduleLLM() as scripted:
        yield scripted


@pytest.fixture(scope="module")
def server(slack, llm, tmp_path_factory):
    serve = start_slack_serve(slack, llm, tmp_path_factory.mktemp("routines-slack"),
                              SLACK_ALLOWED_USERS=f"{ALICE},{BOB},{ADMIN}", SLACK_ADMIN_USERS=ADMIN)
    try:
        yield serve
    finally:
        serve.close()
        assert TOKEN not in serve.log_tail(10**7)


def ephemeral(server, text: str, channel: str, user: str = ALICE) -> str:
    response, _ = slash(server, text, channel, user)
    assert response.status_code == 200, response.text
    return response.json()["text"]


def test_a_routine_posts_to_its_channel_and_is_managed_by_its_owner_or_an_admin(server, slack, llm):
    channel = "CROUTINE"
    slash(server, "job tag=RS", channel)
    source = wait_run(server, channel)
    assert source["status"] == "succeeded"
    created = server.http.post("/api/routines", json={"from_run": source["id"], "cron": "0 9 * * 1",
                                                       "tz": "Europe/Rome"})
    assert created.status_code == 201, created.text
    routine = created.json()
    assert routine["owner"] == source["user"] and source["user"].endswith(f":{ALICE}")

    listed = ephemeral(server, "routines", channel)
    assert f"• {routine['id']} · active · 0 9 * * 1 (Europe/Rome)" in listed and "plan v1" in listed
    assert "No routines here" in ephemeral(server, "routines", "COTHER")  # another channel's are not shown
    assert ephemeral(server, "routines pause", channel).startswith("Give one routine's id: `/autocode routines` pause ID")

    # Fired: the pinned code runs with no planner call and the answer is posted to the channel.
    plans = len(llm.requests_of("plan", "job tag=RS"))
    posted_before = len(in_channel(slack, "chat.postMessage", channel))
    fired = server.http.post(f"/api/routines/{routine['id']}/run")
    assert fired.status_code == 202, fired.text
    run_id = fired.json()["run_id"]
    server.wait_status(run_id, timeout=60)
    route = delivered(server, run_id)
    assert route["channel"] == channel and route["kind"] == "routine"
    assert len(llm.requests_of("plan", "job tag=RS")) == plans
    texts = [message_text(c) for c in in_channel(slack, "chat.postMessage", channel)[posted_before:]]
    texts += [message_text(c) for c in in_channel(slack, "chat.update", channel)]
    assert any("tag RS" in text for text in texts), texts
    # Its log in the thread says which routine and plan version ran.
    wait_for(lambda: [c for c in in_channel(slack, "files.completeUploadExternal", channel)
                      if f"routine {routine['id']}, plan version 1" in str(c.params.get("initial_comment"))], 20,
             what="the run's log")

    # Bob neither owns it nor is an admin; the admin may pause it, Alice (its owner) resume and remove it.
    refused = ephemeral(server, f"routines pause {routine['id']}", channel, BOB)
    assert refused == "Only the routine's owner or an AutoCode admin can pause it."
    assert db_rows(server.db, "SELECT state FROM routines WHERE id = ?", (routine["id"],))[0]["state"] == "active"
    assert "Routine paused:" in ephemeral(server, f"routines pause {routine['id']}", channel, ADMIN)
    assert "Routine resumed:" in ephemeral(server, f"routines resume {routine['id']}", channel, ALICE)
    assert "There is no routine" in ephemeral(server, f"routines rm {routine['id']}", "COTHER", ALICE)
    assert "removed" in ephemeral(server, f"routines rm {routine['id']}", channel, ALICE)
    assert server.http.get(f"/api/routines/{routine['id']}").status_code == 404


def test_every_shows_the_schedule_and_saves_only_on_save(server, slack, llm):
    channel = "CEVERY"
    assert ephemeral(server, "every monday 9:00 job tag=EV", channel) == "Reading the schedule…"
    (proposal,) = wait_for(lambda: [c for c in in_channel(slack, "chat.postEphemeral", channel)
                                    if "Save it as a routine" in message_text(c)], 30, what="the proposal")
    text = proposal.params["text"]
    assert "Repeat *job tag=EV* on `0 9 * * 1` in UTC; next: " in text and text.count(" 09:00 UTC") == 3
    assert not db_rows(server.db, "SELECT * FROM routines WHERE task = 'job tag=EV'")  # nothing saved yet
    save = proposal.params["blocks"][1]["elements"][0]
    assert save["action_id"] == "autocode_routine_save"

    response = press(server, save["action_id"], save["value"], channel, ALICE, thread_ts="")
    assert response.status_code == 200
    (routine,) = wait_for(lambda: db_rows(server.db, "SELECT * FROM routines WHERE task = 'job tag=EV'"), 10,
                          what="the saved routine")
    assert routine["cron"] == "0 9 * * 1" and routine["tz"] == "UTC" and routine["owner"].endswith(f":{ALICE}")
    assert routine["conversation"].startswith(f"slack:") and f":{channel}:routine-" in routine["conversation"]
    assert json.loads(routine["reply_to_json"]) == {"team": routine["conversation"].split(":")[1],
                                                    "channel": channel, "user": ALICE}
    wait_for(lambda: [c for c in in_channel(slack, "chat.postEphemeral", channel)
                      if f"Saved routine {routine['id']}" in message_text(c)], 10, what="the saved message")

    # Its first run plans the task and pins the plan.
    fired = server.http.post(f"/api/routines/{routine['id']}/run").json()
    run = server.wait_status(fired["run_id"], timeout=60)
    assert run["status"] == "succeeded" and "pinned as version 1" in run["answer"]

    # A schedule firing too often, and a phrase without one, are refused with a sentence; nothing is saved.
    ephemeral(server, "every second job tag=FAST", channel)
    ephemeral(server, "every row of the sheet summed", channel)

    def refusals() -> list[str]:
        texts = [c.params["text"] for c in in_channel(slack, "chat.postEphemeral", channel)]
        found = [t for t in texts if "at most once every" in t or "No schedule found" in t]
        return found if len(found) == 2 else []

    too_often, none = sorted(wait_for(refusals, 30, what="both refusals"))
    assert too_often.startswith("I read the schedule as `* * * * *`, but: '* * * * *' fires as often as every 60")
    assert none.startswith("No schedule found in 'every row of the sheet summed'")
    assert len(db_rows(server.db, "SELECT * FROM routines WHERE task LIKE 'job tag=FAST%'")) == 0


def choose(server, action_id: str, value: str, channel: str, user: str):
    """A choice in a select menu of an ephemeral message."""
    payload = {
        "type": "block_actions", "user": {"id": user, "team_id": TEAM_ID}, "team": {"id": TEAM_ID},
        "api_app_id": "AAUTOCODE", "channel": {"id": channel}, "trigger_id": "trigger.choose",
        "container": {"type": "message", "channel_id": channel}, "response_url": "https://hooks.slack.test/a/2",
        "actions": [{"type": "static_select", "action_id": action_id, "block_id": "b", "action_ts": "1",
                     "selected_option": {"text": {"type": "plain_text", "text": "x"}, "value": value}}],
    }
    return post(server, urlencode({"payload": json.dumps(payload)}).encode(), "application/x-www-form-urlencoded")


def test_repeat_on_an_answer_makes_a_routine_of_that_run(server, slack, llm):
    channel = "CREPEAT"
    slash(server, "job tag=RP", channel)
    run = wait_run(server, channel)
    assert run["status"] == "succeeded"
    delivered(server, run["id"])

    def repeat_buttons() -> list[dict]:
        calls = in_channel(slack, "chat.update", channel) + in_channel(slack, "chat.postMessage", channel)
        return [e for c in calls for b in (c.json_param("blocks") or []) if b["type"] == "actions"
                for e in b["elements"] if e["action_id"] == "autocode_repeat"]

    (button, *_) = wait_for(repeat_buttons, 10, what="the Repeat… button")
    assert button["value"] == run["id"] and button["text"]["text"] == "Repeat…"

    def ephemerals(needle: str) -> list:
        return [c for c in in_channel(slack, "chat.postEphemeral", channel) if needle in c.params.get("text", "")]

    assert action(server, "autocode_repeat", run["id"], channel, user=BOB).status_code == 200
    wait_for(lambda: ephemerals("Only the person who asked for this run"), 10, what="Bob's refusal")
    assert action(server, "autocode_repeat", run["id"], channel, user=ALICE).status_code == 200
    (menu,) = wait_for(lambda: ephemerals("Repeat this run on a schedule"), 10, what="the schedules")
    options = menu.params["blocks"][0]["accessory"]["options"]
    weekly = next(o["value"] for o in options if o["text"]["text"] == "Every Monday at 09:00")
    assert choose(server, "autocode_repeat_when", weekly, channel, ALICE).status_code == 200
    (offer,) = wait_for(lambda: ephemerals("Save it as a routine"), 10, what="the proposal")
    assert "Repeat *job tag=RP* on `0 9 * * 1` in UTC; next: " in offer.params["text"]
    assert not db_rows(server.db, "SELECT * FROM routines WHERE from_run_id = ?", (run["id"],))
    save = offer.params["blocks"][1]["elements"][0]
    assert press(server, save["action_id"], save["value"], channel, ALICE, thread_ts="").status_code == 200
    (routine,) = wait_for(lambda: db_rows(server.db, "SELECT * FROM routines WHERE from_run_id = ?", (run["id"],)),
                          10, what="the routine")
    assert routine["plan_version"] == 1 and routine["cron"] == "0 9 * * 1" and routine["owner"] == run["user"]
    wait_for(lambda: ephemerals(f"Saved routine {routine['id']}"), 10, what="the saved message")

    # The owner's App Home lists it, with Pause and Remove; Bob's does not.
    from tests.test_slack_home import interaction, open_home, publications, published

    seen = publications(slack, ALICE)
    open_home(server, ALICE)
    view = published(slack, ALICE, after=seen)
    text = json.dumps(view, ensure_ascii=False)
    assert "Your routines" in text and "*job tag=RP*" in text and "`0 9 * * 1` (UTC) · active" in text
    values = {e["text"]["text"]: e["value"] for b in view["blocks"] if b["type"] == "actions" for e in b["elements"]
              if e["action_id"] == "autocode_routine_home"}
    assert values["Pause"] == f"pause:{routine['id']}" and values["Remove"] == f"rm:{routine['id']}"
    open_home(server, BOB)
    assert "*job tag=RP*" not in json.dumps(published(slack, BOB))

    def home_press(user: str, value: str) -> None:
        assert interaction(server, {
            "type": "block_actions", "user": {"id": user, "team_id": TEAM_ID}, "team": {"id": TEAM_ID},
            "api_app_id": "AAUTOCODE", "trigger_id": "trigger.home", "container": {"type": "view", "view_id": "V"},
            "view": {"id": "V", "type": "home"}, "actions": [{"type": "button", "action_id": "autocode_routine_home",
                                                              "value": value, "block_id": "b", "action_ts": "1"}],
        }).status_code == 200

    home_press(BOB, f"rm:{routine['id']}")  # not his: nothing changes
    seen = publications(slack, ALICE)
    home_press(ALICE, f"pause:{routine['id']}")
    view = published(slack, ALICE, after=seen)
    assert "· paused" in json.dumps(view, ensure_ascii=False) and db_rows(server.db, "SELECT state FROM routines WHERE id = ?",
                                                      (routine["id"],))[0]["state"] == "paused"


# ------------------------------------------------------------------------------------------ Telegram


def test_a_routine_posts_to_its_telegram_chat_and_routines_lists_it(tmp_path):
    from tests.fakes.telegram_server import FakeTelegram, visible_text
    from tests.server_helpers import Serve, next_uid_base
    from tests.test_telegram import BOT, TOKEN as TG_TOKEN, ask, finished_run, private, telegram_env, wait_calls

    with ScheduleLLM() as llm, FakeTelegram(TG_TOKEN, BOT) as tg:
        server = Serve(telegram_env(llm, tmp_path / "autocode.db", tg.api_url, next_uid_base()),
                       tmp_path / "serve.log", tmp_path)
        try:
            server.wait_ready()
            server.db = tmp_path / "autocode.db"
            chat, user = private(tg, 7301)
            source = finished_run(server, tg, ask(tg, chat, user, "job tag=TR"))
            assert source["status"] == "succeeded"
            routine = server.http.post("/api/routines", json={"from_run": source["id"], "cron": "15 8 * * *",
                                                               "tz": "Asia/Tokyo"}).json()
            plans = len(llm.requests_of("plan", "job tag=TR"))

            def answered(c) -> bool:
                return c.chat_id == 7301 and c.method in ("sendMessage", "editMessageText") \
                    and visible_text(c).startswith("tag TR")

            before = len(wait_calls(tg, answered, "the source run's answer", server))
            fired = server.http.post(f"/api/routines/{routine['id']}/run").json()
            server.wait_status(fired["run_id"], timeout=60)
            wait_calls(tg, answered, "the fired run's answer in the chat", server, count=before + 1)
            assert len(llm.requests_of("plan", "job tag=TR")) == plans

            ask(tg, chat, user, "/routines")
            listed = wait_calls(tg, lambda c: c.method == "sendMessage" and c.chat_id == 7301
                                and "Routines here (1)" in visible_text(c), "the /routines reply", server)
            assert f"• {routine['id']} · active · 15 8 * * * (Asia/Tokyo)" in visible_text(listed[0])
            other, stranger = private(tg, 7302)
            ask(tg, other, stranger, f"/routines rm {routine['id']}")
            wait_calls(tg, lambda c: c.method == "sendMessage" and c.chat_id == 7302
                       and "There is no routine" in visible_text(c), "the stranger's refusal", server)
            ask(tg, chat, user, f"/routines pause {routine['id']}")
            wait_calls(tg, lambda c: c.method == "sendMessage" and c.chat_id == 7301
                       and "Routine paused:" in visible_text(c), "the pause reply", server)
            assert db_rows(server.db, "SELECT state FROM routines")[0]["state"] == "paused"

            # /every: the schedule shown with Save/Cancel; only the asker's Save saves it.
            ask(tg, chat, user, "/every monday 9:00 job tag=TE")
            (proposal,) = wait_calls(tg, lambda c: c.method == "sendMessage" and c.chat_id == 7301
                                     and "Save it as a routine" in visible_text(c), "the proposal", server)
            assert "Repeat “job tag=TE” on 0 9 * * 1 in UTC; next: " in visible_text(proposal)
            save, cancel = proposal.params["reply_markup"]["inline_keyboard"][0]
            assert (save["text"], cancel["text"]) == ("Save routine", "Cancel")
            assert len(db_rows(server.db, "SELECT * FROM routines")) == 1  # nothing saved yet
            query = tg.callback(stranger, proposal.result, save["callback_data"])
            tg.queue(tg.update(callback_query=query))
            wait_calls(tg, lambda c: c.method == "answerCallbackQuery" and c.params["callback_query_id"] == query["id"]
                       and "Only the person who asked" in c.params.get("text", ""), "the stranger's refusal", server)
            tg.queue(tg.update(callback_query=tg.callback(user, proposal.result, save["callback_data"])))
            saved = wait_calls(tg, lambda c: c.method == "sendMessage" and c.chat_id == 7301
                               and "Saved routine" in visible_text(c), "the saved message", server)
            (routine,) = db_rows(server.db, "SELECT * FROM routines WHERE task = 'job tag=TE'")
            assert f"Saved routine {routine['id']}" in visible_text(saved[0])
            assert (routine["cron"], routine["owner"], routine["conversation"]) == ("0 9 * * 1", "telegram:7301",
                                                                                     "telegram:7301")

            # "Repeat…" in Telegram: /every SCHEDULE as a reply to an answer makes a routine of that run.
            answer_id = json.loads(db_rows(server.db, "SELECT reply_to_json FROM runs WHERE id = ?",
                                           (source["id"],))[0]["reply_to_json"])["answer_message_id"]
            answer = {"message_id": answer_id, "date": 0, "chat": chat, "from": tg.bot_user(), "text": "tag TR"}
            tg.queue(tg.update(message=tg.message(chat, user, "/every monday 9:00", reply_to=answer)))
            (offer,) = wait_calls(tg, lambda c: c.method == "sendMessage" and c.chat_id == 7301
                                  and "that answer's code" in visible_text(c), "the repeat proposal", server)
            assert visible_text(offer).startswith("Repeat “job tag=TR” (that answer's code) on 0 9 * * 1 in UTC")
            save = offer.params["reply_markup"]["inline_keyboard"][0][0]
            tg.queue(tg.update(callback_query=tg.callback(user, offer.result, save["callback_data"])))
            wait_calls(tg, lambda c: c.method == "sendMessage" and c.chat_id == 7301
                       and "re-runs that answer's code" in visible_text(c), "the saved repeat", server)
            (repeat,) = db_rows(server.db, "SELECT * FROM routines WHERE from_run_id = ? AND cron = '0 9 * * 1'",
                                (source["id"],))
            assert repeat["plan_version"] == 1 and repeat["owner"] == "telegram:7301"
        finally:
            server.close()
