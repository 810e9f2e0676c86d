"""Real-kernel tests for agent_core.sandbox.confine (seccomp and Landlock).

Every confinement is applied in a forked child (os.fork + a pipe carrying a pickled result; the
child always leaves through os._exit), so the pytest process itself is never confined. Like the
real sandbox, the child first drops to a non-root uid when the tests run as root.
"""

from __future__ import annotations

import ctypes
import errno
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent_core.sandbox import confine

SANDBOX_UID = SANDBOX_GID = 61999

PROBE = confine.probe()
needs_seccomp = pytest.mark.skipif(
    not PROBE["seccomp"], reason=f"seccomp unavailable here: {PROBE['seccomp_reason']}"
)
needs_landlock = pytest.mark.skipif(
    not PROBE["landlock_abi"], reason="Landlock unavailable in this kernel"
)

CLONE_NEWUSER = 0x10000000
# (clone, clone3) syscall numbers for the raw calls below.
SYS_CLONE, SYS_CLONE3 = {"x86_64": (56, 435), "aarch64": (220, 435)}.get(os.uname().machine,
                                                                         (None, None))
PTRACE_TRACEME = 0
ADDR_NO_RANDOMIZE = 0x0040000


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _drop_privileges() -> None:
    """What the real sandbox does before confining: become an unprivileged uid."""
    if os.getuid() == 0:
        os.setgroups([])
        os.setresgid(SANDBOX_GID, SANDBOX_GID, SANDBOX_GID)
        os.setresuid(SANDBOX_UID, SANDBOX_UID, SANDBOX_UID)


def run_in_child(body: Callable[[], object], *, drop_uid: bool = True) -> object:
    """Run body() in a forked child and return its (picklable) result; fail on an exception."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        try:
            os.close(read_fd)
            try:
                if drop_uid:
                    _drop_privileges()
                outcome = ("ok", body())
            except BaseException:  # noqa: BLE001 - reported to the parent
                outcome = ("error", traceback.format_exc())
            with os.fdopen(write_fd, "wb") as pipe:
                pickle.dump(outcome, pipe)
        finally:
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert data, f"the child died without reporting (wait status {status:#x})"
    kind, value = pickle.loads(data)
    if kind == "error":
        pytest.fail(f"the child raised:\n{value}")
    return value


def _status_field(name: str) -> str:
    """A field of /proc/self/status, e.g. NoNewPrivs or Seccomp."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(name + ":"):
                return line.split(":", 1)[1].strip()
    return ""


def _errno_of(call: Callable[[], object]) -> int | None:
    """Run call(); the errno of the OSError it raises, or None if it succeeds."""
    try:
        call()
    except OSError as exc:
        return exc.errno
    return None


# ---------------------------------------------------------------------------------------------
# probe
# ---------------------------------------------------------------------------------------------


def test_probe_reports_support_on_this_machine() -> None:
    info = confine.probe()
    assert set(info) == {"landlock_abi", "seccomp", "seccomp_reason"}
    if not info["landlock_abi"] or not info["seccomp"]:
        pytest.skip(f"this kernel/library lacks support: {info}")
    assert isinstance(info["landlock_abi"], int) and info["landlock_abi"] >= 1
    assert info["seccomp"] is True and info["seccomp_reason"] is None
    # Probing applies nothing to the calling process.
    with open("/proc/self/status", encoding="ascii") as status:
        assert "Seccomp:\t0" in status.read()


def test_module_imports_standalone_under_isolated_python() -> None:
    # The sandbox child imports confine.py by path under `python -I`: nothing from the project.
    code = (
        "import importlib.util, sys\n"
        "spec = importlib.util.spec_from_file_location('confine', sys.argv[1])\n"
        "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
        "print(sorted(module.probe()))\n"
        "print(sorted(m for m in sys.modules if m.startswith(('agent_core', 'pyseccomp'))))\n"
    )
    run = subprocess.run([sys.executable, "-I", "-c", code, confine.__file__], capture_output=True,
                         text=True, check=False, cwd="/")
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[0] == "['landlock_abi', 'seccomp', 'seccomp_reason']"
    assert "agent_core" not in run.stdout


def test_missing_pyseccomp_degrades_to_a_reason() -> None:
    def body() -> dict[str, object]:
        sys.modules["pyseccomp"] = None  # type: ignore[assignment]  # makes the import fail
        return {"reason": confine.apply_seccomp(allow_network=False), "probe": confine.probe(),
                "seccomp_mode": _status_field("Seccomp")}

    result = run_in_child(body)
    assert "pyseccomp" in result["reason"]
    assert result["probe"]["seccomp"] is False and "pyseccomp" in result["probe"]["seccomp_reason"]
    assert result["seccomp_mode"] == "0"


