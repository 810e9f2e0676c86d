"""Direct answers (issue 14): the planner answers without code when none is needed — one LLM call, no sandbox, no
evaluator — and a run that needs code behaves as before. Real agent, real SQLite, the scripted LLM server over HTTP,
real sandboxes where code runs."""

from __future__ import annotations

import json
from agent_core.workspace import run_with_files
from tests.conftest import STEP_NUMBERS, STEP_TOTAL, direct, plan, subtask, user_prompt, verdict


def _kinds(agent, run_id: str) -> list[str]:
    return [e["type"] for e in agent.storage.events(run_id)]


async def test_thanks_costs_one_llm_call_and_no_sandbox(make_agent, llm_server):
    llm_server.reply_json(direct("You're welcome! Ask me anything that needs data crunching or a chart."))
    agent = make_agent()

    result = await agent.run("thanks!", "c1")

    assert result.status == "succeeded", result.error
    assert result.answer.startswith("You're welcome!")
    assert result.steps == [] and result.iterations == 0
    assert len(llm_server.chat_requests()) == 1  # the planner only: no evaluator
    assert agent.executor.opened == 0 and not agent.executor._idle  # no sandbox worker started
    run = agent.storage.get_run(result.run_id)
    assert run["status"] == "succeeded" and run["answer"] == result.answer
    assert agent.storage.steps(result.run_id) == []
    assert _kinds(agent, result.run_id) == ["run_started", "run_finished"]
    messages = agent.storage.recent_messages("c1", 10_000)
    assert [(m["role"], m["text"]) for m in messages] == [("user", "thanks!"), ("assistant", result.answer)]
    assert [c["purpose"] for c in agent.storage.llm_calls(result.run_id)] == ["plan"]
    # The planner was told it may answer so, and how (the strict schema carries the field).
    sent = llm_server.chat_requests()[0]
    assert "direct_answer" in sent["messages"][0]["content"]
    assert "direct_answer" in json.dumps(sent["response_format"]["json_schema"]["schema"]["properties"]["reply"])


async def test_a_question_about_the_previous_answer_is_answered_from_history(make_agent, llm_server):
    llm_server.reply_json(plan(STEP_NUMBERS, STEP_TOTAL))
    llm_server.reply_json(verdict("The total of 1, 2 and 3 is 6 (the median is 2)."))
    llm_server.reply_json(direct("I added the three numbers; the median was only mentioned, not used for the total."))
    agent = make_agent()

    first = await agent.run("Add 1, 2 and 3", "c2")
    opened = agent.executor.opened
    second = await agent.run("why did you mention the median?", "c2")

    assert first.status == "succeeded" and len(first.steps) == 2
    assert opened == 1
    assert second.status == "succeeded" and second.steps == []
    assert agent.executor.opened == opened  # no sandbox for the follow-up question
    requests = llm_server.chat_requests()
    assert len(requests) == 3  # plan + evaluate for the first, one planner call for the second
    follow_up = user_prompt(requests[2])
    assert "Conversation so far:" in follow_up and "the median is 2" in follow_up
    assert "why did you mention the median?" in follow_up


async def test_files_known_from_an_earlier_run_need_no_sandbox_for_a_question(make_agent, llm_server, tmp_path):
    upload = tmp_path / "sales.csv"
    upload.write_text("region,month,amount\nnorth,2024-01,10\nsouth,2024-01,12\n")
    count = subtask("count_rows", "def count_rows():\n    import csv\n"
                    "    return {'rows': len(list(csv.DictReader(open('inputs/sales.csv'))))}")
    llm_server.reply_json(plan(count))
    llm_server.reply_json(verdict("sales.csv has 2 rows."))
    llm_server.reply_json(direct("Its columns are region, month and amount."))
    agent = make_agent()

    first = await run_with_files(agent, "how many rows?", "c3", [upload])
    assert first.status == "succeeded", first.error
    opened = agent.executor.opened
    second = await agent.run("which columns does it have?", "c3")

    assert second.status == "succeeded" and second.answer.startswith("Its columns")
    assert agent.executor.opened == opened  # the manifest came from the stored preview
    prompt = user_prompt(llm_server.chat_requests()[2])
    assert "inputs/sales.csv" in prompt and "region | month | amount" in prompt
    first_prompt = user_prompt(llm_server.chat_requests()[0])
    entry = first_prompt[first_prompt.index("- inputs/sales.csv"):first_prompt.index("Task:")].strip()
    assert "north | 2024-01 | 10" in entry and entry in prompt  # as the run that previewed it in a sandbox saw it
    # A direct answer keeps no result record: the workspace holds the upload and run 1's result only.
    names = sorted(r["name"] for r in agent.storage.workspace_files("c3"))
    assert names == ["results/run-1.json", "sales.csv"]


