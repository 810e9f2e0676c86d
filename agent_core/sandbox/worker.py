"""The warm sandbox worker: one per run, started ahead of time, forks one confined process per step.

Runs as `python -I -B -u worker.py FD` inside the sandbox (bubblewrap namespaces, or none in the fallback
backend) and imports nothing from AutoCode but its siblings. FD is a SOCK_SEQPACKET control socket to the
server: one JSON object per message, file descriptors attached with SCM_RIGHTS.

  server -> worker: {"op": "step", "limits": {...}}      + fds [step socket, stdout pipe, stderr pipe]
                    {"op": "finish"}                      kill every process of the step, report its exit
                    {"op": "collect", "max_file_bytes", "max_total_bytes"}  + fd [file for a tar of outputs/]
                    {"op": "archive", ...same caps}         + fd [file for a tar of the working directory]
                    {"op": "restore"}                       + fd [a tar made by "archive", unpacked into it]
                    {"op": "inputs"}                        + fd [a tar of the run's input files -> inputs/]
  worker -> server: {"op": "ready", ...} once, then {"op": "started", "pid"}, {"op": "exited", "returncode"},
                    {"op": "collected" | "archived", "files", "skipped"}, {"op": "restored", "error"?},
                    {"op": "inputs_put", "files", "error"?}

The worker itself stays privileged enough to drop a step to the run's uid and to kill it; a step never
runs with the worker's identity, so it cannot tamper with the worker.
"""

import array
import ctypes
import json
import os
import resource
import signal
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import child  # noqa: E402
import confine  # noqa: E402

PR_SET_CHILD_SUBREAPER = 36
PR_SET_PDEATHSIG = 1
MAX_FDS = 4
# Without a pid namespace a step may read only these entries of /proc: its own (never other processes', nor
# /proc/PID/net and /proc/PID/task/*/net, which list the host's sockets) and a few of the whole machine's.
PROC_OWN_ENTRIES = ("stat", "statm", "status", "cmdline", "comm", "limits", "maps", "smaps", "smaps_rollup",
                    "cgroup", "mountinfo", "mounts", "io", "environ", "auxv", "sched", "schedstat", "wchan",
                    "oom_score", "oom_score_adj", "personality", "fd", "fdinfo")
PROC_MACHINE_ENTRIES = ("/proc/cpuinfo", "/proc/meminfo", "/proc/stat", "/proc/uptime", "/proc/loadavg",
                        "/proc/version", "/proc/filesystems")
SKIPPED_LISTED = 20  # reasons listed for files left out of a tar; the rest are only counted


def recv(sock):
    fds = array.array("i")
    data, ancdata, _flags, _addr = sock.recvmsg(1 << 16, socket.CMSG_SPACE(MAX_FDS * fds.itemsize))
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - (len(payload) % fds.itemsize)])
    if not data:
        return None, []
    return json.loads(data), list(fds)


def send(sock, message):
    sock.sendall(json.dumps(message).encode())


