"""Celery chaos: 20 runs on 2 workers, one worker killed with kill -9 mid-step, then a 5 s Redis restart.

Real pieces throughout: `redis-server`, `autocode serve` with AUTOCODE_REDIS_URL, two `autocode worker` processes
(3 slots each), a scripted OpenAI-compatible LLM in this process (tests/server_helpers.ScriptedLLM). Every run's
one step calls an exact tool with a side effect (`send_email`, a line per call in a file), then sleeps `--sleep`
seconds. First a calm round (no faults) for the reference wall time, then the chaos round:

1. all runs submitted at once;
2. when `--kill-after` tool calls have happened, the worker holding a job is killed with SIGKILL;
3. `--redis-after` seconds later Redis is shut down (saving its data, as a Redis with persistence does; with
   `--lose-data` it saves nothing) and started again `--down` seconds later on the same port.

Reported: every run's end status, its step's (the scripted evaluator accepts any output, so the steps are what
show a failure), tool calls per run (must be 1: none twice, none missing), steps stored per run,
wall time against the calm round, time from the kill until the last run that was on the killed worker ended, and
from Redis's return until the next step finished.

Run: python bench/chaos.py [--runs 20] [--sleep 3] [--down 5] [--lose-data] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.server_helpers import (  # noqa: E402
    ScriptedLLM, Serve, db_rows, free_port, mail_tools, sent_mail, serve_env, wait_for,
)
from tests.test_scaleout import Worker  # noqa: E402

UID_BASE = 76000  # the bench's own sandbox uids (bench/concurrency.py 74000+, bench/sandbox.py 72000+)
FINISHED = {"succeeded", "failed", "cancelled", "interrupted"}


class RedisServer:
    def __init__(self, directory: Path):
        self.port = free_port()
        self.dir = directory
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.dir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url)
        wait_for(lambda: _ping(client), 15, what="redis-server")
        client.close()

    def restart(self, down_s: float, keep_data: bool) -> float:
        """Stop, wait `down_s`, start again; returns time.monotonic() when it answers again."""
        client = redis.Redis.from_url(self.url)
        try:
            client.shutdown(save=keep_data, nosave=not keep_data)
        except redis.exceptions.ConnectionError:
            pass
        self.proc.wait(10)
        time.sleep(down_s)
        self.start()
        return time.monotonic()

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def _ping(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.exceptions.RedisError:
        return False


def start_cluster(tmp: Path, llm: ScriptedLLM, redis_url: str, tools: Path) -> tuple[Serve, list[Worker]]:
    db = tmp / "autocode.db"
    base = serve_env(llm, db, AUTOCODE_REDIS_URL=redis_url, AUTOCODE_TOOLS=str(tools), AUTOCODE_JOB_MARGIN="20",
                     AUTOCODE_SANDBOX_UID_BASE=str(UID_BASE + 768), AUTOCODE_MAX_CONCURRENT_RUNS="32")
    workers = []
    for number in range(2):
        env = {**base, "AUTOCODE_SANDBOX_UID_BASE": str(UID_BASE + 256 * number), "AUTOCODE_SANDBOX_MAX_WORKERS": "64",
               "AUTOCODE_DB": str(tmp / "worker-must-not-use.db")}
        workers.append(Worker(env, f"w{number}@chaos", tmp / f"worker{number}.log", tmp, concurrency=3))
    server = Serve(base, tmp / "serve.log", tmp)
    server.db = db
    server.wait_ready(60)
    for worker in workers:
        worker.wait_ready(60)
    return server, workers


def holder(client: redis.Redis) -> str | None:
    for key in client.scan_iter("autocode:job:*:beat"):
        value = client.get(key)
        if value:
            return value.decode()
    return None


def one_round(runs: int, sleep: float, chaos: bool, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="autocode-chaos-") as directory, ScriptedLLM() as llm:
        tmp = Path(directory)
        redis_server = RedisServer(tmp)
        tools, sent = mail_tools(tmp)
        server, workers = start_cluster(tmp, llm, redis_server.url, tools)
        client = redis.Redis.from_url(redis_server.url)
        report: dict[str, Any] = {"chaos": chaos}
        try:
            started = time.monotonic()
            ids = [server.submit_ok(f"job tag=C{i} mail=c{i} sleep={sleep}", conversation=f"c{i}")
                   for i in range(runs)]
            if chaos:
                wait_for(lambda: len(sent_mail(sent)) >= args.kill_after, 120, what="tool calls")
                name = wait_for(lambda: holder(client), 30, what="a worker holding a job")
                victim = next(w for w in workers if w.name == name)
                killed_at = time.monotonic()
                os.kill(victim.proc.pid, signal.SIGKILL)
                victim.proc.wait()
                report["killed"] = name
                time.sleep(args.redis_after)
                client.close()
                down_at = time.monotonic()
                back_at = redis_server.restart(args.down, keep_data=not args.lose_data)
                report["redis_down_s"] = round(back_at - down_at, 1)
            finished: dict[str, float] = {}
            deadline = time.monotonic() + 600
            while len(finished) < len(ids) and time.monotonic() < deadline:
                for run_id in ids:
                    if run_id not in finished and server.run(run_id)["status"] in FINISHED:
                        finished[run_id] = time.monotonic()
                time.sleep(0.2)
            wall = time.monotonic() - started
            statuses = Counter(server.run(run_id)["status"] for run_id in ids)
            mails = Counter(m["subject"] for m in sent_mail(sent))
            steps = db_rows(server.db, "SELECT run_id, worker, status FROM steps")
            steps_per_run = Counter(s["run_id"] for s in steps)
            report.update({
                "runs": runs, "wall_s": round(wall, 1), "statuses": dict(statuses),
                "unfinished": len(ids) - len(finished),
                "tool_calls_twice": sorted(s for s, n in mails.items() if n > 1),
                "tool_calls_missing": sorted(f"c{i}" for i in range(runs) if f"c{i}" not in mails),
                "runs_with_more_than_one_step": sum(1 for n in steps_per_run.values() if n > 1),
                "steps_by_worker": dict(Counter(s["worker"] for s in steps)),
                "step_errors": [s["status"] for s in steps if s["status"] != "ok"],
            })
            if chaos:
                report["recovered_after_kill_s"] = round(max(finished.values()) - killed_at, 1)
                after = [t for t in finished.values() if t > back_at]
                report["first_run_ended_after_redis_back_s"] = round(min(after) - back_at, 1) if after else None
                report["serve_outage_lines"] = server.log_path.read_text().count("Redis is back after")
                report["runs_resent_after_lost_worker"] = server.log_path.read_text().count(
                    "was lost; sending the job again")
        finally:
            client.close()
            for worker in workers:
                worker.close()
            server.close()
            redis_server.stop()
        return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--sleep", type=float, default=3.0)
    parser.add_argument("--kill-after", type=int, default=4, help="tool calls made before the kill")
    parser.add_argument("--redis-after", type=float, default=2.0, help="seconds from the kill to the Redis stop")
    parser.add_argument("--down", type=float, default=5.0, help="seconds Redis stays down")
    parser.add_argument("--lose-data", action="store_true", help="Redis restarts without its data")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    calm = one_round(args.runs, args.sleep, False, args)
    chaos = one_round(args.runs, args.sleep, True, args)
    machine = {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
               "load_1m": os.getloadavg()[0]}
    report = {"machine": machine, "calm": calm, "chaos": chaos}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for name in ("calm", "chaos"):
            print(f"{name}: " + json.dumps(report[name]))
        print("machine: " + json.dumps(machine))
    # (The scripted evaluator accepts any output, so a run "succeeds" even when its step failed: the steps count.)
    ok = (chaos["statuses"] == {"succeeded": args.runs} and not chaos["step_errors"] and not chaos["tool_calls_twice"]
          and not chaos["tool_calls_missing"] and not chaos["unfinished"])
    print("PASS" if ok else "FAIL: a run or its step did not succeed, or a tool call happened twice or never")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
