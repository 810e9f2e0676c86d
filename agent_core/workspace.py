"""A conversation's workspace: the files its runs were given and made, kept for the follow-ups.

After each run, its uploads, the files it wrote under outputs/ (the artifacts the loop keeps) and its result dict
(`results/run-N.json`) belong to the conversation; the next run in it finds them all under inputs/, and the
planner's manifest says where each came from. A newer file of the same name replaces the older one.

Bytes are content-addressed: each is a blob file named by its sha256 under `<db>.blobs/` (mode 0600, directories
0700), and rows in the `workspace_files` table name them. Files rather than a blobs table because a 50 MB upload
is then copied in chunks (never whole in memory, and never through SQLite's WAL), is stored once however many
runs or conversations hold it, and is handed to the sandbox straight from disk. The quota counts each blob once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterable

from agent_core.config import Settings
from agent_core.disk import NoRoom, room_refusal
from agent_core.inputs import RESULTS_DIR, InputFile, InputRefused, check_uploads, renamed_note, workspace_name
from agent_core.sandbox import Artifact
from storage.db import Storage

log = logging.getLogger(__name__)

CHUNK = 1 << 20
RESULT_ANSWER_CHARS = 4000  # a result file stays small: the answer as the user read it, clipped
RESULTS_KEPT = 5  # results/run-N.json of the latest runs only: a long conversation's inputs/ stays short


class Workspace:
    """The workspace of every conversation, over one `Storage`."""

    def __init__(self, storage: Storage, settings: Settings):
        self.storage = storage
        self.quota = settings.workspace_mb * 1024 * 1024
        self.max_age = timedelta(days=settings.workspace_days)
        self.settings = settings

    # --- blobs -------------------------------------------------------------------------------------------
    def _store(self, chunks: Iterable[bytes]) -> tuple[str, int]:
        """Write the bytes as a blob (once: an existing blob of the same hash is kept); returns (sha256, size)."""
        directory = self.storage.blob_dir
        directory.mkdir(mode=0o700, exist_ok=True)
        digest, size = hashlib.sha256(), 0
        fd, temporary = tempfile.mkstemp(dir=directory, prefix=".incoming-")  # mode 0600
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:
                    digest.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
            sha256 = digest.hexdigest()
            target = self.storage.blob_path(sha256)
            target.parent.mkdir(mode=0o700, exist_ok=True)
            if target.exists():
                os.unlink(temporary)
                os.utime(target)  # named again: the retention sweep's grace for unnamed blobs starts anew
            else:
                os.replace(temporary, target)
        except BaseException:
            if os.path.exists(temporary):
                os.unlink(temporary)
            raise
        return sha256, size

    @staticmethod
    def _read_chunks(path: Path) -> Iterable[bytes]:
        with open(path, "rb") as handle:
            while chunk := handle.read(CHUNK):
                yield chunk

    # --- what a conversation holds ---------------------------------------------------------------------------
    def usage(self, conversation: str) -> int:
        """Bytes the conversation's workspace holds (each blob counted once)."""
        return sum({r["sha256"]: r["size"] for r in self.storage.workspace_files(conversation)}.values())

    def listing(self, conversation: str) -> list[dict[str, Any]]:
        """The files with their origin, for `autocode history` and the manifest."""
        return [{**row, "origin": _origin(row)} for row in self.storage.workspace_files(conversation)]

    def admit(self, conversation: str, files: list[Path | tuple[str, Path]]) -> list[tuple[Path, str]]:
        """Check the user's files against the limits and the quota, and name them for inputs/; InputRefused (with
        the user's message) over any of them. Nothing is stored or read yet. A file is a local path, or (the name
        the user gave it, e.g. an upload's, untrusted; where its bytes are on disk)."""
        given = [(f[0], Path(f[1])) if isinstance(f, tuple) else (Path(f).name, Path(f)) for f in files]
        checked = check_uploads([path for _, path in given], self.settings.input_max_mb, self.settings.input_max_files)
        existing = {r["name"]: r for r in self.storage.workspace_files(conversation)}
        taken: set[str] = set()
        admitted = []
        for (given_name, _), (path, _size) in zip(given, checked):
            name = workspace_name(given_name, taken)  # `results` becomes `results (upload)`
            taken.add(name)
            admitted.append((path, name))
        replaced = {existing[n]["sha256"]: existing[n]["size"] for _, n in admitted if n in existing}
        adding = sum(size for _, size in checked)
        after = self.usage(conversation) - sum(replaced.values()) + adding
        if after > self.quota:
            raise InputRefused(
                f"these files would make this conversation's files {after / 1048576:.1f} MB, over its quota of "
                f"{self.settings.workspace_mb} MB (AUTOCODE_WORKSPACE_MB); /reset clears them. Nothing was run.")
        self.check_room(adding)
        return admitted

    def check_room(self, adding: int) -> None:
        """NoRoom (the user's sentence) when `adding` bytes more would take the kept files of all conversations
        over AUTOCODE_WORKSPACES_MAX_MB, or leave less than AUTOCODE_DISK_RESERVE_MB free where they are kept."""
        cap = self.settings.workspaces_max_mb
        if cap:
            total = self.storage.blobs_total() + adding
            if total > cap * 1024 * 1024:
                raise NoRoom(f"AutoCode keeps {cap} MB of files over all conversations at most "
                             f"(AUTOCODE_WORKSPACES_MAX_MB), and these would make {total / 1048576:.1f} MB, so "
                             "they were not taken; nothing was run. Older files are removed after "
                             f"{self.settings.workspace_days} days (AUTOCODE_WORKSPACE_DAYS), and /reset clears a "
                             "conversation's files.")
        refusal = room_refusal(adding, self.settings.disk_reserve_mb * 1024 * 1024,
                               {"AutoCode's files": self.storage.blob_dir})
        if refusal:
            raise NoRoom(refusal)

    def add_uploads(self, conversation: str, run_id: str, admitted: list[tuple[Path, str]]) -> list[str]:
        """Store admitted files (see `admit`) for the run, before it starts, streamed into blobs."""
        run_no = self.storage.run_number(run_id)
        for path, name in admitted:
            sha256, size = self._store(self._read_chunks(path))
            self.storage.add_workspace_file({"conversation": conversation, "name": name, "sha256": sha256,
                                             "size": size, "kind": "upload", "run_id": run_id, "run_no": run_no})
        return [name for _, name in admitted]

    def expire(self, conversation: str) -> list[str]:
        """Drop files older than AUTOCODE_WORKSPACE_DAYS; returns what the user is told about them."""
        cutoff = (datetime.now(timezone.utc) - self.max_age).isoformat(timespec="milliseconds")
        old = [r for r in self.storage.workspace_files(conversation) if (r["created_at"] or "") < cutoff]
        if not old:
            return []
        self.storage.delete_workspace_files(conversation, names=[r["name"] for r in old])
        names = ", ".join(r["name"] for r in old[:5]) + (f" and {len(old) - 5} more" if len(old) > 5 else "")
        return [f"Removed from this conversation's files after {self.settings.workspace_days} days "
                f"(AUTOCODE_WORKSPACE_DAYS): {names}."]

    def inputs_for(self, conversation: str) -> list[InputFile]:
        """The workspace as the files of the next run's inputs/ (blobs on disk, never read here)."""
        files = []
        for row in self.listing(conversation):
            path = self.storage.blob_path(row["sha256"])
            if not path.is_file():
                log.warning("workspace of %s: blob of %s is missing", conversation, row["name"])
                continue
            files.append(InputFile(row["name"], path, row["size"], row["origin"], row["sha256"]))
        return files

    def keep_run(self, conversation: str, run_id: str, artifacts: list[Artifact], result: dict[str, Any]) -> str | None:
        """After a run: its kept artifacts and its result dict join the workspace, within the quota. Returns a note
        for the user naming files left out, or None."""
        run_no = self.storage.run_number(run_id)
        existing = {r["name"]: r for r in self.storage.workspace_files(conversation)}
        used = self.usage(conversation)
        left_out = []
        entries: list[tuple[str, bytes, str]] = []
        uploads = {n for n, r in existing.items() if r["kind"] == "upload"}
        for artifact in artifacts:
            # An output never replaces the user's own file (a step cannot rewrite an upload through outputs/);
            # it replaces an earlier output of the same name (the newer chart).
            name = workspace_name(artifact.name.replace("/", "_"), uploads)
            entries.append((name, artifact.data, "output"))
        result_bytes = json.dumps(result, ensure_ascii=False, indent=1, default=str).encode()
        entries.append((f"{RESULTS_DIR}/run-{run_no}.json", result_bytes, "result"))
        total_cap = self.settings.workspaces_max_mb * 1024 * 1024
        total = self.storage.blobs_total() if total_cap else 0
        over_total = []
        for name, data, kind in entries:
            old = existing.get(name)
            grows = len(data) - (old["size"] if old else 0)
            if used + grows > self.quota:
                left_out.append(name)
                continue
            if total_cap and grows > 0 and total + grows > total_cap:
                over_total.append(name)
                continue
            sha256, size = self._store([data])
            self.storage.add_workspace_file({"conversation": conversation, "name": name, "sha256": sha256,
                                             "size": size, "kind": kind, "run_id": run_id, "run_no": run_no})
            used += grows
            total += grows
        results = sorted((r for r in self.storage.workspace_files(conversation) if r["kind"] == "result"),
                         key=lambda r: r["run_no"])
        if len(results) > RESULTS_KEPT:
            self.storage.delete_workspace_files(conversation, names=[r["name"] for r in results[:-RESULTS_KEPT]])
        notes = []
        if left_out:
            notes.append(f"Not kept for follow-ups (this conversation's files are over {self.settings.workspace_mb} "
                         f"MB, AUTOCODE_WORKSPACE_MB; /reset clears them): {_names(left_out)}.")
        if over_total:
            notes.append(f"Not kept for follow-ups (AutoCode's files over all conversations are at their cap of "
                         f"{self.settings.workspaces_max_mb} MB, AUTOCODE_WORKSPACES_MAX_MB): {_names(over_total)}.")
        return "\n".join(notes) or None

    def renamed(self, conversation: str, run_id: str) -> str | None:
        """What the user of `run_id` is told about their uploads renamed because the workspace uses the name."""
        return renamed_note(r["name"] for r in self.storage.workspace_files(conversation)
                            if r["kind"] == "upload" and r["run_id"] == run_id)

    def clear(self, conversation: str) -> int:
        return self.storage.delete_workspace_files(conversation)


