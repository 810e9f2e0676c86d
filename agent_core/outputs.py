"""Where a run's results are, for the command line and the API: the files it made (stored with the run in the
database, not on disk), saving them into a directory, and the run's page link.

`autocode run` ends with `files_report` (the files, and where they are: saved with --save-to, or how to get them);
`--json`, `autocode show`, `POST /api/runs` and `GET /api/runs/{id}` carry `run_link` when AUTOCODE_PUBLIC_URL is
set (agent_core.viewer.run_url: the link chat answers carry).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from agent_core.config import Settings
from agent_core.terminal import safe_for_terminal
from agent_core.viewer import run_url


def run_link(settings: Settings, storage: Any, run_id: str) -> str | None:
    """The run's page (`{AUTOCODE_PUBLIC_URL}/runs/{view_token}`), or None: no such run, no public URL, viewer off."""
    run = storage.get_run(run_id)
    return run_url(settings, run) if run else None


def save_files(storage: Any, run_id: str, directory: Path, expired: list[str] | None = None) -> list[Path]:
    """Write the run's files into `directory` (made if missing); their absolute paths. Names come from the
    sandbox: only the last component is used, so nothing lands outside `directory`. Files whose bytes the
    retention sweep removed (agent_core/retention.py) are not written; their names go to `expired`."""
    directory = directory.expanduser().resolve()
    directory.mkdir(parents=True, exist_ok=True)
    saved = []
    for artifact in storage.artifacts(run_id, with_data=True):
        if artifact["data"] is None and artifact["size"]:
            if expired is not None:
                expired.append(artifact["name"])
            continue
        target = directory / Path(artifact["name"]).name
        target.write_bytes(artifact["data"] or b"")
        saved.append(target)
    return saved


def files_report(run_id: str, files: list[dict[str, Any]], saved: list[Path] | None, link: str | None) -> list[str]:
    """The lines `autocode run` ends with: each file the run made, and where it is. Names are untrusted (made safe
    for the terminal)."""
    lines = []
    if files:
        lines.append(f"Files of run {run_id} ({len(files)}):")
        places = {path.name: path for path in saved or []}
        for item in files:
            name = Path(item["name"]).name
            where = f"  -> {places[name]}" if name in places else ""
            lines.append(f"  {safe_for_terminal(name, single_line=True)}  "
                         f"({safe_for_terminal(item.get('mime') or '-', single_line=True)}, "
                         f"{int(item.get('size') or 0)} bytes){safe_for_terminal(where, single_line=True)}")
        if saved is None:
            lines.append(f"  stored with the run: save them with --save-to DIR, or later with "
                         f"`autocode show {run_id} --save-artifacts DIR`")
    if link:
        lines.append(f"Run page: {safe_for_terminal(link, single_line=True)}")
    return lines
