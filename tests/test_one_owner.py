"""One server per database, sandbox uids per process (issue 21, items 5 and 12), with real processes.

A second `autocode serve` on a database refuses to start, naming the owner's pid, and leaves the owner's runs alone;
the lock goes with its holder however it ends (kill -9 included); sandbox uid ranges are claimed machine-wide, so two
processes given the same AUTOCODE_SANDBOX_UID_BASE run steps under disjoint uids, and the guardian of a killed
process ends its own steps only; `autocode run` works beside a serve; what a killed serve left of an upload is
removed by the next one.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from agent_core.sandbox.uids import claim_range, claims_directory, holder_of
from storage.owner import DatabaseBusy, DatabaseOwner, owner_pid
from tests.procs import host_processes
from tests.server_helpers import ROOT, ScriptedLLM, Serve, db_rows, serve_env, wait_for

pytestmark = pytest.mark.skipif(sys.platform != "linux" or os.geteuid() != 0,
                                reason="uid ranges and the sandbox need Linux as root")

# This file's uids: a base of its own per test process (claims make overlaps safe, but tests read their ranges).
UID_BASE = 93000 + 64 * (os.getpid() % 60)


@pytest.fixture
def llm():
    with ScriptedLLM() as fake:
        yield fake


def start_serve(llm: ScriptedLLM, db: Path, log: Path, **overrides: str) -> Serve:
    return Serve(serve_env(llm, db, **overrides), log, db.parent)


# ------------------------------------------------------------------------------------------------ the database's owner


def test_a_second_serve_refuses_to_start_and_leaves_the_first_ones_run_alone(tmp_path, llm):
    db = tmp_path / "autocode.db"
    first = start_serve(llm, db, tmp_path / "first.log", AUTOCODE_SANDBOX_UID_BASE=str(UID_BASE))
    second = None
    try:
        first.wait_ready()
        run_id = first.submit_ok("long job tag=first sleep=4")
        first.wait_status(run_id, "running")
        # Same database, its own port (and the same uid base): a rolling deploy, or a restart before the old exits.
        second = start_serve(llm, db, tmp_path / "second.log", AUTOCODE_SANDBOX_UID_BASE=str(UID_BASE))
        assert second.proc.wait(30) == 2, second.log_tail()
        said = second.log_tail()
        assert f"another autocode serve (pid {first.pid}) already owns the database {db}" in said, said
        assert "Traceback" not in said
        assert db_rows(db, "SELECT status FROM runs WHERE id = ?", (run_id,))[0]["status"] == "running"
        done = first.wait_status(run_id, timeout=30)
        assert (done["status"], done["answer"]) == ("succeeded", "tag first"), done
        assert first.proc.poll() is None and owner_pid(db) == first.pid
    finally:
        first.close()
        if second is not None:
            second.close()
    assert owner_pid(db) is None  # a serve stopped in order gives the database up


def test_the_lock_goes_with_a_killed_serve_and_the_next_one_recovers_its_runs(tmp_path, llm):
    db = tmp_path / "autocode.db"
    first = start_serve(llm, db, tmp_path / "first.log", AUTOCODE_SANDBOX_UID_BASE=str(UID_BASE + 16))
    try:
        first.wait_ready()
        run_id = first.submit_ok("long job tag=killed sleep=30")
        first.wait_status(run_id, "running")
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(10)
    finally:
        first.close()
    assert owner_pid(db) is None
    second = start_serve(llm, db, tmp_path / "second.log", AUTOCODE_SANDBOX_UID_BASE=str(UID_BASE + 16))
    try:
        second.wait_ready()
        assert owner_pid(db) == second.pid
        assert second.run(run_id)["status"] == "interrupted"  # the owner's restart recovery
    finally:
        second.close()


def test_the_owner_lock_in_one_process(tmp_path):
    """Two owners of one database are refused in one process too (flock is per open file), and the refusal reads
    the holder's pid from the lock file."""
    db = tmp_path / "autocode.db"
    owner = DatabaseOwner.acquire(db)
    try:
        with pytest.raises(DatabaseBusy, match=rf"\(pid {os.getpid()}\) already owns the database"):
            DatabaseOwner.acquire(db)
        assert owner_pid(db) == os.getpid()
    finally:
        owner.release()
    DatabaseOwner.acquire(db).release()


