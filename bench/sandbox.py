"""Sandbox overhead: per-step cost of the warm pool, CPU-bound steps against smolagents and plain Python, memory.

1. A trivial step (`def f(): return {"x": 1}`): `run_step` wall time in an open sandbox of a warm pool (median and
   p95 of N sequential steps), and a cold start (`open()` with no warm worker, plus the first step); the same with
   the "process" fallback backend, and with a worker that preloads the built-in toolset's libraries (numpy, geopy,
   as `SandboxExecutor.from_settings` does); for reference, the start-up of a bare interpreter (`python -c pass`).
2. A CPU-bound step (a pure-Python loop of 10**6 and 5*10**6 iterations): in our sandbox, in smolagents'
   `LocalPythonExecutor` (an AST interpreter, capped at 10**7 operations), and in plain `python -c` (a subprocess,
   start-up included) and in this interpreter.
3. Memory: RSS (and PSS) of one idle warm worker's Python process (under bwrap: the Python descendant of the
   launcher's pid).

With --profile, also where a trivial step's time goes, measured from the server: control round trip, dispatch and
fork, the step's set-up (rlimits, uid drop, Landlock, seccomp) until its code runs, and the kill sweep.

Run: python bench/sandbox.py [--backend auto|bwrap|process] [--steps N] [--json] [--profile]
(smolagents comes with `pip install -e '.[bench]'`; without it those rows say so.)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent_core.sandbox import Limits, StepRequest  # noqa: E402
from agent_core.sandbox import pool  # noqa: E402
from agent_core.sandbox.pool import SandboxExecutor  # noqa: E402

TARGET_WARM_MS = 10.0
TARGET_SMOL_RATIO = 30.0
TARGET_PLAIN_RATIO = 2.0
SMALL, LARGE = 10**6, 5 * 10**6
COLD_RUNS = 10
CPU_RUNS = 5
STARTUP_RUNS = 20
SYSTEM_PYTHON = "/usr/bin/python3"
# Our own uids, away from the default 61000 and the tests' 63000-69399: a step sweep kills every process of its uid.
BENCH_UID_BASE = 72000 + 64 * (os.getpid() % 100)
TOOLSET_PRELOAD = ["numpy", "geopy"]  # what the built-in toolset declares (a run's worker preloads it)

TRIVIAL = 'def f():\n    return {"x": 1}\n'
TIMESTAMP = 'def f():\n    import time\n    return {"t": time.monotonic()}\n'


def loop_code(n: int) -> str:
    return f"def f():\n    total = 0\n    for i in range({n}):\n        total += i * i % 7\n    return {{\"total\": total}}\n"


def expected_total(n: int) -> int:
    full, rest = divmod(n, 7)
    return full * sum(i * i % 7 for i in range(7)) + sum(i * i % 7 for i in range(rest))


def ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def summary(values: list[float]) -> dict[str, float]:
    return {"median_ms": ms(statistics.median(values)), "p95_ms": ms(p95(values)), "min_ms": ms(min(values)),
            "max_ms": ms(max(values)), "n": len(values)}


def request(code: str, timeout_s: float = 60.0) -> StepRequest:
    return StepRequest(code=code, function="f", input=None, limits=Limits(timeout_s=timeout_s))


async def timed_step(sandbox: Any, code: str) -> tuple[float, Any]:
    started = time.perf_counter()
    result = await sandbox.run_step(request(code))
    elapsed = time.perf_counter() - started
    if not result.ok:
        raise RuntimeError(f"the step failed: {result.error}\n{result.traceback or ''}{result.stderr}")
    return elapsed, result


async def settle(executor: SandboxExecutor) -> None:
    """Let the pool's background refill finish, so that it does not compete with the measured steps."""
    refill = getattr(executor, "_refill", None)
    if refill is not None:
        await refill


# --- memory ---------------------------------------------------------------------------------------------------
def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as handle:
                ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        tree.setdefault(ppid, []).append(int(name))
    return tree


def _is_python(pid: int) -> bool:
    try:
        return "python" in os.path.basename(os.readlink(f"/proc/{pid}/exe"))
    except OSError:
        return False


