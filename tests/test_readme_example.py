"""The README's worked example of files and follow-ups ("## Files and follow-ups"), run as it is written: its
`$ autocode …` commands in a fresh directory holding `sales.csv`, each a real `autocode` subprocess on a real
SQLite file and sandbox, with the scripted OpenAI-compatible server of tests/fakes/ as the LLM.

The scripted planner returns the pandas and matplotlib steps below; the scripted evaluator writes its answer from
the step's real output in its prompt, so every number in the transcript is the sandbox's. The test checks the
README's transcript line by line (run ids, durations, token counts, sizes and times may differ; a `…` line stands
for any lines) and that turn 2's planner prompt is the one the README shows.

`python -m tests.test_readme_example` prints a fresh transcript and that prompt, to paste into the README.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import plan, subtask, verdict
from tests.fakes.openai_server import FakeOpenAI

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SECTION = "## Files and follow-ups"
UID_BASE = 86000  # this file's sandbox uids
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox needs Linux")

SALES_CSV = """\
month,region,amount
2024-01,north,1200
2024-01,south,900
2024-01,west,700
2024-02,north,1250
2024-02,south,1010
2024-02,west,820
2024-03,north,1280
2024-03,south,1150
2024-03,west,990
"""

GROWTH = subtask("growth_by_region", textwrap.dedent('''
    def growth_by_region():
        import pandas as pd
        df = pd.read_csv("inputs/sales.csv")
        months = sorted(df["month"].unique())
        first = df[df["month"] == months[0]].set_index("region")["amount"]
        last = df[df["month"] == months[-1]].set_index("region")["amount"]
        growth = ((last - first) / first * 100).round(1).sort_values(ascending=False)
        return {"from": months[0], "to": months[-1], "growth_pct": growth.to_dict()}
''').strip(), imports=["pandas"], description="Growth of each region from the first to the last month")
CHART = subtask("chart_by_month", textwrap.dedent('''
    def chart_by_month():
        import matplotlib.pyplot as plt
        import pandas as pd
        df = pd.read_csv("inputs/sales.csv")
        table = df.pivot(index="month", columns="region", values="amount")
        ax = table.plot(marker="o", title="Sales by month")
        ax.set_ylabel("amount")
        plt.savefig("outputs/sales_by_month.png", dpi=100, bbox_inches="tight")
        return {"chart": "outputs/sales_by_month.png", "months": list(table.index), "regions": list(table.columns)}
''').strip(), imports=["pandas", "matplotlib"], description="Line chart of each region's sales by month")

_TASK = re.compile(r"^Task: (.*)$", re.MULTILINE)
_OUTPUT = re.compile(r"^output: (.*)$", re.MULTILINE)


def _growth_answer(out: dict[str, Any]) -> str:
    ranked = list(out["growth_pct"].items())
    (best, pct), rest = ranked[0], ranked[1:]
    others = ", ".join(f"{region} {value:+.1f}%" for region, value in rest)
    return f"{best.capitalize()} grew fastest: {pct:+.1f}% from {out['from']} to {out['to']} ({others})."


def _chart_answer(out: dict[str, Any]) -> str:
    regions = out["regions"]
    names = ", ".join(regions[:-1]) + f" and {regions[-1]}" if len(regions) > 1 else regions[0]
    return (f"Here is the chart of sales by month for {names} ({out['months'][0]} to {out['months'][-1]}): "
            f"{Path(out['chart']).name}.")


# task (as the README types it, lower-cased) -> (planner thought, step, the evaluator's answer from its output)
SCRIPT = {
    "which region grew fastest?": ("Read the CSV, compare each region's first and last month.", GROWTH,
                                   _growth_answer),
    "now chart it by month": ("The CSV from the last turn is still in inputs/; pivot and plot it.", CHART,
                              _chart_answer),
}


class ExampleLLM:
    """The scripted LLM of the example: plans by the task, judges from the step's real output; keeps the planner
    prompts (the user message) it saw."""

    def __init__(self) -> None:
        self.fake = FakeOpenAI()
        self.planner_prompts: list[str] = []
        self._lock = threading.Lock()
        self.fake.responder(self._respond)

    def __enter__(self) -> "ExampleLLM":
        self.fake.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.fake.stop()

    @property
    def base_url(self) -> str:
        return self.fake.base_url

    def _respond(self, body: dict[str, Any]) -> dict[str, Any] | None:
        kind = ((body.get("response_format") or {}).get("json_schema") or {}).get("name")
        user = "\n".join(str(m.get("content")) for m in body.get("messages", []) if m.get("role") == "user")
        tasks = _TASK.findall(user)
        script = SCRIPT.get(tasks[-1].strip().lower()) if tasks else None
        if script is None:
            return None  # the fake's "no reply" 500: the test sees the run fail
        thought, step, answer = script
        if kind == "plan":
            with self._lock:
                self.planner_prompts.append(user)
            return {"json": plan(step, thought=thought)}
        if kind == "evaluation":
            outputs = _OUTPUT.findall(user)
            return {"json": verdict(answer(json.loads(outputs[-1])), thoughts="The step's output answers it.")}
        return None


# ------------------------------------------------------------------------------------------ the README


def readme_section(text: str | None = None) -> str:
    text = README.read_text() if text is None else text
    return text.split(f"\n{SECTION}\n", 1)[1].split("\n## ", 1)[0]


def _blocks(section: str, fence: str) -> list[list[str]]:
    return [block.split("\n```", 1)[0].splitlines() for block in section.split(f"```{fence}\n")[1:]]


def console_steps(section: str) -> list[tuple[str, list[str]]]:
    """The first console block as (command line, the output lines the README shows for it)."""
    steps: list[tuple[str, list[str]]] = []
    for line in _blocks(section, "console")[0]:
        if line.startswith("$ "):
            steps.append((line[2:], []))
        else:
            steps[-1][1].append(line)
    return steps


def planner_prompt_shown(section: str) -> list[str]:
    """The README's turn-2 planner prompt (its first ```text block)."""
    return _blocks(section, "text")[0]


