"""Helpers for tests/test_server.py: `autocode serve` as a real subprocess, a fake LLM that plans from the task
text, and host-side process inspection (the sandbox uids, the server's process tree)."""

from __future__ import annotations

import ctypes
import itertools
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import httpx

from tests.fakes.openai_server import FakeOpenAI
from tests.procs import HostProcess, host_processes

ROOT = Path(__file__).resolve().parent.parent
# A uid range of this test process's own, above the ranges test_escapes.py (61064…65160) and test_sandbox.py
# (63000…69400) use, so that concurrent test sessions never look at (or kill) each other's sandbox processes.
# Each server started by this process gets its own slice of SLICE uids (servers may overlap in time).
SLICE, SLICES = 8, 8
UID_BASE = 70000 + SLICE * SLICES * (os.getpid() % 400)
UIDS = range(UID_BASE, UID_BASE + SLICE * SLICES)
_slices = itertools.count()
_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded before any fork: the child only calls prctl
PR_SET_PDEATHSIG = 1


def _die_with_the_tests() -> None:
    """In the server child: SIGKILL it if the test process dies (bwrap --die-with-parent does the rest)."""
    _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def next_uid_base() -> int:
    return UID_BASE + SLICE * (next(_slices) % SLICES)


# ------------------------------------------------------------------------------------------ polling


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.05, what: str = "condition") -> Any:
    """Poll `predicate` until it returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------------------------------ the fake LLM

# Task text mini-language, read by the fake planner: "job tag=A sleep=0.5 spawn=60 llmdelay=1 tokens=12".
#   tag=X       the step returns {"tag": "X"} and the evaluator answers "tag X"
#   sleep=S     the step sleeps S seconds
#   spawn=S     the step starts a child `sleep <S>.<marker>` and then sleeps S seconds itself
#   llmdelay=S  the planner reply is delayed by S seconds
#   llmwrite=S  the planner reply is written (streamed) over about S seconds, as a slow model writes it
#   tokens=N    every LLM reply of the run reports N prompt + N completion tokens
_OPTION = re.compile(r"\b(tag|sleep|spawn|llmdelay|llmwrite|tokens|mail)=(\S+)")
_TASK_LINE = re.compile(r"^Task: (.*)$", re.MULTILINE)
_OUTPUT_LINE = re.compile(r"^output: (.*)$", re.MULTILINE)


def task_options(task: str) -> dict[str, str]:
    return dict(_OPTION.findall(task))


def spawn_marker(seconds: str) -> str:
    """The argument of the child `sleep` a `spawn=` step starts: unique to this test process."""
    return f"{seconds}.{os.getpid() % 100000:05d}"


def step_code(options: dict[str, str]) -> str:
    lines = ["def work():", "    import subprocess, time"]
    if "spawn" in options:
        lines.append(f"    subprocess.Popen(['sleep', '{spawn_marker(options['spawn'])}'])")
        lines.append(f"    time.sleep({float(options['spawn'])})")
    if "mail" in options:  # a trusted tool with a side effect (tests/server_helpers.MAIL_TOOLS), then the rest
        lines.append(f"    send_email({options.get('tag', '-')!r}, {options['mail']!r})")
    if "sleep" in options:
        lines.append(f"    time.sleep({float(options['sleep'])})")
    lines.append(f"    return {{'tag': {options.get('tag', '-')!r}}}")
    return "\n".join(lines) + "\n"


# An exact tool whose every call is a line in SENT ("job … mail=SUBJECT" calls it); a subject "slowN" makes the
# call itself take N seconds (after its line is written: the side effect happened, its result not yet back).
MAIL_TOOLS = '''
SENT = {sent!r}

TOOLS = [{{
    "lib_names": [],
    "instructions": "Send an email.",
    "use_exactly_code_example": True,
    "code_example": """
