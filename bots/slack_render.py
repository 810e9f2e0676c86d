"""Slack rendering: Markdown to mrkdwn, splitting within Block Kit limits, and the progress, answer and log
messages of a run. Pure functions (no I/O), so the adapter stays about routing and the limits live in one place."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from agent_core import call_text

SECTION_CHARS = 3000  # Block Kit: section text limit
MAX_BLOCKS = 50  # Block Kit: blocks per message
MESSAGE_CHARS = 11000  # block text per message: well under Slack's practical msg_too_long
PROGRESS_CHARS = 2800  # the progress message is updated often: one section
CANCEL_ACTION = "autocode_cancel"
RERUN_ACTION = "autocode_rerun"
REPEAT_ACTION = "autocode_repeat"  # "Repeat…" on a succeeded run: make it a routine (bots/slack_routines.py)
APPROVE_ACTION = "autocode_approve"  # value: "<run id>:<approval number>"
DENY_ACTION = "autocode_deny"
APPROVAL_CALL_CHARS = 2700  # the call in the approval message, escaped, in a code block (the section holds 3,000)
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
        lines.append(status_line(progress))
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
        if progress.status == "succeeded":
            elements.append(button("Repeat…", REPEAT_ACTION, progress.run_id))
    else:
        elements.append(button("Cancel", CANCEL_ACTION, progress.run_id, "danger"))
    if progress.url:
        elements.append({"type": "button", "text": {"type": "plain_text", "text": "Full log"},
                         "action_id": "autocode_full_log", "url": progress.url})
    blocks.append({"type": "actions", "elements": elements})
    return blocks


def status_line(progress: Progress) -> str:
    """How a finished run ended, in one line: "✅ Succeeded after 1 iteration · 2,031 tokens"."""
    icon = STATUS_ICONS.get(progress.status, ":grey_question:")
    tokens = progress.usage.get("prompt_tokens", 0) + progress.usage.get("completion_tokens", 0)
    done = f"{icon} {progress.status.capitalize()}"
    if progress.iteration:
        done += f" after {progress.iteration} iteration{'s' if progress.iteration != 1 else ''}"
    if tokens:
        done += f" · {tokens:,} tokens"
    return done


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


_CALL_COST = call_text.escaped_cost(lambda ch: escape(ch))


def approval_call(tool: str, parts: Any, call_json: str | None = None, arguments: str = "") -> str:
    """The call as the approval message shows it: every argument named, each long value clipped in its middle,
    within APPROVAL_CALL_CHARS once escaped (agent_core/call_text.py). From the event's parts, or a stored row's."""
    limit = APPROVAL_CALL_CHARS - len(code_block(""))
    if parts:
        return call_text.fit(tool, list(parts), limit, _CALL_COST)
    return call_text.fit_stored(tool, call_json, arguments, limit, _CALL_COST)


def approval_blocks(run_id: str, number: int, tool: str, arguments: str, requester: str = "",
                    decision: str = "", by: str = "", timeout_s: float = 0) -> Blocks:
    """The call a step waits on (`approval_call`; generated code chose the arguments: escaped, in a code block)
    with Approve / Deny while pending; after the decision, the same call and who decided, without buttons."""
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
#
# A run that starts in a channel (a slash command, a mention that opens a thread) ends as one message: its progress
# message, updated into the answer with the run's images. A run inside a thread or a DM streams its answer as a new
# message. Either way the answer is one message; what does not fit is attached whole as answer.md.

SHORT_ANSWER_CHARS = 2800  # the answer shown when Slack refuses a longer message (msg_too_long)
STREAM_CHARS = 11000  # of a streamed answer (chat.appendStream takes ≤ 12,000 characters a call)
STREAM_PIECE = 300  # characters per append: the answer appears as it is written
MAX_IMAGES = 5  # image blocks in the answer (the thread has them all as files)
ANSWER_FILE = "answer.md"
REST_NOTE = "_… the answer continues in answer.md in the thread._"


@dataclass
class Attachment:
    """A file to upload into the thread."""

    filename: str
    data: bytes
    title: str


@dataclass
class Rendered:
    """One message's blocks and the files that go with it (answer.md when the answer did not fit)."""

    blocks: Blocks
    files: list[Attachment] = field(default_factory=list)


