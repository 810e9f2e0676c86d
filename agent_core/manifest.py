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
    previews: dict[str, str] = field(default_factory=dict)  # "inputs/NAME" -> preview, for the files listed
    missing: list[str] = field(default_factory=list)  # listed files whose preview only a sandbox can make

    @property
    def ready(self) -> bool:
        """The manifest is complete without a sandbox: the planner can be asked before one is opened."""
        return not self.missing


def known_inputs(workspace: Workspace, conversation: str, run_id: str | None = None) -> PreparedInputs:
    """The conversation's workspace as the next run's inputs, with the manifest built from the previews earlier
    runs made of the same bytes (stored by content); `missing` names the files still to preview in a sandbox.
    Files older than AUTOCODE_WORKSPACE_DAYS are dropped first (`notes` tells the user, and names the uploads of
    `run_id` renamed because the workspace uses their name itself)."""
    notes = workspace.expire(conversation)
    renamed = workspace.renamed(conversation, run_id) if run_id else None
    if renamed:
        notes.append(renamed)
    files = workspace.inputs_for(conversation)
    prepared = PreparedInputs(files, notes=notes)
    if files:
        keys = {f"inputs/{f.name}": _preview_key(f) for f in _previewed(files)}
        stored = workspace.storage.previews(list(keys.values()))
        prepared.previews = {where: stored[key] for where, key in keys.items() if key in stored}
        prepared.missing = [where for where in keys if where not in prepared.previews]
        prepared.manifest = _manifest(prepared)
    return prepared


async def place_inputs(sandbox: Sandbox, workspace: Workspace, prepared: PreparedInputs, limits: Limits,
                       gate: Any = None) -> None:
    """Place the files under the sandbox's inputs/ and preview, there, the ones no earlier run previewed (their
    previews are stored for the follow-ups; a failed preview is not). Nothing happens without files."""
    if not prepared.files:
        return
    try:
        await sandbox.put_inputs(prepared.files)
    except SandboxUnavailable as exc:
        log.warning("run's input files not placed: %s", exc)
        raise InputsNotPlaced(f"The files could not be placed in the sandbox, so no code ran ({_clip(str(exc), 200)}"
                              f"). Fewer or smaller files may fit; /reset clears the conversation's files.") from None
    if not prepared.missing:
        return
    made, ok = await _previews(sandbox, prepared.missing, limits, gate)
    prepared.previews.update(made)
    prepared.missing = []
    if ok:
        by_name = {f"inputs/{f.name}": f for f in prepared.files}
        workspace.storage.add_previews({_preview_key(by_name[where]): text for where, text in made.items()})
    prepared.manifest = _manifest(prepared)


async def prepare_inputs(sandbox: Sandbox, workspace: Workspace, conversation: str, limits: Limits,
                         gate: Any = None) -> PreparedInputs:
    """known_inputs and place_inputs in one: the run's inputs/ placed and its complete manifest."""
    prepared = known_inputs(workspace, conversation)
    await place_inputs(sandbox, workspace, prepared, limits, gate)
    return prepared


def _previewed(files: list[InputFile]) -> list[InputFile]:
    """The listed files that get a preview. Earlier runs' results are our own small records: their origin line
    says enough, and a conversation with nothing else costs no preview step."""
    return [f for f in files[:MANIFEST_MAX_FILES] if not f.name.startswith(f"{RESULTS_DIR}/")]


def _preview_key(item: InputFile) -> str:
    """A preview depends on the bytes and on the kind of file the name says (preview.py looks at the suffix);
    a file of unknown content gets a key no stored preview has."""
    return f"{item.sha256 or 'unknown-' + item.name}:{Path(item.name).suffix.lower()}"


def _manifest(prepared: PreparedInputs) -> str:
    files = prepared.files
    if not files:
        return ""
    listed = files[:MANIFEST_MAX_FILES]
    lines = [MANIFEST_HEADER]
    for item in listed:
        where = f"inputs/{item.name}"
        lines.append(f"- {where} ({_size(item.size)}, {item.mime}{', ' + item.origin if item.origin else ''})")
        preview = _clip(prepared.previews.get(where) or "", PREVIEW_CHARS)
        lines += [f"    {line}" for line in preview.splitlines() if line.strip()]
    if len(files) > len(listed):
        lines.append(f"- … and {len(files) - len(listed)} more files (list inputs/ to see them)")
    return "\n".join(lines)


async def _previews(sandbox: Sandbox, names: list[str], limits: Limits, gate: Any) -> tuple[dict[str, str], bool]:
    """The previews of `names` made by preview.py in the sandbox, and whether the preview step succeeded."""
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
        return {name: f"preview failed: {reason}" for name in names}, False
    return {name: str(previews.get(name) or "") for name in names}, True


def _clip(text: str, limit: int) -> str:
    text = "".join(ch if ch.isprintable() or ch == "\n" else "?" for ch in str(text))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _size(size: int) -> str:
    for unit, scale in (("MB", 1 << 20), ("KB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"


__all__ = ["InputsNotPlaced", "PreparedInputs", "known_inputs", "place_inputs", "prepare_inputs"]