# Parts of a line that differ from run to run: run ids, durations, token counts, byte sizes, times.
_VARIABLE = re.compile(r"(?P<id>\b[0-9a-f]{12}\b)|(?P<duration>\((?:\d+ ms|[\d.]+ s)\))|(?P<tokens>\d+\+\d+ tokens)|"
                       r"(?P<bytes>\d+ bytes)|(?P<stamp>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)")
_GENERIC = {"id": r"[0-9a-f]{12}", "duration": r"\((?:\d+ ms|[\d.]+ s)\)", "tokens": r"\d+\+\d+ tokens",
            "bytes": r"\d+ bytes", "stamp": r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d"}


def _line_pattern(line: str) -> str:
    parts, last = [], 0
    for found in _VARIABLE.finditer(line):
        parts += [re.escape(line[last:found.start()]), _GENERIC[found.lastgroup or ""]]
        last = found.end()
    parts.append(re.escape(line[last:]))
    return "".join(parts)


def shown_pattern(lines: list[str]) -> re.Pattern[str]:
    """The README's lines as one pattern: each line as shown, up to _VARIABLE parts; a `…` line is any lines."""
    body = "".join(r"(?:.*\n)*?" if line.strip() == "…" else _line_pattern(line) + r"\n" for line in lines)
    return re.compile(body)


# ------------------------------------------------------------------------------------------ running it


def cli_env(llm: ExampleLLM, directory: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "AUTOCODE_"))}
    env.update(OPENAI_BASE_URL=llm.base_url, OPENAI_API_KEY="sk-readme-example", AUTOCODE_MODEL="gpt-4o-mini",
               AUTOCODE_DB=str(directory / "autocode.db"), AUTOCODE_LLM_MAX_RETRIES="0",
               AUTOCODE_SANDBOX_WARM="0", AUTOCODE_SANDBOX_UID_BASE=str(UID_BASE),
               AUTOCODE_SANDBOX_MAX_WORKERS="4", PYTHONPATH=str(ROOT))
    return env


# On a host without bubblewrap every command first says, once, that it uses the fallback backend; the README's
# transcript is of a host with it (the note is checked by the sandbox's own tests, not here).
_FALLBACK_NOTE = re.compile(r"^WARNING agent_core\.sandbox\.pool: sandbox: using the fallback 'process' backend .*\n",
                            re.MULTILINE)


def run_commands(commands: list[str], directory: Path, llm: ExampleLLM) -> list[tuple[int, str]]:
    """Each `autocode …` command line in `directory` (with sales.csv): its exit code and what the terminal shows
    (the progress on stderr, then the answer on stdout, then the run's files on stderr)."""
    (directory / "sales.csv").write_text(SALES_CSV)
    done = []
    for line in commands:
        argv = shlex.split(line, comments=True)
        assert argv[0] == "autocode", line
        proc = subprocess.run([sys.executable, "-P", "-m", "agent_core.cli", *argv[1:]], cwd=directory,
                              env=cli_env(llm, directory), capture_output=True, text=True, timeout=180)
        stderr = _FALLBACK_NOTE.sub("", proc.stderr)
        # `autocode run` lists the run's files (on stderr) after printing the answer: the terminal shows them last.
        at = stderr.find("Files of run ")
        progress, files = (stderr, "") if at < 0 else (stderr[:at], stderr[at:])
        done.append((proc.returncode, progress + proc.stdout + files))
    return done


def test_the_readme_files_example_runs_as_shown(tmp_path):
    section = readme_section()
    steps = console_steps(section)
    assert [line.split('"')[0].strip() for line, _ in steps] == [
        "autocode run --conversation team --file sales.csv", "autocode run --conversation team",
        "autocode history --conversation team"], "the README's example changed: update this test with it"

    with ExampleLLM() as llm:
        done = run_commands([line for line, _ in steps], tmp_path, llm)

    for (line, shown), (code, output) in zip(steps, done):
        assert code == 0, (line, output)
        assert shown_pattern(shown).fullmatch(output), f"$ {line}\n--- the README shows:\n" + "\n".join(shown) + \
            f"\n--- it printed:\n{output}"
    # Turn 2 found turn 1's file without a new upload; its planner saw the history and the manifest, not the bytes.
    assert len(llm.planner_prompts) == 2
    prompt = llm.planner_prompts[1]
    assert shown_pattern(planner_prompt_shown(section)).fullmatch(prompt + "\n"), prompt
    assert "2024-02,south,1010" not in prompt
    history = done[2][1]
    assert re.search(r"inputs/sales_by_month\.png  \d+ bytes  output of run 2", history)


if __name__ == "__main__":  # a fresh transcript for the README
    COMMANDS = ['autocode run --conversation team --file sales.csv "Which region grew fastest?"',
                'autocode run --conversation team "Now chart it by month"      '
                '# no new upload: sales.csv is still there',
                "autocode history --conversation team"]
    with ExampleLLM() as example, tempfile.TemporaryDirectory(prefix="autocode-readme-") as where:
        for command, (code, output) in zip(COMMANDS, run_commands(COMMANDS, Path(where), example)):
            print(f"$ {command}")
            sys.stdout.write(output)
            if code:
                print(f"(exit {code})")
        print("--- turn 2's planner prompt:")
        print(example.planner_prompts[-1] if len(example.planner_prompts) > 1 else "(none)")
