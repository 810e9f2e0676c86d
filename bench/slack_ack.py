"""Slack ack latency of `autocode serve` next to a bare Bolt app that only acks, measured in the same run.

Both apps are subprocesses served by uvicorn on 127.0.0.1 with slack-bolt's AsyncApp behind
`AsyncSlackRequestHandler`, both pointed at one fake Slack Web API (tests/fakes/slack_server.py); `autocode serve`
gets a scripted LLM (tests/server_helpers.ScriptedLLM) and its sandbox uids from 82000. The fakes run in a process
of their own, so serving them never delays the measuring client in this one.

Per round and app: `--busy` (8) long runs are started first (slash commands "job sleep=3"), so runs execute
during the burst; then `--burst` (50) signed slash commands are POSTed at once ("job sleep=1": each one queues a
run that starts executing while the others are still being acknowledged). The latency of a command is the
client-side time from sending the POST to the full ack response. Rounds alternate bare / autocode so that load
from the machine hits both alike. Target: autocode's p99 ≤ 1.5× the bare app's p99, and never over 3 s.

`autocode serve` has Bolt's AsyncAssistant middleware mounted (bots/slack_assistant.py), which every request
passes. The `assistant` workload (`--workload assistant|command|both`, default both) measures what it handles
itself: the burst is 50 signed `message` events in 5 assistant threads (started with `assistant_thread_started`
before the round), each a task "job sleep=1"; the bare app acks them with an empty `message` listener.

Run: python bench/slack_ack.py [--rounds 3] [--burst 50] [--busy 8] [--workload both] [--json]
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
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from slack_sdk.signature import SignatureVerifier  # noqa: E402

from tests.fakes.slack_server import TEAM_ID  # noqa: E402
from tests.server_helpers import Serve, db_rows, free_port, serve_env, wait_for  # noqa: E402

SECRET = "bench-signing-secret"
TOKEN = "xoxb-bench"
UID_BASE = 82000
TARGET_FACTOR, TARGET_MAX_S = 1.5, 3.0

BARE_APP = """
import os, uvicorn
from slack_bolt.async_app import AsyncApp
from slack_bolt.adapter.starlette.async_handler import AsyncSlackRequestHandler
from slack_sdk.web.async_client import AsyncWebClient
from starlette.applications import Starlette
from starlette.routing import Route

app = AsyncApp(signing_secret=os.environ["SLACK_SIGNING_SECRET"], process_before_response=True,
               client=AsyncWebClient(token=os.environ["SLACK_BOT_TOKEN"], base_url=os.environ["SLACK_API_URL"]))

@app.command("/autocode")
async def command(ack):
    await ack(text="Queued", response_type="ephemeral")

@app.event("message")
async def message():
    pass

handler = AsyncSlackRequestHandler(app)

async def events(request):
    return await handler.handle(request)

uvicorn.run(Starlette(routes=[Route("/slack/events", events, methods=["POST"])]), host="127.0.0.1",
            port=int(os.environ["PORT"]), log_level="warning")
"""


FAKES = """
import sys, time
sys.path.insert(0, sys.argv[1])
from tests.fakes.slack_server import FakeSlack
from tests.server_helpers import ScriptedLLM
with FakeSlack() as slack, ScriptedLLM() as llm:
    print(slack.api_url, llm.base_url, flush=True)
    sys.stdin.read()  # until the bench closes our stdin
"""


class Fakes:
    """The fake Slack Web API and the scripted LLM in their own process, so that serving them does not slow the
    measuring client (one GIL)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", FAKES, str(ROOT)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.slack_api_url, self.llm_url = self.proc.stdout.readline().split()

    @property
    def base_url(self) -> str:  # what serve_env() reads from an LLM fake
        return self.llm_url

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=10)


class BareApp:
    """The bare Bolt app in a uvicorn subprocess."""

    def __init__(self, slack_api_url: str, log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "SLACK_SIGNING_SECRET": SECRET, "SLACK_BOT_TOKEN": TOKEN, "SLACK_API_URL": slack_api_url,
               "PORT": str(self.port)}
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-c", BARE_APP], env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def wait_ready(self) -> None:
        def up() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError("the bare Bolt app exited")
            try:
                return httpx.post(f"{self.url}/slack/events", timeout=2).status_code == 401
            except httpx.HTTPError:
                return False

        wait_for(up, 30, what="the bare Bolt app")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def command_body(text: str, channel: str, trigger: str) -> bytes:
    return urlencode({
        "token": "legacy", "team_id": TEAM_ID, "team_domain": "bench", "channel_id": channel, "channel_name": "bench",
        "user_id": "UBENCH", "user_name": "bench", "command": "/autocode", "text": text, "api_app_id": "ABENCH",
        "response_url": "https://hooks.slack.test/commands/1", "trigger_id": trigger,
    }).encode()


