"""A scripted server that misbehaves as real small models do (issue 20), through the real openai client, the real
agent loop and real sandboxes: replies that repeat until the cap cuts them, a slow first token, a model still
writing at the deadline, a plan with both a direct answer and subtasks, "satisfactory" over a failed step, numbers
no step produced, and what a failed run leaves in the conversation's history."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from agent_core.events import LLMWaiting
from tests.conftest import STEP_NUMBERS, STEP_TOTAL, direct, plan, subtask, verdict

RUNAWAY = '{"main_task_thought": "dolam_'  # then "dolam_" until the cap, as SmolLM2 wrote


def history(agent: Any, conversation: str) -> list[tuple[str, str]]:
    return [(m["role"], m["text"]) for m in agent.storage.recent_messages(conversation, 10**9)]


# ------------------------------------------------------------------------------------------------ bounded replies

async def test_every_request_carries_the_reply_cap_of_its_purpose(agent_from_env, llm_server):
    ask = subtask("ask", "def ask():\n    return {'reply': llm('Say hi')}")
    llm_server.reply_json(plan(ask))
    llm_server.reply("hi")  # the llm() helper
    llm_server.reply_json(verdict("It said hi."))
    agent = agent_from_env(AUTOCODE_LLM_MAX_TOKENS_PLAN="900", AUTOCODE_LLM_MAX_TOKENS_EVALUATE="700",
                           AUTOCODE_LLM_MAX_TOKENS_HELPER="300")

    result = await agent.run("ask the model")

    assert result.status == "succeeded", result.error
    sent = llm_server.chat_requests()
    assert [(r.get("max_tokens"), r["stream"]) for r in sent] == [(900, True), (300, True), (700, True)]
    assert all(r["stream_options"] == {"include_usage": True} for r in sent)


async def test_a_reply_repeating_until_the_cap_is_asked_again_once_then_told_in_a_sentence(agent_from_env, llm_server):
    llm_server.writing(RUNAWAY, repeat="dolam_")
    llm_server.writing(RUNAWAY, repeat="dolam_")
    agent = agent_from_env(AUTOCODE_LLM_MAX_TOKENS_PLAN="120")

    result = await agent.run("list the first 20 primes", "c1")

    assert result.status == "failed"
    assert result.error == ("The model's plan was cut off at 120 tokens, twice: it kept writing, likely repeating "
                            "itself. Try a stronger model (AUTOCODE_MODEL), or raise AUTOCODE_LLM_MAX_TOKENS_PLAN.")
    first, second = llm_server.chat_requests()
    assert "cut off at 120 tokens" in second["messages"][-1]["content"]  # the re-ask says why
    assert second["max_tokens"] == 120
    assert not agent.executor.opened  # no sandbox for a plan that never came
    calls = agent.storage.llm_calls(result.run_id)
    # The cut calls are recorded with their tokens (so priced), not as 0+0.
    assert [(c["completion_tokens"], c["finish_reason"]) for c in calls] == [(120, "length"), (120, "length")]
    assert all(c["prompt_tokens"] > 0 for c in calls)
    assert history(agent, "c1")[-1] == ("assistant", "(The previous task failed: the model's plan could not be used.)")


async def test_a_cut_reply_then_a_short_one_runs(agent_from_env, llm_server):
    llm_server.writing(RUNAWAY, repeat="dolam_")
    llm_server.reply_json(plan(STEP_NUMBERS))
    llm_server.reply_json(verdict("1, 2, 3"))
    agent = agent_from_env(AUTOCODE_LLM_MAX_TOKENS_PLAN="200")

    result = await agent.run("numbers")

    assert result.status == "succeeded", result.error
    assert result.answer == "1, 2, 3"
    assert len(llm_server.chat_requests()) == 3


# ------------------------------------------------------------------------------------------------ streamed waits

async def test_a_model_still_writing_at_the_deadline_is_told_apart_from_no_answer(agent_from_env, llm_server):
    # First token at once, then 20 tokens a second for far longer than the deadline.
    llm_server.writing(RUNAWAY, repeat="dolam_", token_delay=0.05)
    agent = agent_from_env(AUTOCODE_LLM_DEADLINE="7", AUTOCODE_LLM_TIMEOUT="2", AUTOCODE_LLM_MAX_TOKENS_PLAN="5000")

    started = time.monotonic()
    result = await agent.run("numbers")
    took = time.monotonic() - started

    assert result.status == "failed" and took < 7 + 3, f"{took:.1f} s"
    assert result.error.startswith("The model was still writing its plan after 7 s: ")
    assert result.error.endswith(" tokens/s; try a faster model or raise AUTOCODE_LLM_DEADLINE.")
    assert "did not answer" not in result.error
    assert len(llm_server.chat_requests()) == 1  # never restarted
    request = llm_server.requests[-1]
    deadline = time.monotonic() + 3
    while not request.client_gone and time.monotonic() < deadline:
        time.sleep(0.05)
    assert request.client_gone, "the stream was not closed: the server would keep writing"
    # The progress said the model was writing, with its pace.
    writing = [e for e in agent.seen if isinstance(e, LLMWaiting) and e.tokens]
    assert writing and writing[-1].tokens_per_s > 0
    assert writing[-1].describe().startswith("the LLM is writing (planner)… ")
    (call,) = agent.storage.llm_calls(result.run_id)
    assert call["completion_tokens"] >= 50 and call["prompt_tokens"] > 0 and call["error"] == result.error


async def test_a_slow_first_token_within_the_timeout_is_waited_for(agent_from_env, llm_server):
    llm_server.writing(json.dumps(plan(STEP_NUMBERS)), delay=1.5)
    llm_server.reply_json(verdict("1, 2, 3"))
    agent = agent_from_env(AUTOCODE_LLM_TIMEOUT="3")

    result = await agent.run("numbers")

    assert result.status == "succeeded", result.error
    assert len(llm_server.chat_requests()) == 2


async def test_usage_is_counted_when_the_stream_does_not_say_it(agent_from_env, llm_server):
    llm_server.without_stream_usage()
    text = json.dumps(plan(STEP_NUMBERS))
    llm_server.reply(text)
    llm_server.reply_json(verdict("1, 2, 3"))
    agent = agent_from_env()

    result = await agent.run("numbers")

    assert result.status == "succeeded", result.error
    planned = agent.storage.llm_calls(result.run_id)[0]
    assert planned["completion_tokens"] == -(-len(text) // 4)  # a chunk a token, the fake's four characters each
    assert planned["prompt_tokens"] > 100  # estimated from the request


async def test_a_server_that_cannot_stream_gets_plain_requests(agent_from_env, llm_server):
    llm_server.without_streaming()
    llm_server.reply_json(plan(STEP_NUMBERS))
    llm_server.reply_json(verdict("1, 2, 3"))
    agent = agent_from_env()

    result = await agent.run("numbers")

    assert result.status == "succeeded", result.error
    sent = llm_server.chat_requests()
    assert [bool(r.get("stream")) for r in sent] == [True, False, False]
    assert all(r["max_tokens"] for r in sent)


# ------------------------------------------------------------------------------------------------ honest verdicts

CHECK_FAILS = subtask("AUTOCODE_HISTORY_CHARS", "def AUTOCODE_HISTORY_CHARS():\n    import requests\n    return {}")
RAISES = subtask("get_numbers", "def get_numbers():\n    raise ValueError('no data')")


async def test_satisfactory_over_a_failed_step_is_not_a_success(agent_from_env, llm_server):
    """What SmolLM2 did to "thanks!": a step that failed its check, then "satisfactory" and a fragment as the
    answer. The evaluator is told once; when it insists, the run fails with the step's error."""
    llm_server.reply_json(plan(CHECK_FAILS))
    llm_server.reply_json(verdict("requests"))  # satisfactory over the failed step
    llm_server.reply_json(verdict("requests"))  # and again, told that it failed
    agent = agent_from_env()

    result = await agent.run("thanks!", "c2")

    assert result.status == "failed"
    assert result.error.startswith("The task could not be completed: step AUTOCODE_HISTORY_CHARS failed: Check failed:")
    assert result.answer == ""
    correction = llm_server.chat_requests()[2]["messages"][-1]["content"]
    assert correction.startswith("Step AUTOCODE_HISTORY_CHARS failed, so the run cannot be satisfactory")
    verdicts = agent.storage.evaluations(result.run_id)
    assert [v["satisfactory"] for v in verdicts] == [0, 0]  # stored as overruled
    assert verdicts[0]["thoughts"].startswith("Not satisfactory: step AUTOCODE_HISTORY_CHARS failed")
    # Nothing of the error reaches the history: a small model would copy it into its next plan.
    assert history(agent, "c2") == [("user", "thanks!"),
                                    ("assistant", "(The previous task failed: its steps did not produce an answer.)")]


