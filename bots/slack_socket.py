"""Slack Socket Mode, supervised: the websocket is connected in the background and never holds `serve` up.

slack_sdk's aiohttp Socket Mode client (the one slack_bolt's AsyncSocketModeHandler builds) retries a failed
connect for ever inside `connect()`, every ping interval, with a traceback each time, and treats a rejected app
token (`invalid_auth`) like a network blip. Awaited in serve's start-up, that kept the HTTP port closed (API, run
pages, Telegram down) and SIGTERM unanswered. Here:

- `_OneAttemptClient` is that client with one change: `connect()` makes one attempt (a fresh
  `apps.connections.open` URL, one websocket handshake) and raises what went wrong; its own reconnecting is off.
  Everything else (receiving, pings, acks, Bolt's handling of envelopes) is the SDK's and Bolt's.
- `SocketModeSupervisor` owns the connection: `start()` waits a few seconds at most for the first attempt and
  returns; a rejected token is one error line and Socket Mode off (retrying cannot help); an unreachable endpoint
  is retried in the background with exponential backoff (1 s doubling to 60 s, jittered); a lost connection is
  noticed within a second (or when pings stop being answered) and reconnected the same way. The log gets one line
  per change of state — connected, cannot connect (retrying), lost, connected again, off — not one per attempt.
  The SDK's own connection chatter goes to the `bots.slack_socket.sdk` logger at DEBUG only.
- `stop()` ends all of it within a few seconds, whatever the state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import aiohttp
from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler
from slack_bolt.app.async_app import AsyncApp
from slack_sdk.errors import SlackApiError
from slack_sdk.socket_mode.aiohttp import SocketModeClient

log = logging.getLogger(__name__)
sdk_log = logging.getLogger(__name__ + ".sdk")

# apps.connections.open errors that no retry can fix: the token is wrong, revoked, or not an app-level token.
REJECTED = frozenset({"invalid_auth", "not_authed", "account_inactive", "token_revoked", "token_expired",
                      "not_allowed_token_type", "missing_scope", "no_permission", "invalid_token"})
# What the SDK logs about connecting (ours says it once per change of state): kept below INFO.
_CONNECTING_FUNCTIONS = frozenset({"connect", "issue_new_wss_url", "monitor_current_session", "receive_messages",
                                   "disconnect", "connect_to_new_endpoint", "is_connected",
                                   "run_message_listeners"})


class _ConnectionChatter(logging.Filter):
    """Demote the SDK's connection messages (a traceback per failed attempt, "Reconnecting…") to DEBUG; messages
    about handling envelopes (a listener that failed) keep their level."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.funcName in _CONNECTING_FUNCTIONS and record.levelno > logging.DEBUG:
            if not sdk_log.isEnabledFor(logging.DEBUG):
                return False
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


sdk_log.addFilter(_ConnectionChatter())


class _OneAttemptClient(SocketModeClient):
    """slack_sdk's aiohttp SocketModeClient whose `connect()` tries once and raises on failure (see the module
    docstring); built with auto-reconnect off, so a dropped session is left to the supervisor."""

    async def connect(self) -> None:
        old = self.current_session
        if old is not None and not old.closed:
            with contextlib.suppress(Exception):
                await old.close()
        if self.aiohttp_client_session.closed:
            self.aiohttp_client_session = aiohttp.ClientSession()
        url, self.wss_uri = self.wss_uri or await self.issue_new_wss_url(), None  # a URL serves one connection
        session = await self.aiohttp_client_session.ws_connect(
            url, autoping=False, heartbeat=self.ping_interval, proxy=self.proxy,
            ssl=self.web_client.ssl if self.web_client.ssl is not None else True)
        self.current_session, self.stale, self.last_ping_pong_time = session, False, None
        await session.ping(f"sdk-ping-pong:{time.time()}".encode())
        for task in (self.current_session_monitor, self.message_receiver):
            if task is not None:
                task.cancel()
        self.current_session_monitor = asyncio.ensure_future(self.monitor_current_session())
        self.message_receiver = asyncio.ensure_future(self.receive_messages())


class _Handler(AsyncSocketModeHandler):
    """Bolt's Socket Mode handler (its `handle` runs the app for each envelope and acks it) on our client."""

    def __init__(self, app: AsyncApp, client: SocketModeClient):  # not super().__init__: it builds its own client
        self.app, self.app_token, self.client = app, client.app_token, client
        client.socket_mode_request_listeners.append(self.handle)


