"""The journal of trusted tool calls (tools/journal.py) with the real tool host and a real SQLite database: a step
that runs again gets the recorded result; a call started and never finished is not repeated blindly."""

from __future__ import annotations

import asyncio

import pytest

from storage.db import Storage
from tests.test_tools import exact_toolset
from tools.host import ToolHost
from tools.journal import CURRENT_STEP, CallUncertain, StepCalls, StorageJournal

SEND = """
SENT = []

def send_email(to, subject):
    SENT.append((to, subject))
    if subject == "boom":
        raise LookupError(f"no mailbox {to}")
    return {"sent": len(SENT)}
"""


@pytest.fixture
def storage(tmp_path):
    db = Storage(tmp_path / "journal.db")
    yield db
    db.close()


def host_for(storage: Storage, attempt: str, toolset=None, **kwargs) -> ToolHost:
    toolset = toolset or exact_toolset(SEND)
    return ToolHost(toolset, _no_llm, timeout_s=5, journal=StorageJournal(storage, "run1", attempt), **kwargs)


async def _no_llm(prompt: str, system: str) -> str:
    raise AssertionError("not used")


def sent(host: ToolHost) -> list:
    return host.toolset.exact_function("send_email").__globals__["SENT"]


async def in_step(host: ToolHost, calls: list[tuple], step: str = "notify", iteration: int = 1) -> list:
    """Make `calls` as one step would (numbered 1, 2, …): each call's value, or the exception it raised."""
    token = CURRENT_STEP.set(StepCalls(iteration, step))
    try:
        out = []
        for name, args in calls:
            try:
                out.append(await host.call(name, list(args), {}))
            except Exception as exc:
                out.append(exc)
        return out
    finally:
        CURRENT_STEP.reset(token)


async def test_a_step_run_again_gets_the_recorded_results_without_calling_again(storage):
    first = host_for(storage, "job-a")
    assert await in_step(first, [("send_email", ("a@x", "hi")), ("send_email", ("b@x", "hi"))]) == [
        {"sent": 1}, {"sent": 2}]
    again = host_for(storage, "job-b", toolset=first.toolset)  # the same tool: its SENT list counts every call
    assert await in_step(again, [("send_email", ("a@x", "hi")), ("send_email", ("b@x", "hi")),
                                 ("send_email", ("c@x", "new"))]) == [{"sent": 1}, {"sent": 2}, {"sent": 3}]
    assert sent(first) == [("a@x", "hi"), ("b@x", "hi"), ("c@x", "new")], "only the third call was new"
    rows = storage.tool_calls("run1")
    assert [(r["number"], r["status"], r["attempt"]) for r in rows] == [
        (1, "done", "job-a"), (2, "done", "job-a"), (3, "done", "job-b")]
    # Another iteration (a repair) is another step: it calls for real.
    assert await in_step(again, [("send_email", ("a@x", "hi"))], iteration=2) == [{"sent": 4}]


async def test_a_failed_call_fails_again_with_the_same_text_without_running(storage):
    first = host_for(storage, "job-a")
    [error] = await in_step(first, [("send_email", ("z@x", "boom"))])
    assert type(error).__name__ == "LookupError" or isinstance(error, LookupError)
    again = host_for(storage, "job-b", toolset=first.toolset)
    [replayed] = await in_step(again, [("send_email", ("z@x", "boom"))])
    assert type(replayed).__name__ == "LookupError" and str(replayed) == "no mailbox z@x"
    assert len(sent(first)) == 1


async def test_a_replayed_tool_error_reaches_the_step_as_the_tool_error_it_was(storage):
    """An MCP tool's failure reaches the step as ToolError (catchable by that name); replayed from the journal it
    must be the same, or the step's `except ToolError` would miss it the second time."""
    from tools.mcp_host import McpToolError

    first = host_for(storage, "job-a")
    token = CURRENT_STEP.set(StepCalls(1, "notify"))
    try:
        async def fails() -> None:
            raise McpToolError("the server said no")

        with pytest.raises(McpToolError):
            await first._journaled("send_email", ["t@x", "mcp"], {}, fails)
    finally:
        CURRENT_STEP.reset(token)
    again = host_for(storage, "job-b", toolset=first.toolset)
    token = CURRENT_STEP.set(StepCalls(1, "notify"))
    try:
        async def must_not_run() -> None:
            raise AssertionError("replayed calls do not run")

        with pytest.raises(Exception) as replayed:
            await again._journaled("send_email", ["t@x", "mcp"], {}, must_not_run)
    finally:
        CURRENT_STEP.reset(token)
    assert replayed.value.raised_in_step_as == "ToolError" and str(replayed.value) == "the server said no"


