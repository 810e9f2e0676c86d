"""The one way a serve-side entry point attaches files to a run: submit it held, stream its files, release or fail.

Why a seam: a chat platform retries an event it thinks was not acknowledged, and a file download takes longer than
the acknowledgement may. So the run is stored first (de-duplicated by its delivery id, before the platform is
acknowledged) but *held* — the scheduler does not start it — and the files are received afterwards:

    submission = runtime.scheduler.submit(task, conversation, user=user, adapter="slack",
                                          delivery_id=event_id, reply_to=route, hold=True)
    if submission.status != "held":
        return  # "duplicate": this delivery already has its run (and its download): do not download again
    # ... acknowledge the platform, then, in the background:
    async with uploads.receiving(runtime.scheduler, submission.run_id) as receiver:
        for name, url in files:
            await receiver.add(name, stream_of(url))  # an async iterable of bytes chunks
            # or: raise uploads.DownloadFailed("Telegram's public Bot API serves files up to 20 MB; ...")

On leaving the block without an error the files join the conversation's workspace (Workspace.admit/add_uploads:
the limits, safe names, the quota) and the run is released to the scheduler. On InputRefused (over
AUTOCODE_INPUT_MAX_MB while streaming — reading stops at the cap —, over AUTOCODE_INPUT_MAX_FILES, over the
workspace quota), DownloadFailed or any other error, the run ends `failed` with a message for the user and its
RunFinished event, so the adapter renders it like any failed run; the block does not raise (cancellation excepted:
the run is failed, then the CancelledError goes on). `receiver.failure` says what happened. A held run that serve's
restart finds is interrupted and its user told, like a running one.

Each file is streamed to a private temporary file (0600, in a 0700 directory removed on exit), never whole in memory.
Those directories live under `<db>.uploads/` beside the database (`upload_root`), the server's own: a serve killed
while receiving leaves its directory there, and the next serve (the database's owner, storage/owner.py) removes
every one at start (`remove_leftovers`, from the scheduler's restart recovery, which interrupts their held runs).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, AsyncIterable, AsyncIterator

from agent_core.disk import DISK_FULL, NoRoom, disk_full, room_refusal
from agent_core.inputs import InputRefused, renamed_note
from agent_core.workspace import Workspace

log = logging.getLogger(__name__)


def upload_root(storage: Any) -> Path:
    """Where uploads being received are kept: `<db>.uploads/` beside the database."""
    return storage.path.with_name(storage.path.name + ".uploads")


def remove_leftovers(storage: Any) -> int:
    """Remove what uploads cut off by a crash left in `upload_root` (only the owner of the database calls this,
    at start, when no upload of its own is under way); returns how many directories were removed."""
    root = upload_root(storage)
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return 0
    removed = 0
    for entry in entries:
        if entry.name.startswith("receiving-"):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed += 1
    if removed:
        log.warning("removed %d upload directories a previous server left in %s", removed, root)
    return removed


class DownloadFailed(InputRefused):
    """A file could not be fetched from the platform; the message is for the user."""


class Receiver:
    """Collects one held run's files on disk; made by `receiving`."""

    def __init__(self, directory: Path, max_mb: int, max_files: int):
        self.directory = directory
        self.max_mb = max_mb
        self.max_bytes = max_mb * 1024 * 1024
        self.max_files = max_files
        self.files: list[tuple[str, Path]] = []  # (the name the user gave, where its bytes are)
        self.failure: BaseException | None = None  # set on leaving the block when the run was failed
        self.released = False
        self.note: str | None = None  # for the user, once stored: files renamed (agent_core.inputs.workspace_name)
        self.refusal: str | None = None  # no room on the disk: `add` takes nothing

    async def add(self, name: str, chunks: AsyncIterable[bytes]) -> int:
        """Stream one file to disk; returns its size. InputRefused once it is over AUTOCODE_INPUT_MAX_MB (reading
        stops there) or when it would be one file too many."""
        if self.refusal:
            raise NoRoom(self.refusal)
        if len(self.files) >= self.max_files:
            raise InputRefused(f"more than the {self.max_files} files a task can take (AUTOCODE_INPUT_MAX_FILES); "
                               "nothing was run.")
        fd, temporary = tempfile.mkstemp(dir=self.directory, prefix="upload-")  # mode 0600
        size = 0
        iterator = chunks.__aiter__()
        try:
            with os.fdopen(fd, "wb") as out:
                async for chunk in iterator:
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise InputRefused(f"{name} is over the limit of {self.max_mb} MB a file "
                                           "(AUTOCODE_INPUT_MAX_MB); nothing was run.")
                    out.write(chunk)
        finally:
            closer = getattr(iterator, "aclose", None)
            if closer is not None:  # stop the download itself, not only our reading of it
                with contextlib.suppress(Exception):
                    await closer()
        self.files.append((name, Path(temporary)))
        return size


