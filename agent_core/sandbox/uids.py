"""Sandbox uid ranges claimed exclusively per process, machine-wide.

Every process that runs steps (serve, `autocode run`, a Celery worker, a test) drops them to uids of its own: one
per live worker, so RLIMIT_NPROC and `kill(-1)` reach exactly one run. Two processes using the same uids at once
would be one run's leftovers for the other: a worker's close kills every process of its uid, and the guardian of a
killed process kills every process of its whole range. So a process claims its range before using it: one lock
file per uid in a root-only directory (`/run/autocode/uids`, or `/tmp/autocode-uids` without /run), each held
with `flock` for as long as the range is in use. The claim starts at AUTOCODE_SANDBOX_UID_BASE and takes the first
`count` consecutive uids nobody holds (skipping uids of real accounts, e.g. `nobody`); per-uid files make ranges of
any size and base exclusive. A lock ends with the last holder of its file: the guardian (guardian.py) inherits the
locks, so a killed server's range stays claimed until its guardian has swept it. Each file says the claimer's pid.
"""

from __future__ import annotations

import errno
import fcntl
import os
import pwd
import stat
from pathlib import Path

from agent_core.sandbox import SandboxUnavailable
from storage.owner import lock_holder

UID_MAX = 2**31 - 2  # far below (uid_t)-1 and the overflow uid
SEARCH_LIMIT = 1 << 20  # uids looked at past the base before giving up


def claims_directory() -> Path:
    """Where the per-uid lock files live: the same path for every process of the machine."""
    run = Path("/run")
    return run / "autocode" / "uids" if run.is_dir() and os.access(run, os.W_OK) else Path("/tmp/autocode-uids")


class UidClaim:
    """`count` consecutive uids from `first`, locked by this process until `release()` (or its exit)."""

    def __init__(self, first: int, count: int, fds: list[int]):
        self.first, self.count, self.fds = first, count, fds

    @property
    def uids(self) -> range:
        return range(self.first, self.first + self.count)

    def release(self) -> None:
        fds, self.fds = self.fds, []
        for fd in fds:
            os.close(fd)  # the lock goes with the last descriptor of the file (a guardian may hold one still)

    def __del__(self) -> None:
        self.release()


def _is_account(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


def _try_lock(directory: Path, uid: int) -> int | None:
    """The locked descriptor of `uid`'s file, or None when another process holds it."""
    fd = os.open(directory / f"{uid}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return None
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def holder_of(uid: int, directory: Path | None = None) -> int | None:
    """The pid that claimed `uid` (as its file says) while the claim is held; None when it is free."""
    return lock_holder((directory or claims_directory()) / f"{uid}.lock")


def claim_range(base: int, count: int, directory: Path | None = None) -> UidClaim:
    """Claim the first `count` consecutive free uids from `base` (see the module docstring). SandboxUnavailable
    when none are free within SEARCH_LIMIT uids."""
    directory = directory or claims_directory()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    status = os.lstat(directory)
    if not stat.S_ISDIR(status.st_mode) or status.st_uid != os.geteuid():  # e.g. planted in a shared /tmp
        raise SandboxUnavailable(f"{directory} is not a directory of this user's: sandbox uids cannot be claimed")
    os.chmod(directory, 0o700)  # steps run as other uids: they must not reach (and hold) these files
    held: list[int] = []
    first = uid = base
    while len(held) < count:
        if uid > min(UID_MAX, base + SEARCH_LIMIT):
            for fd in held:
                os.close(fd)
            raise SandboxUnavailable(
                f"no {count} free consecutive sandbox uids from {base} (AUTOCODE_SANDBOX_UID_BASE): other AutoCode "
                f"processes on this machine hold them (see {directory})")
        fd = None if _is_account(uid) else _try_lock(directory, uid)
        if fd is None:  # taken: start again past it
            for held_fd in held:
                os.close(held_fd)
            held = []
            first = uid = uid + 1
            continue
        held.append(fd)
        uid += 1
    return UidClaim(first, count, held)