def test_autocode_run_works_beside_a_serve_and_recovers_nothing(tmp_path, llm):
    db = tmp_path / "autocode.db"
    server = start_serve(llm, db, tmp_path / "serve.log", AUTOCODE_SANDBOX_UID_BASE=str(UID_BASE + 32))
    try:
        server.wait_ready()
        run_id = server.submit_ok("long job tag=served sleep=10")
        server.wait_status(run_id, "running")
        env = serve_env(llm, db, AUTOCODE_SANDBOX_UID_BASE=str(UID_BASE + 32))
        done = subprocess.run([sys.executable, "-P", "-m", "agent_core.cli", "run", "cli job tag=cli",
                               "--conversation", "console"], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "tag cli"
        assert server.run(run_id)["status"] == "running"  # not interrupted by the CLI
        finished = server.wait_status(run_id, timeout=30)
        assert (finished["status"], finished["answer"]) == ("succeeded", "tag served")
    finally:
        server.close()


def test_a_serve_starting_beside_a_running_autocode_run_leaves_its_run_alone(tmp_path, llm):
    """Restart recovery interrupts the runs of dead processes only: a run `autocode run` is running (its process
    alive) goes on; once that process is killed, the next start interrupts it."""
    db = tmp_path / "autocode.db"
    env = serve_env(llm, db, AUTOCODE_SANDBOX_UID_BASE=str(UID_BASE + 32))

    def cli_run(task: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-P", "-m", "agent_core.cli", "run", task, "--conversation",
                                 "console"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)

    def status_of(task: str) -> str | None:
        try:
            rows = db_rows(db, "SELECT status FROM runs WHERE task = ?", (task,))
        except sqlite3.OperationalError:  # not made yet
            return None
        return rows[0]["status"] if rows else None

    alive = cli_run("cli job tag=alive sleep=8")
    killed = cli_run("cli job tag=killed sleep=60")
    server = None
    try:
        for task in ("cli job tag=alive sleep=8", "cli job tag=killed sleep=60"):
            wait_for(lambda: status_of(task) == "running", 30, what=f"{task} to be running")
        killed.send_signal(signal.SIGKILL)
        killed.wait(10)
        server = start_serve(llm, db, tmp_path / "serve.log", AUTOCODE_SANDBOX_UID_BASE=str(UID_BASE + 32))
        server.wait_ready()
        assert status_of("cli job tag=killed sleep=60") == "interrupted"
        assert status_of("cli job tag=alive sleep=8") == "running"
        out, err = alive.communicate(timeout=60)
        assert alive.returncode == 0 and out.strip() == "tag alive", err
        assert status_of("cli job tag=alive sleep=8") == "succeeded"
    finally:
        for proc in (alive, killed):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if server is not None:
            server.close()


# ------------------------------------------------------------------------------------------------ sandbox uid ranges

HOLDER = """
import sys, time
from agent_core.sandbox.uids import claim_range
claim = claim_range(int(sys.argv[1]), int(sys.argv[2]))
print(claim.first, flush=True)
time.sleep(120)
"""


def test_uid_ranges_are_claimed_exclusively_across_processes():
    base = UID_BASE + 48
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(base), "6"], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert int(holder.stdout.readline()) == base
        assert holder_of(base + 5) == holder.pid
        mine = claim_range(base, 4)  # overlapping its range from the same base: the next free uids instead
        try:
            assert mine.first == base + 6 and holder_of(base + 6) == os.getpid()
            other = claim_range(base + 3, 2)  # any base and size: never a uid another claim holds
            assert other.first == base + 10
            other.release()
        finally:
            mine.release()
        assert holder_of(base + 6) is None
    finally:
        holder.kill()
        holder.wait()
    again = claim_range(base, 6)  # the kernel dropped the killed holder's locks
    assert again.first == base
    again.release()
    assert oct(claims_directory().stat().st_mode & 0o777) == "0o700"


async def test_two_executors_with_one_base_run_steps_under_disjoint_uids():
    from agent_core.sandbox import Limits, StepRequest
    from agent_core.sandbox.pool import SandboxExecutor

    executors = [SandboxExecutor(backend="auto", warm=0, uid_base=UID_BASE, max_workers=4) for _ in range(2)]
    boxes = []
    try:
        uids = []
        for executor in executors:
            boxes.append(await executor.open("run"))
            result = await boxes[-1].run_step(StepRequest(code="import os\ndef f():\n    return {'uid': os.getuid()}\n",
                                                          function="f", input=None, limits=Limits(timeout_s=20)))
            assert result.ok, result.error
            uids.append(result.output["uid"])
        ranges = [set(range(e.uids.base, e.uids.base + e.uids.count)) for e in executors]
        assert not ranges[0] & ranges[1]
        assert uids[0] in ranges[0] and uids[1] in ranges[1]
    finally:
        for box in boxes:
            await box.close()
        for executor in executors:
            await executor.stop()
    assert holder_of(executors[0].uids.base) is None  # stop() gave the claims up


