"""The sandbox executor: a warm pool of workers, one per run, each with its own uid and working directory.

A worker is started ahead of time (interpreter up, declared libraries imported); a run takes one and keeps it
for all its steps, so steps share files; each step is a fresh process forked from the worker, dropped to the
run's uid and confined. When the run ends the worker is killed with everything in it, and the pool refills.
"""

from __future__ import annotations

import array
import asyncio
import json
import logging
import math
import mimetypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent_core.sandbox import (
    Artifact, BatchProgress, CollectedOutputs, Limits, SandboxUnavailable, StepBatch, StepRequest, StepResult,
    ToolCallHandler, run_batch_locally,
)
from agent_core.sandbox import confine, fontcache, network
from agent_core.sandbox.clock import STEP_DEADLINE
from agent_core.sandbox.backends import RUNTIME_DIR, WORKER_FLAGS, BwrapLauncher, choose_launcher, compile_runtime
from agent_core.sandbox.guardian import STOPPED as GUARDIAN_STOPPED, remove_ipc_of
from agent_core.sandbox.messages import ProtocolError, read_message
from agent_core.sandbox.steplog import LOG_DRAIN_TIMEOUT_S, StepLog, drain_logs
from agent_core.sandbox.uids import UidClaim, claim_range

if TYPE_CHECKING:
    from agent_core.config import Settings
    from agent_core.inputs import InputFile

log = logging.getLogger(__name__)

WORKER_START_TIMEOUT_S = 30.0
CONTROL_TIMEOUT_S = 10.0
# Files read back from a run, at most: outputs/ for artifacts (the loop posts a few of them and zips the rest), and
# the whole working directory when it travels with a remote job. Beyond them files are counted, not read.
COLLECT_MAX_FILES = 1000
ARCHIVE_MAX_FILES = 10000


class WorkerDied(Exception):
    """The worker stopped answering; the run's sandbox is gone."""


def describe_exit(returncode: int | None, limits: Limits) -> str:
    if returncode is None:
        return "the step process did not finish"
    if returncode < 0:
        sig = signal.Signals(-returncode)
        hint = {
            signal.SIGKILL: " (killed: memory or process limits, or an external kill)",
            signal.SIGXCPU: f" (CPU time limit of {cpu_seconds(limits)}s exceeded)",
            signal.SIGSEGV: " (crashed; possibly out of memory)",
            signal.SIGSYS: " (a forbidden system call)",
        }.get(sig, "")
        return f"the step process was killed by {sig.name}{hint} before returning a result"
    return f"the step process exited with code {returncode} before returning a result"


def cpu_seconds(limits: Limits) -> int:
    return math.ceil(limits.timeout_s) + 1


class UidPool:
    """One uid per live worker, so RLIMIT_NPROC and kill(-1) are per run. None when not root.

    The uids are claimed machine-wide (uids.py) when first needed: the first `count` free consecutive uids from
    `base`, so no other process's guardian or worker close can touch this pool's steps. `base` is then the claimed
    range's first uid. `release()` gives the claim up once every uid taken is given back."""

    def __init__(self, base: int, count: int):
        self.base, self.count = base, count
        self.enabled = os.geteuid() == 0
        self.claim: UidClaim | None = None
        self.free: list[int] = []
        self._out = 0  # uids taken and not given back
        self._releasing = False

    def ensure_claimed(self) -> bool:
        """Claim the range if it is not claimed yet; True when this call claimed it (its uids may hold leftovers
        of a process that died with the same range: the caller ends them). SandboxUnavailable when none is free."""
        if not self.enabled or self.claim is not None:
            return False
        self.claim = claim_range(self.base, self.count)
        self.base = self.claim.first
        self.free = list(self.claim.uids)
        self._releasing = False
        return True

    def take(self) -> int | None:
        if not self.enabled:
            return None
        self.ensure_claimed()
        if not self.free:
            raise SandboxUnavailable("all sandbox uids are in use (raise AUTOCODE_SANDBOX_MAX_WORKERS)")
        self._out += 1
        return self.free.pop(0)

    def give_back(self, uid: int | None) -> None:
        if uid is not None:
            self._out -= 1
            self.free.append(uid)
            if self._releasing and not self._out:
                self._release_now()

    def release(self) -> None:
        """Give the claim up (now, or when the last uid taken comes back)."""
        self._releasing = True
        if not self._out:
            self._release_now()

    def _release_now(self) -> None:
        claim, self.claim = self.claim, None
        if claim is not None:
            claim.release()
        self.free = []


