"""Scale-out when things go wrong (issue 21, items 2-4), with the real pieces: `redis-server`, `autocode serve` and
`autocode worker` subprocesses, an exact tool with a side effect (a line per call in a file).

- a worker killed after its step's tool call: the job goes to the other worker, the tool is not called again;
- a worker killed during a tool call: the step gets "send_email may or may not have run", not a second call;
- one worker, more runs than slots: queueing does not count against a step's time; a job serve gave up on never
  starts;
- a Redis restart mid-run: every run succeeds, no step or tool call twice.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import redis

from tests.server_helpers import ScriptedLLM, _die_with_the_tests, db_rows, free_port, mail_tools, sent_mail, wait_for
from tests.system_packages import requires
from tests.test_scaleout import cluster, live_processes_of, worker_uids  # noqa: F401  (fixtures)

pytestmark = [
    pytest.mark.skipif(sys.platform != "linux", reason="the sandbox needs Linux"),
    requires("redis-server"),
]


class RedisServer(str):
    """The URL of a `redis-server` subprocess that `restart` can stop and start again on the same port."""

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_die_with_the_tests)
        client = redis.Redis.from_url(str(self))

        def ready() -> bool:
            try:
                return bool(client.ping())
            except redis.exceptions.RedisError:
                return False

        wait_for(ready, 15, what="redis-server")
        client.close()

    def restart(self, down_s: float, keep_data: bool = True) -> None:
        """Stop Redis (saving its data first, as a Redis with persistence does on SHUTDOWN, unless not
        `keep_data`), keep it down `down_s` seconds, start it again with what it saved."""
        client = redis.Redis.from_url(str(self))
        try:
            client.shutdown(save=keep_data, nosave=not keep_data)
        except redis.exceptions.ConnectionError:
            pass  # SHUTDOWN closes the connection
        self.proc.wait(10)
        time.sleep(down_s)
        self.start()

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def redis_url(tmp_path):
    port = free_port()
    server = RedisServer(f"redis://127.0.0.1:{port}/0")
    server.port, server.dir = port, tmp_path
    server.start()
    yield server
    server.stop()


def holder_of_a_job(client: redis.Redis) -> str | None:
    for key in client.scan_iter("autocode:job:*:beat"):
        value = client.get(key)
        if value:
            return value.decode()
    return None


def kill_the_worker_holding_the_job(server, workers) -> tuple:
    """kill -9 of the worker whose job beats: (victim, survivor)."""
    client = redis.Redis.from_url(server.env["AUTOCODE_REDIS_URL"])
    name = wait_for(lambda: holder_of_a_job(client), 30, what="a worker to take the job")
    client.close()
    index = [w.name for w in workers].index(name)
    victim, survivor = workers[index], workers[1 - index]
    os.kill(victim.proc.pid, signal.SIGKILL)
    victim.proc.wait()
    return victim, survivor


def test_a_tool_call_made_before_the_worker_was_lost_is_not_made_again(cluster, tmp_path):
    tools, sent = mail_tools(tmp_path)
    with ScriptedLLM() as llm:
        server, workers = cluster(llm.base_url, AUTOCODE_TOOLS=str(tools))
        run_id = server.submit_ok("job tag=M mail=report sleep=8")
        wait_for(lambda: sent_mail(sent), 60, what="the tool call")
        time.sleep(0.5)  # its result is recorded; the step now sleeps
        victim, survivor = kill_the_worker_holding_the_job(server, workers)

        run = server.wait_status(run_id, timeout=90)
        assert run["status"] == "succeeded", (run, server.log_tail(), survivor.log_tail())
        assert run["answer"] == "tag M"
        steps = db_rows(server.db, "SELECT worker, status FROM steps WHERE run_id = ?", (run_id,))
        assert steps == [{"worker": survivor.name, "status": "ok"}], "the step ran again on the survivor"
        assert len(sent_mail(sent)) == 1, "the redelivered step got the recorded result: no second email"
        calls = db_rows(server.db, "SELECT iteration, step, number, tool, status, result_json FROM tool_calls "
                        "WHERE run_id = ?", (run_id,))
        assert calls == [{"iteration": 1, "step": "work", "number": 1, "tool": "send_email", "status": "done",
                          "result_json": '{"sent": true}'}]


def test_a_tool_call_the_lost_worker_never_finished_is_not_repeated_blindly(cluster, tmp_path):
    tools, sent = mail_tools(tmp_path)
    with ScriptedLLM() as llm:
        server, workers = cluster(llm.base_url, AUTOCODE_TOOLS=str(tools))
        run_id = server.submit_ok("job tag=U mail=slow30")
        wait_for(lambda: sent_mail(sent), 60, what="the tool call to start")
        kill_the_worker_holding_the_job(server, workers)  # during the call: its side effect happened, no result

        run = server.wait_status(run_id, timeout=90)
        steps = db_rows(server.db, "SELECT status, error FROM steps WHERE run_id = ?", (run_id,))
        assert len(steps) == 1 and steps[0]["status"] == "error", (steps, server.log_tail())
        assert "send_email may or may not have run" in steps[0]["error"], steps
        assert len(sent_mail(sent)) == 1, "not called a second time"
        evaluations = llm.requests_of("evaluation", "tag=U")
        assert evaluations, "the evaluator was asked about the step's error"
        events = db_rows(server.db, "SELECT data_json FROM events WHERE run_id = ? AND type = 'step_finished'",
                         (run_id,))
        assert any("may or may not have run" in (json.loads(e["data_json"])["error"] or "") for e in events)
        assert run["status"] in ("succeeded", "failed")  # the scripted evaluator's verdict; either way it ended
        calls = db_rows(server.db, "SELECT status FROM tool_calls WHERE run_id = ?", (run_id,))
        assert calls == [{"status": "started"}]


def test_waiting_for_a_worker_does_not_count_against_a_steps_time(cluster, tmp_path):
    """One worker with 2 slots, 8 runs of 2 s steps with a 3 s step timeout and a 2 s margin: before, a job's
    deadline ran from when it was sent, so the later ones failed "no worker finished this step in time"."""
    tools, sent = mail_tools(tmp_path)
    with ScriptedLLM() as llm:
        server, workers = cluster(llm.base_url, workers=1, concurrency=2, AUTOCODE_TOOLS=str(tools),
                                  AUTOCODE_STEP_TIMEOUT="3", AUTOCODE_JOB_MARGIN="2")
        run_ids = [server.submit_ok(f"job tag=Q{i} mail=m{i} sleep=2", conversation=f"q{i}") for i in range(8)]
        for i, run_id in enumerate(run_ids):
            run = server.wait_status(run_id, timeout=120)
            assert run["status"] == "succeeded", (run, server.log_tail())
        steps = db_rows(server.db, "SELECT status, error FROM steps")
        assert [s["status"] for s in steps] == ["ok"] * 8, steps  # (the scripted evaluator accepts anything)
        assert sorted(m["subject"] for m in sent_mail(sent)) == sorted(f"m{i}" for i in range(8))
        waits = db_rows(server.db, "SELECT data_json FROM events WHERE type = 'worker_waiting'")
        assert waits, "the runs that waited were told so"
        assert any(json.loads(w["data_json"])["ahead"] >= 1 for w in waits), waits


def test_a_job_serve_gave_up_on_is_never_started(cluster, tmp_path):
    tools, sent = mail_tools(tmp_path)
    with ScriptedLLM() as llm:
        server, workers = cluster(llm.base_url, workers=1, concurrency=1, AUTOCODE_TOOLS=str(tools),
                                  AUTOCODE_JOB_QUEUE_TIMEOUT="3")
        busy = server.submit_ok("job tag=B sleep=8", conversation="busy")
        wait_for(lambda: live_processes_of(worker_uids(0)), 30, what="the first step to be running")
        late = server.submit_ok("job tag=L mail=late", conversation="late")

        run = server.wait_status(late, timeout=60)
        step = db_rows(server.db, "SELECT error FROM steps WHERE run_id = ?", (late,))[-1]
        assert "no worker took this step within 3 s (AUTOCODE_JOB_QUEUE_TIMEOUT)" in step["error"], (step, run)
        assert server.wait_status(busy, timeout=60)["status"] == "succeeded"
        # The worker is free now and takes the given-up job from the queue: it must drop it.
        wait_for(lambda: "serve gave up waiting for it" in workers[0].log_tail(), 30,
                 what="the worker to drop the given-up job")
        time.sleep(1)
        assert sent_mail(sent) == [], "the given-up job's tool call never happened"


@pytest.mark.parametrize("keep_data", [True, False], ids=["redis-keeps-data", "redis-loses-data"])
def test_runs_ride_out_a_redis_restart(cluster, redis_url, tmp_path, keep_data):
    tools, sent = mail_tools(tmp_path)
    with ScriptedLLM() as llm:
        server, workers = cluster(llm.base_url, concurrency=2, AUTOCODE_TOOLS=str(tools), AUTOCODE_REDIS_GRACE="30")
        run_ids = [server.submit_ok(f"job tag=R{i} mail=r{i} sleep=3", conversation=f"r{i}") for i in range(8)]
        wait_for(lambda: len(sent_mail(sent)) >= 2, 60, what="steps to be running")
        redis_url.restart(3, keep_data=keep_data)
        for run_id in run_ids:
            run = server.wait_status(run_id, timeout=120)
            assert run["status"] == "succeeded", (run, server.log_tail(), workers[0].log_tail())
        steps = db_rows(server.db, "SELECT run_id, status, error FROM steps")
        assert sorted(s["run_id"] for s in steps) == sorted(run_ids), "one step per run"
        assert {s["status"] for s in steps} == {"ok"}, steps  # (the scripted evaluator accepts anything)
        assert sorted(m["subject"] for m in sent_mail(sent)) == sorted(f"r{i}" for i in range(8)), "each mail once"
        for i in range(8):
            assert len(llm.requests_of("plan", f"tag=R{i} ")) == 1
