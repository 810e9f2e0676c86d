"""Shared fixtures: a scripted OpenAI-compatible server over real HTTP, settings on a temp SQLite file,
and helpers to write plans and evaluations the way an LLM would; the `requires(...)` system-package marks applied
(tests/system_packages.py)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from agent_core.app import build_agent
from agent_core.config import Settings
from tests import system_packages
from tests.fakes.openai_server import FakeOpenAI

_hidden_programs: Path | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _hidden_programs
    config.addinivalue_line("markers", "system_packages(*names): the test needs these Debian packages "
                                       "(use tests.system_packages.requires)")
    shadow = system_packages.hide_programs(system_packages.hidden())
    if shadow is not None:  # before any test module is imported: some decide their backend at import time
        os.environ["PATH"], _hidden_programs = shadow


def pytest_unconfigure(config: pytest.Config) -> None:
    if _hidden_programs is not None:
        shutil.rmtree(_hidden_programs, ignore_errors=True)


def pytest_report_header(config: pytest.Config) -> list[str]:
    hidden = system_packages.hidden()
    lines = [f"system packages hidden ({system_packages.HIDE_ENV}): {', '.join(sorted(hidden))}"] if hidden else []
    if system_packages.strict():
        lines.append(f"{system_packages.REQUIRE_ENV}: a test needing a missing system package fails")
    return lines


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Skip (or, under AUTOCODE_TESTS_REQUIRE_SYSTEM_PACKAGES, fail) a test whose system packages are missing,
    before its fixtures start anything."""
    for mark in item.iter_markers("system_packages"):
        system_packages.require(*mark.args)


@pytest.fixture
def llm_server():
    with FakeOpenAI() as server:
        yield server


@pytest.fixture
def make_settings(tmp_path: Path, llm_server: FakeOpenAI):
    def make(**overrides: Any) -> Settings:
        base = Settings(
            openai_api_key="sk-test-key-never-in-sandbox",
            openai_base_url=llm_server.base_url,
            model="fake-model",
            llm_timeout=10,
            llm_max_retries=1,
            db_path=tmp_path / "autocode.db",
            step_timeout=20,
        )
        return base.with_overrides(**overrides)

    return make


@pytest.fixture
async def make_agent(make_settings):
    agents = []

    def make(**overrides: Any):
        agent = build_agent(make_settings(**overrides))
        agents.append(agent)
        return agent

    yield make
    await close_agents(agents)


@pytest.fixture
async def agent_from_env(tmp_path: Path, llm_server: FakeOpenAI):
    """An agent built from environment-style settings, with every run event it emits collected."""
    agents = []

    def make(**env: str):
        settings = Settings.from_env({
            "OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": llm_server.base_url, "AUTOCODE_MODEL": "fake-model",
            "AUTOCODE_DB": str(tmp_path / "autocode.db"), "AUTOCODE_STEP_TIMEOUT": "20", **env,
        })
        agent = build_agent(settings)
        agent.seen = []  # every RunEvent it emits
        agent.events.subscribe(agent.seen.append)
        agents.append(agent)
        return agent

    yield make
    await close_agents(agents)


async def close_agents(agents: list[Any]) -> None:
    """Stop what each test agent started: its sandbox pool, its MCP servers, its LLM client, its database."""
    for agent in agents:
        await agent.close()


def subtask(name: str, code: str, input_from: str = "", imports: list[str] | None = None,
            description: str = "") -> dict[str, Any]:
    return {
        "tool_name": name, "input_from_tool": input_from, "description": description or f"do {name}",
        "imports": imports or [], "thought": "", "code": code,
    }


def png_step_code(function: str, path: str, *, then: str = "", returns: str = "{}") -> str:
    """Code of a step `function()` that writes a small valid PNG to `path` (the sandbox has no imaging library);
    `then` adds body lines after the write (indented by 4), `returns` is the expression it returns."""
    return (
        f"def {function}():\n"
        "    import struct, zlib\n"
        "    def chunk(kind, data):\n"
        "        return struct.pack(\">I\", len(data)) + kind + data + struct.pack(\">I\", zlib.crc32(kind + data))\n"
        "    raw = b\"\".join(b\"\\x00\" + b\"\\xff\\x00\\x00\" * 4 for _ in range(4))\n"
        "    png = (b\"\\x89PNG\\r\\n\\x1a\\n\" + chunk(b\"IHDR\", struct.pack(\">IIBBBBB\", 4, 4, 8, 2, 0, 0, 0))\n"
        "           + chunk(b\"IDAT\", zlib.compress(raw)) + chunk(b\"IEND\", b\"\"))\n"
        f"    with open({path!r}, \"wb\") as f:\n"
        "        f.write(png)\n"
        f"{then}"
        f"    return {returns}\n"
    )


def plan(*subtasks: dict[str, Any], thought: str = "simple") -> dict[str, Any]:
    return {"main_task_thought": thought, "direct_answer": "", "subtasks": list(subtasks)}


def direct(answer: str, thought: str = "no code needed") -> dict[str, Any]:
    """A planner reply that answers without code (issue 14)."""
    return {"main_task_thought": thought, "direct_answer": answer, "subtasks": []}


def verdict(answer: str = "", *, ok: bool = True, retry_from: str = "", new: list[dict[str, Any]] | None = None,
            thoughts: str = "looks right") -> dict[str, Any]:
    return {"satisfactory": ok, "thoughts": thoughts, "final_answer": answer, "retry_from": retry_from,
            "new_subtasks": new or []}


def user_prompt(request_body: dict[str, Any]) -> str:
    """All non-system message text of a chat request."""
    return "\n".join(m["content"] for m in request_body["messages"] if m["role"] != "system")


def request_text(request_body: dict[str, Any]) -> str:
    return json.dumps(request_body)


# Three chained steps used by several tests: numbers -> total -> sentence.
STEP_NUMBERS = subtask("get_numbers", "def get_numbers():\n    return {'numbers': [1, 2, 3]}")
STEP_TOTAL = subtask(
    "add_up", "def add_up(previous_output):\n    return {'total': sum(previous_output['numbers'])}", "get_numbers",
)
STEP_SENTENCE = subtask(
    "describe", "def describe(previous_output):\n    return {'sentence': f\"The total is {previous_output['total']}.\"}",
    "add_up",
)
