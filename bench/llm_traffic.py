"""LLM traffic of the repair scenario with the built-in tools: characters and tokens sent and received; and of a
direct answer ("thanks!" after that run: one planner call, no sandbox, no evaluator — issue 14).

The scenario: "which two of these 5 offices are closest?"; the plan has 3 steps, step 2 raises KeyError, the
evaluator repairs from step 2, the second evaluation is satisfactory: 3 LLM calls. The replies are what a
capable model sends for it. The original AutoCodeAgent spends 63,252 characters on the same 3 calls.

Run: python bench/llm_traffic.py [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent_core.app import build_agent  # noqa: E402
from agent_core.config import Settings  # noqa: E402
from tests.fakes.openai_server import FakeOpenAI  # noqa: E402

BUDGET_CHARS = 12_000
# The HTTP bodies: the characters above plus the JSON around them. Since issue 20 every request also carries its
# reply cap and asks for a stream with usage (~55 bytes), and the plan schema's exclusive direct-answer branch
# (~210 bytes), and the bounds on names and lists: 12,663 bytes where 11,958 were before.
BUDGET_HTTP_BYTES = 13_000
ORIGINAL_CHARS = 63_252

TASK = ("Which two of our offices are closest to each other? Paris 48.8566,2.3522; London 51.5072,-0.1276; "
        "Berlin 52.52,13.405; Madrid 40.4168,-3.7038; Brussels 50.8503,4.3517")


def _subtask(name: str, input_from: str, description: str, imports: list[str], code: str) -> dict:
    return {"tool_name": name, "input_from_tool": input_from, "description": description, "imports": imports,
            "thought": "", "code": textwrap.dedent(code).strip()}


LOAD = _subtask("load_offices", "", "Office coordinates from the task", [], """
    def load_offices():
        return {"offices": {"Paris": [48.8566, 2.3522], "London": [51.5072, -0.1276], "Berlin": [52.52, 13.405],
                            "Madrid": [40.4168, -3.7038], "Brussels": [50.8503, 4.3517]}}
""")
PAIRS_BROKEN = _subtask("closest_pair", "load_offices", "Geodesic distance of every pair; keep the smallest",
                        ["itertools", "geopy"], """
    def closest_pair(previous_output):
        import itertools
        from geopy.distance import geodesic
        offices = previous_output["locations"]
        pairs = [(geodesic(offices[a], offices[b]).km, a, b) for a, b in itertools.combinations(offices, 2)]
        km, a, b = min(pairs)
        return {"a": a, "b": b, "km": round(km, 1)}
""")
PAIRS_FIXED = dict(PAIRS_BROKEN, code=PAIRS_BROKEN["code"].replace('["locations"]', '["offices"]'))
REPORT = _subtask("report", "closest_pair", "Sentence for the user", [], """
    def report(previous_output):
        p = previous_output
        return {"answer": f"{p['a']} and {p['b']} are closest: {p['km']} km apart."}
