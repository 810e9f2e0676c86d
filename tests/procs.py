"""What is running on the host, read from /proc: the tests use it to prove nothing of a sandbox survives."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class HostProcess:
    pid: int
    ppid: int
    uid: int  # real uid
    euid: int
    state: str
    start: int  # start time in clock ticks since boot: tells a reused pid from the original
    cmdline: str

    @property
    def alive(self) -> bool:
        return self.state not in ("Z", "X")


def host_processes() -> list[HostProcess]:
    """Every process visible in the host's /proc."""
    found: list[HostProcess] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        uids = next((line.split()[1:3] for line in status.splitlines() if line.startswith("Uid:")), ["-1", "-1"])
        found.append(HostProcess(int(entry.name), int(fields[1]), int(uids[0]), int(uids[1]), fields[0],
                                 int(fields[19]), cmdline.strip()))
    return found