STEPPER = """
import asyncio, os, sys
from agent_core.sandbox import Limits, StepRequest
from agent_core.sandbox.pool import SandboxExecutor

STEP = '''
import os, subprocess, time
def work():
    subprocess.Popen(["sleep", MARKER])
    time.sleep(SECONDS)
    return {"uid": os.getuid()}
'''

async def main():
    uid_base, marker, seconds = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    executor = SandboxExecutor(backend="process", warm=0, uid_base=uid_base, max_workers=4)
    sandbox = await executor.open("run")
    step = asyncio.create_task(sandbox.run_step(StepRequest(
        code=STEP.replace("MARKER", repr(marker)).replace("SECONDS", seconds), function="work", input=None,
        limits=Limits(timeout_s=60))))
    await asyncio.sleep(1.0)
    print("running", executor.uids.base, flush=True)
    result = await step
    print("done", result.ok, (result.output or {}).get("uid"), result.error, flush=True)
    await sandbox.close()
    await executor.stop()

asyncio.run(main())
"""


def _processes_of(uids: range) -> list:
    return [p for p in host_processes() if p.uid in uids and p.alive]


def test_the_guardian_of_a_killed_process_ends_its_own_steps_only(tmp_path):
    """Process backend (the one with a guardian): two processes, one uid base. Killing the first ends its step and
    the step's child; the second's step, under other uids, runs to its end."""
    base = UID_BASE + 24
    token = f"{os.getpid() % 100000:05d}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs, bases = [], []
    try:
        for name, seconds in (("victim", "60"), ("bystander", "4")):
            marker = f"{'71' if name == 'victim' else '72'}.{token}"
            procs.append(subprocess.Popen([sys.executable, "-c", STEPPER, str(base), marker, seconds], cwd=tmp_path,
                                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
            line = procs[-1].stdout.readline().split()
            assert line[:1] == ["running"], procs[-1].stderr.read() if procs[-1].poll() is not None else line
            bases.append(int(line[1]))
        victim, bystander = procs
        victim_base, bystander_base = bases
        assert victim_base == base and bystander_base >= base + 4  # one base, disjoint ranges
        assert holder_of(victim_base) == victim.pid and holder_of(bystander_base) == bystander.pid
        assert _processes_of(range(bystander_base, bystander_base + 4))
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        wait_for(lambda: not _processes_of(range(victim_base, victim_base + 4)), 10,
                 what="the killed process's steps to be ended by its guardian")
        out, err = bystander.communicate(timeout=30)
        assert out.split()[:3] == ["done", "True", str(bystander_base)], (out, err)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


# ------------------------------------------------------------------------------------------------ uploads cut off


RECEIVER = """
import asyncio, sys
from pathlib import Path
from agent_core.app import build_agent
from agent_core.config import Settings
from agent_core.scheduler import RunScheduler
from agent_core import uploads

async def slowly():
    yield b"x" * (1 << 20)
    print("receiving", flush=True)
    await asyncio.sleep(120)
    yield b""

async def main():
    agent = build_agent(Settings.from_env())
    scheduler = RunScheduler(agent)
    await scheduler.start()
    submission = scheduler.submit("count the rows", "upload-chat", hold=True)
    print(submission.run_id, flush=True)
    async with uploads.receiving(scheduler, submission.run_id) as receiver:
        await receiver.add("big.csv", slowly())

asyncio.run(main())
"""


def test_what_a_killed_serve_left_of_an_upload_is_removed_by_the_next(tmp_path, llm):
    db = tmp_path / "autocode.db"
    env = serve_env(llm, db, AUTOCODE_SANDBOX_UID_BASE=str(UID_BASE + 40))
    receiver = subprocess.Popen([sys.executable, "-c", RECEIVER], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    try:
        run_id = receiver.stdout.readline().strip()
        assert receiver.stdout.readline().strip() == "receiving", receiver.stderr.read()
        receiver.send_signal(signal.SIGKILL)
        receiver.wait(10)
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait()
    left = list((tmp_path / "autocode.db.uploads").iterdir())
    assert len(left) == 1 and left[0].name.startswith(f"receiving-{run_id}-")
    assert sum(f.stat().st_size for f in left[0].iterdir()) == 1 << 20
    server = start_serve(llm, db, tmp_path / "serve.log", AUTOCODE_SANDBOX_UID_BASE=str(UID_BASE + 40))
    try:
        server.wait_ready()
        assert list((tmp_path / "autocode.db.uploads").iterdir()) == []
        assert server.run(run_id)["status"] == "interrupted"
        assert "removed 1 upload directories" in server.log_tail()
    finally:
        server.close()
