"""The plan -> execute -> evaluate -> repair loop, end to end: real openai client over HTTP to a scripted
server, real child processes, real SQLite."""

from __future__ import annotations

import json
import socket
import sqlite3
import textwrap

import pytest

from agent_core.config import Settings
from storage.db import Storage

from tests.conftest import (
    STEP_NUMBERS, STEP_SENTENCE, STEP_TOTAL, plan, png_step_code, subtask, user_prompt, verdict,
)


async def test_happy_path_three_chained_steps(make_agent, llm_server):
    llm_server.reply_json(plan(STEP_NUMBERS, STEP_TOTAL, STEP_SENTENCE))
    llm_server.reply_json(verdict("The total is 6."))
    agent = make_agent()

    result = await agent.run("Add 1, 2 and 3", "c1")

    assert result.status == "succeeded"
    assert result.answer == "The total is 6."
    assert [(s.tool_name, s.status, s.output) for s in result.steps] == [
        ("get_numbers", "ok", {"numbers": [1, 2, 3]}),
        ("add_up", "ok", {"total": 6}),
        ("describe", "ok", {"sentence": "The total is 6."}),
    ]
    planner, evaluator = llm_server.chat_requests()
    assert planner["response_format"]["type"] == "json_schema"
    assert planner["response_format"]["json_schema"]["name"] == "plan"
    assert planner["response_format"]["json_schema"]["strict"] is True
    assert evaluator["response_format"]["json_schema"]["name"] == "evaluation"
    assert "Add 1, 2 and 3" in user_prompt(planner)
    assert '{"total": 6}' in user_prompt(evaluator)
    assert "You are AutoCode" not in json.dumps(evaluator)  # the planner prompt is not sent again

    store = agent.storage
    run = store.get_run(result.run_id)
    assert (run["status"], run["answer"], run["iterations"]) == ("succeeded", "The total is 6.", 1)
    assert json.loads(run["plan_json"])["subtasks"][2]["tool_name"] == "describe"
    rows = store.steps(result.run_id)
    assert [(r["tool_name"], r["status"], r["input_from_tool"]) for r in rows] == [
        ("get_numbers", "ok", ""), ("add_up", "ok", "get_numbers"), ("describe", "ok", "add_up")]
    assert json.loads(rows[1]["output_json"]) == {"total": 6}
    calls = store.llm_calls(result.run_id)
    assert [c["purpose"] for c in calls] == ["plan", "evaluate"]
    assert all(c["prompt_tokens"] > 0 and c["completion_tokens"] > 0 and c["error"] is None for c in calls)
    assert all(c["model"] == "fake-model" and c["duration_ms"] >= 0 for c in calls)
    assert result.usage["llm_calls"] == 2
    assert result.usage["prompt_tokens"] == sum(c["prompt_tokens"] for c in calls)
    assert [e["satisfactory"] for e in store.evaluations(result.run_id)] == [1]
    assert [(m["role"], m["text"]) for m in store.recent_messages("c1", 10_000)] == [
        ("user", "Add 1, 2 and 3"), ("assistant", "The total is 6.")]
    event_types = [e["type"] for e in store.events(result.run_id)]
    assert event_types[0] == "run_started" and event_types[-1] == "run_finished"
    assert event_types.count("step_finished") == 3 and "plan_ready" in event_types


