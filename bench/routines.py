"""A routine's run against the same task run from scratch (issue 23): LLM calls, tokens, characters and wall time.

The task is bench/llm_traffic.py's "which two of these 5 offices are closest?" with a plan that works at once (3
steps: load, pairs, report). From scratch a run costs a planner call and an evaluator call; a routine made from that
run re-runs its pinned code and costs one evaluator call. Real sandboxes (the host's backend), a scripted
OpenAI-compatible server (tests/fakes/openai_server.py) whose replies may be delayed to stand for a model's latency
(--llm-delay, seconds a call). "repaired": a routine whose pinned step 2 now fails (the data changed shape): the
evaluator repairs it (one call), the repaired plan runs and is judged (a second call) and is pinned as the next
version. Each kind of run is repeated --rounds times; the medians are reported.

Run: python bench/routines.py [--rounds 5] [--llm-delay 0] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from agent_core import routines  # noqa: E402
from agent_core.app import build_agent  # noqa: E402
from agent_core.config import Settings  # noqa: E402
from llm_traffic import DONE, LOAD, PAIRS_BROKEN, PAIRS_FIXED, REPAIR, REPORT, TASK  # noqa: E402
from tests.fakes.openai_server import FakeOpenAI  # noqa: E402

PLAN = {"main_task_thought": "Compute all pairwise geodesic distances and take the minimum.", "direct_answer": "",
        "subtasks": [LOAD, PAIRS_FIXED, REPORT]}
BROKEN = dict(PLAN, subtasks=[LOAD, PAIRS_BROKEN, REPORT])  # the data changed shape: step 2 raises KeyError


async def measure(rounds: int, llm_delay: float) -> dict:
    with (FakeOpenAI() as server, tempfile.TemporaryDirectory(prefix="autocode-bench-") as tmp,
          tempfile.TemporaryDirectory(prefix="autocode-bench-runs-") as runs):
        os.chmod(runs, 0o711)  # the sandbox uids traverse it (see bench/llm_traffic.py)

        def replies(*objects: dict) -> None:
            for reply in objects:
                server.reply_json(reply, delay=llm_delay)  # the model's latency before its first token

        settings = Settings(openai_api_key="bench", openai_base_url=server.base_url, model="fake-model",
                            db_path=Path(tmp, "bench.db"), workdir_root=Path(runs), sandbox_uid_base=72400,
                            sandbox_warm=1)
        agent = build_agent(settings)
        await agent.executor.start()
        kinds: dict[str, list[dict]] = {"scratch": [], "routine": [], "repaired": []}
        try:
            routine = None
            for number in range(rounds):
                replies(PLAN, DONE)
                kinds["scratch"].append(await _timed(agent, agent.storage.create_run(
                    f"bench-{number}", TASK, status="queued"), server))
                if routine is None:
                    routine = routines.create_from_run(agent.storage, settings, kinds["scratch"][0]["run_id"],
                                                       "0 9 * * *", "Europe/Rome")
                replies(DONE)
                firing = routines.fire(agent.storage, routine, lambda task, conversation, user, adapter, route: (
                    agent.storage.create_run(conversation, task, status="queued", user=user, adapter=adapter), ""))
                kinds["routine"].append(await _timed(agent, firing.run_id, server))
                # The data changed shape: the routine's current plan now fails at step 2.
                current = agent.storage.get_routine(routine["id"])
                agent.storage.add_routine_plan(routine["id"], json.dumps(BROKEN), None)
                replies(REPAIR, DONE)
                firing = routines.fire(agent.storage, agent.storage.get_routine(routine["id"]), lambda task, conv, user,
                                       adapter, route: (agent.storage.create_run(conv, task, status="queued"), ""))
                kinds["repaired"].append(await _timed(agent, firing.run_id, server))
                assert agent.storage.get_routine(routine["id"])["plan_version"] == current["plan_version"] + 2
                routine = agent.storage.get_routine(routine["id"])
        finally:
            await agent.executor.stop()
            await agent.llm.close()
            agent.storage.close()
    return {kind: {"runs": len(found), **{key: statistics.median(r[key] for r in found)
                                         for key in found[0] if key != "run_id"}}
            for kind, found in kinds.items()}


async def _timed(agent, run_id: str, server: FakeOpenAI) -> dict:
    seen = len(server.requests)
    started = time.perf_counter()
    result = await agent.execute(run_id)
    wall = time.perf_counter() - started
    assert result.status == "succeeded", result.error
    usage = agent.storage.usage(run_id)
    calls = agent.storage.llm_calls(run_id)
    purposes = [c["purpose"] for c in calls]
    sent = sum(len(json.dumps(r.body or {})) for r in server.requests[seen:])
    return {"run_id": run_id, "wall_s": round(wall, 3), "llm_calls": usage["llm_calls"],
            "planner_calls": purposes.count("plan"), "evaluator_calls": purposes.count("evaluate"),
            "prompt_tokens": usage["prompt_tokens"], "completion_tokens": usage["completion_tokens"],
            "evaluator_prompt_tokens": sum(c["prompt_tokens"] for c in calls if c["purpose"] == "evaluate"),
            "request_bytes": sent}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--llm-delay", type=float, default=0.0, help="seconds each LLM reply waits (a model's latency)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    report = asyncio.run(measure(args.rounds, args.llm_delay))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"medians of {args.rounds} runs each, LLM delay {args.llm_delay:g} s a call")
    print(f"{'run':<10}{'LLM calls':>10}{'plan':>6}{'eval':>6}{'prompt tok':>12}{'compl tok':>11}{'sent bytes':>12}"
          f"{'wall s':>9}")
    for kind, row in report.items():
        print(f"{kind:<10}{row['llm_calls']:>10g}{row['planner_calls']:>6g}{row['evaluator_calls']:>6g}"
              f"{row['prompt_tokens']:>12g}{row['completion_tokens']:>11g}{row['request_bytes']:>12g}"
              f"{row['wall_s']:>9.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
