"""`autocode serve` as operators run it: a real subprocess with its scheduler, sandbox pool and SQLite file,
driven through the internal HTTP API, with a scripted OpenAI-compatible LLM that plans from the task text
(see tests/server_helpers.py for the task mini-language: "job tag=A sleep=0.5 spawn=60 llmdelay=1 tokens=12")."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pytest

from tests.server_helpers import (
    ROOT, ScriptedLLM, Serve, db_rows, descendants, next_uid_base, processes_with, sandbox_processes,
    serve_env, spawn_marker, still_alive, wait_for,
)

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the server's sandbox needs Linux")


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def module_llm():
    with ScriptedLLM() as llm:
        yield llm


@pytest.fixture(scope="module")
def shared(module_llm, tmp_path_factory):
    """One server with default settings for the tests that do not need their own configuration."""
    directory = tmp_path_factory.mktemp("shared-serve")
    server = Serve(serve_env(module_llm, directory / "autocode.db"), directory / "serve.log", directory)
    try:
        server.wait_ready()
        server.db = directory / "autocode.db"
        yield server
    finally:
        server.close()


@pytest.fixture
def llm():
    with ScriptedLLM() as scripted:
        yield scripted


@pytest.fixture
def start_server(llm, tmp_path):
    """Start `autocode serve` on tmp_path/autocode.db with extra environment; every server is stopped at the end."""
    servers: list[Serve] = []

    def start(env: dict[str, str] | None = None, **overrides: str) -> Serve:
        environ = env if env is not None else serve_env(llm, tmp_path / "autocode.db", **overrides)
        server = Serve(environ, tmp_path / f"serve-{len(servers)}.log", tmp_path)
        servers.append(server)
        server.wait_ready()
        return server

    yield start
    for server in servers:
        server.close()


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-P", "-m", "agent_core.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def wait_gone(within: float, what: str, probe) -> None:
    """Assert that `probe()` (a list of processes) becomes empty within `within` seconds."""
    deadline = time.monotonic() + within
    left = probe()
    while left and time.monotonic() < deadline:
        time.sleep(0.02)
        left = probe()
    assert not left, f"{what} still alive after {within:g}s: {[(p.pid, p.uid, p.cmdline[:80]) for p in left]}"


def wait_step_started(marker: str, timeout: float = 20) -> None:
    """Until the step's child `sleep <marker>` runs under one of our sandbox uids."""
    wait_for(lambda: any(marker in p.cmdline for p in sandbox_processes()), timeout,
             what=f"a sandboxed `sleep {marker}`")


# ------------------------------------------------------------------------------------------ 1. happy path


def test_happy_path_and_healthz(shared, module_llm):
    health = shared.http.get("/healthz")
    assert health.status_code == 200
    body = health.json()
    assert body["status"] == "ok" and body["database"] == "ok" and body["workers"] == "in-process"
    assert body["sandbox"]["backend"] in ("bwrap", "process") and body["sandbox"]["network"] == "off"
    assert (body["sandbox"]["fallback_reason"] is None) == (body["sandbox"]["backend"] == "bwrap")
    assert body["runs"] == {"running": 0, "max": 32}

    run_id = shared.submit_ok("job tag=HAPPY", "happy", user="u1", adapter="api")
    run = shared.wait_status(run_id)

    assert run["status"] == "succeeded", (run, shared.log_tail())
    assert run["answer"] == "tag HAPPY" and run["error"] is None and run["iterations"] == 1
    assert (run["id"], run["conversation"], run["task"], run["user"]) == (run_id, "happy", "job tag=HAPPY", "u1")
    assert run["created_at"] <= run["started_at"] <= run["finished_at"]
    assert run["usage"]["llm_calls"] == 2 and run["usage"]["prompt_tokens"] > 0
    assert [r.kind for r in module_llm.log if "HAPPY" in r.task] == ["plan", "evaluation"]


# ------------------------------------------------------------------------------------------ 2. ordering


