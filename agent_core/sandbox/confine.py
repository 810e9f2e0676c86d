"""Kernel confinement for the sandbox child: a seccomp filter and a Landlock ruleset.

Applied in the freshly forked child after it has dropped to a non-root uid and set its rlimits,
right before untrusted code runs. Both layers are best effort: where the kernel or libseccomp
lacks support, the apply functions return a short reason string instead of raising, so the
caller can log it (and `autocode doctor` can report it) while the uid drop and rlimits remain.

This module is imported by the child under `python -I`, so it imports only the standard library;
`pyseccomp` is imported lazily inside the functions, and a missing library means "unavailable".
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import stat
import sys
from types import ModuleType

__all__ = [
    "LANDLOCK_FS_RIGHTS",
    "SECCOMP_BLOCKED_SYSCALLS",
    "SECCOMP_CLONE_NAMESPACE_FLAGS",
    "SECCOMP_ENOSYS_SYSCALLS",
    "SECCOMP_NETWORK_RULE",
    "SECCOMP_RULES",
    "SECCOMP_SHARED_HOST_RULES",
    "apply_landlock",
    "landlock_missing",
    "open_landlock_rules",
    "restrict_landlock_rules",
    "apply_seccomp",
    "probe",
]

# ---------------------------------------------------------------------------------------------
# seccomp
# ---------------------------------------------------------------------------------------------

# Syscalls that fail with EPERM for the untrusted code: debugging/reading other processes,
# namespaces and mounts, kernel keyrings, BPF, perf, module and kexec loading, swap, reboot,
# userfaultfd (a kernel-exploit helper), file handles (escape from bind mounts) and io_uring
# (a large attack surface that also bypasses seccomp argument checks on the socket rule).
SECCOMP_BLOCKED_SYSCALLS: tuple[str, ...] = (
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "unshare",
    "setns",
    "bpf",
    "keyctl",
    "add_key",
    "request_key",
    "perf_event_open",
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "reboot",
    "swapon",
    "swapoff",
    "userfaultfd",
    "open_by_handle_at",
    "name_to_handle_at",
    "io_uring_setup",
)

# personality() is blocked except for the read-only query personality(0xffffffff): changing the
# execution domain (e.g. ADDR_NO_RANDOMIZE) is never needed by generated code.
_PERSONALITY_QUERY = 0xFFFFFFFF

# clone() stays allowed (threads, fork, subprocess) unless its flags create a namespace; blocking
# unshare/setns alone would be pointless if clone(CLONE_NEWUSER | ...) still worked.
SECCOMP_CLONE_NAMESPACE_FLAGS: dict[str, int] = {
    "CLONE_NEWNS": 0x00020000,
    "CLONE_NEWCGROUP": 0x02000000,
    "CLONE_NEWUTS": 0x04000000,
    "CLONE_NEWIPC": 0x08000000,
    "CLONE_NEWUSER": 0x10000000,
    "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000,
}

# clone3() passes its flags in a struct that seccomp cannot inspect, so it answers ENOSYS: glibc
# (>= 2.34) and other runtimes then fall back to clone(), whose flags are checked above. This is
# what Docker's default profile does; threads, fork and subprocess keep working.
SECCOMP_ENOSYS_SYSCALLS: tuple[str, ...] = ("clone3",)

# With allow_network=False: socket(domain, ...) with domain != AF_UNIX fails with EPERM.
# socketpair() and AF_UNIX sockets (the channel to the parent) stay allowed.
SECCOMP_NETWORK_RULE = "socket(domain != AF_UNIX) -> EPERM"

# Without namespaces (the `process` backend) a step shares the host's abstract Unix socket namespace, its socket
# files and its System V / POSIX IPC: new AF_UNIX sockets fail (socketpair() and inherited sockets keep working),
# and so does every IPC call. Under bubblewrap the network and IPC namespaces already separate them.
SECCOMP_UNIX_SOCKET_RULE = "socket(AF_UNIX) -> EPERM"
SECCOMP_IPC_SYSCALLS: tuple[str, ...] = (
    "shmget", "shmat", "shmctl", "msgget", "msgsnd", "msgrcv", "msgctl", "semget", "semop", "semtimedop", "semctl",
    "ipc", "mq_open", "mq_unlink", "mq_timedsend", "mq_timedreceive", "mq_notify", "mq_getsetattr",
)


# The whole rule set, human-readable (for `autocode doctor`); the last rule only without network.
SECCOMP_RULES: tuple[str, ...] = (
    *(f"{name} -> EPERM" for name in SECCOMP_BLOCKED_SYSCALLS),
    "personality(persona != 0xffffffff) -> EPERM",
    *(f"clone(flags & {flag}) -> EPERM" for flag in SECCOMP_CLONE_NAMESPACE_FLAGS),
    *(f"{name} -> ENOSYS" for name in SECCOMP_ENOSYS_SYSCALLS),
    SECCOMP_NETWORK_RULE,
)
# Added on the `process` backend (no namespaces).
SECCOMP_SHARED_HOST_RULES: tuple[str, ...] = (
    SECCOMP_UNIX_SOCKET_RULE, *(f"{name} -> EPERM" for name in SECCOMP_IPC_SYSCALLS if name != "ipc"),
)


def _import_pyseccomp() -> tuple[ModuleType | None, str | None]:
    """Return (module, None) or (None, reason) when pyseccomp or libseccomp is unavailable."""
    # pyseccomp looks up libc and libseccomp with ctypes.util.find_library when imported; the real module costs
    # ~10 ms per sandbox worker to import (subprocess, shutil, tempfile) and runs `ldconfig -p`. Give it a stand-in
    # for the import only, so `import ctypes.util` in a step still gets the real one.
    stand_in = ModuleType("ctypes.util")
    stand_in.find_library = _find_library_quickly  # type: ignore[attr-defined]
    real = sys.modules.get("ctypes.util")
    if real is None:
        sys.modules["ctypes.util"] = stand_in
        ctypes.util = stand_in  # type: ignore[attr-defined]
    try:
        import pyseccomp  # noqa: PLC0415 - lazy on purpose: a missing library means "unavailable"
    except ImportError as exc:
        return None, f"pyseccomp is not installed ({exc})"
    except (OSError, RuntimeError) as exc:  # pyseccomp loads libseccomp when imported
        return None, f"libseccomp could not be loaded ({exc})"
    finally:
        if real is None:
            del sys.modules["ctypes.util"]
            del ctypes.util  # type: ignore[attr-defined]
    return pyseccomp, None


_SONAMES = {"c": "libc.so.6", "seccomp": "libseccomp.so.2"}


def _find_library_quickly(name: str) -> str | None:
    """Try the usual soname first; only then the real (slow) lookup."""
    soname = _SONAMES.get(name)
    if soname is not None:
        try:
            ctypes.CDLL(soname)
            return soname
        except OSError:
            pass
    return _real_find_library(name)


def _real_find_library(name: str) -> str | None:
    import importlib.util  # noqa: PLC0415 - the rare path

    spec = importlib.util.spec_from_file_location("_autocode_ctypes_util", os.path.join(
        os.path.dirname(ctypes.__file__), "util.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.find_library(name)


def _kernel_seccomp_reason() -> str | None:
    """Why this kernel cannot take a seccomp filter, or None when it can."""
    libc = ctypes.CDLL(None, use_errno=True)
    pr_get_seccomp = 21
    if libc.prctl(ctypes.c_int(pr_get_seccomp), ctypes.c_ulong(0), ctypes.c_ulong(0),
                  ctypes.c_ulong(0), ctypes.c_ulong(0)) < 0:
        return f"the kernel has no seccomp support ({os.strerror(ctypes.get_errno())})"
    try:
        with open("/proc/sys/kernel/seccomp/actions_avail", encoding="ascii") as f:
            actions = f.read().split()
    except OSError:
        return None  # older kernels lack the file; the load itself will tell
    if "errno" not in actions or "allow" not in actions:
        return f"the kernel's seccomp lacks the errno/allow actions ({' '.join(actions)})"
    return None


def apply_seccomp(*, allow_network: bool, shared_host: bool = False) -> str | None:
    """Build and install the sandbox's seccomp filter (see `build_seccomp`); None on success, else why not."""
    filt, reason = build_seccomp(allow_network=allow_network, shared_host=shared_host)
    return reason if filt is None else load_seccomp(filt)


