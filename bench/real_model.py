"""AutoCode against a real OpenAI-compatible model server (issue 20): a fixed list of tasks, run the way a user runs
them, with what a user must be able to rely on checked for each.

Each task is one `autocode run … --json` subprocess (`python -m agent_core.cli` of this checkout), all of them
against one temporary database, one at a time, with OPENAI_BASE_URL / AUTOCODE_MODEL pointing at the server. One-off
tasks use no `--conversation` (as a user types them); the follow-up is two runs in one `--conversation`. Every run
gets a hard wall-clock limit (killed past it, recorded as "killed at N s") so the bench always ends.

Per run: status, wall time, LLM calls, tokens, whether the status was honest (a `succeeded` run has every step of
its final iteration ok, or is a direct answer with no steps), the sentence the user got on failure, and whether a
"did not answer" failure came while the server was writing (llama-server's GET /slots, polled during the run).
After all runs: any conversation history (the `messages` table) holding error text.

    bench/llama_server.sh start 8088        # prints BASE_URL=… and MODEL=…
    python bench/real_model.py --base-url http://127.0.0.1:8088/v1 --model MODEL_PATH --out /tmp/real.json

The model the package registry ships (SmolLM2-135M-Instruct) is weak: wrong answers are expected and only shown
("answer ok" column); speed and honesty are what is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# Text that must never reach a conversation's history: error sentences, addresses, setting names.
HISTORY_MARKERS = ("did not answer", "http://", "https://", "AUTOCODE_", "OPENAI_", "Traceback", "127.0.0.1",
                   "Error code:", "HTTP 4", "HTTP 5")
UID_BASE = 78000  # sandbox uids of its own (tests and other benches use 61000-76000, 80000-97000)
CSV_NAME = "sales.csv"
CSV_TEXT = "region,month,amount\nNorth,Jan,120\nSouth,Jan,80\nNorth,Feb,150\nSouth,Feb,95\nEast,Feb,55\n"


@dataclass(frozen=True)
class Task:
    name: str
    prompt: str
    expect: str = ""  # a substring a right answer contains (shown, never required)
    conversation: str | None = None  # None: a plain `autocode run` (no --conversation)
    file: bool = False  # give it the bench's CSV with --file


TASKS: tuple[Task, ...] = (
    Task("greeting", "hi there"),
    Task("thanks", "thanks!"),
    Task("arithmetic", "what is 17 * 23?", expect="391"),
    Task("primes", "list the first 20 prime numbers", expect="71"),
    Task("csv_sum", f"what is the total of the amount column in {CSV_NAME}?", expect="500", file=True),
    Task("followup_1", "what is 12 + 30?", expect="42", conversation="bench-followup"),
    Task("followup_2", "now multiply that by 2", expect="84", conversation="bench-followup"),
)
GROUPS = {"followup": ("followup_1", "followup_2")}  # --tasks followup runs both turns


@dataclass
class Row:
    task: str
    status: str = ""  # succeeded | failed | cancelled | killed | crashed
    exit_code: int | None = None
    wall_s: float = 0.0
    run_id: str | None = None
    iterations: int | None = None
    steps: int = 0
    final_steps_ok: bool | None = None
    honest: bool | None = None  # None: no verdict to judge (killed, crashed)
    llm_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    llm_errors: list[str] = field(default_factory=list)
    answer: str = ""
    answer_ok: bool | None = None
    user_sentence: str = ""  # what the user got on failure
    said_no_answer: bool = False
    server_writing: bool | None = None  # llama-server was generating during the run (None: unknown)
    max_decoded: int = 0  # most tokens one slot had generated at a poll
    no_answer_while_writing: bool = False


# ------------------------------------------------------------------------------------------ the server


def _root_url(base_url: str) -> str:
    return base_url.rstrip("/").removesuffix("/v1")


def _get_json(url: str, timeout: float = 3.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def server_speed(base_url: str, model: str, api_key: str) -> dict[str, Any]:
    """One small completion (128 tokens at most) to measure the server's tokens/s right now."""
    body = json.dumps({"model": model, "max_tokens": 128, "temperature": 0,
                       "messages": [{"role": "user", "content": "Count from 1 to 200, separated by commas."}]})
    request = urllib.request.Request(base_url.rstrip("/") + "/chat/completions", data=body.encode(),
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {api_key}"})
    start = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            reply = json.loads(response.read())
    except Exception as exc:  # the bench still runs; the table says the speed is unknown
        return {"error": f"{type(exc).__name__}: {exc}"}
    wall = time.monotonic() - start
    tokens = (reply.get("usage") or {}).get("completion_tokens") or 0
    timings = reply.get("timings") or {}  # llama-server's own figures
    return {"completion_tokens": tokens, "wall_s": round(wall, 2),
            "tokens_per_s": round(timings.get("predicted_per_second") or tokens / wall, 1),
            "prompt_tokens_per_s": round(timings["prompt_per_second"], 1) if "prompt_per_second" in timings
            else None}


class SlotWatch:
    """Polls llama-server's GET /slots while a run goes on: was any slot generating, and how far did it get?
    Other servers have no /slots: `writing` stays None (unknown)."""

    def __init__(self, base_url: str, interval: float = 1.0) -> None:
        self.url = _root_url(base_url) + "/slots"
        self.interval = interval
        self.writing: bool | None = None
        self.max_decoded = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> "SlotWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                slots = _get_json(self.url, timeout=2)
            except Exception:
                slots = None
            if isinstance(slots, list):
                self.writing = bool(self.writing)
                for slot in slots:
                    next_token = slot.get("next_token") or [{}]
                    decoded = int((next_token[0] if isinstance(next_token, list) else next_token).get("n_decoded")
                                  or 0)
                    if slot.get("is_processing") and decoded > 0:
                        self.writing = True
                        self.max_decoded = max(self.max_decoded, decoded)
            self._stop.wait(self.interval)


# ------------------------------------------------------------------------------------------ one run


def cli_env(base_url: str, model: str, api_key: str, db: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The product's environment: this checkout's code, the server, a private database and sandbox uids."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "AUTOCODE_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))
    env.update(OPENAI_BASE_URL=base_url, OPENAI_API_KEY=api_key, AUTOCODE_MODEL=model, AUTOCODE_DB=str(db),
               AUTOCODE_SANDBOX_UID_BASE=str(UID_BASE), AUTOCODE_SANDBOX_MAX_WORKERS="16")
    env.update(extra or {})
    return env


