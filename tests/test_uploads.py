"""Files on the serve side (issue 13): `POST /api/runs` as multipart through agent_core/uploads.py's seam (a real
`autocode serve` subprocess, the fake OpenAI server, real sandboxes), and the seam itself — held runs released,
failed, redelivered and interrupted by a restart — over a real scheduler and SQLite file."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import AsyncIterator, Iterator

import httpx
import pytest

from agent_core.events import RunFinished
from agent_core.scheduler import HELD_INTERRUPTED_MESSAGE, RunScheduler
from tests.conftest import plan, subtask, user_prompt, verdict
from tests.server_helpers import Serve, db_rows, next_uid_base, serve_env

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the server's sandbox needs Linux")

CSV = "region,month,amount\n" + "".join(f"{'north' if i % 2 else 'south'},2024-{i % 12 + 1:02d},{i + 1}\n"
                                        for i in range(20))
READ = subtask("read_sales", "def read_sales():\n    import csv\n"
               "    rows = list(csv.DictReader(open('inputs/sales.csv')))\n"
               "    return {'rows': len(rows), 'total': sum(int(r['amount']) for r in rows)}\n", imports=["csv"])


@pytest.fixture
def serve(tmp_path, llm_server):
    started: list[Serve] = []

    def start(**overrides: str) -> Serve:
        server = Serve(serve_env(llm_server, tmp_path / "serve.db", **overrides), tmp_path / "serve.log", tmp_path)
        started.append(server)
        server.wait_ready()
        return server

    yield start
    for server in started:
        server.close()


def planner_prompts(llm_server) -> list[str]:
    return [user_prompt(r) for r in llm_server.chat_requests()
            if (r.get("response_format") or {}).get("json_schema", {}).get("name") == "plan"]


def test_a_multipart_csv_reaches_the_planner_as_a_manifest_and_a_follow_up_sees_it(serve, llm_server, tmp_path):
    server = serve()
    llm_server.reply_json(plan(READ))
    llm_server.reply_json(verdict("20 rows, total 210."))

    response = server.http.post("/api/runs", data={"task": "what does it say?", "conversation": "team",
                                                   "user": "ann"},
                                files=[("file", ("sales.csv", CSV.encode(), "text/csv"))])

    assert response.status_code == 202, response.text
    run_id = response.json()["run_id"]
    done = server.wait_status(run_id, timeout=60)
    assert done["status"] == "succeeded", done
    assert done["answer"] == "20 rows, total 210."
    prompt = planner_prompts(llm_server)[0]
    assert "inputs/sales.csv" in prompt and "uploaded with run 1" in prompt
    assert "header: region | month | amount" in prompt and "20 data rows" in prompt

    # A follow-up in the same conversation, plain JSON, no upload: the file is in its workspace.
    llm_server.reply_json(plan(READ))
    llm_server.reply_json(verdict("Still 20 rows."))
    second = server.submit_ok("and now?", "team", user="ann")
    assert server.wait_status(second, timeout=60)["status"] == "succeeded"
    prompt = planner_prompts(llm_server)[1]
    assert "inputs/sales.csv" in prompt and "uploaded with run 1" in prompt
    step_outputs = db_rows(tmp_path / "serve.db", "SELECT output_json FROM steps WHERE run_id = ?", (second,))
    assert any('"total": 210' in (row["output_json"] or "") for row in step_outputs), step_outputs


def _vm_hwm_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_an_upload_over_the_limit_gets_413_no_run_and_serve_does_not_hold_it_in_memory(serve, llm_server,
                                                                                        tmp_path):
    server = serve(AUTOCODE_INPUT_MAX_MB="50")
    small = server.http.post("/api/runs", data={"task": ""}, files=[("file", ("a.txt", b"x", "text/plain"))])
    assert small.status_code == 400  # a warm-up through the multipart path: its imports are in the baseline
    before = _vm_hwm_kb(server.pid)

    def body() -> Iterator[bytes]:
        boundary = "autocode-test-boundary"
        yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"task\"\r\n\r\nsum it\r\n"
               f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.csv\"\r\n"
               "Content-Type: text/csv\r\n\r\n").encode()
        chunk = b"a,b,c\n" * (1 << 16)  # 384 KiB
        for _ in range(60 * 1024 * 1024 // len(chunk) + 1):
            yield chunk
        yield f"\r\n--{boundary}--\r\n".encode()

    try:
        response = server.http.post("/api/runs", content=body(),
                                    headers={"content-type": "multipart/form-data; boundary=autocode-test-boundary"})
        status, text = response.status_code, response.text
    except httpx.HTTPError as exc:  # serve answered and closed while the client was still sending
        pytest.fail(f"no answer to the over-limit upload: {exc!r}")

    assert status == 413, text
    assert "big.csv is over the limit of 50 MB" in response.json()["error"]
    assert db_rows(tmp_path / "serve.db", "SELECT COUNT(*) AS n FROM runs")[0]["n"] == 0
    assert planner_prompts(llm_server) == []
    grown_mb = (_vm_hwm_kb(server.pid) - before) / 1024
    assert grown_mb < 20, f"serve's peak RSS grew by {grown_mb:.0f} MB for a 60 MB upload"


# ------------------------------------------------------------------------------------------ the seam itself


@pytest.fixture
async def scheduler(make_agent):
    made: list[RunScheduler] = []

    async def make(**overrides) -> RunScheduler:
        agent = make_agent(sandbox_warm=0, sandbox_uid_base=next_uid_base(), sandbox_max_workers=8, **overrides)
        sched = RunScheduler(agent)
        await sched.start()
        made.append(sched)
        return sched

    yield make
    for sched in made:
        await sched.stop(grace=1)
        await sched.agent.executor.stop()


async def _wait_status(sched: RunScheduler, run_id: str, *statuses: str, timeout: float = 60) -> dict:
    for _ in range(int(timeout / 0.05)):
        run = sched.storage.get_run(run_id)
        if run["status"] in statuses:
            return run
        await asyncio.sleep(0.05)
    raise AssertionError(f"run {run_id} is {sched.storage.get_run(run_id)['status']}, not {statuses}")


async def _chunks(data: bytes, size: int = 1000, read: list[int] | None = None) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        if read is not None:
            read.append(size)
        await asyncio.sleep(0)
        yield data[start:start + size]


async def test_a_held_run_waits_for_its_files_then_runs_with_them(scheduler, llm_server):
    from agent_core import uploads

    sched = await scheduler()
    llm_server.reply_json(plan(READ))
    llm_server.reply_json(verdict("20 rows."))
    submission = sched.submit("what does it say?", "held-1", adapter="slack", delivery_id="ev-1", hold=True)
    assert submission.status == "held"
    await asyncio.sleep(0.3)
    assert sched.storage.get_run(submission.run_id)["status"] == "held"  # not dispatched
    assert llm_server.chat_requests() == []

    async with uploads.receiving(sched, submission.run_id) as receiver:
        assert await receiver.add("sales.csv", _chunks(CSV.encode())) == len(CSV)

    assert receiver.released and receiver.failure is None
    run = await _wait_status(sched, submission.run_id, "succeeded", "failed")
    assert run["status"] == "succeeded", run
    assert "inputs/sales.csv" in planner_prompts(llm_server)[0]
    steps = sched.storage.db.execute("SELECT output_json FROM steps WHERE run_id = ?", [submission.run_id]).fetchall()
    assert any('"total": 210' in (row[0] or "") for row in steps), steps


async def test_a_held_run_over_the_limit_or_whose_download_fails_ends_failed_with_a_message(scheduler, llm_server):
    from agent_core import uploads

    sched = await scheduler(input_max_mb=1)
    finished: list[RunFinished] = []
    sched.agent.events.subscribe(lambda e: finished.append(e) if isinstance(e, RunFinished) else None)

    big = sched.submit("sum it", "held-2", adapter="telegram", hold=True)
    read: list[int] = []
    async with uploads.receiving(sched, big.run_id) as receiver:
        await receiver.add("big.csv", _chunks(b"x" * (5 << 20), size=64 << 10, read=read))
    assert isinstance(receiver.failure, uploads.InputRefused)
    assert sum(read) <= (1 << 20) + (64 << 10), "reading went on past the cap"
    run = sched.storage.get_run(big.run_id)
    assert run["status"] == "failed" and "big.csv is over the limit of 1 MB" in run["error"]

    broken = sched.submit("sum it", "held-2", adapter="telegram", hold=True)
    async with uploads.receiving(sched, broken.run_id) as receiver:
        raise uploads.DownloadFailed("Telegram's public Bot API serves files up to 20 MB; nothing was run.")
    assert sched.storage.get_run(broken.run_id)["error"].startswith("Telegram's public Bot API serves files")

    crashed = sched.submit("sum it", "held-2", adapter="telegram", hold=True)
    async with uploads.receiving(sched, crashed.run_id):
        raise ConnectionResetError("peer went away")
    assert "could not receive the files" in sched.storage.get_run(crashed.run_id)["error"]

    assert [(e.run_id, e.status) for e in finished] == [
        (big.run_id, "failed"), (broken.run_id, "failed"), (crashed.run_id, "failed")]
    assert sched.storage.workspace_files("held-2") == []
    await asyncio.sleep(0.3)
    assert llm_server.chat_requests() == []  # none of them ran


async def test_a_delivery_retried_while_its_files_download_starts_one_run_and_downloads_once(scheduler, llm_server):
    from agent_core import uploads

    sched = await scheduler()
    llm_server.reply_json(plan(READ))
    llm_server.reply_json(verdict("20 rows."))
    downloads: list[str] = []
    gate = asyncio.Event()

    async def slow_download(event_id: str) -> AsyncIterator[bytes]:
        downloads.append(event_id)
        await gate.wait()
        yield CSV.encode()

    async def on_event(event_id: str) -> None:  # what an adapter does with a platform event carrying a file
        submission = sched.submit("what does it say?", "held-3", adapter="slack", delivery_id=event_id, hold=True)
        if submission.status != "held":
            return
        async with uploads.receiving(sched, submission.run_id) as receiver:
            await receiver.add("sales.csv", slow_download(event_id))

    first = asyncio.create_task(on_event("Ev-retried"))
    await asyncio.sleep(0.1)
    await on_event("Ev-retried")  # the platform's retry, while the first is still downloading
    gate.set()
    await first

    runs = sched.storage.db.execute("SELECT id FROM runs WHERE conversation = 'held-3'").fetchall()
    assert len(runs) == 1 and downloads == ["Ev-retried"]
    assert (await _wait_status(sched, runs[0][0], "succeeded", "failed"))["status"] == "succeeded"
    assert len(planner_prompts(llm_server)) == 1


async def test_a_run_held_when_serve_dies_is_interrupted_at_restart_and_its_user_told(scheduler, make_agent):
    from agent_core import uploads

    sched = await scheduler()
    submission = sched.submit("sum it", "held-4", adapter="slack", hold=True)
    receiving = uploads.receiving(sched, submission.run_id)
    receiver = await receiving.__aenter__()
    await receiver.add("part.csv", _chunks(b"a,b\n" * 100))
    # serve is killed here: nothing ends the held run, nothing releases it; the kernel drops its database lock.
    sched.accepting = False
    sched._dispatcher.cancel()
    sched.owner.release()

    restarted = RunScheduler(make_agent(sandbox_warm=0, sandbox_uid_base=next_uid_base()))
    told: list[dict] = []

    async def notify(run: dict) -> None:
        told.append(run)

    restarted.on_interrupted("slack", notify)
    await restarted.start()
    try:
        await restarted.announce_interrupted()
        run = restarted.storage.get_run(submission.run_id)
        assert run["status"] == "interrupted" and run["error"] == HELD_INTERRUPTED_MESSAGE
        assert [r["id"] for r in told] == [submission.run_id]
        assert restarted.release(submission.run_id) is False  # the old receiver can no longer start it
        await receiving.__aexit__(None, None, None)
        assert restarted.storage.get_run(submission.run_id)["status"] == "interrupted"
    finally:
        await restarted.stop(grace=1)
        await restarted.agent.executor.stop()


# ------------------------------------------------------------------------------------------ on Celery workers

from tests.system_packages import requires  # noqa: E402
from tests.test_scaleout import cluster, redis_url  # noqa: E402,F401  (the scale-out fixtures)

TAMPER = subtask("tamper", '''
def tamper():
    import os
    tried = {}
    for what, attempt in (("append", lambda: open("inputs/x.csv", "a").write("evil")),
                          ("chmod", lambda: os.chmod("inputs/x.csv", 0o666)),
                          ("replace", lambda: open("inputs/new.csv", "w").write("evil")),
                          ("remove", lambda: os.remove("inputs/x.csv"))):
        try:
            attempt()
            tried[what] = "done"
        except OSError as exc:
            tried[what] = type(exc).__name__
    tried["text"] = open("inputs/x.csv").read()
    return tried
''', imports=["os"])


@requires("redis-server")
def test_a_step_on_a_worker_cannot_modify_its_inputs(cluster, llm_server):
    # Iteration 1 tampers and then fails; iteration 2 (a fresh sandbox from the working files brought back) reads.
    llm_server.reply_json(plan(TAMPER, subtask("broken", "def broken(previous_output):\n    raise ValueError('x')\n",
                                               input_from="tamper")))
    llm_server.reply_json(verdict(ok=False, retry_from="broken", new=[subtask(
        "again", "def again(previous_output):\n    import os\n"
        "    return {'text': open('inputs/x.csv').read(), 'names': sorted(os.listdir('inputs'))}\n",
        input_from="tamper", imports=["os"])]))
    llm_server.reply_json(verdict("unchanged"))
    server, _ = cluster(llm_server.base_url, workers=1)

    response = server.http.post("/api/runs", data={"task": "tamper with it", "conversation": "remote"},
                                files=[("file", ("x.csv", b"a,b\n1,2\n", "text/csv"))])
    assert response.status_code == 202, response.text
    run = server.wait_status(response.json()["run_id"], timeout=90)
    assert run["status"] == "succeeded", (run, server.log_tail())
    steps = db_rows(server.db, "SELECT tool_name, output_json FROM steps ORDER BY id")
    tried = json.loads(steps[0]["output_json"])
    assert tried["text"] == "a,b\n1,2\n", tried
    assert all(tried[what] != "done" for what in ("append", "chmod", "replace", "remove")), tried
    assert json.loads(steps[2]["output_json"]) == {"text": "a,b\n1,2\n", "names": ["x.csv"]}