def load_seccomp(program: bytes) -> str | None:
    """Install a program made by `build_seccomp` on the calling (single-threaded) process; None on success.

    Plain prctl calls: the worker that loads it per step never imports pyseccomp (~12 ms per worker start)."""
    libc = _libc()
    zero = ctypes.c_ulong(0)
    if libc.prctl(ctypes.c_int(_PR_SET_NO_NEW_PRIVS), ctypes.c_ulong(1), zero, zero, zero) != 0:
        return f"no_new_privs could not be set ({os.strerror(ctypes.get_errno())})"
    code = ctypes.create_string_buffer(program, len(program))
    fprog = _SockFprog(len(program) // 8, ctypes.cast(code, ctypes.c_void_p))
    if libc.prctl(ctypes.c_int(_PR_SET_SECCOMP), ctypes.c_ulong(_SECCOMP_MODE_FILTER), ctypes.byref(fprog),
                  zero, zero) != 0:
        return f"the kernel refused the seccomp filter ({os.strerror(ctypes.get_errno())})"
    return None


_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def build_seccomp(*, allow_network: bool, shared_host: bool = False) -> tuple[bytes | None, str | None]:
    """The sandbox's seccomp filter as a BPF program, ready to load, or (None, reason) when seccomp is
    unavailable. Built once by the server (libseccomp compiles it), loaded by each step with `load_seccomp`.

    Default action ALLOW; the syscalls in SECCOMP_BLOCKED_SYSCALLS, personality() other than the
    query, and namespace-creating clone() fail with EPERM (not kill, so the code sees an ordinary
    PermissionError); clone3() fails with ENOSYS; without allow_network, socket() for any domain
    but AF_UNIX fails with EPERM. With `shared_host` (no namespaces between the step and the host) new
    AF_UNIX sockets and System V / POSIX IPC fail with EPERM too (SECCOMP_SHARED_HOST_RULES). Sets
    NO_NEW_PRIVS (required for a non-root uid) and syncs the filter to all threads.
    """
    seccomp, reason = _import_pyseccomp()
    if seccomp is None:
        return None, reason
    eperm = seccomp.ERRNO(errno.EPERM)
    try:
        filt = seccomp.SyscallFilter(seccomp.ALLOW)
        filt.set_attr(seccomp.Attr.CTL_NNP, 1)  # libseccomp's default too; be explicit
        try:
            filt.set_attr(seccomp.Attr.CTL_TSYNC, 1)  # also confine threads that already exist
        except OSError:
            pass  # very old libseccomp/kernel: the freshly forked child is single-threaded anyway

        def syscall_number(name: str) -> int | None:
            number = seccomp.resolve_syscall(seccomp.Arch.NATIVE, name)
            return None if number == -1 else number  # -1: a name this libseccomp does not know

        for name in SECCOMP_BLOCKED_SYSCALLS:
            if (number := syscall_number(name)) is not None:
                filt.add_rule(eperm, number)
        if (number := syscall_number("personality")) is not None:
            filt.add_rule(eperm, number, seccomp.Arg(0, seccomp.NE, _PERSONALITY_QUERY))
        if (number := syscall_number("clone")) is not None:
            for flag in SECCOMP_CLONE_NAMESPACE_FLAGS.values():
                filt.add_rule(eperm, number, seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag))
        for name in SECCOMP_ENOSYS_SYSCALLS:
            if (number := syscall_number(name)) is not None:
                filt.add_rule(seccomp.ERRNO(errno.ENOSYS), number)
        if not allow_network and shared_host:
            filt.add_rule(eperm, "socket")
        elif not allow_network:
            filt.add_rule(eperm, "socket", seccomp.Arg(0, seccomp.NE, socket.AF_UNIX))
        elif shared_host:
            filt.add_rule(eperm, "socket", seccomp.Arg(0, seccomp.EQ, socket.AF_UNIX))
        if shared_host:
            for name in SECCOMP_IPC_SYSCALLS:
                if (number := syscall_number(name)) is not None:
                    filt.add_rule(eperm, number)
    except OSError as exc:
        return None, f"libseccomp could not build the filter ({exc})"
    if (reason := _kernel_seccomp_reason()) is not None:
        return None, reason
    reader, writer = os.pipe()  # the program is a few KB: it fits in the pipe
    try:
        with open(writer, "wb", closefd=True) as sink:
            filt.export_bpf(sink)
        with open(reader, "rb", closefd=False) as source:
            program = source.read()
    except OSError as exc:
        return None, f"libseccomp could not export the filter ({exc})"
    finally:
        os.close(reader)
    return program, None