@needs_seccomp
def test_landlock_unsupported_by_kernel_degrades_to_a_reason(tree: dict[str, Path]) -> None:
    # A kernel without Landlock answers ENOSYS; a seccomp filter makes this kernel do the same.
    def body() -> dict[str, object]:
        import pyseccomp  # noqa: PLC0415

        filt = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
        for name in ("landlock_create_ruleset", "landlock_add_rule", "landlock_restrict_self"):
            filt.add_rule(pyseccomp.ERRNO(errno.ENOSYS), name)
        filt.load()
        return {
            "reason": confine.apply_landlock(read_only=["/usr"], read_write=[]),
            "abi": confine.probe()["landlock_abi"],
            "secret": (tree["outside"] / "secret.txt").read_text(),
        }

    result = run_in_child(body)
    assert "ENOSYS" in result["reason"]
    assert result["abi"] is None
    assert result["secret"] == "secret"  # nothing was confined


def test_rule_set_is_listed_for_doctor() -> None:
    assert "ptrace -> EPERM" in confine.SECCOMP_RULES
    assert confine.SECCOMP_NETWORK_RULE in confine.SECCOMP_RULES
    assert not {"clone", "fork", "vfork"} & set(confine.SECCOMP_BLOCKED_SYSCALLS)


# ---------------------------------------------------------------------------------------------
# seccomp
# ---------------------------------------------------------------------------------------------


@needs_seccomp
def test_seccomp_without_network_blocks_inet_but_not_unix_sockets() -> None:
    def body() -> dict[str, object]:
        before = _errno_of(lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM).close())
        reason = confine.apply_seccomp(allow_network=False)
        left, right = socket.socketpair()
        left.sendall(b"ping")
        unix_reply = right.recv(4)
        return {
            "reason": reason,
            "inet_before": before,
            "inet": _errno_of(lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM)),
            "inet6": _errno_of(lambda: socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)),
            "netlink": _errno_of(lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW)),
            "unix_reply": unix_reply,
            "unix_socket": _errno_of(lambda: socket.socket(socket.AF_UNIX).close()),
            "no_new_privs": _status_field("NoNewPrivs"),
            "seccomp_mode": _status_field("Seccomp"),
        }

    result = run_in_child(body)
    assert result["reason"] is None
    assert result["inet_before"] is None  # it is the filter, not the uid, that blocks
    assert result["inet"] == errno.EPERM
    assert result["inet6"] == errno.EPERM
    assert result["netlink"] == errno.EPERM
    assert result["unix_reply"] == b"ping"
    assert result["unix_socket"] is None
    assert result["no_new_privs"] == "1"
    assert result["seccomp_mode"] == "2"  # SECCOMP_MODE_FILTER


@needs_seccomp
def test_seccomp_with_network_allows_inet_sockets() -> None:
    def body() -> dict[str, object]:
        reason = confine.apply_seccomp(allow_network=True)
        libc = _libc()
        unshare = libc.unshare(ctypes.c_int(CLONE_NEWUSER))
        return {
            "reason": reason,
            "inet": _errno_of(lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()),
            "unshare": (unshare, ctypes.get_errno()),
        }

    result = run_in_child(body)
    assert result["reason"] is None
    assert result["inet"] is None
    assert result["unshare"] == (-1, errno.EPERM)  # the rest of the filter still applies


