"""Files in, and a workspace per conversation (issue 13), as a user runs them: real `autocode` subprocesses, a real
SQLite file and blob directory, the scripted LLM server, real sandboxes."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from agent_core.inputs import safe_name, unique_name
from tests.conftest import plan, subtask, user_prompt, verdict

REPO = Path(__file__).resolve().parents[1]
ROWS = 40
SECRET_ROW = "zz-row-the-planner-never-sees"


@pytest.fixture
def cli(tmp_path, llm_server):
    def run(*args: str, env: dict[str, str] | None = None, stdin: str | None = None):
        environ = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "AUTOCODE_"))}
        environ.update(AUTOCODE_DB=str(tmp_path / "cli.db"), AUTOCODE_LLM_MAX_RETRIES="0",
                       OPENAI_BASE_URL=llm_server.base_url, OPENAI_API_KEY="sk-cli", AUTOCODE_MODEL="fake-model",
                       AUTOCODE_SANDBOX_WARM="0")
        environ["PYTHONPATH"] = str(REPO)  # this checkout, whatever the editable install points at
        environ.update(env or {})
        proc = subprocess.run(
            [sys.executable, "-P", "-m", "agent_core.cli", *args], cwd=tmp_path, env=environ,
            input=None if stdin is None else stdin.encode(), capture_output=True, timeout=120,
        )
        return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(), proc.stderr.decode())

    return run


@pytest.fixture
def sales_csv(tmp_path) -> Path:
    path = tmp_path / "upload" / "sales.csv"
    path.parent.mkdir()
    lines = ["region,month,amount"]
    for i in range(ROWS):
        lines.append(f"{'north' if i % 2 else 'south'},2024-{i % 12 + 1:02d},{i + 1}")
    lines[30] = f"{SECRET_ROW},2024-06,30"  # far past the preview's first rows
    path.write_text("\n".join(lines) + "\n")
    return path


CHART = subtask("chart_sales", '''
def chart_sales():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    df = pd.read_csv("inputs/sales.csv")
    totals = df.groupby("region")["amount"].sum()
    fig, ax = plt.subplots()
    ax.bar(list(totals.index), list(totals.values))
    fig.savefig("outputs/chart.png", dpi=50)
    return {"rows": len(df), "total": int(df["amount"].sum())}
''', imports=["pandas", "matplotlib"])

LOOK = subtask("look_around", '''
def look_around():
    import os
    import pandas as pd
    names = sorted(os.listdir("inputs"))
    with open("inputs/chart.png", "rb") as handle:
        png = handle.read(8) == b"\\x89PNG\\r\\n\\x1a\\n"
    with open("inputs/results/run-1.json") as handle:
        import json
        earlier = json.load(handle)
    return {"names": names, "rows": len(pd.read_csv("inputs/sales.csv")), "png": png,
            "earlier": earlier["answer"], "results": sorted(os.listdir("inputs/results"))}
''', imports=["pandas"])


def blobs(tmp_path: Path) -> list[Path]:
    root = tmp_path / "cli.db.blobs"
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def test_csv_reaches_the_steps_the_planner_sees_a_manifest_and_a_follow_up_reuses_it(cli, llm_server, sales_csv,
                                                                                      tmp_path):
    llm_server.reply_json(plan(CHART))
    llm_server.reply_json(verdict("Total 820 over 40 rows."))

    first = cli("run", "--file", str(sales_csv), "--conversation", "team", "--json", "what does it say?")

    assert first.returncode == 0, first.stderr
    out = json.loads(first.stdout)
    assert out["steps"][0]["output"] == {"rows": ROWS, "total": sum(range(1, ROWS + 1))}
    assert [a["name"] for a in out["artifacts"]] == ["chart.png"]
    prompt = user_prompt(llm_server.chat_requests()[0])
    assert "inputs/sales.csv" in prompt and "uploaded with run 1" in prompt
    assert "header: region | month | amount" in prompt and f"{ROWS} data rows" in prompt
    assert "delimiter ','" in prompt
    everything = json.dumps(llm_server.chat_requests())
    assert SECRET_ROW not in everything, "the planner got the file's bytes beyond the preview"
    assert "inputs/sales.csv" in user_prompt(llm_server.chat_requests()[1])  # the evaluator sees the manifest
    for blob in blobs(tmp_path):
        assert blob.stat().st_mode & 0o777 == 0o600

    # Turn 2: no upload; the workspace (the CSV, run 1's chart and result) is there.
    llm_server.reply_json(plan(LOOK))
    llm_server.reply_json(verdict("Still 40 rows."))

    second = cli("run", "--conversation", "team", "--json", "now chart it by month")

    assert second.returncode == 0, second.stderr
    out = json.loads(second.stdout)
    assert out["steps"][0]["output"] == {
        "names": ["chart.png", "results", "sales.csv"], "rows": ROWS, "png": True,
        "earlier": "Total 820 over 40 rows.", "results": ["run-1.json"]}
    prompt = user_prompt(llm_server.chat_requests()[2])
    assert "inputs/sales.csv" in prompt and "uploaded with run 1" in prompt
    assert "inputs/chart.png" in prompt and "output of run 1" in prompt and "PNG image" in prompt
    assert "inputs/results/run-1.json" in prompt and "result of run 1" in prompt
    after_result = prompt.split("inputs/results/run-1.json", 1)[1].split("\n")[1:2]
    assert not after_result or not after_result[0].startswith("    "), "our own result file is not previewed"
    assert SECRET_ROW not in json.dumps(llm_server.chat_requests())

    history = cli("history", "--conversation", "team")
    assert history.returncode == 0, history.stderr
    assert "inputs/sales.csv" in history.stdout and "inputs/results/run-2.json" in history.stdout
    assert "output of run 1" in history.stdout

    # /reset in the console chat clears the files as well as the history.
    reset = cli("chat", "--conversation", "team", stdin="/reset\n/exit\n")
    assert reset.returncode == 0, reset.stderr
    assert "History and files cleared" in reset.stdout
    after = cli("history", "--conversation", "team")
    assert "inputs/" not in after.stdout
    assert blobs(tmp_path) == []


def test_chat_attach_sends_the_file_with_the_next_task(cli, llm_server, sales_csv):
    llm_server.reply_json(plan(CHART))
    llm_server.reply_json(verdict("Charted."))

    proc = cli("chat", "--conversation", "c1", stdin=f"/attach {sales_csv}\nchart the sales\n/exit\n")

    assert proc.returncode == 0, proc.stderr
    assert "Attached sales.csv" in proc.stdout and "Charted." in proc.stdout
    assert "header: region | month | amount" in user_prompt(llm_server.chat_requests()[0])


def test_over_limit_files_are_refused_with_a_message_and_nothing_runs(cli, llm_server, tmp_path, sales_csv):
    big = tmp_path / "big.csv"
    big.write_bytes(b"a,b\n" + b"1,2\n" * (300 * 1024))  # 1.2 MB
    cases = [
        (["--file", str(big)], {"AUTOCODE_INPUT_MAX_MB": "1"}, "over the limit of 1 MB a file (AUTOCODE_INPUT_MAX_MB)"),
        (["--file", str(sales_csv), "--file", str(big)], {"AUTOCODE_INPUT_MAX_FILES": "1"},
         "more than the 1 a task can take (AUTOCODE_INPUT_MAX_FILES)"),
        (["--file", str(big)], {"AUTOCODE_WORKSPACE_MB": "1"}, "over its quota of 1 MB (AUTOCODE_WORKSPACE_MB)"),
        (["--file", str(tmp_path / "missing.csv")], {}, "cannot read"),
    ]
    for flags, env, message in cases:
        proc = cli("run", *flags, "analyse", env=env)
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr and "nothing was run" in proc.stderr.lower(), proc.stderr
        assert "Traceback" not in proc.stderr
    assert llm_server.chat_requests() == []
    db = tmp_path / "cli.db"
    if db.exists():
        assert sqlite3.connect(db).execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 0
    assert blobs(tmp_path) == []

    refused = cli("chat", stdin=f"/attach {big}\n/exit\n", env={"AUTOCODE_INPUT_MAX_MB": "1"})
    assert "over the limit of 1 MB" in refused.stdout and llm_server.chat_requests() == []


def test_workspace_files_older_than_the_limit_are_removed_with_a_note(cli, llm_server, sales_csv, tmp_path):
    llm_server.reply_json(plan(CHART))
    llm_server.reply_json(verdict("Charted."))
    assert cli("run", "--file", str(sales_csv), "--conversation", "old", "go").returncode == 0
    db = sqlite3.connect(tmp_path / "cli.db")
    with db:
        db.execute("UPDATE workspace_files SET created_at = '2000-01-01T00:00:00.000+00:00'")
    llm_server.reply_json(plan(subtask("noop", "def noop():\n    import os\n    return {'there': os.path.exists('inputs')}")))
    llm_server.reply_json(verdict("Nothing left."))

    proc = cli("run", "--conversation", "old", "--json", "what is left?")

    out = json.loads(proc.stdout)
    assert out["steps"][0]["output"] == {"there": False}
    assert "after 30 days (AUTOCODE_WORKSPACE_DAYS): sales.csv" in out["answer"]
    assert "inputs/" not in user_prompt(llm_server.chat_requests()[2])


@pytest.mark.parametrize("given, expected", [
    ("../../etc/passwd", "_._etc_passwd"),
    (".bashrc", "bashrc"),
    ("a/b", "a_b"),
    ("x\x1b[31m\ny.csv", "x[31my.csv"),
    ("..", "file"),
    ("é" * 200 + ".csv", "é" * 58 + ".csv"),
])
def test_safe_names(given, expected):
    assert safe_name(given) == expected
    assert "/" not in safe_name(given) and not safe_name(given).startswith(".")


def test_clashing_names_are_told_apart():
    taken = {"sales.csv"}
    assert unique_name("sales.csv", taken) == "sales (2).csv"
    assert unique_name("Sales.CSV", taken | {"sales (2).csv"}) == "Sales (3).CSV"
    assert unique_name("other.csv", taken) == "other.csv"


async def test_data_tools_are_built_in_but_never_preloaded(make_agent, llm_server, tmp_path):
    """pandas, matplotlib and openpyxl are declared libraries, imported only by the steps that use them: a step
    forked from a fresh worker (after the input preview ran) finds none of them loaded. Where files are is said
    by the manifest (inputs/) and the system prompt (outputs/), not by per-library guides in every request."""
    from agent_core.manifest import MANIFEST_HEADER
    from agent_core.workspace import run_with_files

    agent = make_agent(sandbox_warm=0)
    assert {"pandas", "matplotlib", "openpyxl"} <= set(agent.toolset.libraries)
    assert "inputs/" in MANIFEST_HEADER and "outputs/" in agent._planner_system
    csv_file = tmp_path / "t.csv"
    csv_file.write_text("a,b\n1,2\n")
    probe = subtask("probe", "def probe():\n    import sys\n    return {'loaded': sorted(m for m in "
                    "('pandas', 'matplotlib', 'openpyxl') if m in sys.modules)}")
    llm_server.reply_json(plan(probe))
    llm_server.reply_json(verdict("none"))

    result = await run_with_files(agent, "what is loaded?", "c", [csv_file])

    assert result.status == "succeeded", result.error
    assert result.steps[0].output == {"loaded": []}
    assert agent.executor.preload == []


async def test_the_manifest_previews_excel_json_text_and_images_and_survives_a_preview_timeout(
        make_agent, llm_server, tmp_path):
    import openpyxl

    from agent_core.workspace import run_with_files

    book = openpyxl.Workbook()
    book.active.title = "Q1"
    book.active.append(["region", "amount"])
    book.active.append(["north", 5])
    book.create_sheet("Q2").append(["city", "visits"])
    book.save(tmp_path / "book.xlsx")
    (tmp_path / "data.json").write_text(json.dumps({"orders": [{"id": 1}], "total": 3}))
    (tmp_path / "notes.txt").write_text("first line\nsecond line\n")
    (tmp_path / "photo.gif").write_bytes(b"GIF89a\x20\x03\x58\x02" + b"\0" * 20)
    (tmp_path / "jpeg.jpg").write_bytes(b"\xff\xd8\xff\xe0\x00\x04ab\xff\xc0\x00\x11\x08\x01\xe0\x02\x80" + b"\0" * 20)
    llm_server.reply_json(plan(subtask("ok", "def ok():\n    return {'ok': True}")))
    llm_server.reply_json(verdict("fine"))
    agent = make_agent(sandbox_warm=0)

    result = await run_with_files(agent, "look", "m", [tmp_path / n for n in (
        "book.xlsx", "data.json", "notes.txt", "photo.gif", "jpeg.jpg")])

    assert result.status == "succeeded", result.error
    prompt = user_prompt(llm_server.chat_requests()[0])
    assert "Excel workbook, sheets: Q1, Q2" in prompt and "sheet Q1 (2 rows): region | amount" in prompt
    assert "JSON object with 2 keys {orders: array of 1" in prompt
    assert "text, first lines:" in prompt and "second line" in prompt
    assert "GIF image 800x600" in prompt and "JPEG image 640x480" in prompt

    # A file the previewer cannot finish within the step's time limit: every file says so, the run goes on.
    slow = tmp_path / "slow.csv"
    with slow.open("w") as handle:
        for _ in range(40):
            handle.write("a,b,c,d,e,f,g,h\n" * 50_000)
    llm_server.reply_json(plan(subtask("ok", "def ok():\n    return {'ok': True}")))
    llm_server.reply_json(verdict("fine"))
    agent = make_agent(sandbox_warm=0, step_timeout=0.3)

    result = await run_with_files(agent, "look", "slow", [slow])

    assert result.status == "succeeded", result.error
    prompt = user_prompt(llm_server.chat_requests()[2])
    assert "inputs/slow.csv" in prompt and "preview failed:" in prompt


async def test_files_over_the_sandbox_disk_cap_fail_the_run_with_a_message_for_the_user(make_agent, llm_server,
                                                                                        tmp_path):
    from agent_core.workspace import run_with_files

    agent = make_agent(sandbox_warm=0, workdir_mb=1)
    if agent.executor.name != "bwrap":
        pytest.skip("only bubblewrap caps a run's working directory (a size-capped tmpfs)")
    big = tmp_path / "big.csv"
    big.write_bytes(b"a,b\n" + b"1,2\n" * (512 * 1024))  # 2 MB

    result = await run_with_files(agent, "look", "full", [big])

    assert result.status == "failed"
    assert result.error.startswith("The files could not be placed in the sandbox, so no code ran")
    assert "No space left" in result.error
    assert llm_server.chat_requests() == []


async def test_inputs_travel_with_a_remote_job_as_working_files(make_agent, make_settings, llm_server,
                                                                          tmp_path):
    """The Celery sandbox's put_inputs: the files travel with every job as a tar apart from the working files, which
    a worker places with its sandbox's `put_inputs` (agent_core.jobs.place_inputs, read-only as on serve's pool) and
    a step there reads (tests/test_uploads.py: a step on a worker cannot modify them)."""
    import io
    import tarfile

    from agent_core.inputs import InputFile
    from agent_core.sandbox import StepRequest
    from agent_core.sandbox.remote import RemoteExecutor, RemoteSandbox
    from storage.db import Storage

    data = tmp_path / "blob"
    data.write_bytes(b"a,b\n1,2\n")
    settings = make_settings()
    remote = RemoteSandbox(RemoteExecutor(settings, Storage(tmp_path / "r.db")), "run1")
    await remote.put_inputs([InputFile("sales.csv", data, 8, "uploaded with run 1"),
                             InputFile("results/run-1.json", data, 8)])

    with tarfile.open(fileobj=io.BytesIO(remote.inputs)) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert members["sales.csv"].mode == 0o444 and members["results/run-1.json"].isfile()
    assert remote.workdir is None  # not among the working files
    assert (await remote.collect_outputs(1 << 20, 1 << 20)).artifacts == []  # inputs are not outputs

    agent = make_agent(sandbox_warm=0)
    worker_sandbox = await agent.executor.open("run1")
    try:
        from agent_core.jobs import place_inputs

        await place_inputs(worker_sandbox, remote.inputs)
        result = await worker_sandbox.run_step(StepRequest(code=(
            "def read():\n    return {'text': open('inputs/sales.csv').read()}\n"),
            function="read", input=None))
    finally:
        await worker_sandbox.close()
    assert result.ok, result.error
    assert result.output == {"text": "a,b\n1,2\n"}

    from agent_core.sandbox import SandboxUnavailable

    small = RemoteSandbox(RemoteExecutor(make_settings(job_transfer_mb=1), Storage(tmp_path / "r.db")), "run2")
    with pytest.raises(SandboxUnavailable, match="AUTOCODE_JOB_TRANSFER_MB=1"):
        await small.put_inputs([InputFile("sales.csv", data, 2 << 20)])


def test_a_long_conversation_keeps_only_the_latest_results_and_each_blob_once(make_settings, tmp_path):
    from agent_core.sandbox import Artifact
    from agent_core.workspace import RESULTS_KEPT, Workspace, result_record
    from storage.db import Storage

    storage = Storage(tmp_path / "w.db")
    workspace = Workspace(storage, make_settings())
    chart = b"\x89PNG\r\n\x1a\n" + b"\0" * 100
    for number in range(1, RESULTS_KEPT + 3):
        run_id = storage.create_run("long", f"task {number}", status="queued")
        workspace.keep_run("long", run_id, [Artifact("chart.png", chart, "image/png")],
                           result_record(number, run_id, "t", "succeeded", "a", None, ["chart.png"]))

    names = [r["name"] for r in storage.workspace_files("long")]
    assert names.count("chart.png") == 1
    assert sorted(n for n in names if n.startswith("results/")) == sorted(
        f"results/run-{n}.json" for n in range(3, RESULTS_KEPT + 3))
    assert len([p for p in storage.blob_dir.rglob("*") if p.is_file()]) == RESULTS_KEPT + 1
    assert storage.clear_conversation("long") == 0 and storage.workspace_files("long") == []
    assert [p for p in storage.blob_dir.rglob("*") if p.is_file()] == []


async def test_an_upload_named_results_is_renamed_and_its_conversation_keeps_working(make_agent, llm_server,
                                                                                       tmp_path):
    """Issue 21 item 10: inputs/results/ holds earlier runs' result dicts, so an upload named `results` made every
    later run of its conversation fail (FileExistsError: 'results'). It becomes `results (upload)`, the user is
    told, and the follow-ups run with both."""
    from agent_core.workspace import run_with_files

    agent = make_agent(sandbox_warm=0)
    given = tmp_path / "results"
    given.write_text("the user's own results\n")
    look = subtask("look", "def look():\n    import os\n    return {'inputs': sorted(os.listdir('inputs')), "
                   "'text': open('inputs/results (upload)').read()}", imports=["os"])
    llm_server.reply_json(plan(look))
    llm_server.reply_json(verdict("I read your results."))

    first = await run_with_files(agent, "read my results file", "r", [given])

    assert first.status == "succeeded", first.error
    assert first.steps[0].output == {"inputs": ["results (upload)"], "text": "the user's own results\n"}
    assert "results is inputs/results (upload)" in first.answer
    assert "inputs/results (upload)" in user_prompt(llm_server.chat_requests()[0])

    for number in (2, 3):  # later runs place results/run-N.json beside it
        llm_server.reply_json(plan(look))
        llm_server.reply_json(verdict("again"))
        later = await agent.run("and again", "r")
        assert later.status == "succeeded", later.error
        assert "results (upload)" in later.steps[0].output["inputs"] and "results" in later.steps[0].output["inputs"]
        assert "Renamed" not in later.answer  # told once, with the run that brought the file

    # An output a step writes as outputs/results is renamed the same way when it joins the workspace.
    write = subtask("write", "def write():\n    open('outputs/results', 'w').write('made')\n    return {'ok': True}")
    llm_server.reply_json(plan(write))
    llm_server.reply_json(verdict("written"))
    assert (await agent.run("write results", "r")).status == "succeeded"
    llm_server.reply_json(plan(look))
    llm_server.reply_json(verdict("fine"))
    after = await agent.run("look again", "r")
    assert after.status == "succeeded", after.error
    assert "results (upload) (2)" in after.steps[0].output["inputs"]


def test_workspace_names_rename_only_the_names_the_workspace_uses():
    from agent_core.inputs import workspace_name

    assert workspace_name("results", set()) == "results (upload)"
    assert workspace_name("Outputs", set()) == "Outputs (upload)"
    assert workspace_name("inputs", {"inputs (upload)"}) == "inputs (upload) (2)"
    assert workspace_name("results.csv", set()) == "results.csv"
