"""Run viewer: one web page per run at `/runs/{view_token}`, linked from chat answers."""

from __future__ import annotations

from typing import Any

from starlette.routing import BaseRoute

from agent_core.config import Settings
from storage.db import Storage


def run_url(settings: Settings, run: dict[str, Any]) -> str | None:
    """The page of a run, or None when the viewer is off."""
    if not settings.viewer or not run.get("view_token"):
        return None
    return f"{settings.base_url}/runs/{run['view_token']}"


def routes(settings: Settings, storage: Storage) -> list[BaseRoute]:
    """The viewer's routes (none when AUTOCODE_VIEWER=off)."""
    return []