def outcome_text(status: str, answer: str, error: str | None) -> str:
    """What the answer message says, in mrkdwn: the answer, or why there is none."""
    if status == "succeeded" and answer.strip():
        return to_mrkdwn(answer)
    if status == "cancelled":
        return ":no_entry_sign: The run was cancelled."
    reason = escape(clip(error or "The run did not produce an answer.", 1500))
    return f":x: Sorry, that did not work: {reason}"


def _size(blocks: Blocks) -> int:
    return sum(len(json.dumps(block)) for block in blocks)


def answer_body(status: str, answer: str, error: str | None, room: int = MESSAGE_CHARS,
                max_blocks: int = MAX_BLOCKS - 5) -> tuple[Blocks, list[Attachment]]:
    """The answer as sections of one message within `room` characters and `max_blocks` blocks. When it does not
    fit, the message shows its start and says so, and the whole answer is attached as answer.md."""
    text = outcome_text(status, answer, error)
    limit = max(500, min(SECTION_CHARS, room - 400))
    blocks = [section(piece) for piece in split_text(text, limit) if piece.strip()]
    if _size(blocks) <= room and len(blocks) <= max_blocks:
        return blocks, []
    note = section(REST_NOTE)
    kept: Blocks = []
    for block in blocks:
        if _size(kept) + len(json.dumps(block)) + len(json.dumps(note)) > room or len(kept) + 2 > max_blocks:
            break
        kept.append(block)
    return kept + [note], [Attachment(ANSWER_FILE, answer.encode(), "Full answer")]


def image_block(file_id: str, name: str) -> dict[str, Any]:
    """An image uploaded by the app (files_upload_v2), shown in a message by its Slack file id."""
    label = clip(name, 2000) or "image"
    return {"type": "image", "slack_file": {"id": file_id}, "alt_text": label,
            "title": {"type": "plain_text", "text": label}}


def final_blocks(progress: Progress, answer: str, images: list[tuple[str, str]] | tuple = (),
                 room: int = MESSAGE_CHARS) -> Rendered:
    """The message a channel run ends as: who asked what, the answer (or the failure), the run's images (Slack
    file ids, names), how it ended, and Re-run / Full log."""
    asker = f" for <@{progress.user}>" if progress.user else ""
    head = context(f"*AutoCode*{asker}: {escape(clip(progress.task, 300))}")
    shown = [image_block(file_id, name) for file_id, name in list(images)[:MAX_IMAGES]]
    elements = [button("Re-run", RERUN_ACTION, progress.run_id)]
    if progress.status == "succeeded":
        elements.append(button("Repeat…", REPEAT_ACTION, progress.run_id))
    if progress.url:
        elements.append({"type": "button", "text": {"type": "plain_text", "text": "Full log"},
                         "action_id": "autocode_full_log", "url": progress.url})
    tail: Blocks = [*shown, context(status_line(progress)), {"type": "actions", "elements": elements}]
    body, files = answer_body(progress.status, answer, progress.error, room - _size([head, *tail]),
                              MAX_BLOCKS - 1 - len(tail))
    return Rendered([head, *body, *tail], files)


def thread_answer_blocks(status: str, answer: str, error: str | None, url: str | None,
                         room: int = MESSAGE_CHARS) -> Rendered:
    """The answer as a new message in a thread (a failure, or a stream that could not finish), with its Full log
    link."""
    footer = [context(f"<{url}|Full log>")] if url else []
    body, files = answer_body(status, answer, error, room - _size(footer))
    return Rendered(body + footer, files)