def test_one_run_at_a_time_per_conversation(shared, module_llm):
    first = shared.submit_ok("job tag=ORD1 sleep=0.5", "ordered")
    other = shared.submit_ok("job tag=PAR sleep=1", "parallel")
    second = shared.submit_ok("job tag=ORD2 sleep=0.5", "ordered")
    third = shared.submit_ok("job tag=ORD3 sleep=0.5", "ordered")

    runs = [shared.wait_status(run_id) for run_id in (first, second, third, other)]

    assert [r["status"] for r in runs] == ["succeeded"] * 4, runs
    assert [r["answer"] for r in runs] == ["tag ORD1", "tag ORD2", "tag ORD3", "tag PAR"]
    one, two, three, par = runs
    # ISO timestamps with milliseconds, all UTC: string order is time order.
    assert two["started_at"] >= one["finished_at"], (one, two)
    assert three["started_at"] >= two["finished_at"], (two, three)
    assert par["started_at"] < one["finished_at"], "another conversation must not wait for this one"
    plans = [r.task for r in module_llm.requests_of("plan") if "ORD" in r.task or "PAR" in r.task]
    assert [t for t in plans if "ORD" in t] == ["job tag=ORD1 sleep=0.5", "job tag=ORD2 sleep=0.5",
                                                  "job tag=ORD3 sleep=0.5"]
    assert plans.index("job tag=PAR sleep=1") < plans.index("job tag=ORD2 sleep=0.5")


# ------------------------------------------------------------------------------------------ 3. global cap


def test_global_concurrency_cap(start_server):
    server = start_server(AUTOCODE_MAX_CONCURRENT_RUNS="2")
    assert server.http.get("/healthz").json()["runs"] == {"running": 0, "max": 2}
    ids = [server.submit_ok(f"job tag=CAP{i} llmdelay=1", f"cap-{i}") for i in range(5)]

    seen_health, seen_status = 0, 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        seen_health = max(seen_health, server.http.get("/healthz").json()["runs"]["running"])
        # One query is one snapshot (polling the runs one by one over HTTP would mix moments).
        statuses = [row["status"] for row in db_rows(Path(server.env["AUTOCODE_DB"]), "SELECT status FROM runs")]
        seen_status = max(seen_status, statuses.count("running"))
        if all(s in ("succeeded", "failed", "cancelled", "interrupted") for s in statuses):
            break
        time.sleep(0.03)

    runs = [server.run(run_id) for run_id in ids]
    assert [r["status"] for r in runs] == ["succeeded"] * 5, (runs, server.log_tail())
    assert [r["answer"] for r in runs] == [f"tag CAP{i}" for i in range(5)]
    assert seen_health <= 2 and seen_status <= 2, (seen_health, seen_status)
    # The recorded intervals: never more than two overlap, and two did (the cap is used, not just respected).
    events = sorted([(r["started_at"], 1) for r in runs] + [(r["finished_at"], -1) for r in runs])
    overlap, most = 0, 0
    for _, change in events:  # at equal times an end (-1) sorts before a start (+1)
        overlap += change
        most = max(most, overlap)
    assert most == 2, runs


# ------------------------------------------------------------------------------------------ 4. cancellation