async def test_repair_from_failed_step_reuses_earlier_output(make_agent, llm_server):
    # Step 1 appends to a file in the run's working directory, so a re-execution would show.
    counting = subtask("get_numbers", textwrap.dedent("""
        def get_numbers():
            with open('runs.txt', 'a') as f:
                f.write('x')
            return {'numbers': [1, 2, 3]}
    """))
    broken = subtask("add_up", "def add_up(previous_output):\n    return {'total': sum(previous_output['nums'])}",
                     "get_numbers")
    fixed = subtask("add_up", textwrap.dedent("""
        def add_up(previous_output):
            executions = open('runs.txt').read().count('x')
            return {'total': sum(previous_output['numbers']), 'step1_runs': executions}
    """), "get_numbers")
    llm_server.reply_json(plan(counting, broken, STEP_SENTENCE))
    llm_server.reply_json(verdict(ok=False, retry_from="add_up", new=[fixed, STEP_SENTENCE],
                                  thoughts="add_up used the wrong key"))
    llm_server.reply_json(verdict("The total is 6."))
    agent = make_agent()

    result = await agent.run("Add 1, 2 and 3")

    assert result.status == "succeeded" and result.answer == "The total is 6."
    assert result.iterations == 2
    assert [(s.iteration, s.tool_name, s.status) for s in result.steps] == [
        (1, "get_numbers", "ok"), (1, "add_up", "error"), (2, "add_up", "ok"), (2, "describe", "ok")]
    assert result.steps[1].error == "KeyError: 'nums'"
    assert result.steps[2].output == {"total": 6, "step1_runs": 1}
    assert len(llm_server.chat_requests()) == 3
    first_eval, second_eval = llm_server.chat_requests()[1:]
    assert "KeyError: 'nums'" in user_prompt(first_eval)
    assert "kept from iteration 1" in user_prompt(second_eval)
    rows = agent.storage.steps(result.run_id)
    assert [r["tool_name"] for r in rows].count("get_numbers") == 1
    assert [c["purpose"] for c in agent.storage.llm_calls(result.run_id)] == ["plan", "evaluate", "evaluate"]
    assert [e["retry_from"] for e in agent.storage.evaluations(result.run_id)] == ["add_up", ""]


PLAN_JSON = json.dumps(plan(STEP_NUMBERS, STEP_TOTAL))
MALFORMED_PLANS = {
    "json fence": f"Here is the plan:\n```json\n{PLAN_JSON}\n```\nGood luck!",
    "prose around": f"Sure! {PLAN_JSON} Let me know if you need more.",
    "python literals": PLAN_JSON.replace('"imports": []', '"imports": [], "done": False, "x": None, "y": True'),
    "trailing commas": PLAN_JSON[:-3].replace('"imports": []', '"imports": ["math",]', 1) + "},],}",
    "raw newlines in code": PLAN_JSON.replace("\\n", "\n"),
}


@pytest.mark.parametrize("variant", sorted(MALFORMED_PLANS))
async def test_malformed_but_recoverable_replies_are_parsed(make_agent, llm_server, variant):
    llm_server.reply(MALFORMED_PLANS[variant])
    llm_server.reply("```\n{'satisfactory': True, 'thoughts': 'ok', 'final_answer': 'Total 6', "
                     "'retry_from': '', 'new_subtasks': [],}\n```".replace("'", '"').replace('"True"', "True"))
    agent = make_agent()

    result = await agent.run("Add")

    assert result.status == "succeeded", result.error
    assert result.answer == "Total 6"
    assert result.steps[-1].output == {"total": 6}
    assert len(llm_server.chat_requests()) == 2  # parsed without re-asking


async def test_unparseable_reply_is_reasked_quoting_the_error(make_agent, llm_server):
    llm_server.reply("I think you should add the numbers.")
    llm_server.reply_json({"main_task": "x", "main_task_thought": "", "subtasks": [{"tool_name": "a"}]})
    llm_server.reply_json(plan(STEP_NUMBERS))
    llm_server.reply_json(verdict("Numbers 1, 2, 3"))
    agent = make_agent()

    result = await agent.run("List numbers")

    assert result.status == "succeeded"
    requests = llm_server.chat_requests()
    assert len(requests) == 4
    second, third = requests[1]["messages"], requests[2]["messages"]
    assert second[-2] == {"role": "assistant", "content": "I think you should add the numbers."}
    assert "no JSON object" in second[-1]["content"]
    assert "subtasks.0.code" in third[-1]["content"]


