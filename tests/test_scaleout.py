"""Scale-out with the real pieces: `redis-server`, `autocode serve` with AUTOCODE_REDIS_URL and two
`autocode worker` processes, each a subprocess, with a scripted OpenAI-compatible LLM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from tests.conftest import plan, subtask, verdict
from tests.server_helpers import (
    ScriptedLLM, Serve, _die_with_the_tests, db_rows, free_port, serve_env, wait_for,
)
from tests.procs import host_processes
from tests.system_packages import requires

pytestmark = [
    pytest.mark.skipif(sys.platform != "linux", reason="the sandbox needs Linux"),
    requires("redis-server"),
]

# Each worker gets its own sandbox uid range (two workers on one machine must not share uids).
UID_BASE = 90000 + 512 * (os.getpid() % 8)


@pytest.fixture
def redis_url(tmp_path):
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_die_with_the_tests,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)

    def ready() -> bool:
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False

    try:
        wait_for(ready, 15, what="redis-server")
        yield url
    finally:
        client.close()
        proc.kill()
        proc.wait()


class Worker:
    """One `autocode worker` subprocess."""

    def __init__(self, env: dict[str, str], name: str, log_path: Path, cwd: Path, concurrency: int = 2):
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-P", "-m", "agent_core.cli", "worker", "--name", name, "--concurrency", str(concurrency)],
            cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            preexec_fn=_die_with_the_tests,
        )

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def wait_ready(self, timeout: float = 40) -> None:
        wait_for(lambda: "ready." in self.log_path.read_text(errors="replace") or self.proc.poll() is not None,
                 timeout, what=f"worker {self.name} to start")
        assert self.proc.poll() is None, self.log_tail()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture
def cluster(redis_url, tmp_path):
    """start(llm_base_url, workers=2) -> (serve, [workers]); everything is stopped at the end."""
    started: list = []

    def start(llm_url: str, workers: int = 2, concurrency: int = 2, **env_overrides: str):
        db = tmp_path / "autocode.db"
        llm = type("L", (), {"base_url": llm_url})
        base = serve_env(llm, db, **{"AUTOCODE_REDIS_URL": str(redis_url), "AUTOCODE_JOB_MARGIN": "20", **env_overrides})
        crew = []
        for number in range(workers):
            env = {**base, "AUTOCODE_SANDBOX_UID_BASE": str(UID_BASE + 256 * number),
                   "AUTOCODE_SANDBOX_MAX_WORKERS": "64", "AUTOCODE_DB": str(tmp_path / "worker-must-not-use.db")}
            worker = Worker(env, f"w{number}@test", tmp_path / f"worker{number}.log", tmp_path, concurrency)
            started.append(worker)
            crew.append(worker)
        server = Serve(base, tmp_path / "serve.log", tmp_path)
        server.db = db
        started.append(server)
        health = server.wait_ready()
        assert health["workers"]["mode"] == "celery" and health["workers"]["status"] == "ok", health
        for worker in crew:
            worker.wait_ready()
        return server, crew

    yield start
    for thing in reversed(started):
        thing.close()


def worker_uids(number: int) -> range:
    return range(UID_BASE + 256 * number, UID_BASE + 256 * number + 64)


def live_processes_of(uids: range) -> list:
    return [p for p in host_processes() if p.uid in uids and p.alive]


# ------------------------------------------------------------------------------------------------ tests


def test_twenty_runs_complete_exactly_once_on_two_workers(cluster, tmp_path):
    with ScriptedLLM() as llm:
        server, workers = cluster(llm.base_url)
        run_ids = [server.submit_ok(f"job tag=T{i} sleep=0.3", conversation=f"c{i}") for i in range(20)]
        for i, run_id in enumerate(run_ids):
            run = server.wait_status(run_id, timeout=120)
            assert run["status"] == "succeeded", (run, server.log_tail())
            assert run["answer"] == f"tag T{i}"
        steps = db_rows(server.db, "SELECT run_id, worker, status FROM steps")
        assert sorted(s["run_id"] for s in steps) == sorted(run_ids)  # one step per run: nothing ran twice
        assert {s["status"] for s in steps} == {"ok"}
        assert {s["worker"] for s in steps} == {"w0@test", "w1@test"}, "both workers executed steps"
        for i in range(20):
            assert len(llm.requests_of("plan", f"tag=T{i} ")) == 1
        assert not (tmp_path / "worker-must-not-use.db").exists(), "only serve touches the database"


def test_working_files_travel_between_iterations_and_outputs_become_artifacts(cluster, llm_server):
    # Iteration 1 writes a file and fails; the repair in iteration 2 (a fresh sandbox on any worker) reads it.
    llm_server.reply_json(plan(
        subtask("write_notes", "def write_notes():\n    import os\n    os.makedirs('outputs', exist_ok=True)\n"
                "    open('notes.txt', 'w').write('kept across jobs')\n"
                "    open('outputs/report.txt', 'w').write('the report')\n    return {'written': True}\n",
                imports=["os"]),
        subtask("broken", "def broken(previous_output):\n    raise ValueError('boom')\n", input_from="write_notes"),
    ))
    llm_server.reply_json(verdict(ok=False, retry_from="broken", new=[
        subtask("read_notes", "def read_notes(previous_output):\n    return {'notes': open('notes.txt').read()}\n",
                input_from="write_notes")]))
    llm_server.reply_json(verdict("notes: kept across jobs"))
    server, _ = cluster(llm_server.base_url, workers=1)
    run_id = server.submit_ok("write then read")
    run = server.wait_status(run_id, timeout=90)
    assert run["status"] == "succeeded", (run, server.log_tail())
    steps = db_rows(server.db, "SELECT iteration, tool_name, status, output_json, worker FROM steps ORDER BY id")
    assert [(s["iteration"], s["tool_name"], s["status"]) for s in steps] == [
        (1, "write_notes", "ok"), (1, "broken", "error"), (2, "read_notes", "ok")]
    assert json.loads(steps[2]["output_json"]) == {"notes": "kept across jobs"}
    artifacts = db_rows(server.db, "SELECT name, data FROM artifacts WHERE run_id = ?", (run_id,))
    assert [(a["name"], a["data"]) for a in artifacts] == [("report.txt", b"the report")]


def test_killed_worker_mid_step_is_redelivered(cluster, tmp_path):
    with ScriptedLLM() as llm:
        server, workers = cluster(llm.base_url)
        client = redis.Redis.from_url(server.env["AUTOCODE_REDIS_URL"])
        run_id = server.submit_ok("job tag=K sleep=6")

        def holder() -> str | None:
            for key in client.scan_iter("autocode:job:*:beat"):
                value = client.get(key)
                if value:
                    return value.decode()
            return None

        name = wait_for(holder, 30, what="a worker to take the job")
        victim_index = [w.name for w in workers].index(name)
        victim, survivor = workers[victim_index], workers[1 - victim_index]
        wait_for(lambda: live_processes_of(worker_uids(victim_index)), 20, what="the step to be running")
        killed_at = time.monotonic()
        os.kill(victim.proc.pid, signal.SIGKILL)
        victim.proc.wait()

        run = server.wait_status(run_id, timeout=60)
        assert run["status"] == "succeeded", (run, server.log_tail(), survivor.log_tail())
        assert run["answer"] == "tag K"
        assert time.monotonic() - killed_at < 45
        steps = db_rows(server.db, "SELECT worker, status FROM steps WHERE run_id = ?", (run_id,))
        assert steps == [{"worker": survivor.name, "status": "ok"}], "the step was redelivered to the survivor"
        wait_for(lambda: not live_processes_of(worker_uids(victim_index)), 10,
                 what="the killed worker's sandbox processes to be gone")


def test_killed_only_worker_fails_the_run_with_a_clear_message(cluster):
    with ScriptedLLM() as llm:
        server, workers = cluster(llm.base_url, workers=1, AUTOCODE_STEP_TIMEOUT="10", AUTOCODE_JOB_QUEUE_TIMEOUT="5")
        run_id = server.submit_ok("job tag=L sleep=30")
        wait_for(lambda: live_processes_of(worker_uids(0)), 30, what="the step to be running")
        os.kill(workers[0].proc.pid, signal.SIGKILL)
        server.wait_status(run_id, timeout=60)  # lost, sent again, nobody takes it: the queue's bound ends it
        step = db_rows(server.db, "SELECT error FROM steps WHERE run_id = ?", (run_id,))[-1]
        assert "no worker took this step within 5 s (AUTOCODE_JOB_QUEUE_TIMEOUT)" in step["error"], step
        assert not live_processes_of(worker_uids(0))


def test_cancel_kills_the_remote_step(cluster):
    with ScriptedLLM() as llm:
        server, workers = cluster(llm.base_url, workers=1)
        run_id = server.submit_ok("job tag=C sleep=60")
        wait_for(lambda: live_processes_of(worker_uids(0)), 30, what="the step to be running")
        response = server.http.post(f"/api/runs/{run_id}/cancel")
        assert response.json()["status"] == "cancelled"
        wait_for(lambda: not live_processes_of(worker_uids(0)), 5, what="the remote step's processes to die")


def test_remote_llm_helper_calls_are_capped_and_audited(cluster, llm_server):
    # The worker answers llm() with the budget the job carries: serve's caps, and the run's usage so far.
    llm_server.reply_json(plan(subtask("flood", (
        "def flood():\n"
        "    answered, refused = 0, []\n"
        "    try:\n"
        "        llm('x' * 30000)\n"
        "    except Exception as exc:\n"
        "        refused.append(str(exc))\n"
        "    for i in range(50):\n"
        "        try:\n"
        "            llm(f'remote {i:02d} ' + 'q' * 2500)\n"
        "            answered += 1\n"
        "        except Exception as exc:\n"
        "            refused.append(str(exc))\n"
        "    return {'answered': answered, 'refused': refused}\n"))))
    llm_server.responder(lambda body: {"json": verdict("flooded")} if "response_format" in body
                         else {"content": "a" * 3000})
    server, _ = cluster(llm_server.base_url, workers=1, AUTOCODE_LLM_CALLS_PER_STEP="5")
    run_id = server.submit_ok("flood the helper")
    run = server.wait_status(run_id, timeout=90)
    assert run["status"] == "succeeded", (run, server.log_tail())

    output = json.loads(db_rows(server.db, "SELECT output_json FROM steps WHERE run_id = ?", (run_id,))[0]["output_json"])
    assert output["answered"] == 5
    assert len(output["refused"]) == 46
    assert "30000 characters, over the limit of 20000 (AUTOCODE_LLM_PROMPT_MAX_CHARS)" in output["refused"][0]
    assert all("this step already made 5 calls (AUTOCODE_LLM_CALLS_PER_STEP)" in text for text in output["refused"][1:])
    helper_requests = [b for b in llm_server.chat_requests() if "response_format" not in b]
    assert len(helper_requests) == 5
    rows = db_rows(server.db, "SELECT prompt_text, prompt_chars, reply_text, response_chars FROM llm_calls "
                   "WHERE run_id = ? AND purpose = 'helper' ORDER BY id", (run_id,))
    assert [r["prompt_text"][:9] for r in rows] == [f"remote {i:02d}" for i in range(5)]
    assert {(r["prompt_chars"], len(r["prompt_text"]), r["response_chars"], r["reply_text"]) for r in rows} == {
        (2510, 2002, 3000, "a" * 2000 + " …")}


def test_remote_llm_helper_calls_count_against_the_users_daily_budget(cluster, llm_server):
    # The job carries the day's usage; the worker adds its own calls' tokens and refuses past the budget.
    llm_server.reply_json(plan(subtask("spend", (
        "def spend():\n"
        "    answered, refused = 0, []\n"
        "    for i in range(10):\n"
        "        try:\n"
        "            llm(f'q{i}')\n"
        "            answered += 1\n"
        "        except Exception as exc:\n"
        "            refused.append(str(exc))\n"
        "    return {'answered': answered, 'refused': refused}\n"))), prompt_tokens=100, completion_tokens=100)
    llm_server.responder(lambda body: {"json": verdict("spent")} if "response_format" in body
                         else {"content": "a", "prompt_tokens": 1000, "completion_tokens": 0})
    server, _ = cluster(llm_server.base_url, workers=1, AUTOCODE_DAILY_TOKENS_PER_USER="2500")
    run_id = server.submit_ok("spend the day", "daily", user="dora")
    run = server.wait_status(run_id, timeout=90)

    # 200 (plan) + 3 calls of 1000: the fourth is refused, and so is the evaluator.
    output = json.loads(db_rows(server.db, "SELECT output_json FROM steps WHERE run_id = ?", (run_id,))[0]["output_json"])
    assert output["answered"] == 3, output
    assert len(output["refused"]) == 7
    assert all("AUTOCODE_DAILY_TOKENS_PER_USER" in text and "used 3200 of their 2500" in text
               for text in output["refused"])
    assert len([b for b in llm_server.chat_requests() if "response_format" not in b]) == 3
    assert run["status"] == "failed" and "AUTOCODE_DAILY_TOKENS_PER_USER" in run["error"], run


def test_a_confirm_tool_on_a_worker_waits_for_the_decision_made_on_serve(cluster, llm_server, tmp_path):
    """Approvals with Celery workers: the worker's step waits (its timeout stopped) while serve asks; approve →
    the tool runs once on the worker; deny → ToolDenied in the step and nothing sent."""
    from tests.test_approvals import SEND, TOOLS, _sent

    sent = tmp_path / "sent.jsonl"
    tools = tmp_path / "tools.py"
    tools.write_text(TOOLS.format(sent=str(sent)))
    for _ in range(2):
        llm_server.reply_json(plan(SEND))
        llm_server.reply_json(verdict("done"))
    server, _ = cluster(llm_server.base_url, workers=1, AUTOCODE_TOOLS=str(tools), AUTOCODE_STEP_TIMEOUT="3")

    def pending(run_id: str) -> list:
        return [a for a in server.http.get(f"/api/runs/{run_id}").json()["approvals"] if a["status"] == "pending"]

    first = server.submit_ok("email the boss")
    wait_for(lambda: pending(first), 60, what="the approval to be asked for")
    time.sleep(4)  # longer than the step may run: the wait does not count
    assert server.http.post(f"/api/runs/{first}/approvals/1", json={"approve": True}).status_code == 200
    run = server.wait_status(first, timeout=60)
    assert run["status"] == "succeeded", (run, server.log_tail())
    assert len(_sent(sent)) == 1

    second = server.submit_ok("email the boss again")
    wait_for(lambda: pending(second), 60, what="the second approval")
    assert server.http.post(f"/api/runs/{second}/approvals/1", json={"approve": False, "by": "ops"}).status_code == 200
    assert server.wait_status(second, timeout=60)["status"] == "succeeded"
    output = json.loads(db_rows(server.db, "SELECT output_json FROM steps WHERE run_id = ?", (second,))[0]["output_json"])
    assert output == {"sent": False, "why": "send_email was not run: api:ops denied it"}
    assert len(_sent(sent)) == 1