def _db_rows(db: Path, sql: str, params: tuple = ()) -> list[dict[str, Any]]:
    if not db.exists():
        return []
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(sql, params)]
    except sqlite3.OperationalError:  # no tables yet
        return []
    finally:
        conn.close()


def run_task(task: Task, *, base_url: str, model: str, api_key: str, db: Path, workdir: Path,
             limit: float, extra_env: dict[str, str] | None = None) -> Row:
    """Run one task as `autocode run --json`, killed after `limit` seconds; judge it from the database."""
    row = Row(task.name)
    argv = [sys.executable, "-m", "agent_core.cli", "run", task.prompt, "--json"]
    if task.conversation:
        argv += ["--conversation", task.conversation]
    if task.file:
        csv = workdir / CSV_NAME
        csv.write_text(CSV_TEXT)
        argv += ["--file", str(csv)]
    known = {r["id"] for r in _db_rows(db, "SELECT id FROM runs")}
    start = time.monotonic()
    with SlotWatch(base_url) as watch:
        proc = subprocess.Popen(argv, cwd=workdir, env=cli_env(base_url, model, api_key, db, extra_env),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=limit)
            row.exit_code = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            row.status = "killed"
        row.wall_s = round(time.monotonic() - start, 1)
    row.server_writing, row.max_decoded = watch.writing, watch.max_decoded
    if row.status == "killed":
        row.user_sentence = f"killed at {row.wall_s:.0f} s"
    result: dict[str, Any] = {}
    try:
        result = json.loads(out) if out.strip() else {}
    except ValueError:
        pass
    new = [r for r in _db_rows(db, "SELECT * FROM runs ORDER BY seq, created_at") if r["id"] not in known]
    run = new[-1] if new else None
    if run is None:
        if not row.status:
            row.status = "crashed"
            row.user_sentence = (err.strip().splitlines() or [f"exit {proc.returncode}, no output"])[-1][:300]
        return row
    if not row.status:
        row.status = result.get("status") or run["status"] or "crashed"
        row.user_sentence = "" if row.status == "succeeded" else (result.get("error") or run["error"] or
                                                                  err.strip()[-300:])
    row.answer = (result.get("answer") if result else run["answer"]) or ""
    judge(db, run, row, task.expect)
    return row


