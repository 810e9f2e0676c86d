"""What the Telegram chat sees of a run: the progress message, the answer in safe HTML split at line boundaries,
and the caption of the execution log's one document (bots/run_log.py) — pure functions, no network, so the rules
(4,096 characters a message, 1,024 a caption, escaping) live in one place.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field
from typing import Callable

from agent_core.events import (
    EvaluationDone, LLMWaiting, PlanReady, RepairPlanned, RunEvent, RunFinished, RunStarted, StepFinished,
    StepStarted, WorkerWaiting,
)
from agent_core import call_text
from agent_core.channel_settings import Choices, EffectiveSettings
from agent_core.pricing import format_usd
from bots.run_log import RunLog

MAX_TEXT = 4096  # Telegram's limit for a message, counted after entity parsing
MAX_CAPTION = 1024
# An answer needing more messages than this goes out as a document (with a short preview message).
MAX_ANSWER_PARTS = 4
PREVIEW_CHARS = 1500
PROGRESS_LINES = 30  # the progress message keeps the newest lines; the log has everything

FINAL_HEADERS = {
    "succeeded": "✅ Done",
    "failed": "❌ Failed",
    "cancelled": "🚫 Cancelled",
    "interrupted": "⚠️ Interrupted by a restart",
}


def escape(text: str) -> str:
    """Text for HTML parse mode: only <, > and & are special there."""
    return html.escape(text, quote=False)


def html_to_plain(text: str) -> str:
    """The plain-text fallback of HTML we built ourselves (every tag is ours, all content is escaped)."""
    return html.unescape(re.sub(r"<[^>]+>", "", text))


def clip(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --------------------------------------------------------------------------------------------- splitting


def _wrap_line(line: str, limit: int, measure: Callable[[str], int]) -> list[str]:
    """A line too long for one message, cut into pieces (at a space where possible); nothing is dropped."""
    pieces: list[str] = []
    while measure(line) > limit:
        cut = limit
        while cut > 1 and measure(line[:cut]) > limit:  # escaping may make the text longer
            cut -= max(1, cut // 8)
        space = line.rfind(" ", 0, cut)
        if space > cut // 2:
            cut = space + 1  # the space stays at the end of the piece
        pieces.append(line[:cut])
        line = line[cut:]
    pieces.append(line)
    return pieces


def split_text(text: str, limit: int = MAX_TEXT, measure: Callable[[str], int] = len) -> list[str]:
    """Split `text` into chunks whose `measure` fits `limit`, at line boundaries (the newline between two chunks
    is dropped); a single over-long line is cut inside. Blank-only chunks are skipped (Telegram rejects them).
    `measure` must add up over concatenation (len, escaped length)."""
    chunks: list[str] = []
    current: list[str] = []
    size = 0

    def flush() -> None:
        joined = "\n".join(current)
        if joined.strip():
            chunks.append(joined)
        current.clear()

    for line in text.split("\n"):
        for piece in _wrap_line(line, limit, measure):
            piece_size = measure(piece)
            if current and size + 1 + piece_size > limit:
                flush()
            size = piece_size if not current else size + 1 + piece_size
            current.append(piece)
    flush()
    return chunks


def escaped_length(text: str) -> int:
    return len(escape(text))


@dataclass(frozen=True)
class AnswerPlan:
    """How an answer goes out: HTML message parts (with their plain-text fallbacks), or a document."""

    parts: list[tuple[str, str]]  # (html, plain)
    document: bytes | None = None  # the whole answer, when it is too long for messages


def answer_plan(answer: str, link: str | None) -> AnswerPlan:
    """The final answer: escaped HTML split at line boundaries, the "Full log" link in the last part; very long
    answers become `answer.md` with a preview message. Nothing is ever cut silently."""
    link_html = f'\n\n<a href="{html.escape(link)}">Full log</a>' if link else ""
    link_plain = f"\n\nFull log: {link}" if link else ""
    room = MAX_TEXT - max(len(link_html), len(link_plain))
    chunks = split_text(answer, room, escaped_length) or ["(empty answer)"]
    if len(chunks) <= MAX_ANSWER_PARTS:
        parts = [(escape(chunk), chunk) for chunk in chunks]
        last_html, last_plain = parts[-1]
        parts[-1] = (last_html + link_html, last_plain + link_plain)
        return AnswerPlan(parts)
    preview = split_text(answer, PREVIEW_CHARS, escaped_length)[0]
    note = (f"\n\n… the full answer ({len(answer):,} characters) is attached as answer.md.")
    return AnswerPlan([(escape(preview) + escape(note) + link_html, preview + note + link_plain)],
                      answer.encode())


DRAFTS = 3  # growing drafts before the final message


def draft_texts(text: str, min_chars: int, drafts: int = DRAFTS) -> list[str]:
    """The growing prefixes a streamed answer shows before the final message (plain text, so any content is
    safe): cut at a paragraph, else a line, else a word boundary near 1/(n+1), 2/(n+1), … of the text. None for a
    text shorter than `min_chars`."""
    text = text[:MAX_TEXT].rstrip()
    if len(text) < min_chars:
        return []
    out: list[str] = []
    for k in range(1, drafts + 1):
        target = len(text) * k // (drafts + 1)
        cut = -1
        for boundary in ("\n\n", "\n", " "):
            found = text.rfind(boundary, 0, target + 1)
            if found > (out and len(out[-1]) or 0) and found >= target // 2:
                cut = found
                break
        prefix = (text[:cut] if cut > 0 else text[:target]).rstrip()
        if prefix and (not out or len(prefix) > len(out[-1])):
            out.append(prefix)
    return out


def failure_text(status: str, error: str | None) -> str:
    if status == "cancelled":
        return "Cancelled."
    if status == "interrupted":
        return error or "AutoCode restarted while this task was running; please send it again."
    return f"Sorry, that did not work: {error or 'no answer was produced.'}"


# --------------------------------------------------------------------------------------------- settings

SETTINGS_USAGE = ("/settings shows this chat's settings; admins change them with /settings set NAME VALUE "
                  "(e.g. /settings set model gpt-4o) and /settings reset [NAME].")


def settings_text(effective: EffectiveSettings, choices: Choices, admin: bool) -> str:
    """The `/settings` reply (plain text): each setting with whether this chat set it, then what may be chosen."""
    def mark(name: str) -> str:
        return " (set here)" if name in effective.overridden else ""

    tools = "all" if effective.tools is None else (", ".join(effective.tools) or "none")
    network = "on" if effective.network else "off"
    if effective.network != effective.network_applied:
        network += " (not applied: the sandbox's network is on for all runs)"
    budget = f"{format_usd(effective.budget_usd)} a month" if effective.budget_usd else "none"
    lines = ["Settings of this chat:", f"• model: {effective.model}{mark('model')}",
             f"• max_iterations: {effective.max_iterations}{mark('max_iterations')}",
             f"• tools: {clip(tools, 800)}{mark('tools')}", f"• network: {network}{mark('network')}",
             f"• budget: {budget}{mark('budget')}",
             f"• instructions: {clip(effective.instructions, 600) if effective.instructions else 'none'}"
             f"{mark('instructions')}", "",
             f"Models: {clip(', '.join(choices.models), 800)}",
             f"Tools: {clip(', '.join(choices.tools) or 'none', 800)} (or all, none; -name/+name to change one)",
             f"Iterations: {choices.max_iterations[0]} to {choices.max_iterations[1]} · network: "
             + ("on or off" if choices.network_allowed else "off (the operator has it off)"), ""]
    lines.append("Change them with /settings set NAME VALUE (e.g. /settings set model "
                 f"{choices.models[-1] if choices.models else 'NAME'}) or /settings reset [NAME]." if admin
                 else "Only an AutoCode admin (TELEGRAM_ADMIN_USERS) can change them.")
    return "\n".join(lines)[:MAX_TEXT]


# --------------------------------------------------------------------------------------------- progress


@dataclass(frozen=True)
class FilesReceived:
    """Not a run event: the adapter's note that a held run's files arrived and it waits for its turn now."""


@dataclass
class Progress:
    """The state shown in the progress message, updated from run events."""

    task: str
    status: str = "queued"
    plan: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    iteration: int = 1
    finished: RunFinished | None = None
    waiting: str = ""  # an LLM call still waiting (LLMWaiting.describe()); cleared by the run's next event
    files: list[str] = field(default_factory=list)  # the names of the files the user sent with the task

    def apply(self, event: RunEvent | FilesReceived) -> None:
        self.waiting = ""  # whatever the run does next, the LLM call that waited is over
        match event:
            case FilesReceived():
                if self.status == "held":
                    self.status = "queued"
            case LLMWaiting() | WorkerWaiting():
                self.waiting = event.describe()
            case RunStarted():
                self.status = "running"
            case PlanReady(steps=steps):
                self.plan = list(steps)
            case StepStarted(index=i, total=n, tool_name=name, iteration=iteration):
                self.iteration = iteration
                self.lines.append(f"⏳ {i}/{n} {name} …")
            case StepFinished(index=i, total=n, tool_name=name, ok=ok, duration_ms=ms, error=error):
                line = f"✅ {i}/{n} {name} · {ms / 1000:.1f} s" if ok else \
                    f"❌ {i}/{n} {name} · {clip(error or 'failed', 200)}"
                if self.lines and self.lines[-1].startswith(f"⏳ {i}/{n} {name}"):
                    self.lines[-1] = line
                else:
                    self.lines.append(line)
            case EvaluationDone(satisfactory=False, thoughts=thoughts):
                self.lines.append(f"🔁 not yet: {clip(thoughts, 200)}")
            case RepairPlanned(retry_from=name, iteration=iteration):
                self.lines.append(f"🔧 iteration {iteration}: repairing from {name}")
            case RunFinished() as finished:
                self.status = finished.status
                self.finished = finished

    def render(self) -> str:
        if self.status in FINAL_HEADERS:
            head = FINAL_HEADERS[self.status]
        elif self.status == "running":
            head = "⏳ Working"
        elif self.status == "held":
            head = "📥 Receiving " + ("the file" if len(self.files) == 1 else "the files")
        else:
            head = "🕒 Queued"
        out = [f"{head}: {clip(self.task, 300)}"]
        if self.files:
            more = f" and {len(self.files) - 5} more" if len(self.files) > 5 else ""
            out.append("📎 " + ", ".join(clip(name, 80) for name in self.files[:5]) + more)
        if self.plan:
            out.append("Plan: " + clip(" → ".join(self.plan), 600))
        lines = self.lines
        if len(lines) > PROGRESS_LINES:
            lines = [f"… {len(lines) - PROGRESS_LINES} earlier lines in the log", *lines[-PROGRESS_LINES:]]
        out.extend(lines)
        if self.waiting and self.finished is None:
            out.append(f"⏳ {clip(self.waiting, 300)}")
        if self.finished is not None:
            usage = self.finished.usage
            out.append(f"{usage.get('llm_calls', 0)} LLM calls · "
                       f"{usage.get('prompt_tokens', 0) + usage.get('completion_tokens', 0)} tokens")
        text = "\n".join(out)
        return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 1] + "…"


# --------------------------------------------------------------------------------------------- the log

def approval_text(tool: str, parts: tuple | list, arguments: str, timeout_s: float) -> str:
    """The approval request (HTML): the call with every argument named and each long value clipped in its middle
    (agent_core/call_text.py), so that the message stays within MAX_TEXT and a long first argument cannot hide a
    later one."""
    head, foot = f"🔐 {tool} needs your approval before it runs:\n", f"\nNo answer within {timeout_s:g} s denies it."
    room = MAX_TEXT - utf16_length(head + foot) - 8
    shown = (call_text.fit(tool, list(parts), room, utf16_length) if parts
             else call_text.clip_middle(arguments, room, utf16_length))
    return (f"🔐 <b>{html.escape(tool)}</b> needs your approval before it runs:\n<pre>{html.escape(shown)}</pre>"
            + html.escape(foot))


_STEP_MARKS = {"ok": "✅", "failed": "❌", "timeout": "⌛", "cancelled": "🚫"}
_APPROVAL_MARKS = {"approved": "✅", "denied": "🚫", "timeout": "⌛", "pending": "🔐"}
LOG_LINE_CHARS = 300  # one step, verdict or approval line of the caption at most


def utf16_length(text: str) -> int:
    """Telegram counts message and caption lengths in UTF-16 code units (an emoji outside the BMP is two)."""
    return len(text.encode("utf-16-le")) // 2


def log_caption(log: RunLog) -> tuple[str, str]:
    """The caption of the run's one log document, as (HTML, plain fallback): the steps with status and duration,
    the evaluator's verdicts, the approvals, then tokens with cost and the settings the run had. Every field is
    escaped; it fits Telegram's 1,024-character caption limit (visible text), and lines that do not fit are
    replaced by a marker saying how many more the document holds."""
    head = [("<b>Execution log</b> · " + escape(log.status), f"Execution log · {log.status}")]
    body: list[str] = []
    for step in log.steps:
        mark = _STEP_MARKS.get(step.status, "·")
        error = f": {step.error}" if step.error and step.status != "ok" else ""
        body.append(f"{mark} {step.iteration}.{step.number} {step.name} · {step.status}, "
                    f"{step.duration_ms / 1000:.1f} s{error}")
    for verdict in log.verdicts:
        if verdict.satisfactory:
            body.append(f"☑️ iteration {verdict.iteration}: satisfactory")
        else:
            retry = f" (retry from {verdict.retry_from})" if verdict.retry_from else ""
            body.append(f"🔁 iteration {verdict.iteration}: not yet{retry} — {verdict.thoughts}")
    for approval in log.approvals:
        who = f" by {approval.decided_by.split(':')[-1]}" if approval.decided_by else ""
        body.append(f"{_APPROVAL_MARKS.get(approval.status, '🔐')} {approval.tool}: {approval.status}{who}")
    tail = [clip(log.tokens_line(), 400)] + ([clip(f"⚠ {log.unsupported_line()}", 300)] if log.unsupported_line() else []) \
        + ([clip(f"Settings: {log.settings}", 300)] if log.settings else [])
    body = [clip(line, LOG_LINE_CHARS) for line in body]
    room = MAX_CAPTION - sum(utf16_length(plain) + 1 for _, plain in head) - sum(utf16_length(t) + 1 for t in tail)
    kept: list[str] = []
    for index, line in enumerate(body):
        left = len(body) - index - 1
        marker = utf16_length(f"… {left} more in the file") + 1 if left else 0
        if utf16_length(line) + 1 + marker > room:
            kept.append(f"… {len(body) - index} more in the file")
            break
        kept.append(line)
        room -= utf16_length(line) + 1
    html_lines = [h for h, _ in head] + [escape(line) for line in kept + tail]
    plain_lines = [p for _, p in head] + kept + tail
    return "\n".join(html_lines), "\n".join(plain_lines)
