"""Console adapter: progress lines for run events, and a local chat loop.

Everything a run can influence (tool names, step errors, evaluator text, answers) goes through
`agent_core.terminal.safe_for_terminal` before it is printed: a progress line is one line, whatever it holds.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from typing import TextIO

from agent_core import call_text
from agent_core.events import (
    ApprovalDecided, ApprovalRequested, EvaluationDone, LLMWaitOver, LLMWaiting, PlanReady, RepairPlanned, RunEvent,
    RunFinished, RunStarted, StepFinished, StepStarted, WorkerWaiting,
)
from agent_core.loop import Agent
from agent_core.terminal import safe_for_terminal

CALL_CHARS = 4000  # a call waiting for approval, as the terminal shows it


class ConsoleRenderer:
    """Writes one short line per run event."""

    def __init__(self, stream: TextIO = sys.stderr):
        self.stream = stream

    def __call__(self, event: RunEvent) -> None:
        line = self.format(event)
        if line:
            print(line, file=self.stream, flush=True)

    @classmethod
    def format(cls, event: RunEvent) -> str | None:
        """The event's line, with no control characters and no line break in it (or None: not shown)."""
        line = cls._line(event)
        return None if line is None else safe_for_terminal(line, single_line=True)

    @staticmethod
    def _line(event: RunEvent) -> str | None:
        match event:
            case RunStarted(run_id=run_id):
                return f"· run {run_id} started"
            case PlanReady(steps=steps):
                return f"· plan: {' → '.join(steps)}"
            case StepStarted(iteration=it, index=i, total=n, tool_name=name):
                return f"  [{it}.{i}/{n}] {name} …"
            case StepFinished(iteration=it, index=i, total=n, tool_name=name, ok=True, duration_ms=ms):
                return f"  [{it}.{i}/{n}] {name} ok ({ms} ms)"
            case StepFinished(iteration=it, index=i, total=n, tool_name=name, error=error, duration_ms=ms):
                return f"  [{it}.{i}/{n}] {name} failed ({ms} ms): {error}"
            case EvaluationDone(satisfactory=True):
                return "· evaluator: satisfactory"
            case EvaluationDone(thoughts=thoughts):
                return f"· evaluator: not yet — {thoughts}"
            case RepairPlanned(retry_from=name, reused=reused):
                kept = f" (keeping {', '.join(reused)})" if reused else ""
                return f"· repair from {name}{kept}"
            case LLMWaiting() | LLMWaitOver() | WorkerWaiting():
                return f"· {event.describe()}"  # "· waiting for the LLM (planner)… 15 s, retry 2 of 3 (HTTP 429)"
            case ApprovalRequested(tool=tool, arguments=arguments, call=call):
                # every argument named, each long value clipped in its middle (agent_core/call_text.py)
                shown = call_text.fit(tool, list(call), CALL_CHARS) if call else arguments
                return f"· {tool} needs your approval: {shown}"
            case ApprovalDecided(tool=tool, decision="timeout"):
                return f"· {tool}: no answer in time: denied"
            case ApprovalDecided(tool=tool, decision=decision, by=by):
                return f"· {tool}: {decision}{' by ' + by if by else ''}"
            case RunFinished(status=status, usage=usage):
                return (f"· run {status}: {usage.get('llm_calls', 0)} LLM calls, "
                        f"{usage.get('prompt_tokens', 0)}+{usage.get('completion_tokens', 0)} tokens")
        return None


class ConsoleInput:
    """The terminal's lines, read by one daemon thread and handed out in order to whoever awaits `readline`: the
    chat loop between tasks, an approval prompt during one. A prompt that stops waiting (the call was decided by a
    timeout or a cancel) takes nothing, so the next line typed goes to the chat; and an unanswered read never holds
    up the program's exit (a thread-pool read would: the pool is joined at exit)."""

    def __init__(self, stdin: TextIO = sys.stdin):
        self.stdin = stdin
        self._lines: asyncio.Queue[str] | None = None
        self._ended = False

    async def readline(self) -> str:
        """The next line with its newline, or "" once the input has ended (and every time after)."""
        if self._ended:
            return ""
        if self._lines is None:
            self._lines = asyncio.Queue()
            loop, lines = asyncio.get_running_loop(), self._lines
            threading.Thread(target=self._read, args=(loop, lines), name="console-input", daemon=True).start()
        line = await self._lines.get()
        self._ended = not line
        return line

    def _read(self, loop: asyncio.AbstractEventLoop, lines: "asyncio.Queue[str]") -> None:
        while True:
            try:
                line = self.stdin.readline()
            except (OSError, ValueError):  # closed under us
                line = ""
            try:
                loop.call_soon_threadsafe(lines.put_nowait, line)
            except RuntimeError:  # the loop is gone: the program is ending
                return
            if not line:
                return