async def test_reply_that_never_parses_fails_the_run_clearly(make_agent, llm_server):
    for _ in range(3):
        llm_server.reply("no idea")
    agent = make_agent()

    result = await agent.run("Do it")

    assert result.status == "failed"
    assert result.error.startswith("The model could not make a usable plan for this task")
    assert llm_server.remaining() == 0
    run = agent.storage.get_run(result.run_id)
    assert run["status"] == "failed" and run["error"] == result.error
    calls = agent.storage.llm_calls(result.run_id)
    assert len(calls) == 3
    assert "plan reply was unusable after 3 attempts" in calls[-1]["error"]  # the exact error, for the run page


async def test_falls_back_from_json_schema_to_json_object_to_text(make_agent, llm_server):
    llm_server.reject_response_format("json_schema", "json_object")
    llm_server.reply_json(plan(STEP_NUMBERS))
    llm_server.reply_json(verdict("1, 2, 3"))
    agent = make_agent()

    result = await agent.run("numbers")

    assert result.status == "succeeded"
    formats = [(r.get("response_format") or {}).get("type") for r in llm_server.chat_requests()]
    # The working format is remembered: the evaluator call goes straight to plain text.
    assert formats == ["json_schema", "json_object", None, None]
    assert "Reply with one JSON object" in json.dumps(llm_server.chat_requests()[2]["messages"])
    calls = agent.storage.llm_calls(result.run_id)
    assert [(c["response_format"], c["error"] is None) for c in calls] == [
        ("json_schema", False), ("json_object", False), ("text", True), ("text", True)]


async def test_invalid_python_is_a_failed_step_the_evaluator_repairs(make_agent, llm_server):
    bad = subtask("get_numbers", "def get_numbers(:\n    return {}")
    llm_server.reply_json(plan(bad))
    llm_server.reply_json(verdict(ok=False, retry_from="get_numbers", new=[STEP_NUMBERS], thoughts="syntax"))
    llm_server.reply_json(verdict("1, 2, 3"))
    agent = make_agent()

    result = await agent.run("numbers")

    assert result.status == "succeeded"
    assert result.steps[0].status == "error" and result.steps[0].error.startswith("Check failed: SyntaxError")
    assert result.steps[0].duration_ms == 0  # never executed
    assert "SyntaxError" in user_prompt(llm_server.chat_requests()[1])


async def test_unknown_input_from_tool_is_reported_not_crashing(make_agent, llm_server):
    wrong = dict(STEP_TOTAL, input_from_tool="fetch_numbers")
    llm_server.reply_json(plan(STEP_NUMBERS, wrong))
    llm_server.reply_json(verdict(ok=False, thoughts="cannot be done", answer="Sorry, I could not do it."))
    agent = make_agent()

    result = await agent.run("numbers")

    assert result.status == "failed"
    assert result.answer == "Sorry, I could not do it."
    assert [s.status for s in result.steps] == ["ok", "error"]
    assert "'fetch_numbers' is not an earlier subtask" in result.steps[1].error
    assert "fetch_numbers" in user_prompt(llm_server.chat_requests()[1])
    assert agent.storage.get_run(result.run_id)["status"] == "failed"


async def test_same_failure_twice_stops_without_another_llm_call(make_agent, llm_server):
    broken = subtask("get_numbers", "def get_numbers():\n    return {'n': 1 / 0}")
    llm_server.reply_json(plan(broken))
    llm_server.reply_json(verdict(ok=False, retry_from="get_numbers", new=[broken]))
    agent = make_agent(max_iterations=5)

    result = await agent.run("divide")

    assert result.status == "failed"
    assert "failed twice in a row with the same error: ZeroDivisionError" in result.error
    assert len(llm_server.chat_requests()) == 2
    assert result.iterations == 2


async def test_stops_after_max_iterations(make_agent, llm_server):
    def failing(n: int):
        return subtask("get_numbers", f"def get_numbers():\n    raise ValueError('attempt {n}')")

    llm_server.reply_json(plan(failing(1)))
    llm_server.reply_json(verdict(ok=False, retry_from="get_numbers", new=[failing(2)]))
    llm_server.reply_json(verdict(ok=False, retry_from="get_numbers", new=[failing(3)], thoughts="still broken"))
    agent = make_agent(max_iterations=2)

    result = await agent.run("x")

    assert result.status == "failed"
    assert result.iterations == 2
    # The user reads the last step's error, not the evaluator's musings (issue 20).
    assert "No satisfactory result after 2 iterations: step get_numbers failed: ValueError: attempt 2" == result.error
    assert llm_server.remaining() == 0 and len(llm_server.chat_requests()) == 3


