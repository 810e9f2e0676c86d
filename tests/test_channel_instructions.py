"""A channel's own instructions (agent_core/channel_settings.py, issue 24): untrusted text set like the other
settings, given to the planner and the evaluator as the team's context, shown in the run's log. Real SQLite, real
sandboxed steps, the scripted OpenAI server recording every request."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent_core.channel_settings import MAX_INSTRUCTIONS_CHARS, SettingError
from bots.run_log import run_log
from bots.slack_settings import changes, settings_modal
from bots.telegram_render import settings_text
from tests.conftest import STEP_NUMBERS, plan, verdict
from tests.test_channel_settings import SLACK_CHANNEL, SLACK_THREAD, cli

CHECKOUT = {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}  # this checkout's CLI, not the installed one
INSTRUCTIONS = "Revenue is in cents.\nOur fiscal year starts in April."


def user_messages(body: dict) -> str:
    return "\n".join(m["content"] for m in body["messages"] if m["role"] == "user")


async def test_instructions_reach_planner_and_evaluator_and_the_log(make_agent, llm_server):
    agent = make_agent()
    store = agent.channel_settings
    # Control characters (a terminal escape, a bidi override) are stripped; newlines kept.
    effective = store.set(SLACK_CHANNEL, "instructions", "Revenue is in cents.\x1b[31m\r\nOur fiscal year\u202e "
                          "starts in April.\x00", by="admin")
    assert effective.instructions == "Revenue is in cents.[31m\nOur fiscal year starts in April."
    store.set(SLACK_CHANNEL, "instructions", INSTRUCTIONS)
    assert "instructions: 53 characters" in store.effective(SLACK_THREAD).describe()
    llm_server.reply_json(plan(STEP_NUMBERS))
    llm_server.reply_json(verdict("6"))

    result = await agent.run("add them up", SLACK_THREAD)

    assert result.status == "succeeded", result.error
    planner, evaluator = llm_server.chat_requests()
    for body in (planner, evaluator):
        text = user_messages(body)
        assert "The team's own instructions for this channel" in text
        assert f"<<<\n{INSTRUCTIONS}\n>>>" in text
        assert text.index(INSTRUCTIONS) < text.index("Task: add them up")
    log = run_log(agent.storage, result.run_id)
    assert log is not None and log.instructions == INSTRUCTIONS
    assert f"- The channel's instructions:\n\n```text\n{INSTRUCTIONS}\n```" in log.document

    # Another channel gets none; "none" clears them; too long is refused with the reason, nothing stored.
    llm_server.reply_json(plan(STEP_NUMBERS))
    llm_server.reply_json(verdict("6"))
    await agent.run("add them up", "slack:T1:C2:1700000000.000200")
    assert "team's own instructions" not in user_messages(llm_server.chat_requests()[-2])
    with pytest.raises(SettingError, match=f"at most {MAX_INSTRUCTIONS_CHARS:,} fit"):
        store.set(SLACK_CHANNEL, "instructions", "x" * (MAX_INSTRUCTIONS_CHARS + 1))
    assert store.effective(SLACK_THREAD).instructions == INSTRUCTIONS
    assert store.set(SLACK_CHANNEL, "instructions", "none").instructions == ""
    assert "instructions" not in agent.storage.channel_settings(SLACK_CHANNEL)


async def test_slack_modal_and_telegram_show_and_change_instructions(make_agent):
    agent = make_agent()
    store = agent.channel_settings
    effective = store.set(SLACK_CHANNEL, "instructions", INSTRUCTIONS)
    view = settings_modal(SLACK_CHANNEL, effective, store)
    field = next(b for b in view["blocks"] if b.get("block_id") == "instructions")["element"]
    assert field["initial_value"] == INSTRUCTIONS and field["multiline"]
    assert changes({"instructions": INSTRUCTIONS}, effective, []) == []
    assert changes({"instructions": "Amounts in EUR."}, effective, []) == [("instructions", "Amounts in EUR.")]
    assert changes({"instructions": ""}, effective, []) == [("instructions", "none")]
    assert "• instructions: Revenue is in cents." in settings_text(effective, store.choices(), admin=True)


def test_autocode_settings_sets_instructions_for_the_next_run(tmp_path, llm_server):
    changed = cli(tmp_path, llm_server.base_url, "settings", "--conversation", SLACK_THREAD, "set", "instructions",
                  INSTRUCTIONS, env=CHECKOUT)
    assert changed.returncode == 0, changed.stderr
    assert "instructions: 53 characters" in changed.stdout and "set here: instructions" in changed.stdout
    shown = json.loads(cli(tmp_path, llm_server.base_url, "settings", "--conversation", SLACK_THREAD,
                           "--json", env=CHECKOUT).stdout)
    assert shown["settings"]["instructions"] == INSTRUCTIONS
