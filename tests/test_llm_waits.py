"""LLM waits are bounded and visible (issue 12): one deadline per LLM call (AUTOCODE_LLM_DEADLINE) over all its
tries, retries that honour Retry-After, and LLMWaiting events while a call waits — against the fake OpenAI server
over real HTTP (a server that never answers, one that answers 429/503 first), through the real agent loop, the
real sandbox and `autocode run` as a subprocess. Settings come from environment variables, as a user sets them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from typing import Any


from agent_core.events import LLMWaitOver, LLMWaiting, RunEvent, RunFinished
from tests.conftest import STEP_NUMBERS, plan, subtask, verdict


def waits(events: list[RunEvent]) -> list[LLMWaiting]:
    return [e for e in events if isinstance(e, LLMWaiting)]


async def test_a_server_that_never_answers_ends_the_run_at_the_deadline_and_says_so_meanwhile(
        agent_from_env, llm_server):
    llm_server.never_answer()
    agent = agent_from_env(AUTOCODE_LLM_DEADLINE="6", AUTOCODE_LLM_TIMEOUT="10", AUTOCODE_LLM_MAX_RETRIES="3")

    started = time.monotonic()
    result = await agent.run("numbers")
    took = time.monotonic() - started

    assert result.status == "failed"
    assert took < 6 + 2, f"the run took {took:.1f} s with a 6 s deadline"
    url = llm_server.base_url
    # The wait is measured, so on a loaded machine it may read 6.1 s or so: the wording is exact, the number close.
    match = re.fullmatch(rf"The LLM at {re.escape(url)} did not answer: waited (\d+\.\d) s over 1 attempt "
                         r"\(AUTOCODE_LLM_DEADLINE is 6 s\)\.", result.error or "")
    assert match and 6.0 <= float(match.group(1)) < 7.5, result.error
    # After 5 s of waiting the run said so, on the planner's first try; no retry fits in the second left.
    (waiting,) = waits(agent.seen)
    assert (waiting.purpose, waiting.attempt, waiting.attempts, waiting.reason) == ("plan", 1, 1, "")
    assert 5 <= waiting.waited_s < 6
    assert waiting.describe() == "waiting for the LLM (planner)… 5 s"
    over = [e for e in agent.seen if isinstance(e, LLMWaitOver)]
    assert [(e.purpose, e.ok, e.requests) for e in over] == [("plan", False, 1)]
    assert isinstance(agent.seen[-1], RunFinished) and agent.seen[-1].error == result.error
    stored = [e["type"] for e in agent.storage.events(result.run_id)]
    assert "llm_waiting" in stored and "llm_wait_over" in stored
    (call,) = agent.storage.llm_calls(result.run_id)
    assert call["error"] == result.error and call["purpose"] == "plan"
    assert len(llm_server.chat_requests()) == 1


async def test_a_try_without_a_first_token_ends_at_the_timeout_and_is_not_retried(agent_from_env, llm_server):
    """A server that does not start answering within AUTOCODE_LLM_TIMEOUT may be busy writing someone's reply: a new
    request would only start over, so the call ends there, saying which limit it was (issue 20)."""
    llm_server.never_answer()
    agent = agent_from_env(AUTOCODE_LLM_DEADLINE="30", AUTOCODE_LLM_TIMEOUT="1", AUTOCODE_LLM_MAX_RETRIES="3")

    started = time.monotonic()
    result = await agent.run("numbers")
    took = time.monotonic() - started

    assert result.status == "failed" and took < 1 + 3, f"the run took {took:.1f} s with a 1 s timeout"
    assert len(llm_server.chat_requests()) == 1
    match = re.fullmatch(rf"The LLM at {re.escape(llm_server.base_url)} did not answer: waited ([\d.]+) s "
                         r"over 1 attempt \(AUTOCODE_LLM_TIMEOUT is 1 s\)\.", result.error or "")
    assert match and 1 <= float(match.group(1)) < 2, result.error
    assert not waits(agent.seen)
    assert agent.storage.llm_calls(result.run_id)[0]["retries"] == 0


async def test_rate_limits_and_errors_are_retried_as_the_server_asks_and_shown(agent_from_env, llm_server):
    llm_server.busy(1, 503, retry_after=None)  # backoff
    llm_server.busy(2, 429, retry_after=1)  # Retry-After: 1
    llm_server.reply_json(plan(STEP_NUMBERS))
    llm_server.reply_json(verdict("1, 2, 3"))
    agent = agent_from_env(AUTOCODE_LLM_MAX_RETRIES="3", AUTOCODE_LLM_TIMEOUT="10")

    result = await agent.run("numbers")

    assert result.status == "succeeded", result.error
    assert [r.response_status for r in llm_server.requests] == [503, 429, 429, 200, 200]
    retries = waits(agent.seen)
    assert [(w.purpose, w.attempt, w.attempts, w.reason) for w in retries] == [
        ("plan", 2, 4, "HTTP 503"), ("plan", 3, 4, "HTTP 429"), ("plan", 4, 4, "HTTP 429")]
    assert retries[2].waited_s - retries[1].waited_s >= 0.95, "Retry-After: 1 was not waited"
    assert retries[2].describe().endswith("retry 3 of 3 (HTTP 429)")
    over = [e for e in agent.seen if isinstance(e, LLMWaitOver)]
    assert [(e.purpose, e.ok, e.requests) for e in over] == [("plan", True, 4)]
    assert agent.storage.llm_calls(result.run_id)[0]["retries"] == 3


async def test_a_retry_after_past_the_deadline_fails_at_once(agent_from_env, llm_server):
    llm_server.busy(1, 429, retry_after=600)
    agent = agent_from_env(AUTOCODE_LLM_DEADLINE="30")

    started = time.monotonic()
    result = await agent.run("numbers")

    assert result.status == "failed" and time.monotonic() - started < 10
    assert result.error.startswith(f"The LLM at {llm_server.base_url} answered HTTP 429: waited ")
    assert result.error.endswith("over 1 attempt (it asked to wait 600 s; AUTOCODE_LLM_DEADLINE is 30 s).")


ASKING_STEP = subtask("ask", (
    "def ask():\n"
    "    try:\n"
    "        return {'reply': llm('Say hi')}\n"
    "    except Exception as exc:\n"
    "        return {'error': type(exc).__name__ + ': ' + str(exc)}\n"
))


async def test_an_llm_call_from_a_step_ends_before_the_tool_timeout_saying_why(agent_from_env, llm_server):
    def respond(body: dict[str, Any]) -> dict[str, Any]:
        if body.get("response_format"):  # the evaluator
            return {"json": verdict("no reply")}
        return {"content": "hi", "delay": 3600}  # the llm() helper: never answered

    llm_server.reply_json(plan(ASKING_STEP))
    llm_server.responder(respond)
    agent = agent_from_env(AUTOCODE_TOOL_TIMEOUT="3", AUTOCODE_LLM_TIMEOUT="10", AUTOCODE_LLM_MAX_RETRIES="3")

    result = await agent.run("ask the llm")

    assert result.status == "succeeded", result.error
    error = result.steps[0].output["error"]
    assert re.fullmatch(rf"ToolCallError: llm: LLMError: The LLM at {re.escape(llm_server.base_url)} did not answer: waited [\d.]+ s "
                        r"over 1 attempt \(AUTOCODE_TOOL_TIMEOUT is 3 s\)\.", error), error
    helper_calls = [c for c in agent.storage.llm_calls(result.run_id) if c["purpose"] == "helper"]
    assert len(helper_calls) == 1 and helper_calls[0]["error"] in error


def test_the_console_shows_the_waiting_lines_and_the_total_wait(tmp_path, llm_server):
    llm_server.busy(10, 503, retry_after=None)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "AUTOCODE_"))}
    env.update(OPENAI_BASE_URL=llm_server.base_url, OPENAI_API_KEY="sk-cli", AUTOCODE_MODEL="fake-model",
               AUTOCODE_DB=str(tmp_path / "cli.db"), AUTOCODE_LLM_DEADLINE="20", AUTOCODE_LLM_TIMEOUT="5",
               AUTOCODE_LLM_MAX_RETRIES="2")

    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-P", "-m", "agent_core.cli", "run", "numbers"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    took = time.monotonic() - started

    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.splitlines()
    waiting = [line for line in lines if line.startswith("· waiting for the LLM (planner)… ")]
    assert waiting and waiting[0].endswith(", retry 1 of 2 (HTTP 503)"), proc.stderr
    assert any(line.startswith("· no answer from the LLM (planner) after ") for line in lines), proc.stderr
    assert re.search(r"Run \w+ failed: The LLM server answered HTTP 503: Error code: 503 - fake openai server: busy \(HTTP 503\) "
                     r"\(waited [\d.]+ s over 3 attempts\)\.", proc.stderr), proc.stderr
    assert took < 20, f"autocode run took {took:.1f} s"