@needs_seccomp
@pytest.mark.skipif(SYS_CLONE is None, reason="clone syscall numbers known for x86_64/aarch64 only")
def test_seccomp_blocks_namespaces_mounts_ptrace_and_personality() -> None:
    def body() -> dict[str, object]:
        libc = _libc()

        def call(fn: Callable[[], int]) -> tuple[int, int]:
            ctypes.set_errno(0)
            ret = fn()
            return ret, (ctypes.get_errno() if ret == -1 else 0)

        def raw_clone_newuser() -> int:
            # fork-like raw clone; if the filter let it through, the new process just exits.
            ret = libc.syscall(ctypes.c_long(SYS_CLONE),
                               ctypes.c_long(CLONE_NEWUSER | signal.SIGCHLD), ctypes.c_long(0),
                               ctypes.c_long(0), ctypes.c_long(0), ctypes.c_long(0))
            if ret == 0:
                os._exit(0)
            if ret > 0:
                os.waitpid(ret, 0)
            return ret

        reason = confine.apply_seccomp(allow_network=False)
        target = tempfile.gettempdir().encode()
        return {
            "reason": reason,
            "unshare": call(lambda: libc.unshare(ctypes.c_int(CLONE_NEWUSER))),
            "clone_newuser": call(raw_clone_newuser),
            "clone3": call(lambda: libc.syscall(ctypes.c_long(SYS_CLONE3), None, ctypes.c_long(0))),
            "mount": call(lambda: libc.mount(b"none", target, b"tmpfs", ctypes.c_ulong(0), None)),
            "chroot": call(lambda: libc.chroot(b"/")),
            "ptrace": call(lambda: libc.ptrace(ctypes.c_long(PTRACE_TRACEME), 0, None, None)),
            "personality_query": call(lambda: libc.personality(ctypes.c_ulong(0xFFFFFFFF))),
            "personality_set": call(lambda: libc.personality(ctypes.c_ulong(ADDR_NO_RANDOMIZE))),
        }

    result = run_in_child(body)
    assert result["reason"] is None
    assert result["unshare"] == (-1, errno.EPERM)
    assert result["clone_newuser"] == (-1, errno.EPERM)
    assert result["clone3"] == (-1, errno.ENOSYS)
    assert result["mount"] == (-1, errno.EPERM)
    assert result["chroot"] == (-1, errno.EPERM)
    assert result["ptrace"] == (-1, errno.EPERM)
    assert result["personality_query"][0] >= 0
    assert result["personality_set"] == (-1, errno.EPERM)


@needs_seccomp
def test_seccomp_keeps_threads_fork_and_exec_working() -> None:
    def body() -> dict[str, object]:
        reason = confine.apply_seccomp(allow_network=False)
        seen: list[str] = []
        thread = threading.Thread(target=seen.append, args=("thread ran",))
        thread.start()
        thread.join()
        pid = os.fork()
        if pid == 0:
            os._exit(7)
        _, status = os.waitpid(pid, 0)
        shell = subprocess.run(["/bin/sh", "-c", "exit 3"], check=False).returncode
        return {"reason": reason, "thread": seen, "fork": os.waitstatus_to_exitcode(status),
                "exec": shell}

    result = run_in_child(body)
    assert result == {"reason": None, "thread": ["thread ran"], "fork": 7, "exec": 3}


@needs_seccomp
def test_python_starts_under_the_seccomp_filter() -> None:
    # No uid drop here: the interpreter lives under /root (mode 0700), which uid 61999 cannot
    # traverse regardless of seccomp. The filter is inherited across execve, so this checks that
    # none of the blocked syscalls (personality in particular) is needed by Python's start-up.
    code = (
        "import decimal, threading, subprocess, socket\n"
        "t = threading.Thread(target=print, args=('thread',)); t.start(); t.join()\n"
        "print(decimal.Decimal('1.5') * 2)\n"
    )

    def body() -> dict[str, object]:
        reason = confine.apply_seccomp(allow_network=False)
        run = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True,
                             check=False)
        return {"reason": reason, "rc": run.returncode, "out": run.stdout, "err": run.stderr}

    result = run_in_child(body, drop_uid=False)
    assert result["reason"] is None
    assert (result["rc"], result["out"], result["err"]) == (0, "thread\n3.0\n", "")


# ---------------------------------------------------------------------------------------------
# Landlock
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def tree() -> Iterator[dict[str, Path]]:
    """Directories the sandbox uid may use by file permissions, so only Landlock can deny.

    Not pytest's tmp_path: /tmp/pytest-of-root is mode 0700, untraversable for uid 61999.
    """
    base = Path(tempfile.mkdtemp(prefix="autocode-confine-"))
    paths = {name: base / name for name in ("outside", "ro", "rw")}
    try:
        for path in paths.values():
            path.mkdir()
        (paths["outside"] / "secret.txt").write_text("secret")
        (paths["outside"] / "allowed.txt").write_text("allowed")
        (paths["ro"] / "data.txt").write_text("data")
        (paths["rw"] / "old.txt").write_text("old contents")
        for path in [base, *base.rglob("*")]:
            os.chmod(path, 0o777 if path.is_dir() else 0o666)
            if os.getuid() == 0:
                os.chown(path, SANDBOX_UID, SANDBOX_GID)
        yield paths
    finally:
        shutil.rmtree(base, ignore_errors=True)