def test_cancel_kills_the_step_tree_api_and_cli(shared):
    marker = spawn_marker("60")
    running = shared.submit_ok("job tag=X1 spawn=60", "cancel-me")
    queued = shared.submit_ok("job tag=X2", "cancel-me")
    wait_step_started(marker)
    assert shared.run(running)["status"] == "running" and shared.run(queued)["status"] == "queued"

    # A queued run is cancelled without ever starting.
    answer = shared.http.post(f"/api/runs/{queued}/cancel")
    assert answer.status_code == 200 and answer.json() == {"run_id": queued, "status": "cancelled"}
    assert shared.run(queued)["started_at"] is None

    started = time.monotonic()
    answer = shared.http.post(f"/api/runs/{running}/cancel")
    assert answer.status_code == 200 and answer.json() == {"run_id": running, "status": "cancelled"}
    wait_gone(max(0.0, 1.0 - (time.monotonic() - started)), "sandbox processes", sandbox_processes)
    assert not processes_with(f"sleep {marker}")
    run = shared.run(running)
    assert run["status"] == "cancelled" and run["error"] == "The run was cancelled."
    assert shared.run(queued)["status"] == "cancelled"

    # The same through `autocode cancel`, which finds the server through AUTOCODE_SERVER_URL.
    env = {**shared.env, "AUTOCODE_SERVER_URL": shared.url}
    marker = spawn_marker("61")
    running = shared.submit_ok("job tag=Y spawn=61", "cancel-cli")
    wait_step_started(marker)
    started = time.monotonic()
    proc = cli("cancel", running, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"run {running}: cancelled"
    wait_gone(max(0.2, 1.0 - (time.monotonic() - started)), "sandbox processes", sandbox_processes)
    assert not processes_with(f"sleep {marker}")
    assert shared.run(running)["status"] == "cancelled"

    # Cancelling a finished run changes nothing; an unknown run is 404 (exit 1 for the CLI).
    done = shared.submit_ok("job tag=DONE", "cancel-done")
    assert shared.wait_status(done)["status"] == "succeeded"
    assert shared.http.post(f"/api/runs/{done}/cancel").json()["status"] == "succeeded"
    assert shared.run(done)["answer"] == "tag DONE"
    assert shared.http.post("/api/runs/nosuchrun/cancel").status_code == 404
    proc = cli("cancel", "nosuchrun", env=env)
    assert proc.returncode == 1 and "no run nosuchrun" in proc.stderr
    # A conversation whose run was cancelled takes new tasks.
    follow = shared.submit_ok("job tag=AFTER", "cancel-me")
    assert shared.wait_status(follow)["answer"] == "tag AFTER"


# ------------------------------------------------------------------------------------------ 5. duplicates


def test_duplicate_delivery_starts_one_run(shared, module_llm):
    payload = {"task": "job tag=DUP", "conversation": "dup", "adapter": "slack", "delivery_id": "evt-dup-1"}
    with ThreadPoolExecutor(3) as pool:  # at once, as a webhook retried by an impatient platform
        answers = list(pool.map(lambda _: httpx.post(f"{shared.url}/api/runs", json=payload, timeout=30), range(3)))
    codes = sorted(a.status_code for a in answers)
    assert codes == [200, 200, 202], [a.text for a in answers]
    run_ids = {a.json()["run_id"] for a in answers}
    assert len(run_ids) == 1
    assert sorted(a.json()["status"] for a in answers) == ["duplicate", "duplicate", "queued"]
    run_id = run_ids.pop()
    assert shared.wait_status(run_id)["status"] == "succeeded"

    again = shared.http.post("/api/runs", json=payload)  # after the run finished, still the same run
    assert again.status_code == 200 and again.json()["run_id"] == run_id and again.json()["status"] == "duplicate"
    assert len(module_llm.requests_of("plan", "tag=DUP")) == 1
    assert len(db_rows(shared.db, "SELECT id FROM runs WHERE delivery_id = ?", ("evt-dup-1",))) == 1
    other = shared.submit_ok("job tag=DUP2", "dup", delivery_id="evt-dup-2")
    assert other != run_id and shared.wait_status(other)["answer"] == "tag DUP2"


# ------------------------------------------------------------------------------------------ 6. budgets


def test_token_budgets_per_run_and_per_user(start_server, tmp_path):
    # Each LLM reply of a `tokens=N` task reports N prompt + N completion tokens.
    server = start_server(AUTOCODE_MAX_TOKENS_PER_RUN="50", AUTOCODE_DAILY_TOKENS_PER_USER="45")

    costly = server.submit_ok("job tag=BIG tokens=30", "budget-carol", user="carol")  # the plan alone: 60 > 50
    run = server.wait_status(costly)
    assert run["status"] == "failed", run
    assert "AUTOCODE_MAX_TOKENS_PER_RUN" in run["error"] and "60" in run["error"] and "50" in run["error"]
    assert run["usage"]["llm_calls"] == 1  # stopped before running the step and evaluating

    first = server.submit_ok("job tag=A1 tokens=12", "budget-alice", user="alice")  # 2 calls: 48 tokens
    assert server.wait_status(first)["status"] == "succeeded"

    refused = server.submit("job tag=A2 tokens=12", "budget-alice", user="alice")
    assert refused.status_code == 429, refused.text
    body = refused.json()
    assert body["run_id"] is None and body["status"] == "refused"
    assert "48" in body["message"] and "45" in body["message"] and "tomorrow" in body["message"]
    assert [r["task"] for r in db_rows(tmp_path / "autocode.db", "SELECT task FROM runs WHERE user = 'alice'")] == [
        "job tag=A1 tokens=12"]

    bob = server.submit_ok("job tag=B1 tokens=12", "budget-bob", user="bob")
    assert server.wait_status(bob)["status"] == "succeeded"

    expected = {"runs": 1, "llm_calls": 2, "prompt_tokens": 24, "completion_tokens": 24}
    tokens = lambda usage: {k: usage[k] for k in expected}  # noqa: E731 (the rest is its cost: fake-model has no price)
    assert tokens(server.http.get("/api/usage", params={"user": "alice"}).json()) == expected
    assert tokens(server.http.get("/api/usage", params={"conversation": "budget-carol"}).json()) == {
        "runs": 1, "llm_calls": 1, "prompt_tokens": 30, "completion_tokens": 30}
    proc = cli("usage", "--user", "alice", "--json", env=server.env)
    assert proc.returncode == 0, proc.stderr
    assert tokens(json.loads(proc.stdout)) == expected and json.loads(proc.stdout)["no_price_models"] == ["fake-model"]
    text = cli("usage", "--user", "alice", env=server.env).stdout
    assert "user alice" in text and "1 runs" in text and "24 prompt + 24 completion" in text


# ------------------------------------------------------------------------------------------ 7. kill -9


def test_sigkill_leaves_no_sandbox_behind_and_restart_recovers(start_server):
    server = start_server()
    marker = spawn_marker("30")
    killed = server.submit_ok("job tag=K spawn=30", "crash")
    queued = [server.submit_ok(f"job tag=Q{i}", "crash") for i in (1, 2)]
    wait_step_started(marker)
    assert [server.run(q)["status"] for q in queued] == ["queued", "queued"]
    tree = descendants(server.pid)
    assert any("bwrap" in p.cmdline or "worker.py" in p.cmdline for p in tree), tree

    os.kill(server.pid, signal.SIGKILL)
    server.proc.wait(timeout=5)

    wait_gone(2.0, "sandbox processes", sandbox_processes)
    wait_gone(0.5, "processes of the killed server's tree", lambda: still_alive(tree))
    assert not processes_with(f"sleep {marker}")

    restarted = start_server(server.env)
    run = restarted.run(killed)
    assert run["status"] == "interrupted", run
    assert "restarted" in run["error"] and "send it again" in run["error"]
    first, second = [restarted.wait_status(q) for q in queued]
    assert (first["status"], first["answer"]) == ("succeeded", "tag Q1"), first
    assert (second["status"], second["answer"]) == ("succeeded", "tag Q2"), second
    assert second["started_at"] >= first["finished_at"]


# ------------------------------------------------------------------------------------------ 8. SIGTERM


def test_sigterm_lets_the_running_run_finish(start_server, tmp_path):
    server = start_server()
    marker = spawn_marker("1")
    run_id = server.submit_ok("job tag=G spawn=1", "graceful")
    wait_step_started(marker)

    signalled_at = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
    server.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: "Shutting down" in server.log_tail(), 5, what="uvicorn to start shutting down")
    try:  # a new connection: the server must not take new work any more
        late = httpx.post(f"{server.url}/api/runs", json={"task": "job tag=LATE", "conversation": "late"}, timeout=5)
    except httpx.HTTPError:
        late = None  # the listening socket is closed: refused as well
    assert late is None or late.status_code == 503, late.text

    returncode = server.proc.wait(timeout=20)
    # uvicorn shuts down cleanly, then re-raises the SIGTERM it caught (so the exit status says "terminated").
    assert returncode in (0, -signal.SIGTERM), (returncode, server.log_tail())
    assert "Application shutdown complete" in server.log_tail()
    rows = db_rows(tmp_path / "autocode.db", "SELECT id, status, answer, finished_at FROM runs")
    assert [(r["id"], r["status"], r["answer"]) for r in rows] == [(run_id, "succeeded", "tag G")], rows
    assert rows[0]["finished_at"] > signalled_at  # it was still running when the signal came, and finished
    assert not sandbox_processes() and not processes_with(f"sleep {marker}")


