"""Which process owns a database: an OS lock on a file beside it (`<db>.lock`), held for as long as it serves.

One `autocode serve` owns a database at a time. Its start-up marks the runs a crash left `running` or `held` as
interrupted and removes the temporary files of uploads a crash cut off; a second serve on the same database (a
rolling deploy, a restart before the old one exits, a second serve whose port is taken: its start-up runs before
the bind) would do that to the first one's live runs. So serve takes this lock before anything else and refuses to
start when another process holds it, naming that process. The lock is `flock` on an open file: the kernel drops it
when its holder exits however it exits (kill -9 included), so a crash never leaves a stale lock behind; the pid
written in the file is only what the refusal names.

`autocode run` and the other CLI commands do not take it: they may run beside a serve (steps under a uid range of
their own, agent_core/sandbox/uids.py) and never do restart recovery.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from storage.db import StorageRefused


class DatabaseBusy(StorageRefused):
    """Another process owns the database; the message is the sentence for the operator."""


def lock_path(db_path: str | Path) -> Path:
    db_path = Path(db_path)
    return db_path.with_name(db_path.name + ".lock")


class DatabaseOwner:
    """The held lock of one database. `acquire(path)`, then `release()` (or let the process exit)."""

    def __init__(self, db_path: Path, fd: int):
        self.db_path = db_path
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, db_path: str | Path) -> "DatabaseOwner":
        """Own the database at `db_path`, or raise DatabaseBusy naming the pid that does."""
        db_path = Path(db_path)
        path = lock_path(db_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            who = f"pid {holder}" if holder.isdigit() else "another process"
            raise DatabaseBusy(
                f"another autocode serve ({who}) already owns the database {db_path}; one server per database: "
                f"stop that one first, or give this one another AUTOCODE_DB (lock: {path})") from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)  # for the sentence a second serve gets
        except OSError:  # a full disk: the lock holds all the same; a second serve names "another process"
            pass
        return cls(db_path, fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.ftruncate(fd, 0)
            except OSError:
                pass
            os.close(fd)

    def __del__(self) -> None:
        self.release()


def owner_pid(db_path: str | Path) -> int | None:
    """The pid owning the database now (None when no process does)."""
    return lock_holder(lock_path(db_path))


def lock_holder(path: Path) -> int | None:
    """The pid written in the lock file `path` while a process holds its flock (-1 when it holds it but wrote no
    pid); None when nobody holds it. Also used for the sandbox's uid claims (agent_core/sandbox/uids.py)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 64, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