async def test_satisfactory_over_a_failed_step_then_a_repair_succeeds(agent_from_env, llm_server):
    llm_server.reply_json(plan(RAISES, STEP_TOTAL))
    llm_server.reply_json(verdict("The total is 6."))  # satisfactory, though get_numbers raised
    llm_server.reply_json(verdict(ok=False, retry_from="get_numbers", new=[STEP_NUMBERS, STEP_TOTAL]))
    llm_server.reply_json(verdict("The total is 6."))
    agent = agent_from_env()

    result = await agent.run("add 1, 2 and 3")

    assert result.status == "succeeded", result.error
    assert result.iterations == 2 and result.answer == "The total is 6."
    assert [(s.iteration, s.tool_name, s.status) for s in result.steps] == [
        (1, "get_numbers", "error"), (2, "get_numbers", "ok"), (2, "add_up", "ok")]


async def test_numbers_no_step_produced_are_flagged_not_failed(agent_from_env, llm_server):
    llm_server.reply_json(plan(STEP_NUMBERS, STEP_TOTAL))
    llm_server.reply_json(verdict("The total is 6, up 41.7% from last year's 1,250."))
    agent = agent_from_env()

    result = await agent.run("Add 1, 2 and 3")

    assert result.status == "succeeded"
    assert result.unsupported == ["41.7", "1,250"]
    run = agent.storage.get_run(result.run_id)
    assert json.loads(run["unsupported_json"]) == ["41.7", "1,250"]
    from bots.run_log import run_log
    log = run_log(agent.storage, result.run_id)
    assert log.unsupported_line() == "Not found in any step's output: 41.7, 1,250"
    assert "- Warning: Not found in any step's output: 41.7, 1,250" in log.document


