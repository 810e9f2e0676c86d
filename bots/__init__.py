"""Chat adapters: they turn platform events into tasks and render run events back.

An adapter is built by the server with a `Runtime` and owns one platform: it mounts its HTTP routes (webhooks),
submits tasks to the scheduler (with its own routing in `reply_to`), renders the run events of its runs
(`run["adapter"] == adapter.name`) and tells users about runs a restart interrupted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Protocol

from starlette.routing import BaseRoute

from agent_core.approvals import Approvals
from agent_core.config import Settings
from agent_core.events import EventBus
from agent_core.scheduler import RunScheduler
from storage.db import Storage

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    """What `serve` shares with its adapters."""

    settings: Settings
    scheduler: RunScheduler
    storage: Storage
    events: EventBus
    # Awaited before non-urgent platform calls (progress messages): returns once no webhook is waiting for its
    # acknowledgement, or after a short bound, so rendering never delays acks. Set by the server.
    quiet: Callable[[], Awaitable[None]] = field(default=lambda: _nothing())

    @property
    def approvals(self) -> "Approvals":
        """Pending `confirm` tool calls: adapters render ApprovalRequested and call `decide` for the requester or
        an admin (bots/permissions.py)."""
        return self.scheduler.agent.approvals

    def run_url(self, run: dict[str, Any]) -> str | None:
        """The run's web page (the "Full log" link), or None when the viewer is off."""
        from agent_core.viewer import run_url

        return run_url(self.settings, run)


async def _nothing() -> None:
    return None


class Adapter(Protocol):
    name: str  # stored as runs.adapter

    @property
    def routes(self) -> list[BaseRoute]:
        """HTTP routes mounted on `serve`'s app (may be empty, e.g. Socket Mode or long polling)."""

    async def start(self) -> None:
        """Connect (clients, polling, webhook registration). Run events may arrive before this returns. Keep it
        short and let it not raise for what the platform does (serve waits 5 s at most, then goes on): retry in the
        background, and say in one line when the platform refuses for good."""

    @property
    def status(self) -> str:
        """"up", "connecting" (retrying in the background) or "off" (refused for good): serve's ready line names
        only the adapters that are up (optional: without it an adapter whose start returned counts as up)."""

    async def stop(self) -> None: ...

    async def notify_interrupted(self, run: dict[str, Any]) -> None:
        """Tell the run's user that a restart interrupted it."""

    # Optional: `start_problem` (str | None), why start() returned without the adapter connected (e.g. a token
    # the chat service rejected). serve's ready line lists such an adapter as not connected, with the reason.


def build_adapters(runtime: Runtime) -> list[Adapter]:
    """The adapters the configuration enables, logged (a warning when none: serve then only answers its own API)."""
    adapters: list[Adapter] = []
    if runtime.settings.slack_enabled:
        from bots.slack import SlackAdapter

        adapters.append(SlackAdapter(runtime))
    if runtime.settings.telegram_enabled:
        from bots.telegram import TelegramAdapter

        adapters.append(TelegramAdapter(runtime))
    if adapters:
        log.info("chat adapters on: %s", ", ".join(adapter.name for adapter in adapters))
    else:
        log.warning("no SLACK_BOT_TOKEN or TELEGRAM_BOT_TOKEN: serve only answers the internal API")
    return adapters
