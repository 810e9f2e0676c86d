"""Concurrency of `autocode serve`: many runs at once against a slow LLM — wall time, memory, nothing lost.

A FakeOpenAI in this process answers every request after `--delay` seconds (300 ms): the planner with a one-step
plan (`def answer(): return {"n": 42}`), the evaluator with a satisfactory verdict. `autocode serve` runs as a
subprocess on a temp SQLite file (sandbox uids 74000+). Measured:

1. one run alone: wall time from POST /api/runs to `succeeded` (GET every 20 ms) = the ideal single-run time
   (the server's second run: its first pays one-off costs, reported apart);
2. `--runs` (50) runs in as many conversations, submitted at once: wall time until all have finished;
   ideal = single-run time x ceil(runs / AUTOCODE_MAX_CONCURRENT_RUNS); target: at most 2x ideal;
3. peak RSS of the serve process (VmRSS every 50 ms during the burst) — target <= 300 MB; the sandbox workers are
   separate processes (descendants of serve): their peak count and peak total RSS are reported apart;
4. nothing lost: every run `succeeded`, and exactly one planner and one evaluator request per run reached the LLM.

Finish times come from the runs' `finished_at` (the server's clock, ms), so the burst is watched with one GET in
flight at a time (the oldest unfinished run, every 20 ms) and the polling itself costs the server next to nothing.
Per-run phases (queue wait, sandbox open = `started_at` to the planner call, planner, step, evaluator, finish) are
read from the run's SQLite file afterwards.

Before the burst the bench waits until the warm pool is full again.

Run: python bench/concurrency.py [--runs 50] [--delay 0.3] [--max-concurrent 32] [--warm N] [--env NAME=VALUE] [--json]
(`--warm` sets AUTOCODE_SANDBOX_WARM for the server; unset, the product default applies. `--env` passes any other
setting, e.g. AUTOCODE_SANDBOX_MAX_WORKERS=128, for experiments.)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import socket
import sqlite3
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

from tests.fakes.openai_server import FakeOpenAI  # noqa: E402

TARGET_TOTAL_FACTOR = 2.0
TARGET_RSS_MB = 300.0
UID_BASE = 74000  # the bench's own sandbox uids (the tests use 63000-69399, bench/sandbox.py 72000+)
POLL_S = 0.020
RSS_POLL_S = 0.050
TREE_POLL_S = 0.200  # the workers' /proc scan is dearer; every 4th RSS sample
FINISHED = {"succeeded", "failed", "cancelled", "interrupted"}

STEP_CODE = 'def answer():\n    return {"n": 42}'
PLAN = {"main_task": "bench", "main_task_thought": "return the number",
        "subtasks": [{"tool_name": "answer", "input_from_tool": "", "description": "the number",
                      "imports": [], "thought": "", "code": STEP_CODE}]}
VERDICT = {"satisfactory": True, "thoughts": "the step returned the number", "final_answer": "42",
           "retry_from": "", "new_subtasks": []}


class LLM:
    """The fake LLM's script: counts planner / evaluator requests and answers each after `delay` seconds."""

    def __init__(self, delay: float):
        self.delay = delay
        self.counts = {"plan": 0, "evaluation": 0, "other": 0}
        self.lock = threading.Lock()

    @staticmethod
    def kind(body: dict[str, Any]) -> str:
        fmt = body.get("response_format") or {}
        name = (fmt.get("json_schema") or {}).get("name") if isinstance(fmt, dict) else None
        if name in ("plan", "evaluation"):
            return name
        system = next((m.get("content") or "" for m in body.get("messages") or [] if m.get("role") == "system"), "")
        if system.startswith("You are AutoCode"):
            return "plan"
        if system.startswith("You judge"):
            return "evaluation"
        return "other"

    def __call__(self, body: dict[str, Any]) -> dict[str, Any] | None:
        kind = self.kind(body)
        with self.lock:
            self.counts[kind] += 1
        if kind == "other":
            return None  # a request we did not expect: the fake answers 500 and the run shows it
        return {"json": PLAN if kind == "plan" else VERDICT, "delay": self.delay}


