"""AutoCode against a real model server (issue 20): llama.cpp's llama-server serving SmolLM2-135M-Instruct, the one
model the package registry ships, driven through `autocode run` as a user drives it (bench/real_model.py's runs).

The model is weak: its answers are not checked. What must hold for any model is: each run ends by itself within
90 s, a `succeeded` status is honest (every step of the final iteration ok, or a direct answer with no steps), and
no conversation's history holds error text (error sentences, URLs, setting names).

llama-server is not built by CI (~15 min of compiling on 2 cores, a sixth of CI's budget, for two tests): these
tests skip unless `bench/llama_server.sh build && bench/llama_server.sh model` has put the server and the model in
${AUTOCODE_LLAMA_DIR:-~/.cache/autocode/llama}, or AUTOCODE_TEST_LLM_BASE_URL (+ AUTOCODE_TEST_LLM_MODEL) names a
running OpenAI-compatible server. AUTOCODE_REAL_MODEL_TESTS=off skips them even then.
"""

from __future__ import annotations

import os
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from bench.real_model import TASKS, Row, history_findings, judge, run_task
from storage.db import Storage
from tests.server_helpers import _die_with_the_tests, free_port

LIMIT_S = 90.0  # what issue 20 asks of every run
KILL_AT_S = LIMIT_S + 15  # the bench kills a run past this: the test fails rather than hangs
LLAMA_DIR = Path(os.environ.get("AUTOCODE_LLAMA_DIR") or Path.home() / ".cache/autocode/llama")
HOW = "build it once with `bench/llama_server.sh build && bench/llama_server.sh model` (~15 min on 2 cores)"


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except Exception:
        return False


def test_the_bench_calls_a_success_over_a_failed_final_step_dishonest_and_finds_error_text_in_history(tmp_path):
    """The bench's own judgement, on a database the product's storage wrote (no server needed)."""
    db = tmp_path / "autocode.db"
    storage = Storage(db)
    runs = {}
    for name, iterations in {"repaired": [["error"], ["ok", "ok"]], "false_success": [["ok"], ["ok", "error"]],
                             "direct": [], "failed": [["error"]]}.items():
        run_id = storage.create_run("console", name)
        for iteration, statuses in enumerate(iterations, start=1):
            for position, status in enumerate(statuses):
                storage.add_step({"run_id": run_id, "iteration": iteration, "position": position,
                                  "tool_name": f"step{position}", "status": status})
        failed = name == "failed"
        storage.finish_run(run_id, "failed" if failed else "succeeded", None if failed else "391",
                           "The LLM at http://127.0.0.1:9/v1 did not answer: waited 180 s" if failed else None,
                           len(iterations))
        storage.add_message("console", "user", name, run_id)
        storage.add_message("console", "assistant",
                            "The LLM at http://127.0.0.1:9/v1 did not answer: waited 180 s" if failed else "391",
                            run_id)
        runs[name] = storage.get_run(run_id)
    storage.close()
    verdicts = {name: judge(db, run, Row(name)).honest for name, run in runs.items()}
    assert verdicts == {"repaired": True, "false_success": False, "direct": True, "failed": True}
    writing = judge(db, runs["failed"], Row("failed", user_sentence=runs["failed"]["error"], server_writing=True))
    assert writing.no_answer_while_writing
    found = history_findings(db)
    assert [(f["role"], f["run_id"]) for f in found] == [("assistant", runs["failed"]["id"])]
    assert "did not answer" in found[0]["markers"] and "the run's error" in found[0]["markers"]


@pytest.fixture(scope="module")
def real_server():
    """(base_url, model) of a running real server: the one named by AUTOCODE_TEST_LLM_BASE_URL, or llama-server
    from the cache started on a free loopback port for this module."""
    if os.environ.get("AUTOCODE_REAL_MODEL_TESTS", "").strip().lower() == "off":
        pytest.skip("AUTOCODE_REAL_MODEL_TESTS=off")
    if os.environ.get("AUTOCODE_TEST_LLM_BASE_URL"):
        yield os.environ["AUTOCODE_TEST_LLM_BASE_URL"], os.environ.get("AUTOCODE_TEST_LLM_MODEL", "default")
        return
    binary = LLAMA_DIR / "bin" / "llama-server"
    models = sorted((LLAMA_DIR / "models").glob("*.gguf"))
    if not binary.exists():
        pytest.skip(f"llama-server is not built in {LLAMA_DIR}: {HOW}")
    if not models:
        pytest.skip(f"no model in {LLAMA_DIR / 'models'}: run `bench/llama_server.sh model`")
    port = free_port()
    log = open(LLAMA_DIR / f"server-test-{port}.log", "wb")
    proc = subprocess.Popen(
        [str(binary), "-m", str(models[0]), "--host", "127.0.0.1", "--port", str(port), "-c", "8192"],
        env={**os.environ, "LD_LIBRARY_PATH": str(binary.parent)}, stdout=log, stderr=subprocess.STDOUT,
        preexec_fn=_die_with_the_tests)
    try:
        deadline = time.monotonic() + 60
        while not _ready(f"http://127.0.0.1:{port}/health"):
            assert proc.poll() is None, f"llama-server exited with {proc.returncode}: see {log.name}"
            assert time.monotonic() < deadline, f"llama-server not ready after 60 s: see {log.name}"
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1", str(models[0])
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    """One database for the module's runs, as one user's: plain runs share whatever conversation the CLI gives them."""
    return tmp_path_factory.mktemp("real-model")


@pytest.mark.timeout(KILL_AT_S + 30)
@pytest.mark.parametrize("name", ["greeting", "arithmetic"])
def test_a_real_model_run_ends_in_time_honestly_and_leaves_clean_history(real_server, bench_dir: Path, name: str):
    base_url, model = real_server
    task = next(t for t in TASKS if t.name == name)
    row = run_task(task, base_url=base_url, model=model, api_key="sk-local", db=bench_dir / "autocode.db",
                   workdir=bench_dir, limit=KILL_AT_S)
    said = f"{row.status} after {row.wall_s:.0f} s, {row.llm_calls} LLM calls; user got: {row.user_sentence!r}"
    assert row.status in ("succeeded", "failed", "cancelled"), said
    assert row.wall_s <= LIMIT_S, said
    assert row.honest, f"succeeded though a step of its final iteration failed: {said}"
    assert not row.no_answer_while_writing, f"said 'did not answer' while the server was writing: {said}"
    assert history_findings(bench_dir / "autocode.db") == [], "error text in a conversation's history"
