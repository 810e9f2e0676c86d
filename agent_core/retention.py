"""Retention over every conversation: files kept past AUTOCODE_WORKSPACE_DAYS are removed whether or not their
conversation ever runs again, and so are blobs no conversation holds.

Why a sweep: a run expires its own conversation's old files as it starts (Workspace.expire), so an abandoned
conversation used to keep its files for good — on disk, and downloadable from its old run pages. `serve` sweeps at
start and every SWEEP_INTERVAL_S (Server.lifespan): it drops the workspace rows older than the limit (their blobs go
with the last row naming them), the bytes of run artifacts as old (the run page then answers 410 Gone for them,
agent_core/viewer.py), and blob files no row names (left by a crash between a blob and its row, or by an older
version). A conversation with a run queued, held or running is left to that run. A blob or a temporary file younger
than BLOB_GRACE_S is never touched: another process (the CLI on the same database) may be about to name it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from agent_core.config import Settings
from storage.db import Storage

log = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 3600.0
BLOB_GRACE_S = 3600.0


@dataclass
class Swept:
    files: int = 0  # workspace rows removed by age
    conversations: int = 0
    artifacts: int = 0  # run artifacts whose bytes were dropped by age
    orphans: int = 0  # blob (or temporary) files no row named
    freed_bytes: int = 0  # of those orphans

    def __bool__(self) -> bool:
        return bool(self.files or self.artifacts or self.orphans)


def sweep(storage: Storage, settings: Settings, now: float | None = None) -> Swept:
    """One sweep (see the module docstring); returns what it removed."""
    swept = Swept()
    moment = datetime.fromtimestamp(now, timezone.utc) if now is not None else datetime.now(timezone.utc)
    cutoff = (moment - timedelta(days=settings.workspace_days)).isoformat(timespec="milliseconds")
    busy = {r["conversation"] for r in storage.runs_with_status("queued", "held", "running")}
    for conversation, names in storage.workspace_files_before(cutoff).items():
        if conversation in busy:
            continue
        swept.files += storage.delete_workspace_files(conversation, names=names)
        swept.conversations += 1
    swept.artifacts = storage.drop_artifact_data_before(cutoff)
    swept.orphans, swept.freed_bytes = _orphan_blobs(storage, time.time() if now is None else now)
    return swept


def _orphan_blobs(storage: Storage, now: float) -> tuple[int, int]:
    directory = storage.blob_dir
    if not directory.is_dir():
        return 0, 0
    held = storage.all_blobs()
    removed = freed = 0
    for entry in directory.rglob("*"):
        try:
            info = entry.lstat()
        except OSError:
            continue
        if not entry.is_file() or now - info.st_mtime < BLOB_GRACE_S:
            continue
        if entry.name in held and entry.parent.name == entry.name[:2]:
            continue
        try:
            entry.unlink()
        except OSError as exc:
            log.warning("retention: could not remove %s: %s", entry, exc)
            continue
        removed += 1
        freed += info.st_size
    return removed, freed


async def run_periodically(storage: Storage, settings: Settings, interval: float = SWEEP_INTERVAL_S) -> None:
    """Sweep now and every `interval` seconds until cancelled; a failed sweep is logged and tried next time."""
    while True:
        try:
            swept = await asyncio.to_thread(sweep, storage, settings)
            if swept:
                log.info("retention: removed %d files of %d conversations and the bytes of %d artifacts older than "
                         "%d days (AUTOCODE_WORKSPACE_DAYS), and %d unreferenced blobs (%.1f MB)",
                         swept.files, swept.conversations, swept.artifacts, settings.workspace_days, swept.orphans,
                         swept.freed_bytes / 1048576)
        except Exception as exc:  # a full disk or a locked database: the next sweep tries again
            log.warning("retention: the sweep failed (%s: %s); trying again in %.0f s", type(exc).__name__, exc,
                        interval)
        await asyncio.sleep(interval)


__all__ = ["SWEEP_INTERVAL_S", "Swept", "run_periodically", "sweep"]
