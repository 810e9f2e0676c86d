"""SQLite persistence for conversations, messages, runs, steps, evaluations, LLM calls and run events.

The schema has a version (`PRAGMA user_version`, SCHEMA_VERSION). Opening a database brings it up to date in one
transaction: the tables and columns `_TABLES` declares are created where missing (so a table or column added there
needs nothing more), then the numbered `_MIGRATIONS` above the stored version run in order (data changes, such as
numbering the runs of releases before `seq`), then the version is stored. A database of a newer version than this
release knows is refused (DatabaseTooNew) before anything is written to it: an older release must not write into a
schema it does not know. Releases before versioning left 0.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import sqlite_utils

from storage.processes import current_identity


class StorageRefused(Exception):
    """The database cannot be used by this process; the message is the sentence for the operator."""


class DatabaseTooNew(StorageRefused):
    """The database was written by a newer release (its schema version is above SCHEMA_VERSION)."""


class DuplicateDelivery(Exception):
    """This platform delivery already created a run (its id is the message)."""

    @property
    def run_id(self) -> str:
        return str(self.args[0])


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def new_run_id() -> str:
    return secrets.token_hex(6)


# Schema: created on start, idempotent. Columns hold JSON as TEXT where marked *_json.
_TABLES: dict[str, tuple[dict[str, type], str | None, list[str]]] = {
    "conversations": ({"key": str, "created_at": str, "updated_at": str}, "key", []),
    "messages": (
        {"id": int, "conversation": str, "role": str, "text": str, "run_id": str, "created_at": str},
        "id",
        ["conversation"],
    ),
    "runs": (
        {
            "id": str, "conversation": str, "task": str, "status": str, "answer": str, "error": str,
            "iterations": int, "plan_json": str, "created_at": str, "finished_at": str,
            "user": str, "adapter": str, "delivery_id": str, "started_at": str, "seq": int,
            "reply_to_json": str, "view_token": str,
            # The run's effective settings (agent_core/channel_settings.py) and their scope, stored when it starts.
            "settings_json": str, "scope": str,
            # When its run_inputs were recorded (it started); NULL for runs of older versions and queued runs.
            "inputs_recorded_at": str,
            # Numbers of the answer found in no step output nor the task (agent_core/answer_check.py), JSON.
            "unsupported_json": str,
            # The process that set it running (storage/processes.py): restart recovery spares a live one's runs.
            "runner": str,
            # A routine's run (agent_core/routines.py): which routine, and the plan version it was given (NULL: it
            # plans as any run, e.g. the first run of a routine made with a task).
            "routine_id": str, "plan_version": int,
        },
        "id",
        ["conversation", "status", "user", "scope", "routine_id"],
    ),
    "steps": (
        {
            "id": int, "run_id": str, "iteration": int, "position": int, "tool_name": str,
            "input_from_tool": str, "description": str, "code": str, "status": str, "output_json": str,
            "stdout": str, "stderr": str, "error": str, "traceback": str, "duration_ms": int,
            "started_at": str, "worker": str,
        },
        "id",
        ["run_id"],
    ),
    "evaluations": (
        {
            "id": int, "run_id": str, "iteration": int, "satisfactory": int, "thoughts": str,
            "final_answer": str, "retry_from": str, "evaluation_json": str, "created_at": str,
        },
        "id",
        ["run_id"],
    ),
    "llm_calls": (
        {
            "id": int, "run_id": str, "iteration": int, "purpose": str, "model": str, "response_format": str,
            "started_at": str, "duration_ms": int, "prompt_tokens": int, "completion_tokens": int,
            "retries": int, "request_chars": int, "response_chars": int, "error": str,
            "finish_reason": str,  # "length": the reply cap cut it (agent_core/llm_stream.py)
            # llm() helper calls only: what the step sent and got back, clipped (agent_core/helper.py), with the
            # full lengths (the reply's is response_chars). Added to older databases on start.
            "prompt_text": str, "prompt_chars": int, "system_text": str, "system_chars": int, "reply_text": str,
        },
        "id",
        ["run_id"],
    ),
    "artifacts": (
        {"id": int, "run_id": str, "name": str, "mime": str, "size": int, "data": bytes, "created_at": str},
        "id",
        ["run_id"],
    ),
    "events": (
        {"id": int, "run_id": str, "type": str, "data_json": str, "created_at": str},
        "id",
        ["run_id"],
    ),
    # A conversation's workspace (agent_core/workspace.py): its files by name; the bytes are sha256-named blob
    # files beside the database (Storage.blob_dir), each stored once however many rows name it.
    "workspace_files": (
        {"id": int, "conversation": str, "name": str, "sha256": str, "size": int, "kind": str, "run_id": str,
         "run_no": int, "created_at": str},
        "id",
        ["conversation", "sha256"],
    ),
    # The conversation's files as a run started with them (the run page's "Input files"): copied from
    # workspace_files when the run starts, so a later replacement, expiry or /reset does not change what the page
    # says the run found. `from_run_*` is the run that added the file; the bytes are the workspace's blob while
    # the conversation still holds it.
    "run_inputs": (
        {"id": int, "run_id": str, "name": str, "sha256": str, "size": int, "kind": str, "from_run_id": str,
         "from_run_no": int, "added_at": str},
        "id",
        ["run_id"],
    ),
    # Previews of workspace files (agent_core/manifest.py), made in a sandbox once per content and kind of file
    # (key "sha256:.suffix"), so a follow-up's planner sees the manifest without a sandbox being opened.
    "previews": (
        {"key": str, "preview": str, "created_at": str},
        "key",
        [],
    ),
    # Settings of a channel or chat (agent_core/channel_settings.py), by scope: only the values set there.
    "channel_settings": (
        {"scope": str, "settings_json": str, "updated_at": str, "updated_by": str},
        "scope",
        [],
    ),
    # Calls of MCP servers' tools made by steps (tools/mcp_host.py), for audit: arguments and result clipped, with
    # their full lengths.
    "mcp_calls": (
        {"id": int, "run_id": str, "iteration": int, "server": str, "tool": str, "arguments": str,
         "arguments_chars": int, "ok": int, "error": str, "result_text": str, "result_chars": int,
         "duration_ms": int, "started_at": str},
        "id",
        ["run_id"],
    ),
    # Calls of `confirm` tools and who decided them (agent_core/approvals.py): `arguments` the whole call as text,
    # `call_json` its parts (agent_core/call_text.py), from which each platform fits what it shows.
    "approvals": (
        {"id": int, "run_id": str, "number": int, "tool": str, "arguments": str, "status": str,
         "requested_at": str, "decided_by": str, "decided_at": str, "call_json": str},
        "id",
        ["run_id"],
    ),
    # The journal of trusted tool calls (tools/journal.py): one row per call a step made, keyed by run, iteration,
    # step and call number; written before the tool runs (`started`) and after (`done` or `failed`), so a step run
    # again (its worker was lost) gets the recorded result instead of a second call.
    "tool_calls": (
        {"id": int, "run_id": str, "iteration": int, "step": str, "number": int, "tool": str, "digest": str,
         "attempt": str, "status": str, "result_json": str, "error": str, "started_at": str, "finished_at": str},
        "id",
        ["run_id"],
    ),
    # Routines (agent_core/routines.py): a task run on a cron schedule in an IANA time zone, re-running its pinned
    # plan. `next_fire_at` (UTC ISO) is the durable schedule serve's clock reads; `note` is told in its next post
    # (a firing skipped meanwhile); `failures` counts failed runs in a row (three pause it).
    "routines": (
        {"id": str, "task": str, "conversation": str, "cron": str, "tz": str, "owner": str, "adapter": str,
         "reply_to_json": str, "state": str, "plan_version": int, "failures": int, "next_fire_at": str,
         "last_fired_at": str, "note": str, "from_run_id": str, "created_at": str, "updated_at": str},
        "id",
        ["state", "next_fire_at"],
    ),
    # A routine's plan versions: the subtasks and code of the run that succeeded with them (version 1 from the run
    # it was made from or its first run; each repaired plan that succeeded, the next).
    "routine_plans": (
        {"id": int, "routine_id": str, "version": int, "plan_json": str, "run_id": str, "created_at": str},
        "id",
        ["routine_id"],
    ),
    # A routine's firings: the run each started, or why none did (skipped: missed, overlap, budget, paused).
    "routine_runs": (
        {"id": int, "routine_id": str, "run_id": str, "scheduled_for": str, "fired_at": str, "outcome": str,
         "note": str},
        "id",
        ["routine_id", "run_id"],
    ),
}


def _number_runs(db: sqlite_utils.Database) -> None:
    """Runs of releases before `seq` have none, and run numbers (`run_number`) counted only the others: number
    every run by creation, those without a `seq` keeping their place among the others."""
    ordered = [row[0] for row in db.execute(
        "SELECT rowid FROM runs ORDER BY created_at, COALESCE(seq, 0), rowid").fetchall()]
    if db.execute("SELECT 1 FROM runs WHERE seq IS NULL LIMIT 1").fetchone():
        db.conn.executemany("UPDATE runs SET seq = ? WHERE rowid = ?",
                            [(number, rowid) for number, rowid in enumerate(ordered, 1)])


def _declared(db: sqlite_utils.Database) -> None:
    """A version whose change is all in `_TABLES` (new tables or columns): nothing more to do."""


# Data migrations by the version they bring a database to, applied in order after `_TABLES` (so every declared table
# and column exists when they run). Every change of the schema takes the next number, a table or column added to
# `_TABLES` too (with `_declared`): the version is what lets a release refuse a database newer than itself.
_MIGRATIONS: dict[int, Callable[[sqlite_utils.Database], None]] = {
    1: _number_runs,
    2: _declared,  # runs.runner
    3: _declared,  # runs.unsupported_json, llm_calls.finish_reason (issue 20)
    4: _declared,  # approvals.call_json (issue 21: the whole call an approver decides)
    5: _declared,  # tool_calls (issue 21: no trusted tool call twice)
    6: _declared,  # mcp_calls (issue 24: MCP calls audited)
    7: _declared,  # routines, routine_plans, routine_runs; runs.routine_id, runs.plan_version (issue 23)
}
SCHEMA_VERSION = max(_MIGRATIONS)


def schema_version(path: str | Path) -> int:
    """The schema version stored in the database at `path` (read only)."""
    conn = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True, timeout=30)
    try:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])
    finally:
        conn.close()


class Storage:
    """One SQLite file (WAL mode). Safe to share between threads of one process."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.parent and not self.path.parent.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not self.path.exists()
        if not fresh:
            self._refuse_if_newer(schema_version(self.path))  # before anything writes to it (WAL included)
        conn = sqlite3.connect(str(self.path), check_same_thread=False, timeout=30)
        if fresh:
            os.chmod(self.path, 0o600)  # the DB holds conversations: keep it private to the server user
        self.db = sqlite_utils.Database(conn)
        self._lock = threading.RLock()
        try:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self._migrate()
        except BaseException:
            conn.close()
            raise

    def _refuse_if_newer(self, version: int) -> None:
        if version > SCHEMA_VERSION:
            raise DatabaseTooNew(
                f"the database {self.path} was written by a newer AutoCode (schema version {version}; this release "
                f"knows up to {SCHEMA_VERSION}); it was left unchanged: run the newer release, or point AUTOCODE_DB "
                "at another database")

    def _migrate(self) -> None:
        """Bring the schema up to SCHEMA_VERSION (see the module docstring), all or nothing."""
        with self._lock:
            conn = self.db.conn
            conn.execute("BEGIN IMMEDIATE")  # one process migrates at a time; the others then find it done
            try:
                version = int(conn.execute("PRAGMA user_version").fetchone()[0])
                self._refuse_if_newer(version)
                self._create_schema()
                for number in range(version + 1, SCHEMA_VERSION + 1):
                    _MIGRATIONS[number](self.db)
                if version != SCHEMA_VERSION:
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                conn.commit()
            except BaseException:
                conn.rollback()
                raise

    def _create_schema(self) -> None:
        with self._lock:
            for name, (columns, pk, indexes) in _TABLES.items():
                table = self.db.table(name)
                if not table.exists():
                    table.create(columns, pk=pk, not_null=set() if pk != "key" else {"key"})
                else:  # a database from an older version: add what is missing
                    for column, kind in columns.items():
                        if column not in table.columns_dict:
                            table.add_column(column, kind)
                for column in indexes:
                    table.create_index([column], if_not_exists=True)
            # A retried webhook must never start a second run.
            self.db.execute("CREATE UNIQUE INDEX IF NOT EXISTS runs_delivery ON runs (delivery_id) "
                            "WHERE delivery_id IS NOT NULL")
            self.db.execute("CREATE UNIQUE INDEX IF NOT EXISTS runs_view_token ON runs (view_token) "
                            "WHERE view_token IS NOT NULL")

    def close(self) -> None:
        self.db.close()

    def _insert(self, table: str, row: dict[str, Any]) -> int:
        with self._lock, self.db.conn:
            return self.db.table(table).insert(row).last_pk

    def _update(self, table: str, pk: Any, changes: dict[str, Any]) -> None:
        with self._lock, self.db.conn:
            self.db.table(table).update(pk, changes)

    def _rows(self, sql: str, params: tuple | dict = ()) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.db.query(sql, params))

    # conversations and messages
    def touch_conversation(self, key: str) -> None:
        stamp = now()
        with self._lock, self.db.conn:
            self.db.execute(
                "INSERT INTO conversations (key, created_at, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT(key) DO UPDATE SET updated_at = excluded.updated_at",
                (key, stamp, stamp),
            )

    def add_message(self, conversation: str, role: str, text: str, run_id: str | None = None) -> None:
        self.touch_conversation(conversation)
        self._insert(
            "messages",
            {"conversation": conversation, "role": role, "text": text, "run_id": run_id, "created_at": now()},
        )

    def recent_messages(self, conversation: str, max_chars: int) -> list[dict[str, Any]]:
        """The newest messages of a conversation that fit in `max_chars`, oldest first."""
        picked: list[dict[str, Any]] = []
        used = 0
        for row in self._rows(
            "SELECT role, text, run_id, created_at FROM messages WHERE conversation = ? ORDER BY id DESC",
            (conversation,),
        ):
            used += len(row["text"] or "")
            if used > max_chars:
                break
            picked.append(row)
        return picked[::-1]

    def clear_conversation(self, conversation: str) -> int:
        """Forget the conversation's messages and its workspace (every adapter's /reset); returns the messages."""
        with self._lock, self.db.conn:
            removed = self.db.execute("DELETE FROM messages WHERE conversation = ?", (conversation,)).rowcount
        self.delete_workspace_files(conversation)
        return removed

    # a conversation's workspace (agent_core/workspace.py)
    @property
    def blob_dir(self) -> Path:
        """Where workspace blobs live: `<db>.blobs/` beside the database file."""
        return self.path.with_name(self.path.name + ".blobs")

    def blob_path(self, sha256: str) -> Path:
        return self.blob_dir / sha256[:2] / sha256

    def workspace_files(self, conversation: str) -> list[dict[str, Any]]:
        return self._rows("SELECT * FROM workspace_files WHERE conversation = ? ORDER BY run_no, id", (conversation,))

    def add_workspace_file(self, row: dict[str, Any]) -> None:
        """Add a file by name; an older file of the same name in the conversation is replaced."""
        self.delete_workspace_files(row["conversation"], names=[row["name"]], keep_blob=row["sha256"])
        self._insert("workspace_files", {**row, "created_at": row.get("created_at") or now()})

    def previews(self, keys: list[str]) -> dict[str, str]:
        """The stored previews of these keys (see the `previews` table); missing keys are left out."""
        found: dict[str, str] = {}
        for start in range(0, len(keys), 500):
            chunk = keys[start:start + 500]
            found.update({r["key"]: r["preview"] for r in self._rows(
                f"SELECT key, preview FROM previews WHERE key IN ({', '.join('?' for _ in chunk)})", tuple(chunk))})
        return found

    def add_previews(self, previews: dict[str, str]) -> None:
        with self._lock, self.db.conn:
            self.db.conn.executemany("INSERT OR REPLACE INTO previews (key, preview, created_at) VALUES (?, ?, ?)",
                                     [(key, text, now()) for key, text in previews.items()])

    # approvals of `confirm` tool calls (agent_core/approvals.py)
    def add_approval(self, run_id: str, tool: str, arguments: str, call_json: str | None = None) -> int:
        """A pending approval; returns its number within the run (1, 2, …)."""
        with self._lock, self.db.conn:
            number = self.db.execute("SELECT COALESCE(MAX(number), 0) + 1 FROM approvals WHERE run_id = ?",
                                     (run_id,)).fetchone()[0]
            self.db.table("approvals").insert({"run_id": run_id, "number": number, "tool": tool,
                                               "arguments": arguments, "call_json": call_json,
                                               "status": "pending", "requested_at": now()})
        return number

    def decide_approval(self, run_id: str, number: int, status: str, by: str = "") -> bool:
        """Record a decision on a pending approval; False when it was not pending (decided already, or unknown)."""
        with self._lock, self.db.conn:
            return self.db.execute(
                "UPDATE approvals SET status = ?, decided_by = ?, decided_at = ? "
                "WHERE run_id = ? AND number = ? AND status = 'pending'",
                (status, by, now(), run_id, number)).rowcount == 1

    def approvals(self, run_id: str) -> list[dict[str, Any]]:
        return self._rows("SELECT * FROM approvals WHERE run_id = ? ORDER BY number", (run_id,))

    def end_pending_approvals(self, run_id: str, status: str) -> int:
        with self._lock, self.db.conn:
            return self.db.execute("UPDATE approvals SET status = ?, decided_at = ? WHERE run_id = ? AND "
                                   "status = 'pending'", (status, now(), run_id)).rowcount

    # the journal of trusted tool calls (tools/journal.py)
    def begin_tool_call(self, row: dict[str, Any], insert: bool = True) -> dict[str, Any] | None:
        """Record a call as started unless its key (run_id, iteration, step, number) is recorded: then that row.
        `insert=False` only looks."""
        with self._lock, self.db.conn:
            found = list(self.db.query(
                "SELECT * FROM tool_calls WHERE run_id = :run_id AND iteration = :iteration AND step = :step "
                "AND number = :number", row))
            if found:
                return found[0]
            if insert:
                self.db.table("tool_calls").insert({**row, "status": "started", "started_at": now()})
        return None

    def finish_tool_call(self, key: dict[str, Any], status: str, result_json: str | None, error: str | None) -> None:
        with self._lock, self.db.conn:
            self.db.execute(
                "UPDATE tool_calls SET status = ?, result_json = ?, error = ?, finished_at = ? WHERE run_id = ? "
                "AND iteration = ? AND step = ? AND number = ? AND status = 'started'",
                (status, result_json, error, now(), key["run_id"], key["iteration"], key["step"], key["number"]))

    def retake_tool_call(self, key: dict[str, Any], attempt: str) -> None:
        with self._lock, self.db.conn:
            self.db.execute("UPDATE tool_calls SET attempt = ?, started_at = ? WHERE run_id = ? AND iteration = ? "
                            "AND step = ? AND number = ? AND status = 'started'",
                            (attempt, now(), key["run_id"], key["iteration"], key["step"], key["number"]))

    def tool_calls(self, run_id: str) -> list[dict[str, Any]]:
        return self._rows("SELECT * FROM tool_calls WHERE run_id = ? ORDER BY id", (run_id,))

    def delete_workspace_files(self, conversation: str, names: list[str] | None = None,
                               keep_blob: str | None = None) -> int:
        """Remove the conversation's files (those named, or all), and the blobs no other row refers to."""
        with self._lock, self.db.conn:
            where, params = "conversation = ?", [conversation]
            if names is not None:
                where += f" AND name IN ({', '.join('?' for _ in names)})"
                params += names
            hashes = {r[0] for r in self.db.execute(f"SELECT sha256 FROM workspace_files WHERE {where}", params)}
            removed = self.db.execute(f"DELETE FROM workspace_files WHERE {where}", params).rowcount
            orphans = [h for h in hashes if h != keep_blob and not self.db.execute(
                "SELECT 1 FROM workspace_files WHERE sha256 = ? LIMIT 1", (h,)).fetchone()]
        if orphans:
            with self._lock, self.db.conn:
                self.db.conn.executemany("DELETE FROM previews WHERE key LIKE ?", [(f"{h}:%",) for h in orphans])
        for sha256 in orphans:
            try:
                self.blob_path(sha256).unlink()
            except FileNotFoundError:
                pass
        return removed

    def run_number(self, run_id: str) -> int:
        """The run's place in its conversation: 1 for the first run, and so on."""
        rows = self._rows("SELECT COUNT(*) AS n FROM runs WHERE conversation = (SELECT conversation FROM runs "
                          "WHERE id = ?) AND seq <= (SELECT seq FROM runs WHERE id = ?)", (run_id, run_id))
        return int(rows[0]["n"]) if rows else 0

    def conversations(self) -> list[dict[str, Any]]:
        return self._rows("SELECT * FROM conversations ORDER BY updated_at DESC")

    # runs
    def create_run(self, conversation: str, task: str, *, status: str = "running", user: str = "",
                   adapter: str = "cli", delivery_id: str | None = None,
                   reply_to: dict[str, Any] | None = None) -> str:
        """A new run row; with a `delivery_id` already seen, raises DuplicateDelivery naming the first run.

        `reply_to` is the adapter's own routing (channel, thread, message ids), kept so a run queued before a
        restart still answers in the right place. Every run gets an unguessable `view_token` for its web page."""
        self.touch_conversation(conversation)
        run_id = new_run_id()
        stamp = now()
        try:
            with self._lock, self.db.conn:
                seq = self.db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM runs").fetchone()[0]
                self.db.table("runs").insert({
                    "id": run_id, "conversation": conversation, "task": task, "status": status, "iterations": 0,
                    "created_at": stamp, "started_at": stamp if status == "running" else None, "user": user,
                    "adapter": adapter, "delivery_id": delivery_id, "seq": seq,
                    "runner": current_identity() if status == "running" else None,
                    "reply_to_json": json.dumps(reply_to) if reply_to is not None else None,
                    "view_token": secrets.token_urlsafe(24),  # 192 bits
                })
        except sqlite3.IntegrityError:
            existing = self._rows("SELECT id FROM runs WHERE delivery_id = ?", (delivery_id,))
            if existing:
                raise DuplicateDelivery(existing[0]["id"]) from None
            raise
        return run_id

    def runs_with_status(self, *statuses: str) -> list[dict[str, Any]]:
        marks = ", ".join("?" for _ in statuses)
        return self._rows(f"SELECT * FROM runs WHERE status IN ({marks}) ORDER BY seq", statuses)

    def tokens_used(self, *, user: str | None = None, conversation: str | None = None,
                    since: str | None = None, scope: str | None = None, until: str | None = None) -> dict[str, int]:
        """LLM usage of the runs of a user, conversation and/or scope, optionally of the calls since an ISO time
        (and before `until`)."""
        where, params = ["1 = 1"], []
        for column, value in (("r.user", user), ("r.conversation", conversation), ("r.scope", scope)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        if since is not None:
            where.append("c.started_at >= ?")
            params.append(since)
        if until is not None:
            where.append("c.started_at < ?")
            params.append(until)
        row = self._rows(
            "SELECT COUNT(DISTINCT r.id) AS runs, COUNT(c.id) AS llm_calls, "
            "COALESCE(SUM(c.prompt_tokens), 0) AS prompt_tokens, "
            "COALESCE(SUM(c.completion_tokens), 0) AS completion_tokens "
            f"FROM llm_calls c JOIN runs r ON r.id = c.run_id WHERE {' AND '.join(where)}",
            tuple(params),
        )[0]
        return {k: int(v) for k, v in row.items()}

    _GROUPS = {"user": "r.user", "scope": "r.scope", "conversation": "r.conversation"}

    def tokens_by_model(self, *, run_id: str | None = None, user: str | None = None,
                        conversation: str | None = None, scope: str | None = None, since: str | None = None,
                        until: str | None = None, group_by: str | None = None) -> list[dict[str, Any]]:
        """LLM calls and tokens per model (and per user, scope or conversation with `group_by`) of the runs that
        match, the calls made in [since, until) when given: what agent_core/pricing.py prices."""
        where, params = ["1 = 1"], []
        for column, value in (("r.id", run_id), ("r.user", user), ("r.conversation", conversation),
                              ("r.scope", scope)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        for bound, value in ((">=", since), ("<", until)):
            if value is not None:
                where.append(f"c.started_at {bound} ?")
                params.append(value)
        group = self._GROUPS[group_by] if group_by else None
        key = f", COALESCE({group}, '') AS grp" if group else ""
        return self._rows(
            f"SELECT COALESCE(c.model, '') AS model{key}, COUNT(c.id) AS llm_calls, "
            "COUNT(DISTINCT r.id) AS runs, COALESCE(SUM(c.prompt_tokens), 0) AS prompt_tokens, "
            "COALESCE(SUM(c.completion_tokens), 0) AS completion_tokens "
            f"FROM llm_calls c JOIN runs r ON r.id = c.run_id WHERE {' AND '.join(where)} "
            f"GROUP BY model{', grp' if group else ''} ORDER BY model",
            tuple(params),
        )

    # settings of a channel or chat (agent_core/channel_settings.py)
    def channel_settings(self, scope: str) -> dict[str, Any]:
        """The values set for `scope` ({} when none)."""
        rows = self._rows("SELECT settings_json FROM channel_settings WHERE scope = ?", (scope,))
        return json.loads(rows[0]["settings_json"] or "{}") if rows else {}

    def put_channel_settings(self, scope: str, values: dict[str, Any], by: str = "") -> None:
        """Store the values set for `scope` (all of them: this replaces what was stored); {} removes the row."""
        with self._lock, self.db.conn:
            if not values:
                self.db.execute("DELETE FROM channel_settings WHERE scope = ?", (scope,))
                return
            self.db.execute(
                "INSERT INTO channel_settings (scope, settings_json, updated_at, updated_by) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(scope) DO UPDATE SET settings_json = excluded.settings_json, "
                "updated_at = excluded.updated_at, updated_by = excluded.updated_by",
                (scope, json.dumps(values, sort_keys=True), now(), by))

    def update_run(self, run_id: str, **changes: Any) -> None:
        """Change a run's columns. A run set to `running` also records the files it starts with (run_inputs)."""
        if "plan" in changes:
            changes["plan_json"] = json.dumps(changes.pop("plan"))
        if changes.get("status") == "running":
            changes["runner"] = current_identity()
        self._update("runs", run_id, changes)
        if changes.get("status") == "running":
            self._record_run_inputs(run_id)

    def _record_run_inputs(self, run_id: str) -> None:
        """Copy the conversation's workspace rows as the files this run starts with (again if it is re-run). The
        scheduler runs one run of a conversation at a time, so these are what the run's inputs/ is made from (less
        any file it then removes by age: the viewer leaves those out by the same rule)."""
        with self._lock, self.db.conn:
            self.db.execute("DELETE FROM run_inputs WHERE run_id = ?", (run_id,))
            self.db.execute(
                "INSERT INTO run_inputs (run_id, name, sha256, size, kind, from_run_id, from_run_no, added_at) "
                "SELECT r.id, w.name, w.sha256, w.size, w.kind, w.run_id, w.run_no, w.created_at "
                "FROM runs r JOIN workspace_files w ON w.conversation = r.conversation WHERE r.id = ? "
                "ORDER BY w.run_no, w.id", (run_id,))
            self.db.execute("UPDATE runs SET inputs_recorded_at = ? WHERE id = ?", (now(), run_id))

    def run_inputs(self, run_id: str) -> list[dict[str, Any]] | None:
        """The files the run started with (see `run_inputs`), or None when none were recorded (a queued run, or
        one of a database from before they were)."""
        run = self._rows("SELECT inputs_recorded_at FROM runs WHERE id = ?", (run_id,))
        if not run or not run[0]["inputs_recorded_at"]:
            return None
        return self._rows("SELECT * FROM run_inputs WHERE run_id = ? ORDER BY from_run_no, id", (run_id,))

    def run_input(self, run_id: str, input_id: int) -> dict[str, Any] | None:
        """One recorded input of a run, with whether its conversation still holds those bytes (`kept`); None when
        the id belongs to another run."""
        rows = self._rows(
            "SELECT i.*, EXISTS (SELECT 1 FROM workspace_files w WHERE w.conversation = r.conversation AND "
            "w.sha256 = i.sha256) AS kept FROM run_inputs i JOIN runs r ON r.id = i.run_id "
            "WHERE i.run_id = ? AND i.id = ?", (run_id, input_id))
        return rows[0] if rows else None

    def held_blobs(self, conversation: str) -> set[str]:
        """The sha256 of every file the conversation's workspace holds now."""
        return {r["sha256"] for r in self._rows("SELECT DISTINCT sha256 FROM workspace_files WHERE conversation = ?",
                                                (conversation,))}

    def blobs_total(self) -> int:
        """Bytes of every conversation's kept files together (each blob counted once)."""
        rows = self._rows("SELECT COALESCE(SUM(size), 0) AS total FROM (SELECT sha256, MAX(size) AS size "
                          "FROM workspace_files GROUP BY sha256)")
        return int(rows[0]["total"])

    def all_blobs(self) -> set[str]:
        """The sha256 of every blob some conversation's workspace names (agent_core/retention.py)."""
        return {r["sha256"] for r in self._rows("SELECT DISTINCT sha256 FROM workspace_files")}

    def workspace_files_before(self, cutoff: str) -> dict[str, list[str]]:
        """Names of the workspace files created before `cutoff` (an ISO time), by conversation."""
        found: dict[str, list[str]] = {}
        for row in self._rows("SELECT conversation, name FROM workspace_files WHERE created_at < ? "
                              "ORDER BY conversation, id", (cutoff,)):
            found.setdefault(row["conversation"], []).append(row["name"])
        return found

    def drop_artifact_data_before(self, cutoff: str) -> int:
        """Drop the bytes of run artifacts created before `cutoff` (the rows stay: the run page names them and
        answers 410 Gone); returns how many."""
        with self._lock, self.db.conn:
            return self.db.execute("UPDATE artifacts SET data = NULL WHERE created_at < ? AND data IS NOT NULL",
                                   (cutoff,)).rowcount

    def finish_run(self, run_id: str, status: str, answer: str | None, error: str | None, iterations: int) -> None:
        self._update(
            "runs", run_id,
            {"status": status, "answer": answer, "error": error, "iterations": iterations, "finished_at": now()},
        )

    def get_run(self, run_id: str) -> dict[str, Any] | None:
        rows = self._rows("SELECT * FROM runs WHERE id = ?", (run_id,))
        return rows[0] if rows else None

    def run_by_view_token(self, token: str) -> dict[str, Any] | None:
        rows = self._rows("SELECT * FROM runs WHERE view_token = ?", (token,)) if token else []
        return rows[0] if rows else None

    def reply_to(self, run_id: str) -> dict[str, Any]:
        """The adapter's routing for a run ({} when none was stored)."""
        rows = self._rows("SELECT reply_to_json FROM runs WHERE id = ?", (run_id,))
        return json.loads(rows[0]["reply_to_json"] or "{}") if rows else {}

    def update_reply_to(self, run_id: str, **changes: Any) -> dict[str, Any]:
        """Merge `changes` into a run's routing (e.g. the id of its progress message) and return the result."""
        with self._lock:
            merged = {**self.reply_to(run_id), **changes}
            self._update("runs", run_id, {"reply_to_json": json.dumps(merged)})
            return merged

    def list_runs(self, conversation: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        if conversation:
            return self._rows(
                "SELECT * FROM runs WHERE conversation = ? ORDER BY created_at DESC, rowid DESC LIMIT ?",
                (conversation, limit),
            )
        return self._rows("SELECT * FROM runs ORDER BY created_at DESC, rowid DESC LIMIT ?", (limit,))

    def runs_of_user(self, user: str, limit: int = 10) -> list[dict[str, Any]]:
        """A user's most recent runs, in every conversation (Slack's App Home)."""
        return self._rows("SELECT * FROM runs WHERE user = ? ORDER BY created_at DESC, rowid DESC LIMIT ?",
                          (user, limit))

    def scopes(self, prefix: str) -> list[str]:
        """The scopes starting with `prefix` that have runs or settings (e.g. a Slack workspace's channels)."""
        like = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        rows = self._rows("SELECT scope FROM runs WHERE scope LIKE ? ESCAPE '\\' UNION "
                          "SELECT scope FROM channel_settings WHERE scope LIKE ? ESCAPE '\\' ORDER BY scope",
                          (like, like))
        return [row["scope"] for row in rows if row["scope"]]

    # routines (agent_core/routines.py)
    def add_routine(self, row: dict[str, Any]) -> str:
        routine_id = row.get("id") or secrets.token_hex(4)
        stamp = now()
        self._insert("routines", {"failures": 0, "plan_version": 0, "state": "active", **row, "id": routine_id,
                                  "created_at": stamp, "updated_at": stamp})
        return routine_id

    def get_routine(self, routine_id: str) -> dict[str, Any] | None:
        rows = self._rows("SELECT * FROM routines WHERE id = ?", (routine_id,))
        return rows[0] if rows else None

    def routines(self, state: str | None = None) -> list[dict[str, Any]]:
        if state:
            return self._rows("SELECT * FROM routines WHERE state = ? ORDER BY created_at, id", (state,))
        return self._rows("SELECT * FROM routines ORDER BY created_at, id")

    def due_routines(self, at: str) -> list[dict[str, Any]]:
        """Active routines whose next firing is at or before `at` (UTC ISO), earliest first."""
        return self._rows("SELECT * FROM routines WHERE state = 'active' AND next_fire_at IS NOT NULL AND "
                          "next_fire_at <= ? ORDER BY next_fire_at", (at,))

    def update_routine(self, routine_id: str, **changes: Any) -> None:
        self._update("routines", routine_id, {**changes, "updated_at": now()})

    def delete_routine(self, routine_id: str) -> bool:
        """Forget a routine and its plan versions; its runs and firings stay (their routine_id names it)."""
        with self._lock, self.db.conn:
            self.db.execute("DELETE FROM routine_plans WHERE routine_id = ?", (routine_id,))
            return self.db.execute("DELETE FROM routines WHERE id = ?", (routine_id,)).rowcount == 1

    def add_routine_plan(self, routine_id: str, plan_json: str, run_id: str | None) -> int:
        """Pin a new plan version (the next number) and make it the routine's current one; returns the version."""
        with self._lock, self.db.conn:
            version = self.db.execute("SELECT COALESCE(MAX(version), 0) + 1 FROM routine_plans WHERE routine_id = ?",
                                      (routine_id,)).fetchone()[0]
            self.db.table("routine_plans").insert({"routine_id": routine_id, "version": version,
                                                   "plan_json": plan_json, "run_id": run_id, "created_at": now()})
            self.db.execute("UPDATE routines SET plan_version = ?, updated_at = ? WHERE id = ?",
                            (version, now(), routine_id))
        return version

    def routine_plan(self, routine_id: str, version: int) -> dict[str, Any] | None:
        rows = self._rows("SELECT * FROM routine_plans WHERE routine_id = ? AND version = ?", (routine_id, version))
        return rows[0] if rows else None

    def add_routine_run(self, row: dict[str, Any]) -> int:
        return self._insert("routine_runs", {"fired_at": now(), **row})

    def routine_runs(self, routine_id: str, limit: int = 20) -> list[dict[str, Any]]:
        """The routine's latest firings, newest first, with their run's status and error."""
        return self._rows(
            "SELECT f.*, r.status AS run_status, r.error AS run_error, r.plan_version AS plan_version "
            "FROM routine_runs f LEFT JOIN runs r ON r.id = f.run_id WHERE f.routine_id = ? "
            "ORDER BY f.id DESC LIMIT ?", (routine_id, limit))

    def active_routine_run(self, routine_id: str) -> dict[str, Any] | None:
        """A queued, held or running run of the routine (a firing now would overlap it)."""
        rows = self._rows("SELECT * FROM runs WHERE routine_id = ? AND status IN ('queued', 'held', 'running') "
                          "ORDER BY seq LIMIT 1", (routine_id,))
        return rows[0] if rows else None

    # steps, evaluations, LLM calls, events
    def add_step(self, row: dict[str, Any]) -> int:
        return self._insert("steps", row)

    def delete_steps(self, run_id: str, iteration: int, from_position: int) -> None:
        """Forget an iteration's steps from a position on (their batch is being run again elsewhere)."""
        with self._lock, self.db.conn:
            self.db.execute("DELETE FROM steps WHERE run_id = ? AND iteration = ? AND position >= ?",
                            (run_id, iteration, from_position))

    def steps(self, run_id: str) -> list[dict[str, Any]]:
        return self._rows("SELECT * FROM steps WHERE run_id = ? ORDER BY id", (run_id,))

    def add_evaluation(self, row: dict[str, Any]) -> int:
        return self._insert("evaluations", {**row, "created_at": now()})

    def evaluations(self, run_id: str) -> list[dict[str, Any]]:
        return self._rows("SELECT * FROM evaluations WHERE run_id = ? ORDER BY id", (run_id,))

    def add_llm_call(self, row: dict[str, Any]) -> int:
        return self._insert("llm_calls", row)

    def add_mcp_call(self, row: dict[str, Any]) -> int:
        return self._insert("mcp_calls", row)

    def mcp_calls(self, run_id: str) -> list[dict[str, Any]]:
        return self._rows("SELECT * FROM mcp_calls WHERE run_id = ? ORDER BY id", (run_id,))

    def llm_calls(self, run_id: str) -> list[dict[str, Any]]:
        return self._rows("SELECT * FROM llm_calls WHERE run_id = ? ORDER BY id", (run_id,))

    def note_llm_call_error(self, call_id: int, error: str) -> None:
        """Record why a call that got an answer was still of no use (its reply never parsed)."""
        self._update("llm_calls", call_id, {"error": error})

    def usage(self, run_id: str) -> dict[str, int]:
        row = self._rows(
            "SELECT COUNT(*) AS llm_calls, COALESCE(SUM(prompt_tokens), 0) AS prompt_tokens, "
            "COALESCE(SUM(completion_tokens), 0) AS completion_tokens FROM llm_calls WHERE run_id = ?",
            (run_id,),
        )[0]
        return {k: int(v) for k, v in row.items()}

    def add_artifact(self, run_id: str, name: str, mime: str, data: bytes) -> int:
        return self._insert(
            "artifacts",
            {"run_id": run_id, "name": name, "mime": mime, "size": len(data), "data": data, "created_at": now()},
        )

    def artifacts(self, run_id: str, with_data: bool = False) -> list[dict[str, Any]]:
        columns = "id, run_id, name, mime, size, created_at" + (", data" if with_data else "")
        return self._rows(f"SELECT {columns} FROM artifacts WHERE run_id = ? ORDER BY id", (run_id,))

    def artifact(self, run_id: str, artifact_id: int) -> dict[str, Any] | None:
        """One artifact of a run, with its data (None when the id belongs to another run)."""
        rows = self._rows("SELECT * FROM artifacts WHERE run_id = ? AND id = ?", (run_id, artifact_id))
        return rows[0] if rows else None

    def add_event(self, run_id: str, type_: str, data: dict[str, Any]) -> None:
        self._insert(
            "events", {"run_id": run_id, "type": type_, "data_json": json.dumps(data, default=str), "created_at": now()}
        )

    def events(self, run_id: str) -> Iterator[dict[str, Any]]:
        yield from self._rows("SELECT * FROM events WHERE run_id = ? ORDER BY id", (run_id,))