EXACT_TOOLS_FILE = '''
import os
TOOLS = [
    {
        "lib_names": ["hashlib"],
        "instructions": "Signs a text with the operator's secret.",
        "use_exaclty_code_example": True,
        "code_example": """
def sign(text: str) -> dict:
    import hashlib, os
    secret = os.environ["MY_TOOL_SECRET"]
    return {"signature": hashlib.sha256((secret + text).encode()).hexdigest()[:16], "secret_length": len(secret)}
""",
    },
]
'''


async def test_exact_tool_is_called_from_generated_code_with_its_secret(make_agent, llm_server, tmp_path, monkeypatch):
    import hashlib

    monkeypatch.setenv("MY_TOOL_SECRET", "operator-secret-123")
    tools_file = tmp_path / "tools.py"
    tools_file.write_text(EXACT_TOOLS_FILE)
    step = subtask("sign_it", textwrap.dedent("""
        import os
        def sign(text):  # a redefinition: must be dropped in favour of the trusted tool
            return {"signature": "forged"}
        def sign_it():
            return {"signed": sign("hello"), "secret_seen": os.environ.get("MY_TOOL_SECRET")}
    """))
    llm_server.reply_json(plan(step))
    llm_server.reply_json(verdict("signed"))
    agent = make_agent(tools_file=tools_file)

    result = await agent.run("sign hello")

    assert result.status == "succeeded", result.error
    expected = hashlib.sha256(b"operator-secret-123hello").hexdigest()[:16]
    assert result.steps[0].output == {
        "signed": {"signature": expected, "secret_length": 19}, "secret_seen": None}
    planner_prompt = json.dumps(llm_server.chat_requests()[0])
    assert "sign(text: str) -> dict" in planner_prompt and "Signs a text" in planner_prompt
    assert "operator-secret-123" not in json.dumps(llm_server.chat_requests())


async def test_llm_helper_runs_outside_the_sandbox(make_agent, llm_server):
    step = subtask("summarize", textwrap.dedent("""
        import os
        def summarize():
            text = llm("Summarize: the cat sat on the mat.", system="Be brief.")
            return {"summary": text, "key_seen": os.environ.get("OPENAI_API_KEY")}
    """))
    llm_server.reply_json(plan(step))
    llm_server.reply("A cat sat.")
    llm_server.reply_json(verdict("A cat sat."))
    agent = make_agent()

    result = await agent.run("summarize the sentence")

    assert result.status == "succeeded", result.error
    assert result.steps[0].output == {"summary": "A cat sat.", "key_seen": None}
    helper_request = llm_server.chat_requests()[1]
    assert helper_request["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Summarize: the cat sat on the mat."},
    ]
    assert "response_format" not in helper_request
    assert llm_server.requests[1].headers["authorization"] == "Bearer sk-test-key-never-in-sandbox"
    calls = agent.storage.llm_calls(result.run_id)
    assert [(c["purpose"], c["iteration"]) for c in calls] == [("plan", None), ("helper", 1), ("evaluate", 1)]



# ------------------------------------------------------------------------------------------ llm() budgets and audit

SPEND_STEP = subtask("spend", textwrap.dedent("""
    def spend():
        answered, refused = [], []
        for i in range(__CALLS__):
            try:
                answered.append(llm(f"question {i}"))
            except Exception as exc:
                refused.append(str(exc))
        return {"answered": answered, "refused": refused}
"""))


def spend_step(calls: int) -> dict:
    return {**SPEND_STEP, "code": SPEND_STEP["code"].replace("__CALLS__", str(calls))}


