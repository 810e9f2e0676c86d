"""Replies of real-world models through the whole loop (the real openai client over HTTP to the scripted server, real
sandbox, real SQLite): reasoning in a separate field or before the JSON, and a plan or an evaluation that stays
unusable, which the user reads as a plain sentence while the exact error goes to the log, the run page and
`autocode show`."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

from starlette.applications import Starlette
from starlette.testclient import TestClient

from agent_core.viewer import routes

from tests.conftest import STEP_NUMBERS, STEP_TOTAL, plan, subtask, verdict

PLAN_SENTENCE = ("The model could not make a usable plan for this task; try rephrasing it, "
                 "or use a stronger model (AUTOCODE_MODEL).")
EVALUATION_SENTENCE = ("The model could not make a usable evaluation of the results; try rephrasing the task, "
                       "or use a stronger model (AUTOCODE_MODEL).")
DRAFT = plan(subtask("draft_step", "def draft_step():\n    return {'draft': True}"))


# ---------------------------------------------------------------- reasoning models


async def test_plan_and_verdict_left_in_the_reasoning_field_are_used(make_agent, llm_server):
    # vLLM / DeepSeek: content null, reasoning_content; Ollama / OpenRouter: content "", reasoning.
    llm_server.reply_message(None, reasoning_content="The user wants the numbers.\n" + json.dumps(plan(STEP_NUMBERS)))
    llm_server.reply_message("", reasoning=json.dumps(verdict("1, 2, 3")))
    agent = make_agent()

    result = await agent.run("List numbers")

    assert result.status == "succeeded", result.error
    assert result.answer == "1, 2, 3"
    assert [s.tool_name for s in result.steps] == ["get_numbers"]
    assert len(llm_server.chat_requests()) == 2  # nothing re-asked
    assert all(c["error"] is None for c in agent.storage.llm_calls(result.run_id))


async def test_reasoning_beside_the_content_is_ignored(make_agent, llm_server):
    llm_server.reply_message(json.dumps(plan(STEP_NUMBERS, STEP_TOTAL)), reasoning_content="Draft: " + json.dumps(DRAFT))
    llm_server.reply_message(json.dumps(verdict("The total is 6.")), reasoning='{"satisfactory": false}')
    agent = make_agent()

    result = await agent.run("Add 1, 2 and 3")

    assert result.status == "succeeded", result.error
    assert result.answer == "The total is 6."
    assert [s.tool_name for s in result.steps] == ["get_numbers", "add_up"]


async def test_think_block_with_a_draft_before_the_plan(make_agent, llm_server):
    llm_server.reply(f"<think>\nOne step? {json.dumps(DRAFT)}\nNo: two steps.\n</think>\n\n"
                     + json.dumps(plan(STEP_NUMBERS, STEP_TOTAL)))
    llm_server.reply("<think>The total is right.</think>" + json.dumps(verdict("The total is 6.")))
    agent = make_agent()

    result = await agent.run("Add 1, 2 and 3")

    assert result.status == "succeeded", result.error
    assert [s.tool_name for s in result.steps] == ["get_numbers", "add_up"]
    assert len(llm_server.chat_requests()) == 2


# ---------------------------------------------------------------- a plan or evaluation that stays unusable


def _autocode_show(settings, run_id: str) -> str:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "AUTOCODE_"))}
    environ["AUTOCODE_DB"] = str(settings.db_path)
    proc = subprocess.run([sys.executable, "-P", "-m", "agent_core.cli", "show", run_id], env=environ,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _run_page(agent, run_id: str) -> str:
    run = agent.storage.get_run(run_id)
    with TestClient(Starlette(routes=routes(agent.settings, agent.storage))) as client:
        page = client.get(f"/runs/{run['view_token']}")
    assert page.status_code == 200
    return page.text


async def test_unusable_plan_reads_as_a_plain_sentence(make_agent, llm_server, caplog):
    # What a grammar-constrained small model produced against the old schema.
    llm_server.reply_json({"main_task": "greet", "main_task_thought": "", "subtasks": []})
    for _ in range(2):
        llm_server.reply_json(plan(subtask("The alien yourself!", "def x():\n    return {}")))
    agent = make_agent()
    finished = []
    agent.events.subscribe(lambda event: finished.append(event) if type(event).__name__ == "RunFinished" else None)

    with caplog.at_level(logging.WARNING):
        result = await agent.run("Say hello to the alien", "c1")

    assert result.status == "failed"
    assert result.error == PLAN_SENTENCE
    assert finished[0].error == PLAN_SENTENCE  # what the chat adapters and the console show
    run = agent.storage.get_run(result.run_id)
    assert run["error"] == PLAN_SENTENCE
    # The history gets a neutral note, not the sentence (issue 20): a small model copies what it reads.
    assert agent.storage.recent_messages("c1", 10_000)[-1]["text"] == "(The previous task failed: the model's plan could not be used.)"
    assert "so is direct_answer" not in json.dumps(run) and "Python identifier" not in json.dumps(run)

    exact = "tool_name 'The alien yourself!' is not a Python identifier"
    calls = agent.storage.llm_calls(result.run_id)
    assert [c["purpose"] for c in calls] == ["plan"] * 3
    assert calls[0]["error"] is None and calls[1]["error"] is None
    assert exact in calls[2]["error"] and "after 3 attempts" in calls[2]["error"]
    assert any(exact in r.getMessage() and result.run_id in r.getMessage() for r in caplog.records)
    assert any("subtasks is empty and so is direct_answer" in r.getMessage() for r in caplog.records)  # attempt 1

    shown = _autocode_show(agent.settings, result.run_id)
    assert f"Error: {PLAN_SENTENCE}" in shown
    assert exact in shown
    page = _run_page(agent, result.run_id)
    assert PLAN_SENTENCE in page
    assert "is not a Python identifier" in page


async def test_unusable_evaluation_reads_as_a_plain_sentence(make_agent, llm_server):
    llm_server.reply_json(plan(STEP_NUMBERS))
    llm_server.reply_json(verdict(ok=False, retry_from="fetch", new=[STEP_NUMBERS]))
    for _ in range(2):
        llm_server.reply_json({"satisfactory": True, "thoughts": "fine", "final_answer": "", "retry_from": "",
                               "new_subtasks": []})
    agent = make_agent()

    result = await agent.run("List numbers")

    assert result.status == "failed"
    assert result.error == EVALUATION_SENTENCE
    assert [s.tool_name for s in result.steps] == ["get_numbers"]  # the step ran; only the verdict failed
    calls = agent.storage.llm_calls(result.run_id)
    assert [c["purpose"] for c in calls] == ["plan", "evaluate", "evaluate", "evaluate"]
    assert "satisfactory is true but final_answer is empty" in calls[-1]["error"]
    assert all(c["error"] is None for c in calls[:-1])
    assert "final_answer is empty" in _autocode_show(agent.settings, result.run_id)


async def test_an_unreachable_llm_keeps_its_own_message(make_agent):
    agent = make_agent(openai_base_url="http://127.0.0.1:9/v1", llm_max_retries=0)

    result = await agent.run("List numbers")

    assert result.status == "failed"
    assert result.error != PLAN_SENTENCE and "reach" in result.error.lower()  # not "use a stronger model"
    assert all(c["error"] for c in agent.storage.llm_calls(result.run_id))
