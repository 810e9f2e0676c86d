"""A full disk under a real `autocode serve` (issue 21 item 1): the database and its blobs on a real 40 MB tmpfs,
filled while runs wait on the LLM. Every run ends (`failed`, saying the disk is full) as soon as the database can
be written again, its conversation goes on, cancel ends a run, /healthz says "degraded" meanwhile, uploads are
refused up front with the cause, and every API error is a JSON sentence."""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.server_helpers import ScriptedLLM, Serve, serve_env, wait_for

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the server's sandbox and tmpfs need Linux")


@pytest.fixture
def tmpfs(tmp_path):
    """A real 40 MB tmpfs for the data directory (skipped where this process may not mount one)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "data"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m,mode=0755", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def fill(directory: Path) -> Path:
    """Write a file until the filesystem has no byte left; returns it (unlink it to free the space)."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as out:
        for size in (1 << 20, 4096, 1):
            while True:
                try:
                    out.write(b"\0" * size)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    break
    return filler


@pytest.fixture
def llm():
    with ScriptedLLM() as scripted:
        yield scripted


@pytest.fixture
def server(llm, tmpfs, tmp_path):
    serve = Serve(serve_env(llm, tmpfs / "autocode.db", AUTOCODE_DISK_RESERVE_MB="1"), tmp_path / "serve.log",
                  tmp_path)
    try:
        serve.wait_ready()
        yield serve
    finally:
        serve.close()


def test_a_full_disk_ends_every_run_once_writable_frees_its_conversation_and_says_why(server, llm, tmpfs):
    runs = {name: server.submit_ok(f"job tag={name} llmdelay=2", f"conv-{name}") for name in ("A", "B", "C")}
    follow_up = server.submit_ok("job tag=D", "conv-A")  # waits behind A
    wait_for(lambda: len(llm.requests_of("plan")) == 3, 20, what="the three runs waiting on the LLM")
    filler = fill(tmpfs)

    health = server.http.get("/healthz")
    assert health.status_code == 503, health.text
    assert health.json()["status"] == "degraded" and not health.json()["storage"]["writable"]

    # The planner answers; no run can record anything. Each is ended in memory, its end written once it can be.
    def unwritten() -> list[str]:
        return server.http.get("/healthz").json()["storage"].get("runs_not_yet_ended", [])

    wait_for(lambda: sorted(unwritten()) == sorted(runs.values()), 30,
             what=f"the three runs to be ended in memory; log:\n{server.log_tail()}")
    cancelled = server.http.post(f"/api/runs/{runs['B']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled", cancelled.text

    # Every API error is a JSON sentence, and uploads are refused before a byte is taken.
    submitted = server.submit("job tag=E", "conv-E")
    assert submitted.status_code == 503, submitted.text
    assert submitted.json()["status"] == "refused" and "disk is full" in submitted.json()["error"]
    upload = server.http.post("/api/runs", data={"task": "read it", "conversation": "conv-F"},
                              files=[("file", ("data.csv", b"a,b\n1,2\n", "text/csv"))])
    assert upload.status_code == 507, upload.text
    assert "disk is full" in upload.json()["error"] and "send them again" not in upload.json()["error"]
    assert server.run(runs["A"])["status"] == "running"  # not written yet: the disk is still full

    filler.unlink()  # space again: the ends are written without a restart

    ended = {name: server.wait_status(run_id, timeout=30) for name, run_id in runs.items()}
    for name in ("A", "C"):
        assert ended[name]["status"] == "failed", ended[name]
        assert ended[name]["error"].startswith("The server's disk is full"), ended[name]
    assert ended["B"]["status"] == "cancelled", ended["B"]
    after = server.wait_status(follow_up, timeout=60)
    assert after["status"] == "succeeded" and after["answer"] == "tag D", after
    health = server.http.get("/healthz")
    assert health.status_code == 200 and health.json()["status"] == "ok", health.text
    assert "Traceback" not in server.log_tail(200_000)


def test_cancel_ends_a_run_whose_task_is_gone(server, llm, tmpfs):
    """A run left `running` with no task behind it (its end was never written, and the disk is full again when
    it is tried): cancel ends it, now or as soon as the database takes it."""
    run_id = server.submit_ok("job tag=G llmdelay=1", "conv-G")
    wait_for(lambda: llm.requests_of("plan", "tag=G"), 20, what="the run waiting on the LLM")
    filler = fill(tmpfs)
    wait_for(lambda: run_id in server.http.get("/healthz").json()["storage"].get("runs_not_yet_ended", []), 30,
             what="the run ended in memory")
    answer = server.http.post(f"/api/runs/{run_id}/cancel")
    assert answer.status_code == 200 and answer.json()["status"] == "cancelled", answer.text
    filler.unlink()
    ended = server.wait_status(run_id, timeout=30)
    assert ended["status"] == "cancelled", ended


async def test_a_restart_on_a_full_disk_interrupts_left_runs_once_the_database_can_be_written(make_agent, tmpfs):
    """Serve restarts while the disk is still full: runs a crash left `running` cannot be recorded `interrupted`
    yet. They are as soon as the database takes writes (no second restart), and their users are told once."""
    from agent_core.scheduler import INTERRUPTED_MESSAGE, RunScheduler
    from tests.server_helpers import next_uid_base

    agent = make_agent(db_path=tmpfs / "autocode.db", sandbox_warm=0, sandbox_uid_base=next_uid_base())
    run_id = agent.storage.create_run("left", "job tag=L", status="running", adapter="slack")
    filler = fill(tmpfs)
    told: list[str] = []

    async def notify(run: dict) -> None:
        told.append(run["id"])

    scheduler = RunScheduler(agent)
    scheduler.on_interrupted("slack", notify)
    await scheduler.start()
    try:
        await scheduler.announce_interrupted()
        assert scheduler.unwritten_ends == [run_id] and told == []
        assert agent.storage.get_run(run_id)["status"] == "running"

        filler.unlink()

        for _ in range(100):
            if agent.storage.get_run(run_id)["status"] != "running" and told:
                break
            await asyncio.sleep(0.1)
        run = agent.storage.get_run(run_id)
        assert run["status"] == "interrupted" and run["error"] == INTERRUPTED_MESSAGE, run
        assert told == [run_id] and scheduler.unwritten_ends == []
    finally:
        await scheduler.stop(grace=1)


def test_a_slack_task_on_a_full_disk_is_refused_in_the_channel_with_the_cause(llm, tmpfs, tmp_path):
    """A chat user whose task cannot be stored is told why in the channel (the adapters post a refusal's
    sentence), not left without an answer while Slack retries the event."""
    from tests.fakes.slack_server import FakeSlack
    from tests.test_slack import SECRET, TOKEN, in_channel, mention, send_event

    with FakeSlack() as slack:
        serve = Serve(serve_env(llm, tmpfs / "autocode.db", SLACK_BOT_TOKEN=TOKEN, SLACK_SIGNING_SECRET=SECRET,
                                SLACK_API_URL=slack.api_url), tmp_path / "slack.log", tmp_path)
        try:
            serve.wait_ready()
            filler = fill(tmpfs)
            answer = send_event(serve, mention("CFULL", "job tag=FULL"))
            assert answer.status_code == 200, answer.text
            posted = wait_for(lambda: in_channel(slack, "chat.postMessage", "CFULL"), 20,
                              what="the refusal in the channel")
            assert "disk is full" in posted[0].params["text"], posted[0].params
            filler.unlink()
        finally:
            serve.close()
        assert "Traceback" not in serve.log_tail(10**6)
