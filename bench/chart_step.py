"""The chart step's time: a step that imports matplotlib, draws a bar chart and saves a PNG, in a fresh sandbox per
run (as every run gets), on each backend. Reports the step's wall time (run_step, from the server) and, from inside
the step, the import + plot + save time, and where matplotlib put its font list: the step's `.matplotlib`
(writable, prebuilt list copied in: agent_core/sandbox/fontcache.py) or a temporary directory (the warning
"… is not a writable directory … set MPLCONFIGDIR", and a font scan every run).

Run: python bench/chart_step.py [--runs N] [--backend bwrap|process|both] [--checkout DIR]
--checkout runs another checkout's code (e.g. a `git archive` of the commit before the fix) for a before/after.
Needs root (the sandbox's uid drop). Results: bench/RESULTS.md, "Chart step".
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import time
from pathlib import Path

CHART = '''
def chart():
    import time
    started = time.monotonic()
    import matplotlib
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots()
    ax.bar(["Jan", "Feb", "Mar"], [3, 5, 2])
    ax.set_title("Sales by month")
    fig.savefig("outputs/sales_by_month.png")
    import os
    return {"seconds": time.monotonic() - started,
            "font_list_in_step_dir": matplotlib.get_cachedir() == os.path.join(os.getcwd(), ".matplotlib")}
'''


async def measure(backend: str, runs: int) -> dict:
    from agent_core.sandbox import Limits, StepRequest
    from agent_core.sandbox.pool import SandboxExecutor

    executor = SandboxExecutor(backend=backend, warm=0, uid_base=97000)
    walls, insides, own_dir = [], [], []
    try:
        for run in range(runs):
            box = await executor.open(f"bench-chart-{run}")
            try:
                started = time.monotonic()
                result = await box.run_step(StepRequest(code=CHART, function="chart", input=None,
                                                        libraries=["matplotlib"], limits=Limits(timeout_s=120)))
                walls.append(time.monotonic() - started)
            finally:
                await box.close()
            assert result.ok, (result.error, result.stderr)
            insides.append(result.output["seconds"])
            own_dir.append(result.output["font_list_in_step_dir"])
    finally:
        await executor.stop()
    return {"backend": executor.name, "wall": walls, "inside": insides, "own_dir": own_dir}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--backend", choices=("bwrap", "process", "both"), default="both")
    parser.add_argument("--checkout", type=Path, default=Path(__file__).resolve().parents[1])
    args = parser.parse_args()
    sys.path.insert(0, str(args.checkout.resolve()))
    import agent_core

    print(f"code: {Path(agent_core.__file__).parent.parent}; {platform.node()} {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}; load {os.getloadavg()[0]:.1f}")
    for backend in (("bwrap", "process") if args.backend == "both" else (args.backend,)):
        got = asyncio.run(measure(backend, args.runs))
        wall, inside = got["wall"], got["inside"]
        print(f"{got['backend']:>7}: step wall median {statistics.median(wall) * 1000:.0f} ms "
              f"(min {min(wall) * 1000:.0f}, max {max(wall) * 1000:.0f}); import+plot+save median "
              f"{statistics.median(inside) * 1000:.0f} ms; font list in the step's .matplotlib: "
              f"{sum(got['own_dir'])}/{len(got['own_dir'])} runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
