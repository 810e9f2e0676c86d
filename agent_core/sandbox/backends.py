"""How a sandbox worker is launched: inside bubblewrap namespaces, or as a plain process (the fallback for
hosts without user/mount namespaces, e.g. Docker's default seccomp profile)."""

from __future__ import annotations

import functools
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from agent_core.sandbox import SandboxUnavailable

log = logging.getLogger(__name__)

RUNTIME_DIR = Path(__file__).resolve().parent  # worker.py, child.py, confine.py
# Where RUNTIME_DIR and the run's working directory appear inside bubblewrap, unless the Python environment lives
# there (see `mount_layout`): the worker is told the working directory in its config, nothing else assumes it.
SANDBOX_RUNTIME = "/opt/autocode-sandbox"
SANDBOX_WORKDIR = "/work"
# Mounted by bubblewrap itself, whatever the layout.
FIXED_MOUNTS = ["/proc", "/dev", "/etc/resolv.conf"]
# System paths a step may read (interpreter, shared libraries, certificates, time zones).
SYSTEM_READ_ONLY = ["/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin", "/etc/ld.so.cache", "/etc/ssl",
                    "/etc/ca-certificates", "/etc/localtime", "/etc/mime.types", "/usr/share/zoneinfo",
                    "/etc/fonts"]  # fontconfig's configuration (matplotlib, Pillow): no secrets
NETWORK_READ_ONLY = ["/etc/hosts", "/etc/nsswitch.conf", "/etc/host.conf", "/etc/gai.conf"]
# Host variables a step may see: none are secrets. OPENBLAS_* keeps numpy correct on some CPUs.
_PASSTHROUGH = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "TZ")


def worker_environment(workdir: str) -> dict[str, str]:
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "PYTHONIOENCODING": "utf-8",
        "OPENBLAS_NUM_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "MPLBACKEND": "Agg",
        "MPLCONFIGDIR": f"{workdir}/.matplotlib",
    }
    env.update({k: os.environ[k] for k in _PASSTHROUGH if k in os.environ})
    return env


# Isolated (-I), no bytecode writes (-B), unbuffered (-u), no `site` (-S): .pth start-up hooks of the host's
# environment (editable installs, CA injectors) cost ~30 ms per worker and have no business in a sandbox; the worker
# adds the site-packages directories itself (see `site_dirs`).
WORKER_FLAGS = ["-I", "-B", "-u", "-S"]


def worker_command(runtime: str, worker_fd: int) -> list[str]:
    """Start the worker by importing it (a cached .pyc) rather than running worker.py as a script, which Python
    compiles from source every time: ~14 ms of CPU per worker, on the path of every run's start."""
    boot = f"import sys; sys.path.insert(0, {runtime!r}); import worker; worker.main()  # autocode worker.py"
    return [sys.executable, *WORKER_FLAGS, "-c", boot, str(worker_fd)]


def compile_runtime() -> None:
    """Write the .pyc files of the worker's modules (workers run with -B and never write them). Best effort:
    an install directory that is not writable only costs the compile time."""
    import py_compile

    for name in ("worker.py", "child.py", "confine.py"):
        try:
            py_compile.compile(str(RUNTIME_DIR / name), doraise=True)
        except (OSError, py_compile.PyCompileError):
            pass


@functools.cache
def site_dirs() -> list[str]:
    """The interpreter's site-packages directories, and the plain directory lines of their .pth files."""
    import site

    dirs: list[str] = []
    for directory in site.getsitepackages():
        if not os.path.isdir(directory):
            continue
        dirs.append(directory)
        for pth in sorted(Path(directory).glob("*.pth")):
            try:
                lines = pth.read_text(encoding="utf-8", errors="replace").splitlines()
            except OSError:
                continue
            for line in lines:
                line = line.strip()
                if line and not line.startswith(("#", "import ", "import\t")):
                    candidate = os.path.join(directory, line)
                    if os.path.isdir(candidate) and candidate not in dirs:
                        dirs.append(candidate)
    return dirs


@functools.cache
def python_roots() -> tuple[str, ...]:
    """Directories the step's interpreter needs: its prefix, and site-packages living elsewhere."""
    roots: list[str] = []
    for path in (sys.base_prefix, sys.prefix, sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]):
        path = os.path.realpath(path)
        if not any(path == r or path.startswith(r + os.sep) for r in roots) and os.path.isdir(path):
            roots.append(path)
    return tuple(roots)