""")

PLAN = {"main_task_thought": "Compute all pairwise geodesic distances and take the minimum.", "direct_answer": "",
        "subtasks": [LOAD, PAIRS_BROKEN, REPORT]}
REPAIR = {"satisfactory": False, "thoughts": "closest_pair read the key 'locations'; the input key is 'offices'.",
          "final_answer": "", "retry_from": "closest_pair", "new_subtasks": [PAIRS_FIXED, REPORT]}
DONE = {"satisfactory": True, "thoughts": "The distances are correct.",
        "final_answer": "Paris and Brussels are the closest offices: 264.3 km apart.", "retry_from": "",
        "new_subtasks": []}


DIRECT_TASK = "thanks!"
DIRECT = {"main_task_thought": "A thank-you; no code needed.",
          "direct_answer": "You're welcome! Ask me anytime.", "subtasks": []}


async def measure(direct: bool = False) -> dict:
    """The repair scenario's calls; with `direct`, the calls of the "thanks!" that follows it in the same
    conversation (its history holds the first run)."""
    # The database in a private (0700) directory; the run directories under a root of their own that the sandbox
    # uids can traverse (0711, like the default /tmp/autocode-sandbox): mkdtemp's 0700 would shut the process
    # backend's steps out of their working directories.
    with (FakeOpenAI() as server, tempfile.TemporaryDirectory(prefix="autocode-bench-") as tmp,
          tempfile.TemporaryDirectory(prefix="autocode-bench-runs-") as runs):
        os.chmod(runs, 0o711)
        for reply in (PLAN, REPAIR, DONE, *([DIRECT] if direct else [])):
            server.reply_json(reply)
        settings = Settings(openai_api_key="bench", openai_base_url=server.base_url, model="fake-model",
                            db_path=Path(tmp, "bench.db"), workdir_root=Path(runs))
        agent = build_agent(settings)
        try:
            result = await agent.run(TASK, "bench")
            if direct:
                assert result.status == "succeeded", result.error
                opened = agent.executor.opened
                result = await agent.run(DIRECT_TASK, "bench")
                assert agent.executor.opened == opened, "a direct answer opened a sandbox"
                assert not result.steps
        finally:
            await agent.executor.stop()
            await agent.llm.close()
            agent.storage.close()
        assert result.status == "succeeded", result.error
        assert direct or [s.tool_name for s in result.steps].count("load_offices") == 1
        calls = []
        for request in server.requests[3:] if direct else server.requests:
            body = request.body or {}
            message_chars = sum(len(m["content"]) for m in body.get("messages", []))
            schema_chars = len(json.dumps(body["response_format"])) if "response_format" in body else 0
            reply = json.loads(request.response_body)
            content = reply["choices"][0]["message"]["content"]
            calls.append({
                "sent_chars": message_chars + schema_chars, "received_chars": len(content),
                "message_chars": message_chars, "schema_chars": schema_chars,
                "http_request_bytes": len(request.raw), "http_response_bytes": len(request.response_body),
                "prompt_tokens": reply["usage"]["prompt_tokens"], "completion_tokens": reply["usage"]["completion_tokens"],
            })
    total = {key: sum(c[key] for c in calls) for key in calls[0]}
    total["chars"] = total["sent_chars"] + total["received_chars"]
    return {"answer": result.answer, "calls": calls, "total": total}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    report = asyncio.run(measure())
    direct = asyncio.run(measure(direct=True))
    total = report["total"]
    if args.json:
        print(json.dumps({"repair": report, "direct": direct}, indent=2))
    else:
        print(f"{'call':<10}{'sent':>8}{'(schema)':>10}{'received':>10}{'prompt tok':>12}{'compl tok':>11}")
        for name, call in zip(("plan", "evaluate", "evaluate"), report["calls"]):
            print(f"{name:<10}{call['sent_chars']:>8}{call['schema_chars']:>10}{call['received_chars']:>10}"
                  f"{call['prompt_tokens']:>12}{call['completion_tokens']:>11}")
        print(f"{'total':<10}{total['sent_chars']:>8}{total['schema_chars']:>10}{total['received_chars']:>10}"
              f"{total['prompt_tokens']:>12}{total['completion_tokens']:>11}")
        print(f"characters sent + received: {total['chars']} (budget {BUDGET_CHARS}; original AutoCodeAgent "
              f"{ORIGINAL_CHARS}: {ORIGINAL_CHARS / total['chars']:.1f}x more)")
        print(f"HTTP bodies: {total['http_request_bytes']} bytes sent, {total['http_response_bytes']} received")
        d = direct["total"]
        print(f"direct answer ({DIRECT_TASK!r} after that run): {len(direct['calls'])} call, {d['sent_chars']} sent "
              f"({d['schema_chars']} schema), {d['received_chars']} received, {d['prompt_tokens']} + "
              f"{d['completion_tokens']} tokens; HTTP {d['http_request_bytes']} + {d['http_response_bytes']} bytes")
    return 0 if total["chars"] <= BUDGET_CHARS else 1


if __name__ == "__main__":
    sys.exit(main())
