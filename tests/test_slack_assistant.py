"""Slack's assistant surface end to end (bots/slack_assistant.py): signed events POSTed to a running `autocode
serve`, whose Bolt app (with the AsyncAssistant middleware) talks to the fake Slack Web API over HTTP; every call
is checked against slack_sdk's signatures by the fake. The LLM plans three steps for the offices task, so the
thread's status line has steps to follow."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from agent_core.config import DEFAULT_SUGGESTED_PROMPTS
from agent_core.events import (
    EvaluationDone, LLMWaiting, PlanReady, RepairPlanned, RunFinished, RunStarted, StepFinished, StepStarted,
)
from bots.slack_assistant import StatusLine
from tests.conftest import subtask
from tests.fakes.slack_server import FakeSlack, message_text
from tests.server_helpers import Serve, db_rows, wait_for
from tests.test_slack import slack_server
from tests.test_slack import (
    ALICE, MALLORY, TOKEN, PlottingLLM, answers, delivered, file_message, send_event, settled,
)

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the server's sandbox needs Linux")

_ids = itertools.count(1)
OFFICES = "Which two offices are closest? Paris 48.8566,2.3522; London 51.5072,-0.1276; Brussels 50.8503,4.3517"
STEPS = [
    subtask("load_offices", "def load_offices():\n    import time\n    time.sleep(0.2)\n"
                            "    return {'offices': ['Paris', 'London', 'Brussels']}"),
    subtask("closest_pair", "def closest_pair(previous_output):\n    import time\n    time.sleep(0.2)\n"
                            "    return {'pair': ['Paris', 'Brussels']}", "load_offices"),
    subtask("report", "def report(previous_output):\n    return {'tag': ' and '.join(previous_output['pair'])}",
            "closest_pair"),
]


class OfficesLLM(PlottingLLM):
    """test_slack's PlottingLLM (a step reads the first line of each file given); a task about offices gets the
    three steps load_offices → closest_pair → report."""

    def _respond(self, body: dict[str, Any]) -> dict[str, Any]:
        spec = super()._respond(body)
        plan = spec.get("json") or {}
        if "subtasks" in plan and "offices" in plan["main_task"]:
            plan["subtasks"] = [dict(step) for step in STEPS]
        return spec


@pytest.fixture(scope="module")
def slack():
    with FakeSlack() as fake:
        yield fake


@pytest.fixture(scope="module")
def server(slack, tmp_path_factory):
    directory = tmp_path_factory.mktemp("slack-assistant")
    with OfficesLLM() as llm, slack_server(slack, llm, directory, SLACK_ALLOWED_USERS=ALICE,
                                           AUTOCODE_SANDBOX_MAX_WORKERS="64",
                                           AUTOCODE_SANDBOX_UID_BASE="82000") as serve:
        yield serve


def thread_started(channel: str, user: str = ALICE) -> dict[str, Any]:
    thread_ts = f"{1700000000 + next(_ids)}.000300"
    return {"type": "assistant_thread_started", "event_ts": thread_ts,
            "assistant_thread": {"user_id": user, "channel_id": channel, "thread_ts": thread_ts,
                                 "context": {"channel_id": "CGENERAL", "team_id": "T0FAKE", "enterprise_id": None}}}


def dm(channel: str, text: str, thread_ts: str | None, user: str = ALICE) -> dict[str, Any]:
    ts = f"{1700000000 + next(_ids)}.000500"
    event = {"type": "message", "channel_type": "im", "user": user, "text": text, "ts": ts, "channel": channel,
             "event_ts": ts}
    if thread_ts:
        event["thread_ts"] = thread_ts
    return event


def runs_of(server: Serve, conversation: str) -> list[dict[str, Any]]:
    return db_rows(server.db, "SELECT * FROM runs WHERE conversation = ? ORDER BY seq", (conversation,))


def finished_run(server: Serve, conversation: str, count: int = 1) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        runs = runs_of(server, conversation)
        return runs[-1] if len(runs) >= count and runs[-1]["status"] in ("succeeded", "failed") else None

    return wait_for(done, 60, what=f"run {count} of {conversation}")


def test_status_line_follows_a_runs_events():
    line = StatusLine()
    seen = [line.apply(e) for e in (
        RunStarted("r", "c", "t"), LLMWaiting("r", "plan", 12.0, 2, 3, "timeout"), PlanReady("r", 1, "", ["a", "b"]),
        StepStarted("r", 1, 1, 2, "a", ""), StepFinished("r", 1, 1, 2, "a", True, 5),
        StepStarted("r", 1, 2, 2, "b", ""), StepFinished("r", 1, 2, 2, "b", False, 5, "KeyError"),
        EvaluationDone("r", 1, False, "wrong key"), RepairPlanned("r", 2, "b", ["a", "b"], ["a"]),
        StepStarted("r", 2, 2, 2, "b", ""), StepFinished("r", 2, 2, 2, "b", True, 5),
        EvaluationDone("r", 2, True, "ok"), RunFinished("r", "succeeded", "done", None, 2, {}),
    )]
    assert seen[0] == "planning…"
    assert seen[1] == "waiting for the LLM (planner)… 12 s, retry 1 of 2 (timeout)"  # over "planning…"
    assert seen[2] == "planning…"  # the wait is over
    assert seen[3:] == ["running step 1/2: a", None, "running step 2/2: b", "checking the result…", "repairing…",
                        "repairing from b…", "running step 2/2: b", "checking the result…", None, ""]


def test_an_assistant_thread_from_its_prompts_to_the_answer_with_the_status_following_the_steps(server, slack):
    channel = "D0ALICE1"
    started = thread_started(channel)
    thread_ts = started["assistant_thread"]["thread_ts"]
    assert send_event(server, started).status_code == 200

    prompts = wait_for(lambda: [c for c in slack.calls_of("assistant.threads.setSuggestedPrompts")
                                if c.params.get("channel_id") == channel], 10, what="the suggested prompts")
    assert prompts[0].params["thread_ts"] == thread_ts
    assert [(p["title"], p["message"]) for p in prompts[0].json_param("prompts")] == list(DEFAULT_SUGGESTED_PROMPTS)

    assert send_event(server, dm(channel, OFFICES, thread_ts)).status_code == 200
    conversation = f"slack:T0FAKE:{channel}:{thread_ts}"
    run = finished_run(server, conversation)
    assert run["status"] == "succeeded", run
    delivered(server, run["id"])
    statuses = wait_for(lambda: (s := slack.statuses(channel, thread_ts)) and s[-1] == "" and s, 30,
                        what="the status to be cleared")
    assert statuses == ["planning…", "running step 1/3: load_offices", "running step 2/3: closest_pair",
                        "running step 3/3: report", "checking the result…", ""]

    in_thread = [c for c in slack.calls_of("chat.postMessage") + slack.calls_of("chat.startStream")
                 if c.params.get("channel") == channel]
    assert all(c.params.get("thread_ts") == thread_ts for c in in_thread)
    # The answer is streamed into the thread, whole.
    ((answer_ts, streamed),) = [(ts, s) for ts, s in slack.streams(channel).items() if "Paris and Brussels" in s["text"]]
    assert streamed["thread_ts"] == thread_ts and streamed["state"] == "stopped"
    status_calls = [c for c in slack.calls_of("assistant.threads.setStatus") if c.params.get("channel_id") == channel]
    # The progress message comes first (a post in the thread clears the status line), the clearing after the answer.
    assert min(c.at for c in in_thread) < status_calls[0].at
    answer_at = next(c.at for c in slack.calls_of("chat.stopStream") if c.params["ts"] == answer_ts)
    assert status_calls[-1].at > answer_at

    titles = [c for c in slack.calls_of("assistant.threads.setTitle") if c.params.get("channel_id") == channel]
    assert [(c.params["thread_ts"], c.params["title"]) for c in titles] == [(thread_ts, OFFICES[:79] + "…")]

    # A follow-up in the thread continues the same conversation (history), and the title stays.
    assert send_event(server, dm(channel, "job tag=AGAIN", thread_ts)).status_code == 200
    second = finished_run(server, conversation, count=2)
    assert second["status"] == "succeeded" and second["conversation"] == conversation
    wait_for(lambda: slack.statuses(channel, thread_ts)[-1:] == [""] and len(slack.statuses(channel, thread_ts)) > 6,
             30, what="the second run's statuses")
    assert slack.statuses(channel, thread_ts)[6:] == ["planning…", "running step 1/1: work", "checking the result…",
                                                       ""]
    assert len([c for c in slack.calls_of("assistant.threads.setTitle") if c.params.get("channel_id") == channel]) == 1
    assert slack.rejected == []


def test_a_dm_thread_that_is_not_an_assistant_thread_works_as_before(server, slack):
    channel = "D0ALICE2"
    top = dm(channel, "job tag=TOP", None)
    assert send_event(server, top).status_code == 200
    conversation = f"slack:T0FAKE:{channel}:{top['ts']}"
    assert finished_run(server, conversation)["status"] == "succeeded"
    # A reply in that DM's thread (which Bolt's middleware sees as an assistant-thread message) continues it.
    assert send_event(server, dm(channel, "job tag=REPLY", top["ts"])).status_code == 200
    reply = finished_run(server, conversation, count=2)
    assert reply["status"] == "succeeded"
    delivered(server, reply["id"])  # a status line would have been cleared only after this
    assert not [c for c in slack.calls if c.params.get("channel_id") == channel
                and c.method.startswith("assistant.threads.")]


def test_a_user_not_allowed_gets_a_refusal_and_no_prompts(server, slack):
    channel = "D0MALLORY"
    assert send_event(server, thread_started(channel, user=MALLORY)).status_code == 200
    refusal = wait_for(lambda: [c for c in slack.calls_of("chat.postMessage") if c.params.get("channel") == channel],
                       10, what="the refusal")
    assert "not on AutoCode's list" in message_text(refusal[0])
    assert not [c for c in slack.calls_of("assistant.threads.setSuggestedPrompts")
                if c.params.get("channel_id") == channel]


def test_the_manifest_has_the_assistant_feature_scope_and_events():
    yaml = pytest.importorskip("yaml")
    from bots.slack import BOT_SCOPES

    manifest = yaml.safe_load((Path(__file__).resolve().parent.parent / "slack" / "manifest.yml").read_text())
    assert "assistant:write" in BOT_SCOPES and "assistant:write" in manifest["oauth_config"]["scopes"]["bot"]
    assert {"assistant_thread_started", "assistant_thread_context_changed"} <= set(
        manifest["settings"]["event_subscriptions"]["bot_events"])
    view = manifest["features"]["assistant_view"]
    assert view["assistant_description"]
    assert [(p["title"], p["message"]) for p in view["suggested_prompts"]] == list(DEFAULT_SUGGESTED_PROMPTS)
    assert manifest["features"]["app_home"]["messages_tab_enabled"] is True


def test_a_changed_thread_context_is_saved_in_the_adapters_store(server, slack):
    channel = "D0ALICE3"
    started = thread_started(channel)
    thread_ts = started["assistant_thread"]["thread_ts"]
    assert send_event(server, started).status_code == 200
    changed = {"type": "assistant_thread_context_changed", "event_ts": thread_ts, "assistant_thread": {
        "user_id": ALICE, "channel_id": channel, "thread_ts": thread_ts,
        "context": {"channel_id": "CRANDOM", "team_id": "T0FAKE", "enterprise_id": None}}}
    assert send_event(server, changed).status_code == 200
    store = server.db.with_name(server.db.stem + ".slack.db")
    rows = db_rows(store, "SELECT context_json FROM autocode_slack_assistant_threads WHERE channel = ? AND "
                          "thread_ts = ?", (channel, thread_ts))
    assert [json.loads(r["context_json"])["channel_id"] for r in rows] == ["CRANDOM"]


def test_a_file_sent_in_an_assistant_thread_reaches_the_step_like_any_dm(server, slack):
    channel = "D0ALICE4"
    started = thread_started(channel)
    thread_ts = started["assistant_thread"]["thread_ts"]
    assert send_event(server, started).status_code == 200
    shared = slack.add_file("notes.txt", b"quarterly numbers look fine\nsecond line\n", token=TOKEN)
    event = file_message(channel, [shared], text="what is in this file?", thread_ts=thread_ts, channel_type="im")
    assert send_event(server, event).status_code == 200
    run = finished_run(server, f"slack:T0FAKE:{channel}:{thread_ts}")
    assert run["status"] == "succeeded", run
    delivered(server, run["id"])
    settled(slack, channel)
    assert "tag notes.txt: quarterly numbers look fine" in answers(slack, channel)
    assert slack.statuses(channel, thread_ts) == ["planning…", "running step 1/1: work", "checking the result…", ""]


def test_suggested_prompts_are_configurable_and_checked():
    from agent_core.config import ConfigError, Settings

    def prompts(raw: str) -> tuple[tuple[str, str], ...]:
        return Settings.from_env({"AUTOCODE_SLACK_SUGGESTED_PROMPTS": raw}).slack_suggested_prompts

    assert prompts("") == DEFAULT_SUGGESTED_PROMPTS and prompts("off") == () and prompts("[]") == ()
    assert prompts('["Plot sales", {"title": "Sum", "message": "Sum 1..100"}]') == (
        ("Plot sales", "Plot sales"), ("Sum", "Sum 1..100"))
    for bad in ("Plot sales", '[{"title": "no message"}]', '["a", "b", "c", "d", "e"]', '{"title": "x"}'):
        with pytest.raises(ConfigError, match="AUTOCODE_SLACK_SUGGESTED_PROMPTS"):
            prompts(bad)