@contextlib.asynccontextmanager
async def receiving(scheduler: Any, run_id: str) -> AsyncIterator[Receiver]:
    """Receive the files of a run submitted with `hold=True` (see the module docstring); release or fail it on
    exit. `scheduler` is the RunScheduler (or anything with `.scheduler`, e.g. bots.Runtime)."""
    scheduler = getattr(scheduler, "scheduler", scheduler)
    storage, settings = scheduler.storage, scheduler.settings
    run = storage.get_run(run_id)
    if run is None or run["status"] != "held":
        raise ValueError(f"run {run_id} is not held (submit it with hold=True; a duplicate has its own files)")
    root = upload_root(storage)
    reserve = settings.disk_reserve_mb * 1024 * 1024
    # Checked before anything is received: a full disk is told as such (sending again cannot help until then).
    # The files are received beside the database (upload_root), then kept as blobs there: one filesystem.
    refusal = room_refusal(0, reserve, {"AutoCode's files": storage.path.parent})
    with contextlib.ExitStack() as stack:
        if not refusal:
            root.mkdir(mode=0o700, exist_ok=True)
        directory = tempfile.gettempdir() if refusal else stack.enter_context(
            tempfile.TemporaryDirectory(prefix=f"receiving-{run_id}-", dir=root))  # 0700
        receiver = Receiver(Path(directory), settings.input_max_mb, settings.input_max_files)
        receiver.refusal = refusal
        try:
            yield receiver
            if refusal:
                raise NoRoom(refusal)
            workspace = Workspace(storage, settings)
            admitted = workspace.admit(run["conversation"], receiver.files)
            if (storage.get_run(run_id) or {}).get("status") != "held":
                return  # cancelled or interrupted meanwhile: nothing is stored for it
            receiver.note = renamed_note(workspace.add_uploads(run["conversation"], run_id, admitted))
            receiver.released = scheduler.release(run_id)
        except InputRefused as refused:
            receiver.failure = refused
            await scheduler.fail_held(run_id, str(refused))
        except asyncio.CancelledError as cancelled:
            receiver.failure = cancelled
            await asyncio.shield(scheduler.fail_held(run_id, "Receiving the files was cut off; nothing was run. "
                                                             "Please send them again."))
            raise
        except Exception as exc:
            receiver.failure = exc
            if disk_full(exc):
                log.error("receiving the files of run %s: the disk is full (%s)", run_id, exc)
                receiver.failure = NoRoom(f"{DISK_FULL}, so AutoCode could not take these files; nothing was run. "
                                          "The operator must free space (sending them again will not help "
                                          "until then).")
                await scheduler.fail_held(run_id, str(receiver.failure))
                return
            log.exception("receiving the files of run %s failed", run_id)
            await scheduler.fail_held(run_id, f"AutoCode could not receive the files ({type(exc).__name__}); "
                                              "nothing was run. Please send them again.")


__all__ = ["DownloadFailed", "InputRefused", "Receiver", "receiving"]