# ---------------------------------------------------------------------------------------------
# Landlock
# ---------------------------------------------------------------------------------------------

# The same numbers on x86_64, aarch64 and every other architecture with the unified syscall table.
_SYS_LANDLOCK_CREATE_RULESET = 444
_SYS_LANDLOCK_ADD_RULE = 445
_SYS_LANDLOCK_RESTRICT_SELF = 446
_LANDLOCK_CREATE_RULESET_VERSION = 1 << 0
_LANDLOCK_RULE_PATH_BENEATH = 1
_PR_SET_NO_NEW_PRIVS = 38

# Filesystem access rights, each with the first Landlock ABI version that knows it.
LANDLOCK_FS_RIGHTS: dict[str, tuple[int, int]] = {
    "execute": (1 << 0, 1),
    "write_file": (1 << 1, 1),
    "read_file": (1 << 2, 1),
    "read_dir": (1 << 3, 1),
    "remove_dir": (1 << 4, 1),
    "remove_file": (1 << 5, 1),
    "make_char": (1 << 6, 1),
    "make_dir": (1 << 7, 1),
    "make_reg": (1 << 8, 1),
    "make_sock": (1 << 9, 1),
    "make_fifo": (1 << 10, 1),
    "make_block": (1 << 11, 1),
    "make_sym": (1 << 12, 1),
    "refer": (1 << 13, 2),
    "truncate": (1 << 14, 3),
    "ioctl_dev": (1 << 15, 5),
}