class Worker:
    """The server's handle on one worker process; it also is the run's `Sandbox`."""

    def __init__(self, executor: "SandboxExecutor", uid: int | None):
        self.executor = executor
        self.uid = uid
        self.proc: subprocess.Popen | None = None
        self.control: socket.socket | None = None
        self.host_workdir: Path | None = None
        self.slirp: asyncio.subprocess.Process | None = None
        self.ready: dict[str, Any] = {}
        self.dead = False
        self.closed = False
        self._lock = asyncio.Lock()

    # --- life cycle ------------------------------------------------------------------------------------
    async def start(self, preload: list[str]) -> None:
        launcher = self.executor.launcher
        control, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pass_fds = [worker_end.fileno()]
        info_read = info_write = dns_read = None
        if isinstance(launcher, BwrapLauncher) and launcher.network:
            info_read, info_write = os.pipe()
            dns_read, dns_write = os.pipe()
            os.write(dns_write, network.DNS_CONFIG)
            os.close(dns_write)
            pass_fds += [info_write, dns_read]
        launch = launcher.prepare(worker_end.fileno(), info_write)
        if dns_read is not None:
            launch.argv[launch.argv.index("--ro-bind-data") + 1] = str(dns_read)
        self.host_workdir = launch.host_workdir
        if self.host_workdir is not None and self.uid is not None:
            os.chown(self.host_workdir, self.uid, self.uid)
        stderr_log = tempfile.TemporaryFile()

        def spawn() -> subprocess.Popen:
            # In a thread: forking from a busy server blocks for milliseconds, and the event loop serves chat acks.
            try:
                return subprocess.Popen(
                    launch.argv, pass_fds=pass_fds, env=launch.env,
                    cwd=launch.workdir if launch.host_workdir else "/", start_new_session=True,
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr_log,
                )
            finally:
                worker_end.close()
                for fd in (info_write, dns_read):
                    if fd is not None:
                        os.close(fd)

        spawning = asyncio.get_running_loop().run_in_executor(None, spawn)
        try:
            self.proc = await asyncio.shield(spawning)
        except asyncio.CancelledError:  # the process still appears: kill it when it does
            spawning.add_done_callback(_kill_spawned)
            stderr_log.close()
            control.close()
            raise
        control.setblocking(False)
        self.control = control
        try:
            if info_read is not None:
                await self._attach_network(info_read)
            self.ready = await self._request({
                "uid": self.uid, "gid": self.uid, "workdir": launch.workdir, "preload": preload,
                "network": self.executor.network, "seccomp": self.executor.seccomp, **launch.config,
                "font_cache": str(self.executor.font_cache) if self.executor.font_cache else None,
            }, expect="ready", timeout=WORKER_START_TIMEOUT_S)
        except (WorkerDied, TimeoutError, OSError) as exc:
            stderr_log.seek(0)
            detail = stderr_log.read().decode("utf-8", "replace").strip()[-2000:]
            await self.kill()
            raise SandboxUnavailable(f"the sandbox worker did not start ({type(exc).__name__}): {detail}") from None
        except BaseException:  # cancelled while starting: leave nothing behind
            await asyncio.shield(self.kill())
            raise
        finally:
            stderr_log.close()

    async def _attach_network(self, info_read: int) -> None:
        loop = asyncio.get_running_loop()
        data = await asyncio.wait_for(loop.run_in_executor(None, _read_json_object, info_read), 10)
        self.slirp = await network.attach(data["child-pid"])

    async def kill(self) -> None:
        """Kill the worker and everything in it; nothing of the run survives."""
        self.dead = True
        if self.proc is not None and self.proc.poll() is None:
            _kill_group(self.proc.pid)
        if self.uid is not None and not isinstance(self.executor.launcher, BwrapLauncher):
            # Without a pid namespace a step may have left its session: end every process of the run's uid, and
            # without an IPC namespace, remove the System V / POSIX IPC objects it still owns.
            await asyncio.to_thread(_kill_uid, self.uid)
            await asyncio.to_thread(remove_ipc_of, self.uid)
        if self.proc is not None:
            await asyncio.to_thread(self.proc.wait)
        if self.slirp is not None and self.slirp.returncode is None:
            self.slirp.kill()
            await self.slirp.wait()
        if self.control is not None:
            self.control.close()
        if self.host_workdir is not None:
            shutil.rmtree(self.host_workdir, ignore_errors=True)

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if not self.dead:
            await self.kill()
        self.executor.uids.give_back(self.uid)

    # --- control protocol --------------------------------------------------------------------------------
    async def _send(self, message: dict[str, Any], fds: list[int] | None = None) -> None:
        assert self.control is not None
        payload = json.dumps(message).encode()
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        try:
            self.control.sendmsg([payload], ancillary)
        except OSError as exc:
            raise WorkerDied(f"cannot reach the worker: {exc}") from None

    async def _receive(self) -> dict[str, Any]:
        assert self.control is not None
        try:
            data = await asyncio.get_running_loop().sock_recv(self.control, 1 << 20)
        except OSError as exc:
            raise WorkerDied(f"lost the worker: {exc}") from None
        if not data:
            raise WorkerDied("the worker exited")
        try:
            message = json.loads(data)
            message["op"]
        except (ValueError, TypeError, KeyError):
            raise WorkerDied("the worker sent garbage") from None
        return message

    async def _request(self, message: dict[str, Any], fds: list[int] | None = None, *, expect: str,
                       timeout: float = CONTROL_TIMEOUT_S) -> dict[str, Any]:
        await self._send(message, fds)
        try:
            reply = await asyncio.wait_for(self._receive(), timeout)
        except TimeoutError:
            raise WorkerDied("the worker did not answer") from None
        if reply["op"] != expect:
            raise WorkerDied(f"the worker answered {reply['op']!r} instead of {expect!r}")
        return reply

    # --- steps ---------------------------------------------------------------------------------------------
    async def run_step(self, request: StepRequest) -> StepResult:
        async with self._lock:
            started = time.monotonic()
            if self.dead:
                return StepResult(ok=False, error="SandboxError: this run's sandbox was lost after an earlier failure")
            try:
                result = await self._run_step(request)
            except WorkerDied as exc:
                await self.kill()
                result = StepResult(ok=False, error=f"SandboxError: {exc}; the run's working files are gone")
            except asyncio.CancelledError:
                await asyncio.shield(self.kill())  # cancellation kills the step's whole process tree at once
                raise
            result.duration_ms = int((time.monotonic() - started) * 1000)
            return result

    async def _run_step(self, request: StepRequest) -> StepResult:
        """One step: its channel and its two log pipes go to the worker, which forks the step onto them."""
        limits = request.limits
        ours, theirs = socket.socketpair()
        logs: list[StepLog] = []  # stdout, stderr: drained while the step runs, never written to a file
        try:
            write_ends: list[int] = []
            try:
                for _ in range(2):
                    stream, write_end = await StepLog.open(limits.max_log_kb * 1024)
                    logs.append(stream)
                    write_ends.append(write_end)
                await self._request({"op": "step", "libraries": request.libraries, "limits": {
                    "cpu_s": cpu_seconds(limits), "memory_mb": limits.memory_mb,
                    "file_size_mb": limits.file_size_mb, "max_procs": limits.max_procs,
                }}, [theirs.fileno(), *write_ends], expect="started")
            finally:
                theirs.close()  # the worker holds its own copies: the pipes end when the step's processes do
                for fd in write_ends:
                    os.close(fd)
            try:
                result = await _converse(ours, request)
            finally:
                ours.close()
                exited = await self._request({"op": "finish"}, expect="exited")
            await drain_logs(logs, LOG_DRAIN_TIMEOUT_S)  # what the step wrote before it was killed, then EOF
        finally:
            ours.close()
            for stream in logs:
                stream.close()
        if result.error is None and not result.ok:
            result.error = describe_exit(exited.get("returncode"), limits)
        result.stdout, result.stderr = (stream.text() for stream in logs)
        return result

    async def run_batch(self, batch: StepBatch, on_call: ToolCallHandler | None, progress: BatchProgress,
                        gate: Any = None) -> list[StepResult]:
        return await run_batch_locally(self, batch, on_call, progress, gate)

    async def archive(self, max_total_bytes: int, max_files: int = ARCHIVE_MAX_FILES) -> tuple[bytes, list[str]]:
        """The run's whole working directory as a tar (regular files within the caps), and what was left out."""
        if self.dead:
            raise WorkerDied("the run's sandbox was lost; its working files with it")
        async with self._lock:
            with tempfile.TemporaryFile() as archive:
                report = await self._request(
                    {"op": "archive", "max_file_bytes": max_total_bytes, "max_total_bytes": max_total_bytes,
                     "max_files": max_files},
                    [archive.fileno()], expect="archived", timeout=60,
                )
                archive.seek(0)
                return archive.read(), list(report.get("skipped", []))

    async def restore(self, data: bytes) -> None:
        """Unpack a tar made by `archive` into this (fresh) sandbox's working directory, as the run's uid."""
        async with self._lock:
            with tempfile.TemporaryFile() as archive:
                archive.write(data)
                archive.seek(0)
                report = await self._request({"op": "restore"}, [archive.fileno()], expect="restored", timeout=60)
        if report.get("error"):
            raise WorkerDied(f"the working files could not be restored: {report['error']}")

    async def put_inputs(self, files: "list[InputFile]") -> None:
        """Send the files as a tar on a temporary file (written from disk in chunks, in a thread: a 50 MB upload is
        never whole in memory); the worker unpacks it into a read-only inputs/ (worker.py `put_inputs`)."""
        from agent_core.inputs import write_inputs_tar

        if self.dead:
            raise SandboxUnavailable("the run's sandbox was lost before its input files were placed")
        async with self._lock:
            with tempfile.TemporaryFile() as archive:
                await asyncio.to_thread(write_inputs_tar, files, archive)
                archive.flush()
                archive.seek(0)
                try:
                    report = await self._request({"op": "inputs"}, [archive.fileno()], expect="inputs_put",
                                                 timeout=120)
                except WorkerDied as exc:
                    raise SandboxUnavailable(f"the input files could not be placed: {exc}") from None
        if report.get("error"):
            raise SandboxUnavailable(f"the input files could not be placed: {report['error']}")

    async def collect_outputs(self, max_file_bytes: int, max_total_bytes: int,
                              max_files: int = COLLECT_MAX_FILES) -> CollectedOutputs:
        if self.dead:
            return CollectedOutputs([], ["the run's sandbox was lost; its outputs with it"])
        async with self._lock:
            with tempfile.TemporaryFile() as archive:
                try:
                    report = await self._request(
                        {"op": "collect", "max_file_bytes": max_file_bytes, "max_total_bytes": max_total_bytes,
                         "max_files": max_files},
                        [archive.fileno()], expect="collected", timeout=60,
                    )
                except WorkerDied as exc:
                    return CollectedOutputs([], [f"outputs could not be collected: {exc}"], left_out=None)
                archive.seek(0)
                artifacts = _read_archive(archive, {f["name"] for f in report.get("files", [])}, max_total_bytes)
        return CollectedOutputs(artifacts, list(report.get("skipped", [])), int(report.get("skipped_count") or 0))