def event_body(event: dict[str, Any], event_id: str) -> bytes:
    return json.dumps({
        "token": "legacy", "team_id": TEAM_ID, "api_app_id": "ABENCH", "type": "event_callback",
        "event_id": event_id, "event_time": int(time.time()), "event": event,
        "authorizations": [{"team_id": TEAM_ID, "user_id": "UAUTOCODE", "is_bot": True}],
    }).encode()


def thread_ts_of(round_no: int, thread: int) -> str:
    return f"{1700000000 + round_no * 100 + thread}.000100"


def assistant_started(round_no: int, thread: int) -> bytes:
    ts = thread_ts_of(round_no, thread)
    return event_body({"type": "assistant_thread_started", "event_ts": ts, "assistant_thread": {
        "user_id": "UBENCH", "channel_id": f"DBENCH{thread}", "thread_ts": ts,
        "context": {"channel_id": "CBENCH", "team_id": TEAM_ID}}}, f"EvStart{round_no}x{thread}")


def assistant_message(text: str, round_no: int, thread: int, label: str) -> bytes:
    ts = f"{time.time():.6f}"
    return event_body({"type": "message", "channel_type": "im", "user": "UBENCH", "text": text, "ts": ts,
                       "thread_ts": thread_ts_of(round_no, thread), "channel": f"DBENCH{thread}", "event_ts": ts},
                      f"Ev{label}")


async def send(client: httpx.AsyncClient, url: str, text: str, channel: str, trigger: str,
               body: bytes | None = None) -> tuple[float, int]:
    kind = "application/json" if body is not None else "application/x-www-form-urlencoded"
    body = body if body is not None else command_body(text, channel, trigger)
    stamp = str(int(time.time()))
    headers = {"Content-Type": kind, "X-Slack-Request-Timestamp": stamp,
               "X-Slack-Signature": SignatureVerifier(SECRET).generate_signature(timestamp=stamp, body=body)}
    start = time.perf_counter()
    response = await client.post(f"{url}/slack/events", content=body, headers=headers)
    return time.perf_counter() - start, response.status_code


THREADS = 5  # assistant threads a burst is spread over