def _status_kb(pid: int, field: str, source: str = "status") -> int | None:
    try:
        with open(f"/proc/{pid}/{source}") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def worker_memory(root_pid: int) -> dict[str, Any]:
    """The worker's Python process (the launcher's pid itself, or its Python descendant under bwrap)."""
    tree = _children()
    descendants, frontier = [], [root_pid]
    while frontier:
        pid = frontier.pop()
        descendants.append(pid)
        frontier.extend(tree.get(pid, []))
    python = next((pid for pid in descendants if _is_python(pid)), None)
    others = [pid for pid in descendants if pid != python]
    if python is None:
        return {"error": f"no python process under pid {root_pid}"}
    return {
        "python_pid": python,
        "python_rss_kb": _status_kb(python, "VmRSS"),
        "python_pss_kb": _status_kb(python, "Pss", "smaps_rollup"),
        "python_rss_anon_kb": _status_kb(python, "RssAnon"),
        "launcher_processes": len(others),
        "launcher_rss_kb": sum(_status_kb(pid, "VmRSS") or 0 for pid in others),
    }


# --- 1. trivial steps, 2. CPU-bound steps in our sandbox, 3. memory ----------------------------------------------
async def warm_pool(backend: str, steps: int, cpu: bool, preload: list[str] | None = None) -> dict[str, Any]:
    executor = SandboxExecutor(backend=backend, uid_base=BENCH_UID_BASE, max_workers=16, warm=1, preload=preload)
    report: dict[str, Any] = {"backend": executor.name, "fallback_reason": executor.fallback_reason,
                              "preload": preload or []}
    await executor.start()
    try:
        sandbox = await executor.open("bench-warm")
        try:
            await settle(executor)
            for _ in range(5):  # first steps fault in the worker's pages
                await timed_step(sandbox, TRIVIAL)
            times = []
            for _ in range(steps):
                elapsed, result = await timed_step(sandbox, TRIVIAL)
                assert result.output == {"x": 1}, result.output
                times.append(elapsed)
            report["trivial"] = summary(times)
            report["preloaded"] = sandbox.ready.get("preloaded", [])
            if executor._idle:  # the refilled, never used warm worker
                report["memory_idle_worker"] = worker_memory(executor._idle[0].proc.pid)
            report["memory_after_steps"] = worker_memory(sandbox.proc.pid)
            if cpu:
                report["cpu"] = {str(n): await cpu_comparison(sandbox, n) for n in (SMALL, LARGE)}
        finally:
            await sandbox.close()
    finally:
        await executor.stop()
    return report


async def cold_start(backend: str, runs: int = COLD_RUNS) -> dict[str, Any]:
    executor = SandboxExecutor(backend=backend, uid_base=BENCH_UID_BASE, max_workers=16, warm=0)
    opens, firsts, totals, closes = [], [], [], []
    try:
        for i in range(runs):
            started = time.perf_counter()
            sandbox = await executor.open(f"bench-cold-{i}")
            opened = time.perf_counter()
            try:
                await timed_step(sandbox, TRIVIAL)
                done = time.perf_counter()
            finally:
                await sandbox.close()
            closes.append(time.perf_counter() - done)
            opens.append(opened - started)
            firsts.append(done - opened)
            totals.append(done - started)
    finally:
        await executor.stop()
    return {"open": summary(opens), "first_step": summary(firsts), "open_plus_first_step": summary(totals),
            "close": summary(closes)}


# --- references: interpreter start-up, smolagents, plain python ------------------------------------------------
def startup(python: str, runs: int = STARTUP_RUNS) -> dict[str, Any] | None:
    if not os.path.exists(python):
        return None
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run([python, "-c", "pass"], check=True)
        times.append(time.perf_counter() - started)
    version = subprocess.run([python, "-c", "import platform; print(platform.python_version())"],
                             capture_output=True, text=True, check=True).stdout.strip()
    return {"python": python, "version": version, **summary(times)}


def smolagents_loop(n: int) -> dict[str, Any]:
    try:
        import smolagents
        from smolagents.local_python_executor import LocalPythonExecutor
    except ImportError as exc:
        return {"status": "unavailable", "error": f"smolagents is not installed ({exc}): pip install -e '.[bench]'"}
    executor = LocalPythonExecutor(additional_authorized_imports=[])
    executor.send_tools({})
    started = time.perf_counter()
    try:
        output = executor(loop_code(n) + "f()\n").output
    except Exception as exc:  # InterpreterError: the operation cap (or the timeout)
        elapsed = time.perf_counter() - started
        return {"status": "refused", "seconds": round(elapsed, 3), "error": f"{type(exc).__name__}: {exc}",
                "version": smolagents.__version__}
    elapsed = time.perf_counter() - started
    assert output == {"total": expected_total(n)}, output
    return {"status": "ok", "seconds": round(elapsed, 3), "version": smolagents.__version__}