# ------------------------------------------------------------------------------------------ 9. auth


def test_api_token_is_required_when_set(start_server, tmp_path):
    server = start_server(AUTOCODE_API_TOKEN="s3cret-token")
    good = {"Authorization": "Bearer s3cret-token"}

    assert server.http.get("/healthz").status_code == 200  # health checks need no token
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic czNjcmV0LXRva2Vu"}):
        answer = server.http.post("/api/runs", json={"task": "job tag=NOAUTH"}, headers=headers)
        assert answer.status_code == 401 and answer.json() == {"error": "unauthorized"}
    assert not db_rows(tmp_path / "autocode.db", "SELECT id FROM runs")

    answer = server.http.post("/api/runs", json={"task": "job tag=AUTH"}, headers=good)
    assert answer.status_code == 202
    run_id = answer.json()["run_id"]
    assert server.http.get(f"/api/runs/{run_id}").status_code == 401
    assert server.http.get("/api/usage").status_code == 401
    assert server.http.post(f"/api/runs/{run_id}/cancel").status_code == 401
    wait_for(lambda: server.http.get(f"/api/runs/{run_id}", headers=good).json()["status"] == "succeeded", 20,
             what="the authorized run to succeed")
    assert [r["task"] for r in db_rows(tmp_path / "autocode.db", "SELECT task FROM runs")] == ["job tag=AUTH"]

    # `autocode cancel` sends the token from the environment.
    env = {**server.env, "AUTOCODE_SERVER_URL": server.url}
    proc = cli("cancel", "nosuchrun", env=env)
    assert proc.returncode == 1 and "no run nosuchrun" in proc.stderr  # got past the token check
    proc = cli("cancel", "nosuchrun", env={k: v for k, v in env.items() if k != "AUTOCODE_API_TOKEN"})
    assert proc.returncode == 1 and "401" in proc.stderr


