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
    toolset = build_toolset(settings.tools_file, settings.mcp_result_kb)
    storage = storage or Storage(settings.db_path)
    llm = LLMClient(settings, storage)
    if executor is None and settings.redis_url:  # scale-out: steps run on `autocode worker` processes
        from agent_core.sandbox.remote import RemoteExecutor

        executor = RemoteExecutor(settings, storage)
    return Agent(settings, storage, llm, toolset, executor or SandboxExecutor.from_settings(settings),
                 EventBus())
