"""Which process runs a run: an identity recorded on the run when it starts, so serve's restart recovery can tell a
run whose process died (interrupted) from one another process is still running (`autocode run` beside it).

The identity is `BOOT:PID:START`: the kernel's boot id, the pid and the process's start time in clock ticks since
boot (/proc/PID/stat), so a pid reused after a reboot or by a later process never passes for the one that ran.
"""

from __future__ import annotations

import functools
import os


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as handle:
            return handle.read().strip()
    except OSError:
        return ""


def _start_ticks(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2:].split()  # after "pid (comm)": state is field 3, starttime field 22
    return fields[19].decode() if len(fields) > 19 and fields[0] not in (b"Z", b"X") else None


@functools.lru_cache(maxsize=8)
def _identity(pid: int) -> str:
    return f"{_boot_id()}:{pid}:{_start_ticks(pid) or ''}"


def current_identity() -> str:
    """This process's identity (a fork has its own pid, hence its own)."""
    return _identity(os.getpid())


def is_alive_elsewhere(identity: str | None) -> bool:
    """True when `identity` names a live process of this boot other than this one."""
    if not identity or identity == current_identity():
        return False
    boot, _, rest = identity.partition(":")
    pid, _, start = rest.partition(":")
    if boot != _boot_id() or not pid.isdigit() or not start:
        return False
    return _start_ticks(int(pid)) == start
