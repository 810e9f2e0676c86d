"""The sandbox executor, end to end on the real kernel: a warm pool of per-run workers, one fresh confined
process per step, on both backends (bubblewrap namespaces, and the plain "process" fallback).

Every test that takes the `sandbox` fixture runs once per backend. These tests need root (the uid drop), as on
the CI host; the bwrap ones need bubblewrap and skip without it (tests/system_packages.py).
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import re
import secrets
import shutil
import signal
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent_core.sandbox import CollectedOutputs, Limits, StepRequest, StepResult, confine
from agent_core.sandbox.pool import SandboxExecutor, Worker
from tests.procs import host_processes
from tests.system_packages import requires

BACKENDS = [pytest.param("bwrap", marks=requires("bubblewrap")), "process"]
FAST = Limits(timeout_s=5)
DEFAULT_UID_BASE = 61000
# The fixture's own uid range, away from the default one, so that a concurrent test run elsewhere on this host
# (other test files use the default range) never shows up in the per-uid process scans below.
UID_BASE = 63000 + 64 * (os.getpid() % 100)


@pytest.fixture(params=BACKENDS)
async def sandbox(request):
    """One run's opened sandbox (an executor with no warm workers); closed, and the executor stopped, after."""
    executor = SandboxExecutor(backend=request.param, warm=0, uid_base=UID_BASE)
    box = await executor.open(f"test-{request.node.name}")
    try:
        yield box
    finally:
        await box.close()
        await executor.stop()


def backend_of(box: Worker) -> str:
    return box.executor.name


async def run(
    box: Worker,
    code: str,
    function: str = "step",
    input: dict[str, Any] | None = None,
    limits: Limits = FAST,
    **extra: Any,
) -> StepResult:
    request = StepRequest(code=textwrap.dedent(code), function=function, input=input, limits=limits, **extra)
    return await box.run_step(request)


# ---------------------------------------------------------------- host-side process inspection


def _status(pid: int | str) -> dict[str, str]:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return {key: value.strip() for key, _, value in (line.partition(":") for line in text.splitlines())}


def _alive(status: dict[str, str]) -> bool:
    return bool(status) and status.get("State", "Z")[:1] not in ("Z", "X")


def _cmdline(pid: int | str) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return raw.decode("utf-8", "replace").split("\0")[:-1]


def uid_processes(uid: int) -> list[int]:
    """Live processes (zombies aside) whose real or effective uid is `uid`, anywhere on the host."""
    return [p.pid for p in host_processes() if p.alive and uid in (p.uid, p.euid)]


def host_sleeps(duration: str) -> list[int]:
    """Live `sleep DURATION` processes anywhere on the host: give the test's sleeps a duration no one else uses
    (`unique_sleep()`), so another program's `sleep 300` is never counted."""
    return [int(e) for e in os.listdir("/proc")
            if e.isdigit() and _cmdline(e) == ["sleep", duration] and _alive(_status(e))]


def unique_sleep(seconds: int) -> str:
    """A `sleep` duration of about `seconds` that marks the processes as this test's: e.g. "300.004217"."""
    return f"{seconds}.{os.getpid() % 1000:03d}{secrets.randbelow(1000):03d}"


async def eventually(condition: Callable[[], bool], within_s: float, every_s: float = 0.02) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if condition():
            return True
        await asyncio.sleep(every_s)
    return condition()


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            tree.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    return tree


def worker_host_pid(box: Worker) -> int:
    """The host pid of the run's worker (the launched process itself, or the Python inside bubblewrap)."""
    tree, queue = _children(), [box.proc.pid]
    while queue:
        pid = queue.pop(0)
        argv = _cmdline(pid)
        if argv and os.path.basename(argv[0]).startswith("python") and any(a.endswith("worker.py") for a in argv):
            if _status(pid).get("Uid", "").split()[:1] == ["0"]:
                return pid
        queue += tree.get(pid, [])
    raise AssertionError(f"no worker process under {box.proc.pid}")


def sandbox_launches() -> set[int]:
    """Live children of this test process that are sandbox workers (bwrap, or worker.py directly)."""
    me = os.getpid()
    found = set()
    for pid in _children().get(me, []):
        argv = _cmdline(pid)
        if argv and _alive(_status(pid)) and (os.path.basename(argv[0]) == "bwrap"
                                              or any(a.endswith("worker.py") for a in argv)):
            found.add(pid)
    return found


# ---------------------------------------------------------------- results