def stream_text(answer: str) -> tuple[str, list[Attachment]]:
    """The answer as a Slack stream carries it (Markdown, `&`, `<`, `>` escaped so that nothing in it can mention
    or link as Slack syntax), at most STREAM_CHARS; the whole answer attached as answer.md when it is longer."""
    text = escape(answer)
    if len(text) <= STREAM_CHARS:
        return text, []
    start = split_text(text, STREAM_CHARS - len(REST_NOTE) - 4)[0]
    return start + "\n\n" + REST_NOTE, [Attachment(ANSWER_FILE, answer.encode(), "Full answer")]


def stream_pieces(text: str, size: int = STREAM_PIECE) -> list[str]:
    """`text` in consecutive pieces of about `size` characters, cut after a space or newline where there is one;
    joined, they are exactly `text`."""
    pieces = []
    while len(text) > size:
        cut = max(text.rfind("\n", size // 2, size), text.rfind(" ", size // 2, size))
        cut = cut + 1 if cut > 0 else size
        pieces.append(text[:cut])
        text = text[cut:]
    if text:
        pieces.append(text)
    return pieces


def stream_footer(url: str | None) -> Blocks:
    """Blocks under a streamed answer (chat.stopStream): the Full log link."""
    return [context(f"<{url}|Full log>")] if url else []


# ---------------------------------------------------------------------------------------------- log

LOG_CHARS = 3500  # the log message (the summary); the attached document holds everything


def _step_icon(status: str) -> str:
    return ":white_check_mark:" if status == "ok" else ":x:"


def log_summary(log: Any, url: str | None, limit: int = LOG_CHARS) -> str:
    """The thread's one log message (a bots.run_log.RunLog in mrkdwn): each iteration's steps with status and
    duration, the evaluator's verdicts, the approvals, tokens and cost, the settings; it points to the attached
    document (code, outputs, stdout/stderr of every step) and the run page. Clipped to `limit`, saying so."""
    icon = STATUS_ICONS.get(log.status, ":grey_question:")
    head = [f"*Execution log* · {icon} {escape(log.status)} · run `{escape(log.run_id)}`"]
    body: list[str] = []
    verdicts = {v.iteration: v for v in log.verdicts}
    iterations = sorted({s.iteration for s in log.steps} | set(verdicts))
    for iteration in iterations:
        if len(iterations) > 1:
            body.append(f"*Iteration {iteration}*")
        for step in (s for s in log.steps if s.iteration == iteration):
            name = escape(clip(step.name, 80))
            line = f"{_step_icon(step.status)} {step.number}. `{name}` · {step.duration_ms:,} ms"
            if step.status != "ok":
                line += f" · {escape(step.status)}"
                if step.error:
                    line += f": {escape(clip(' '.join(step.error.split()), 200))}"
            body.append(line)
        verdict = verdicts.get(iteration)
        if verdict is not None:
            mark = ":white_check_mark: satisfied" if verdict.satisfactory else ":x: not yet"
            retry = f" (retry from `{escape(clip(verdict.retry_from, 80))}`)" if verdict.retry_from else ""
            thoughts = escape(clip(" ".join((verdict.thoughts or "").split()), 300))
            body.append(f"Evaluator: {mark}{retry}" + (f" — {thoughts}" if thoughts else ""))
    for approval in log.approvals:
        who = f" by {_who(approval.decided_by)}" if approval.decided_by else ""
        body.append(f":raised_hand: `{escape(clip(approval.tool, 80))}`: {escape(approval.status)}{who}")
    tail = [f"Tokens: {escape(log.tokens_line())}"]
    if log.unsupported_line():
        tail.append(f":warning: {escape(clip(log.unsupported_line(), 300))}")
    if log.settings:
        tail.append(f"Settings: {escape(clip(log.settings, 400))}")
    where = f"Code, outputs, stdout and stderr of every step: `{escape(log.filename)}` (attached)"
    tail.append(where + (f" · <{url}|Full log>" if url else ""))
    room = limit - len("\n".join(head + tail)) - 80
    shown: list[str] = []
    for index, line in enumerate(body):
        if len("\n".join(shown + [line])) > room:
            shown.append(f"_… {len(body) - index} more lines in the attached log_")
            break
        shown.append(line)
    return "\n".join(head + shown + tail)