@needs_landlock
def test_landlock_confines_reads_and_writes(tree: dict[str, Path]) -> None:
    secret = tree["outside"] / "secret.txt"

    def body() -> dict[str, object]:
        secret_before = secret.read_text()
        reason = confine.apply_landlock(
            read_only=[str(tree["ro"]), str(tree["outside"] / "allowed.txt"), "/no/such/path"],
            read_write=[str(tree["rw"])],
        )
        (tree["rw"] / "new.txt").write_text("written")
        (tree["rw"] / "old.txt").write_text("replaced")  # O_TRUNC needs the truncate right
        (tree["rw"] / "sub").mkdir()
        (tree["rw"] / "sub" / "deep.txt").write_text("deep")
        return {
            "reason": reason,
            "secret_before": secret_before,
            "secret": _errno_of(secret.read_text),
            "list_outside": _errno_of(lambda: os.listdir(tree["outside"])),
            "allowed_file": (tree["outside"] / "allowed.txt").read_text(),
            "allowed_file_write": _errno_of(
                lambda: (tree["outside"] / "allowed.txt").write_text("x")),
            "ro_read": (tree["ro"] / "data.txt").read_text(),
            "ro_list": sorted(os.listdir(tree["ro"])),
            "ro_write": _errno_of(lambda: (tree["ro"] / "new.txt").write_text("x")),
            "ro_overwrite": _errno_of(lambda: (tree["ro"] / "data.txt").write_text("x")),
            "ro_mkdir": _errno_of(lambda: (tree["ro"] / "dir").mkdir()),
            "rw": sorted(os.listdir(tree["rw"])),
            "rw_new": (tree["rw"] / "new.txt").read_text(),
            "rw_old": (tree["rw"] / "old.txt").read_text(),
            "rw_deep": (tree["rw"] / "sub" / "deep.txt").read_text(),
            "rw_remove": _errno_of(lambda: (tree["rw"] / "new.txt").unlink()),
        }

    result = run_in_child(body)
    assert result["reason"] is None
    assert result["secret_before"] == "secret"  # readable by permissions: Landlock denies it
    assert result["secret"] == errno.EACCES
    assert result["list_outside"] == errno.EACCES
    assert result["allowed_file"] == "allowed"
    assert result["allowed_file_write"] == errno.EACCES
    assert result["ro_read"] == "data"
    assert result["ro_list"] == ["data.txt"]
    assert result["ro_write"] == errno.EACCES
    assert result["ro_overwrite"] == errno.EACCES
    assert result["ro_mkdir"] == errno.EACCES
    assert result["rw"] == ["new.txt", "old.txt", "sub"]
    assert (result["rw_new"], result["rw_old"], result["rw_deep"]) == ("written", "replaced",
                                                                         "deep")
    assert result["rw_remove"] is None


@needs_landlock
def test_landlock_keeps_stdlib_imports_working(tree: dict[str, Path]) -> None:
    # No uid drop here: the interpreter may live under /root (mode 0700), which uid 61999 cannot traverse
    # whatever Landlock allows; as root, only Landlock decides, which is what this test checks.
    # The standard library lives under sys.base_prefix; in a virtualenv sys.prefix is only the venv.
    secret = tree["outside"] / "secret.txt"

    def body() -> dict[str, object]:
        for name in ("decimal", "_decimal", "_pydecimal", "fractions"):
            sys.modules.pop(name, None)
        reason = confine.apply_landlock(
            read_only=[sys.base_prefix, sys.prefix, "/usr", "/lib", "/lib64", "/etc"], read_write=[]
        )
        import decimal  # noqa: PLC0415 - the point: a fresh import after Landlock
        import fractions  # noqa: PLC0415

        return {
            "reason": reason,
            "decimal": str(decimal.Decimal("0.1") + decimal.Decimal("0.2")),
            "fraction": str(fractions.Fraction(1, 3) * 3),
            "secret": _errno_of(secret.read_text),
            "tmp_write": _errno_of(lambda: (tree["rw"] / "x.txt").write_text("x")),
        }

    result = run_in_child(body, drop_uid=False)
    assert result == {"reason": None, "decimal": "0.3", "fraction": "1", "secret": errno.EACCES,
                      "tmp_write": errno.EACCES}