# --- /proc --------------------------------------------------------------------------------------------------------
def vm_rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0  # gone, or a zombie


def descendants(root: int) -> tuple[list[int], list[int]]:
    """(direct children, all descendants) of `root`, from one scan of /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    direct = children.get(root, [])
    every, todo = [], list(direct)
    while todo:
        pid = todo.pop()
        every.append(pid)
        todo += children.get(pid, [])
    return direct, every


class MemoryWatch(threading.Thread):
    """Peak VmRSS of the serve process (every 50 ms) and of its descendants, the sandbox workers (every 200 ms)."""

    def __init__(self, pid: int):
        super().__init__(name="memory-watch", daemon=True)
        self.pid = pid
        self.stop_event = threading.Event()
        self.samples = 0
        self.peak_serve_kb = 0
        self.peak_workers = 0
        self.peak_worker_processes = 0
        self.peak_workers_kb = 0

    def run(self) -> None:
        last_tree = 0.0
        while not self.stop_event.is_set():
            self.peak_serve_kb = max(self.peak_serve_kb, vm_rss_kb(self.pid))
            self.samples += 1
            if time.monotonic() - last_tree >= TREE_POLL_S:
                last_tree = time.monotonic()
                self.sample_tree()
            self.stop_event.wait(RSS_POLL_S)

    def sample_tree(self) -> None:
        direct, every = descendants(self.pid)
        self.peak_workers = max(self.peak_workers, len(direct))
        self.peak_worker_processes = max(self.peak_worker_processes, len(every))
        self.peak_workers_kb = max(self.peak_workers_kb, sum(vm_rss_kb(pid) for pid in every))

    def stop(self) -> None:
        self.stop_event.set()
        self.join()
        self.peak_serve_kb = max(self.peak_serve_kb, vm_rss_kb(self.pid))


# --- the server ---------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(tmp: Path, llm_url: str, max_concurrent: int, warm: int | None,
                 extra_env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUTOCODE_", "OPENAI_"))}
    env.update(OPENAI_BASE_URL=llm_url, OPENAI_API_KEY="bench", AUTOCODE_MODEL="fake-model",
               AUTOCODE_DB=str(tmp / "autocode.db"), AUTOCODE_SANDBOX_UID_BASE=str(UID_BASE),
               AUTOCODE_MAX_CONCURRENT_RUNS=str(max_concurrent))
    if warm is not None:
        env["AUTOCODE_SANDBOX_WARM"] = str(warm)
    env.update(extra_env)
    log = open(tmp / "serve.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-P", "-m", "agent_core.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
        cwd=tmp, env={**env, "PYTHONPATH": str(ROOT)}, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"autocode serve exited with {proc.returncode}:\n{(tmp / 'serve.log').read_text()}")
        try:
            if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"autocode serve did not become healthy in 120 s:\n{(tmp / 'serve.log').read_text()}")


def wait_for_pool(pid: int, warm: int, timeout: float = 120.0) -> float:
    """Wait until serve has `warm` idle workers again (its child processes; the last one given time to get ready)."""
    started = time.monotonic()
    time.sleep(0.5)
    while time.monotonic() - started < timeout and len(descendants(pid)[0]) < warm:
        time.sleep(0.1)
    time.sleep(1.0)
    return time.monotonic() - started


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def epoch(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


# --- measurements -------------------------------------------------------------------------------------------------
def submit(client: httpx.Client, base: str, task: str, conversation: str) -> str:
    response = client.post(f"{base}/api/runs", json={"task": task, "conversation": conversation})
    if response.status_code != 202:
        raise SystemExit(f"POST /api/runs answered {response.status_code}: {response.text}")
    return response.json()["run_id"]


def single_run(client: httpx.Client, base: str, conversation: str) -> dict[str, Any]:
    t0_wall, t0 = time.time(), time.monotonic()
    run_id = submit(client, base, "What is the number?", conversation)
    while True:
        run = client.get(f"{base}/api/runs/{run_id}").json()
        if run["status"] in FINISHED:
            break
        time.sleep(POLL_S)
    seen = time.monotonic() - t0
    return {"run_id": run_id, "status": run["status"], "error": run["error"], "seen_s": seen,
            "finished_s": epoch(run["finished_at"]) - t0_wall}


def burst(client: httpx.Client, base: str, runs: int, serve_pid: int) -> dict[str, Any]:
    watch = MemoryWatch(serve_pid)
    watch.start()
    t0_wall, t0 = time.time(), time.monotonic()
    ids, post_ms = [], []
    for i in range(runs):
        sent = time.monotonic()
        ids.append(submit(client, base, f"What is the number? ({i})", f"bench-burst-{i}"))
        post_ms.append((time.monotonic() - sent) * 1000)
    submitted = time.monotonic() - t0
    final: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + 600
    for run_id in ids:  # one GET in flight: the oldest run not seen finished
        while True:
            run = client.get(f"{base}/api/runs/{run_id}").json()
            if run["status"] in FINISHED:
                final[run_id] = run
                break
            if time.monotonic() > deadline:
                watch.stop()
                raise SystemExit(f"run {run_id} still {run['status']} after 600 s")
            time.sleep(POLL_S)
    seen = time.monotonic() - t0
    watch.stop()
    finished = [epoch(run["finished_at"]) - t0_wall for run in final.values()]
    statuses: dict[str, int] = {}
    for run in final.values():
        statuses[run["status"]] = statuses.get(run["status"], 0) + 1
    return {
        "ids": ids, "submit_s": submitted, "post_ms_median": statistics.median(post_ms), "post_ms_max": max(post_ms), "seen_s": seen, "total_s": max(finished),
        "first_finished_s": min(finished), "median_finished_s": statistics.median(finished), "statuses": statuses,
        "errors": sorted({run["error"] for run in final.values() if run["error"]}),
        "serve_peak_rss_mb": watch.peak_serve_kb / 1024, "rss_samples": watch.samples,
        "workers_peak": watch.peak_workers, "worker_processes_peak": watch.peak_worker_processes,
        "workers_peak_rss_mb": watch.peak_workers_kb / 1024,
    }


def phases(db: Path, ids: list[str]) -> dict[str, dict[str, float]]:
    """Per-run phase durations (ms) from the run's rows: median / max / sum over the runs."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    per: dict[str, list[float]] = {k: [] for k in ("queued", "sandbox_open", "plan_call", "step", "step_code",
                                                  "evaluate_call", "finish", "total")}
    for run_id in ids:
        run = conn.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        calls = {c["purpose"]: c for c in conn.execute("SELECT * FROM llm_calls WHERE run_id = ?", (run_id,))}
        step = conn.execute("SELECT duration_ms FROM steps WHERE run_id = ?", (run_id,)).fetchone()
        if run is None or run["started_at"] is None or "plan" not in calls or "evaluate" not in calls or step is None:
            continue
        created, started, finished = (epoch(run[k]) for k in ("created_at", "started_at", "finished_at"))
        plan_start = epoch(calls["plan"]["started_at"])
        plan_end = plan_start + calls["plan"]["duration_ms"] / 1000
        eval_start = epoch(calls["evaluate"]["started_at"])
        eval_end = eval_start + calls["evaluate"]["duration_ms"] / 1000
        for key, seconds in (("queued", started - created), ("sandbox_open", plan_start - started),
                             ("plan_call", plan_end - plan_start), ("step", eval_start - plan_end),
                             ("step_code", step["duration_ms"] / 1000), ("evaluate_call", eval_end - eval_start),
                             ("finish", finished - eval_end), ("total", finished - created)):
            per[key].append(seconds * 1000)
    conn.close()
    return {k: {"median": statistics.median(v), "max": max(v), "sum": sum(v)} for k, v in per.items() if v}


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", "rb") as stat:
        fields = stat.read().rsplit(b")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])) / ticks  # self + reaped children


def cpu_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all cores, from /proc/stat."""
    with open("/proc/stat") as stat:
        values = [int(v) for v in stat.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def measure(runs: int, delay: float, max_concurrent: int, warm: int | None,
            extra_env: dict[str, str]) -> dict[str, Any]:
    llm = LLM(delay)
    with FakeOpenAI() as fake, tempfile.TemporaryDirectory(prefix="autocode-bench-") as tmp_name:
        fake.responder(llm)
        tmp = Path(tmp_name)
        started = time.monotonic()
        proc, base = start_server(tmp, fake.base_url, max_concurrent, warm, extra_env)
        startup = time.monotonic() - started
        try:
            with httpx.Client(timeout=30) as client:
                health = client.get(f"{base}/healthz").json()
                time.sleep(1.0)  # let the warm pool fill before the first run
                # The server's first run pays one-off costs (the LLM client's lazy imports, its first connection);
                # the ideal is the steady state: the second run alone.
                first = single_run(client, base, "bench-first")
                time.sleep(1.0)
                single = single_run(client, base, "bench-single")
                llm_before = dict(llm.counts)
                pool_wait = wait_for_pool(proc.pid, 2 if warm is None else warm)
                cpu_before, busy_before, own_before = cpu_seconds(proc.pid), cpu_busy(), time.process_time()
                result = burst(client, base, runs, proc.pid)
                cpu_burst = cpu_seconds(proc.pid) - cpu_before
                own_cpu = time.process_time() - own_before
                busy_after = cpu_busy()
                load = os.getloadavg()
        finally:
            stop_server(proc)
        result["phases"] = phases(tmp / "autocode.db", result.pop("ids"))
        single["phases"] = phases(tmp / "autocode.db", [single["run_id"]])
        first["phases"] = phases(tmp / "autocode.db", [first["run_id"]])
        serve_log = (tmp / "serve.log").read_text(errors="replace")
    llm_burst = {k: llm.counts[k] - llm_before[k] for k in llm.counts}
    ideal = single["finished_s"] * math.ceil(runs / max_concurrent)
    return {
        "machine": {"cores": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release(),
                    "loadavg_after": [round(x, 2) for x in load]},
        "settings": {"extra_env": extra_env, "runs": runs, "delay_s": delay, "max_concurrent_runs": max_concurrent,
                     "sandbox_warm": warm if warm is not None else "default",
                     "sandbox_backend": health["sandbox"]["backend"]},
        "serve_startup_s": startup, "pool_refill_wait_s": pool_wait, "first": first, "single": single, "burst": result, "burst_llm_requests": llm_burst, "ideal_s": ideal,
        "serve_cpu_s_burst": cpu_burst, "bench_cpu_s_burst": own_cpu,
        "machine_cpu_busy_burst": (busy_after[0] - busy_before[0]) / max(1, busy_after[1] - busy_before[1]),
        "machine_cpu_s_burst": (busy_after[0] - busy_before[0]) / os.sysconf("SC_CLK_TCK"),
        "serve_log_warnings": [line for line in serve_log.splitlines() if line.startswith(("WARNING", "ERROR"))][:20],
    }


def verdicts(report: dict[str, Any]) -> list[tuple[str, str, str, bool]]:
    burst_ = report["burst"]
    runs = report["settings"]["runs"]
    ideal = report["ideal_s"]
    llm = report["burst_llm_requests"]
    ok = burst_["statuses"].get("succeeded", 0)
    return [
        (f"{runs} runs at once: total <= {TARGET_TOTAL_FACTOR:g} x ideal ({ideal:.2f} s)",
         f"<= {TARGET_TOTAL_FACTOR * ideal:.2f} s", f"{burst_['total_s']:.2f} s ({burst_['total_s'] / ideal:.1f}x)",
         burst_["total_s"] <= TARGET_TOTAL_FACTOR * ideal),
        ("serve process peak RSS", f"<= {TARGET_RSS_MB:g} MB", f"{burst_['serve_peak_rss_mb']:.1f} MB",
         burst_["serve_peak_rss_mb"] <= TARGET_RSS_MB),
        ("no run lost", f"{runs} succeeded, {runs}+{runs} LLM requests",
         f"{ok} succeeded, {llm['plan']}+{llm['evaluation']} LLM requests",
         ok == runs and llm["plan"] == runs and llm["evaluation"] == runs and llm["other"] == 0),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--delay", type=float, default=0.3, help="seconds before the fake LLM answers")
    parser.add_argument("--max-concurrent", type=int, default=32, help="AUTOCODE_MAX_CONCURRENT_RUNS")
    parser.add_argument("--warm", type=int, help="AUTOCODE_SANDBOX_WARM (default: the product's)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="another setting for the server (repeatable), e.g. AUTOCODE_TOOLS=...")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    extra_env = dict(item.split("=", 1) for item in args.env)
    report = measure(args.runs, args.delay, args.max_concurrent, args.warm, extra_env)
    checks = verdicts(report)
    report["targets"] = [{"target": t, "limit": limit, "measured": m, "pass": ok} for t, limit, m, ok in checks]
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    s, b = report["settings"], report["burst"]
    print(f"machine: {report['machine']['cores']} cores, CPython {report['machine']['python']}, sandbox "
          f"{s['sandbox_backend']}, AUTOCODE_MAX_CONCURRENT_RUNS={s['max_concurrent_runs']}, "
          f"AUTOCODE_SANDBOX_WARM={s['sandbox_warm']}, LLM delay {s['delay_s']:g} s"
          + "".join(f", {k}={v}" for k, v in s["extra_env"].items()))
    print(f"serve ready (healthz 200) {report['serve_startup_s']:.2f} s after start; first run "
          f"{report['first']['finished_s']:.3f} s (one-off costs)")
    print(f"single run: {report['single']['finished_s']:.3f} s to finished_at "
          f"({report['single']['seen_s']:.3f} s until the 20 ms poll saw it), {report['single']['status']}")
    print(f"burst of {s['runs']}: submitted in {b['submit_s']:.2f} s (POST median {b['post_ms_median']:.0f} ms, max "
          f"{b['post_ms_max']:.0f} ms); finished: first {b['first_finished_s']:.2f} s, "
          f"median {b['median_finished_s']:.2f} s, last {b['total_s']:.2f} s (seen {b['seen_s']:.2f} s); "
          f"statuses {b['statuses']}")
    print(f"serve process: peak RSS {b['serve_peak_rss_mb']:.1f} MB ({b['rss_samples']} samples), "
          f"CPU {report['serve_cpu_s_burst']:.2f} s during the burst (with reaped children)")
    print(f"machine during the burst: {report['machine_cpu_s_burst']:.1f} CPU-s, all cores "
          f"{100 * report['machine_cpu_busy_burst']:.0f}% busy; this bench process (fake LLM, polling) "
          f"{report['bench_cpu_s_burst']:.2f} CPU-s")
    print(f"sandbox workers: peak {b['workers_peak']} workers ({b['worker_processes_peak']} processes), "
          f"peak total RSS {b['workers_peak_rss_mb']:.0f} MB")
    print()
    print(f"{'phase of a run (ms)':<20}{'first':>7}{'single':>8}{'burst median':>14}{'burst max':>11}")
    for name, v in b["phases"].items():
        first, alone = (report[k]["phases"].get(name, {}).get("median", float("nan")) for k in ("first", "single"))
        print(f"{name:<20}{first:>7.0f}{alone:>8.0f}{v['median']:>14.0f}{v['max']:>11.0f}")
    print()
    width = max(len(t) for t, *_ in checks) + 2
    print(f"{'target':<{width}}{'limit':<36}{'measured':<36}")
    for target, limit, measured, ok in checks:
        print(f"{target:<{width}}{limit:<36}{measured:<36}{'PASS' if ok else 'MISS'}")
    for line in report["serve_log_warnings"]:
        print(f"serve: {line}")
    for error in b["errors"]:
        print(f"run error: {error}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