def _read_json_object(fd: int) -> dict[str, Any]:
    """Read the JSON object bubblewrap writes to --info-fd (the sandbox's pids), and close the fd."""
    buffer = b""
    try:
        while chunk := os.read(fd, 4096):
            buffer += chunk
            try:
                return json.loads(buffer)
            except ValueError:
                continue
    finally:
        os.close(fd)
    raise WorkerDied("bubblewrap exited before reporting its sandbox")


def _read_archive(archive: Any, expected: set[str] | None, max_total_bytes: int) -> list[Artifact]:
    """Read (never extract) a tar a worker wrote: regular files (those it reported), within the cap."""
    artifacts: list[Artifact] = []
    total = 0
    try:
        with tarfile.open(fileobj=archive, mode="r:") as tar:
            for member in tar:
                if not member.isfile() or (expected is not None and member.name not in expected) \
                        or total + member.size > max_total_bytes:
                    continue
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                total += len(data)
                mime = mimetypes.guess_type(member.name)[0] or "application/octet-stream"
                artifacts.append(Artifact(member.name, data, mime))
    except tarfile.TarError as exc:
        log.warning("unreadable outputs archive: %s", exc)
    return artifacts


async def _converse(sock: socket.socket, request: StepRequest) -> StepResult:
    """Send the job, answer tool calls, return the step's result (or its error)."""
    limits = request.limits
    line_limit = limits.max_output_kb * 1024 + 4096
    reader, writer = await asyncio.open_unix_connection(sock=sock, limit=line_limit)
    job = {"code": request.code, "function": request.function, "input": request.input,
           "has_input": request.input is not None, "tools": request.tool_names}
    try:
        writer.write(json.dumps(job).encode() + b"\n")
        await writer.drain()
        async with asyncio.timeout(limits.timeout_s) as deadline:  # stopped while a person decides (clock.py)
            token = STEP_DEADLINE.set(deadline)
            try:
                return await _serve(reader, writer, request)
            finally:
                STEP_DEADLINE.reset(token)
    except TimeoutError:
        return StepResult(ok=False, error=f"TimeoutError: the step did not finish within {limits.timeout_s:g}s")
    except (ValueError, asyncio.LimitOverrunError):
        return StepResult(ok=False, error=f"OutputTooLarge: the step's result (or a tool call's arguments) is "
                          f"larger than {limits.max_output_kb} KB")
    except (ConnectionError, BrokenPipeError):
        return StepResult(ok=False)
    finally:
        writer.close()


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: StepRequest) -> StepResult:
    """Read the step's messages (each checked by `read_message`) until its result; answer its tool calls."""
    while True:
        line = await reader.readline()
        if not line:
            return StepResult(ok=False)  # died without a result; the exit status explains why
        try:
            message = read_message(line)
        except ProtocolError as exc:
            return StepResult(ok=False, error=f"ProtocolError: {exc}")
        op = message["op"]
        if op == "result":
            return StepResult(ok=True, output=message["output"])
        if op == "error":
            return StepResult(ok=False, error=message["error"], traceback=message.get("traceback"))
        if op == "call":
            reply = await _answer_call(message, request)
            writer.write(json.dumps(reply, default=str).encode() + b"\n")
            await writer.drain()