class ConsoleApprovals:
    """Asks on the terminal when a run's step calls a `confirm` tool: "Approve? [y/N]"; anything but y/yes (and an
    end of input, e.g. `autocode run` in a pipeline) is a denial. The request itself is printed by ConsoleRenderer.

    The prompt runs as a task of its own, so the approval's timeout runs while it waits (the event is delivered
    at once); a decision made elsewhere (timeout, cancel) ends the prompt without taking a line."""

    def __init__(self, agent: Agent, stdin: TextIO | ConsoleInput = sys.stdin, stdout: TextIO = sys.stderr,
                 user: str = "console"):
        self.agent, self.stdout, self.user = agent, stdout, user
        self.input = stdin if isinstance(stdin, ConsoleInput) else ConsoleInput(stdin)
        self._prompts: dict[tuple[str, int], asyncio.Task[None]] = {}

    def __call__(self, event: RunEvent) -> None:
        if isinstance(event, ApprovalRequested):
            key = (event.run_id, event.number)
            self._prompts[key] = asyncio.get_running_loop().create_task(self._ask(event), name="approval prompt")
        elif isinstance(event, ApprovalDecided):
            prompt = self._prompts.pop((event.run_id, event.number), None)
            if prompt is not None and not prompt.done():  # decided without an answer here: end the prompt line
                prompt.cancel()
                print("", file=self.stdout, flush=True)

    async def _ask(self, event: ApprovalRequested) -> None:
        print(safe_for_terminal(f"Approve {event.tool}? [y/N] ", single_line=True), end="", file=self.stdout,
              flush=True)
        line = await self.input.readline()
        if not line:
            print("", file=self.stdout, flush=True)
        self._prompts.pop((event.run_id, event.number), None)
        self.agent.approvals.decide(event.run_id, event.number, line.strip().lower() in ("y", "yes"), self.user)


CHAT_HELP = """Type a task and press Enter: AutoCode plans Python steps, runs them in a sandbox and answers.
  /attach PATH  add a file to your next task (the steps read it as inputs/NAME)
  /reset        clear this conversation's history and files
  /help         this help
  /exit         quit (or Ctrl-D)
Earlier answers and files of this conversation are seen by the next task; `autocode history --conversation KEY`
lists them."""


async def chat(agent: Agent, conversation: str, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> int:
    """A console conversation: each line is a task; /attach PATH adds a file to the next task; /reset clears the
    history and the conversation's files; /exit (or EOF) quits."""
    from pathlib import Path

    from agent_core.workspace import InputRefused, Workspace, run_with_files

    terminal = ConsoleInput(stdin)
    agent.events.subscribe(ConsoleApprovals(agent, terminal, stdout))  # first: it ends its prompt line
    agent.events.subscribe(ConsoleRenderer(stdout))
    print(f"AutoCode chat (conversation {conversation!r}). Type a task; /attach PATH adds a file to it; "
          "/reset clears history and files; /help; /exit quits.", file=stdout, flush=True)
    attached: list[Path] = []
    while True:
        print("> ", end="", file=stdout, flush=True)
        line = await terminal.readline()
        if not line:
            return 0
        task = line.strip()
        if not task:
            continue
        if task in ("/exit", "/quit"):
            return 0
        if task in ("/help", "/?"):  # answered here: never sent to the LLM as a task
            print(CHAT_HELP, file=stdout, flush=True)
            continue
        if task == "/reset":
            removed = agent.storage.clear_conversation(conversation)  # the workspace too
            attached = []
            print(f"History and files cleared ({removed} messages).", file=stdout, flush=True)
            continue
        if task.startswith("/attach"):
            given = task.removeprefix("/attach").strip()
            if not given:
                print("Give the file to attach: /attach PATH (e.g. /attach ~/sales.csv); it goes with your next "
                      "task.", file=stdout, flush=True)
                continue
            path = Path(given).expanduser()
            try:
                Workspace(agent.storage, agent.settings).admit(conversation, [*attached, path])
            except InputRefused as exc:
                print(safe_for_terminal(str(exc), single_line=True), file=stdout, flush=True)
                continue
            attached.append(path)
            print(safe_for_terminal(f"Attached {path.name}; it goes with your next task.", single_line=True),
                  file=stdout, flush=True)
            continue
        if attached:
            try:
                result = await run_with_files(agent, task, conversation, attached)
            except InputRefused as exc:  # changed since it was attached
                print(safe_for_terminal(str(exc), single_line=True), file=stdout, flush=True)
                continue
            finally:
                attached = []
        else:
            result = await agent.run(task, conversation)
        reply = result.answer or f"Sorry, that did not work: {safe_for_terminal(result.error, single_line=True)}"
        print(safe_for_terminal(reply), file=stdout, flush=True)