def traversable_by_others(path: str) -> bool:
    """Can a uid with no special rights reach `path` (o+x on every ancestor)?"""
    current = Path(path)
    for directory in [current, *current.parents]:
        try:
            if not directory.stat().st_mode & 0o001:
                return False
        except OSError:
            return False
    return True


@dataclass
class Launch:
    argv: list[str]
    env: dict[str, str]
    workdir: str  # as the worker sees it
    host_workdir: Path | None  # the same directory on the host, when there is one to clean up
    config: dict = field(default_factory=dict)  # extra worker configuration


def _overlaps(a: str, b: str) -> bool:
    """Is `a` the same path as `b`, inside it, or above it? Then a mount at one hides or breaks the other."""
    pa, pb = PurePosixPath(a), PurePosixPath(b)
    return pa == pb or pb in pa.parents or pa in pb.parents


def _free_mount_point(preferred: str, taken: Sequence[str]) -> str:
    """`preferred`, or else /autocode-<name>[-n]: the first path that overlaps none of `taken`."""
    name = PurePosixPath(preferred).name
    for candidate in [preferred, f"/autocode-{name}", *(f"/autocode-{name}-{n}" for n in range(2, 10))]:
        if not any(_overlaps(candidate, path) for path in taken):
            return candidate
    raise SandboxUnavailable(f"no free mount point for {preferred} inside bubblewrap: the Python environment "
                             f"covers it ({', '.join(p for p in taken if _overlaps(preferred, p))})")


@dataclass(frozen=True)
class MountLayout:
    """Where bubblewrap puts things, chosen so that no mount point lands on, inside or above a read-only bind."""

    binds: tuple[str, ...]  # host paths bound read-only at their own path (system paths, the Python roots)
    workdir: str  # the run's size-capped tmpfs, as the worker sees it
    runtime: str  # where RUNTIME_DIR is bound
    # "link": /tmp is a symlink into the workdir (one disk cap for all a run writes); "tmpfs": a Python root lies
    # under /tmp, so /tmp is its own size-capped tmpfs mounted before the binds, which land inside it (the disk cap
    # is then workdir + tmp); "bound": a Python root is /tmp itself, read-only (steps write to TMPDIR, the workdir).
    tmp: str


def mount_layout(binds: Sequence[str]) -> MountLayout:
    """The layout for these read-only binds. A virtualenv or interpreter may live anywhere on the host: under
    /tmp (bwrap would make /tmp a directory, and the /tmp symlink fails), under /work (the workdir tmpfs would hide
    it; this checkout lives at /work/main), at or around /opt/autocode-sandbox. Raises SandboxUnavailable when a
    bind covers a path bubblewrap must mount itself (a Python root at / or under /proc, /dev)."""
    binds = tuple(binds)
    for fixed in ["/proc", "/dev"]:
        clash = [path for path in binds if _overlaps(fixed, path)]
        if clash:
            raise SandboxUnavailable(f"the Python environment ({', '.join(clash)}) covers {fixed}, which bubblewrap "
                                     "mounts itself; install Python elsewhere or use AUTOCODE_SANDBOX_BACKEND=process")
    tmp_binds = [path for path in binds if _overlaps("/tmp", path)]
    if not tmp_binds:
        tmp = "link"
    elif all(PurePosixPath("/tmp") in PurePosixPath(path).parents for path in tmp_binds):
        tmp = "tmpfs"
    else:
        tmp = "bound"
    taken = [*binds, *FIXED_MOUNTS, "/tmp"]
    workdir = _free_mount_point(SANDBOX_WORKDIR, taken)
    runtime = _free_mount_point(SANDBOX_RUNTIME, [*taken, workdir])
    return MountLayout(binds, workdir, runtime, tmp)