async def _answer_call(message: dict[str, Any], request: StepRequest) -> dict[str, Any]:
    """A checked tool call (`read_message`: `name` a string, `args` a list, `kwargs` a dict) answered by `on_call`."""
    name = message["name"]
    if request.on_call is None or name not in request.tool_names:
        return {"id": message.get("id"), "ok": False, "error": f"unknown tool {name!r}"}
    try:
        value = await request.on_call(name, list(message.get("args", [])), dict(message.get("kwargs", {})))
    except Exception as exc:  # a tool's failure is the step's error, reported to its code
        reply = {"id": message.get("id"), "ok": False, "error": f"{type(exc).__name__}: {exc}"}
        raise_as = getattr(exc, "raised_in_step_as", None)
        if raise_as in ("ToolDenied", "ToolError"):  # the step may catch ToolDenied and ToolError by name
            reply.update(error=str(exc), raise_as=raise_as)
        return reply
    return {"id": message.get("id"), "ok": True, "value": value}


def _kill_spawned(spawning: "asyncio.Future[subprocess.Popen]") -> None:
    if not spawning.cancelled() and spawning.exception() is None:
        proc = spawning.result()
        _kill_group(proc.pid)
        asyncio.get_running_loop().run_in_executor(None, proc.wait)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_uid(uid: int) -> None:
    """SIGKILL every process of `uid` (kill(-1) as that uid, in a short-lived child)."""
    subprocess.run(["kill", "-s", "KILL", "--", "-1"], user=uid, group=uid, extra_groups=[],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)


