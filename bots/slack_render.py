"""Slack rendering: Markdown to mrkdwn, splitting within Block Kit limits, and the progress, answer and log
messages of a run. Pure functions (no I/O), so the adapter stays about routing and the limits live in one place."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

SECTION_CHARS = 3000  # Block Kit: section text limit
MAX_BLOCKS = 50  # Block Kit: blocks per message
MESSAGE_CHARS = 11000  # block text per message: well under Slack's practical msg_too_long
PROGRESS_CHARS = 2800  # the progress message is updated often: one section
ANSWER_FILE_CHARS = 30000  # longer answers go into a file (with the start shown)
CODE_INLINE_CHARS = 2400  # longer step code goes into a file
TAIL_CHARS = 600  # stdout/stderr tails shown in the log
CANCEL_ACTION = "autocode_cancel"
RERUN_ACTION = "autocode_rerun"
APPROVE_ACTION = "autocode_approve"  # value: "<run id>:<approval number>"
DENY_ACTION = "autocode_deny"
APPROVAL_CALL_CHARS = 2000  # the call as shown in the approval message, escaped, in a code block
ACTIVE = ("held", "queued", "running")  # a run not over yet (held: its files are still being received)
STATUS_ICONS = {"held": ":inbox_tray:", "queued": ":hourglass:", "running": ":hourglass_flowing_sand:",
                "succeeded": ":white_check_mark:", "failed": ":x:", "cancelled": ":no_entry_sign:",
                "interrupted": ":warning:"}
Blocks = list[dict[str, Any]]


# ---------------------------------------------------------------------------------------------- text

def escape(text: str) -> str:
    """Escape the three characters Slack treats as markup (so user text cannot ping or link)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


_FENCE = re.compile(r"(```.*?```)", re.DOTALL)
_LINK = re.compile(r"\[([^\]\n]+)\]\((https?://[^)\s]+)\)")
_BOLD = re.compile(r"\*\*(.+?)\*\*|__(.+?)__")
_HEADING = re.compile(r"^#{1,6}\s+(.+)$", re.MULTILINE)
_INLINE_CODE = re.compile(r"(`[^`\n]+`)")


def to_mrkdwn(markdown: str) -> str:
    """Markdown as LLMs write it, in Slack mrkdwn: bold, headings, links; code kept verbatim (escaped only)."""
    out = []
    for part in _FENCE.split(markdown):
        if part.startswith("```") and part.endswith("```") and len(part) >= 6:
            body = part[3:-3]
            if "\n" in body and re.match(r"^[\w+-]*\n", body):
                body = body.split("\n", 1)[1]  # drop the language tag: Slack shows it as code text
            out.append("```" + escape(body) + "```")
            continue
        pieces = []
        for chunk in _INLINE_CODE.split(part):
            if chunk.startswith("`") and chunk.endswith("`") and len(chunk) > 1:
                pieces.append(escape(chunk))
                continue
            links: list[str] = []

            def keep_link(match: re.Match) -> str:
                links.append(f"<{match.group(2)}|{escape(match.group(1))}>")
                return f"\x00{len(links) - 1}\x00"

            text = escape(_LINK.sub(keep_link, chunk))
            text = _HEADING.sub(lambda m: f"*{m.group(1).strip()}*", text)
            text = _BOLD.sub(lambda m: f"*{m.group(1) or m.group(2)}*", text)
            text = re.sub(r"\x00(\d+)\x00", lambda m: links[int(m.group(1))], text)
            pieces.append(text)
        out.append("".join(pieces))
    return "".join(out)


def split_text(text: str, limit: int = SECTION_CHARS) -> list[str]:
    """Cut `text` into pieces of at most `limit` characters at paragraph, line or word boundaries; a code block
    cut in two is closed and reopened so each piece renders. Nothing is dropped."""
    pieces: list[str] = []
    rest = text
    while len(rest) > limit:
        room = limit - 6  # space to close and reopen a fence
        cut = max(rest.rfind("\n\n", 0, room), rest.rfind("\n", 0, room))
        if cut < room // 2:
            cut = rest.rfind(" ", 0, room)
        if cut < room // 2:
            cut = room
        piece, rest = rest[:cut], rest[cut:].lstrip("\n")
        if piece.count("```") % 2:  # inside a code block: close here, reopen in the next piece
            piece += "\n```"
            rest = "```\n" + rest
        pieces.append(piece)
    if rest.strip() or not pieces:
        pieces.append(rest)
    return pieces


def clip(text: str, limit: int, note: str = "…") -> str:
    """At most `limit` characters, saying so when something was cut."""
    return text if len(text) <= limit else text[: max(0, limit - len(note))] + note