def send_email(to: str, subject: str) -> dict:
    import json, os, time
    with open(SENT, "a") as out:
        out.write(json.dumps({{"to": to, "subject": subject, "pid": os.getpid()}}) + "\\\\n")
    if subject.startswith("slow"):
        time.sleep(float(subject[4:]))
    return {{"sent": True}}
""".replace("SENT", repr(SENT)),
}}]
'''


def mail_tools(directory: Path) -> tuple[Path, Path]:
    """(the tools file for AUTOCODE_TOOLS, the file each send_email call appends a line to)."""
    sent, tools = directory / "sent.jsonl", directory / "mail_tools.py"
    tools.write_text(MAIL_TOOLS.format(sent=str(sent)))
    return tools, sent


def sent_mail(sent: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in sent.read_text().splitlines()] if sent.exists() else []


@dataclass
class LLMRequest:
    at: float  # time.monotonic() when the request arrived
    kind: str  # plan | evaluation | other
    task: str


class ScriptedLLM:
    """A FakeOpenAI whose responder plans one step from the task text and accepts whatever output it sees."""

    def __init__(self) -> None:
        self.fake = FakeOpenAI()
        self.log: list[LLMRequest] = []
        self._lock = threading.Lock()
        self.fake.responder(self._respond)

    def __enter__(self) -> "ScriptedLLM":
        self.fake.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.fake.stop()

    @property
    def base_url(self) -> str:
        return self.fake.base_url

    def requests_of(self, kind: str, task_contains: str = "") -> list[LLMRequest]:
        with self._lock:
            return [r for r in self.log if r.kind == kind and task_contains in r.task]

    def _respond(self, body: dict[str, Any]) -> dict[str, Any]:
        fmt = body.get("response_format") or {}
        kind = ((fmt.get("json_schema") or {}).get("name")) or "other"
        prompt = "\n".join(str(m.get("content")) for m in body.get("messages", []) if m.get("role") != "system")
        tasks = _TASK_LINE.findall(prompt)
        task = tasks[-1] if tasks else ""
        with self._lock:
            self.log.append(LLMRequest(time.monotonic(), kind, task))
        options = task_options(task)
        spec: dict[str, Any] = {}
        if "tokens" in options:
            spec["prompt_tokens"] = spec["completion_tokens"] = int(options["tokens"])
        if kind == "plan":
            spec["delay"] = float(options.get("llmdelay", 0))
            spec["json"] = {"main_task": task, "main_task_thought": "one step", "subtasks": [{
                "tool_name": "work", "input_from_tool": "", "description": "do the work", "imports": ["subprocess", "time"],
                "thought": "", "code": step_code(options)}]}
            if "llmwrite" in options:  # a chunk of four characters a token, paced over the seconds asked
                spec["token_delay"] = float(options["llmwrite"]) / (len(json.dumps(spec["json"])) / 4)
        elif kind == "evaluation":
            outputs = _OUTPUT_LINE.findall(prompt)
            answer = "no output"
            if outputs:
                try:
                    answer = f"tag {json.loads(outputs[-1])['tag']}"
                except (ValueError, KeyError, TypeError):
                    answer = f"output {outputs[-1]}"
            spec["json"] = {"satisfactory": True, "thoughts": "fine", "final_answer": answer, "retry_from": "",
                            "new_subtasks": []}
        else:
            spec["content"] = "ok"
        return spec


# ------------------------------------------------------------------------------------------ the server


class Serve:
    """One `autocode serve` subprocess on a free port, logging to a file."""

    def __init__(self, env: dict[str, str], log_path: Path, cwd: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = env
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-P", "-m", "agent_core.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            preexec_fn=_die_with_the_tests,
        )
        self.http = httpx.Client(base_url=self.url, timeout=30)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"autocode serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                response = httpx.get(f"{self.url}/healthz", timeout=5)
                if response.status_code == 200:
                    return response.json()
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"autocode serve not ready after {timeout}s:\n{self.log_tail()}")
            time.sleep(0.05)

    # --- the internal API ------------------------------------------------------------------------------
    def submit(self, task: str, conversation: str = "api", **extra: Any) -> httpx.Response:
        return self.http.post("/api/runs", json={"task": task, "conversation": conversation, **extra})

    def submit_ok(self, task: str, conversation: str = "api", **extra: Any) -> str:
        response = self.submit(task, conversation, **extra)
        assert response.status_code == 202, (response.status_code, response.text)
        body = response.json()
        assert body["status"] == "queued" and body["run_id"]
        return body["run_id"]

    def run(self, run_id: str) -> dict[str, Any]:
        response = self.http.get(f"/api/runs/{run_id}")
        assert response.status_code == 200, (response.status_code, response.text)
        return response.json()

    def wait_status(self, run_id: str, *statuses: str, timeout: float = 20) -> dict[str, Any]:
        statuses = statuses or ("succeeded", "failed", "cancelled", "interrupted")
        last: dict[str, Any] = {}

        def reached() -> bool:
            nonlocal last
            last = self.run(run_id)
            return last["status"] in statuses

        try:
            wait_for(reached, timeout, what=f"run {run_id} to be {'/'.join(statuses)}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last seen {last}\n{self.log_tail()}") from None
        return last

    # --- stopping ----------------------------------------------------------------------------------------
    def close(self) -> None:
        """Terminate (then kill) the server if still running; safe to call twice."""
        self.http.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()


def serve_env(llm: ScriptedLLM, db: Path, **overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "AUTOCODE_"))}
    # The server runs this checkout's code (a worktree), not whatever an editable install points at.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))
    env.update(
        OPENAI_BASE_URL=llm.base_url, OPENAI_API_KEY="sk-serve-test", AUTOCODE_MODEL="fake-model",
        AUTOCODE_DB=str(db), AUTOCODE_LLM_MAX_RETRIES="0", AUTOCODE_LLM_TIMEOUT="30",
        AUTOCODE_SANDBOX_UID_BASE=str(next_uid_base()), AUTOCODE_SANDBOX_MAX_WORKERS=str(SLICE),
        AUTOCODE_SANDBOX_WARM="1", AUTOCODE_SANDBOX_SLOTS="4", AUTOCODE_SHUTDOWN_GRACE="5",
        AUTOCODE_STEP_TIMEOUT="90",
        # serve's start-up LLM check would take a reply tests script for their runs; tests of it turn it on
        AUTOCODE_LLM_STARTUP_CHECK="off",
    )
    env.update(overrides)
    return env


def db_rows(db: Path, sql: str, params: tuple = ()) -> list[dict[str, Any]]:
    """Read the server's SQLite file directly (WAL: safe while the server runs)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(row) for row in conn.execute(sql, params)]
    finally:
        conn.close()


# ------------------------------------------------------------------------------------------ processes


def alive(processes: list[HostProcess]) -> list[HostProcess]:
    return [p for p in processes if p.alive]


def sandbox_processes() -> list[HostProcess]:
    """Live processes running as one of this test file's sandbox uids."""
    return alive([p for p in host_processes() if p.uid in UIDS])


def processes_with(text: str) -> list[HostProcess]:
    return alive([p for p in host_processes() if text in p.cmdline and p.pid != os.getpid()])


def descendants(pid: int) -> list[HostProcess]:
    """Every live process below `pid` in the process tree."""
    processes = host_processes()
    children: dict[int, list[HostProcess]] = {}
    for p in processes:
        children.setdefault(p.ppid, []).append(p)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child.pid)
    return alive(found)


def still_alive(snapshot: list[HostProcess]) -> list[HostProcess]:
    """Those of `snapshot` that still exist (same pid and start time), zombies excluded."""
    now = {(p.pid, p.start): p for p in alive(host_processes())}
    return [now[(p.pid, p.start)] for p in snapshot if (p.pid, p.start) in now]