async def test_a_new_file_is_previewed_in_a_sandbox_before_the_planner_answers(make_agent, llm_server, tmp_path):
    upload = tmp_path / "notes.txt"
    upload.write_text("Quarterly notes\nrevenue up 4%\n")
    llm_server.reply_json(direct("The file says revenue went up 4% this quarter."))
    agent = make_agent()

    result = await run_with_files(agent, "what does this file say, in one line?", "c4", [upload])

    assert result.status == "succeeded" and result.steps == []
    assert agent.executor.opened == 1  # the preview is made by sandboxed code only
    prompt = user_prompt(llm_server.chat_requests()[0])
    assert "inputs/notes.txt" in prompt and "Quarterly notes" in prompt
    key = f"{agent.storage.workspace_files('c4')[0]['sha256']}:.txt"
    assert "Quarterly notes" in agent.storage.previews([key])[key]  # stored for the follow-ups


async def test_neither_code_nor_answer_is_asked_again(make_agent, llm_server):
    llm_server.reply_json({"main_task_thought": "", "direct_answer": "", "subtasks": []})
    llm_server.reply_json(direct("Hello! I write and run Python to answer questions about your data."))
    agent = make_agent()

    result = await agent.run("hello", "c5")

    assert result.status == "succeeded" and result.answer.startswith("Hello!")
    requests = llm_server.chat_requests()
    assert len(requests) == 2
    assert "direct_answer" in json.dumps(requests[1]["messages"][-1])  # the error was quoted back


async def test_code_tasks_still_run_code(make_agent, llm_server):
    llm_server.reply_json(plan(STEP_NUMBERS, STEP_TOTAL))
    llm_server.reply_json(verdict("The total is 6."))
    agent = make_agent()

    result = await agent.run("Add 1, 2 and 3", "c6")

    assert result.status == "succeeded" and [s.tool_name for s in result.steps] == ["get_numbers", "add_up"]
    assert len(llm_server.chat_requests()) == 2
    assert "plan_ready" in _kinds(agent, result.run_id)



def _run_page(agent, run_id: str) -> str:
    from starlette.applications import Starlette
    from starlette.testclient import TestClient

    from agent_core.viewer import routes

    run = agent.storage.get_run(run_id)
    with TestClient(Starlette(routes=routes(agent.settings, agent.storage))) as client:
        page = client.get(f"/runs/{run['view_token']}")
    assert page.status_code == 200
    return page.text


async def test_the_run_page_lists_the_input_files_with_their_origin(make_agent, llm_server, tmp_path):
    upload = tmp_path / "upload.csv"
    upload.write_text("a,b\n1,2\n")
    hostile = ("<script>alert(1)</script>.csv", upload)  # the name a user gave it
    llm_server.reply_json(direct("It has columns a and b."))
    llm_server.reply_json(direct("Still a and b."))
    agent = make_agent()

    first = await run_with_files(agent, "what is in it?", "c9", [hostile])
    second = await agent.run("and now?", "c9")

    page = _run_page(agent, first.run_id)
    from markupsafe import escape

    from agent_core.inputs import safe_name
    assert "<script>alert(1)" not in page
    assert f"inputs/{escape(safe_name(hostile[0]))} · 8 B · uploaded with this run" in page
    later = _run_page(agent, second.run_id)
    assert "uploaded with run 1" in later
