"""Daily use of the `autocode` command (issue 25): where a run's files and page are, the console's own commands and
refusals, and output cut short by a closed pipe. Real subprocesses, a real SQLite file, the scripted LLM server."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import STEP_NUMBERS, plan, png_step_code, subtask, verdict
from tests.server_helpers import ROOT

PUBLIC_URL = "https://autocode.example.com"
# This file's sandbox uids: 96000-96015 (above the ranges of tests/server_helpers.py and test_scaleout.py)
CHART = subtask("chart", png_step_code("chart", "outputs/sales_by_month.png"))


@pytest.fixture
def cli(tmp_path, llm_server):
    def run(*args: str, env: dict[str, str] | None = None, stdin: str | None = None, stdout: int | None = None):
        environ = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "AUTOCODE_"))}
        environ.update(AUTOCODE_DB=str(tmp_path / "cli.db"), AUTOCODE_LLM_MAX_RETRIES="0",
                       OPENAI_BASE_URL=llm_server.base_url, OPENAI_API_KEY="sk-cli", AUTOCODE_MODEL="fake-model",
                       AUTOCODE_SANDBOX_UID_BASE="96000", AUTOCODE_SANDBOX_MAX_WORKERS="16",
                       PYTHONPATH=str(ROOT))  # this checkout's code, not an editable install's
        environ.update(env or {})
        proc = subprocess.run(
            [sys.executable, "-P", "-m", "agent_core.cli", *args], cwd=tmp_path, env=environ,
            input=None if stdin is None else stdin.encode(), timeout=90,
            stdout=subprocess.PIPE if stdout is None else stdout, stderr=subprocess.PIPE,
        )
        return subprocess.CompletedProcess(proc.args, proc.returncode, (proc.stdout or b"").decode(),
                                           proc.stderr.decode())

    return run


def view_token(tmp_path, run_id: str) -> str:
    import sqlite3

    with sqlite3.connect(tmp_path / "cli.db") as db:
        return db.execute("SELECT view_token FROM runs WHERE id = ?", (run_id,)).fetchone()[0]


def test_run_ends_listing_its_files_and_saves_them_with_save_to(cli, llm_server, tmp_path):
    llm_server.reply_json(plan(CHART))
    llm_server.reply_json(verdict("Here is the chart."))

    proc = cli("run", "Plot sales by month", "--save-to", "charts")

    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "Here is the chart."  # stdout stays the answer alone
    saved = tmp_path / "charts" / "sales_by_month.png"
    assert saved.read_bytes().startswith(b"\x89PNG")
    run_id = re.search(r"run (\w+) started", proc.stderr).group(1)
    listing = proc.stderr[proc.stderr.index(f"Files of run {run_id} (1):"):]
    assert "sales_by_month.png  (image/png, " in listing and f"-> {saved}" in listing
    assert "Run page" not in listing  # no AUTOCODE_PUBLIC_URL: no link to give

    llm_server.reply_json(plan(CHART))
    llm_server.reply_json(verdict("Again."))
    proc = cli("run", "Plot it again")  # without --save-to: where the files are, and how to get them
    run_id = re.search(r"run (\w+) started", proc.stderr).group(1)
    assert "sales_by_month.png  (image/png, " in proc.stderr
    assert f"save them with --save-to DIR, or later with `autocode show {run_id} --save-artifacts DIR`" in proc.stderr
    assert not (tmp_path / "outputs").exists()

    (tmp_path / "taken").write_text("a file, not a directory")
    llm_server.reply_json(plan(CHART))
    llm_server.reply_json(verdict("Once more."))
    proc = cli("run", "Plot it once more", "--save-to", "taken")  # cannot save: said, the answer still printed
    run_id = re.search(r"run (\w+) started", proc.stderr).group(1)
    assert proc.returncode == 1 and proc.stdout.strip() == "Once more." and "Traceback" not in proc.stderr
    assert "autocode: could not save the run's files into taken: File exists" in proc.stderr
    assert f"`autocode show {run_id} --save-artifacts DIR`" in proc.stderr


def test_run_page_link_in_run_json_and_show_with_a_public_url(cli, llm_server, tmp_path):
    env = {"AUTOCODE_PUBLIC_URL": PUBLIC_URL + "/"}
    llm_server.reply_json(plan(CHART))
    llm_server.reply_json(verdict("Chart made."))

    out = json.loads(cli("run", "Plot sales", "--json", "--save-to", "out", env=env).stdout)

    link = f"{PUBLIC_URL}/runs/{view_token(tmp_path, out['run_id'])}"
    assert out["url"] == link and out["saved"] == [str(tmp_path / "out" / "sales_by_month.png")]
    shown = cli("show", out["run_id"], env=env)
    assert f"Run page: {link}" in shown.stdout
    assert json.loads(cli("show", out["run_id"], "--json", env=env).stdout)["url"] == link
    # Without AUTOCODE_PUBLIC_URL (or with the viewer off) there is no page to link to.
    assert json.loads(cli("show", out["run_id"], "--json").stdout)["url"] is None
    assert "Run page" not in cli("show", out["run_id"], env={**env, "AUTOCODE_VIEWER": "off"}).stdout

    llm_server.reply_json(plan(STEP_NUMBERS))
    llm_server.reply_json(verdict("1, 2, 3"))
    text = cli("run", "numbers", env=env)
    assert re.search(rf"Run page: {re.escape(PUBLIC_URL)}/runs/\S+", text.stderr), text.stderr


@pytest.mark.parametrize("task", ["", "   \n\t "])
def test_an_empty_task_is_refused_before_any_llm_call(cli, llm_server, tmp_path, task):
    proc = cli("run", task)

    assert proc.returncode == 2
    assert "the task is empty" in proc.stderr and "Traceback" not in proc.stderr
    assert llm_server.chat_requests() == [] and not (tmp_path / "cli.db").exists()  # no run was even stored


def test_chat_help_and_attach_without_a_path_are_answered_locally(cli, llm_server):
    proc = cli("chat", "--conversation", "helpchat", stdin="/help\n/attach\n/attach   \n/exit\n")

    assert proc.returncode == 0, proc.stderr
    assert "/attach PATH  add a file to your next task" in proc.stdout and "/reset" in proc.stdout
    assert proc.stdout.count("Give the file to attach: /attach PATH") == 2
    assert "is not a regular file" not in proc.stdout
    assert llm_server.chat_requests() == []  # neither went to the LLM as a task


def test_history_says_when_a_conversation_is_empty_after_reset(cli, llm_server):
    llm_server.reply_json(plan(STEP_NUMBERS))
    llm_server.reply_json(verdict("1, 2, 3"))
    assert cli("chat", "--conversation", "c1", stdin="numbers\n/exit\n").returncode == 0
    assert "1, 2, 3" in cli("history", "--conversation", "c1").stdout

    assert "History and files cleared" in cli("chat", "--conversation", "c1", stdin="/reset\n/exit\n").stdout
    proc = cli("history", "--conversation", "c1")

    assert proc.returncode == 0
    assert proc.stdout.strip() == "No messages in conversation c1 (it is new, or was cleared with /reset)."
    assert "No messages in conversation never-used" in cli("history", "--conversation", "never-used").stdout


def test_a_closed_pipe_ends_quietly(cli, llm_server):
    """`autocode show RUN | head -2`, `autocode doctor --json | head`: the reader is gone before the output is
    written (a pipe whose read end is closed), so every write fails with EPIPE. No traceback, SIGPIPE's status."""
    llm_server.reply_json(plan(STEP_NUMBERS))
    llm_server.reply_json(verdict("1, 2, 3"))
    run_id = json.loads(cli("run", "numbers", "--json").stdout)["run_id"]
    for command in (["show", run_id], ["show", run_id, "--json"], ["history"], ["doctor", "--json"]):
        read_end, write_end = os.pipe()
        os.close(read_end)
        try:
            proc = cli(*command, stdout=write_end)
        finally:
            os.close(write_end)
        assert proc.returncode == 141, (command, proc.stderr)
        # Nothing about the pipe: no traceback, no error. (doctor may log the sandbox backend it falls back to, on
        # a machine without bubblewrap: that line is about the sandbox, not the pipe.)
        said = [line for line in proc.stderr.splitlines() if "fallback 'process' backend" not in line]
        assert said == [], (command, proc.stderr)
