"""The execution log of a finished run, as the chat adapters post it: one short summary and one detail document.

A channel should read as questions and answers, so the answer replaces the run's progress message and the thread
gets the log as **one** message: the steps with status and duration, the evaluator's verdicts, the approvals, the
tokens and their cost, and the settings the run had (`RunLog`, which each adapter renders in its own markup). The
detail that would make that message long (each step's code, output, stdout, stderr, error and traceback) goes into
one Markdown file attached to it (`RunLog.document`), and is also on the run page when the viewer is on.

Everything here is platform-neutral text taken from storage: user text and generated code's output are untrusted,
so the renderers escape every field for their surface (Slack mrkdwn, Telegram HTML).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import logging

from agent_core.answer_check import stored_unsupported
from agent_core import call_text
from agent_core.channel_settings import run_settings
from agent_core.config import ConfigError, Settings
from agent_core.pricing import PriceTable, prices_for, spend
from storage.db import Storage

log = logging.getLogger(__name__)

# A document bigger than this is cut (labelled) at the end: the run page and `autocode show` keep the whole run.
DOCUMENT_MAX_CHARS = 2_000_000
LOG_CALL_CHARS = 2000  # an approved or denied call in the log: every argument named, long values clipped in the middle


@dataclass(frozen=True)
class StepSummary:
    """One step as the summary shows it."""

    iteration: int
    number: int  # 1-based position in its iteration's plan
    name: str
    status: str  # ok | failed | timeout | … (as stored)
    duration_ms: int
    error: str = ""


@dataclass(frozen=True)
class VerdictSummary:
    """The evaluator's judgement of one iteration."""

    iteration: int
    satisfactory: bool
    thoughts: str
    retry_from: str | None = None


@dataclass(frozen=True)
class ApprovalSummary:
    """A `confirm` tool call and its decision."""

    number: int
    tool: str
    status: str  # approved | denied | timeout | cancelled | interrupted | pending
    decided_by: str = ""
    decided_at: str = ""


@dataclass(frozen=True)
class RunLog:
    """What the thread shows of a finished run."""

    run_id: str
    task: str
    status: str
    steps: list[StepSummary] = field(default_factory=list)
    verdicts: list[VerdictSummary] = field(default_factory=list)
    approvals: list[ApprovalSummary] = field(default_factory=list)
    llm_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    by_purpose: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # purpose -> (calls, prompt, completion)
    cost: str | None = None  # e.g. "$0.0042", "no price (llama3.1:8b)"; None: no price table given
    settings: str | None = None  # the effective settings' one line; None for a run from before settings
    unsupported: list[str] = field(default_factory=list)  # numbers of the answer no step produced (issue 20)
    instructions: str = ""  # the channel's own instructions the run was given (clean text), "": none
    document: str = ""  # Markdown: the summary, then every step in full

    @property
    def filename(self) -> str:
        return f"run-{self.run_id}-log.md"

    @property
    def worth_posting(self) -> bool:
        """False for a direct answer ("thanks!", a question about the last answer: one planner call and the
        answer, nothing more to show; a log under every one-line reply would bury a shared channel's answers) and
        for a run that made no LLM call (cancelled while queued). A run stopped or failed after calling the LLM
        keeps its log even with no step stored (a step cancelled mid-way is not): what it planned and spent."""
        if self.steps or self.verdicts:
            return True
        return bool(self.llm_calls) and self.status != "succeeded"

    def tokens_line(self) -> str:
        """E.g. "3 LLM calls · 1,204 + 310 tokens · $0.0004 (planner 1× (900+200), evaluator 2× (…))"."""
        calls = f"{self.llm_calls} LLM call{'' if self.llm_calls == 1 else 's'}"
        text = f"{calls} · {self.prompt_tokens:,} + {self.completion_tokens:,} tokens"
        if self.cost:
            text += f" · {self.cost}"
        if self.by_purpose:
            text += " (" + ", ".join(f"{purpose} {n}× ({p:,}+{c:,})"
                                     for purpose, (n, p, c) in self.by_purpose.items()) + ")"
        return text

    def unsupported_line(self) -> str | None:
        """E.g. "Not found in any step's output: 41.7, 1,200" (a warning, agent_core/answer_check.py)."""
        if not self.unsupported:
            return None
        return "Not found in any step's output: " + ", ".join(self.unsupported)