def _reason(exc: BaseException) -> str:
    """A failed attempt in a few words, for the log (no traceback: the cause is outside this process)."""
    if isinstance(exc, SlackApiError):
        return f"Slack answered {exc.response.get('error') or exc.response.status_code}"
    if isinstance(exc, aiohttp.WSServerHandshakeError):
        return f"the websocket handshake was refused (HTTP {exc.status})"
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return "no answer in time"
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class SocketModeSupervisor:
    """One Slack app's Socket Mode connection, kept up in the background (see the module docstring).

    `status` is "starting", "connected", "reconnecting" (the connection was just lost), "retrying" (not connected;
    the next attempt is scheduled), "off" (the token was rejected) or "stopped"."""

    FIRST_WAIT_S = 3.0  # start() returns after the first attempt, or after this long (serve allows an adapter 5 s)
    ATTEMPT_S = 30.0  # one attempt (apps.connections.open, then the handshake) at most
    BACKOFF_S = (1.0, 60.0)  # first retry after 1 s, doubling up to 60 s
    CHECK_S = 1.0  # how often a connected session is looked at

    def __init__(self, app: AsyncApp, app_token: str, *, ping_interval: float = 10.0, **timings: float):
        self.app, self.app_token, self.ping_interval = app, app_token, ping_interval
        for name, value in timings.items():  # tests shorten them
            setattr(self, name, value)
        self.status = "starting"
        self.client: _OneAttemptClient | None = None
        self._task: asyncio.Task | None = None
        self._settled = asyncio.Event()  # the first attempt is over (connected, retrying or off)

    async def start(self) -> str:
        """Start connecting; return the status after the first attempt, or "starting" after FIRST_WAIT_S."""
        self.client = _OneAttemptClient(app_token=self.app_token, logger=sdk_log, web_client=self.app.client,
                                        auto_reconnect_enabled=False, ping_interval=self.ping_interval)
        _Handler(self.app, self.client)
        self._task = asyncio.create_task(self._supervise(), name="slack-socket-mode")
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._settled.wait(), self.FIRST_WAIT_S)
        if self.status == "starting":
            log.warning("slack: Socket Mode is still connecting after %g s; serving meanwhile", self.FIRST_WAIT_S)
        return self.status

    async def stop(self) -> None:
        self.status = "stopped"
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        client = self.client
        if client is None:
            return
        client.closed = True
        try:
            await asyncio.wait_for(client.close(), 3)
        except Exception:  # a peer that never answers the close: drop the connection
            for task in (client.message_processor, client.current_session_monitor, client.message_receiver):
                if task is not None:
                    task.cancel()
        with contextlib.suppress(Exception):
            await client.aiohttp_client_session.close()

    # --- the supervising task ----------------------------------------------------------------------------------
    async def _supervise(self) -> None:
        client = self.client
        assert client is not None
        delay, failing_since, was_connected = self.BACKOFF_S[0], 0.0, False
        while True:
            try:
                async with client.connect_operation_lock:  # the SDK's own refresh (a "disconnect" message) holds it
                    if not await client.is_connected():
                        await asyncio.wait_for(client.connect(), self.ATTEMPT_S)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if isinstance(exc, SlackApiError) and exc.response.get("error") in REJECTED:
                    log.error("slack: Slack rejected SLACK_APP_TOKEN (%s): Socket Mode is off and no Slack events "
                              "will arrive; set an app-level token (xapp-…) with connections:write and restart "
                              "(docs/slack.md)", exc.response.get("error"))
                    self.status = "off"
                    self._settled.set()
                    with contextlib.suppress(Exception):
                        await client.close()
                    return
                if self.status != "retrying":
                    failing_since = failing_since or time.monotonic()
                    log.warning("slack: Socket Mode cannot connect (%s); retrying in the background, backing off up "
                                "to %g s", _reason(exc), self.BACKOFF_S[1])
                    self.status = "retrying"
                else:
                    log.debug("slack: Socket Mode attempt failed (%s); next in %.1f s", _reason(exc), delay)
                self._settled.set()
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, self.BACKOFF_S[1])
                continue
            if self.status != "connected":
                if was_connected:
                    log.info("slack: Socket Mode connected again (after %.0f s)", time.monotonic() - failing_since)
                elif failing_since:
                    log.info("slack: Socket Mode connected (after %.0f s of retrying)",
                             time.monotonic() - failing_since)
                else:
                    log.info("slack: Socket Mode connected")
            self.status, was_connected, delay, failing_since = "connected", True, self.BACKOFF_S[0], 0.0
            self._settled.set()
            await self._until_lost(client)
            failing_since = time.monotonic()
            log.warning("slack: Socket Mode connection lost; reconnecting in the background")
            self.status = "reconnecting"

    async def _until_lost(self, client: _OneAttemptClient) -> None:
        """Return once the session is gone (closed, or its pings unanswered) and no SDK refresh brought it back."""
        while True:
            await asyncio.sleep(self.CHECK_S)
            if await client.is_connected():
                continue
            async with client.connect_operation_lock:  # an SDK refresh under way: wait for its outcome
                if not await client.is_connected():
                    return
