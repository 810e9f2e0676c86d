"""Upgrades (issue 21, item 11): databases made by older releases open with their history, run numbers and files; a
database of a newer release is refused with a sentence and left unchanged.

The fixtures under tests/fixtures/old_databases/ were made by the releases themselves (make.py runs their
`autocode run` against the fake LLM): release-95985a2 is the first, before runs had a `seq` (run numbers counted
only runs that had one); release-7a22746 is the last before schema versions, with a conversation workspace.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from agent_core.config import Settings
from agent_core.workspace import Workspace
from storage.db import SCHEMA_VERSION, DatabaseTooNew, Storage, schema_version

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "old_databases"
DATA_CSV = b"city,people\nParis,2100000\nLyon,520000\n"


def load_fixture(name: str, directory: Path) -> Path:
    """The release's database, rebuilt from its SQL dump, with its blob files beside it."""
    db = directory / "autocode.db"
    conn = sqlite3.connect(db)
    conn.executescript((FIXTURES / name / "autocode.sql").read_text())
    conn.close()
    if (FIXTURES / name / "blobs").is_dir():
        shutil.copytree(FIXTURES / name / "blobs", directory / "autocode.db.blobs")
    return db


def runs_in_order(storage: Storage, conversation: str) -> list[dict]:
    return sorted(storage.list_runs(conversation), key=lambda run: run["created_at"])


def cli(db: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "AUTOCODE_"))}
    env.update(PYTHONPATH=str(ROOT), AUTOCODE_DB=str(db))
    return subprocess.run([sys.executable, "-P", "-m", "agent_core.cli", *args], cwd=db.parent, env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("release", ["release-95985a2", "release-7a22746"])
def test_a_database_of_an_older_release_keeps_its_history_and_numbers_its_runs(tmp_path, release):
    db = load_fixture(release, tmp_path)
    assert schema_version(db) == 0  # releases before versions
    storage = Storage(db)
    try:
        assert schema_version(db) == SCHEMA_VERSION
        texts = [m["text"] for m in storage.recent_messages("c1", max_chars=10**6)]
        assert texts == ["first job tag=one", "tag one", "second job tag=two", "tag two", "third job tag=three",
                         "tag three"]
        first, second, third = runs_in_order(storage, "c1")
        assert [storage.run_number(run["id"]) for run in (first, second, third)] == [1, 2, 3]
        (other,) = storage.list_runs("c2")
        assert storage.run_number(other["id"]) == 1 and other["answer"] == "tag other"
        # A run of the new release continues the numbering, after the old ones in the queue's order too.
        new = storage.create_run("c1", "fourth job", status="queued")
        assert storage.run_number(new) == 4
        assert [run["id"] for run in storage.runs_with_status("queued", "succeeded")][-1] == new
    finally:
        storage.close()
    reopened = Storage(db)  # opening again changes nothing
    try:
        assert [reopened.run_number(run["id"]) for run in runs_in_order(reopened, "c1")] == [1, 2, 3, 4]
    finally:
        reopened.close()
    shown = cli(db, "history", "--conversation", "c1")
    assert shown.returncode == 0, shown.stderr
    assert "tag three" in shown.stdout


def test_the_workspace_files_of_an_older_release_are_there(tmp_path):
    db = load_fixture("release-7a22746", tmp_path)
    storage = Storage(db)
    try:
        workspace = Workspace(storage, Settings())
        names = [row["name"] for row in workspace.listing("c1")]
        assert names == ["data.csv", "results/run-1.json", "results/run-2.json", "results/run-3.json"]
        inputs = {file.name: file for file in workspace.inputs_for("c1")}
        assert Path(inputs["data.csv"].path).read_bytes() == DATA_CSV
        record = json.loads(Path(inputs["results/run-3.json"].path).read_bytes())
        assert record["run"] == 3 and record["answer"] == "tag three"
    finally:
        storage.close()
    shown = cli(db, "history", "--conversation", "c1")
    assert shown.returncode == 0, shown.stderr
    assert "inputs/data.csv" in shown.stdout


def test_a_database_of_a_newer_release_is_refused_and_left_unchanged(tmp_path):
    db = tmp_path / "autocode.db"
    Storage(db).close()
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA journal_mode=DELETE")  # no -wal/-shm left: any write would show in the file itself
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    before = db.read_bytes()
    with pytest.raises(DatabaseTooNew) as refused:
        Storage(db)
    assert f"schema version {SCHEMA_VERSION + 1}" in str(refused.value) and "newer AutoCode" in str(refused.value)
    done = cli(db, "history")
    assert done.returncode == 2
    assert "was written by a newer AutoCode" in done.stderr and "left unchanged" in done.stderr
    assert "Traceback" not in done.stderr
    assert db.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["autocode.db"]


def test_migrations_are_all_or_nothing(tmp_path, monkeypatch):
    """A migration that fails leaves the database as it was: the version and the data."""
    import storage.db as db_module

    db = load_fixture("release-95985a2", tmp_path)

    def broken(database):
        db_module._number_runs(database)
        raise RuntimeError("a migration failed half-way")

    monkeypatch.setitem(db_module._MIGRATIONS, 1, broken)
    with pytest.raises(RuntimeError):
        Storage(db)
    assert schema_version(db) == 0
    conn = sqlite3.connect(db)
    assert "seq" not in [row[1] for row in conn.execute("PRAGMA table_info(runs)")]  # the columns too
    conn.close()
