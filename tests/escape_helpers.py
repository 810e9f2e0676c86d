"""Helpers for tests/test_escapes.py: host-side checks that an attack left the server unharmed.

Everything here runs in the test (server) process, never in the sandbox.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent_core.sandbox import SandboxUnavailable
from agent_core.sandbox.backends import choose_launcher
from tests.procs import HostProcess, host_processes

BACKEND_ENV = os.environ.get("AUTOCODE_SANDBOX_BACKEND", "auto").strip().lower() or "auto"


def expected_backend(network: bool = False) -> str:
    """The backend `Settings.from_env()` would pick on this host ("bwrap", "process" or "unavailable").

    Used only for xfail conditions (decided at collection time); tests read `agent.executor.name`.
    """
    try:
        launcher, _ = choose_launcher(BACKEND_ENV, 64, None, network)
    except SandboxUnavailable:
        return "unavailable"
    return launcher.name


# --------------------------------------------------------------------------------------- processes


def live_sandbox_processes(uid_base: int, count: int) -> list[HostProcess]:
    """Non-zombie processes whose real uid is one of the sandbox's run uids."""
    uids = range(uid_base, uid_base + count)
    return [p for p in host_processes() if p.uid in uids and p.alive]


async def wait_no_sandbox_processes(uid_base: int, count: int, within_s: float = 3.0) -> list[HostProcess]:
    """Poll until no live process of the sandbox uids remains; return what is left after `within_s`."""
    deadline = time.monotonic() + within_s
    while True:
        left = live_sandbox_processes(uid_base, count)
        if not left or time.monotonic() > deadline:
            return left
        await asyncio.sleep(0.05)


def processes_with(text: str) -> list[HostProcess]:
    return [p for p in host_processes() if text in p.cmdline and p.alive and p.pid != os.getpid()]


# --------------------------------------------------------------------------------------- files


@dataclass
class Snapshot:
    data: bytes | None
    mode: int | None
    mtime_ns: int | None


def snapshot(path: Path) -> Snapshot:
    try:
        info = path.stat()
    except FileNotFoundError:
        return Snapshot(None, None, None)
    return Snapshot(path.read_bytes(), info.st_mode, info.st_mtime_ns)


@dataclass
class Canaries:
    """Host files an attack must neither read nor change; `verify()` compares them with their snapshot."""

    paths: list[Path] = field(default_factory=list)
    taken: dict[Path, Snapshot] = field(default_factory=dict)

    def watch(self, path: Path) -> Path:
        self.paths.append(path)
        self.taken[path] = snapshot(path)
        return path

    def verify(self) -> None:
        for path in self.paths:
            now = snapshot(path)
            assert now == self.taken[path], f"canary {path} changed"


# --------------------------------------------------------------------------------------- network


class TcpListener:
    """A TCP server on the host that records every connection it accepts (and answers none)."""

    def __init__(self, host: str = "127.0.0.1"):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.connections: list[tuple[str, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self.sock.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            self.connections.append(peer)
            conn.close()

    def __enter__(self) -> "TcpListener":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


def host_ipv4_address() -> str | None:
    """This host's primary non-loopback IPv4 address (no packet is sent), or None."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.123", 9))  # TEST-NET-1: only selects the outgoing interface
        address = probe.getsockname()[0]
    except OSError:
        return None
    finally:
        probe.close()
    return None if address.startswith("127.") or address == "0.0.0.0" else address


# --------------------------------------------------------------------------------------- the server


def everything_the_run_exposed(result: Any, llm_requests: list[dict[str, Any]]) -> str:
    """All text a run produced or sent out: step outputs, logs, errors, the answer, the LLM traffic."""
    parts = [result.answer or "", result.error or ""]
    for step in result.steps:
        parts += [json.dumps(step.output), step.error or "", step.traceback or "", step.stdout, step.stderr]
    parts.append(json.dumps(llm_requests))
    return "\n".join(parts)


def database_is_intact(path: Path) -> None:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("SELECT count(*) FROM runs").fetchone()[0] >= 1
