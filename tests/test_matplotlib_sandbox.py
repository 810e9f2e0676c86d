"""Charts in the sandbox (issue 25): every step has a writable matplotlib directory, and matplotlib's font list
comes prebuilt (agent_core/sandbox/fontcache.py), so no step warns about MPLCONFIGDIR or scans the fonts again.
Both backends, real sandboxes, the real matplotlib."""

from __future__ import annotations

import json

import pytest

from agent_core.sandbox import Limits, StepRequest
from agent_core.sandbox import fontcache
from agent_core.sandbox.pool import SandboxExecutor
from tests.system_packages import requires

pytest.importorskip("matplotlib")

BACKENDS = [pytest.param("bwrap", marks=requires("bubblewrap")), "process"]
UID_BASE = 96064  # this file's sandbox uids (see test_daily_use.py)

CHART = '''
def chart():
    import glob, logging, os
    found = sorted(os.path.basename(p) for p in glob.glob(".matplotlib/fontlist-v*.json"))  # before any import
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger("matplotlib").addHandler(handler)
    logging.getLogger("matplotlib").setLevel(logging.INFO)
    import matplotlib
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots()
    ax.bar(["a", "b"], [1, 2])
    ax.set_title("Sales")
    fig.savefig("outputs/sales.png")
    return {"found": found, "configdir": matplotlib.get_configdir(), "cachedir": matplotlib.get_cachedir(),
            "cwd": os.getcwd(), "log": records,
            "writable": os.access(matplotlib.get_configdir(), os.W_OK)}
'''


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_chart_step_has_a_writable_matplotlib_dir_and_the_prebuilt_font_list(backend):
    executor = SandboxExecutor(backend=backend, warm=0, uid_base=UID_BASE)
    try:
        cache = executor.font_cache
        assert cache is not None
        for run in range(2):
            # The worker preloads matplotlib as root first (as a run's declared library): the old worker's
            # .matplotlib was root's then, and steps fell back to a temporary directory.
            box = await executor.open(f"chart-{backend}-{run}")
            try:
                result = await box.run_step(StepRequest(code=CHART, function="chart", input=None,
                                                        libraries=["matplotlib"], limits=Limits(timeout_s=60)))
            finally:
                await box.close()
            assert result.ok, (result.error, result.traceback, result.stderr)
            out = result.output
            assert out["configdir"] == out["cachedir"] == f"{out['cwd']}/.matplotlib" and out["writable"], out
            assert out["found"] == [p.rsplit("/", 1)[1] for p in fontcache.font_lists(cache)] != []
            assert not [line for line in out["log"] if "not a writable directory" in line
                        or "generated new fontManager" in line or "building the font cache" in line.lower()], out
            assert "MPLCONFIGDIR" not in result.stderr and "writable" not in result.stderr
    finally:
        await executor.stop()


def test_the_font_cache_is_built_once_and_renamed_into_place(tmp_path):
    assert fontcache.build(tmp_path)
    (built,) = fontcache.font_lists(tmp_path)
    assert json.loads(open(built).read())["ttflist"]  # a real font list
    stamp = (tmp_path / built).stat().st_mtime_ns
    assert fontcache.build(tmp_path) and (tmp_path / built).stat().st_mtime_ns == stamp  # present: not rebuilt
    assert fontcache.build(tmp_path, force=True)
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".build-")] == []