class BwrapLauncher:
    """User, pid, net, ipc, uts (and cgroup) namespaces; read-only binds; a size-capped tmpfs workdir."""

    name = "bwrap"

    def __init__(self, bwrap: str, is_root: bool, workdir_mb: int, network: bool,
                 extra_read_only: list[str] | tuple[str, ...] = ()):
        self.bwrap = bwrap
        self.is_root = is_root
        self.workdir_mb = workdir_mb
        self.network = network
        # extra_read_only: e.g. the matplotlib font cache (sandbox/fontcache.py), read by the worker at start
        self.read_only = [*SYSTEM_READ_ONLY, *(NETWORK_READ_ONLY if network else []), *extra_read_only]
        # Raises SandboxUnavailable when no layout fits this Python environment.
        self.layout = mount_layout([p for p in [*self.read_only, *python_roots()] if os.path.exists(p)])

    def protections(self) -> list[str]:
        found = ["pid, ipc, uts, mount namespaces", "size-capped tmpfs working directory"
                 + (" and /tmp" if self.layout.tmp == "tmpfs" else ""),
                 "--clearenv, --die-with-parent, --new-session"]
        found.append("user namespace (unprivileged bwrap)" if not self.is_root else "real uid drop per run")
        found.append("network namespace with slirp4netns; nftables allows only public internet addresses"
                     if self.network else "network namespace without interfaces (no network)")
        return found

    def argv(self, command: list[str], info_fd: int | None) -> list[str]:
        """The bwrap command line that runs `command` in the sandbox's mount layout. `prepare` and the start-up
        check (`bwrap_works`) both use it, so `auto` tests exactly what a run gets."""
        layout = self.layout
        args = [self.bwrap, "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
                "--unshare-net", "--die-with-parent", "--new-session", "--clearenv"]
        if self.is_root:
            # Privileged mode: no user namespace; the worker keeps just enough to drop steps to their uid.
            args += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--cap-add", "CAP_KILL"]
        else:
            args += ["--unshare-user", "--disable-userns"]
        size = str(self.workdir_mb * 1024 * 1024)
        made: set[str] = set()
        if layout.tmp == "tmpfs":  # before the binds, which then land inside it
            args += ["--perms", "1777", "--size", size, "--tmpfs", "/tmp"]
            made.add("/tmp")
        for path in layout.binds:
            args += self._parents(path, made) + ["--ro-bind", path, path]
        args += self._parents(layout.runtime, made) + ["--ro-bind", str(RUNTIME_DIR), layout.runtime]
        if self.network:
            args += ["--perms", "0644", "--ro-bind-data", "0", "/etc/resolv.conf"]  # slirp4netns's DNS
        args += ["--proc", "/proc", "--dev", "/dev", *self._parents(layout.workdir, made),
                 "--perms", "0777", "--size", size, "--tmpfs", layout.workdir]
        if layout.tmp == "link":
            args += ["--symlink", f"{layout.workdir}/.tmp", "/tmp"]  # one disk cap for everything a run writes
        args += ["--chdir", layout.workdir]
        if info_fd is not None:
            args += ["--info-fd", str(info_fd)]
        for name, value in worker_environment(layout.workdir).items():  # --clearenv: the environment is set inside
            args += ["--setenv", name, value]
        return [*args, "--", *command]

    def prepare(self, worker_fd: int, info_fd: int | None) -> Launch:
        layout = self.layout
        resolver = ["/etc/resolv.conf"] if self.network else []
        return Launch(self.argv(worker_command(layout.runtime, worker_fd), info_fd),
                      worker_environment(layout.workdir), layout.workdir, None, {
            "site_dirs": list(site_dirs()),
            "pid_namespace": True,
            "read_only": [*self.read_only, *resolver, *python_roots(), layout.runtime, "/proc", "/dev"],
            # /dev is the sandbox's own small tmpfs; so is /tmp when it is not a link into the workdir.
            "read_write": ["/dev/null", "/dev/shm", *(["/tmp"] if layout.tmp == "tmpfs" else [])],
            "make_dirs": [f"{layout.workdir}/.tmp"] if layout.tmp == "link" else [],
        })

    @staticmethod
    def _parents(path: str, made: set[str]) -> list[str]:
        """bwrap creates missing parents 0700; create them 0755 so the step's uid can traverse them."""
        args: list[str] = []
        for parent in reversed(Path(path).parents[:-1]):  # skip "/"
            key = str(parent)
            if key not in made:
                made.add(key)
                args += ["--perms", "0755", "--dir", key]
        return args