class SandboxExecutor:
    """The `Executor`: picks the backend, keeps warm workers, hands one to each run."""

    def __init__(self, *, backend: str = "auto", network: bool = False, warm: int = 2, uid_base: int = 61000,
                 max_workers: int = 64, workdir_mb: int = 256, workdir_root: Path | None = None,
                 preload: list[str] | None = None):
        # matplotlib's font list, built once and copied into each worker's .matplotlib (sandbox/fontcache.py).
        self.font_cache = fontcache.directory()
        self._font_cache_built = False
        self.launcher, self.fallback_reason = choose_launcher(
            backend, workdir_mb, workdir_root, network, extra_read_only=[str(self.font_cache)] if self.font_cache else [])
        compile_runtime()
        # Compiled once, loaded by every step. Without namespaces it also refuses new Unix sockets and IPC.
        program, reason = confine.build_seccomp(allow_network=network,
                                                shared_host=not isinstance(self.launcher, BwrapLauncher))
        self.seccomp = {"program": program.hex() if program else None, "reason": reason}
        self.name = self.launcher.name
        self.network = network
        self.warm = warm
        self.preload = preload or []
        self.uids = UidPool(uid_base, max_workers)
        self._idle: list[Worker] = []
        # Cold starts are CPU-bound: a few at a time give each run its sandbox sooner than all at once would.
        self._starting = asyncio.Semaphore(os.cpu_count() or 2)
        self._refill: asyncio.Task | None = None
        self._probe: dict[str, Any] = {}
        self._confinement: dict[str, str] = {}  # what the last started worker actually built: "on" or why not
        self._guardian: subprocess.Popen | None = None
        self.opened = 0  # sandboxes handed to runs since start (a run answered without code opens none)
        if self.fallback_reason and backend == "auto":
            log.warning("sandbox: using the fallback 'process' backend because %s; see `autocode doctor`",
                        self.fallback_reason)
        if self.uids.enabled is False:
            log.warning("sandbox: not running as root, so steps run under the server's own uid")

    @classmethod
    def from_settings(cls, settings: "Settings", preload: list[str] | None = None) -> "SandboxExecutor":
        """The executor `Settings` describe. Raises SandboxUnavailable when AUTOCODE_SANDBOX_BACKEND=bwrap cannot
        work on this host.

        Workers start bare (cheap enough to start one per run); a run's worker imports the declared libraries its
        steps use when the first of them runs, and later steps fork with them loaded."""
        return cls(
            backend=settings.sandbox_backend, network=settings.sandbox_network, warm=settings.sandbox_warm,
            uid_base=settings.sandbox_uid_base, max_workers=settings.sandbox_max_workers,
            workdir_mb=settings.workdir_mb, workdir_root=settings.workdir_root, preload=preload,
        )

    async def start(self) -> None:
        """For a long-running server: claim the uid range (ending leftovers of a process that died with it), then
        pre-start workers."""
        if await self._claim_uids() and self._needs_guardian():
            # Without pid namespaces, a step's orphans may outlive a killed server whose guardian died too (a whole
            # process group killed): the uids are ours now, and so is what still runs under them.
            await asyncio.to_thread(lambda: [(_kill_uid(uid), remove_ipc_of(uid)) for uid in self.uids.free])
        await self._build_font_cache(force=True)  # a long-running server: pick up fonts installed since
        await self._fill()

    async def _claim_uids(self) -> bool:
        """Claim this executor's uid range (uids.py) if it is not claimed yet; True when this call claimed it."""
        if self.uids.claim is not None or not self.uids.enabled:
            return False
        return await asyncio.to_thread(self.uids.ensure_claimed)

    async def _build_font_cache(self, force: bool = False) -> None:
        if self.font_cache is not None and (force or not self._font_cache_built):
            self._font_cache_built = True
            await asyncio.to_thread(fontcache.build, self.font_cache, force)

    def _needs_guardian(self) -> bool:
        return self.uids.enabled and not isinstance(self.launcher, BwrapLauncher)

    def _start_guardian(self) -> None:
        """On the `process` backend, a process that outlives us and ends our runs' leftovers when we die (see
        guardian.py). Started before the first worker; its stdin is a pipe only we hold."""
        if self._guardian is not None or not self._needs_guardian():
            return
        base = self.launcher.base
        base.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, *WORKER_FLAGS, str(RUNTIME_DIR / "guardian.py"),
                   str(self.uids.base), str(self.uids.count), str(base)]
        # It holds the uid claim too (its lock files' descriptors): the range stays ours until it has swept it.
        claim_fds = self.uids.claim.fds if self.uids.claim is not None else []
        self._guardian = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True,
                                          pass_fds=claim_fds)

    async def _fill(self) -> None:
        while len(self._idle) < self.warm:
            worker = await self._new_worker()
            self._idle.append(worker)

    async def _new_worker(self) -> Worker:
        await self._claim_uids()
        self._start_guardian()
        await self._build_font_cache()  # once per executor, when missing (the CLI's runs)
        worker = Worker(self, self.uids.take())
        try:
            async with self._starting:
                await worker.start(self.preload)
        except BaseException:
            await asyncio.shield(worker.close())
            raise
        self._probe = worker.ready.get("probe", {})
        self._confinement = worker.ready.get("confinement", {})
        return worker

    async def open(self, run_id: str) -> Worker:
        self.opened += 1
        if self._idle:
            worker = self._idle.pop(0)
            if self.warm and (self._refill is None or self._refill.done()):
                self._refill = asyncio.create_task(self._fill())
            return worker
        return await self._new_worker()

    async def stop(self) -> None:
        if self._refill is not None:
            self._refill.cancel()
            await asyncio.gather(self._refill, return_exceptions=True)
        idle, self._idle = self._idle, []
        for worker in idle:
            await worker.close()
        guardian, self._guardian = self._guardian, None
        if guardian is not None:  # stopped in order: the workers are closed, nothing is left for it to end
            try:
                guardian.stdin.write(GUARDIAN_STOPPED)  # type: ignore[union-attr]
                guardian.stdin.close()  # type: ignore[union-attr]
            except OSError:
                pass
            try:
                await asyncio.to_thread(guardian.wait, 10)
            except subprocess.TimeoutExpired:
                guardian.kill()
        self.uids.release()  # other processes may take our uids once no run of ours holds one

    def describe(self) -> dict[str, Any]:
        """Known after a worker started (`autocode doctor` starts one): Landlock and seccomp as really applied."""
        shared_host = not isinstance(self.launcher, BwrapLauncher)
        landlock, seccomp = self._confinement.get("landlock"), self._confinement.get("seccomp")
        missing = list(self._confinement.get("landlock_missing") or [])
        confinement = []
        if landlock == "on":
            confinement.append(f"Landlock (ABI {self._probe.get('landlock_abi')}): file access limited per step"
                               + ("; signals and abstract Unix sockets scoped to the step's own processes"
                                  if not any("ABI 6" in m for m in missing) else ""))
            if shared_host:
                confinement.append("/proc: a step reads only its own entries (no other processes, no host sockets)")
        elif landlock:
            confinement.append(f"NO Landlock: {landlock}")
        consequences = {  # what the process backend loses without each Landlock feature
            "Landlock itself": "steps can read world-readable host files, other processes' /proc entries "
                               "(command lines) and the host's socket tables in /proc/net",
            "abstract Unix socket and signal scoping (Landlock ABI 6)":
                "a step is stopped from signalling other processes only by its uid"
                + ("" if seccomp == "on" else ", and can connect to the host's abstract Unix sockets"),
            "TCP bind/connect rules (Landlock ABI 4)": "network off rests on seccomp alone",
        }
        for feature in missing:
            if shared_host and feature in consequences and (landlock == "on" or feature == "Landlock itself"):
                confinement.append(f"NO {feature}: {consequences[feature]}")
        if seccomp == "on":
            confinement.append("seccomp: ptrace, mount, unshare, bpf, keyctl… blocked"
                               + ("" if self.network else "; sockets other than AF_UNIX blocked")
                               + ("; new Unix sockets and System V / POSIX IPC refused" if shared_host else ""))
        elif seccomp:
            confinement.append(f"NO seccomp: {seccomp}" + (
                " (so steps can reach the host's Unix sockets and System V / POSIX IPC; a run's IPC objects are "
                "still removed when it ends)" if shared_host else ""))
        if shared_host and self.uids.enabled:
            confinement.append("guardian process: a killed server's runs are ended (processes, IPC, directories)")
        return {
            "backend": self.name,
            "fallback_reason": self.fallback_reason,
            "uid_drop": self.uids.enabled,
            "network": "on" if self.network else "off",
            "protections": [*self.launcher.protections(), "rlimits: CPU, address space, processes, file size, "
                            "open files, no core dumps", "scrubbed environment", *confinement],
            "probe": self._probe,
        }
