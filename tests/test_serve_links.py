"""`autocode serve` (issue 25): the run page link in the API's answers, and a start-up line that names the chat
adapters that actually came up. A real serve subprocess, the scripted LLM, the fake Telegram Bot API."""

from __future__ import annotations

import sys

import pytest

from tests.fakes.telegram_server import FakeTelegram
from tests.server_helpers import ScriptedLLM, Serve, db_rows, serve_env, wait_for

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the server's sandbox needs Linux")

PUBLIC_URL = "https://autocode.example.com"


@pytest.fixture
def llm():
    with ScriptedLLM() as scripted:
        yield scripted


def start(llm: ScriptedLLM, tmp_path, name: str, **env: str) -> Serve:
    server = Serve(serve_env(llm, tmp_path / f"{name}.db", **env), tmp_path / f"{name}.log", tmp_path)
    server.wait_ready()
    return server


def test_post_and_get_runs_carry_the_run_page_link(llm, tmp_path):
    server = start(llm, tmp_path, "linked", AUTOCODE_PUBLIC_URL=PUBLIC_URL)
    try:
        submitted = server.submit("job tag=LINK", "links")
        assert submitted.status_code == 202, submitted.text
        run_id = submitted.json()["run_id"]
        (row,) = db_rows(tmp_path / "linked.db", "SELECT view_token FROM runs WHERE id = ?", (run_id,))
        link = f"{PUBLIC_URL}/runs/{row['view_token']}"
        assert submitted.json()["url"] == link
        run = server.wait_status(run_id)
        assert run["status"] == "succeeded" and run["url"] == link
        files = server.http.post("/api/runs", data={"task": "job tag=FILES"},
                                 files=[("file", ("a.csv", b"x,y\n1,2\n", "text/csv"))])
        assert files.status_code == 202, files.text
        assert files.json()["url"].startswith(f"{PUBLIC_URL}/runs/")
    finally:
        server.close()

    plain = start(llm, tmp_path, "plain")  # no AUTOCODE_PUBLIC_URL: no page anyone outside could open
    try:
        submitted = plain.submit("job tag=NOLINK", "links")
        assert submitted.json()["url"] is None
        assert plain.wait_status(submitted.json()["run_id"])["url"] is None
    finally:
        plain.close()


def test_start_up_line_names_only_the_adapters_that_came_up(llm, tmp_path):
    with FakeTelegram("123456:the-right-token", "AutoCodeTestBot") as telegram:
        server = start(llm, tmp_path, "rejected", TELEGRAM_BOT_TOKEN="123456:a-wrong-token",
                       TELEGRAM_API_URL=telegram.api_url)
        try:
            line = wait_for(lambda: next((l for l in server.log_tail(20000).splitlines()
                                          if "autocode serve ready" in l), None), 20, what="the ready line")
        finally:
            server.close()
    assert "adapters: none; off: telegram (Telegram rejected TELEGRAM_BOT_TOKEN" in line, line
    assert "a-wrong-token" not in server.log_tail(100000)
