"""The repair scenario's LLM traffic stays within the budget (characters are deterministic, unlike time)."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("llm_traffic", Path(__file__).parents[1] / "bench" / "llm_traffic.py")
llm_traffic = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(llm_traffic)


async def test_repair_scenario_traffic_within_budget():
    report = await llm_traffic.measure()
    assert len(report["calls"]) == 3
    assert report["answer"].startswith("Paris and Brussels")
    assert report["total"]["chars"] <= llm_traffic.BUDGET_CHARS
    assert report["total"]["http_request_bytes"] + report["total"]["http_response_bytes"] <= llm_traffic.BUDGET_HTTP_BYTES


async def test_a_direct_answer_costs_one_small_call():
    report = await llm_traffic.measure(direct=True)
    assert len(report["calls"]) == 1  # the planner only
    assert report["answer"] == llm_traffic.DIRECT["direct_answer"]
    # one planner request with the first run in its history: well under the repair scenario's first call and reply
    assert report["total"]["chars"] < 3500