async def cpu_comparison(sandbox: Any, n: int, runs: int = CPU_RUNS) -> dict[str, Any]:
    """The loop in our sandbox, in `python -c` and in this interpreter, interleaved run by run (a noisy machine)."""
    source = loop_code(n)
    namespace: dict[str, Any] = {}
    exec(compile(source, "<loop>", "exec"), namespace)
    ours, plain, in_process = [], [], []
    for _ in range(runs):
        elapsed, result = await timed_step(sandbox, source)
        assert result.output == {"total": expected_total(n)}, result.output
        ours.append(elapsed)
        started = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", source + "print(f()['total'])"], capture_output=True, text=True,
                             check=True).stdout
        plain.append(time.perf_counter() - started)
        assert int(out) == expected_total(n)
        started = time.perf_counter()
        namespace["f"]()
        in_process.append(time.perf_counter() - started)
    return {"ours_median_s": round(statistics.median(ours), 4),
            "plain_subprocess_median_s": round(statistics.median(plain), 4),
            "in_process_median_s": round(statistics.median(in_process), 4),
            "runs": runs}


# --- profile: where a trivial step's time goes -------------------------------------------------------------------
async def server_phases(backend: str, steps: int, preload: list[str] | None = None) -> dict[str, Any]:
    """Split `run_step` into phases by timestamping the server's calls (the product code is only wrapped here)."""
    marks: dict[str, Any] = {}
    original_converse, original_receive = pool._converse, pool.Worker._receive

    async def converse(sock, req):
        marks["job_sent"] = time.monotonic()
        try:
            return await original_converse(sock, req)
        finally:
            marks["result"] = time.monotonic()

    async def receive(self):
        message = await original_receive(self)
        marks.setdefault("received", []).append(time.monotonic())
        return message

    pool._converse, pool.Worker._receive = converse, receive
    executor = SandboxExecutor(backend=backend, uid_base=BENCH_UID_BASE, max_workers=16, warm=1, preload=preload)
    phases: dict[str, list[float]] = {k: [] for k in (
        "control_round_trip", "dispatch", "to_step_code", "code_to_result", "finish_sweep", "logs_and_cleanup",
        "total")}
    try:
        await executor.start()
        sandbox = await executor.open("bench-profile")
        try:
            await settle(executor)
            for _ in range(5):
                await timed_step(sandbox, TIMESTAMP)
            for _ in range(steps):
                # A control message the worker answers at once (an unknown op): the bare round trip.
                started = time.monotonic()
                await sandbox._send({"op": "bench-ping"})
                await sandbox._receive()  # {"op": "error", "error": "unknown op ..."}
                phases["control_round_trip"].append(time.monotonic() - started)
                marks.clear()
                started = time.monotonic()
                _, result = await timed_step(sandbox, TIMESTAMP)
                ended = time.monotonic()
                started_reply, exited_reply = marks["received"]
                in_code = result.output["t"]  # CLOCK_MONOTONIC: the same clock inside the namespaces
                phases["dispatch"].append(started_reply - started)
                phases["to_step_code"].append(in_code - started_reply)
                phases["code_to_result"].append(marks["result"] - in_code)
                phases["finish_sweep"].append(exited_reply - marks["result"])
                phases["logs_and_cleanup"].append(ended - exited_reply)
                phases["total"].append(ended - started)
        finally:
            await sandbox.close()
    finally:
        pool._converse, pool.Worker._receive = original_converse, original_receive
        await executor.stop()
    return {name: ms(statistics.median(values)) for name, values in phases.items()}


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "MISS")


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {"machine": {"cores": os.cpu_count(), "kernel": platform.release(),
                                          "python": platform.python_version(), "root": os.geteuid() == 0,
                                          "loadavg_1min_start": os.getloadavg()[0]}}
    main = await warm_pool(args.backend, args.steps, cpu=True)
    main["cold"] = await cold_start(args.backend)
    report["main"] = main
    report["preloaded"] = await warm_pool(args.backend, args.steps, cpu=False, preload=TOOLSET_PRELOAD)
    if main["backend"] != "process":
        fallback = await warm_pool("process", args.steps, cpu=False)
        fallback["cold"] = await cold_start("process")
        report["process"] = fallback
    report["startup"] = {"this_python": startup(sys.executable), "system_python": startup(SYSTEM_PYTHON)}
    report["smolagents"] = {str(n): smolagents_loop(n) for n in (SMALL, LARGE)}
    if args.profile:
        report["profile"] = {"server_phases": await server_phases(args.backend, 100),
                             "server_phases_preloaded": await server_phases(args.backend, 100, TOOLSET_PRELOAD)}
        if main["backend"] != "process":
            report["profile"]["server_phases_process"] = await server_phases("process", 100)

    report["machine"]["loadavg_1min_end"] = os.getloadavg()[0]
    small, large = main["cpu"][str(SMALL)], main["cpu"][str(LARGE)]
    smol_small = report["smolagents"][str(SMALL)]
    smol_ratio = smol_small["seconds"] / small["ours_median_s"] if smol_small["status"] == "ok" else None
    plain_ratio = large["ours_median_s"] / large["plain_subprocess_median_s"]
    report["ratios"] = {
        "smolagents_over_ours_1e6": None if smol_ratio is None else round(smol_ratio, 1),
        "ours_over_plain_subprocess_5e6": round(plain_ratio, 3),
        "ours_over_in_process_5e6": round(large["ours_median_s"] / large["in_process_median_s"], 3),
        "ours_over_plain_subprocess_1e6": round(small["ours_median_s"] / small["plain_subprocess_median_s"], 3),
    }
    report["targets"] = {
        "warm_step_median_ms": {"value": main["trivial"]["median_ms"], "target": f"<= {TARGET_WARM_MS:g}",
                                "verdict": verdict(main["trivial"]["median_ms"] <= TARGET_WARM_MS)},
        "smolagents_over_ours_1e6": {"value": report["ratios"]["smolagents_over_ours_1e6"],
                                     "target": f">= {TARGET_SMOL_RATIO:g}",
                                     "verdict": verdict(None if smol_ratio is None else smol_ratio >= TARGET_SMOL_RATIO)},
        "ours_over_plain_5e6": {"value": round(plain_ratio, 3), "target": f"<= {TARGET_PLAIN_RATIO:g}",
                                "verdict": verdict(plain_ratio <= TARGET_PLAIN_RATIO)},
    }
    extra = [("warm_step_median_ms_preloaded", report["preloaded"])]
    if "process" in report:
        extra.append(("warm_step_median_ms_process_backend", report["process"]))
    for key, entry in extra:
        median = entry["trivial"]["median_ms"]
        report["targets"][key] = {"value": median, "target": f"<= {TARGET_WARM_MS:g}",
                                  "verdict": verdict(median <= TARGET_WARM_MS)}
    return report


