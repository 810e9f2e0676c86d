"""The `autocode` command as a user runs it: a real subprocess, a real SQLite file, the scripted LLM server."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import STEP_NUMBERS, STEP_TOTAL, plan, subtask, verdict


@pytest.fixture
def cli(tmp_path, llm_server):
    def run(*args: str, llm: bool = True, env: dict[str, str] | None = None, stdin: str | None = None):
        environ = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "AUTOCODE_"))}
        environ["AUTOCODE_DB"] = str(tmp_path / "cli.db")
        environ["AUTOCODE_LLM_MAX_RETRIES"] = "0"
        if llm:
            environ.update(OPENAI_BASE_URL=llm_server.base_url, OPENAI_API_KEY="sk-cli", AUTOCODE_MODEL="fake-model")
        environ.update(env or {})
        # -P keeps the working directory off sys.path, as for the installed `autocode` script. Bytes, decoded here:
        # text=True would turn a carriage return into a newline, hiding what a terminal would receive.
        proc = subprocess.run(
            [sys.executable, "-P", "-m", "agent_core.cli", *args], cwd=tmp_path, env=environ,
            input=None if stdin is None else stdin.encode(), capture_output=True, timeout=60,
        )
        return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(), proc.stderr.decode())

    return run


def test_no_llm_configured_exits_2_with_setup_help(cli):
    for command in (["run", "hello"], ["chat"]):
        proc = cli(*command, llm=False)
        assert proc.returncode == 2
        assert "No LLM is configured" in proc.stderr
        assert "OPENAI_API_KEY" in proc.stderr and "Ollama" in proc.stderr and "OPENAI_BASE_URL" in proc.stderr
        assert "Traceback" not in proc.stderr


def test_dotenv_file_configures_the_llm(cli, tmp_path, llm_server):
    (tmp_path / ".env").write_text(f"OPENAI_BASE_URL={llm_server.base_url}\nAUTOCODE_MODEL=from-dotenv\n")
    llm_server.reply_json(plan(STEP_NUMBERS))
    llm_server.reply_json(verdict("1, 2, 3"))

    proc = cli("run", "numbers", llm=False)

    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "1, 2, 3"
    assert llm_server.chat_requests()[0]["model"] == "from-dotenv"


def test_run_json_output_shape_and_exit_code(cli, llm_server):
    broken = subtask("add_up", "def add_up(previous_output):\n    return {'total': previous_output['x']}", "get_numbers")
    llm_server.reply_json(plan(STEP_NUMBERS, broken))
    llm_server.reply_json(verdict(ok=False, retry_from="add_up", new=[STEP_TOTAL]))
    llm_server.reply_json(verdict("The total is 6."))

    proc = cli("run", "Add 1, 2, 3", "--json", "--conversation", "k1")

    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert set(out) >= {"run_id", "conversation", "status", "answer", "iterations", "steps", "usage"}
    assert (out["conversation"], out["status"], out["answer"], out["iterations"]) == ("k1", "succeeded", "The total is 6.", 2)
    assert [(s["iteration"], s["tool_name"], s["status"]) for s in out["steps"]] == [
        (1, "get_numbers", "ok"), (1, "add_up", "error"), (2, "add_up", "ok")]
    assert out["steps"][1]["error"] == "KeyError: 'x'" and out["steps"][1]["output"] is None
    assert out["steps"][2]["output"] == {"total": 6}
    assert all(isinstance(s["duration_ms"], int) for s in out["steps"])
    assert out["usage"]["llm_calls"] == 3 and out["usage"]["prompt_tokens"] > 0 and out["usage"]["completion_tokens"] > 0

    shown = json.loads(cli("show", out["run_id"], "--json").stdout)
    assert shown["run"]["status"] == "succeeded" and len(shown["steps"]) == 3
    assert [c["purpose"] for c in shown["llm_calls"]] == ["plan", "evaluate", "evaluate"]
    text = cli("show", out["run_id"]).stdout
    assert "=== Iteration 2" in text and "KeyError: 'x'" in text and "retry from add_up" in text
    assert "def add_up(previous_output):" in text
    history = cli("history").stdout
    assert out["run_id"] in history and "succeeded" in history
    convo = cli("history", "--conversation", "k1").stdout
    assert "Add 1, 2, 3" in convo and "The total is 6." in convo


def test_unsatisfactory_run_exits_1(cli, llm_server):
    llm_server.reply_json(plan(STEP_NUMBERS))
    llm_server.reply_json(verdict(ok=False, answer="I could not.", thoughts="impossible"))

    proc = cli("run", "impossible", "--json")

    assert proc.returncode == 1
    out = json.loads(proc.stdout)
    assert out["status"] == "failed" and out["answer"] == "I could not."


def test_llm_down_exits_1_without_traceback(cli):
    proc = cli("run", "numbers", env={"OPENAI_BASE_URL": "http://127.0.0.1:9/v1"})
    assert proc.returncode == 1
    assert "Could not reach the LLM at http://127.0.0.1:9/v1" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_tools_file_exits_2(cli, tmp_path):
    (tmp_path / "tools.py").write_text("TOOLS = [{'instructions': 'no library'}]\n")
    proc = cli("run", "x", "--tools", "tools.py")
    assert proc.returncode == 2
    assert "declares no library" in proc.stderr
    proc = cli("run", "x", "--tools", "missing.py")
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_show_unknown_run_and_missing_db(cli):
    assert cli("show", "nope").returncode == 2  # no database yet
    assert "no database" in cli("history").stderr


def test_chat_keeps_a_conversation(cli, llm_server):
    llm_server.reply_json(plan(STEP_NUMBERS, STEP_TOTAL))
    llm_server.reply_json(verdict("The total is 6."))
    llm_server.reply_json(plan(STEP_NUMBERS))
    llm_server.reply_json(verdict("Twelve."))

    proc = cli("chat", "--conversation", "chat1", stdin="Add 1, 2, 3\nDouble it\n/exit\n")

    assert proc.returncode == 0, proc.stderr
    assert "The total is 6." in proc.stdout and "Twelve." in proc.stdout
    assert "[1.1/2] get_numbers" in proc.stdout and "add_up ok" in proc.stdout
    assert "AutoCode: The total is 6." in json.dumps(llm_server.chat_requests()[2])


# What a hostile step or LLM reply puts in front of the operator: a line eraser + carriage return that draws a fake
# "ok" progress line, an OSC 52 clipboard write, a screen clear, an 8-bit CSI and a bidi override.
FORGED_OK = "\x1b[2K\r  [1.1/1] fake ok"
EVIL = "\x1b]52;c;ZXZpbA==\x07" + "\x1b[2J" + "\x9b2J" + "\u202e" + "txt.exe"
STEP_EVIL = subtask("work", f"def work():\n    print({FORGED_OK + EVIL!r})\n    raise RuntimeError({FORGED_OK + EVIL!r})")
EVIL_VERDICT = verdict("Done. " + EVIL, ok=False, thoughts="Thoughts" + FORGED_OK + EVIL)
TERMINAL_ACTORS = ("\x1b", "\x07", "\r", "\x9b", "\u202e")


def _assert_no_terminal_controls(text: str) -> None:
    assert not [c for c in TERMINAL_ACTORS if c in text], repr(text[:3000])


def _assert_no_forged_progress(text: str) -> None:
    """Progress output: the forged "ok" is text inside the real line, never a line of its own."""
    assert not [line for line in text.splitlines() if line.lstrip().startswith("[1.1/1] fake ok")], text
    assert [line for line in text.splitlines() if line.startswith("  [1.1/1] work failed (")
            and "[1.1/1] fake ok" in line], text  # the real status line is still there, whole


def test_untrusted_text_never_reaches_the_terminal_raw(cli, llm_server):
    llm_server.reply_json(plan(STEP_EVIL))
    llm_server.reply_json(EVIL_VERDICT)

    proc = cli("run", "evil", "--conversation", "evil")

    assert proc.returncode == 1, proc.stderr
    _assert_no_terminal_controls(proc.stderr)
    _assert_no_terminal_controls(proc.stdout)
    _assert_no_forged_progress(proc.stderr)
    assert "· evaluator: not yet — Thoughts" in proc.stderr and proc.stdout.startswith("Done. ")
    run_id = proc.stderr.split("· run ", 1)[1].split()[0]

    shown = cli("show", run_id)
    assert shown.returncode == 0, shown.stderr
    _assert_no_terminal_controls(shown.stdout)
    assert "--- [1] work: error" in shown.stdout and "  stdout:\n" in shown.stdout
    assert [line for line in shown.stdout.splitlines()
            if line.startswith("  error: RuntimeError:") and "[1.1/1] fake ok" in line]  # one line, in its field

    as_json = cli("show", run_id, "--json")
    _assert_no_terminal_controls(as_json.stdout)
    details = json.loads(as_json.stdout)  # still valid JSON, and it holds the exact text
    (step,) = details["steps"]
    assert step["stdout"] == FORGED_OK + EVIL + "\n" and (FORGED_OK + EVIL) in step["error"]
    assert details["run"]["answer"] == "Done. " + EVIL

    for args in (["history"], ["history", "--conversation", "evil"]):
        listing = cli(*args)
        assert listing.returncode == 0, listing.stderr
        _assert_no_terminal_controls(listing.stdout)


def test_chat_progress_and_answers_are_terminal_safe(cli, llm_server):
    llm_server.reply_json(plan(STEP_EVIL))
    llm_server.reply_json(EVIL_VERDICT)

    proc = cli("chat", "--conversation", "evilchat", stdin="evil\n/exit\n")

    assert proc.returncode == 0, proc.stderr
    _assert_no_terminal_controls(proc.stdout)
    _assert_no_forged_progress(proc.stdout)
    assert "Done. " in proc.stdout