def test_answer_check_rounding_percentages_and_small_numbers():
    from agent_core.answer_check import unsupported_numbers

    outputs = ['{"km": 264.318, "growth": 0.41379, "total": 1234567, "from": "2024-01"}']
    assert unsupported_numbers("Paris–Brussels: 264.3 km; +41.4%; 1,234,567 in all since 2024-01.", outputs) == []
    assert unsupported_numbers("3 regions, 264.4 km and 99 items; run e62c0872b3b7", outputs) == ["264.4", "99"]


# ------------------------------------------------------------------------------------------------ direct answers

async def test_a_plan_with_both_keeps_subtasks_and_a_schema_shaped_direct_answer_opens_no_sandbox(
        agent_from_env, llm_server):
    # The schema's shape: the model chose the direct-answer branch.
    llm_server.reply_json({"main_task_thought": "a greeting", "reply": {"direct_answer": "Hello! What can I do?"}})
    agent = agent_from_env()

    result = await agent.run("hi there", "c3")

    assert result.status == "succeeded" and result.answer == "Hello! What can I do?"
    assert not agent.executor.opened and len(llm_server.chat_requests()) == 1
    # A server that ignores the schema and sends both: the subtasks run (an answer without code may be made up).
    both = plan(STEP_NUMBERS)
    both["direct_answer"] = "It is 42."
    llm_server.reply_json(both)
    llm_server.reply_json(verdict("1, 2, 3"))

    result = await agent.run("numbers", "c3")

    assert result.status == "succeeded" and result.answer == "1, 2, 3" and agent.executor.opened