def helper_bodies(llm_server) -> list[dict]:
    return [body for body in llm_server.chat_requests() if "response_format" not in body]


def test_default_budgets():
    settings = Settings.from_env({})
    assert (settings.max_tokens_per_run, settings.llm_calls_per_step, settings.llm_prompt_max_chars) == (
        200_000, 20, 20_000)
    assert Settings().max_tokens_per_run == 200_000
    assert Settings.from_env({"AUTOCODE_MAX_TOKENS_PER_RUN": "0"}).max_tokens_per_run == 0  # explicitly: no limit
    tuned = Settings.from_env({"AUTOCODE_LLM_CALLS_PER_STEP": "5", "AUTOCODE_LLM_PROMPT_MAX_CHARS": "900"})
    assert (tuned.llm_calls_per_step, tuned.llm_prompt_max_chars) == (5, 900)


async def test_default_run_budget_refuses_helper_calls_and_stops_the_run(make_agent, llm_server):
    llm_server.reply_json(plan(spend_step(10)))
    # Each llm() reply reports 60,000 prompt tokens: the default 200,000 admits four calls (checked before each).
    llm_server.responder(lambda body: {"json": verdict("spent")} if "response_format" in body
                         else {"content": "ok", "prompt_tokens": 60_000, "completion_tokens": 1})
    agent = make_agent()

    result = await agent.run("spend tokens")

    output = result.steps[0].output
    assert output["answered"] == ["ok"] * 4, output
    assert len(output["refused"]) == 6
    assert all("AUTOCODE_MAX_TOKENS_PER_RUN" in text and "of its 200000 LLM tokens" in text for text in output["refused"])
    assert len(helper_bodies(llm_server)) == 4
    assert result.status == "failed" and "AUTOCODE_MAX_TOKENS_PER_RUN" in result.error
    assert [c["purpose"] for c in agent.storage.llm_calls(result.run_id)] == ["plan"] + ["helper"] * 4  # no evaluator


async def test_daily_budget_is_counted_during_a_run(make_agent, llm_server):
    agent = make_agent(daily_tokens_per_user=1000)
    # alice's first run: 200 (plan) + 600 (one llm() call) + 100 (evaluator) = 900 tokens of her 1000.
    llm_server.reply_json(plan(spend_step(1)), prompt_tokens=100, completion_tokens=100)
    llm_server.reply("first", prompt_tokens=300, completion_tokens=300)
    llm_server.reply_json(verdict("first run"), prompt_tokens=50, completion_tokens=50)
    first = await agent.run("first task", "alice-chat", user="alice")
    assert first.status == "succeeded", first.error

    # Her second run: the plan (50) and one llm() call (50) reach 1000; the next calls and the evaluator are refused.
    llm_server.reply_json(plan(spend_step(5)), prompt_tokens=30, completion_tokens=20)
    llm_server.reply("second", prompt_tokens=30, completion_tokens=20)
    second = await agent.run("second task", "alice-chat", user="alice")

    output = second.steps[0].output
    assert output["answered"] == ["second"], output
    assert len(output["refused"]) == 4
    assert all("used 1000 of their 1000 LLM tokens for today" in text and "AUTOCODE_DAILY_TOKENS_PER_USER" in text
               for text in output["refused"])
    assert second.status == "failed"
    assert "AUTOCODE_DAILY_TOKENS_PER_USER" in second.error and "1000" in second.error
    assert len(llm_server.chat_requests()) == 5

    # Another user's day is their own.
    llm_server.reply_json(plan(spend_step(1)))
    llm_server.reply("bob's")
    llm_server.reply_json(verdict("bob's run"))
    bob = await agent.run("bob's task", "bob-chat", user="bob")
    assert bob.status == "succeeded", bob.error
    assert bob.steps[0].output == {"answered": ["bob's"], "refused": []}