def kb_to_mb(kb: int | None) -> str:
    return "?" if kb is None else f"{kb / 1024:.1f}"


def label(entry: dict[str, Any]) -> str:
    preload = entry.get("preload") or []
    return entry["backend"] + (f" + preload {', '.join(preload)}" if preload else "")


def print_report(report: dict[str, Any]) -> None:
    main, targets = report["main"], report["targets"]
    machine = report["machine"]
    print(f"machine: {machine['cores']} cores, Linux {machine['kernel']}, CPython {machine['python']}, "
          f"root={machine['root']}, 1-min load average {machine['loadavg_1min_start']:.2f} at the start, "
          f"{machine['loadavg_1min_end']:.2f} at the end; backend: {main['backend']}"
          + (f" (fallback: {main['fallback_reason']})" if main["fallback_reason"] else ""))
    print()
    print("| trivial step `def f(): return {\"x\": 1}` | median ms | p95 ms | min ms | target |")
    print("| --- | ---: | ---: | ---: | --- |")
    warm = [main, report["preloaded"]] + ([report["process"]] if "process" in report else [])
    for entry in warm:
        t = entry["trivial"]
        ok = t["median_ms"] <= TARGET_WARM_MS
        print(f"| {label(entry)}: warm pool, `run_step` ({t['n']} sequential steps) | {t['median_ms']} | "
              f"{t['p95_ms']} | {t['min_ms']} | ≤ {TARGET_WARM_MS:g} ms median: **{verdict(ok)}** |")
    for entry in (main, report.get("process")):
        if entry is None:
            continue
        c, name = entry["cold"], entry["backend"]
        print(f"| {name}: cold, `open()` with no warm worker + first step ({c['open']['n']} runs) | "
              f"{c['open_plus_first_step']['median_ms']} | {c['open_plus_first_step']['p95_ms']} | "
              f"{c['open_plus_first_step']['min_ms']} | |")
        print(f"| {name}: … of which `open()` | {c['open']['median_ms']} | {c['open']['p95_ms']} | "
              f"{c['open']['min_ms']} | |")
        print(f"| {name}: `close()` (kill the worker, remove its files) | {c['close']['median_ms']} | "
              f"{c['close']['p95_ms']} | {c['close']['min_ms']} | |")
    for key in ("this_python", "system_python"):
        s = report["startup"][key]
        if s:
            print(f"| reference: `{s['python']} -c pass` (CPython {s['version']}, subprocess.run, {s['n']} runs) | "
                  f"{s['median_ms']} | {s['p95_ms']} | {s['min_ms']} | |")
    print()
    cpu = main["cpu"]
    runs = cpu[str(SMALL)]["runs"]
    print("| CPU-bound step: `for i in range(n): total += i * i % 7` | n = 10**6 | n = 5*10**6 |")
    print("| --- | ---: | ---: |")
    print(f"| ours ({main['backend']}, warm, `run_step` wall time, median of {runs}) | "
          f"{cpu[str(SMALL)]['ours_median_s']:.3f} s | {cpu[str(LARGE)]['ours_median_s']:.3f} s |")
    cells = []
    for n in (SMALL, LARGE):
        s = report["smolagents"][str(n)]
        if s["status"] == "ok":
            cells.append(f"{s['seconds']:.2f} s")
        elif s["status"] == "refused":
            cells.append(f"refused after {s['seconds']:.2f} s")
        else:
            cells.append("not installed")
    version = report["smolagents"][str(SMALL)].get("version", "?")
    print(f"| smolagents {version} `LocalPythonExecutor` (1 run) | {cells[0]} | {cells[1]} |")
    print(f"| plain `python -c` (subprocess, start-up included, median of {runs}) | "
          f"{cpu[str(SMALL)]['plain_subprocess_median_s']:.3f} s | {cpu[str(LARGE)]['plain_subprocess_median_s']:.3f} s |")
    print(f"| the loop in this interpreter (no new process, median of {runs}) | "
          f"{cpu[str(SMALL)]['in_process_median_s']:.3f} s | {cpu[str(LARGE)]['in_process_median_s']:.3f} s |")
    for n in (SMALL, LARGE):
        s = report["smolagents"][str(n)]
        if s["status"] != "ok":
            print(f"\nsmolagents, n={n}: {s['error'][:300]}")
    ratios = report["ratios"]
    print(f"\nratios: smolagents / ours (10**6) = {ratios['smolagents_over_ours_1e6']}; ours / plain python -c "
          f"(5*10**6) = {ratios['ours_over_plain_subprocess_5e6']}; ours / the loop in this interpreter (5*10**6) = "
          f"{ratios['ours_over_in_process_5e6']}; ours / plain python -c (10**6) = "
          f"{ratios['ours_over_plain_subprocess_1e6']}")
    print()
    print("| memory (the worker's python process) | VmRSS MB | PSS MB | launcher processes (their RSS MB) |")
    print("| --- | ---: | ---: | --- |")
    for entry in warm:
        for name, key in (("idle warm worker", "memory_idle_worker"), ("run's worker after the steps",
                                                                       "memory_after_steps")):
            m = entry.get(key)
            if m and "error" not in m:
                print(f"| {label(entry)}: {name} | {kb_to_mb(m['python_rss_kb'])} | "
                      f"{kb_to_mb(m['python_pss_kb'])} | {m['launcher_processes']} "
                      f"({kb_to_mb(m['launcher_rss_kb'])}) |")
    print()
    print("| target | value | needed | |")
    print("| --- | ---: | ---: | --- |")
    names = {"warm_step_median_ms": f"warm per-step overhead, median ms ({main['backend']})",
             "warm_step_median_ms_preloaded": f"warm per-step overhead, median ms ({label(report['preloaded'])})",
             "warm_step_median_ms_process_backend": "warm per-step overhead, median ms (process backend)",
             "smolagents_over_ours_1e6": "10**6 loop: smolagents / ours",
             "ours_over_plain_5e6": "5*10**6 loop: ours / plain `python -c`"}
    for key, t in targets.items():
        print(f"| {names[key]} | {t['value']} | {t['target']} | **{t['verdict']}** |")
    profile = report.get("profile")
    if profile:
        print()
        print("profile: server-side phases of a trivial step (median ms)")
        for key in ("server_phases", "server_phases_preloaded", "server_phases_process"):
            if key in profile:
                print(f"  {key}: {json.dumps(profile[key])}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("auto", "bwrap", "process"), default="auto")
    parser.add_argument("--steps", type=int, default=200, help="sequential warm steps (default 200)")
    parser.add_argument("--json", action="store_true", help="print the raw report as JSON")
    parser.add_argument("--profile", action="store_true", help="also split a step's time into its parts")
    args = parser.parse_args()
    report = asyncio.run(measure(args))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
