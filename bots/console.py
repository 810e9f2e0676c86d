"""Console adapter: progress lines for run events, and a local chat loop.

Everything a run can influence (tool names, step errors, evaluator text, answers) goes through
`agent_core.terminal.safe_for_terminal` before it is printed: a progress line is one line, whatever it holds.
"""

from __future__ import annotations

import asyncio
import sys
from typing import TextIO

from agent_core.events import (
    ApprovalDecided, ApprovalRequested, EvaluationDone, LLMWaitOver, LLMWaiting, PlanReady, RepairPlanned, RunEvent,
    RunFinished, RunStarted, StepFinished, StepStarted,
)
from agent_core.loop import Agent
from agent_core.terminal import safe_for_terminal


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
            case LLMWaiting() | LLMWaitOver():
                return f"· {event.describe()}"  # "· waiting for the LLM (planner)… 15 s, retry 2 of 3 (HTTP 429)"
            case ApprovalRequested(tool=tool, arguments=arguments):
                return f"· {tool} needs your approval: {arguments}"
            case ApprovalDecided(tool=tool, decision=decision, by=by):
                return f"· {tool}: {decision}{' by ' + by if by else ''}"
            case RunFinished(status=status, usage=usage):
                return (f"· run {status}: {usage.get('llm_calls', 0)} LLM calls, "
                        f"{usage.get('prompt_tokens', 0)}+{usage.get('completion_tokens', 0)} tokens")
        return None


class ConsoleApprovals:
    """Asks on the terminal when a run's step calls a `confirm` tool: "Approve? [y/N]"; anything but y/yes (and an
    end of input, e.g. `autocode run` in a pipeline) is a denial. The request itself is printed by ConsoleRenderer."""

    def __init__(self, agent: Agent, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stderr, user: str = "console"):
        self.agent, self.stdin, self.stdout, self.user = agent, stdin, stdout, user

    async def __call__(self, event: RunEvent) -> None:
        if not isinstance(event, ApprovalRequested):
            return
        print(safe_for_terminal(f"Approve {event.tool}? [y/N] ", single_line=True), end="", file=self.stdout,
              flush=True)
        line = await asyncio.get_running_loop().run_in_executor(None, self.stdin.readline)
        approve = line.strip().lower() in ("y", "yes")
        if not line:
            print("", file=self.stdout, flush=True)
        self.agent.approvals.decide(event.run_id, event.number, approve, self.user)


async def chat(agent: Agent, conversation: str, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> int:
    """A console conversation: each line is a task; /attach PATH adds a file to the next task; /reset clears the
    history and the conversation's files; /exit (or EOF) quits."""
    from pathlib import Path

    from agent_core.workspace import InputRefused, Workspace, run_with_files

    agent.events.subscribe(ConsoleRenderer(stdout))
    agent.events.subscribe(ConsoleApprovals(agent, stdin, stdout))
    print(f"AutoCode chat (conversation {conversation!r}). Type a task; /attach PATH adds a file to it; "
          "/reset clears history and files; /exit quits.", file=stdout, flush=True)
    attached: list[Path] = []
    loop = asyncio.get_running_loop()
    while True:
        print("> ", end="", file=stdout, flush=True)
        line = await loop.run_in_executor(None, stdin.readline)
        if not line:
            return 0
        task = line.strip()
        if not task:
            continue
        if task in ("/exit", "/quit"):
            return 0
        if task == "/reset":
            removed = agent.storage.clear_conversation(conversation)  # the workspace too
            attached = []
            print(f"History and files cleared ({removed} messages).", file=stdout, flush=True)
            continue
        if task.startswith("/attach"):
            path = Path(task.removeprefix("/attach").strip()).expanduser()
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