async def test_helper_calls_are_stored_with_their_clipped_prompt_and_reply(make_agent, llm_server):
    step = subtask("ask", textwrap.dedent("""
        def ask():
            return {"long": llm("p" * 5000, system="s" * 300), "short": llm("short one")}
    """))
    llm_server.reply_json(plan(step))
    llm_server.reply("r" * 4000)
    llm_server.reply("fine")
    llm_server.reply_json(verdict("asked"))
    agent = make_agent()

    result = await agent.run("ask twice")

    assert result.status == "succeeded", result.error
    calls = agent.storage.llm_calls(result.run_id)
    audit = [(c["prompt_text"], c["prompt_chars"], c["system_text"], c["system_chars"], c["reply_text"],
              c["response_chars"]) for c in calls]
    assert audit == [
        (None, None, None, None, None, calls[0]["response_chars"]),  # the planner's call is not a helper call
        ("p" * 2000 + " …", 5000, "s" * 300, 300, "r" * 2000 + " …", 4000),
        ("short one", 9, "", 0, "fine", 4),
        (None, None, None, None, None, calls[3]["response_chars"]),
    ]


def test_an_older_database_gets_the_audit_columns(tmp_path):
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:  # llm_calls as it was before the helper audit
        db.execute("CREATE TABLE llm_calls (id INTEGER PRIMARY KEY, run_id TEXT, iteration INTEGER, purpose TEXT, "
                   "model TEXT, response_format TEXT, started_at TEXT, duration_ms INTEGER, prompt_tokens INTEGER, "
                   "completion_tokens INTEGER, retries INTEGER, request_chars INTEGER, response_chars INTEGER, "
                   "error TEXT)")
        db.execute("INSERT INTO llm_calls (run_id, purpose, prompt_tokens, completion_tokens) VALUES ('r1', 'helper', 5, 6)")
    storage = Storage(path)
    try:
        storage.add_llm_call({"run_id": "r1", "purpose": "helper", "prompt_tokens": 1, "completion_tokens": 2,
                              "prompt_text": "hello", "prompt_chars": 5, "system_text": "", "system_chars": 0,
                              "reply_text": "hi", "response_chars": 2})
        rows = storage.llm_calls("r1")
        assert [(r["prompt_tokens"], r["prompt_text"], r["reply_text"]) for r in rows] == [(5, None, None), (1, "hello", "hi")]
        assert storage.usage("r1") == {"llm_calls": 2, "prompt_tokens": 6, "completion_tokens": 8}
    finally:
        storage.close()


async def test_follow_up_sees_previous_answer(make_agent, llm_server):
    llm_server.reply_json(plan(STEP_NUMBERS, STEP_TOTAL))
    llm_server.reply_json(verdict("The total is 6."))
    llm_server.reply_json(plan(STEP_NUMBERS))
    llm_server.reply_json(verdict("Doubled: 12."))
    llm_server.reply_json(plan(STEP_NUMBERS))
    llm_server.reply_json(verdict("Other."))
    agent = make_agent()

    first = await agent.run("Add 1, 2 and 3", "team:chan:thread")
    second = await agent.run("Now double it", "team:chan:thread")
    await agent.run("Unrelated", "another-conversation")

    assert (first.status, second.status) == ("succeeded", "succeeded")
    follow_up = user_prompt(llm_server.chat_requests()[2])
    assert "User: Add 1, 2 and 3" in follow_up and "AutoCode: The total is 6." in follow_up
    assert follow_up.rstrip().endswith("Task: Now double it")
    assert "The total is 6." not in user_prompt(llm_server.chat_requests()[4])


async def test_llm_500_then_success_is_retried(make_agent, llm_server):
    llm_server.error(500, "upstream hiccup", headers={"Retry-After-Ms": "1"})
    llm_server.reply_json(plan(STEP_NUMBERS))
    llm_server.reply_json(verdict("1, 2, 3"))
    agent = make_agent()

    result = await agent.run("numbers")

    assert result.status == "succeeded"
    assert [r.response_status for r in llm_server.requests] == [500, 200, 200]
    calls = agent.storage.llm_calls(result.run_id)
    assert calls[0]["retries"] == 1 and calls[0]["error"] is None


