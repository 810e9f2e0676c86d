"""The overhead of an MCP tool call made from a sandboxed step, against the tool's own time.

One MCP server (tests/fakes/mcp_server.py over stdio, tool `echo`, trusted and read-only: no approval) runs on the
trusted side, as in `autocode serve`. Measured, each the median (and p90) of `--calls` (100) calls after 5 warm-up
calls:

1. raw: `ClientSession.call_tool("echo")` on the SDK's session — the tool's own time (server work + stdio JSON-RPC);
2. host: `McpHost.call("fake.echo")` on the trusted side — (1) plus the schema check, the result's shaping and the
   audit record (a no-op recorder here);
3. step: `fake.echo(text="x")` timed inside a step (time.perf_counter around each call) — (2) plus the step's stub,
   the step's channel to the server (JSON lines on a Unix socket) and the tool host (ToolHost.call).

The overhead of calling from a step is (3) − (1); the part the sandbox adds is (3) − (2).

Run: python bench/mcp_call.py [--calls 100] [--backend auto|bwrap|process] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent_core.sandbox import Limits, StepRequest  # noqa: E402
from agent_core.sandbox.pool import SandboxExecutor  # noqa: E402
from tools.host import ToolHost  # noqa: E402
from tools.registry import build_toolset  # noqa: E402

UID_BASE = 98000 + 64 * (os.getpid() % 20)  # the bench's own sandbox uids
WARMUP = 5

STEP = """
def calls():
    import time
    for _ in range({warmup}):
        fake.echo(text="x")
    times = []
    for _ in range({calls}):
        started = time.perf_counter()
        fake.echo(text="x")
        times.append(time.perf_counter() - started)
    return {{"times": times}}
"""


def summary(seconds: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in seconds)
    return {"median_ms": round(statistics.median(ms), 3), "p90_ms": round(ms[int(len(ms) * 0.9) - 1], 3),
            "min_ms": round(ms[0], 3)}


async def measure(calls: int, backend: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-mcp-") as tmp:
        tools = Path(tmp, "tools.py")
        entry = {"mcp": "fake", "command": [sys.executable, "-m", "tests.fakes.mcp_server"],
                 "env": {"PYTHONPATH": str(ROOT)}, "trusted": True, "tools": ["echo"]}
        tools.write_text(f"TOOLS = [{json.dumps(entry).replace('true', 'True')}]\n")
        toolset = build_toolset(tools)
        host = toolset.mcp_host
        assert host is not None
        await host.start()
        host.servers["fake"].accept()
        server = host.servers["fake"]

        raw = []
        session = await server.connected()
        [echo] = [tool for tool in server.listing if tool.name == "echo"]
        for i in range(WARMUP + calls):
            started = time.perf_counter()
            await session.call_tool(echo.name, {"text": "x"})
            if i >= WARMUP:
                raw.append(time.perf_counter() - started)

        async def no_record(record: dict[str, Any]) -> None:
            pass

        hosted = []
        for i in range(WARMUP + calls):
            started = time.perf_counter()
            await host.call("fake.echo", [], {"text": "x"}, 30, no_record)
            if i >= WARMUP:
                hosted.append(time.perf_counter() - started)

        tool_host = ToolHost(toolset, helper_unused, 30, record_mcp=no_record)
        executor = SandboxExecutor(backend=backend, uid_base=UID_BASE, max_workers=4, warm=1)
        try:
            sandbox = await executor.open("bench-mcp")
            try:
                result = await sandbox.run_step(StepRequest(
                    code=STEP.format(warmup=WARMUP, calls=calls), function="calls", input=None,
                    limits=Limits(timeout_s=300, max_output_kb=1024), tool_names=tool_host.names,
                    on_call=tool_host.call))
            finally:
                await sandbox.close()
            backend_used = executor.describe()["backend"]
        finally:
            await executor.stop()
            await host.close()
        if not result.ok:
            raise SystemExit(f"the step failed: {result.error}")
        step = result.output["times"]
    report = {"calls": calls, "backend": backend_used, "raw_session": summary(raw), "mcp_host": summary(hosted),
              "from_step": summary(step)}
    report["overhead_from_step_ms"] = round(report["from_step"]["median_ms"] - report["raw_session"]["median_ms"], 3)
    report["overhead_of_sandbox_channel_ms"] = round(
        report["from_step"]["median_ms"] - report["mcp_host"]["median_ms"], 3)
    return report


async def helper_unused(prompt: str, system: str) -> str:
    raise RuntimeError("no llm() in this bench")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--backend", default="auto", choices=["auto", "bwrap", "process"])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    report = asyncio.run(measure(args.calls, args.backend))
    load = os.getloadavg()[0]
    if args.json:
        print(json.dumps({**report, "load_1m": load}, indent=2))
        return
    print(f"MCP call overhead: {args.calls} calls of fake.echo, backend {report['backend']}, "
          f"{platform.machine()}, Python {platform.python_version()}, load {load:.2f}")
    for label, key in (("raw ClientSession.call_tool (the tool's own time)", "raw_session"),
                       ("McpHost.call on the trusted side", "mcp_host"), ("from a step: fake.echo(...)", "from_step")):
        row = report[key]
        print(f"  {label:<52} median {row['median_ms']:7.3f} ms  p90 {row['p90_ms']:7.3f} ms  min {row['min_ms']:.3f}")
    print(f"  overhead of calling from a step: {report['overhead_from_step_ms']:.3f} ms "
          f"(of which the sandbox channel and tool host: {report['overhead_of_sandbox_channel_ms']:.3f} ms)")


if __name__ == "__main__":
    main()