async def test_returns_dict_output(sandbox):
    result = await run(sandbox, "def step():\n    return {'numbers': [1, 2, 3], 'name': 'x', 'nested': {'ok': True}}\n")
    assert result.ok, result.error
    assert result.error is None
    assert result.output == {"numbers": [1, 2, 3], "name": "x", "nested": {"ok": True}}
    assert result.duration_ms > 0


async def test_input_passed_to_later_step(sandbox):
    code = "def add_up(previous_output):\n    return {'total': sum(previous_output['numbers'])}\n"
    result = await run(sandbox, code, function="add_up", input={"numbers": [1, 2, 3, 4]})
    assert result.ok, result.error
    assert result.output == {"total": 10}


async def test_empty_dict_input_is_still_passed(sandbox):
    code = "def step(previous_output):\n    return {'got': previous_output}\n"
    result = await run(sandbox, code, input={})
    assert result.output == {"got": {}}


async def test_numpy_values_converted(sandbox):
    code = """
    import numpy as np

    def step():
        a = np.arange(4).reshape(2, 2)
        return {"array": a, "int": np.int64(7), "float": np.float32(0.5), "mean": a.mean(), "bool": np.bool_(True)}
    """
    result = await run(sandbox, code, limits=Limits(timeout_s=10))
    assert result.ok, (result.error, result.stderr)
    assert result.output == {"array": [[0, 1], [2, 3]], "int": 7, "float": 0.5, "mean": 1.5, "bool": True}
    assert type(result.output["int"]) is int


async def test_non_dict_return(sandbox):
    result = await run(sandbox, "def step():\n    return [1, 2]\n")
    assert not result.ok
    assert result.output is None
    assert result.error == "TypeError: step returned list, not a dict"


async def test_none_return(sandbox):
    result = await run(sandbox, "def step():\n    pass\n")
    assert not result.ok
    assert "returned NoneType, not a dict" in result.error


async def test_non_json_return(sandbox):
    for value in ["{1, 2}", "float('nan')", "object()", "float('inf')"]:
        result = await run(sandbox, f"def step():\n    return {{'v': {value}}}\n")
        assert not result.ok, value
        assert result.output is None, value
        assert result.error.startswith("TypeError: step returned a dict that is not JSON"), (value, result.error)


async def test_exception_reported_with_user_traceback(sandbox):
    code = """
    def helper(d):
        return d["x"]

    def step():
        data = {"y": 1}
        return {"v": helper(data)}
    """
    result = await run(sandbox, code)
    assert not result.ok
    assert result.error == "KeyError: 'x'"
    tb = result.traceback
    assert tb.startswith("Traceback (most recent call last):")
    assert 'File "<step>", line 7, in step' in tb
    assert 'return {"v": helper(data)}' in tb
    assert 'File "<step>", line 3, in helper' in tb
    assert 'return d["x"]' in tb
    assert "child.py" not in tb
    assert "worker.py" not in tb
    assert tb.rstrip().endswith("KeyError: 'x'")


async def test_exception_at_definition_time(sandbox):
    result = await run(sandbox, "raise RuntimeError('boom at import')\n\ndef step():\n    return {}\n")
    assert result.error == "RuntimeError: boom at import"
    assert "child.py" not in result.traceback


async def test_sys_exit_is_a_step_error(sandbox):
    result = await run(sandbox, "import sys\n\ndef step():\n    sys.exit(4)\n")
    assert not result.ok
    assert result.error == "SystemExit: 4"


async def test_os_exit_reports_exit_code(sandbox):
    result = await run(sandbox, "import os\n\ndef step():\n    print('bye', flush=True)\n    os._exit(3)\n")
    assert not result.ok
    assert result.output is None
    assert "exited with code 3" in result.error
    assert result.stdout == "bye\n"
    after = await run(sandbox, "def step():\n    return {'still': 'works'}\n")
    assert after.output == {"still": "works"}, after.error


# ---------------------------------------------------------------- limits and process hygiene


async def test_timeout_kills_the_step(sandbox):
    code = "import time\n\ndef step():\n    time.sleep(30)\n    return {}\n"
    started = time.monotonic()
    result = await run(sandbox, code, limits=Limits(timeout_s=1))
    elapsed = time.monotonic() - started
    assert not result.ok
    assert result.error.startswith("TimeoutError")
    assert "1s" in result.error
    assert elapsed < 3.0
    assert uid_processes(sandbox.uid) == []


async def test_stdout_before_timeout_is_kept(sandbox):
    code = "import time\n\ndef step():\n    print('starting download')\n    time.sleep(30)\n"
    result = await run(sandbox, code, limits=Limits(timeout_s=0.5))
    assert result.error.startswith("TimeoutError")
    assert result.stdout == "starting download\n"


