"""The Python environment may live anywhere on the host (/tmp, /work, /opt, a home directory...), and bubblewrap's
mount layout must follow it; when bubblewrap cannot build that layout, `auto` falls back and says why.

The end-to-end tests make a real virtualenv (`python -m venv --system-site-packages` from the running interpreter,
so it sees the installed autocode package and numpy) and run `autocode run` with it against the scripted LLM
server, on the bwrap backend. They need root and bubblewrap, as on the CI host (`bash .ci/run`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import site
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent_core.sandbox import Limits, SandboxUnavailable, StepRequest
from agent_core.sandbox.backends import SANDBOX_RUNTIME, SANDBOX_WORKDIR, mount_layout
from agent_core.sandbox.pool import SandboxExecutor
from tests.conftest import plan, subtask, verdict
from tests.system_packages import requires

needs_bwrap = requires("bubblewrap")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox's uid drop needs root, as on the CI host")

# A step as generated code writes it: a library of the environment, a scratch file in /tmp, one in its directory.
STEP = subtask("crunch", (
    "def crunch():\n"
    "    import errno, os, sys\n"
    "    import numpy as np\n"
    "    with open('/tmp/scratch.txt', 'w') as f:\n"
    "        f.write('tmp ok')\n"
    "    with open('here.txt', 'w') as f:\n"
    "        f.write('cwd ok')\n"
    "    venv = os.path.dirname(os.path.dirname(sys.executable))\n"
    "    def refused(path, megabytes):\n"
    "        try:\n"
    "            for n in range(64):\n"
    "                with open(f'{path}-{n}', 'wb') as f:\n"
    "                    f.write(b'x' * (megabytes << 20))\n"
    "        except OSError as exc:\n"
    "            return errno.errorcode[exc.errno]\n"
    "        return 'written'\n"
    "    return {'sum': int(np.arange(5).sum()), 'tmp': open('/tmp/scratch.txt').read(),\n"
    "            'cwd': open(os.path.join(os.getcwd(), 'here.txt')).read(), 'python': sys.executable,\n"
    "            'venv_on_path': any(p.startswith(venv) for p in sys.path),\n"
    "            'venv_write': refused(os.path.join(venv, 'planted'), 0), 'tmp_fill': refused('/tmp/fill', 2)}\n"
), imports=["numpy"])


def make_venv(parent: Path) -> Path:
    """A real virtualenv under `parent`, made by the running interpreter (no pip: faster, and not needed)."""
    parent.mkdir(parents=True, exist_ok=True)
    venv = Path(tempfile.mkdtemp(prefix="autocode-venv-", dir=parent))
    os.chmod(venv, 0o755)
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
                   check=True, capture_output=True, timeout=120)
    python = venv / "bin" / "python"
    if sys.prefix != sys.base_prefix:
        # The tests run in a virtualenv themselves: --system-site-packages shows the new one only the base
        # interpreter's packages. A .pth adds this environment's site-packages as plain lines (so the sandbox binds
        # them, as for any .pth directory) and through addsitedir (so their own .pth files, the editable install's
        # import hook among them, work too).
        purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 check=True, capture_output=True, text=True, timeout=60).stdout.strip()
        outer = [d for d in site.getsitepackages() if os.path.isdir(d)]
        Path(purelib, "autocode-tests-outer-env.pth").write_text(
            "".join(f"{d}\n" for d in outer) + "".join(f"import site; site.addsitedir({d!r})\n" for d in outer))
    probe = subprocess.run([str(python), "-c", "import agent_core, numpy"], capture_output=True, text=True)
    if probe.returncode != 0:
        shutil.rmtree(venv, ignore_errors=True)
        pytest.fail(f"a --system-site-packages venv of {sys.executable} cannot import autocode and numpy: "
                    f"{probe.stderr.strip()[-300:]}")
    return venv


@pytest.fixture
def venv_under(request) -> Iterator[Path]:
    """A virtualenv under the directory given as the test's parameter, removed after."""
    parent = Path(request.param)
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        pytest.skip(f"{parent} is not a writable directory here")
    venv = make_venv(parent)
    try:
        yield venv
    finally:
        shutil.rmtree(venv, ignore_errors=True)