async def test_a_call_started_and_never_finished_is_not_repeated(storage):
    slow = exact_toolset("import time\nCALLS = []\n\ndef send_email(to, subject):\n    CALLS.append(to)\n"
                         "    time.sleep(0.5)\n    return {'sent': True}\n")
    first = host_for(storage, "job-a", toolset=slow)
    task = asyncio.create_task(in_step(first, [("send_email", ("a@x", "hi"))]))
    await asyncio.sleep(0.2)
    task.cancel()  # the worker was lost during the call
    with pytest.raises(asyncio.CancelledError):
        await task
    assert storage.tool_calls("run1")[0]["status"] == "started"

    again = host_for(storage, "job-b", toolset=slow)
    [error] = await in_step(again, [("send_email", ("a@x", "hi"))])
    assert isinstance(error, CallUncertain)
    assert str(error).startswith("send_email may or may not have run")
    await asyncio.sleep(0.5)
    assert slow.exact_function("send_email").__globals__["CALLS"] == ["a@x"]
    # The same attempt asking again (its answer was lost on the way) has not called yet: it may go on.
    assert await in_step(first, [("send_email", ("a@x", "hi"))]) == [{"sent": True}]


async def test_a_different_call_at_a_recorded_number_is_refused(storage):
    first = host_for(storage, "job-a")
    await in_step(first, [("send_email", ("a@x", "hi"))])
    again = host_for(storage, "job-b", toolset=first.toolset)
    [error] = await in_step(again, [("send_email", ("evil@x", "hi"))])
    assert isinstance(error, CallUncertain) and "with other arguments" in str(error)
    assert sent(first) == [("a@x", "hi")]


async def test_llm_calls_are_recorded_and_an_unfinished_one_is_asked_again(storage):
    from tools.registry import build_toolset

    answers, hang = [], {"on": False}

    async def helper(prompt: str, system: str) -> str:
        answers.append(prompt)
        if hang["on"]:
            await asyncio.sleep(10)
        return f"reply {len(answers)}"

    first = ToolHost(build_toolset(None), helper, 5, journal=StorageJournal(storage, "run1", "job-a"))
    assert await in_step(first, [("llm", ("q",))]) == ["reply 1"]
    again = ToolHost(build_toolset(None), helper, 5, journal=StorageJournal(storage, "run1", "job-b"))
    assert await in_step(again, [("llm", ("q",))]) == ["reply 1"], "the recorded reply: no tokens spent twice"

    hang["on"] = True
    task = asyncio.create_task(in_step(first, [("llm", ("p",))], step="other"))
    await asyncio.sleep(0.1)
    task.cancel()  # lost during the call
    with pytest.raises(asyncio.CancelledError):
        await task
    hang["on"] = False
    assert await in_step(again, [("llm", ("p",))], step="other") == ["reply 3"], "asked again, not refused"


async def test_a_confirmed_call_recorded_as_made_is_not_asked_for_again(storage):
    from tools.declarations import tool_from_dict
    from tools.registry import ToolSet

    toolset = ToolSet([tool_from_dict({"lib_names": [], "instructions": "", "use_exactly_code_example": True,
                                       "confirm": True, "code_example": SEND}, "test")])
    asked = []

    async def approve(tool, args, kwargs):
        asked.append(tool)

    first = host_for(storage, "job-a", toolset=toolset, approve=approve)
    assert await in_step(first, [("send_email", ("a@x", "hi"))]) == [{"sent": 1}]
    again = host_for(storage, "job-b", toolset=toolset, approve=approve)
    assert await in_step(again, [("send_email", ("a@x", "hi"))]) == [{"sent": 1}]
    assert asked == ["send_email"], "approved once, made once"


async def test_without_a_step_calls_are_not_journaled(storage):
    host = host_for(storage, "job-a")
    assert await host.call("send_email", ["a@x", "hi"], {}) == {"sent": 1}
    assert storage.tool_calls("run1") == []


async def test_an_in_process_run_journals_each_call_of_its_steps(make_agent, llm_server, tmp_path):
    from tests.conftest import plan, subtask, verdict
    from tests.server_helpers import mail_tools, sent_mail

    tools, sent_file = mail_tools(tmp_path)
    llm_server.reply_json(plan(subtask("notify", "def notify():\n    send_email('a@x', 'one')\n"
                                       "    return send_email('b@x', 'two')\n")))
    llm_server.reply_json(verdict("sent"))
    agent = make_agent(tools_file=tools)
    result = await agent.run("mail twice", "c1")
    assert result.status == "succeeded", result.error
    assert [m["subject"] for m in sent_mail(sent_file)] == ["one", "two"]
    rows = agent.storage.tool_calls(result.run_id)
    assert [(r["iteration"], r["step"], r["number"], r["tool"], r["status"], r["result_json"]) for r in rows] == [
        (1, "notify", 1, "send_email", "done", '{"sent": true}'), (1, "notify", 2, "send_email", "done",
                                                                    '{"sent": true}')]


def test_the_waiting_for_a_worker_line_reaches_the_console_and_telegram():
    from agent_core.events import RunStarted, WorkerWaiting
    from bots.console import ConsoleRenderer
    from bots.telegram_render import Progress

    event = WorkerWaiting("r1", 12, 7.4)
    assert event.describe() == "waiting for a worker: 12 jobs ahead (7 s)"
    assert WorkerWaiting("r1", 0, 2.0).describe() == "waiting for a worker: next in line (2 s)"
    assert ConsoleRenderer.format(event) == "· waiting for a worker: 12 jobs ahead (7 s)"
    progress = Progress("t")
    progress.apply(RunStarted("r1", "c", "t"))
    progress.apply(event)
    assert "waiting for a worker: 12 jobs ahead" in progress.render()
