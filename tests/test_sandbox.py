"""The subprocess sandbox: real child interpreters, real files, real process groups."""

from __future__ import annotations

import asyncio
import json
import os
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from agent_core.sandbox import Limits, StepRequest, StepResult
from agent_core.sandbox.subprocess_backend import SubprocessExecutor

FAST = Limits(timeout_s=5)


async def run(
    workdir: Path,
    code: str,
    function: str = "step",
    input: dict[str, Any] | None = None,
    limits: Limits = FAST,
    **extra: Any,
) -> StepResult:
    request = StepRequest(
        code=textwrap.dedent(code), function=function, input=input, workdir=workdir, limits=limits, **extra
    )
    return await SubprocessExecutor().run_step(request)


def process_gone(pid: int) -> bool:
    """True when `pid` no longer runs: reaped, or a zombie waiting for a reaper we do not control."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


async def wait_gone(pid: int, within_s: float = 2.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if process_gone(pid):
            return True
        await asyncio.sleep(0.05)
    return process_gone(pid)


# ---------------------------------------------------------------- results


async def test_returns_dict_output(tmp_path):
    result = await run(tmp_path, "def step():\n    return {'numbers': [1, 2, 3], 'name': 'x', 'nested': {'ok': True}}\n")
    assert result.ok, result.error
    assert result.error is None
    assert result.output == {"numbers": [1, 2, 3], "name": "x", "nested": {"ok": True}}
    assert result.duration_ms > 0


async def test_input_passed_to_later_step(tmp_path):
    code = "def add_up(previous_output):\n    return {'total': sum(previous_output['numbers'])}\n"
    result = await run(tmp_path, code, function="add_up", input={"numbers": [1, 2, 3, 4]})
    assert result.ok, result.error
    assert result.output == {"total": 10}


async def test_empty_dict_input_is_still_passed(tmp_path):
    code = "def step(previous_output):\n    return {'got': previous_output}\n"
    result = await run(tmp_path, code, input={})
    assert result.output == {"got": {}}


async def test_numpy_values_converted(tmp_path):
    code = """
    import numpy as np

    def step():
        a = np.arange(4).reshape(2, 2)
        return {"array": a, "int": np.int64(7), "float": np.float32(0.5), "mean": a.mean(), "bool": np.bool_(True)}
    """
    result = await run(tmp_path, code, limits=Limits(timeout_s=10))
    assert result.ok, (result.error, result.stderr)
    assert result.output == {"array": [[0, 1], [2, 3]], "int": 7, "float": 0.5, "mean": 1.5, "bool": True}
    assert type(result.output["int"]) is int


async def test_non_dict_return(tmp_path):
    result = await run(tmp_path, "def step():\n    return [1, 2]\n")
    assert not result.ok
    assert result.output is None
    assert result.error == "TypeError: step returned list, not a dict"


async def test_none_return(tmp_path):
    result = await run(tmp_path, "def step():\n    pass\n")
    assert not result.ok
    assert "returned NoneType, not a dict" in result.error


@pytest.mark.parametrize("value", ["{1, 2}", "float('nan')", "object()", "float('inf')"])
async def test_non_json_return(tmp_path, value):
    result = await run(tmp_path, f"def step():\n    return {{'v': {value}}}\n")
    assert not result.ok
    assert result.output is None
    assert result.error.startswith("TypeError: step returned a dict that is not JSON")


async def test_exception_reported_with_user_traceback(tmp_path):
    code = """
    def helper(d):
        return d["x"]

    def step():
        data = {"y": 1}
        return {"v": helper(data)}
    """
    result = await run(tmp_path, code)
    assert not result.ok
    assert result.error == "KeyError: 'x'"
    tb = result.traceback
    assert tb.startswith("Traceback (most recent call last):")
    assert 'File "<step>", line 7, in step' in tb
    assert 'return {"v": helper(data)}' in tb
    assert 'File "<step>", line 3, in helper' in tb
    assert 'return d["x"]' in tb
    assert "child.py" not in tb
    assert tb.rstrip().endswith("KeyError: 'x'")


async def test_exception_at_definition_time(tmp_path):
    result = await run(tmp_path, "raise RuntimeError('boom at import')\n\ndef step():\n    return {}\n")
    assert result.error == "RuntimeError: boom at import"
    assert "child.py" not in result.traceback


async def test_sys_exit_is_a_step_error(tmp_path):
    result = await run(tmp_path, "import sys\n\ndef step():\n    sys.exit(4)\n")
    assert not result.ok
    assert result.error == "SystemExit: 4"


async def test_os_exit_reports_exit_code(tmp_path):
    result = await run(tmp_path, "import os\n\ndef step():\n    print('bye', flush=True)\n    os._exit(3)\n")
    assert not result.ok
    assert result.output is None
    assert "exited with code 3" in result.error
    assert result.stdout == "bye\n"


# ---------------------------------------------------------------- limits and process hygiene


async def test_timeout_kills_the_child(tmp_path):
    pid_file = tmp_path / "pid"
    code = f"""
    import os, time

    def step():
        with open({str(pid_file)!r}, "w") as f:
            f.write(str(os.getpid()))
        time.sleep(30)
        return {{}}
    """
    started = time.monotonic()
    result = await run(tmp_path, code, limits=Limits(timeout_s=1))
    elapsed = time.monotonic() - started
    assert not result.ok
    assert result.error.startswith("TimeoutError")
    assert "1s" in result.error
    assert elapsed < 3.0
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


async def test_stdout_before_timeout_is_kept(tmp_path):
    code = "import time\n\ndef step():\n    print('starting download')\n    time.sleep(30)\n"
    result = await run(tmp_path, code, limits=Limits(timeout_s=1))
    assert result.error.startswith("TimeoutError")
    assert result.stdout == "starting download\n"


async def test_background_process_killed_after_return(tmp_path):
    code = """
    import subprocess

    def step():
        proc = subprocess.Popen(["sleep", "30"])
        return {"pid": proc.pid}
    """
    result = await run(tmp_path, code)
    assert result.ok, result.error
    pid = result.output["pid"]
    assert isinstance(pid, int) and pid > 0
    assert await wait_gone(pid), f"background sleep {pid} survived the step"


async def test_background_process_killed_after_timeout(tmp_path):
    code = f"""
    import subprocess, time

    def step():
        proc = subprocess.Popen(["sleep", "30"])
        open({str(tmp_path / 'bg')!r}, "w").write(str(proc.pid))
        time.sleep(30)
    """
    result = await run(tmp_path, code, limits=Limits(timeout_s=1))
    assert result.error.startswith("TimeoutError")
    assert await wait_gone(int((tmp_path / "bg").read_text()))


async def test_environment_is_scrubbed(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOCODE_TEST_SECRET", "s3cret")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-should-not-leak")
    result = await run(tmp_path, "import os\n\ndef step():\n    return dict(os.environ)\n")
    assert result.ok, result.error
    env = result.output
    assert "AUTOCODE_TEST_SECRET" not in env
    assert "OPENAI_API_KEY" not in env
    assert "s3cret" not in json.dumps(env)
    assert "sk-should-not-leak" not in json.dumps(env)
    assert env["HOME"] == str(tmp_path)
    assert env["PATH"] == "/usr/local/bin:/usr/bin:/bin"


async def test_memory_bomb_is_a_memory_error(tmp_path):
    code = "def step():\n    data = bytearray(4 * 1024 ** 3)\n    return {'n': len(data)}\n"
    result = await run(tmp_path, code, limits=Limits(timeout_s=5, memory_mb=256))
    assert not result.ok
    assert result.error.startswith("MemoryError")
    assert "line 2, in step" in result.traceback


async def test_stdout_flood_is_capped(tmp_path):
    code = """
    def step():
        line = "x" * 99
        for _ in range(50_000):  # about 5 MB
            print(line)
        print("THE END")
        return {"done": True}
    """
    result = await run(tmp_path, code, limits=Limits(timeout_s=10, max_log_kb=16))
    assert result.ok, result.error
    assert result.output == {"done": True}
    assert 16 * 1024 <= len(result.stdout) <= 16 * 1024 + 200
    assert "bytes omitted" in result.stdout
    assert result.stdout.startswith("x" * 99 + "\n")
    assert result.stdout.endswith("THE END\n")


async def test_small_stdout_and_stderr_are_kept_whole(tmp_path):
    code = "import sys\n\ndef step():\n    print('hello')\n    print('warn', file=sys.stderr)\n    return {}\n"
    result = await run(tmp_path, code)
    assert (result.stdout, result.stderr) == ("hello\n", "warn\n")


async def test_oversized_result(tmp_path):
    code = "def step():\n    return {'blob': 'a' * 50_000}\n"
    result = await run(tmp_path, code, limits=Limits(timeout_s=5, max_output_kb=8))
    assert not result.ok
    assert result.output is None
    assert result.error == "OutputTooLarge: the step's result (or a tool call's arguments) is larger than 8 KB"


async def test_result_just_under_the_limit(tmp_path):
    code = "def step():\n    return {'blob': 'a' * 7_000}\n"
    result = await run(tmp_path, code, limits=Limits(timeout_s=5, max_output_kb=8))
    assert result.ok, result.error
    assert len(result.output["blob"]) == 7_000


async def test_workdir_shared_between_steps(tmp_path):
    write = "def write():\n    open('notes.txt', 'w').write('from step one')\n    return {'file': 'notes.txt'}\n"
    first = await run(tmp_path, write, function="write")
    assert first.ok, first.error
    assert (tmp_path / "notes.txt").read_text() == "from step one"
    read = "import os\n\ndef read(prev):\n    return {'text': open(prev['file']).read(), 'cwd': os.getcwd()}\n"
    second = await run(tmp_path, read, function="read", input=first.output)
    assert second.ok, second.error
    assert second.output == {"text": "from step one", "cwd": str(tmp_path)}


# ---------------------------------------------------------------- tool calls


async def test_tool_call_round_trip(tmp_path):
    calls: list[tuple[str, list[Any], dict[str, Any]]] = []

    async def on_call(name: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
        calls.append((name, args, kwargs))
        return {"echo": [args, kwargs]}

    code = "def step():\n    first = echo(1, x=2)\n    second = echo('b')\n    return {'first': first, 'second': second}\n"
    result = await run(tmp_path, code, tool_names=["echo"], on_call=on_call)
    assert result.ok, result.error
    assert result.output == {"first": {"echo": [[1], {"x": 2}]}, "second": {"echo": [["b"], {}]}}
    assert calls == [("echo", [1], {"x": 2}), ("echo", ["b"], {})]


async def test_tool_error_reaches_the_step(tmp_path):
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
    result = await run(tmp_path, code, tool_names=["echo"], on_call=on_call)
    assert result.ok, result.error
    assert result.output["type"] == "ToolCallError"
    assert "bad" in result.output["message"]
    assert result.output["message"] == "echo: ValueError: bad"


async def test_uncaught_tool_error_fails_the_step(tmp_path):
    async def on_call(name: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
        raise ValueError("bad")

    result = await run(tmp_path, "def step():\n    return {'v': echo()}\n", tool_names=["echo"], on_call=on_call)
    assert not result.ok
    assert result.error == "ToolCallError: echo: ValueError: bad"


async def test_undeclared_tool_is_not_defined(tmp_path):
    called = []

    async def on_call(name: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
        called.append(name)
        return "secret"

    result = await run(tmp_path, "def step():\n    return {'v': secret_tool()}\n", tool_names=["echo"], on_call=on_call)
    assert not result.ok
    assert result.error == "NameError: name 'secret_tool' is not defined"
    assert called == []


async def test_tool_call_counts_toward_timeout(tmp_path):
    async def on_call(name: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
        await asyncio.sleep(10)

    started = time.monotonic()
    result = await run(tmp_path, "def step():\n    return {'v': echo()}\n", limits=Limits(timeout_s=1),
                       tool_names=["echo"], on_call=on_call)
    assert result.error.startswith("TimeoutError")
    assert time.monotonic() - started < 3.0
