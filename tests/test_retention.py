"""Retention over all conversations (issue 21 item 9), with a real `autocode serve`, its SQLite file and blob
directory: files past AUTOCODE_WORKSPACE_DAYS of a conversation that never runs again are swept at serve's start
(and their run page answers 410 Gone with a sentence), blobs no row names are removed, and a total cap over all
conversations (AUTOCODE_WORKSPACES_MAX_MB) refuses new uploads with a sentence before the disk fills."""

from __future__ import annotations

import os
import sqlite3
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import plan, subtask, verdict
from tests.server_helpers import Serve, db_rows
from tests.test_uploads import serve  # noqa: F401  (the fixture: `autocode serve` processes on one database)

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the server's sandbox needs Linux")

WRITE = subtask("write", "def write():\n    data = open('inputs/data.csv').read()\n"
                "    open('outputs/copy.txt', 'w').write(data)\n    return {'chars': len(data)}")


def upload(server: Serve, conversation: str, data: bytes) -> httpx.Response:
    return server.http.post("/api/runs", data={"task": "copy it", "conversation": conversation},
                            files=[("file", ("data.csv", data, "text/csv"))])


def test_an_abandoned_conversations_old_files_are_swept_and_its_run_page_answers_410(serve, llm_server, tmp_path):
    db = tmp_path / "serve.db"
    server = serve()
    llm_server.reply_json(plan(WRITE))
    llm_server.reply_json(verdict("copied"))
    answer = upload(server, "abandoned", b"a,b\n1,2\n")
    assert answer.status_code == 202, answer.text
    run_id = answer.json()["run_id"]
    assert server.wait_status(run_id, timeout=60)["status"] == "succeeded"
    token = db_rows(db, "SELECT view_token FROM runs WHERE id = ?", (run_id,))[0]["view_token"]
    input_id = db_rows(db, "SELECT id FROM run_inputs WHERE run_id = ?", (run_id,))[0]["id"]
    artifact_id = db_rows(db, "SELECT id FROM artifacts WHERE run_id = ?", (run_id,))[0]["id"]
    assert server.http.get(f"/runs/{token}/inputs/{input_id}").content == b"a,b\n1,2\n"
    blobs = [p for p in (Path(f"{db}.blobs")).rglob("*") if p.is_file()]
    assert len(blobs) >= 2  # the upload, its copy and the result dict
    server.close()

    # 31 days later: the conversation never ran again. A blob no row names (a crash between blob and row).
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("UPDATE workspace_files SET created_at = '2020-01-01T00:00:00.000+00:00'")
        conn.execute("UPDATE artifacts SET created_at = '2020-01-01T00:00:00.000+00:00'")
    conn.close()
    orphan = Path(f"{db}.blobs") / "ab" / ("ab" + "0" * 62)
    orphan.parent.mkdir(exist_ok=True)
    orphan.write_bytes(b"left by a crash")
    old = time.time() - 2 * 86400
    os.utime(orphan, (old, old))
    for blob in blobs:
        os.utime(blob, (old, old))

    server = serve()
    swept = lambda: not [p for p in Path(f"{db}.blobs").rglob("*") if p.is_file()]  # noqa: E731
    deadline = time.monotonic() + 20
    while not swept() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert swept(), list(Path(f"{db}.blobs").rglob("*"))
    assert db_rows(db, "SELECT COUNT(*) AS n FROM workspace_files")[0]["n"] == 0

    page = server.http.get(f"/runs/{token}")
    assert page.status_code == 200
    gone = server.http.get(f"/runs/{token}/inputs/{input_id}")
    assert gone.status_code == 410 and "AUTOCODE_WORKSPACE_DAYS" in gone.text, gone.text
    gone = server.http.get(f"/runs/{token}/artifacts/{artifact_id}")
    assert gone.status_code == 410 and "no longer kept" in gone.text, gone.text
    assert "retention: removed" in server.log_tail()


def test_a_total_cap_over_all_conversations_refuses_new_uploads_with_a_sentence(serve, llm_server, tmp_path):
    server = serve(AUTOCODE_WORKSPACES_MAX_MB="1")
    llm_server.reply_json(plan(WRITE))
    llm_server.reply_json(verdict("copied"))
    first = upload(server, "one", b"x" * 300_000)
    assert first.status_code == 202, first.text
    assert server.wait_status(first.json()["run_id"], timeout=60)["status"] == "succeeded"

    refused = upload(server, "two", b"y" * 800_000)  # another conversation: its own quota is far off

    assert refused.status_code == 507, refused.text
    body = refused.json()
    assert body["status"] == "failed" and "AUTOCODE_WORKSPACES_MAX_MB" in body["error"], body
    assert "nothing was run" in body["error"]
    assert len(llm_server.chat_requests()) == 2  # the first run's plan and verdict only


def test_the_sweep_leaves_conversations_with_a_run_in_progress_and_young_blobs_alone(tmp_path):
    from agent_core.config import Settings
    from agent_core.retention import sweep
    from agent_core.workspace import Workspace
    from storage.db import Storage

    settings = Settings(db_path=tmp_path / "r.db", workspace_days=30)
    storage = Storage(settings.db_path)
    try:
        workspace = Workspace(storage, settings)
        for conversation in ("idle", "busy"):
            run_id = storage.create_run(conversation, "t", status="succeeded")
            source = tmp_path / f"{conversation}.csv"
            source.write_text(f"{conversation}\n")
            workspace.add_uploads(conversation, run_id, [(source, f"{conversation}.csv")])
        storage.create_run("busy", "a follow-up waiting", status="queued")
        storage.db.execute("UPDATE workspace_files SET created_at = '2020-01-01T00:00:00.000+00:00'")
        storage.db.conn.commit()
        young = storage.blob_dir / "cd" / ("cd" + "1" * 62)  # a blob another process is about to name
        young.parent.mkdir(exist_ok=True)
        young.write_bytes(b"new")

        swept = sweep(storage, settings)

        assert (swept.files, swept.conversations) == (1, 1)
        assert [r["name"] for r in storage.workspace_files("idle")] == []
        assert [r["name"] for r in storage.workspace_files("busy")] == ["busy.csv"]  # left to its queued run
        assert young.exists() and swept.orphans == 0
        assert not workspace.inputs_for("idle") and len(workspace.inputs_for("busy")) == 1
    finally:
        storage.close()