class ProcessLauncher:
    """No namespaces: the worker is a plain child; steps get a real uid drop, rlimits, Landlock and seccomp."""

    name = "process"

    def __init__(self, is_root: bool, workdir_root: Path | None, network: bool):
        self.is_root = is_root
        self.network = network
        self.base = Path(workdir_root or tempfile.gettempdir()) / "autocode-sandbox"
        if is_root and not traversable_by_others(str(self.base.parent)):
            raise SandboxUnavailable(
                f"{self.base.parent} is not reachable by the sandbox uids (every parent needs o+x); "
                "set AUTOCODE_WORKDIR_ROOT to a directory such as /var/tmp")

    def protections(self) -> list[str]:
        return ["real uid drop per run" if self.is_root else "NO uid separation (not running as root)",
                "private working directory (mode 0700; no cap on total disk use)", "process-group and per-uid kill",
                "NO network isolation: the host's network, loopback included" if self.network
                else "network off through seccomp (needs seccomp)"]

    def prepare(self, worker_fd: int, info_fd: int | None) -> Launch:
        self.base.mkdir(parents=True, exist_ok=True)
        os.chmod(self.base, 0o711)  # others may traverse to their own directory but not list
        workdir = Path(tempfile.mkdtemp(prefix="run-", dir=self.base))
        roots = python_roots()
        return Launch(
            worker_command(str(RUNTIME_DIR), worker_fd),
            worker_environment(str(workdir)), str(workdir), workdir,
            {
                "site_dirs": list(site_dirs()),
                "pid_namespace": False,
                "proc": "own",  # the host's /proc: a step may read only its own entries
                "read_only": [*SYSTEM_READ_ONLY, *NETWORK_READ_ONLY, *roots, str(RUNTIME_DIR), "/proc", "/dev",
                              "/etc/resolv.conf"],
                "read_write": ["/dev/null"],  # not /dev/shm: the host's, shared between runs
                # Reach a Python under e.g. /root (mode 0700) through descriptors opened before the uid drop.
                "reroot": [r for r in roots if self.is_root and not traversable_by_others(r)],
            },
        )


def bwrap_works(launcher: BwrapLauncher) -> str | None:
    """None when bubblewrap can start the sandbox here, else the reason. It runs the interpreter in the real mount
    layout (the same command line as a worker's), not a bare `--ro-bind / /`: that passes where a run then fails
    (a Python environment under /tmp, a bwrap without --size). ~20 ms, once per executor."""
    probe = f"import os; os.stat({launcher.layout.runtime + '/worker.py'!r})"
    args = launcher.argv([sys.executable, *WORKER_FLAGS, "-c", probe], None)
    try:
        proc = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"bubblewrap failed to start: {exc}"
    if proc.returncode != 0:
        detail = proc.stderr.strip()[-500:] or f"exit status {proc.returncode}"
        return f"bubblewrap cannot start the sandbox here: {detail}"
    return None


def choose_launcher(backend: str, workdir_mb: int, workdir_root: Path | None, network: bool,
                    extra_read_only: list[str] | tuple[str, ...] = ()):
    """The launcher for `backend` (auto|bwrap|process), and the reason a fallback was taken (or None)."""
    is_root = os.geteuid() == 0
    if backend in ("auto", "bwrap"):
        bwrap = shutil.which("bwrap")
        launcher: BwrapLauncher | None = None
        if bwrap is None:
            reason: str | None = "bubblewrap (bwrap) is not installed"
        else:
            try:
                launcher = BwrapLauncher(bwrap, is_root, workdir_mb, network, extra_read_only)
                reason = bwrap_works(launcher)
            except SandboxUnavailable as exc:  # no mount layout fits this Python environment
                reason = str(exc)
        missing = [tool for tool in ("slirp4netns", "nft", "nsenter") if shutil.which(tool) is None]
        if network and reason is None and missing:
            reason = f"AUTOCODE_SANDBOX_NETWORK=on needs {', '.join(missing)} (Debian: slirp4netns, nftables)"
        if reason is None and launcher is not None:
            return launcher, None
        if backend == "bwrap":
            raise SandboxUnavailable(f"AUTOCODE_SANDBOX_BACKEND=bwrap but {reason}")
        return ProcessLauncher(is_root, workdir_root, network), reason
    return ProcessLauncher(is_root, workdir_root, network), "AUTOCODE_SANDBOX_BACKEND=process"
