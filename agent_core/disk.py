"""The server's disk: telling a full one from other errors, checking there is room before taking files, and
probing whether the data directory (the database and its blobs) can be written at all.

Why its own module: a full disk reaches AutoCode as SQLite's "database or disk is full", as OSError ENOSPC (or
EDQUOT) from a blob or a temporary file, wrapped in other errors on the way; the scheduler, the uploads, the HTTP
guard and /healthz must all recognise it the same way and tell the user the same sentence, DISK_FULL.
"""

from __future__ import annotations

import errno
import os
import shutil
import sqlite3
import tempfile
from pathlib import Path

from agent_core.inputs import InputRefused

DISK_FULL = "The server's disk is full"
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}


class NoRoom(InputRefused):
    """Files refused because the disk (or the total cap on kept files) has no room for them: the message is for
    the user and says sending them again will not help until the operator acts."""


def disk_full(exc: BaseException | None) -> bool:
    """Whether `exc` (or an error it was raised from) says the disk is full."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
            return True
        if isinstance(exc, sqlite3.Error) and ("disk is full" in str(exc) or getattr(
                exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def free_bytes(path: Path) -> int:
    """Bytes free for us on the filesystem holding `path` (its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def room_refusal(needed: int, reserve: int, places: dict[str, Path]) -> str | None:
    """The user's sentence when a place (a label -> a directory) has less than `needed` + `reserve` bytes free,
    else None."""
    for label, path in places.items():
        free = free_bytes(path)
        if free < needed + reserve:
            return (f"{DISK_FULL} ({free / 1048576:.0f} MB free for {label}, "
                    f"{(needed + reserve) / 1048576:.0f} MB needed with AUTOCODE_DISK_RESERVE_MB), so AutoCode "
                    "cannot take these files; nothing was run. The operator must free space (sending them again "
                    "will not help until then).")
    return None


def directory_writable(directory: Path) -> str | None:
    """None if a small file can be written in `directory`, else why not (the probe /healthz makes)."""
    try:
        fd, name = tempfile.mkstemp(dir=directory, prefix=".autocode-health-")
    except OSError as exc:
        return f"{directory}: {exc.strerror}"
    try:
        os.write(fd, b"\0" * 4096)  # one page: a full filesystem refuses it (no fsync: a health check is cheap)
        return None
    except OSError as exc:
        return f"{directory}: {exc.strerror}"
    finally:
        os.close(fd)
        try:
            os.unlink(name)
        except OSError:
            pass


__all__ = ["DISK_FULL", "NoRoom", "directory_writable", "disk_full", "free_bytes", "room_refusal"]
