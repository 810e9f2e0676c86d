"""The guardian: what ends a run's leftovers on the `process` backend when the server itself dies.

Without namespaces nothing ties a step's daemons (setsid, double fork, SIGHUP ignored) to the server: a `kill -9`
of the server leaves them running. The executor therefore starts this small process next to its workers, holding
the write end of a pipe on its stdin. The guardian blocks reading it; end of file means the executor is gone. If it
died (however: `kill -9` included) rather than stopped in order (`stop()` writes STOPPED first, having closed its
workers itself), the guardian kills every process of the executor's run uids, removes the System V IPC objects they
own and the run directories they own, and exits. Those uids are the executor's alone: it claimed them machine-wide
(uids.py) and the guardian inherits the claim's lock files, so no other process can take them before the sweep ends
and the sweep never reaches another process's steps.

Run as `python -I -S -B guardian.py UID_BASE COUNT RUNS_DIR`; it imports only the standard library, and the server
imports `kill_uid` and `remove_ipc_of` from here for its own per-run cleanup.
"""

import ctypes
import os
import shutil
import signal
import sys

_IPC_RMID = 0
STOPPED = b"stopped\n"  # what the executor writes before closing the pipe when it stopped in order
_IPC_TABLES = ("shm", "msg", "sem")


def kill_uid(uid):
    """SIGKILL every process of `uid`: kill(-1) as that uid reaches exactly its processes (and never ours)."""
    killer = os.fork()
    if killer == 0:
        try:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            os.kill(-1, signal.SIGKILL)
            os.kill(-1, signal.SIGKILL)  # a fork racing with the first pass fails on its pending SIGKILL
        except OSError:
            pass
        finally:
            os._exit(0)
    os.waitpid(killer, 0)


def remove_ipc_of(uid):
    """Remove the System V shared memory segments, message queues and semaphore sets `uid` created or owns, and
    its POSIX message queues and /dev/shm files. Returns how many objects were removed."""
    libc = ctypes.CDLL(None, use_errno=True)
    removers = {"shm": lambda i: libc.shmctl(i, _IPC_RMID, None), "msg": lambda i: libc.msgctl(i, _IPC_RMID, None),
                "sem": lambda i: libc.semctl(i, 0, _IPC_RMID)}
    removed = 0
    for table in _IPC_TABLES:
        try:
            with open(f"/proc/sysvipc/{table}") as handle:
                header, *rows = handle.read().splitlines()
        except OSError:
            continue
        columns = header.split()  # key, then shmid / msqid / semid, perms, ... uid, gid, cuid, cgid ...
        for row in rows:
            values = row.split()
            fields = dict(zip(columns, values))
            if str(uid) in (fields.get("uid"), fields.get("cuid")) and removers[table](int(values[1])) == 0:
                removed += 1
    for directory in ("/dev/mqueue", "/dev/shm"):
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        for name in names:
            path = os.path.join(directory, name)
            try:
                if os.lstat(path).st_uid == uid:
                    os.unlink(path)
                    removed += 1
            except OSError:
                pass
    return removed


def sweep(uids, runs_dir):
    """End everything of `uids`: their processes, IPC objects and run directories under `runs_dir`."""
    for uid in uids:
        kill_uid(uid)
    for uid in uids:
        remove_ipc_of(uid)
    try:
        entries = list(os.scandir(runs_dir))
    except OSError:
        entries = []
    for entry in entries:
        try:
            if entry.name.startswith("run-") and entry.stat(follow_symlinks=False).st_uid in uids:
                shutil.rmtree(entry.path, ignore_errors=True)
        except OSError:
            pass


def main():
    uid_base, count, runs_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C reaches the server, not its guardian
    said = b""
    while True:
        try:
            chunk = os.read(0, 4096)
        except InterruptedError:
            continue
        except OSError:
            break
        if not chunk:
            break
        said += chunk
    if said != STOPPED:  # the executor died without `stop()`: what it left is ours to end
        sweep(range(uid_base, uid_base + count), runs_dir)


if __name__ == "__main__":
    main()