def step_summary(step: dict[str, Any]) -> StepSummary:
    return StepSummary(int(step.get("iteration") or 0), int(step.get("position") or 0) + 1,
                       str(step.get("tool_name") or "?"), str(step.get("status") or "?"),
                       int(step.get("duration_ms") or 0), str(step.get("error") or ""))


def run_log(storage: Storage, run_id: str, prices: PriceTable | None = None) -> RunLog | None:
    """The log of a stored run (None when there is no such run)."""
    run = storage.get_run(run_id)
    if run is None:
        return None
    steps = storage.steps(run_id)
    evaluations = storage.evaluations(run_id)
    calls = storage.llm_calls(run_id)
    usage = storage.usage(run_id)
    by_purpose: dict[str, tuple[int, int, int]] = {}
    for call in calls:
        n, p, c = by_purpose.get(call["purpose"] or "other", (0, 0, 0))
        by_purpose[call["purpose"] or "other"] = (n + 1, p + (call["prompt_tokens"] or 0),
                                                  c + (call["completion_tokens"] or 0))
    effective = run_settings(run)
    settings = effective.describe() if effective is not None else None
    if settings and run.get("routine_id"):  # a routine's run (agent_core/routines.py): which, with which plan
        settings += f" · routine {run['routine_id']}, " + (
            f"plan version {run['plan_version']}" if run.get("plan_version") else "planned")
    summary = RunLog(
        run_id=run_id, task=run.get("task") or "", status=run.get("status") or "?",
        steps=[step_summary(s) for s in steps],
        verdicts=[VerdictSummary(int(e["iteration"]), bool(e["satisfactory"]), e.get("thoughts") or "",
                                 e.get("retry_from")) for e in evaluations],
        approvals=[ApprovalSummary(int(a["number"]), str(a.get("tool") or ""), str(a.get("status") or ""),
                                   a.get("decided_by") or "", a.get("decided_at") or "")
                   for a in storage.approvals(run_id)],
        llm_calls=int(usage.get("llm_calls", 0)), prompt_tokens=int(usage.get("prompt_tokens", 0)),
        completion_tokens=int(usage.get("completion_tokens", 0)), by_purpose=by_purpose,
        cost=spend(storage, prices, run_id=run_id).describe() if prices is not None else None,
        settings=settings, unsupported=stored_unsupported(run),
        instructions=effective.instructions if effective is not None else "",
    )
    return _with_document(summary, run, steps, storage.approvals(run_id), storage.mcp_calls(run_id))


def log_to_post(storage: Storage, settings: Settings, run_id: str) -> RunLog | None:
    """The log an adapter posts when a run ends, priced with the operator's table (an unreadable table costs the
    log its prices, not the log itself); None when there is nothing worth posting (`RunLog.worth_posting`)."""
    try:
        prices: PriceTable | None = prices_for(settings)
    except ConfigError as exc:
        log.warning("no prices for the log of run %s: %s", run_id, exc)
        prices = None
    found = run_log(storage, run_id, prices)
    return found if found is not None and found.worth_posting else None


# ---------------------------------------------------------------------------------------------- the document


def output_text(output_json: str | None) -> str:
    """A step's stored output, pretty-printed when it is JSON."""
    if output_json is None:
        return ""
    try:
        return json.dumps(json.loads(output_json), indent=2, ensure_ascii=False)
    except ValueError:
        return output_json


