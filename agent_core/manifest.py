"""The run's inputs/ before planning: the conversation's workspace placed in the sandbox, previewed there, and
summed up for the planner as a manifest (path, size, type, origin, preview), never the bytes.

The preview is agent_core/preview.py run as a trusted step in the run's own sandbox with a step's limits: an
untrusted file is parsed by sandboxed code only. If that step fails as a whole (a time or memory limit), every file
gets "preview failed: …" and the run goes on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent_core.inputs import RESULTS_DIR, InputFile
from agent_core.sandbox import Limits, Sandbox, SandboxUnavailable, StepRequest
from agent_core.workspace import Workspace

log = logging.getLogger(__name__)

PREVIEW_SOURCE = (Path(__file__).parent / "preview.py").read_text()
PREVIEW_CHARS = 400  # as preview.py clips; clipped again here, whatever the sandbox returned
MANIFEST_MAX_FILES = 30  # files listed (and previewed); the rest are counted, so the prompt stays small
MANIFEST_HEADER = ("Files in inputs/ (read-only: read them from inputs/NAME, save what you make under outputs/; "
                   "the bytes are not shown here):")


class InputsNotPlaced(SandboxUnavailable):
    """The conversation's files could not be placed in the run's sandbox (e.g. over its disk cap); the message is
    for the user."""


@dataclass
class PreparedInputs:
    files: list[InputFile] = field(default_factory=list)
    manifest: str = ""  # for the planner's and the evaluator's prompts ("" without files)
    notes: list[str] = field(default_factory=list)  # for the user (files removed by age)


async def prepare_inputs(sandbox: Sandbox, workspace: Workspace, conversation: str, limits: Limits,
                         gate: Any = None) -> PreparedInputs:
    """Place the conversation's workspace under inputs/ and preview it; nothing happens without files."""
    notes = workspace.expire(conversation)
    files = workspace.inputs_for(conversation)
    if not files:
        return PreparedInputs(notes=notes)
    try:
        await sandbox.put_inputs(files)
    except SandboxUnavailable as exc:
        log.warning("run's input files not placed: %s", exc)
        raise InputsNotPlaced(f"The files could not be placed in the sandbox, so no code ran ({_clip(str(exc), 200)}"
                              f"). Fewer or smaller files may fit; /reset clears the conversation's files.") from None
    # Earlier runs' results are our own small records: their origin line says enough, and a conversation with
    # nothing else costs no preview step.
    listed = files[:MANIFEST_MAX_FILES]
    previewed = [f"inputs/{f.name}" for f in listed if not f.name.startswith(f"{RESULTS_DIR}/")]
    previews = await _previews(sandbox, previewed, limits, gate) if previewed else {}
    lines = [MANIFEST_HEADER]
    for item in listed:
        where = f"inputs/{item.name}"
        lines.append(f"- {where} ({_size(item.size)}, {item.mime}{', ' + item.origin if item.origin else ''})")
        preview = _clip(previews.get(where) or "", PREVIEW_CHARS)
        lines += [f"    {line}" for line in preview.splitlines() if line.strip()]
    if len(files) > len(listed):
        lines.append(f"- … and {len(files) - len(listed)} more files (list inputs/ to see them)")
    return PreparedInputs(files, "\n".join(lines), notes)


async def _previews(sandbox: Sandbox, names: list[str], limits: Limits, gate: Any) -> dict[str, str]:
    request = StepRequest(code=PREVIEW_SOURCE, function="preview_inputs", input={"files": names}, limits=limits)
    if gate is None:
        result = await sandbox.run_step(request)
    else:
        async with gate:
            result = await sandbox.run_step(request)
    previews = (result.output or {}).get("previews") if result.ok else None
    if not isinstance(previews, dict):
        reason = _clip(result.error or "no previews returned", 160)
        log.warning("input previews failed: %s", reason)
        return {name: f"preview failed: {reason}" for name in names}
    return {name: str(previews.get(name) or "") for name in names}


def _clip(text: str, limit: int) -> str:
    text = "".join(ch if ch.isprintable() or ch == "\n" else "?" for ch in str(text))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _size(size: int) -> str:
    for unit, scale in (("MB", 1 << 20), ("KB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"


__all__ = ["InputsNotPlaced", "PreparedInputs", "prepare_inputs"]