def test_without_token_only_loopback_clients_are_served(shared):
    # A local reverse proxy relaying a remote client (uvicorn trusts X-Forwarded-For from 127.0.0.1).
    relayed = shared.http.post("/api/runs", json={"task": "job tag=RELAYED"},
                               headers={"X-Forwarded-For": "203.0.113.7"})
    assert relayed.status_code == 401
    assert shared.http.get("/api/usage", headers={"X-Forwarded-For": "203.0.113.7"}).status_code == 401
    assert not db_rows(shared.db, "SELECT id FROM runs WHERE task LIKE '%RELAYED%'")


# ------------------------------------------------------------------------------------------ 10. bad input


def test_bad_input(shared):
    def post(content: bytes) -> httpx.Response:
        return shared.http.post("/api/runs", content=content, headers={"Content-Type": "application/json"})

    before = db_rows(shared.db, "SELECT COUNT(*) AS n FROM runs")[0]["n"]
    for content in (b"{not json", b"", b"[]", b'"a task"', b'{"conversation": "x"}', b'{"task": "   "}',
                    b'{"task": ""}'):
        answer = post(content)
        assert answer.status_code == 400, (content, answer.status_code, answer.text)
        assert "task" in answer.text.lower()
    assert db_rows(shared.db, "SELECT COUNT(*) AS n FROM runs")[0]["n"] == before

    missing = shared.http.get("/api/runs/does-not-exist")
    assert missing.status_code == 404 and missing.json() == {"error": "no such run"}
    assert shared.http.post("/api/runs/does-not-exist/cancel").status_code == 404
    assert shared.http.get("/api/nothing-here").status_code == 404
    assert shared.http.get("/api/runs").status_code == 405


def test_non_string_task_is_rejected(shared):
    before = db_rows(shared.db, "SELECT COUNT(*) AS n FROM runs")[0]["n"]
    for payload in ({"task": None, "conversation": "typed"}, {"task": ["job tag=T"], "conversation": "typed"},
                    {"task": {"text": "job tag=T"}, "conversation": "typed"}):
        answer = shared.http.post("/api/runs", json=payload)
        assert answer.status_code == 400, (payload, answer.status_code, answer.text)
    assert db_rows(shared.db, "SELECT COUNT(*) AS n FROM runs")[0]["n"] == before


# ------------------------------------------------------------------------------------------ scheduler race


async def test_cancel_right_after_dispatch_frees_the_slot(tmp_path, llm):
    from agent_core.app import build_agent
    from agent_core.config import Settings
    from agent_core.scheduler import RunScheduler

    settings = Settings(openai_api_key="sk-x", openai_base_url=llm.base_url, model="fake-model", llm_max_retries=0,
                        db_path=tmp_path / "race.db", sandbox_warm=0, sandbox_uid_base=next_uid_base(),
                        sandbox_max_workers=8, max_concurrent_runs=1)
    agent = build_agent(settings)
    scheduler = RunScheduler(agent)
    await scheduler.start()
    try:
        first = scheduler.submit("job tag=RACE", "race")
        await asyncio.sleep(0)  # the dispatcher wakes and creates the run's task; the task has not run yet
        assert scheduler.running == [first.run_id]
        assert await scheduler.cancel(first.run_id) == "cancelled"
        assert scheduler.running == []  # the slot is free again
        second = scheduler.submit("job tag=RACE2", "race")
        for _ in range(400):
            if (agent.storage.get_run(second.run_id) or {}).get("status") in ("succeeded", "failed"):
                break
            await asyncio.sleep(0.05)
        assert agent.storage.get_run(second.run_id)["status"] == "succeeded"
    finally:
        await scheduler.stop(grace=1)
        await agent.executor.stop()
        await agent.llm.close()
        agent.storage.close()

