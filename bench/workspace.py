"""Files in a conversation (issue 13): a 50 MB CSV from a Slack event to the first step, and restoring a workspace.

1. Upload: `autocode serve` (a subprocess, HTTP mode) gets a signed `app_mention` whose `files` holds a 50 MiB CSV
   shared on the fake Slack (tests/fakes/slack_server.py, in a process of its own with the scripted LLM of
   tests/server_helpers.ScriptedLLM, so serving them never slows this one). Measured: the ack, and the time from
   sending the POST to the run's first step starting (its StepStarted event as stored), split into phases read
   from serve's SQLite file (the run stored, the file stored in the workspace, RunStarted, the planner call,
   PlanReady, StepStarted);
   serve's peak RSS (VmHWM of /proc/PID/status) after a warm-up run with a small file, at the first step and after
   the run: it must not grow by the file's size (the file is streamed to disk, never whole in memory).
   Target: peak RSS growth < 20 MB (the file is 50 MB).
2. Restore: a conversation's workspace of 10 files, 50 MiB in all (5 MiB CSVs, stored through
   Workspace.add_uploads), placed into a fresh run sandbox of a warm pool — what every follow-up pays before it
   plans: `Workspace.inputs_for` (the rows and blob paths) plus `sandbox.put_inputs` (a tar written from the blobs
   in a thread, unpacked by the worker into the read-only inputs/). Median of `--restores` runs, each into its own
   sandbox (inputs/ is placed once per run); the tar written alone is timed too, to show what dominates.
   Target: median <= 200 ms.

Sandbox uids from 96000 (+128 per bench process slot), above every range the tests use.

Run: python bench/workspace.py [--mb 50] [--restores 9] [--backend auto|bwrap|process] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from slack_sdk.signature import SignatureVerifier  # noqa: E402

from tests.fakes.slack_server import BOT_USER_ID, TEAM_ID  # noqa: E402
from tests.server_helpers import Serve, db_rows, serve_env, wait_for  # noqa: E402

SECRET = "bench-signing-secret"
TOKEN = "xoxb-bench-files"
UID_BASE = 96000 + 128 * (os.getpid() % 25)
TARGET_RSS_GROWTH_MB = 20.0
TARGET_RESTORE_MS = 200.0
RESTORE_FILES = 10

FAKES = """
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from tests.fakes.slack_server import FakeSlack
from tests.server_helpers import ScriptedLLM
with FakeSlack() as slack, ScriptedLLM() as llm:
    print(slack.api_url, llm.base_url, flush=True)
    for line in sys.stdin:  # "NAME PATH": share the file, answer its file object
        name, path = line.split()
        print(json.dumps(slack.add_file(name, Path(path), token=sys.argv[2], mimetype="text/csv")), flush=True)