def _rights(*names: str) -> int:
    mask = 0
    for name in names:
        mask |= LANDLOCK_FS_RIGHTS[name][0]
    return mask


_READ_ONLY_RIGHTS = _rights("execute", "read_file", "read_dir")
# The only rights the kernel accepts on a rule for a non-directory (anything else is EINVAL).
_FILE_RIGHTS = _rights("execute", "write_file", "read_file", "truncate", "ioctl_dev")

# Every argument of the variadic syscall() is passed as a C long (or a pointer), never a bare int.
_c_long = ctypes.c_long


# Network rights (ABI 4): handled without a rule, TCP bind and connect are denied (a second layer under seccomp).
LANDLOCK_NET_RIGHTS: dict[str, tuple[int, int]] = {"bind_tcp": (1 << 0, 4), "connect_tcp": (1 << 1, 4)}
# Scopes (ABI 6): no connecting to abstract Unix sockets made outside the step's domain, and no signals to
# processes outside it (the worker, the server, other runs): a step may signal only itself and its children.
LANDLOCK_SCOPES: dict[str, tuple[int, int]] = {"abstract_unix_socket": (1 << 0, 6), "signal": (1 << 1, 6)}


class _RulesetAttr(ctypes.Structure):
    # Fields a kernel does not know must be zero (it checks); older kernels take the longer struct then.
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1  # __attribute__((packed)) in the uapi header: 12 bytes
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _landlock_abi(libc: ctypes.CDLL) -> tuple[int | None, str | None]:
    """The running kernel's Landlock ABI version, or (None, reason)."""
    abi = libc.syscall(_c_long(_SYS_LANDLOCK_CREATE_RULESET), ctypes.c_void_p(None), _c_long(0),
                       _c_long(_LANDLOCK_CREATE_RULESET_VERSION))
    if abi < 0:
        err = ctypes.get_errno()
        if err == errno.ENOSYS:
            return None, "the kernel has no Landlock support (ENOSYS)"
        if err == errno.EOPNOTSUPP:
            return None, "Landlock is disabled in this kernel (EOPNOTSUPP)"
        return None, f"Landlock version query failed ({os.strerror(err)})"
    return int(abi), None


def _handled_rights(abi: int, table: dict[str, tuple[int, int]] = LANDLOCK_FS_RIGHTS) -> int:
    mask = 0
    for bit, since in table.values():
        if since <= abi:
            mask |= bit
    return mask


def landlock_missing(abi: int | None) -> list[str]:
    """What this kernel's Landlock cannot do that the sandbox would use (for `autocode doctor`)."""
    if abi is None:
        return ["Landlock itself"]
    missing = []
    if abi < 4:
        missing.append("TCP bind/connect rules (Landlock ABI 4)")
    if abi < 6:
        missing.append("abstract Unix socket and signal scoping (Landlock ABI 6)")
    return missing


def open_landlock_rules(*, read_only: list[str], read_write: list[str]) -> tuple[dict | None, str | None]:
    """Open the paths a step may use (with the caller's rights, before any drop) as Landlock rules to apply later.

    Returns ({"abi": N, "rules": [(fd, rights), ...]}, None), or (None, reason) when Landlock is unavailable. The
    O_PATH fds stay open: each step builds its ruleset from them (`restrict_landlock_rules`) and may add rules of
    its own, such as its own /proc entries, which exist only once it does. Missing paths are skipped.
    """
    abi, reason = _landlock_abi(_libc())
    if abi is None:
        return None, reason
    rules: list[tuple[int, int]] = []
    for paths, wanted in ((read_only, _READ_ONLY_RIGHTS), (read_write, _handled_rights(abi))):
        for path in paths:
            rule = landlock_rule(path, wanted, abi)
            if rule is not None:
                rules.append(rule)
    return {"abi": abi, "rules": rules}, None