@needs_landlock
@needs_seccomp
def test_both_layers_together(tree: dict[str, Path]) -> None:
    def body() -> dict[str, object]:
        landlock = confine.apply_landlock(read_only=["/usr", "/lib", "/lib64", "/etc", "/bin"],
                                          read_write=[str(tree["rw"])])
        seccomp = confine.apply_seccomp(allow_network=False)
        shell = subprocess.run(["/bin/sh", "-c", f"echo hi > {tree['rw']}/sh.txt"], check=False)
        return {
            "reasons": (landlock, seccomp),
            "shell": shell.returncode,
            "written": (tree["rw"] / "sh.txt").read_text(),
            "inet": _errno_of(lambda: socket.socket(socket.AF_INET)),
            "secret": _errno_of((tree["outside"] / "secret.txt").read_text),
        }

    result = run_in_child(body)
    assert result == {"reasons": (None, None), "shell": 0, "written": "hi\n",
                      "inet": errno.EPERM, "secret": errno.EACCES}


@needs_seccomp
def test_shared_host_filter_refuses_new_unix_sockets_and_ipc_but_not_socketpair() -> None:
    def body() -> dict[str, object]:
        reason = confine.apply_seccomp(allow_network=False, shared_host=True)
        libc = ctypes.CDLL(None, use_errno=True)

        def ipc(call: Callable[[], int]) -> int:
            return 0 if call() >= 0 else ctypes.get_errno()

        left, right = socket.socketpair()
        left.sendall(b"x")
        return {
            "reason": reason,
            "unix": _errno_of(lambda: socket.socket(socket.AF_UNIX)),
            "socketpair": right.recv(1),
            "shmget": ipc(lambda: libc.shmget(0, ctypes.c_size_t(4096), 0o1000 | 0o600)),
            "msgget": ipc(lambda: libc.msgget(0, 0o1000 | 0o600)),
            "semget": ipc(lambda: libc.semget(0, 1, 0o1000 | 0o600)),
        }

    result = run_in_child(body)
    assert result == {"reason": None, "unix": errno.EPERM, "socketpair": b"x", "shmget": errno.EPERM,
                      "msgget": errno.EPERM, "semget": errno.EPERM}


@needs_landlock
def test_scoped_ruleset_blocks_signals_and_abstract_sockets_outside_the_domain() -> None:
    if PROBE["landlock_abi"] < 6:
        pytest.skip("Landlock ABI 6 (signal and abstract socket scoping) is not in this kernel")
    name = f"\0autocode-scope-{os.getpid()}"
    server = socket.socket(socket.AF_UNIX)
    server.bind(name)
    server.listen(1)
    outside = subprocess.Popen(["sleep", "30"])
    try:
        def body() -> dict[str, object]:
            plan, reason = confine.open_landlock_rules(read_only=["/usr", "/lib", "/lib64"], read_write=[])
            restricted = confine.restrict_landlock_rules(plan["abi"], plan["rules"])
            inner = os.fork()
            if inner == 0:
                time.sleep(30)
                os._exit(0)
            found = {"reasons": (reason, restricted), "own_child": _errno_of(lambda: os.kill(inner, 0)),
                     "outside": _errno_of(lambda: os.kill(outside.pid, 0)),
                     "abstract": _errno_of(lambda: socket.socket(socket.AF_UNIX).connect(name))}
            os.kill(inner, signal.SIGKILL)
            return found

        result = run_in_child(body, drop_uid=False)  # same uid as `outside`: only Landlock stands between them
    finally:
        outside.kill()
        outside.wait()
        server.close()
    assert result == {"reasons": (None, None), "own_child": None, "outside": errno.EPERM, "abstract": errno.EPERM}


def test_doctor_names_each_landlock_feature_the_kernel_lacks() -> None:
    from agent_core.sandbox.pool import SandboxExecutor

    assert confine.landlock_missing(7) == []
    assert confine.landlock_missing(5) == ["abstract Unix socket and signal scoping (Landlock ABI 6)"]
    assert confine.landlock_missing(3) == ["TCP bind/connect rules (Landlock ABI 4)",
                                           "abstract Unix socket and signal scoping (Landlock ABI 6)"]
    assert confine.landlock_missing(None) == ["Landlock itself"]
    executor = SandboxExecutor(backend="process", warm=0)
    executor._confinement = {"landlock": "on", "seccomp": "on", "landlock_missing": confine.landlock_missing(5)}
    executor._probe = {"landlock_abi": 5}
    protections = executor.describe()["protections"]
    assert any(p.startswith("NO abstract Unix socket and signal scoping") and "signalling" in p
               for p in protections), protections
    executor._confinement = {"landlock": "the kernel has no Landlock support (ENOSYS)", "seccomp": "on",
                             "landlock_missing": confine.landlock_missing(None)}
    protections = executor.describe()["protections"]
    assert "NO Landlock: the kernel has no Landlock support (ENOSYS)" in protections
    assert any(p.startswith("NO Landlock itself") and "/proc/net" in p for p in protections), protections