def run_cli(python: Path, cwd: Path, llm_server, backend: str, *args: str) -> subprocess.CompletedProcess:
    """`autocode ARGS` (default: `run ... --json`) started by `python`, as a user of that environment runs it."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "AUTOCODE_", "VIRTUAL_ENV"))}
    environ.update(AUTOCODE_DB=str(cwd / "cli.db"), AUTOCODE_LLM_MAX_RETRIES="0", AUTOCODE_SANDBOX_BACKEND=backend,
                   AUTOCODE_WORKDIR_MB="16",
                   OPENAI_BASE_URL=llm_server.base_url, OPENAI_API_KEY="sk-cli", AUTOCODE_MODEL="fake-model")
    args = args or ("run", "Crunch some numbers", "--json")
    return subprocess.run([str(python), "-P", "-m", "agent_core.cli", *args],
                          cwd=cwd, env=environ, capture_output=True, text=True, timeout=120)


@needs_bwrap
@needs_root
@pytest.mark.parametrize("venv_under", ["/tmp", SANDBOX_WORKDIR], indirect=True, ids=["tmp", "workdir"])
def test_a_run_works_with_the_python_environment_under_a_mount_point(venv_under, tmp_path, llm_server):
    """A venv under /tmp (where bubblewrap mounts the run's /tmp) or under the sandbox's working directory (/work,
    where this checkout lives) runs a step that imports numpy and writes to /tmp and to its directory."""
    llm_server.reply_json(plan(STEP))
    llm_server.reply_json(verdict("The sum is 10."))

    proc = run_cli(venv_under / "bin" / "python", tmp_path, llm_server, "bwrap")

    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["status"] == "succeeded" and out["answer"] == "The sum is 10."
    [step] = out["steps"]
    assert step["status"] == "ok", step["error"]
    output = step["output"]
    assert output.pop("venv_write") in ("EROFS", "EACCES")  # the environment is read-only (mount, or Landlock)
    assert output == {"sum": 10, "tmp": "tmp ok", "cwd": "cwd ok", "python": str(venv_under / "bin" / "python"),
                      "venv_on_path": True, "tmp_fill": "ENOSPC"}  # /tmp is inside the disk cap
    assert not (venv_under / "planted-0").exists()

    # `auto` takes bubblewrap here too, rather than falling back.
    llm_server.reply_json({"ok": True})  # the doctor's LLM check asks for one tiny JSON reply
    doctor = run_cli(venv_under / "bin" / "python", tmp_path, llm_server, "auto", "doctor", "--json")
    assert doctor.returncode == 0, doctor.stderr[-3000:]
    report = json.loads(doctor.stdout)["sandbox"]
    assert (report["backend"], report["fallback_reason"]) == ("bwrap", None)


# ---------------------------------------------------------------- the mount layout itself


def test_layout_keeps_every_mount_point_off_the_bound_paths():
    """/tmp, the working directory and the runtime never land on, inside or above a read-only bind."""
    plain = mount_layout(["/usr", "/root/.pyenv/versions/3.11.7"])
    assert (plain.workdir, plain.runtime, plain.tmp) == (SANDBOX_WORKDIR, SANDBOX_RUNTIME, "link")

    under_tmp = mount_layout(["/usr", "/tmp/x/venv"])
    assert under_tmp.tmp == "tmpfs" and under_tmp.workdir == SANDBOX_WORKDIR

    under_work = mount_layout(["/usr", f"{SANDBOX_WORKDIR}/main/.venv"])
    assert under_work.workdir not in (SANDBOX_WORKDIR, "/tmp") and under_work.runtime == SANDBOX_RUNTIME

    parent_of_runtime = mount_layout(["/usr", str(Path(SANDBOX_RUNTIME).parent)])  # a Python root at /opt
    inside_runtime = mount_layout(["/usr", f"{SANDBOX_RUNTIME}/venv"])
    for layout, bound in ((parent_of_runtime, str(Path(SANDBOX_RUNTIME).parent)),
                          (inside_runtime, f"{SANDBOX_RUNTIME}/venv")):
        runtime = Path(layout.runtime)
        assert runtime != Path(bound) and Path(bound) not in runtime.parents and runtime not in Path(bound).parents
        assert layout.runtime != layout.workdir

    with pytest.raises(SandboxUnavailable, match="/"):
        mount_layout(["/"])


# ---------------------------------------------------------------- `auto` is honest about what works


@pytest.fixture
def old_bwrap(tmp_path, monkeypatch) -> Path:
    """A bubblewrap older than 0.5 (Debian buster ships 0.3): namespaces work, so `--ro-bind / / true` passes,
    but it has no `--size`, which the real sandbox layout needs. The real bwrap does everything else."""
    real = shutil.which("bwrap")
    assert real is not None
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    script = fake_bin / "bwrap"
    script.write_text(
        "#!/bin/sh\n"
        'for arg in "$@"; do\n'
        '  if [ "$arg" = "--size" ]; then echo "bwrap: Unknown option --size" >&2; exit 1; fi\n'
        "done\n"
        f'exec {real} "$@"\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    return script


@needs_bwrap
@needs_root
async def test_auto_falls_back_with_the_reason_when_bwrap_cannot_build_the_real_layout(old_bwrap, caplog):
    with caplog.at_level(logging.WARNING, logger="agent_core.sandbox.pool"):
        executor = SandboxExecutor(backend="auto", warm=0, uid_base=64900)
    try:
        assert executor.name == "process"
        assert "Unknown option --size" in (executor.fallback_reason or "")
        assert any("fallback 'process' backend" in r.getMessage() and "Unknown option --size" in r.getMessage()
                   for r in caplog.records)
        box = await executor.open("fallback")  # and the fallback really runs steps
        try:
            result = await box.run_step(StepRequest(code="def f():\n    return {'ok': 1}", function="f",
                                                    input=None, limits=Limits(timeout_s=5)))
        finally:
            await box.close()
        assert result.ok and result.output == {"ok": 1}
    finally:
        await executor.stop()


@needs_bwrap
@needs_root
def test_forced_bwrap_fails_clearly_when_it_cannot_build_the_real_layout(old_bwrap):
    with pytest.raises(SandboxUnavailable, match="AUTOCODE_SANDBOX_BACKEND=bwrap.*Unknown option --size"):
        SandboxExecutor(backend="bwrap", warm=0, uid_base=64900)
