"""Run viewer: one web page per run at `/runs/{view_token}`, linked from chat answers.

The page is rendered on the server (Jinja2 with autoescape, code highlighted by Pygments) from what the run stored
in SQLite; while the run is queued or running, `viewer.js` polls `/runs/{token}/state` and swaps in the re-rendered
body. The token is the only key (192 random bits per run), so every response is `no-store`, sends no referrer and
carries a CSP that allows only this server's own script, stylesheet and images.

The page lists the files the run started with (as recorded when it started, storage's `run_inputs`: its uploads
and what earlier runs of the conversation left, with where each came from) and the outputs it kept. An input is
downloadable, as an attachment, while the conversation still holds its bytes: a /reset or a newer file of the
same name ends that. File names are the user's and the steps' text: escaped, and never used as paths (a blob is
found by the sha256 stored for it).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import IO, Any, Iterator
from urllib.parse import quote

from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import JsonLexer, PythonLexer, PythonTracebackLexer
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from agent_core.answer_check import stored_unsupported
from agent_core.config import Settings
from storage.db import Storage

TEMPLATES = Path(__file__).resolve().parent / "templates"
FINISHED = frozenset({"succeeded", "failed", "cancelled", "interrupted"})
TOKEN = re.compile(r"^[A-Za-z0-9_-]{16,128}$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
CHUNK = 1 << 20  # an input download is streamed from its blob in chunks
POLL_MS = 1000
# Raster images are shown inline; anything else (SVG included) is only ever downloaded.
INLINE_IMAGES = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp"})
# A block longer than this is folded into a <details>; beyond HIGHLIGHT_CHARS it stays plain text (Pygments'
# markup is ~10x the text).
FOLD_LINES, FOLD_CHARS, HIGHLIGHT_CHARS = 12, 1200, 20_000
JSON_WIDTH = 88

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
    "Cross-Origin-Resource-Policy": "same-origin",
}
_FORMATTER = HtmlFormatter(cssclass="hl", linenos="inline", wrapcode=True)
_PLAIN_FORMATTER = HtmlFormatter(cssclass="hl", wrapcode=True)


def run_url(settings: Settings, run: dict[str, Any]) -> str | None:
    """The page of a run for links in chat, or None when the viewer is off or AUTOCODE_PUBLIC_URL is unset (a
    chat user cannot open the server's own localhost)."""
    if not settings.viewer or not settings.public_url or not run.get("view_token"):
        return None
    return f"{settings.public_url}/runs/{run['view_token']}"


# ------------------------------------------------------------------------------------------ formatting


def _code(code: str | None) -> Markup:
    """Python source as highlighted HTML (Pygments escapes the text)."""
    return Markup(highlight(code or "", PythonLexer(), _FORMATTER))


def _block(text: str | None, lexer: str = "text") -> dict[str, Any] | None:
    """A text block for the template: its HTML, size and whether to fold it; None when empty."""
    if text is None or not text.strip():
        return None
    lines = text.count("\n") + 1
    if lexer == "text" or len(text) > HIGHLIGHT_CHARS:
        html = Markup('<div class="hl"><pre>{}</pre></div>').format(text)
    else:
        html = Markup(highlight(text, JsonLexer() if lexer == "json" else PythonTracebackLexer(), _PLAIN_FORMATTER))
    return {"html": html, "lines": lines, "chars": len(text), "fold": lines > FOLD_LINES or len(text) > FOLD_CHARS}


def _compact_json(value: Any, indent: int = 0) -> str:
    """Indented JSON that keeps short lists and objects on one line (a list of 8 numbers stays one line)."""
    flat = json.dumps(value, ensure_ascii=False)
    if indent + len(flat) <= JSON_WIDTH or not isinstance(value, (dict, list)) or not value:
        return flat
    pad = " " * (indent + 2)
    if isinstance(value, dict):
        items = [f"{pad}{json.dumps(str(k), ensure_ascii=False)}: {_compact_json(v, indent + 2)}"
                 for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    items = [pad + _compact_json(v, indent + 2) for v in value]
    return "[\n" + ",\n".join(items) + "\n" + " " * indent + "]"


def _pretty_json(raw: str | None) -> str | None:
    if raw is None:
        return None
    try:
        return _compact_json(json.loads(raw))
    except (ValueError, RecursionError):  # not JSON, or nested too deep to indent: shown as stored
        return raw


def _parse_time(stamp: str | None) -> datetime | None:
    try:
        return datetime.fromisoformat(stamp) if stamp else None
    except ValueError:
        return None


def duration(ms: float | int | None) -> str:
    """47 ms, 1.52 s, 2 min 03 s."""
    if ms is None:
        return "–"
    if ms < 1000:
        return f"{int(ms)} ms"
    if ms < 60_000:
        return f"{ms / 1000:.2f} s"
    minutes, seconds = divmod(int(ms // 1000), 60)
    return f"{minutes} min {seconds:02d} s"


def clock(stamp: str | None) -> str:
    moment = _parse_time(stamp)
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC") if moment else "–"


def _between_ms(start: str | None, end: str | None) -> float | None:
    first, last = _parse_time(start), _parse_time(end)
    return (last - first).total_seconds() * 1000 if first and last else None


# ------------------------------------------------------------------------------------------ the view


def _pending(run: dict[str, Any], steps: list[dict[str, Any]], evaluations: dict[int, dict[str, Any]]
             ) -> tuple[str, list[dict[str, Any]]]:
    """While a run runs: what it is doing now ("planning", "running draw_plot", "evaluating", …) and the steps
    still to come of the current iteration (the first of them is the one running)."""
    if run["status"] == "queued":
        return "waiting for its turn", []
    if run["status"] != "running":
        return "", []
    iteration = run["iterations"] or 0
    plan = json.loads(run["plan_json"]) if run.get("plan_json") else None
    if not iteration or not plan:
        return "planning", []
    if iteration in evaluations:  # judged: the run is wrapping up or about to start the repaired iteration
        return "finishing" if evaluations[iteration]["satisfactory"] else "repairing", []
    names = [s.get("tool_name", "") for s in plan.get("subtasks", [])]
    start = 0
    retry_from = (evaluations.get(iteration - 1) or {}).get("retry_from")
    if retry_from in names:
        start = names.index(retry_from)
    current = [s for s in steps if s["iteration"] == iteration]
    if any(s["status"] != "ok" for s in current):
        return "evaluating", []
    done = {s["position"] for s in current}
    pending = [{"number": i + 1, "tool_name": names[i], "description": plan["subtasks"][i].get("description", ""),
                "state": "waiting"} for i in range(start, len(names)) if i not in done]
    if not pending:
        return "evaluating", []
    pending[0]["state"] = "running"
    return f"running {pending[0]['tool_name']}", pending


def build_view(storage: Storage, run: dict[str, Any], workspace_days: int = 0) -> dict[str, Any]:
    """Everything the template shows, gathered from the run's rows (`workspace_days`: AUTOCODE_WORKSPACE_DAYS,
    by which the run dropped old files as it started)."""
    run_id = run["id"]
    steps = storage.steps(run_id)
    evaluations = {e["iteration"]: e for e in storage.evaluations(run_id)}
    calls = storage.llm_calls(run_id)
    outputs: dict[str, str | None] = {}  # the latest ok output of each tool name: the next step's input
    iterations: dict[int, dict[str, Any]] = {}
    for step in steps:
        source = step["input_from_tool"] or ""
        item = {
            "id": step["id"], "number": (step["position"] or 0) + 1, "tool_name": step["tool_name"],
            "description": step["description"] or "", "status": step["status"], "ok": step["status"] == "ok",
            "duration": duration(step["duration_ms"]), "duration_ms": step["duration_ms"] or 0,
            "input_from": source, "code": _code(step["code"]),
            "input": _block(_pretty_json(outputs.get(source)), "json") if source else None,
            "output": _block(_pretty_json(step["output_json"]), "json"), "stdout": _block(step["stdout"]), "stderr": _block(step["stderr"]),
            "error": step["error"] or "", "traceback": _block(step["traceback"], "traceback"),
        }
        if item["ok"]:
            outputs[step["tool_name"]] = step["output_json"]
        group = iterations.setdefault(step["iteration"], {"number": step["iteration"], "steps": []})
        group["steps"].append(item)
    for number in evaluations:
        iterations.setdefault(number, {"number": number, "steps": []})
    doing, pending = _pending(run, steps, evaluations)
    if pending:
        iterations.setdefault(run["iterations"], {"number": run["iterations"], "steps": []})
    longest = max([s["duration_ms"] for s in steps] + [1])
    timeline = []
    for number in sorted(iterations):
        group = iterations[number]
        group["evaluation"] = evaluations.get(number)
        group["pending"] = pending if number == run["iterations"] else []
        group["duration"] = duration(sum(s["duration_ms"] for s in group["steps"]))
        for item in group["steps"]:
            item["bar"] = max(1, round(100 * item["duration_ms"] / longest))
        timeline.append(group)
    total = {"calls": len(calls), "prompt": sum(c["prompt_tokens"] or 0 for c in calls),
             "completion": sum(c["completion_tokens"] or 0 for c in calls)}
    artifacts = [{**a, "image": a["mime"] in INLINE_IMAGES, "size_text": _size(a["size"])}
                 for a in storage.artifacts(run_id)]
    return {
        "inputs": _inputs(storage, run, workspace_days), "approvals": storage.approvals(run_id),
        "run": run, "finished": run["status"] in FINISHED, "doing": doing, "timeline": timeline,
        "calls": calls, "total": total, "artifacts": artifacts, "poll_ms": POLL_MS,
        "unsupported": stored_unsupported(run),
        "created": clock(run["created_at"]), "started": clock(run["started_at"]),
        "finished_at": clock(run["finished_at"]),
        # Only once finished: a ticking clock would change the live part on every poll.
        "elapsed": duration(_between_ms(run["started_at"], run["finished_at"])) if run["finished_at"] else "",
        "waited": duration(_between_ms(run["created_at"], run["started_at"])),
    }


def _inputs(storage: Storage, run: dict[str, Any], workspace_days: int = 0) -> list[dict[str, Any]]:
    """The files the run started with under inputs/, each with its size, where it came from, whether the
    conversation still holds its bytes (`kept`) and the id its download is served by."""
    recorded = storage.run_inputs(run["id"])
    if recorded is None:
        return _inputs_now(storage, run)
    started = _parse_time(run["started_at"])
    cutoff = started - timedelta(days=workspace_days) if started and workspace_days else None
    held = storage.held_blobs(run["conversation"])
    files = []
    for row in recorded:
        added = _parse_time(row["added_at"])
        if cutoff and added and added < cutoff:  # removed by age as the run started (Workspace.expire)
            continue
        files.append({"id": row["id"], "name": row["name"], "size_text": _size(row["size"]),
                      "origin": _origin(row["kind"], row["from_run_no"], row["from_run_id"] == run["id"]),
                      "kept": row["sha256"] in held})
    return files


def _inputs_now(storage: Storage, run: dict[str, Any]) -> list[dict[str, Any]]:
    """For a run that recorded no inputs (queued, or from an older version): its uploads and what earlier runs
    left, as the conversation's workspace holds them now; no downloads."""
    number = storage.run_number(run["id"])
    return [{"id": None, "name": f["name"], "size_text": _size(f["size"]), "kept": True,
             "origin": _origin(f["kind"], f["run_no"], f["run_id"] == run["id"])}
            for f in storage.workspace_files(run["conversation"])
            if (f["run_no"] or 0) < number or (f["run_id"] == run["id"] and f["kind"] == "upload")]


def _origin(kind: str, run_no: int | None, this_run: bool) -> str:
    """"uploaded with this run", "uploaded with run 1", "output of run 2", "result of run 2"."""
    if kind == "upload":
        return "uploaded with this run" if this_run else f"uploaded with run {run_no}"
    return {"output": f"output of run {run_no}", "result": f"result of run {run_no}"}.get(kind, f"run {run_no}")


def _size(size: int | None) -> str:
    size = size or 0
    if size < 1024:
        return f"{size} B"
    return f"{size / 1024:.1f} KiB" if size < 1024 * 1024 else f"{size / 1024 / 1024:.1f} MiB"


# ------------------------------------------------------------------------------------------ HTTP


def _not_found() -> Response:
    return PlainTextResponse("not found", status_code=404, headers=SECURITY_HEADERS)


def _gone(workspace_days: int) -> Response:
    """410 for a file whose bytes are no longer kept (agent_core/retention.py, /reset, a later replacement)."""
    return PlainTextResponse(
        f"This file is no longer kept: AutoCode removes a conversation's files after {workspace_days} days "
        "(AUTOCODE_WORKSPACE_DAYS), and /reset or a newer file of the same name removes them sooner.",
        status_code=410, headers=SECURITY_HEADERS)


def _disposition(kind: str, name: str) -> str:
    """`attachment; filename=...` safe for any stored name (ASCII fallback plus RFC 5987 UTF-8)."""
    base = Path(name).name or "artifact"
    ascii_name = re.sub(r"[^A-Za-z0-9._-]", "_", base) or "artifact"
    return f"{kind}; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(base, safe='')}"


def _read_chunks(handle: IO[bytes]) -> Iterator[bytes]:
    """An open blob in chunks, closed at the end (opened before the response, so a /reset meanwhile that unlinks
    it cannot break a download under way)."""
    try:
        while chunk := handle.read(CHUNK):
            yield chunk
    finally:
        handle.close()


class Viewer:
    """The viewer's endpoints over one Storage."""

    def __init__(self, storage: Storage, workspace_days: int = 0):
        self.storage = storage
        self.workspace_days = workspace_days
        self.env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(default=True),
                               trim_blocks=True, lstrip_blocks=True)
        self.env.filters["duration"] = duration
        self.template = self.env.get_template("viewer.html")
        pygments_css = _FORMATTER.get_style_defs(".hl")
        self.static = {
            "viewer.css": ((TEMPLATES / "viewer.css").read_text() + "\n/* Pygments */\n" + pygments_css,
                           "text/css; charset=utf-8"),
            "viewer.js": ((TEMPLATES / "viewer.js").read_text(), "text/javascript; charset=utf-8"),
        }

    def _run(self, request: Request) -> dict[str, Any] | None:
        token = request.path_params["token"]
        return self.storage.run_by_view_token(token) if TOKEN.match(token) else None

    def _render(self, run: dict[str, Any]) -> tuple[dict[str, Any], str, str]:
        """The view, the live part of the page (the template's `body` block) and that part's version."""
        view = build_view(self.storage, run, self.workspace_days)
        fragment = "".join(self.template.blocks["body"](self.template.new_context(view)))
        return view, fragment, hashlib.sha256(fragment.encode()).hexdigest()[:20]

    async def page(self, request: Request) -> Response:
        def render() -> str | None:
            run = self._run(request)
            if run is None:
                return None
            view, fragment, version = self._render(run)
            return self.template.render({**view, "fragment": Markup(fragment), "version": version})

        html = await run_in_threadpool(render)
        if html is None:
            return _not_found()
        return Response(html, media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS)

    async def state(self, request: Request) -> Response:
        """{status, finished, version, html}; `html` is null when the client's `?v=` is already current."""
        def render() -> dict[str, Any] | None:
            run = self._run(request)
            if run is None:
                return None
            view, fragment, version = self._render(run)
            return {"status": run["status"], "finished": view["finished"], "version": version,
                    "html": None if request.query_params.get("v") == version else fragment}

        body = await run_in_threadpool(render)
        if body is None:
            return _not_found()
        return JSONResponse(body, headers=SECURITY_HEADERS)

    async def artifact(self, request: Request) -> Response:
        """One of the run's own files: raster images inline, everything else as a download."""
        def find() -> dict[str, Any] | None:
            run = self._run(request)
            if run is None:
                return None
            wanted = request.path_params["artifact_id"]
            return self.storage.artifact(run["id"], wanted)

        artifact = await run_in_threadpool(find)
        if artifact is None:
            return _not_found()
        if artifact["data"] is None and artifact["size"]:  # its bytes were dropped by age
            return _gone(self.workspace_days)
        image = artifact["mime"] in INLINE_IMAGES
        headers = {**SECURITY_HEADERS, "Content-Security-Policy": "default-src 'none'; sandbox",
                   "Content-Disposition": _disposition("inline" if image else "attachment", artifact["name"])}
        media_type = artifact["mime"] if image else "application/octet-stream"
        return Response(artifact["data"] or b"", media_type=media_type, headers=headers)

    async def input_file(self, request: Request) -> Response:
        """One of the files the run started with, always as a download, while its conversation still holds it."""
        def find() -> tuple[dict[str, Any], IO[bytes], int] | str | None:
            run = self._run(request)
            if run is None:
                return None
            row = self.storage.run_input(run["id"], request.path_params["input_id"])
            if row is None or not SHA256.match(row["sha256"] or ""):
                return None
            if not row["kept"]:
                return "gone"
            try:
                handle = open(self.storage.blob_path(row["sha256"]), "rb")
            except OSError:
                return "gone"
            return row, handle, os.fstat(handle.fileno()).st_size

        found = await run_in_threadpool(find)
        if found is None:
            return _not_found()
        if found == "gone":
            return _gone(self.workspace_days)
        row, handle, size = found
        headers = {**SECURITY_HEADERS, "Content-Security-Policy": "default-src 'none'; sandbox",
                   "Content-Disposition": _disposition("attachment", row["name"]), "Content-Length": str(size)}
        return StreamingResponse(_read_chunks(handle), media_type="application/octet-stream", headers=headers)

    async def asset(self, request: Request) -> Response:
        found = self.static.get(request.path_params["name"])
        if found is None:
            return _not_found()
        text, media_type = found
        return Response(text, media_type=media_type, headers=SECURITY_HEADERS)


def routes(settings: Settings, storage: Storage) -> list[BaseRoute]:
    """The viewer's routes (none when AUTOCODE_VIEWER=off)."""
    if not settings.viewer:
        return []
    viewer = Viewer(storage, settings.workspace_days)
    return [
        Route("/runs/static/{name}", viewer.asset, methods=["GET"]),
        Route("/runs/{token}", viewer.page, methods=["GET"]),
        Route("/runs/{token}/state", viewer.state, methods=["GET"]),
        Route("/runs/{token}/artifacts/{artifact_id:int}", viewer.artifact, methods=["GET"]),
        Route("/runs/{token}/inputs/{input_id:int}", viewer.input_file, methods=["GET"]),
    ]