async def burst(url: str, label: str, round_no: int, size: int, busy: int,
                workload: str = "command") -> tuple[list[float], list[int]]:
    limits = httpx.Limits(max_connections=size + busy + 10, max_keepalive_connections=size + busy + 10)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        if workload == "assistant" and label.startswith("autocode"):  # the bare app has no assistant listeners
            await asyncio.gather(*(send(client, url, "", "", "", assistant_started(round_no, t))
                                   for t in range(THREADS)))
        await asyncio.gather(*(send(client, url, "job sleep=3", f"CBUSY{round_no}", f"{label}.busy.{round_no}.{i}")
                               for i in range(busy)))
        await asyncio.sleep(1.0)  # the busy runs are executing now
        if workload == "assistant":
            results = await asyncio.gather(*(
                send(client, url, "", "", "", assistant_message(f"job tag=B{i} sleep=1", round_no, i % THREADS,
                                                                f"{label}.{round_no}.{i}"))
                for i in range(size)))
        else:
            results = await asyncio.gather(*(
                send(client, url, f"job tag=B{i} sleep=1", f"CBURST{round_no}x{i % 5}",
                     f"{label}.burst.{round_no}.{i}")
                for i in range(size)))
    return [r[0] for r in results], [r[1] for r in results]


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def summary(values: list[float]) -> dict[str, float]:
    return {"p50_ms": 1000 * percentile(values, 50), "p99_ms": 1000 * percentile(values, 99),
            "max_ms": 1000 * max(values), "n": len(values)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--burst", type=int, default=50)
    parser.add_argument("--busy", type=int, default=8)
    parser.add_argument("--workload", choices=("command", "assistant", "both"), default="both")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    workloads = ("command", "assistant") if args.workload == "both" else (args.workload,)

    directory = Path(tempfile.mkdtemp(prefix="slack-ack-bench-"))
    latencies: dict[str, dict[str, list[float]]] = {w: {"bare": [], "autocode": []} for w in workloads}
    statuses: dict[str, dict[str, list[int]]] = {w: {"bare": [], "autocode": []} for w in workloads}
    fakes = Fakes()
    try:
        env = serve_env(fakes, directory / "autocode.db", SLACK_BOT_TOKEN=TOKEN, SLACK_SIGNING_SECRET=SECRET,
                        SLACK_API_URL=fakes.slack_api_url, AUTOCODE_SANDBOX_UID_BASE=str(UID_BASE),
                        AUTOCODE_SANDBOX_MAX_WORKERS="64", AUTOCODE_STEP_TIMEOUT="60")
        serve = Serve(env, directory / "serve.log", directory)
        database = directory / "autocode.db"
        bare = BareApp(fakes.slack_api_url, directory / "bare.log")
        def idle() -> bool:
            """No run queued or running, every answer posted, then 2 s for the logs and status clears that follow
            (so one round's Slack traffic does not land in the next round's burst)."""
            if db_rows(database, "SELECT id FROM runs WHERE status IN ('queued', 'running') OR "
                                 "reply_to_json NOT LIKE '%\"delivered\": true%' LIMIT 1"):
                return False
            time.sleep(2.0)
            return True

        try:
            serve.wait_ready()
            bare.wait_ready()
            for name, url in (("bare", bare.url), ("autocode", serve.url)):  # warm-up: auth.test, imports
                for workload in workloads:
                    asyncio.run(burst(url, f"{name}-warm-{workload}", 0, 3, 0, workload))
            wait_for(idle, 60, what="the warm-up runs")
            for round_no in range(1, args.rounds + 1):
                for workload in workloads:
                    for name, url in (("bare", bare.url), ("autocode", serve.url)):
                        label = f"{name}-{workload}"
                        number = round_no * 10 + workloads.index(workload)  # its own threads and channels
                        values, codes = asyncio.run(burst(url, label, number, args.burst, args.busy, workload))
                        latencies[workload][name] += values
                        statuses[workload][name] += codes
                    wait_for(idle, 180, what="the round's runs")
            runs = db_rows(database, "SELECT status, COUNT(*) AS n FROM runs GROUP BY status")
        finally:
            serve.close()
            bare.close()
    finally:
        fakes.close()

    report: dict[str, Any] = {"machine": f"{os.cpu_count()} cores, {platform.system()} {platform.release()}, "
                                         f"CPython {platform.python_version()}",
                              "runs": {row["status"]: row["n"] for row in runs}, "workloads": {}}
    checks = []
    for workload in workloads:
        part: dict[str, Any] = {name: summary(values) for name, values in latencies[workload].items()}
        part["non_200"] = {name: sum(1 for c in codes if c != 200) for name, codes in statuses[workload].items()}
        ratio = part["autocode"]["p99_ms"] / part["bare"]["p99_ms"]
        part["p99_ratio"] = ratio
        report["workloads"][workload] = part
        checks += [
            (f"{workload}: p99 vs bare Bolt app", f"<= {TARGET_FACTOR}x", f"{ratio:.2f}x", ratio <= TARGET_FACTOR),
            (f"{workload}: max ack latency", f"<= {TARGET_MAX_S:.0f} s", f"{part['autocode']['max_ms'] / 1000:.2f} s",
             part["autocode"]["max_ms"] <= TARGET_MAX_S * 1000),
            (f"{workload}: every request 200", "0 others", str(part["non_200"]["autocode"]),
             part["non_200"]["autocode"] == 0),
        ]
    report["checks"] = [{"target": t, "limit": limit, "measured": m, "ok": ok} for t, limit, m, ok in checks]
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"== Slack ack latency: {args.rounds} rounds x {args.burst} concurrent signed requests "
          f"(+{args.busy} long runs each) — {report['machine']}")
    print(f"{'workload':<11}{'app':<10}{'n':>5}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}")
    for workload in workloads:
        for name in ("bare", "autocode"):
            s = report["workloads"][workload][name]
            print(f"{workload:<11}{name:<10}{s['n']:>5}{s['p50_ms']:>9.1f}{s['p99_ms']:>9.1f}{s['max_ms']:>9.1f}")
    print(f"autocode runs: {report['runs']}")
    print(f"{'target':<36}{'limit':<12}{'measured':<12}")
    for target, limit, measured, ok in checks:
        print(f"{target:<36}{limit:<12}{measured:<12}{'PASS' if ok else 'MISS'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