def tail(text: str, limit: int = TAIL_CHARS) -> tuple[str, bool]:
    """The last `limit` characters (starting at a line when possible) and whether it was cut."""
    if len(text) <= limit:
        return text, False
    cut = text[-limit:]
    newline = cut.find("\n")
    return (cut[newline + 1:] if 0 <= newline < limit // 2 else cut), True


def code_block(text: str) -> str:
    return "```" + escape(text.replace("```", "ʼʼʼ")) + "```"


def fenced(text: str, limit: int, note: str) -> str:
    """A code block of at most `limit` characters after escaping, with `note` appended when cut."""
    block, shown = code_block(text), text
    while len(block) > limit:
        shown = shown[: int(len(shown) * 0.8)]
        block = code_block(shown + note)
    return block


def section(text: str) -> dict[str, Any]:
    return {"type": "section", "text": {"type": "mrkdwn", "text": text}}


def context(text: str) -> dict[str, Any]:
    return {"type": "context", "elements": [{"type": "mrkdwn", "text": text}]}


def sections(mrkdwn: str) -> Blocks:
    return [section(piece) for piece in split_text(mrkdwn) if piece.strip()]


def pack(blocks: Blocks, max_blocks: int = MAX_BLOCKS, max_chars: int = MESSAGE_CHARS) -> list[Blocks]:
    """Group blocks into messages within the block count and text size limits, keeping their order."""
    messages: list[Blocks] = [[]]
    size = 0
    for block in blocks:
        length = len(json.dumps(block))
        if messages[-1] and (len(messages[-1]) >= max_blocks or size + length > max_chars):
            messages.append([])
            size = 0
        messages[-1].append(block)
        size += length
    return [m for m in messages if m]


def fallback_text(blocks: Blocks, limit: int = 2900) -> str:
    """The `text` that notifications and old clients show for a block message."""
    texts = []
    for block in blocks:
        text = block.get("text")
        if isinstance(text, dict):
            texts.append(text.get("text", ""))
    return clip("\n".join(texts), limit) or "AutoCode"


def button(label: str, action_id: str, value: str, style: str | None = None) -> dict[str, Any]:
    element: dict[str, Any] = {"type": "button", "text": {"type": "plain_text", "text": label},
                               "action_id": action_id, "value": value}
    if style:
        element["style"] = style
    return element


# ---------------------------------------------------------------------------------------------- progress

@dataclass
class Progress:
    """What the progress message shows; the adapter changes it on run events and renders it coalesced."""

    run_id: str
    task: str
    user: str = ""
    status: str = "queued"
    iteration: int = 0
    plan: list[str] = field(default_factory=list)
    steps: dict[int, str] = field(default_factory=dict)  # 1-based index -> status line of this iteration
    note: str = ""
    waiting: str = ""  # an LLM call still waiting (LLMWaiting.describe()); cleared by the run's next event
    usage: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    url: str | None = None
    files: list[str] = field(default_factory=list)  # the names of the files the user sent with the task

    @property
    def final(self) -> bool:
        return self.status not in ACTIVE


def progress_blocks(progress: Progress) -> Blocks:
    """One section (≤ PROGRESS_CHARS) plus a Cancel button while running, Re-run and Full log after."""
    asker = f" for <@{progress.user}>" if progress.user else ""
    lines = [f"*AutoCode*{asker}: {escape(clip(progress.task, 300))}"]
    icon = STATUS_ICONS.get(progress.status, ":grey_question:")
    if progress.files:
        names = ", ".join(f"`{escape(clip(name, 80))}`" for name in progress.files[:5])
        more = f" and {len(progress.files) - 5} more" if len(progress.files) > 5 else ""
        lines.append(f":paperclip: {names}{more}")
    if progress.status == "held":
        count = len(progress.files)
        lines.append(f"{icon} Receiving {'the file' if count == 1 else f'{count} files' if count else 'the files'}…")
    elif progress.status == "queued":
        lines.append(f"{icon} Queued")
    elif progress.status == "running":
        lines.append(f"{icon} Running" + (f" — iteration {progress.iteration}" if progress.iteration else ""))
    else:
        tokens = progress.usage.get("prompt_tokens", 0) + progress.usage.get("completion_tokens", 0)
        done = f"{icon} {progress.status.capitalize()}"
        if progress.iteration:
            done += f" after {progress.iteration} iteration{'s' if progress.iteration != 1 else ''}"
        if tokens:
            done += f" · {tokens:,} tokens"
        lines.append(done)
        if progress.error and progress.status != "succeeded":
            lines.append(escape(clip(progress.error, 400)))
    if progress.plan and not progress.final:
        lines.append("Plan: " + escape(clip(" → ".join(progress.plan), 400)))
        shown = sorted(progress.steps.items())
        if len(shown) > 12:
            lines.append(f"… {len(shown) - 12} earlier steps")
            shown = shown[-12:]
        lines.extend(line for _, line in shown)
    if progress.note and not progress.final:
        lines.append(escape(clip(progress.note, 400)))
    if progress.waiting and not progress.final:
        lines.append(":hourglass: " + escape(clip(progress.waiting, 300)))
    text = clip("\n".join(lines), PROGRESS_CHARS)
    blocks: Blocks = [section(text)]
    elements = []
    if progress.final:
        elements.append(button("Re-run", RERUN_ACTION, progress.run_id))
    else:
        elements.append(button("Cancel", CANCEL_ACTION, progress.run_id, "danger"))
    if progress.url:
        elements.append({"type": "button", "text": {"type": "plain_text", "text": "Full log"},
                         "action_id": "autocode_full_log", "url": progress.url})
    blocks.append({"type": "actions", "elements": elements})
    return blocks


def step_line(index: int, total: int, name: str, state: str, detail: str = "") -> str:
    icon = {"running": ":arrows_counterclockwise:", "ok": ":white_check_mark:", "failed": ":x:"}[state]
    return f"{icon} {index}/{total} `{escape(name)}`" + (f" {escape(detail)}" if detail else "")


# ---------------------------------------------------------------------------------------------- approvals

def approval_value(run_id: str, number: int) -> str:
    return f"{run_id}:{number}"


def parse_approval_value(value: str) -> tuple[str, int] | None:
    run_id, _, number = (value or "").rpartition(":")
    return (run_id, int(number)) if run_id and number.isdigit() else None


def _who(by: str) -> str:
    """A decider as Slack shows them: `slack:T:U` (how the adapter records a click) as a mention."""
    if by.startswith("slack:") and by.count(":") == 2:
        return f"<@{by.rsplit(':', 1)[-1]}>"
    return escape(by) or "someone"


def approval_blocks(run_id: str, number: int, tool: str, arguments: str, requester: str = "",
                    decision: str = "", by: str = "", timeout_s: float = 0) -> Blocks:
    """The call a step waits on (generated code chose the arguments: escaped, in a code block, clipped) with
    Approve / Deny while pending; after the decision, the same call and who decided, without buttons."""
    asker = f"<@{requester}>, " if requester and not decision else ""
    head = f":raised_hand: {asker}AutoCode wants to run `{escape(clip(tool, 80))}`"
    blocks: Blocks = [section(head + ("" if decision else " — approve?") + "\n"
                              + fenced(arguments, APPROVAL_CALL_CHARS, " … (clipped)"))]
    if not decision:
        value = approval_value(run_id, number)
        limit = f"No decision within {timeout_s:g} s denies it." if timeout_s else ""
        blocks.append({"type": "actions", "elements": [button("Approve", APPROVE_ACTION, value, "primary"),
                                                       button("Deny", DENY_ACTION, value, "danger")]})
        if limit:
            blocks.append(context(limit))
        return blocks
    outcome = {
        "approved": f":white_check_mark: Approved by {_who(by)}",
        "denied": f":no_entry: Denied by {_who(by)}",
        "timeout": f":hourglass: Nobody decided within {timeout_s:g} s: denied, not run" if timeout_s
        else ":hourglass: Nobody decided in time: denied, not run",
        "cancelled": ":no_entry_sign: The run was cancelled: not run",
        "interrupted": ":warning: AutoCode restarted while waiting: not run",
    }.get(decision, f"{escape(decision)}: not run")
    blocks.append(context(outcome))
    return blocks


# ---------------------------------------------------------------------------------------------- answer

@dataclass
class Attachment:
    """A file to upload into the thread."""

    filename: str
    data: bytes
    title: str


@dataclass
class Rendered:
    """Messages (each a list of blocks) and files to post, in order."""

    messages: list[Blocks]
    files: list[Attachment] = field(default_factory=list)


def answer_messages(status: str, answer: str, error: str | None, url: str | None) -> Rendered:
    """The final answer in mrkdwn, split over messages; very long answers are attached as a file too."""
    files: list[Attachment] = []
    if status == "succeeded" and answer.strip():
        text = to_mrkdwn(answer)
        if len(text) > ANSWER_FILE_CHARS:
            files.append(Attachment("answer.md", answer.encode(), "Full answer"))
            text = clip(text, ANSWER_FILE_CHARS, "") + "\n\n_… the answer continues in the attached answer.md._"
        blocks = sections(text)
    elif status == "cancelled":
        blocks = [section(":no_entry_sign: The run was cancelled.")]
    else:
        reason = escape(clip(error or "The run did not produce an answer.", 1500))
        blocks = [section(f":x: Sorry, that did not work: {reason}")]
    if url:
        blocks.append(context(f"<{url}|Full log>"))
    return Rendered(pack(blocks), files)


# ---------------------------------------------------------------------------------------------- log

def _output_text(output_json: str | None) -> str:
    if not output_json:
        return ""
    try:
        return json.dumps(json.loads(output_json), ensure_ascii=False, indent=1)
    except ValueError:
        return output_json


def log_messages(run: dict[str, Any], steps: list[dict[str, Any]], evaluations: list[dict[str, Any]],
                 llm_calls: list[dict[str, Any]], usage: dict[str, int]) -> Rendered:
    """The execution log for the thread: per iteration its steps (code, output, stdout/stderr tails, errors)
    and the evaluator's verdict, then token usage. Long code goes into files; every cut is labelled."""
    blocks: Blocks = [section(f"*Execution log* · run `{run['id']}`")]
    files: list[Attachment] = []
    verdicts = {e["iteration"]: e for e in evaluations}
    iterations = sorted({s["iteration"] for s in steps} | set(verdicts))
    for iteration in iterations:
        blocks.append(section(f"*Iteration {iteration}*"))
        for step in (s for s in steps if s["iteration"] == iteration):
            blocks.extend(_step_blocks(step, files))
        verdict = verdicts.get(iteration)
        if verdict is not None:
            mark = ":white_check_mark: satisfactory" if verdict["satisfactory"] else ":x: not yet"
            thoughts = escape(clip(verdict["thoughts"] or "", 1200, "… (clipped)"))
            retry = f" · retry from `{escape(verdict['retry_from'])}`" if verdict.get("retry_from") else ""
            blocks.append(section(f"*Evaluator*: {mark}{retry}\n{thoughts}".rstrip()))
    by_purpose: dict[str, list[int]] = {}
    for call in llm_calls:
        entry = by_purpose.setdefault(call["purpose"] or "other", [0, 0, 0])
        entry[0] += 1
        entry[1] += call["prompt_tokens"] or 0
        entry[2] += call["completion_tokens"] or 0
    detail = ", ".join(f"{purpose} {n}× ({p:,}+{c:,})" for purpose, (n, p, c) in by_purpose.items())
    blocks.append(context(
        f"Tokens: {usage.get('prompt_tokens', 0):,} prompt + {usage.get('completion_tokens', 0):,} completion "
        f"in {usage.get('llm_calls', 0)} LLM calls" + (f" — {detail}" if detail else "")))
    return Rendered(pack(blocks), files)


def _step_blocks(step: dict[str, Any], files: list[Attachment]) -> Blocks:
    ok = step["status"] == "ok"
    head = (f"{':white_check_mark:' if ok else ':x:'} *Step {step['position'] + 1}* `{escape(step['tool_name'])}`"
            f" · {step['duration_ms'] or 0} ms")
    if step.get("description"):
        head += f"\n_{escape(clip(step['description'], 300))}_"
    blocks = [section(head)]
    code = step.get("code") or ""
    if len(code) > CODE_INLINE_CHARS or len(code_block(code)) > SECTION_CHARS - 20:
        name = f"iter{step['iteration']}_step{step['position'] + 1}_{step['tool_name']}.py"
        files.append(Attachment(name, code.encode(), f"Code of {step['tool_name']} (iteration {step['iteration']})"))
        blocks.append(context(f"Code: {len(code):,} characters, attached as `{escape(name)}`."))
    elif code:
        blocks.append(section("*Code*\n" + code_block(code)))
    output = _output_text(step.get("output_json"))
    if output:
        note = "\n… (clipped; the full output is in the Full log)"
        blocks.append(section("*Output*\n" + fenced(clip(output, 1500, note), 2000, note)))
    for stream in ("stdout", "stderr"):
        text = (step.get(stream) or "").rstrip()
        if text:
            shown, cut = tail(text)
            label = f"*{stream}*" + (f" (last {len(shown):,} of {len(text):,} characters)" if cut else "")
            blocks.append(section(f"{label}\n{fenced(shown, 2000, ' … (clipped)')}"))
    if step.get("error"):
        blocks.append(section(f"*Error*: {escape(clip(step['error'], 1500, '… (clipped)'))}"))
    return blocks
