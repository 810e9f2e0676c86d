"""Baseline backend: a fresh child interpreter per step with rlimits, a scrubbed environment and a
process-group kill. No namespaces yet (see the Sandbox issue for the hardened backend)."""

from __future__ import annotations

import asyncio
import json
import math
import os
import resource
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from agent_core.sandbox import Limits, StepRequest, StepResult

CHILD_SCRIPT = Path(__file__).with_name("child.py")
# Host variables the child may see: none are secrets. OPENBLAS_* keeps numpy correct on some CPUs.
_PASSTHROUGH = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "TZ")


def child_environment(workdir: Path) -> dict[str, str]:
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(workdir),
        "TMPDIR": str(workdir),
        "LANG": "C.UTF-8",
        "PYTHONIOENCODING": "utf-8",
        "OPENBLAS_NUM_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "MPLBACKEND": "Agg",
        "MPLCONFIGDIR": str(workdir / ".matplotlib"),
    }
    env.update({k: os.environ[k] for k in _PASSTHROUGH if k in os.environ})
    return env


def _apply_limits(limits: Limits) -> None:
    """Runs in the child between fork and exec."""
    mib = 1024 * 1024
    cpu = math.ceil(limits.timeout_s) + 1
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
    resource.setrlimit(resource.RLIMIT_AS, (limits.memory_mb * mib, limits.memory_mb * mib))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_size_mb * mib, limits.file_size_mb * mib))
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def read_capped(path: Path, cap_bytes: int) -> str:
    """Head and tail of a log file, with a marker for what was left out."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        if size <= cap_bytes:
            data = handle.read()
            return data.decode("utf-8", "replace")
        half = cap_bytes // 2
        head = handle.read(half)
        handle.seek(size - half)
        tail = handle.read()
    omitted = size - 2 * half
    return f"{head.decode('utf-8', 'replace')}\n[... {omitted} bytes omitted ...]\n{tail.decode('utf-8', 'replace')}"


def describe_exit(returncode: int | None, limits: Limits) -> str:
    if returncode is None:
        return "the step process did not finish"
    if returncode < 0:
        sig = signal.Signals(-returncode)
        hint = {
            signal.SIGKILL: " (killed: memory or process limits, or an external kill)",
            signal.SIGXCPU: f" (CPU time limit of {math.ceil(limits.timeout_s) + 1}s exceeded)",
            signal.SIGSEGV: " (crashed; possibly out of memory)",
        }.get(sig, "")
        return f"the step process was killed by {sig.name}{hint} before returning a result"
    return f"the step process exited with code {returncode} before returning a result"


class SubprocessExecutor:
    """Runs each step as `python -I -B -u child.py` (unbuffered: output printed before a kill is kept) in its own session, so a timeout kills its whole group."""

    name = "subprocess"

    def __init__(self, python: str | None = None):
        self.python = python or sys.executable

    async def run_step(self, request: StepRequest) -> StepResult:
        limits = request.limits
        started = time.monotonic()
        parent_sock, child_sock = socket.socketpair()
        with tempfile.TemporaryDirectory(prefix="autocode-step-") as logs:
            out_path, err_path = Path(logs, "stdout"), Path(logs, "stderr")
            with open(out_path, "wb") as out, open(err_path, "wb") as err:
                try:
                    proc = await asyncio.create_subprocess_exec(
                        self.python, "-I", "-B", "-u", str(CHILD_SCRIPT), str(child_sock.fileno()),
                        stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=err,
                        cwd=request.workdir, env=child_environment(request.workdir),
                        pass_fds=(child_sock.fileno(),), start_new_session=True,
                        preexec_fn=lambda: _apply_limits(limits),
                    )
                finally:
                    child_sock.close()
            try:
                result = await self._converse(proc, parent_sock, request)
            finally:
                _kill_group(proc.pid)
                await proc.wait()
                parent_sock.close()
            if result.error is None and not result.ok:
                result.error = describe_exit(proc.returncode, limits)
            cap = limits.max_log_kb * 1024
            result.stdout = read_capped(out_path, cap)
            result.stderr = read_capped(err_path, cap)
        result.duration_ms = int((time.monotonic() - started) * 1000)
        return result

    async def _converse(self, proc: asyncio.subprocess.Process, sock: socket.socket, request: StepRequest) -> StepResult:
        limits = request.limits
        line_limit = limits.max_output_kb * 1024 + 4096
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=line_limit)
        job = {
            "code": request.code,
            "function": request.function,
            "input": request.input,
            "has_input": request.input is not None,
            "tools": request.tool_names,
        }
        try:
            writer.write(json.dumps(job).encode() + b"\n")
            await writer.drain()
            return await asyncio.wait_for(self._serve(reader, writer, request), limits.timeout_s)
        except TimeoutError:
            return StepResult(ok=False, error=f"TimeoutError: the step did not finish within {limits.timeout_s:g}s")
        except (ValueError, asyncio.LimitOverrunError):
            return StepResult(
                ok=False,
                error=f"OutputTooLarge: the step's result (or a tool call's arguments) is larger than "
                f"{limits.max_output_kb} KB",
            )
        except (ConnectionError, BrokenPipeError):
            await asyncio.wait_for(proc.wait(), 1.0)
            return StepResult(ok=False)
        finally:
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: StepRequest) -> StepResult:
        while True:
            line = await reader.readline()
            if not line:
                return StepResult(ok=False)  # died without a result; the exit status explains why
            try:
                message = json.loads(line)
                op = message.get("op")
            except (ValueError, AttributeError):
                return StepResult(ok=False, error="ProtocolError: the step wrote garbage to its result channel")
            if op == "result":
                return StepResult(ok=True, output=message["output"])
            if op == "error":
                return StepResult(ok=False, error=message.get("error"), traceback=message.get("traceback"))
            if op == "call":
                reply = await self._answer_call(message, request)
                writer.write(json.dumps(reply, default=str).encode() + b"\n")
                await writer.drain()

    @staticmethod
    async def _answer_call(message: dict[str, Any], request: StepRequest) -> dict[str, Any]:
        name = message.get("name")
        if request.on_call is None or name not in request.tool_names:
            return {"id": message.get("id"), "ok": False, "error": f"unknown tool {name!r}"}
        try:
            value = await request.on_call(name, list(message.get("args") or []), dict(message.get("kwargs") or {}))
        except Exception as exc:  # a tool's failure is the step's error, reported to its code
            return {"id": message.get("id"), "ok": False, "error": f"{type(exc).__name__}: {exc}"}
        return {"id": message.get("id"), "ok": True, "value": value}


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
