"""Routines (issue 23, agent_core/routines.py): schedules computed by cronsim in their time zone, and routines run by
a real `autocode serve` (its clock, scheduler and sandboxes) against a scripted LLM: a routine made from a run re-runs
its pinned code with no planner call and one evaluator call, a failing pinned step is repaired and the repaired plan
pinned, three failed runs pause it, a firing missed while serve was down runs once within the grace and is skipped
(and said) beyond it, an overlapping firing is skipped, and pause/resume/rm/run work from the CLI."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from agent_core.routines import RoutineError, parse_schedule
from tests.server_helpers import (
    ROOT, ScriptedLLM, Serve, db_rows, free_port, serve_env, step_code, task_options, wait_for,
)

ROME = ZoneInfo("Europe/Rome")


# ------------------------------------------------------------------------------------------ schedules (computed)


@pytest.mark.parametrize("start, offsets", [
    # 2026-03-29 02:00 CET -> 03:00 CEST; 2026-10-25 03:00 CEST -> 02:00 CET
    (datetime(2026, 3, 27, 12, tzinfo=timezone.utc), [1, 2, 2, 2]),
    (datetime(2026, 10, 23, 12, tzinfo=timezone.utc), [2, 1, 1, 1]),
])
def test_nine_in_rome_stays_nine_across_dst(start, offsets):
    schedule = parse_schedule("0 9 * * *", "Europe/Rome", 300)
    firings = schedule.upcoming(start, 4)
    local = [f.astimezone(ROME) for f in firings]
    assert [(t.hour, t.minute) for t in local] == [(9, 0)] * 4
    assert [t.utcoffset() / timedelta(hours=1) for t in local] == offsets
    assert [f.hour for f in firings] == [9 - o for o in offsets]  # 08:00 UTC in winter, 07:00 in summer
    assert [(b - a) / timedelta(hours=1) for a, b in zip(firings, firings[1:])].count(24) == 2  # one 23 or 25 h day


@pytest.mark.parametrize("cron, tz, said", [
    ("0 25 * * *", "UTC", "'0 25 * * *' is not a cron expression (Bad hour)"),
    ("every day", "UTC", "is not a cron expression"),
    ("0 9 * * *", "Mars/Olympus", "Unknown time zone 'Mars/Olympus'"),
    ("*/2 * * * *", "UTC", "fires as often as every 120 seconds; a routine may fire at most once every 300 seconds"),
    ("0 9 30 2 *", "UTC", "(Bad day-of-month)"),  # February never has a 30th
])
def test_bad_schedules_are_refused_with_a_sentence(cron, tz, said):
    with pytest.raises(RoutineError) as refused:
        parse_schedule(cron, tz, 300)
    assert said in str(refused.value)


def test_the_minimum_interval_is_the_settings():
    assert parse_schedule("*/2 * * * *", "UTC", 120).cron == "*/2 * * * *"
    parse_schedule("0,5 9 * * *", "UTC", 300)  # 5 minutes apart, once a day: allowed
    with pytest.raises(RoutineError):
        parse_schedule("0,4 9 * * *", "UTC", 300)  # 4 minutes apart once a day: refused


def test_settings_and_the_cap_per_channel(tmp_path):
    from agent_core.config import ConfigError, Settings
    from agent_core.routines import create_with_task
    from storage.db import Storage

    with pytest.raises(ConfigError, match="AUTOCODE_ROUTINE_TZ must be an IANA time zone"):
        Settings.from_env({"AUTOCODE_ROUTINE_TZ": "Rome"})
    settings = Settings.from_env({"AUTOCODE_ROUTINE_TZ": "Europe/Rome", "AUTOCODE_ROUTINES_PER_CHANNEL": "2",
                                  "AUTOCODE_ROUTINE_MIN_INTERVAL": "600", "AUTOCODE_ROUTINE_GRACE": "60"})
    assert (settings.routine_min_interval, settings.routine_grace) == (600, 60)
    storage = Storage(tmp_path / "cap.db")
    made = [create_with_task(storage, settings, f"slack:T1:C1:routine-{n}", f"task {n}", "0 9 * * *")
            for n in range(2)]
    assert [r["tz"] for r in made] == ["Europe/Rome"] * 2  # the default zone
    create_with_task(storage, settings, "slack:T1:C2:routine-x", "elsewhere", "0 9 * * *")  # another channel
    with pytest.raises(RoutineError, match="This channel has 2 routines already"):
        create_with_task(storage, settings, "slack:T1:C1:routine-3", "one more", "0 9 * * *")
    with pytest.raises(RoutineError, match="fires as often as every 300 seconds"):
        create_with_task(storage, settings, "console", "too often", "*/5 * * * *")
    storage.close()


# ------------------------------------------------------------------------------------------ a scripted LLM

FAILING_CODE = "def work():\n    raise KeyError('signups')  # the data changed shape\n"


class RoutineLLM(ScriptedLLM):
    """ScriptedLLM, and: a task with `fail=1` plans a step that raises and its evaluator gives up; any other failed
    step is repaired by the evaluator (retry from `work` with the task's working code)."""

    def _respond(self, body: dict[str, Any]) -> dict[str, Any]:
        spec = super()._respond(body)
        with self._lock:
            request = self.log[-1]
        options = task_options(request.task)
        prompt = "\n".join(str(m.get("content")) for m in body.get("messages", []) if m.get("role") != "system")
        if request.kind == "plan" and "fail=1" in request.task:
            spec["json"]["subtasks"][0]["code"] = FAILING_CODE
        elif request.kind == "evaluation" and "\nerror: " in prompt:
            if "fail=1" in request.task:
                spec["json"] = {"satisfactory": False, "thoughts": "the data is gone", "final_answer": "",
                                "retry_from": "", "new_subtasks": []}
            else:
                spec["json"] = {"satisfactory": False, "thoughts": "the column moved", "final_answer": "",
                                "retry_from": "work", "new_subtasks": [{
                                    "tool_name": "work", "input_from_tool": "", "description": "do the work again",
                                    "imports": ["subprocess", "time"], "thought": "", "code": step_code(options)}]}
        return spec

    def count(self, kind: str, task: str) -> int:
        return len(self.requests_of(kind, task))


@pytest.fixture(scope="module")
def llm():
    with RoutineLLM() as scripted:
        yield scripted


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-P", "-m", "agent_core.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def write_db(db: Path, sql: str, params: tuple = ()) -> None:
    """Change the server's SQLite file as another process would (WAL)."""
    conn = sqlite3.connect(db, timeout=30)
    try:
        with conn:
            conn.execute(sql, params)
    finally:
        conn.close()


def routine_row(db: Path, routine_id: str) -> dict[str, Any]:
    return db_rows(db, "SELECT * FROM routines WHERE id = ?", (routine_id,))[0]


def routine_runs(db: Path, routine_id: str) -> list[dict[str, Any]]:
    return db_rows(db, "SELECT f.*, r.status, r.plan_version AS run_plan_version FROM routine_runs f "
                       "LEFT JOIN runs r ON r.id = f.run_id WHERE f.routine_id = ? ORDER BY f.id", (routine_id,))


@pytest.fixture(scope="module")
def serve(llm, tmp_path_factory):
    directory = tmp_path_factory.mktemp("routines-serve")
    env = serve_env(llm, directory / "autocode.db", AUTOCODE_ROUTINE_MIN_INTERVAL="120",
                    AUTOCODE_DAILY_TOKENS_PER_USER="100000")
    server = Serve(env, directory / "serve.log", directory)
    try:
        server.wait_ready()
        server.db = directory / "autocode.db"
        server.env = env
        yield server
    finally:
        server.close()


def fire_now(server: Serve, routine_id: str) -> dict[str, Any]:
    response = server.http.post(f"/api/routines/{routine_id}/run")
    assert response.status_code == 202, (response.status_code, response.text)
    return server.wait_status(response.json()["run_id"], timeout=60)


# ------------------------------------------------------------------------------------------ with serve


def test_a_routine_from_a_run_reruns_its_code_and_a_repaired_plan_is_pinned(serve, llm):
    task = "job tag=R1"
    source = serve.wait_status(serve.submit_ok(task, "routine-a"), timeout=60)
    assert source["status"] == "succeeded" and source["answer"] == "tag R1"

    refused = serve.http.post("/api/routines", json={"from_run": source["id"], "cron": "0 9 * * 8"})
    assert refused.status_code == 400 and "is not a cron expression" in refused.json()["error"]
    refused = serve.http.post("/api/routines", json={"from_run": source["id"], "cron": "* * * * *"})
    assert refused.status_code == 400 and "at most once every 120 seconds" in refused.json()["error"]
    created = serve.http.post("/api/routines", json={"from_run": source["id"], "cron": "0 9 * * 1",
                                                      "tz": "Europe/Rome"})
    assert created.status_code == 201, created.text
    routine = created.json()
    assert routine["plan_version"] == 1 and routine["state"] == "active"
    assert routine["next_fire_local"].endswith(("09:00 CET", "09:00 CEST"))

    # A fired run re-runs the pinned code: no planner call, one evaluator call, the fresh answer.
    plans, evaluations = llm.count("plan", task), llm.count("evaluation", task)
    run = fire_now(serve, routine["id"])
    assert run["status"] == "succeeded" and run["answer"] == "tag R1"
    assert llm.count("plan", task) == plans
    assert llm.count("evaluation", task) == evaluations + 1
    row = db_rows(serve.db, "SELECT routine_id, plan_version FROM runs WHERE id = ?", (run["id"],))[0]
    assert row == {"routine_id": routine["id"], "plan_version": 1}
    token = db_rows(serve.db, "SELECT view_token FROM runs WHERE id = ?", (run["id"],))[0]["view_token"]
    page = serve.http.get(f"/runs/{token}").text  # the run page says which routine and plan version ran
    assert f"routine <code>{routine['id']}</code>, plan version <b>1</b>" in page

    # The data changed shape: the pinned step fails, the evaluator repairs it, and the repaired plan is version 2.
    write_db(serve.db, "UPDATE routine_plans SET plan_json = json_set(plan_json, '$.subtasks[0].code', ?) "
                       "WHERE routine_id = ? AND version = 1", (FAILING_CODE, routine["id"]))
    run = fire_now(serve, routine["id"])
    assert run["status"] == "succeeded", run
    assert run["answer"].startswith("tag R1") and "plan version 2 pinned (repaired from version 1)" in run["answer"]
    assert llm.count("plan", task) == plans
    assert llm.count("evaluation", task) == evaluations + 3  # the repair's verdict and the repaired run's
    versions = db_rows(serve.db, "SELECT version, plan_json, run_id FROM routine_plans WHERE routine_id = ? "
                                 "ORDER BY version", (routine["id"],))
    assert [v["version"] for v in versions] == [1, 2] and versions[1]["run_id"] == run["id"]
    assert "KeyError" not in json.loads(versions[1]["plan_json"])["subtasks"][0]["code"]
    assert routine_row(serve.db, routine["id"])["plan_version"] == 2

    # The next firing runs version 2, and pins nothing new.
    run = fire_now(serve, routine["id"])
    assert run["status"] == "succeeded" and run["answer"] == "tag R1"
    assert db_rows(serve.db, "SELECT plan_version FROM runs WHERE id = ?", (run["id"],))[0]["plan_version"] == 2
    assert llm.count("plan", task) == plans and llm.count("evaluation", task) == evaluations + 4

    # Overlap: a firing while the routine's run is queued or running is skipped, and its next post says so.
    first = serve.http.post(f"/api/routines/{routine['id']}/run")
    second = serve.http.post(f"/api/routines/{routine['id']}/run")
    assert first.status_code == 202 and second.status_code == 409, (first.text, second.text)
    assert f"previous run {first.json()['run_id']} was still" in second.json()["message"]
    run = serve.wait_status(first.json()["run_id"], timeout=60)  # the next post tells of the skipped firing
    assert run["answer"].startswith("tag R1") and "was skipped: the routine's previous run" in run["answer"]
    assert [f["outcome"] for f in routine_runs(serve.db, routine["id"])][-2:] == ["started", "overlap"]
    assert fire_now(serve, routine["id"])["answer"] == "tag R1"  # told once


def test_three_failed_runs_in_a_row_pause_the_routine(serve, llm):
    task = "job tag=F fail=1"
    created = serve.http.post("/api/routines", json={"conversation": "routine-f", "task": task, "cron": "0 6 * * *",
                                                      "owner": "api:tester"})
    assert created.status_code == 201, created.text
    routine_id = created.json()["id"]
    assert created.json()["plan_version"] == 0  # made with a task: its first run plans
    runs = [fire_now(serve, routine_id) for _ in range(3)]
    assert [r["status"] for r in runs] == ["failed"] * 3
    assert "is paused" not in runs[1]["error"]
    assert f"Routine {routine_id} is paused: its last 3 runs failed" in runs[2]["error"]
    row = routine_row(serve.db, routine_id)
    assert row["state"] == "paused" and row["failures"] == 3 and row["plan_version"] == 0
    listed = {r["id"]: r for r in serve.http.get("/api/routines").json()["routines"]}
    assert listed[routine_id]["state"] == "paused" and listed[routine_id]["next_fire_at"] is None


def test_a_routine_made_with_a_task_pins_its_first_successful_plan(serve, llm):
    task = "job tag=T1"
    result = cli("routines", "add", "--conversation", "routine-t", "--cron", "30 7 * * 1-5", "--tz",
                 "America/New_York", "--json", task, env=serve.env)
    assert result.returncode == 0, result.stderr
    routine = json.loads(result.stdout)
    assert routine["plan_version"] == 0 and routine["tz"] == "America/New_York"
    plans = llm.count("plan", task)
    run = fire_now(serve, routine["id"])
    assert run["status"] == "succeeded" and "pinned as version 1" in run["answer"]
    assert llm.count("plan", task) == plans + 1
    run = fire_now(serve, routine["id"])
    assert run["answer"] == "tag T1" and llm.count("plan", task) == plans + 1  # version 1 re-run


def test_pause_resume_rm_and_run_from_the_cli(serve, llm):
    source = serve.wait_status(serve.submit_ok("job tag=C1", "routine-c"), timeout=60)
    env = {**serve.env, "AUTOCODE_SERVER_URL": serve.url}
    added = cli("routines", "add", "--from-run", source["id"], "--cron", "0 9 * * *", "--json", env=env)
    assert added.returncode == 0, added.stderr
    routine_id = json.loads(added.stdout)["id"]

    bad = cli("routines", "add", "--from-run", source["id"], "--cron", "0 9 * *", env=env)
    assert bad.returncode == 1 and "is not a cron expression" in bad.stderr
    paused = cli("routines", "pause", routine_id, env=env)
    assert paused.returncode == 0 and "paused" in paused.stdout
    listed = json.loads(cli("routines", "list", "--json", env=env).stdout)["routines"]
    assert {r["id"]: r["state"] for r in listed}[routine_id] == "paused"
    write_db(serve.db, "UPDATE routines SET next_fire_at = ? WHERE id = ?",
             ((datetime.now(timezone.utc) - timedelta(seconds=5)).isoformat(), routine_id))
    resumed = cli("routines", "resume", routine_id, "--json", env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["state"] == "active"
    assert json.loads(resumed.stdout)["next_fire_at"] > datetime.now(timezone.utc).isoformat()  # no stale firing

    ran = cli("routines", "run", routine_id, "--json", env=env)  # through the serve that owns the database
    assert ran.returncode == 0, ran.stderr
    run = serve.wait_status(json.loads(ran.stdout)["run_id"], timeout=60)
    assert run["answer"] == "tag C1"
    shown = cli("routines", "show", routine_id, env=env)
    assert shown.returncode == 0 and f"run {run['id']} succeeded (plan v1)" in shown.stdout

    removed = cli("routines", "rm", routine_id, env=env)
    assert removed.returncode == 0 and "removed" in removed.stdout
    assert serve.http.get(f"/api/routines/{routine_id}").status_code == 404
    assert cli("routines", "run", routine_id, env=env).returncode == 1
    assert db_rows(serve.db, "SELECT routine_id FROM runs WHERE id = ?", (run["id"],))[0]["routine_id"] == routine_id


def test_the_clock_fires_a_due_routine_within_seconds(serve, llm):
    task = "job tag=K1"
    source = serve.wait_status(serve.submit_ok(task, "routine-k"), timeout=60)
    routine = serve.http.post("/api/routines", json={"from_run": source["id"], "cron": "0 3 * * *"}).json()
    plans = llm.count("plan", task)
    write_db(serve.db, "UPDATE routines SET next_fire_at = ? WHERE id = ?",
             (datetime.now(timezone.utc).isoformat(timespec="milliseconds"), routine["id"]))
    started = wait_for(lambda: [f for f in routine_runs(serve.db, routine["id"]) if f["run_id"]], 10,
                       what="the clock to fire the routine")
    run = serve.wait_status(started[0]["run_id"], timeout=60)
    assert run["answer"] == "tag K1" and llm.count("plan", task) == plans
    row = routine_row(serve.db, routine["id"])
    assert row["next_fire_at"] > datetime.now(timezone.utc).isoformat()  # moved to tomorrow's 03:00
    assert row["next_fire_at"].startswith(((datetime.now(timezone.utc) + timedelta(days=1)).date().isoformat(),
                                           datetime.now(timezone.utc).date().isoformat()))


def test_a_firing_over_the_owners_budget_is_skipped_and_said(serve, llm):
    task = "job tag=B1 tokens=30000"  # every reply of its runs reports 30,000 + 30,000 tokens
    source = serve.wait_status(serve.submit_ok(task, "routine-b", user="api:spender"), timeout=60)
    assert source["status"] == "succeeded"  # 120,000 tokens: the owner's day is spent
    routine = serve.http.post("/api/routines", json={"from_run": source["id"], "cron": "0 12 * * *"}).json()
    assert routine["owner"] == "api:spender"
    refused = serve.http.post(f"/api/routines/{routine['id']}/run")
    assert refused.status_code == 429 and refused.json()["outcome"] == "refused"
    assert "was skipped: You have used 120000 of your 100000 LLM tokens for today" in refused.json()["message"]
    assert db_rows(serve.db, "SELECT COUNT(*) AS n FROM runs WHERE routine_id = ?", (routine["id"],))[0]["n"] == 0
    assert "LLM tokens for today" in routine_row(serve.db, routine["id"])["note"]  # for the next post


def test_firings_missed_while_serve_was_down(llm, tmp_path):
    db = tmp_path / "autocode.db"
    env = serve_env(llm, db)
    first = Serve(env, tmp_path / "serve-1.log", tmp_path)
    try:
        first.wait_ready()
        source = first.wait_status(first.submit_ok("job tag=M1", "routine-m"), timeout=60)
        within, beyond = (first.http.post("/api/routines", json={"from_run": source["id"], "cron": "0 4 * * *"})
                          .json()["id"] for _ in range(2))
    finally:
        first.close()
    now = datetime.now(timezone.utc)
    write_db(db, "UPDATE routines SET next_fire_at = ? WHERE id = ?", ((now - timedelta(minutes=10)).isoformat(), within))
    write_db(db, "UPDATE routines SET next_fire_at = ? WHERE id = ?", ((now - timedelta(hours=2)).isoformat(), beyond))

    plans = llm.count("plan", "job tag=M1")
    second = Serve(env, tmp_path / "serve-2.log", tmp_path)
    try:
        second.wait_ready()
        fired = wait_for(lambda: [f for f in routine_runs(db, within) if f["run_id"]], 15, what="the missed firing")
        run = second.wait_status(fired[0]["run_id"], timeout=60)
        assert run["answer"] == "tag M1" and llm.count("plan", "job tag=M1") == plans
        skipped = wait_for(lambda: routine_runs(db, beyond), 15, what="the late firing to be skipped")
        assert [f["outcome"] for f in skipped] == ["missed"] and skipped[0]["run_id"] is None
        assert "more than 1 h late (AUTOCODE_ROUTINE_GRACE)" in skipped[0]["note"]
        assert len(routine_runs(db, within)) == 1  # once, not once per missed firing
        for routine_id in (within, beyond):
            assert routine_row(db, routine_id)["next_fire_at"] > now.isoformat()
        run = fire_now(second, beyond)  # the next post says what was skipped
        assert run["answer"].startswith("tag M1") and "was skipped: AutoCode was not running then" in run["answer"]
        assert routine_row(db, beyond)["note"] is None
    finally:
        second.close()

    # No serve answering: `routines run` runs it in this process, with the pinned code.
    cli_env = {**env, "AUTOCODE_SERVER_URL": f"http://127.0.0.1:{free_port()}"}
    ran = cli("routines", "run", within, env=cli_env)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == "tag M1" and llm.count("plan", "job tag=M1") == plans