# ------------------------------------------------------------------------------------------------ clean history

async def test_failed_runs_leave_a_neutral_note_and_never_their_error(agent_from_env, llm_server):
    llm_server.error(401, "Incorrect API key provided: sk-test")
    agent = agent_from_env()

    result = await agent.run("numbers", "c4")

    assert result.status == "failed" and "401" in result.error
    llm_server.reply_json(direct("Hi!"))
    await agent.run("hello", "c4")
    prompt = llm_server.chat_requests()[-1]["messages"][-1]["content"]
    assert "AutoCode: (The previous task failed: the model could not be reached.)" in prompt
    for leaked in ("401", "http://", "AUTOCODE_", "API key"):
        assert leaked not in prompt


def test_autocode_run_without_a_conversation_starts_a_fresh_one(tmp_path, llm_server):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "AUTOCODE_"))}
    env.update(OPENAI_BASE_URL=llm_server.base_url, OPENAI_API_KEY="sk-cli", AUTOCODE_MODEL="fake-model",
               AUTOCODE_DB=str(tmp_path / "cli.db"), PYTHONPATH=str(Path(__file__).parents[1]))
    llm_server.reply_json(direct("First answer."))
    llm_server.reply_json(direct("Second answer."))

    for task in ("first task", "second task"):
        proc = subprocess.run([sys.executable, "-m", "agent_core.cli", "run", "--json", task], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
    first, second = (json.loads(r.response_body) for r in llm_server.requests)  # noqa: F841 (answered)
    second_prompt = llm_server.chat_requests()[1]["messages"][-1]["content"]
    assert "first task" not in second_prompt and "First answer." not in second_prompt


async def test_a_call_cancelled_while_the_model_writes_is_recorded_with_its_tokens(agent_from_env, llm_server):
    import asyncio

    llm_server.writing(RUNAWAY, repeat="dolam_", token_delay=0.02)
    agent = agent_from_env(AUTOCODE_LLM_MAX_TOKENS_PLAN="5000")
    task = asyncio.create_task(agent.run("numbers", "c5"))
    deadline = time.monotonic() + 10
    while (not llm_server.requests or llm_server.requests[-1].streamed_tokens < 40) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    (run,) = agent.storage.list_runs("c5")
    assert run["status"] == "cancelled"
    (call,) = agent.storage.llm_calls(run["id"])
    assert call["completion_tokens"] >= 40 and call["prompt_tokens"] > 0  # recorded, and so priced
    assert history(agent, "c5")[-1] == ("assistant", "(The previous task was cancelled before it finished.)")


async def test_a_direct_answer_stating_a_number_nothing_computed_is_asked_for_code(agent_from_env, llm_server):
    """What SmolLM2 on llama-server did with "what is 17 * 23?": a direct answer, "420" (issue 20). The planner is
    asked once more with the subtasks-only schema, and the steps compute it."""
    multiply = subtask("multiply", "def multiply():\n    return {'product': 17 * 23}")
    llm_server.reply_json({"main_task_thought": "", "reply": {"direct_answer": "17 * 23 = 420"}})
    llm_server.reply_json({"main_task_thought": "compute it", "reply": {"subtasks": [multiply]}})
    llm_server.reply_json(verdict("17 × 23 = 391"))
    agent = agent_from_env()

    result = await agent.run("what is 17 * 23?")

    assert result.status == "succeeded" and result.answer == "17 × 23 = 391" and result.unsupported == []
    first, second = llm_server.chat_requests()[:2]
    assert "420" in second["messages"][-1]["content"] and "computes the answer" in second["messages"][-1]["content"]
    branches = second["response_format"]["json_schema"]["schema"]["properties"]["reply"]["anyOf"]
    assert [list(b["properties"]) for b in branches] == [["subtasks"]]  # only code this time
    # A greeting's direct answer, or one quoting the task or the conversation, goes out as it is: no second call.
    llm_server.reply_json(direct("You asked about 17 and 23: 391, as computed above."))
    result = await agent.run("thanks! what were the numbers?")
    assert result.status == "succeeded" and len(llm_server.chat_requests()) == 4