class Worker:
    def __init__(self, sock, config):
        self.sock = sock
        self.uid = config.get("uid")  # None: cannot drop (the server is not root)
        self.gid = config.get("gid")
        self.workdir = config["workdir"]
        self.network = bool(config.get("network"))
        self.read_only = config.get("read_only", [])
        self.read_write = [self.workdir, *config.get("read_write", [])]
        self.in_pid_namespace = bool(config.get("pid_namespace"))
        # Prefixes the step uid cannot traverse to (e.g. a Python under /root): reached through fds instead.
        self.reroot = {path: os.open(path, os.O_PATH | os.O_DIRECTORY) for path in config.get("reroot", [])}
        if self.reroot:
            self._reroot_imports()
        self.step_pid = None
        self.status = None
        # "own": no pid namespace, so a step gets only its own /proc entries (see PROC_OWN_ENTRIES).
        self.proc_own_only = config.get("proc") == "own"
        read_only = [p for p in self.read_only if not (self.proc_own_only and p == "/proc")]
        if self.proc_own_only:
            read_only += PROC_MACHINE_ENTRIES
        # Opened once, with the worker's rights; each step builds its ruleset from these fds (and its own /proc).
        self.landlock, landlock_reason = confine.open_landlock_rules(read_only=read_only, read_write=self.read_write)
        self.landlock_fds = [fd for fd, _ in self.landlock["rules"]] if self.landlock else []
        # The seccomp program comes compiled from the server: importing pyseccomp here would cost every worker.
        seccomp = config.get("seccomp") or {}
        if "program" in seccomp:
            self.seccomp_program = bytes.fromhex(seccomp["program"]) if seccomp["program"] else None
            self.seccomp_reason = seccomp.get("reason")
        else:
            self.seccomp_program, self.seccomp_reason = confine.build_seccomp(allow_network=self.network)
        self.confinement = {"landlock": landlock_reason or "on", "seccomp": self.seccomp_reason or "on",
                            "landlock_missing": confine.landlock_missing(self.landlock["abi"] if self.landlock
                                                                         else None)}

    def preload(self, modules):
        loaded = []
        for name in modules:
            if name in sys.modules:
                loaded.append(name)
                continue
            try:
                __import__(name)
                loaded.append(name)
            except Exception:  # a missing library fails the step that imports it, with its own error
                pass
        return loaded

    # --- the step process -------------------------------------------------------------------------------
    def start_step(self, limits, fds):
        step_fd, out_fd, err_fd = fds[:3]
        pid = os.fork()
        if pid == 0:
            try:
                keep = [step_fd, out_fd, err_fd, *self.reroot.values()]
                self._close_inherited(keep=keep + self.landlock_fds)
                self._become_step(limits, out_fd, err_fd)
                child.run_job(step_fd)
            finally:
                os._exit(70)
        for fd in fds:
            os.close(fd)
        self.step_pid, self.status = pid, None
        return pid

    def _close_inherited(self, keep):
        """A step must not hold the worker's control socket (it could forge the worker's replies)."""
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            if fd > 2 and fd not in keep:
                try:
                    os.close(fd)
                except OSError:
                    pass

    def _become_step(self, limits, out_fd, err_fd):
        os.setsid()
        worker = os.getppid()
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out_fd, 1)
        os.dup2(err_fd, 2)
        for fd in (null, out_fd, err_fd):
            os.close(fd)
        mib = 1 << 20
        cpu = int(limits["cpu_s"])
        for which, value in (
            (resource.RLIMIT_CPU, cpu),
            (resource.RLIMIT_AS, limits["memory_mb"] * mib),
            (resource.RLIMIT_FSIZE, limits["file_size_mb"] * mib),
            (resource.RLIMIT_NOFILE, 256),
            (resource.RLIMIT_CORE, 0),
            (resource.RLIMIT_NPROC, limits["max_procs"]),
        ):
            if which == resource.RLIMIT_NPROC and self.uid is None:
                continue  # counted per uid: without our own uid it would count the operator's processes
            resource.setrlimit(which, (value, value))
        os.chdir(self.workdir)
        own_proc = self._own_proc_rules() if self.landlock and self.proc_own_only else []
        self._drop_to_run_user()
        # After the drop: changing credentials clears the parent-death signal.
        _die_with_parent()
        if os.getppid() != worker:  # the worker died before that: nothing would end this step
            os._exit(70)
        self._confine(own_proc)

    def _own_proc_rules(self):
        """Rules for this process's own /proc entries, opened before the uid drop. Their fds stay open for the
        step's life: they pin the entries Landlock's rules refer to."""
        pid = os.getpid()
        rules = []
        for name in PROC_OWN_ENTRIES:
            rule = confine.landlock_rule(f"/proc/{pid}/{name}", confine._READ_ONLY_RIGHTS, self.landlock["abi"])
            if rule is not None:
                rules.append(rule)
        return rules

    def _drop_to_run_user(self):
        if self.uid is not None:
            os.setgroups([])
            os.setresgid(self.gid, self.gid, self.gid)
            os.setresuid(self.uid, self.uid, self.uid)

    def _confine(self, extra_rules=(), rules=None):
        """Landlock (the worker's rules, or `rules`, plus `extra_rules`; signals and abstract sockets scoped to
        the process's own domain; TCP denied with the network off), then seccomp."""
        if self.landlock:
            chosen = self.landlock["rules"] if rules is None else rules
            confine.restrict_landlock_rules(self.landlock["abi"], [*chosen, *extra_rules], deny_tcp=not self.network)
            for fd in self.landlock_fds:
                os.close(fd)
        if self.seccomp_program is not None:
            confine.load_seccomp(self.seccomp_program)

    def _through_fd(self, path):
        for prefix, fd in self.reroot.items():
            if path == prefix or path.startswith(prefix + os.sep):
                return f"/proc/self/fd/{fd}" + path[len(prefix):]
        return path

    def _reroot_imports(self):
        """Imports through the descriptors; and resolved paths too: os.path.realpath (pathlib's resolve() calls it)
        turns /proc/self/fd/N/... back into the real path, which the step's uid cannot traverse to, and libraries
        resolve their own files (matplotlib every font path). Not a boundary, only reach: Landlock decides."""
        real = os.path.realpath

        def realpath(path, *args, **kwargs):
            resolved = real(path, *args, **kwargs)
            return self._through_fd(resolved) if isinstance(resolved, str) else resolved

        realpath.__doc__ = real.__doc__
        os.path.realpath = realpath  # os.path is posixpath: every caller looks it up there
        sys.path[:] = [self._through_fd(p) for p in sys.path]
        for module in list(sys.modules.values()):
            search = getattr(module, "__path__", None)
            if isinstance(search, list):
                search[:] = [self._through_fd(p) for p in search]
        sys.path_importer_cache.clear()

    def finish_step(self):
        """Kill everything the step started (setsid or not), then report how the step process ended."""
        self._sweep()
        if self.step_pid is not None and self.status is None:
            _, status = os.waitpid(self.step_pid, 0)
            self.status = status
        self._reap()
        returncode = None
        if self.status is not None:
            returncode = -os.WTERMSIG(self.status) if os.WIFSIGNALED(self.status) else os.WEXITSTATUS(self.status)
        self.step_pid = None
        return returncode

    def _sweep(self):
        deadline = time.monotonic() + 0.01  # a step that has sent its result is exiting: give it a moment
        self._reap()
        while self.status is None and self.step_pid is not None and time.monotonic() < deadline:
            time.sleep(0.0002)
            self._reap()
        if self.status is not None and self._has_no_children():
            return  # the step ended and nothing it started survives: its orphans would be our children
        if self.uid is not None:
            # kill(-1) as the step's uid reaches exactly the step's processes and never this worker. One pass is
            # complete: it runs under the task-list lock, and a fork racing with it fails on the pending SIGKILL;
            # the second pass is for good measure. (Its return value cannot say whether anyone was found.)
            killer = os.fork()
            if killer == 0:
                try:
                    os.setresuid(self.uid, self.uid, self.uid)
                    os.kill(-1, signal.SIGKILL)
                    os.kill(-1, signal.SIGKILL)
                finally:
                    os._exit(0)
            os.waitpid(killer, 0)
            self._reap_all()
            return
        # Same uid as the worker: kill every other process we can see (all of them are the step's inside a pid
        # namespace; outside one, the step's session and our reaped descendants).
        for _ in range(50):
            victims = [pid for pid in self._visible_pids() if pid not in (1, os.getpid())]
            if not victims:
                return
            for pid in victims:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            self._reap()
            time.sleep(0.002)

    def _visible_pids(self):
        if self.in_pid_namespace:
            return [int(p) for p in os.listdir("/proc") if p.isdigit()]
        found = []
        me = os.getpid()
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            ppid, session = int(fields[1]), int(fields[3])
            if ppid == me or (self.step_pid is not None and session == self.step_pid):
                found.append(int(name))
        return found

    @staticmethod
    def _has_no_children():
        try:
            with open(f"/proc/self/task/{os.getpid()}/children") as handle:
                return not handle.read().split()
        except OSError:  # kernel without CONFIG_PROC_CHILDREN: assume the worst
            return False

    def _reap_all(self, timeout=2.0):
        """Wait until every descendant is gone: killed steps' orphans come back here (child subreaper)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                time.sleep(0.0002)
            elif pid == self.step_pid:
                self.status = status

    def _reap(self):
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.step_pid:
                self.status = status

    # --- outputs -------------------------------------------------------------------------------------------
    def collect(self, request, fds):
        """Tar the regular files under outputs/ into the given fd, read as the run's uid, confined to the run's
        directory, never following a link (a step may have made outputs/ itself a link to a host directory)."""
        (out_fd,) = fds[:1]
        return self._as_run_user([out_fd], lambda: _tar_tree(self.workdir, "outputs", out_fd, request))

    def archive(self, request, fds):
        """Tar the whole working directory (it travels with the run to another worker)."""
        (out_fd,) = fds[:1]
        return self._as_run_user([out_fd], lambda: _tar_tree(self.workdir, ".", out_fd, request))

    def restore(self, request, fds):
        """Unpack a tar of a working directory into ours, with the run's rights and the safe `data` filter."""
        (in_fd,) = fds[:1]
        return self._as_run_user([in_fd], lambda: _untar(in_fd, self.workdir), writable=True)

    def put_inputs(self, fds):
        """Unpack the run's input files into inputs/, with the worker's own identity: with a uid drop the files are
        root's, mode 0444, in a root-owned 0555 inputs/ (and results/), so no step can change, delete or add one;
        inside bwrap the working directory becomes sticky, so inputs/ cannot be renamed or removed either (on the
        process backend the run's uid owns the working directory and may move inputs/ aside, never change its
        files). Without a uid drop the steps share our uid and the modes are only advice.
        Every member goes through tarfile's `data` filter and must be NAME or results/NAME with NAME one plain
        component; files are created with O_EXCL|O_NOFOLLOW under directory fds, so nothing is written outside."""
        import tarfile

        (in_fd,) = fds[:1]
        owner = 0 if self.uid is not None else None
        names = []
        base = top = results = None
        try:
            base = os.open(self.workdir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            os.mkdir("inputs", 0o755, dir_fd=base)  # fails if anything is there: inputs come before any step
            top = os.open("inputs", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=base)
            dest = os.path.join(self.workdir, "inputs")
            with os.fdopen(in_fd, "rb") as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
                in_fd = None
                for member in tar:
                    member = tarfile.data_filter(member, dest)
                    parts = member.name.split("/")
                    if not all(_plain_name(p) for p in parts) or len(parts) > 2 or (
                            len(parts) == 2 and parts[0] != "results"):
                        raise ValueError(f"refused input name {member.name!r}")
                    if member.isdir():
                        if parts != ["results"] or results is not None:
                            raise ValueError(f"refused input directory {member.name!r}")
                        os.mkdir("results", 0o755, dir_fd=top)
                        results = os.open("results", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=top)
                        continue
                    if not member.isfile():
                        raise ValueError(f"refused input {member.name!r}: not a regular file")
                    parent = top if len(parts) == 1 else results
                    if parent is None:
                        raise ValueError(f"refused input {member.name!r}: no results/ directory")
                    fd = os.open(parts[-1], os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600,
                                 dir_fd=parent)
                    with os.fdopen(fd, "wb") as out:
                        source = tar.extractfile(member)
                        while True:
                            chunk = source.read(1 << 20)
                            if not chunk:
                                break
                            out.write(chunk)
                        if owner is not None:
                            os.fchown(out.fileno(), owner, owner)
                        os.fchmod(out.fileno(), 0o444)
                    names.append(member.name)
            for fd in (results, top):
                if fd is not None:
                    if owner is not None:
                        os.fchown(fd, owner, owner)
                    os.fchmod(fd, 0o555)
            info = os.fstat(base)
            if owner is not None and info.st_uid == 0 and info.st_mode & 0o002:
                os.fchmod(base, (info.st_mode & 0o7777) | 0o1000)  # sticky: our inputs/ stays ours
        except (tarfile.TarError, OSError, ValueError) as exc:
            return {"files": names, "error": f"{type(exc).__name__}: {exc}"}
        finally:
            for fd in (results, top, base, in_fd):
                if fd is not None:
                    os.close(fd)
        return {"files": names}

    def _as_run_user(self, keep, work, writable=False):
        """Run `work()` in a child holding only `keep` fds, as the run's uid, confined like a step but to the run's
        working directory alone (read-only unless `writable`); return the dict it returns."""
        import tarfile  # noqa: F401 - here, with the worker's rights: the child cannot import any more

        reader, writer = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                self._close_inherited(keep=[*keep, writer, *self.landlock_fds])
                workdir_rules = []
                if self.landlock:
                    rights = confine._handled_rights(self.landlock["abi"]) if writable else confine._READ_ONLY_RIGHTS
                    rule = confine.landlock_rule(self.workdir, rights, self.landlock["abi"])
                    workdir_rules = [rule] if rule else []
                self._drop_to_run_user()
                self._confine(rules=workdir_rules)
                os.write(writer, json.dumps(work()).encode())
            finally:
                os._exit(0)
        os.close(writer)
        for fd in keep:
            os.close(fd)
        chunks = []
        while True:
            chunk = os.read(reader, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
        os.close(reader)
        os.waitpid(pid, 0)
        try:
            return json.loads(b"".join(chunks))
        except ValueError:
            return {"files": [], "skipped": ["the files could not be read"], "error": "the helper process failed"}

    def serve(self):
        while True:
            message, fds = recv(self.sock)
            if message is None:
                self.finish_step()
                return
            op = message.get("op")
            if op == "step":
                # Libraries the run's steps use are imported here once, so every later step forks with them loaded.
                self.preload(message.get("libraries", []))
                send(self.sock, {"op": "started", "pid": self.start_step(message["limits"], fds)})
            elif op == "finish":
                send(self.sock, {"op": "exited", "returncode": self.finish_step()})
            elif op == "collect":
                send(self.sock, {"op": "collected", **self.collect(message, fds)})
            elif op == "archive":
                report = self.archive(message, fds)
                report.pop("files", None)  # thousands of names: more than one control message holds
                send(self.sock, {"op": "archived", **report})
            elif op == "restore":
                send(self.sock, {"op": "restored", **self.restore(message, fds)})
            elif op == "inputs":
                send(self.sock, {"op": "inputs_put", **self.put_inputs(fds)})
            else:
                for fd in fds:
                    os.close(fd)
                send(self.sock, {"op": "error", "error": f"unknown op {op!r}"})


def _matplotlib_dir(workdir, font_cache):
    """MPLCONFIGDIR (backends.worker_environment: the workdir's .matplotlib), made before anything imports
    matplotlib: the worker preloads libraries as root, and a .matplotlib made then would be root's, so steps could
    not write it (matplotlib warned and rebuilt its font list in a temporary directory every run). The executor's
    prebuilt font list (sandbox/fontcache.py) is copied in, so no step scans the fonts."""
    target = os.path.join(workdir, ".matplotlib")
    os.makedirs(target, exist_ok=True)
    os.chmod(target, 0o1777)
    if not font_cache:
        return
    try:
        names = [n for n in os.listdir(font_cache) if n.startswith("fontlist-v") and n.endswith(".json")]
        for name in names:
            with open(os.path.join(font_cache, name), "rb") as src, open(os.path.join(target, name), "wb") as dst:
                dst.write(src.read())
            os.chmod(os.path.join(target, name), 0o666)  # matplotlib may refresh it (fonts changed)
    except OSError:
        pass  # no prebuilt list: matplotlib builds one in the writable directory, as it would anyway


def _tar_tree(workdir, top, out_fd, caps):
    """Tar the regular files under `top` (relative to `workdir`) into `out_fd`, within the caps of `caps`
    (max_file_bytes, max_total_bytes, max_files). Walks by directory fd from the working directory: `top` itself
    is opened with O_NOFOLLOW|O_DIRECTORY, and no link is ever followed, so nothing outside is read."""
    import tarfile  # already loaded by Worker._as_run_user, before the uid drop

    max_file, max_total, max_files = caps["max_file_bytes"], caps["max_total_bytes"], caps.get("max_files") or 1000
    files, skipped, total, skipped_count = [], [], 0, 0

    def skip(reason):
        nonlocal skipped_count
        skipped_count += 1
        if len(skipped) < SKIPPED_LISTED:
            skipped.append(reason)

    base = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            top_fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=base)
        except OSError as exc:
            if os.path.lexists(os.path.join(workdir, top)):
                skip(f"{top} ({'a link' if os.path.islink(os.path.join(workdir, top)) else 'not a directory'}: "
                     f"{exc.strerror}; nothing under it was read)")
            top_fd = None
        with os.fdopen(out_fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w") as tar:
            if top_fd is None:
                return {"files": files, "skipped": skipped, "skipped_count": skipped_count}
            for directory, dirnames, filenames, dir_fd in os.fwalk(".", dir_fd=top_fd, follow_symlinks=False):
                dirnames.sort()
                for name in sorted(filenames):
                    relative = os.path.normpath(os.path.join(directory, name))
                    if len(files) >= max_files:
                        skip(f"{relative} (over the cap of {max_files} files)")
                        continue
                    try:
                        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
                    except OSError:
                        skip(f"{relative} (not a regular file)")
                        continue
                    with os.fdopen(fd, "rb") as handle:
                        info = os.fstat(handle.fileno())
                        if not (info.st_mode & 0o170000 == 0o100000):
                            skip(f"{relative} (not a regular file)")
                            continue
                        if info.st_size > max_file or total + info.st_size > max_total:
                            skip(f"{relative} ({info.st_size} bytes: over the size cap)")
                            continue
                        entry = tarfile.TarInfo(relative)
                        entry.size = info.st_size
                        entry.mtime = int(info.st_mtime)
                        tar.addfile(entry, handle)
                        total += info.st_size
                        files.append({"name": relative, "size": info.st_size})
            os.close(top_fd)
    finally:
        os.close(base)
    return {"files": files, "skipped": skipped, "skipped_count": skipped_count}


def _plain_name(name):
    """One path component a user's file may have under inputs/ (agent_core.inputs.safe_name makes them)."""
    return (0 < len(name.encode()) <= 255 and not name.startswith(".") and "/" not in name and "\\" not in name
            and not any(ord(ch) < 32 or ord(ch) == 127 for ch in name))


def _untar(in_fd, root):
    import tarfile

    try:
        with os.fdopen(in_fd, "rb") as raw, tarfile.open(fileobj=raw, mode="r:") as tar:
            tar.extractall(root, filter="data")  # no absolute paths, links out, devices or setuid bits
    except (tarfile.TarError, OSError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {}


def _die_with_parent():
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except OSError:
        pass


# Sandboxed code yields the CPU to the server: chat acks and the LLM loop stay responsive under load.
NICENESS = 5


def main():
    os.nice(NICENESS)
    sock = socket.socket(fileno=int(sys.argv[1]))
    config, _ = recv(sock)
    sys.path.extend(d for d in config.get("site_dirs", []) if d not in sys.path)  # we run without `site` (-S)
    _die_with_parent()  # a killed server takes its workers (and, through theirs, their steps) with it
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # orphans of a step come back here to be reaped
    except OSError:
        pass
    worker = Worker(sock, config)
    for directory in [os.path.join(worker.workdir, "outputs"), *config.get("make_dirs", [])]:
        os.makedirs(directory, exist_ok=True)
        os.chmod(directory, 0o1777)
    _matplotlib_dir(worker.workdir, config.get("font_cache"))
    loaded = worker.preload(config.get("preload", []))
    send(sock, {"op": "ready", "pid": os.getpid(), "preloaded": loaded,
                "probe": confine.probe(seccomp_reason=worker.seccomp_reason),
                "confinement": worker.confinement})
    worker.serve()


if __name__ == "__main__":
    main()
