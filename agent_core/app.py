"""Wiring: builds an Agent from Settings. Adapters and the CLI call this and nothing deeper."""

from __future__ import annotations

from agent_core.config import Settings
from agent_core.events import EventBus
from agent_core.llm import LLMClient
from agent_core.loop import Agent
from agent_core.sandbox import Executor
from agent_core.sandbox.pool import SandboxExecutor
from storage.db import Storage
from tools.registry import build_toolset


def build_agent(settings: Settings, executor: Executor | None = None, storage: Storage | None = None) -> Agent:
    """Raises ConfigError (no LLM configured) or ToolError (bad tools file) before anything runs."""
    toolset = build_toolset(settings.tools_file)
    storage = storage or Storage(settings.db_path)
    llm = LLMClient(settings, storage)
    if executor is None and settings.redis_url:  # scale-out: steps run on `autocode worker` processes
        from agent_core.sandbox.remote import RemoteExecutor

        executor = RemoteExecutor(settings, storage)
    return Agent(settings, storage, llm, toolset, executor or build_executor(settings), EventBus())


def build_executor(settings: Settings, preload: list[str] | None = None) -> SandboxExecutor:
    """Raises SandboxUnavailable when AUTOCODE_SANDBOX_BACKEND=bwrap cannot work on this host.

    Workers start bare (cheap enough to start one per run); a run's worker imports the declared libraries its
    steps use when the first of them runs, and later steps fork with them loaded."""
    return SandboxExecutor(
        backend=settings.sandbox_backend, network=settings.sandbox_network, warm=settings.sandbox_warm,
        uid_base=settings.sandbox_uid_base, max_workers=settings.sandbox_max_workers,
        workdir_mb=settings.workdir_mb, workdir_root=settings.workdir_root, preload=preload,
    )
