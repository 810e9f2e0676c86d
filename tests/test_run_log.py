"""bots/run_log.py: the one log message and its document, from a real SQLite file."""

from __future__ import annotations

from agent_core.pricing import PriceTable
from bots.run_log import run_log
from storage.db import Storage

PRICES = PriceTable.parse('[models]\n"gpt-4o-mini" = { prompt = 0.15, completion = 0.60 }\n', "test")


def _stored_run(tmp_path):
    storage = Storage(tmp_path / "autocode.db")
    run_id = storage.create_run("cli:log", "Which region grew fastest?")
    hostile = "```\n# not a heading\n````` still inside"
    for position, (name, status, error) in enumerate((("load", "ok", ""), ("chart", "failed", "ValueError: x"))):
        storage.add_step({"run_id": run_id, "iteration": 1, "position": position, "tool_name": name,
                          "description": "what it does", "code": f"def {name}():\n    return {{}}", "status": status,
                          "output_json": '{"a": 1}' if status == "ok" else None, "stdout": hostile, "stderr": "",
                          "error": error, "duration_ms": 12 + position})
    storage.add_evaluation({"run_id": run_id, "iteration": 1, "satisfactory": 0, "thoughts": "chart failed",
                            "retry_from": "chart"})
    for purpose, p, c in (("planner", 900, 200), ("evaluator", 300, 40)):
        storage.add_llm_call({"run_id": run_id, "iteration": 1, "purpose": purpose, "model": "gpt-4o-mini",
                              "prompt_tokens": p, "completion_tokens": c, "duration_ms": 5})
    storage.add_approval(run_id, "send_email", '{"to": "a@b.c"}')
    storage.decide_approval(run_id, 1, "denied", "U123")
    storage.finish_run(run_id, "failed", None, "the chart step failed", 1)
    return storage, run_id


def test_the_summary_has_steps_verdicts_approvals_tokens_and_cost(tmp_path):
    storage, run_id = _stored_run(tmp_path)
    log = run_log(storage, run_id, PRICES)
    assert log is not None and log.status == "failed" and log.worth_posting
    assert [(s.number, s.name, s.status, s.duration_ms) for s in log.steps] == [(1, "load", "ok", 12),
                                                                               (2, "chart", "failed", 13)]
    assert log.steps[1].error == "ValueError: x"
    assert [(v.satisfactory, v.retry_from) for v in log.verdicts] == [(False, "chart")]
    assert [(a.tool, a.status, a.decided_by) for a in log.approvals] == [("send_email", "denied", "U123")]
    cost = 1200 * 0.15 / 1e6 + 240 * 0.60 / 1e6
    assert log.llm_calls == 2 and (log.prompt_tokens, log.completion_tokens) == (1200, 240)
    assert log.tokens_line().startswith("2 LLM calls · 1,200 + 240 tokens · $0.0003")
    assert "planner 1× (900+200)" in log.tokens_line() and log.cost == "$0.0003" and round(cost, 6) == 0.000324
    assert log.filename == f"run-{run_id}-log.md"


def test_the_document_holds_every_step_in_full_and_output_cannot_break_its_fences(tmp_path):
    storage, run_id = _stored_run(tmp_path)
    document = run_log(storage, run_id).document
    assert document.startswith(f"# Execution log of run {run_id}\n")
    assert "### Step 1.1 load — ok, 12 ms" in document and "### Step 1.2 chart — failed, 13 ms" in document
    assert "def chart():" in document and '"a": 1' in document and "Evaluator: not satisfactory (retry from chart)" \
        in document and "#1 send_email: denied by U123" in document
    # The hostile stdout sits inside a fence longer than its longest run of backticks (5): six.
    assert "``````\n```\n# not a heading\n````` still inside\n``````" in document


def test_a_run_that_did_nothing_has_no_log_worth_posting(tmp_path):
    storage = Storage(tmp_path / "autocode.db")
    run_id = storage.create_run("cli:log", "hi", status="queued")
    storage.finish_run(run_id, "cancelled", None, None, 0)
    log = run_log(storage, run_id)
    assert log is not None and not log.worth_posting and log.cost is None and log.settings is None
    assert run_log(storage, "nope") is None


def test_a_direct_answer_has_no_log_worth_posting(tmp_path):
    storage = Storage(tmp_path / "autocode.db")
    run_id = storage.create_run("cli:log", "thanks!")
    storage.add_llm_call({"run_id": run_id, "iteration": 1, "purpose": "planner", "model": "gpt-4o-mini",
                          "prompt_tokens": 700, "completion_tokens": 20, "duration_ms": 5})
    storage.finish_run(run_id, "succeeded", "You're welcome!", None, 0)
    log = run_log(storage, run_id)
    assert log is not None and log.llm_calls == 1 and not log.worth_posting