async def run_with_files(agent: Any, task: str, conversation: str, paths: list[Path | tuple[str, Path]], *,
                         user: str = "", adapter: str = "cli") -> Any:
    """Run a task with files (an agent_core.loop.Agent's run, with uploads): InputRefused before anything runs
    or is stored when they are over a limit; otherwise they join the conversation's workspace and the run starts."""
    workspace = Workspace(agent.storage, agent.settings)
    admitted = workspace.admit(conversation, paths)
    run_id = agent.storage.create_run(conversation, task.strip(), status="queued", user=user, adapter=adapter)
    workspace.add_uploads(conversation, run_id, admitted)
    return await agent.execute(run_id)


def result_record(run_no: int, run_id: str, task: str, status: str, answer: str, error: str | None,
                  files: list[str]) -> dict[str, Any]:
    """The small result dict kept as results/run-N.json."""
    clipped = answer if len(answer) <= RESULT_ANSWER_CHARS else answer[:RESULT_ANSWER_CHARS] + " …"
    return {"run": run_no, "run_id": run_id, "task": task, "status": status, "answer": clipped, "error": error,
            "files": files}


def _names(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _origin(row: dict[str, Any]) -> str:
    return {"upload": f"uploaded with run {row['run_no']}", "output": f"output of run {row['run_no']}",
            "result": f"result of run {row['run_no']}"}.get(row["kind"], "")


__all__ = ["InputRefused", "Workspace", "result_record", "run_with_files"]