def step_sections(step: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(label, language, body) of what a step left: code, output, stdout, stderr, error and traceback."""
    sections = [("Code", "python", step.get("code") or "")]
    for label, language, body in (("Output", "json", output_text(step.get("output_json"))),
                                  ("stdout", "", step.get("stdout") or ""), ("stderr", "", step.get("stderr") or ""),
                                  ("Error", "", step.get("error") or ""),
                                  ("Traceback", "", step.get("traceback") or "")):
        if body.strip():
            sections.append((label, language, body.rstrip()))
    return sections


def _fence(body: str) -> str:
    """A backtick fence longer than any run of backticks in `body`, so no output can close it early."""
    longest, run = 0, 0
    for char in body:
        run = run + 1 if char == "`" else 0
        longest = max(longest, run)
    return "`" * max(3, longest + 1)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _with_document(log: RunLog, run: dict[str, Any], steps: list[dict[str, Any]],
                   approvals: list[dict[str, Any]], mcp_calls: list[dict[str, Any]] = ()) -> RunLog:
    out = [f"# Execution log of run {log.run_id}", "", f"- Task: {_one_line(log.task)}", f"- Status: {log.status}"]
    if log.settings:
        out.append(f"- Settings: {log.settings}")
    out.append(f"- Usage: {log.tokens_line()}")
    if log.instructions:  # what the planner and the evaluator were told about the team's data
        fence = _fence(log.instructions)
        out += ["- The channel's instructions:", "", f"{fence}text", log.instructions, fence, ""]
    if log.unsupported_line():
        out.append(f"- Warning: {log.unsupported_line()}")
    if run.get("error"):
        out.append(f"- Error: {_one_line(run['error'])}")
    verdicts = {v.iteration: v for v in log.verdicts}
    for iteration in sorted({int(s.get("iteration") or 0) for s in steps} | set(verdicts)):
        out += ["", f"## Iteration {iteration}"]
        for step in (s for s in steps if int(s.get("iteration") or 0) == iteration):
            summary = step_summary(step)
            out += ["", f"### Step {iteration}.{summary.number} {summary.name} — {summary.status}, "
                        f"{summary.duration_ms} ms"]
            if step.get("description"):
                out += ["", _one_line(step["description"])]
            for label, language, body in step_sections(step):
                fence = _fence(body)
                out += ["", f"{label}:", "", f"{fence}{language}", body, fence]
        verdict = verdicts.get(iteration)
        if verdict is not None:
            mark = "satisfactory" if verdict.satisfactory else "not satisfactory"
            retry = f" (retry from {verdict.retry_from})" if verdict.retry_from else ""
            out += ["", f"Evaluator: {mark}{retry} — {_one_line(verdict.thoughts)}"]
    if mcp_calls:  # what steps asked of MCP servers (arguments and result clipped, as stored)
        out += ["", "## MCP tool calls"]
        for number, call in enumerate(mcp_calls, 1):
            outcome = "ok" if call.get("ok") else f"error: {_one_line(str(call.get('error') or ''))[:300]}"
            out += ["", f"- #{number} {call.get('server')}.{call.get('tool')} ({call.get('duration_ms')} ms): {outcome}",
                    f"  arguments: {_one_line(str(call.get('arguments') or ''))[:500]}"]
            if call.get("ok"):
                out.append(f"  result: {_one_line(str(call.get('result_text') or ''))[:500]}")
    if approvals:
        out += ["", "## Approvals"]
        for approval in approvals:
            who = f" by {approval['decided_by']}" if approval.get("decided_by") else ""
            out += ["", f"- #{approval['number']} {approval.get('tool') or ''}: {approval.get('status')}{who} "
                        f"({approval.get('decided_at') or 'waiting'})",
                    "  arguments: " + _one_line(call_text.fit_stored(
                        approval.get("tool") or "", approval.get("call_json"), str(approval.get("arguments") or ""),
                        LOG_CALL_CHARS))]
    document = "\n".join(out) + "\n"
    if len(document) > DOCUMENT_MAX_CHARS:
        document = document[:DOCUMENT_MAX_CHARS] + "\n\n… (cut here: the run page and `autocode show` have all)\n"
    return RunLog(**{**log.__dict__, "document": document})


__all__ = ["ApprovalSummary", "RunLog", "StepSummary", "VerdictSummary", "log_to_post", "output_text", "run_log",
           "step_sections", "step_summary"]