def judge(db: Path, run: dict[str, Any], row: Row, expect: str = "") -> Row:
    """Fill in what the database says of `run`: its steps, whether its status is honest (a `succeeded` run has
    every step of its final iteration ok, or no steps at all: a direct answer), its LLM calls and tokens, and
    whether it said "did not answer" (while the server was writing, when `row.server_writing`)."""
    row.run_id = run["id"]
    row.status = row.status or run["status"]
    row.iterations = run["iterations"]
    steps = _db_rows(db, "SELECT iteration, status FROM steps WHERE run_id = ?", (run["id"],))
    row.steps = len(steps)
    if steps:
        last = max(s["iteration"] or 0 for s in steps)
        row.final_steps_ok = all(s["status"] == "ok" for s in steps if (s["iteration"] or 0) == last)
    if row.status == "succeeded":
        row.honest = not steps or bool(row.final_steps_ok)
    elif row.status in ("failed", "cancelled"):
        row.honest = True  # a failure told as a failure
    calls = _db_rows(db, "SELECT prompt_tokens, completion_tokens, error FROM llm_calls WHERE run_id = ?",
                     (run["id"],))
    row.llm_calls = len(calls)
    row.prompt_tokens = sum(c["prompt_tokens"] or 0 for c in calls)
    row.completion_tokens = sum(c["completion_tokens"] or 0 for c in calls)
    row.llm_errors = [c["error"][:200] for c in calls if c["error"]]
    if expect and row.status != "killed":
        row.answer_ok = expect in row.answer
    row.said_no_answer = "did not answer" in " ".join([row.user_sentence or "", *row.llm_errors])
    row.no_answer_while_writing = row.said_no_answer and bool(row.server_writing)
    return row


def history_findings(db: Path) -> list[dict[str, str]]:
    """Messages of any conversation holding error text: one of HISTORY_MARKERS, or the error its run ended with."""
    errors = {r["id"]: r["error"] for r in _db_rows(db, "SELECT id, error FROM runs WHERE error IS NOT NULL")}
    found = []
    for m in _db_rows(db, "SELECT conversation, role, text, run_id FROM messages ORDER BY id"):
        text = m["text"] or ""
        hits = [marker for marker in HISTORY_MARKERS if marker.lower() in text.lower()]
        error = (errors.get(m["run_id"]) or "").strip()
        if m["role"] != "user" and len(error) >= 20 and error[:200] in text:
            hits.append("the run's error")
        if hits:
            found.append({"conversation": m["conversation"], "role": m["role"], "run_id": m["run_id"] or "",
                          "markers": ", ".join(hits), "text": text[:200]})
    return found


# ------------------------------------------------------------------------------------------ the bench