def landlock_rule(path: str, wanted: int, abi: int) -> tuple[int, int] | None:
    """(O_PATH fd, rights) for one path, or None when it is missing or gets no right (e.g. a file and dir rights)."""
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return None
    allowed = wanted & _handled_rights(abi)
    if not stat.S_ISDIR(os.fstat(fd).st_mode):
        allowed &= _FILE_RIGHTS
    if not allowed:
        os.close(fd)
        return None
    return fd, allowed


def restrict_landlock_rules(abi: int, rules: list[tuple[int, int]], *, scoped: bool = True,
                            deny_tcp: bool = False) -> str | None:
    """Restrict the calling process (and its future children) to `rules`: every filesystem right the ABI knows is
    handled, so what no rule grants is denied; with `scoped` (ABI 6) abstract Unix sockets and signals are
    limited to the process's own domain; with `deny_tcp` (ABI 4) TCP bind and connect are denied. None on success."""
    ruleset_fd, reason = _make_ruleset(abi, rules, scoped=scoped, deny_tcp=deny_tcp)
    if ruleset_fd is None:
        return reason
    try:
        return restrict_landlock(ruleset_fd)
    finally:
        os.close(ruleset_fd)


def _make_ruleset(abi: int, rules: list[tuple[int, int]], *, scoped: bool, deny_tcp: bool
                  ) -> tuple[int | None, str | None]:
    libc = _libc()
    attr = _RulesetAttr(handled_access_fs=_handled_rights(abi),
                        handled_access_net=_handled_rights(abi, LANDLOCK_NET_RIGHTS) if deny_tcp else 0,
                        scoped=_handled_rights(abi, LANDLOCK_SCOPES) if scoped else 0)
    ruleset_fd = libc.syscall(_c_long(_SYS_LANDLOCK_CREATE_RULESET), ctypes.byref(attr),
                              _c_long(ctypes.sizeof(attr)), _c_long(0))
    if ruleset_fd < 0:
        return None, f"landlock_create_ruleset failed ({os.strerror(ctypes.get_errno())})"
    for fd, allowed in rules:
        rule = _PathBeneathAttr(allowed_access=allowed, parent_fd=fd)
        if libc.syscall(_c_long(_SYS_LANDLOCK_ADD_RULE), _c_long(ruleset_fd), _c_long(_LANDLOCK_RULE_PATH_BENEATH),
                        ctypes.byref(rule), _c_long(0)) < 0:
            err = ctypes.get_errno()
            os.close(ruleset_fd)
            return None, f"landlock_add_rule failed ({os.strerror(err)})"
    return ruleset_fd, None


def apply_landlock(*, read_only: list[str], read_write: list[str]) -> str | None:
    """Restrict the calling process to the given paths (see `open_landlock_rules`): `read_only` paths get
    read_file, read_dir and execute, `read_write` paths every right; None on success, else why not."""
    plan, reason = open_landlock_rules(read_only=read_only, read_write=read_write)
    if plan is None:
        return reason
    try:
        return restrict_landlock_rules(plan["abi"], plan["rules"], scoped=False)
    finally:
        for fd, _ in plan["rules"]:
            os.close(fd)


def restrict_landlock(ruleset_fd: int) -> str | None:
    """Restrict the calling process (and its future children) with a Landlock ruleset fd."""
    libc = _libc()
    if libc.prctl(ctypes.c_int(_PR_SET_NO_NEW_PRIVS), ctypes.c_ulong(1), ctypes.c_ulong(0),
                  ctypes.c_ulong(0), ctypes.c_ulong(0)) < 0:
        return f"prctl(PR_SET_NO_NEW_PRIVS) failed ({os.strerror(ctypes.get_errno())})"
    if libc.syscall(_c_long(_SYS_LANDLOCK_RESTRICT_SELF), _c_long(ruleset_fd), _c_long(0)) < 0:
        return f"landlock_restrict_self failed ({os.strerror(ctypes.get_errno())})"
    return None


# ---------------------------------------------------------------------------------------------
# probe
# ---------------------------------------------------------------------------------------------


def probe(seccomp_reason: str | None | bool = False) -> dict[str, object]:
    """Report which confinements this machine supports, applying nothing.

    Returns {"landlock_abi": int | None, "seccomp": bool, "seccomp_reason": str | None}; seccomp
    is True when pyseccomp imports, libseccomp loads and the kernel offers the needed actions. A caller that
    already knows (a worker, told by the server that built its filter) passes `seccomp_reason`.
    """
    abi, _ = _landlock_abi(_libc())
    reason = seccomp_reason
    if reason is False:
        _, reason = _import_pyseccomp()
        if reason is None:
            reason = _kernel_seccomp_reason()
    return {"landlock_abi": abi, "seccomp": reason is None, "seccomp_reason": reason}