"""


class Fakes:
    """The fake Slack Web API (with its file server) and the scripted LLM in their own process."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", FAKES, str(ROOT), TOKEN], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.slack_api_url, self.llm_url = self.proc.stdout.readline().split()

    @property
    def base_url(self) -> str:  # what serve_env() reads from an LLM fake
        return self.llm_url

    def share(self, name: str, path: Path) -> dict[str, Any]:
        self.proc.stdin.write(f"{name} {path}\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=10)


def write_csv(path: Path, size: int) -> Path:
    """A CSV of exactly `size` bytes, written in chunks."""
    header = b"region,month,amount,note\n"
    row = b"north,2024-06,1234,an ordinary row of the export\n"
    with open(path, "wb") as out:
        out.write(header)
        left = size - len(header)
        block = row * 4096
        while left > 0:
            piece = block[:left]
            out.write(piece)
            left -= len(piece)
    return path


def proc_status(pid: int, field: str) -> int:
    """A /proc/PID/status field in kB (VmHWM: peak RSS, VmRSS: RSS now)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for {pid}")


def epoch(iso: str | None) -> float | None:
    return datetime.fromisoformat(iso).timestamp() if iso else None


def post_mention(serve: Serve, channel: str, text: str, files: list[dict[str, Any]]) -> tuple[float, float, int]:
    """POST a signed app_mention with files; returns (time sent, ack seconds, status)."""
    ts = f"{int(time.time())}.{time.time_ns() % 1000000:06d}"
    event = {"type": "app_mention", "user": "UBENCH", "text": f"<@{BOT_USER_ID}> {text}", "ts": ts,
             "channel": channel, "event_ts": ts, "files": files}
    body = json.dumps({"token": "legacy", "team_id": TEAM_ID, "api_app_id": "ABENCH", "type": "event_callback",
                       "event_id": f"Ev{time.time_ns()}", "event_time": int(time.time()), "event": event,
                       "authorizations": [{"team_id": TEAM_ID, "user_id": BOT_USER_ID, "is_bot": True}]}).encode()
    stamp = str(int(time.time()))
    headers = {"Content-Type": "application/json", "X-Slack-Request-Timestamp": stamp,
               "X-Slack-Signature": SignatureVerifier(SECRET).generate_signature(timestamp=stamp, body=body)}
    sent = time.time()
    response = httpx.post(f"{serve.url}/slack/events", content=body, headers=headers, timeout=30)
    return sent, time.time() - sent, response.status_code


def run_in(db: Path, channel: str) -> dict[str, Any] | None:
    rows = db_rows(db, "SELECT * FROM runs WHERE conversation LIKE ? ORDER BY seq", (f"slack:%:{channel}:%",))
    return rows[-1] if rows else None


def first_step(db: Path, run_id: str) -> dict[str, Any] | None:
    """The run's first StepStarted event (stored as it is emitted), if any yet."""
    rows = db_rows(db, "SELECT created_at FROM events WHERE run_id = ? AND type = 'step_started' ORDER BY id LIMIT 1",
                   (run_id,))
    return rows[0] if rows else None


class RssSampler(threading.Thread):
    """VmRSS of a process every 20 ms, the maximum kept."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak_kb, self.stop = pid, 0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.peak_kb = max(self.peak_kb, proc_status(self.pid, "VmRSS"))
            except (OSError, RuntimeError):
                return
            self.stop.wait(0.02)


def bench_upload(mb: int, directory: Path) -> dict[str, Any]:
    size = mb * 1024 * 1024
    big = write_csv(directory / "export.csv", size)
    small = write_csv(directory / "small.csv", 4096)
    fakes = Fakes()
    try:
        env = serve_env(fakes, directory / "autocode.db", SLACK_BOT_TOKEN=TOKEN, SLACK_SIGNING_SECRET=SECRET,
                        SLACK_API_URL=fakes.slack_api_url, AUTOCODE_SANDBOX_UID_BASE=str(UID_BASE),
                        AUTOCODE_SANDBOX_MAX_WORKERS="16", AUTOCODE_INPUT_MAX_MB=str(mb),
                        AUTOCODE_STEP_TIMEOUT="120")
        serve = Serve(env, directory / "serve.log", directory)
        db = directory / "autocode.db"
        try:
            serve.wait_ready()
            # Warm-up: the same path with a small file (imports, the sandbox's first preview, the pool refilled).
            post_mention(serve, "CWARM", "job tag=WARM", [fakes.share("small.csv", small)])
            wait_for(lambda: (run_in(db, "CWARM") or {}).get("status") in ("succeeded", "failed"), 120,
                     what="the warm-up run")
            time.sleep(2.0)  # the warm pool refills
            hwm_before = proc_status(serve.pid, "VmHWM")
            rss_before = proc_status(serve.pid, "VmRSS")
            entry = fakes.share("export.csv", big)
            sampler = RssSampler(serve.pid)
            sampler.start()
            sent, ack_s, status = post_mention(serve, "CBIG", "job tag=BIG", [entry])
            run = wait_for(lambda: run_in(db, "CBIG"), 30, interval=0.02, what="the run")
            step = wait_for(lambda: first_step(db, run["id"]) or (
                (run_in(db, "CBIG") or {}).get("status") in ("failed", "cancelled")), 300, interval=0.02,
                what="the first step")
            hwm_at_step = proc_status(serve.pid, "VmHWM")
            if step is True:
                raise RuntimeError(f"the run failed: {run_in(db, 'CBIG')}\n{serve.log_tail()}")
            done = wait_for(lambda: (run_in(db, "CBIG") or {}).get("status") in ("succeeded", "failed"), 300,
                            what="the run's end")
            sampler.stop.set()
            sampler.join()
            hwm_after = proc_status(serve.pid, "VmHWM")
            run = run_in(db, "CBIG")
            events = {row["type"]: epoch(row["created_at"]) for row in reversed(db_rows(
                db, "SELECT type, created_at FROM events WHERE run_id = ? ORDER BY id", (run["id"],)))}
            stored = db_rows(db, "SELECT created_at FROM workspace_files WHERE run_id = ? AND kind = 'upload'",
                             (run["id"],))
            asked = db_rows(db, "SELECT started_at FROM llm_calls WHERE run_id = ? AND purpose = 'plan' ORDER BY id",
                            (run["id"],))
        finally:
            serve.close()
    finally:
        fakes.close()
    assert done and status == 200
    first = epoch(step["created_at"])
    marks = [("run stored (before the ack)", epoch(run["created_at"])),
             ("file downloaded and stored", epoch(stored[0]["created_at"]) if stored else None),
             ("run started", events.get("run_started")),
             ("inputs placed and previewed: planner asked", epoch(asked[0]["started_at"]) if asked else None),
             ("planned", events.get("plan_ready")),
             ("first step started", first)]
    phases, last = [], sent
    for label, at in marks:
        if at is not None:
            phases.append({"phase": label, "at_ms": round(1000 * (at - sent)), "took_ms": round(1000 * (at - last))})
            last = at
    return {"file_mb": mb, "ack_ms": round(1000 * ack_s), "to_first_step_s": round(first - sent, 3),
            "phases": phases, "run_status": run["status"],
            "serve_rss_mb": {"before": round(rss_before / 1024, 1), "peak_before": round(hwm_before / 1024, 1),
                             "peak_at_first_step": round(hwm_at_step / 1024, 1),
                             "peak_after_run": round(hwm_after / 1024, 1),
                             "sampled_peak_during": round(sampler.peak_kb / 1024, 1)},
            "rss_growth_mb": round((hwm_after - hwm_before) / 1024, 1)}


async def bench_restore(mb: int, runs: int, backend: str, directory: Path) -> dict[str, Any]:
    from agent_core.config import Settings
    from agent_core.inputs import write_inputs_tar
    from agent_core.sandbox.pool import SandboxExecutor
    from agent_core.workspace import Workspace
    from storage.db import Storage

    settings = Settings(db_path=directory / "restore.db", workspace_mb=4 * mb, input_max_mb=mb)
    storage = Storage(settings.db_path)
    workspace = Workspace(storage, settings)
    conversation = "bench:restore"
    each = mb * 1024 * 1024 // RESTORE_FILES
    uploads = [(f"part-{i}.csv", write_csv(directory / f"part-{i}.csv", each - i)) for i in range(RESTORE_FILES)]
    run_id = storage.create_run(conversation, "upload", status="succeeded")
    workspace.add_uploads(conversation, run_id, workspace.admit(conversation, uploads))
    for _, path in uploads:
        path.unlink()
    executor = SandboxExecutor(backend=backend, uid_base=UID_BASE + 64, max_workers=16, warm=1,
                               workdir_mb=settings.workdir_mb)
    await executor.start()
    totals, listing, tars = [], [], []
    try:
        for i in range(runs + 1):  # the first is a warm-up (page cache, the worker's first unpack)
            sandbox = await executor.open(f"bench-restore-{i}")
            try:
                start = time.perf_counter()
                files = workspace.inputs_for(conversation)
                listed = time.perf_counter()
                await sandbox.put_inputs(files)
                end = time.perf_counter()
            finally:
                await sandbox.close()
            with tempfile.TemporaryFile() as archive:
                tar_start = time.perf_counter()
                write_inputs_tar(files, archive)
                archive.flush()
                tar_end = time.perf_counter()
            if i:
                totals.append(1000 * (end - start))
                listing.append(1000 * (listed - start))
                tars.append(1000 * (tar_end - tar_start))
            await asyncio.sleep(0.5)  # the pool's next warm worker
        backend_name = executor.name
    finally:
        await executor.stop()
        storage.close()
    total = sum(f.size for f in files)
    median = statistics.median(totals)
    return {"files": len(files), "total_mb": round(total / 1048576, 1), "backend": backend_name, "runs": runs,
            "median_ms": round(median, 1), "min_ms": round(min(totals), 1), "max_ms": round(max(totals), 1),
            "inputs_for_median_ms": round(statistics.median(listing), 2),
            "tar_written_alone_median_ms": round(statistics.median(tars), 1),
            "worker_unpack_and_transfer_ms": round(median - statistics.median(listing)
                                                   - statistics.median(tars), 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=50)
    parser.add_argument("--restores", type=int, default=9)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--skip-upload", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    directory = Path(tempfile.mkdtemp(prefix="workspace-bench-"))
    report: dict[str, Any] = {"machine": f"{os.cpu_count()} cores, {platform.system()} {platform.release()}, "
                                         f"CPython {platform.python_version()}"}
    if not args.skip_upload:
        report["upload"] = bench_upload(args.mb, directory)
    report["restore"] = asyncio.run(bench_restore(args.mb, args.restores, args.backend, directory))
    checks = [("restore median", f"<= {TARGET_RESTORE_MS:.0f} ms", f"{report['restore']['median_ms']:.0f} ms",
               report["restore"]["median_ms"] <= TARGET_RESTORE_MS)]
    if "upload" in report:
        growth = report["upload"]["rss_growth_mb"]
        checks.insert(0, ("serve peak RSS growth", f"< {TARGET_RSS_GROWTH_MB:.0f} MB", f"{growth:.1f} MB",
                          growth < TARGET_RSS_GROWTH_MB))
    report["checks"] = [{"target": t, "limit": limit, "measured": m, "ok": ok} for t, limit, m, ok in checks]
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"== Files in a conversation — {report['machine']}")
    if "upload" in report:
        up = report["upload"]
        print(f"-- a {up['file_mb']} MB CSV on a Slack mention: ack {up['ack_ms']} ms, first step after "
              f"{up['to_first_step_s']:.2f} s (run {up['run_status']})")
        for phase in up["phases"]:
            print(f"   {phase['phase']:<46}{phase['at_ms']:>8} ms  (+{phase['took_ms']} ms)")
        rss = up["serve_rss_mb"]
        print(f"   serve RSS {rss['before']} MB; peak {rss['peak_before']} MB before, {rss['peak_at_first_step']} MB "
              f"at the first step, {rss['peak_after_run']} MB after the run (sampled during: "
              f"{rss['sampled_peak_during']} MB)")
    r = report["restore"]
    print(f"-- restoring {r['files']} files, {r['total_mb']} MB, into a run's sandbox ({r['backend']}, median of "
          f"{r['runs']}): {r['median_ms']} ms (min {r['min_ms']}, max {r['max_ms']})")
    print(f"   inputs_for {r['inputs_for_median_ms']} ms · tar written alone {r['tar_written_alone_median_ms']} ms · "
          f"transfer and worker unpack ~{r['worker_unpack_and_transfer_ms']} ms")
    print(f"{'target':<26}{'limit':<12}{'measured':<12}")
    for target, limit, measured, ok in checks:
        print(f"{target:<26}{limit:<12}{measured:<12}{'PASS' if ok else 'MISS'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