async def test_llm_down_fails_the_run_with_a_readable_message(make_agent):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    agent = make_agent(openai_base_url=f"http://127.0.0.1:{port}/v1", llm_max_retries=0)

    result = await agent.run("numbers")

    assert result.status == "failed"
    assert result.error == f"Could not reach the LLM at http://127.0.0.1:{port}/v1."
    run = agent.storage.get_run(result.run_id)
    assert (run["status"], run["error"]) == ("failed", result.error)
    (call,) = agent.storage.llm_calls(result.run_id)
    assert call["error"] == result.error and call["purpose"] == "plan"


async def test_llm_error_status_is_stored_without_the_key(make_agent, llm_server):
    llm_server.error(401, "Incorrect API key provided: sk-test-key-never-in-sandbox")
    agent = make_agent()

    result = await agent.run("numbers")

    assert result.status == "failed"
    assert "rejected the API key" in result.error
    assert "sk-test" not in json.dumps(agent.storage.llm_calls(result.run_id))


async def test_builtin_geocode_tool_and_geopy_distances(make_agent, llm_server, monkeypatch):
    from tests.fakes.nominatim_server import FakeNominatim

    step = subtask("closest", textwrap.dedent("""
        def closest():
            from geopy.distance import geodesic
            a, b = geocode("Paris"), geocode("Brussels")
            km = geodesic((a["latitude"], a["longitude"]), (b["latitude"], b["longitude"])).km
            return {"km": round(km), "unknown": geocode("Atlantis")}
    """), imports=["geopy"])
    llm_server.reply_json(plan(step))
    llm_server.reply_json(verdict("264 km"))
    with FakeNominatim({"Paris": (48.8566, 2.3522), "Brussels": (50.8503, 4.3517)}) as nominatim:
        monkeypatch.setenv("AUTOCODE_NOMINATIM_URL", nominatim.url)
        agent = make_agent()
        result = await agent.run("How far is Paris from Brussels?")

    assert result.status == "succeeded", result.error
    assert result.steps[0].output == {"km": 264, "unknown": None}
    assert nominatim.queries == ["Paris", "Brussels", "Atlantis"]


async def test_a_reply_written_for_longer_than_the_timeout_is_neither_cut_nor_retried(make_agent, llm_server):
    """AUTOCODE_LLM_TIMEOUT bounds the wait for the first token and the pauses between tokens, not the writing: a
    small model on CPU writes a plan for a minute or more (issue 20)."""
    text = json.dumps(plan(STEP_NUMBERS))
    llm_server.writing(text, delay=0.2, token_delay=2.0 / (len(text) / 4))  # ~2 s of writing
    llm_server.reply_json(verdict("1, 2, 3"))
    agent = make_agent(llm_timeout=1)

    result = await agent.run("numbers")

    assert result.status == "succeeded", result.error
    assert len(llm_server.chat_requests()) == 2
    planned = agent.storage.llm_calls(result.run_id)[0]
    assert planned["retries"] == 0 and planned["duration_ms"] >= 1800


PNG_STEP = subtask("draw", png_step_code(
    "draw", "outputs/chart.png",
    then='    with open("scratch.txt", "w") as f:  # not under outputs/: not an artifact\n        f.write("temp")\n',
    returns='{"chart": "outputs/chart.png", "bytes": len(png)}'))


async def test_files_under_outputs_become_artifacts(make_agent, llm_server):
    llm_server.reply_json(plan(PNG_STEP))
    llm_server.reply_json(verdict("Here is the chart."))
    agent = make_agent()

    result = await agent.run("draw a red square")

    assert result.status == "succeeded", result.error
    size = result.steps[0].output["bytes"]
    assert result.artifacts == [{"name": "chart.png", "mime": "image/png", "size": size}]
    (stored,) = agent.storage.artifacts(result.run_id, with_data=True)
    assert stored["name"] == "chart.png" and stored["data"].startswith(b"\x89PNG") and len(stored["data"]) == size
    assert result.to_json()["artifacts"][0]["name"] == "chart.png"