async def test_background_process_killed_after_return(sandbox):
    code = """
    import subprocess

    def step():
        proc = subprocess.Popen(["sleep", "30"])
        return {"pid": proc.pid}
    """
    result = await run(sandbox, code)
    assert result.ok, result.error
    assert isinstance(result.output["pid"], int) and result.output["pid"] > 0
    assert uid_processes(sandbox.uid) == [], "the step's background sleep survived the step"


async def test_background_process_killed_after_timeout(sandbox):
    code = """
    import subprocess, time

    def step():
        subprocess.Popen(["sleep", "30"])
        time.sleep(30)
    """
    result = await run(sandbox, code, limits=Limits(timeout_s=0.5))
    assert result.error.startswith("TimeoutError")
    assert uid_processes(sandbox.uid) == []


async def test_timeout_kills_the_whole_process_tree(sandbox):
    seen: list[list[int]] = []
    duration = unique_sleep(300)  # only this test's sleeps are counted, not any other `sleep 300` on the host

    async def on_call(name: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
        seen.append([pid for pid in uid_processes(sandbox.uid) if _cmdline(pid) == ["sleep", duration]])
        return None

    code = """
    import os, subprocess, time

    def step():
        subprocess.Popen(["sleep", DURATION])
        subprocess.Popen(["sleep", DURATION], start_new_session=True)
        middle = os.fork()
        if middle == 0:  # a daemon: own session, orphaned right away
            os.setsid()
            subprocess.Popen(["sleep", DURATION])
            os._exit(0)
        os.waitpid(middle, 0)
        spawned()
        time.sleep(30)
        return {}
    """.replace("DURATION", repr(duration))
    assert host_sleeps(duration) == []
    started = time.monotonic()
    result = await run(sandbox, code, limits=Limits(timeout_s=1), tool_names=["spawned"], on_call=on_call)
    elapsed = time.monotonic() - started
    assert result.error.startswith("TimeoutError"), result.error
    assert elapsed < 1 + 2
    assert len(seen) == 1 and len(seen[0]) == 3, f"the step's sleeps were not all running: {seen}"
    assert uid_processes(sandbox.uid) == []
    assert host_sleeps(duration) == []


async def test_environment_is_scrubbed(sandbox, monkeypatch):
    monkeypatch.setenv("AUTOCODE_TEST_SECRET", "s3cret")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-should-not-leak")
    result = await run(sandbox, "import os\n\ndef step():\n    return dict(os.environ)\n")
    assert result.ok, result.error
    env = result.output
    assert "AUTOCODE_TEST_SECRET" not in env
    assert "OPENAI_API_KEY" not in env
    assert "s3cret" not in json.dumps(env)
    assert "sk-should-not-leak" not in json.dumps(env)


async def test_environment_has_home_and_path(sandbox):
    result = await run(sandbox, "import os\n\ndef step():\n    return {'env': dict(os.environ), 'cwd': os.getcwd()}\n")
    assert result.ok, result.error
    env, cwd = result.output["env"], result.output["cwd"]
    assert env.get("HOME") == cwd
    assert env.get("TMPDIR") == cwd
    assert env.get("PATH") == "/usr/local/bin:/usr/bin:/bin"
    assert env.get("OPENBLAS_NUM_THREADS") == "1"
    assert env.get("MPLBACKEND") == "Agg"


async def test_memory_bomb_is_a_memory_error(sandbox):
    code = "def step():\n    data = bytearray(4 * 1024 ** 3)\n    return {'n': len(data)}\n"
    result = await run(sandbox, code, limits=Limits(timeout_s=5, memory_mb=256))
    assert not result.ok
    assert result.error.startswith("MemoryError")
    assert "line 2, in step" in result.traceback


async def test_stdout_flood_is_capped(sandbox):
    code = """
    def step():
        line = "x" * 99
        for _ in range(50_000):  # about 5 MB
            print(line)
        print("THE END")
        return {"done": True}
    """
    result = await run(sandbox, code, limits=Limits(timeout_s=10, max_log_kb=16))
    assert result.ok, result.error
    assert result.output == {"done": True}
    assert 16 * 1024 <= len(result.stdout) <= 16 * 1024 + 200
    assert "bytes omitted" in result.stdout
    assert result.stdout.startswith("x" * 99 + "\n")
    assert result.stdout.endswith("THE END\n")


def _rss_kb() -> int:
    status = _status("self")
    return int(status.get("VmRSS", "0 kB").split()[0])


async def test_printing_at_full_speed_until_the_timeout_costs_bounded_memory(sandbox):
    # Logs are pipes the server drains as the step writes, keeping only the head and the tail: however much the
    # step prints in its time, the server holds the cap (plus a read buffer), and the step ends at its timeout.
    # Past a burst the server reads each log at a bounded rate, so the flood costs it little CPU too.
    code = """
    import os

    def step():
        os.write(1, b"FIRST LINE\\n")
        chunk = b"y" * 65536
        while True:
            os.write(1, chunk)
            os.write(2, chunk)
    """
    baseline, peak, done = _rss_kb(), 0, False

    async def sample() -> None:
        nonlocal peak
        while not done:
            peak = max(peak, _rss_kb() - baseline)
            await asyncio.sleep(0.02)

    sampler = asyncio.create_task(sample())
    cpu_before = time.process_time()  # this process is the server: every thread of it
    try:
        result = await run(sandbox, code, limits=Limits(timeout_s=3, max_log_kb=16))
    finally:
        cpu = time.process_time() - cpu_before
        done = True
        await sampler
    assert result.error.startswith("TimeoutError"), result.error
    assert result.duration_ms < 3000 + 2500
    for text in (result.stdout, result.stderr):
        omitted = re.search(r"\n\[\.\.\. (\d+) bytes omitted \.\.\.\]\n", text)
        assert omitted, text[:100]
        assert int(omitted.group(1)) > 16 << 20  # it did print at speed, far past the cap...
        assert len(text) - len(omitted.group()) <= 16 * 1024  # ...and what is kept is the cap
    assert result.stdout.startswith("FIRST LINE\n")
    assert peak < 48 * 1024, f"the server's memory grew by {peak} kB while the step printed"
    assert cpu < 1.0, f"the server spent {cpu:.2f} s of CPU draining 3 s of a flooding step"


async def test_result_nesting_is_capped_at_100_levels(sandbox):
    code = """
    def step(request):
        value = 0
        for _ in range(request["levels"] - 1):  # the result dict itself is the first level
            value = [value]
        return {"v": value}
    """
    kept = await run(sandbox, code, input={"levels": 100})
    assert kept.ok, kept.error
    refused = await run(sandbox, code, input={"levels": 101})
    assert refused.error == "ProtocolError: the step's result is nested deeper than 100 levels"
    assert refused.output is None


async def test_small_stdout_and_stderr_are_kept_whole(sandbox):
    code = "import sys\n\ndef step():\n    print('hello')\n    print('warn', file=sys.stderr)\n    return {}\n"
    result = await run(sandbox, code)
    assert (result.stdout, result.stderr) == ("hello\n", "warn\n")


async def test_oversized_result(sandbox):
    code = "def step():\n    return {'blob': 'a' * 50_000}\n"
    result = await run(sandbox, code, limits=Limits(timeout_s=5, max_output_kb=8))
    assert not result.ok
    assert result.output is None
    assert result.error == "OutputTooLarge: the step's result (or a tool call's arguments) is larger than 8 KB"


async def test_result_just_under_the_limit(sandbox):
    code = "def step():\n    return {'blob': 'a' * 7_000}\n"
    result = await run(sandbox, code, limits=Limits(timeout_s=5, max_output_kb=8))
    assert result.ok, result.error
    assert len(result.output["blob"]) == 7_000


async def test_process_limit(sandbox):
    code = """
    import os, time

    def step():
        count = 0
        try:
            for _ in range(200):
                if os.fork() == 0:
                    time.sleep(1)
                    os._exit(0)
                count += 1
        except OSError as exc:
            return {"count": count, "error": type(exc).__name__, "errno": exc.errno}
        return {"count": count, "error": None, "errno": None}
    """
    result = await run(sandbox, code, limits=Limits(timeout_s=5, max_procs=32))
    assert result.ok, result.error
    assert result.output["error"] == "BlockingIOError"
    assert result.output["errno"] == errno.EAGAIN
    assert 0 < result.output["count"] < 32
    assert uid_processes(sandbox.uid) == []


# ---------------------------------------------------------------- one run: shared files, fresh processes, own uid


async def test_workdir_shared_between_steps(sandbox):
    write = ("import os\n\ndef write():\n    open('notes.txt', 'w').write('from step one')\n"
             "    return {'file': 'notes.txt', 'cwd': os.getcwd()}\n")
    first = await run(sandbox, write, function="write")
    assert first.ok, first.error
    read = "import os\n\ndef read(prev):\n    return {'text': open(prev['file']).read(), 'cwd': os.getcwd()}\n"
    second = await run(sandbox, read, function="read", input=first.output)
    assert second.ok, second.error
    assert second.output == {"text": "from step one", "cwd": first.output["cwd"]}
    if sandbox.host_workdir is not None:  # the process backend's workdir is a host directory
        assert first.output["cwd"] == str(sandbox.host_workdir)
        assert (sandbox.host_workdir / "notes.txt").read_text() == "from step one"


async def test_runs_cannot_see_each_others_files(sandbox):
    other = await sandbox.executor.open("other-run")
    try:
        write = ("import os\n\ndef step():\n    open('secret.txt', 'w').write('run A only')\n"
                 "    return {'path': os.path.join(os.getcwd(), 'secret.txt')}\n")
        first = await run(sandbox, write)
        assert first.ok, first.error
        peek = """
        import os

        def step(previous_output):
            try:
                found = open(previous_output["path"]).read()
            except OSError as exc:
                found = type(exc).__name__
            return {"found": found, "mine": sorted(os.listdir("."))}
        """
        second = await run(other, peek, input=first.output)
        assert second.ok, second.error
        assert second.output["found"] in ("FileNotFoundError", "PermissionError"), second.output
        assert "secret.txt" not in second.output["mine"]
        again = await run(sandbox, "def step():\n    return {'text': open('secret.txt').read()}\n")
        assert again.output == {"text": "run A only"}, again.error
    finally:
        await other.close()


async def test_each_step_is_a_fresh_process(sandbox):
    first = await run(sandbox, """
    import os, sys

    MARKER = None

    def step():
        global MARKER
        MARKER = "set by step one"
        sys.autocode_marker = "set by step one"
        return {"pid": os.getpid()}
    """)
    second = await run(sandbox, """
    import os, sys

    def step():
        return {"pid": os.getpid(), "global": "MARKER" in globals(),
                "module_attr": getattr(sys, "autocode_marker", None)}
    """)
    assert first.ok and second.ok, (first.error, second.error)
    assert first.output["pid"] != second.output["pid"]
    assert second.output["global"] is False
    assert second.output["module_attr"] is None


async def test_step_runs_as_the_runs_own_uid(sandbox):
    code = "import os\n\ndef step():\n    return {'ids': [os.getuid(), os.geteuid(), os.getgid(), os.getegid()], " \
           "'groups': os.getgroups()}\n"
    mine = await run(sandbox, code)
    assert mine.ok, mine.error
    assert sandbox.uid is not None and sandbox.uid != 0
    assert mine.output == {"ids": [sandbox.uid] * 4, "groups": []}
    other = await sandbox.executor.open("other-run")
    try:
        theirs = await run(other, code)
        assert theirs.ok, theirs.error
        assert theirs.output["ids"][0] not in (0, sandbox.uid)
    finally:
        await other.close()


@pytest.mark.parametrize("backend", BACKENDS)
async def test_default_uids_are_unprivileged_and_distinct(backend):
    executor = SandboxExecutor(backend=backend, warm=0)
    boxes: list[Worker] = []
    try:
        uids = []
        for name in ("run-a", "run-b"):
            boxes.append(await executor.open(name))
            result = await run(boxes[-1], "import os\n\ndef step():\n    return {'uid': os.getuid()}\n")
            assert result.ok, result.error
            uids.append(result.output["uid"])
        # The first 64 free uids from the default base (another process on the machine may hold some: uids.py).
        assert DEFAULT_UID_BASE <= executor.uids.base and all(
            executor.uids.base <= uid < executor.uids.base + 64 for uid in uids), uids
        assert uids[0] != uids[1]
    finally:
        for box in boxes:
            await box.close()
        await executor.stop()


# ---------------------------------------------------------------- outputs

PNG_SOURCE = """
import struct, zlib

def png_bytes():
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)  # 1x1 RGB
    return (b"\\x89PNG\\r\\n\\x1a\\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\\x00\\xff\\x00\\x00"))
            + chunk(b"IEND", b""))
"""


def _png_bytes() -> bytes:
    namespace: dict[str, Any] = {}
    exec(PNG_SOURCE, namespace)
    return namespace["png_bytes"]()


async def test_collect_outputs(sandbox):
    code = PNG_SOURCE + """
import os

def step():
    os.makedirs("outputs/sub", exist_ok=True)
    with open("outputs/chart.png", "wb") as f:
        f.write(png_bytes())
    with open("outputs/sub/x.txt", "w") as f:
        f.write("hello")
    with open("outputs/big.bin", "wb") as f:
        f.write(b"0" * 5000)
    with open("not-an-output.txt", "w") as f:
        f.write("stays")
    os.symlink("/etc/passwd", "outputs/passwd_link")
    os.symlink("/etc", "outputs/etc_link")
    return {}
"""
    result = await run(sandbox, code)
    assert result.ok, result.error
    collected = await sandbox.collect_outputs(max_file_bytes=1000, max_total_bytes=100_000)
    assert isinstance(collected, CollectedOutputs)
    by_name = {a.name: a for a in collected.artifacts}
    assert sorted(by_name) == ["chart.png", "sub/x.txt"]
    png = by_name["chart.png"]
    assert png.data == _png_bytes() and png.data.startswith(b"\x89PNG\r\n\x1a\n")
    assert png.mime == "image/png"
    assert (by_name["sub/x.txt"].data, by_name["sub/x.txt"].mime) == (b"hello", "text/plain")
    assert not any(b"root:" in a.data for a in collected.artifacts)
    assert any(s.startswith("big.bin") and "size cap" in s for s in collected.skipped), collected.skipped
    assert any(s.startswith("passwd_link") and "not a regular file" in s for s in collected.skipped), collected.skipped
    assert not any("x.txt" in s or "chart.png" in s for s in collected.skipped)


async def test_collect_outputs_total_cap(sandbox):
    code = ("def step():\n    for name in ('a.txt', 'b.txt', 'c.txt'):\n"
            "        open('outputs/' + name, 'w').write(name[0] * 600)\n    return {}\n")
    assert (await run(sandbox, code)).ok
    collected = await sandbox.collect_outputs(max_file_bytes=1000, max_total_bytes=1000)
    assert [(a.name, a.data) for a in collected.artifacts] == [("a.txt", b"a" * 600)]
    assert sorted(s.split()[0] for s in collected.skipped) == ["b.txt", "c.txt"]


async def test_collect_outputs_when_empty(sandbox):
    collected = await sandbox.collect_outputs(max_file_bytes=1000, max_total_bytes=1000)
    assert (collected.artifacts, collected.skipped) == ([], [])


# ---------------------------------------------------------------- failures of the sandbox itself


async def test_step_cannot_kill_its_worker(sandbox):
    code = """
    import os

    def step():
        try:
            os.kill(os.getppid(), 9)
        except OSError as exc:
            return {"error": type(exc).__name__}
        return {"error": None}
    """
    result = await run(sandbox, code)
    assert result.ok, result.error
    assert result.output == {"error": "PermissionError"}
    after = await run(sandbox, "def step():\n    return {'still': 'works'}\n")
    assert after.output == {"still": "works"}, after.error


async def _assert_lost_then_reopen(box: Worker) -> None:
    """After its worker died: the run's sandbox fails cleanly, nothing of the run survives, a new run works."""
    after = await run(box, "def step():\n    return {}\n")
    assert not after.ok
    assert after.error.startswith("SandboxError") and "sandbox was lost" in after.error, after.error
    lost = await box.collect_outputs(1000, 1000)
    assert lost.artifacts == [] and "lost" in lost.skipped[0]
    assert await eventually(lambda: uid_processes(box.uid) == [], 1.0), uid_processes(box.uid)
    fresh = await box.executor.open("after-the-crash")
    try:
        again = await run(fresh, "def step():\n    return {'fresh': True}\n")
        assert again.output == {"fresh": True}, again.error
    finally:
        await fresh.close()


async def test_worker_death_between_steps_is_contained(sandbox):
    first = await run(sandbox, "def step():\n    return {}\n")
    assert first.ok, first.error
    victim = worker_host_pid(sandbox)
    os.kill(victim, signal.SIGKILL)  # the worker crashes while the run is idle
    assert await eventually(lambda: not _alive(_status(victim)), 2.0)
    result = await run(sandbox, "def step():\n    return {}\n")
    assert not result.ok
    assert result.error.startswith("SandboxError"), result.error
    await _assert_lost_then_reopen(sandbox)


async def test_worker_dying_mid_step_is_contained(sandbox):
    victim = worker_host_pid(sandbox)

    async def on_call(name: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
        # The worker hangs (so the server's next request stays unread), then is killed (e.g. by the OOM killer).
        os.kill(victim, signal.SIGSTOP)
        assert await eventually(lambda: _status(victim).get("State", "")[:1] == "T", 2.0, every_s=0.005)
        asyncio.get_running_loop().call_later(0.3, os.kill, victim, signal.SIGKILL)
        return None

    code = "def step():\n    crash_worker()\n    return {'finished': True}\n"
    result = await run(sandbox, code, tool_names=["crash_worker"], on_call=on_call)
    assert not result.ok
    assert result.error.startswith("SandboxError"), result.error
    await _assert_lost_then_reopen(sandbox)


async def test_step_cannot_forge_worker_messages(sandbox):
    # The step is forked from the worker: if it inherits the worker's control socket (SOCK_SEQPACKET to the
    # server) it can queue replies in the worker's name, e.g. a fake outputs report.
    code = """
    import json, os, socket

    def step():
        forged = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                sock = socket.socket(fileno=int(fd))
            except OSError:
                continue
            try:
                if sock.type == socket.SOCK_SEQPACKET:
                    sock.send(json.dumps({"op": "exited", "returncode": 0}).encode())
                    sock.send(json.dumps({"op": "collected", "files": [], "skipped": ["FORGED"]}).encode())
                    forged.append(int(fd))
            except OSError:
                pass
            finally:
                sock.detach()
        return {"forged_on_fds": forged}
    """
    result = await run(sandbox, code)
    assert result.ok, result.error
    collected = await sandbox.collect_outputs(1000, 1000)
    assert "FORGED" not in collected.skipped
    assert result.output == {"forged_on_fds": []}


# ---------------------------------------------------------------- cancellation


async def test_cancellation_kills_the_step_at_once(sandbox):
    uid = sandbox.uid
    task = asyncio.create_task(run(sandbox, "import time\n\ndef step():\n    time.sleep(30)\n    return {}\n",
                                   limits=Limits(timeout_s=30)))
    await asyncio.sleep(0.5)
    assert uid_processes(uid), "the step is not running"
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=1.0)
    assert task in done, "cancellation did not finish within 1 s"
    with pytest.raises(asyncio.CancelledError):
        task.result()
    assert await eventually(lambda: uid_processes(uid) == [], 1.0), uid_processes(uid)
    after = await run(sandbox, "def step():\n    return {}\n")
    assert "sandbox was lost" in after.error


# ---------------------------------------------------------------- tool calls


async def test_tool_call_round_trip(sandbox):
    calls: list[tuple[str, list[Any], dict[str, Any]]] = []

    async def on_call(name: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
        calls.append((name, args, kwargs))
        return {"echo": [args, kwargs]}

    code = "def step():\n    first = echo(1, x=2)\n    second = echo('b')\n    return {'first': first, 'second': second}\n"
    result = await run(sandbox, code, tool_names=["echo"], on_call=on_call)
    assert result.ok, result.error
    assert result.output == {"first": {"echo": [[1], {"x": 2}]}, "second": {"echo": [["b"], {}]}}
    assert calls == [("echo", [1], {"x": 2}), ("echo", ["b"], {})]


async def test_tool_error_reaches_the_step(sandbox):
    async def on_call(name: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
        raise ValueError("bad")

    code = """
    def step():
        try:
            echo(1)
        except Exception as exc:
            return {"type": type(exc).__name__, "message": str(exc)}
        return {"type": None}
    """
    result = await run(sandbox, code, tool_names=["echo"], on_call=on_call)
    assert result.ok, result.error
    assert result.output["type"] == "ToolCallError"
    assert result.output["message"] == "echo: ValueError: bad"


async def test_uncaught_tool_error_fails_the_step(sandbox):
    async def on_call(name: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
        raise ValueError("bad")

    result = await run(sandbox, "def step():\n    return {'v': echo()}\n", tool_names=["echo"], on_call=on_call)
    assert not result.ok
    assert result.error == "ToolCallError: echo: ValueError: bad"


async def test_undeclared_tool_is_not_defined(sandbox):
    called = []

    async def on_call(name: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
        called.append(name)
        return "secret"

    result = await run(sandbox, "def step():\n    return {'v': secret_tool()}\n", tool_names=["echo"], on_call=on_call)
    assert not result.ok
    assert result.error == "NameError: name 'secret_tool' is not defined"
    assert called == []


async def test_tool_call_counts_toward_timeout(sandbox):
    async def on_call(name: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
        await asyncio.sleep(10)

    started = time.monotonic()
    result = await run(sandbox, "def step():\n    return {'v': echo()}\n", limits=Limits(timeout_s=0.5),
                       tool_names=["echo"], on_call=on_call)
    assert result.error.startswith("TimeoutError")
    assert time.monotonic() - started < 2.5
    assert uid_processes(sandbox.uid) == []


# ---------------------------------------------------------------- the executor: warm pool, description


@pytest.mark.parametrize("backend", BACKENDS)
async def test_warm_pool(backend):
    executor = SandboxExecutor(backend=backend, warm=2, uid_base=UID_BASE)
    box: Worker | None = None
    try:
        await executor.start()
        assert len(executor._idle) == 2
        assert len({w.uid for w in executor._idle}) == 2
        started = time.monotonic()
        box = await executor.open("warm-run")
        assert time.monotonic() - started < 0.05
        assert box.proc is not None and box.proc.returncode is None
        assert await eventually(lambda: len(executor._idle) == 2, 5.0), "the pool did not refill"
        assert box not in executor._idle
        assert len({box.uid, *(w.uid for w in executor._idle)}) == 3
        result = await run(box, "def step():\n    return {'warm': True}\n")
        assert result.output == {"warm": True}, result.error
    finally:
        if box is not None:
            await box.close()
        await executor.stop()


@pytest.mark.parametrize("backend", BACKENDS)
async def test_stop_during_refill_leaves_no_worker(backend):
    before = sandbox_launches()
    executor = SandboxExecutor(backend=backend, warm=1, uid_base=UID_BASE)
    await executor.start()
    warm = sandbox_launches() - before
    box = await executor.open("run")  # takes the warm worker and starts a refill in the background
    try:
        assert await eventually(lambda: len(sandbox_launches() - before) > len(warm), 2.0, every_s=0.002)
        await executor.stop()  # while the refill's worker is still starting
    finally:
        await box.close()
    try:
        assert await eventually(lambda: not (sandbox_launches() - before), 1.0), "a sandbox worker outlived stop()"
    finally:
        for pid in sandbox_launches() - before:  # clean up what leaked
            try:
                workdir = os.readlink(f"/proc/{pid}/cwd")
                os.kill(pid, signal.SIGKILL)
            except OSError:
                continue
            if backend == "process" and os.path.basename(workdir).startswith("run-"):
                shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.parametrize("backend", BACKENDS)
async def test_describe(backend):
    executor = SandboxExecutor(backend=backend, warm=0, uid_base=UID_BASE)
    try:
        before = executor.describe()
        assert before["backend"] == backend
        assert before["uid_drop"] is True
        assert before["network"] == "off"
        assert before["protections"] and all(isinstance(p, str) and p for p in before["protections"])
        assert before["probe"] == {}
        box = await executor.open("describe")
        await box.close()
        after = executor.describe()
        host = confine.probe()
        assert after["probe"]["landlock_abi"] == host["landlock_abi"]
        assert after["probe"]["seccomp"] is host["seccomp"]
        if host["landlock_abi"]:
            assert any(p.startswith("Landlock") for p in after["protections"])
        if host["seccomp"]:
            assert any(p.startswith("seccomp") for p in after["protections"])
    finally:
        await executor.stop()


async def test_libraries_that_resolve_their_own_paths_find_their_files(sandbox):
    """Libraries find their data files from `__file__` and often resolve it first (matplotlib resolves every font
    path with os.path.realpath). With the process backend and a Python under a directory the step's uid cannot
    traverse (a pyenv under /root, mode 0700), imports go through descriptors opened before the uid drop; a
    resolved path must stay reachable too, or `savefig` fails with PermissionError on its own fonts."""
    code = """
    import os, pathlib
    import numpy

    def step():
        here = os.path.dirname(numpy.__file__)
        resolved = os.path.realpath(os.path.join(here, "__init__.py"))
        with open(resolved, "rb") as f:
            head = f.read(16)
        via_pathlib = pathlib.Path(here, "version.py").resolve()
        return {"read": len(head), "pathlib": len(via_pathlib.read_bytes()) > 0,
                "same": os.path.samefile(resolved, os.path.join(here, "__init__.py"))}
    """
    result = await run(sandbox, code)
    assert result.ok, result.error
    assert result.output == {"read": 16, "pathlib": True, "same": True}


async def test_matplotlib_saves_a_figure(sandbox):
    """The README's chart step, as small as it gets: fonts and all, on both backends."""
    pytest.importorskip("matplotlib")
    code = """
    def step():
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        plt.plot([1, 2, 3], [2, 1, 3])
        plt.title("chart")
        plt.savefig("outputs/chart.png")
        import os
        return {"size": os.path.getsize("outputs/chart.png")}
    """
    result = await run(sandbox, code, limits=Limits(timeout_s=60))
    assert result.ok, result.error
    assert result.output["size"] > 1000