def pick(names: str | None) -> list[Task]:
    if not names:
        return list(TASKS)
    wanted: list[str] = []
    for name in (n.strip() for n in names.split(",") if n.strip()):
        wanted += GROUPS.get(name, (name,))
    unknown = set(wanted) - {t.name for t in TASKS}
    if unknown:
        raise SystemExit(f"unknown task(s): {', '.join(sorted(unknown))}; known: "
                         f"{', '.join([t.name for t in TASKS] + list(GROUPS))}")
    return [t for t in TASKS if t.name in wanted]


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def table(rows: list[Row]) -> str:
    head = ("task", "status", "wall s", "calls", "tokens in+out", "honest", "answer ok", "writing", "user got")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        honest = "-" if r.honest is None else ("yes" if r.honest else "**NO**")
        ok = "-" if r.answer_ok is None else ("yes" if r.answer_ok else "no")
        writing = "?" if r.server_writing is None else (f"yes ({r.max_decoded} tok)" if r.server_writing else "no")
        said = (r.user_sentence or "").replace("|", "/").replace("\n", " ")[:140]
        lines.append(" | ".join((r.task, r.status, f"{r.wall_s:.1f}", str(r.llm_calls),
                                 f"{r.prompt_tokens}+{r.completion_tokens}", honest, ok, writing, said)))
    return "\n".join("| " + line + " |" for line in lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", required=True, help="the server's OpenAI-compatible URL, ending in /v1")
    parser.add_argument("--model", required=True, help="the model name (llama-server: the path in GET /v1/models)")
    parser.add_argument("--api-key", default="sk-local", help="sent as OPENAI_API_KEY (local servers ignore it)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--tasks", help="comma list of task names (default all): " +
                        ", ".join([t.name for t in TASKS] + list(GROUPS)))
    parser.add_argument("--limit", type=float, default=240.0, help="seconds one run may take before it is killed")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra environment for the product (e.g. AUTOCODE_LLM_DEADLINE=60), repeatable")
    args = parser.parse_args(argv)
    extra = dict(item.split("=", 1) for item in args.env)
    tasks = pick(args.tasks)

    machine = {"cores": os.cpu_count(), "load_before": _load(), "python": sys.version.split()[0],
               "base_url": args.base_url, "model": args.model, "limit_s": args.limit}
    print(f"{len(tasks)} runs against {args.base_url} ({args.model}); load {machine['load_before']}",
          file=sys.stderr)
    machine["speed_before"] = server_speed(args.base_url, args.model, args.api_key)
    print(f"server speed: {machine['speed_before']}", file=sys.stderr)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="autocode-real-model-") as tmp:
        work = Path(tmp)
        db = work / "bench.db"
        started = time.monotonic()
        for task in tasks:  # one at a time: parallel runs share the server's one context and its cores
            row = run_task(task, base_url=args.base_url, model=args.model, api_key=args.api_key, db=db,
                           workdir=work, limit=args.limit, extra_env=extra)
            rows.append(row)
            print(f"{row.task}: {row.status} in {row.wall_s:.1f} s, {row.llm_calls} calls, "
                  f"{row.prompt_tokens}+{row.completion_tokens} tokens, honest={row.honest}"
                  + (f", user got: {row.user_sentence[:160]}" if row.user_sentence else ""), file=sys.stderr)
        total = time.monotonic() - started
        findings = history_findings(db)
    machine["load_after"] = _load()
    machine["speed_after"] = server_speed(args.base_url, args.model, args.api_key)
    summary = {
        "runs": len(rows),
        "within_90s": sum(r.status != "killed" and r.wall_s <= 90 for r in rows),
        "dishonest_successes": sum(r.honest is False for r in rows),
        "killed": sum(r.status == "killed" for r in rows),
        "no_answer_while_writing": sum(r.no_answer_while_writing for r in rows),
        "history_messages_with_error_text": len(findings),
        "total_s": round(total, 1),
    }
    print(table(rows))
    print(f"\nmachine: {machine}")
    print(f"summary: {summary}")
    for f in findings:
        print(f"history [{f['conversation']}] {f['role']} ({f['markers']}): {f['text'][:160]!r}")
    if args.out:
        args.out.write_text(json.dumps({"machine": machine, "summary": summary, "rows": [asdict(r) for r in rows],
                                        "history_findings": findings}, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
