"""Slack Socket Mode that cannot connect must not hang serve (issue 21, item 6).

The real slack_sdk Socket Mode client (as slack_bolt's AsyncSocketModeHandler builds it, under
bots/slack_socket.py's supervisor) and a real Bolt AsyncApp talk over real HTTP to the fake Web API
(tests/fakes/slack_server.py: `apps.connections.open`) and over real websockets to a fake Socket Mode endpoint
(tests/fakes/slack_socket_server.py) that accepts, refuses or drops connections; a closed port stands for an
unreachable one. Then the same through `autocode serve` as a subprocess: its HTTP is up whatever Slack does, the log
says each change once, and SIGTERM ends it promptly.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from pathlib import Path

import pytest
from slack_bolt.async_app import AsyncApp
from slack_sdk.web.async_client import AsyncWebClient

from bots.slack_socket import SocketModeSupervisor
from tests.fakes.slack_server import APP_TOKEN, FakeSlack
from tests.fakes.slack_socket_server import FakeSocket
from tests.server_helpers import ScriptedLLM, Serve, free_port, serve_env, wait_for

BOT_TOKEN = "xoxb-socket-test"
FAST = dict(FIRST_WAIT_S=3.0, BACKOFF_S=(0.1, 0.4), CHECK_S=0.1)


@pytest.fixture
def slack():
    with FakeSlack(strict=False) as fake:
        yield fake


@pytest.fixture
def socket():
    with FakeSocket() as fake:
        yield fake


def bolt_app(slack: FakeSlack, seen: list[str]) -> AsyncApp:
    app = AsyncApp(client=AsyncWebClient(token=BOT_TOKEN, base_url=slack.api_url),
                   request_verification_enabled=False, process_before_response=True)

    @app.event("app_mention")
    async def mention(event, ack=None):  # noqa: ARG001
        seen.append(event["text"])

    return app


def lines(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if text in r.getMessage() and r.levelno >= logging.INFO]


def mention_envelope(envelope_id: str, text: str) -> dict:
    return {"envelope_id": envelope_id, "type": "events_api", "accepts_response_payload": False,
            "retry_attempt": 0, "retry_reason": "",
            "payload": {"token": "x", "team_id": "T0FAKE", "api_app_id": "AFAKE", "type": "event_callback",
                        "event_id": f"Ev{envelope_id}", "event_time": int(time.time()),
                        "event": {"type": "app_mention", "user": "U1", "text": text, "ts": f"{time.time():.6f}",
                                  "channel": "C1", "event_ts": f"{time.time():.6f}"}}}


async def test_a_rejected_app_token_is_one_line_and_socket_mode_off(slack, caplog):
    caplog.set_level(logging.DEBUG, logger="bots.slack_socket")
    caplog.set_level(logging.INFO, logger="bots.slack_socket.sdk")
    supervisor = SocketModeSupervisor(bolt_app(slack, []), "xapp-1-wrong", **FAST)
    started = time.monotonic()
    assert await supervisor.start() == "off"
    assert time.monotonic() - started < 3
    await asyncio.sleep(1)  # no retry follows
    await supervisor.stop()
    assert slack.socket_opens == 1
    rejected = lines(caplog, "SLACK_APP_TOKEN")
    assert len(rejected) == 1 and "invalid_auth" in rejected[0].getMessage() and "off" in rejected[0].getMessage()
    assert rejected[0].levelno == logging.ERROR
    assert not [r for r in caplog.records if r.exc_info and r.levelno > logging.DEBUG]  # no traceback
    assert "xapp-1-wrong" not in caplog.text


async def test_connects_handles_envelopes_and_comes_back_after_a_drop(slack, socket, caplog):
    caplog.set_level(logging.DEBUG, logger="bots.slack_socket")
    caplog.set_level(logging.INFO, logger="bots.slack_socket.sdk")
    slack.socket_url = socket.url
    seen: list[str] = []
    supervisor = SocketModeSupervisor(bolt_app(slack, seen), APP_TOKEN, **FAST)
    try:
        assert await supervisor.start() == "connected"
        socket.push(mention_envelope("E1", "hello"))
        await until(lambda: "E1" in socket.acks() and seen == ["hello"], "the envelope acked and handled")
        socket.drop()
        await until(lambda: socket.connections == 2 and supervisor.status == "connected", "a reconnect")
        socket.push(mention_envelope("E2", "again"))
        await until(lambda: "E2" in socket.acks() and seen == ["hello", "again"], "the second envelope")
        # Slack's routine refresh: the SDK itself moves to a fresh URL; nothing was lost, nothing is logged.
        socket.push({"type": "disconnect", "reason": "refresh_requested", "debug_info": {"host": "fake"}})
        await until(lambda: socket.connections == 3 and socket.open_connections == 1, "the refreshed connection")
        await asyncio.sleep(0.5)
        assert supervisor.status == "connected"
        socket.push(mention_envelope("E3", "after the refresh"))
        await until(lambda: "E3" in socket.acks(), "an envelope on the refreshed connection")
    finally:
        await supervisor.stop()
    assert len(lines(caplog, "Socket Mode connected")) == 2  # connected, connected again
    assert len(lines(caplog, "connected again")) == 1
    assert len(lines(caplog, "connection lost")) == 1
    assert slack.socket_opens == 3  # a fresh URL for each connection


async def test_an_unreachable_endpoint_is_retried_quietly_with_backoff(slack, socket, caplog):
    caplog.set_level(logging.DEBUG, logger="bots.slack_socket")
    caplog.set_level(logging.INFO, logger="bots.slack_socket.sdk")
    slack.socket_url = f"ws://127.0.0.1:{free_port()}/link"  # nothing listens there
    supervisor = SocketModeSupervisor(bolt_app(slack, []), APP_TOKEN, **FAST)
    try:
        assert await supervisor.start() == "retrying"
        await until(lambda: slack.socket_opens >= 5, "five attempts")
        socket.refusing = True  # now a server that refuses the handshake
        slack.socket_url = socket.url
        await until(lambda: socket.refused >= 2, "refused handshakes")
        socket.refusing = False
        await until(lambda: supervisor.status == "connected", "the connection once the endpoint answers")
        socket.refusing = True
        socket.drop()
        await until(lambda: socket.refused >= 4, "refused reconnections")
        assert supervisor.status == "retrying"
    finally:
        stopping = time.monotonic()
        await supervisor.stop()
        assert time.monotonic() - stopping < 3
    cannot = lines(caplog, "cannot connect")
    # one line when it started failing, one after the connection was lost: not one per attempt
    assert len(cannot) == 2 and all(r.levelno == logging.WARNING for r in cannot), [r.getMessage() for r in cannot]
    assert "ConnectionRefused" in cannot[0].getMessage() or "Cannot connect" in cannot[0].getMessage()
    assert "HTTP 503" in cannot[1].getMessage()
    (connected,) = lines(caplog, "Socket Mode connected")
    message = connected.getMessage()
    assert message.startswith("slack: Socket Mode connected (after ") and "of retrying" in message
    assert len(lines(caplog, "connection lost")) == 1 and not lines(caplog, "connected again")
    assert not [r for r in caplog.records if r.exc_info and r.levelno > logging.DEBUG]


async def test_stop_while_the_first_attempt_hangs(slack, caplog):
    """An endpoint that accepts TCP and never answers the handshake: start returns after its bound, stop is quick."""
    import socket as sockets

    listener = sockets.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    try:
        slack.socket_url = f"ws://127.0.0.1:{listener.getsockname()[1]}/link"
        supervisor = SocketModeSupervisor(bolt_app(slack, []), APP_TOKEN, **{**FAST, "FIRST_WAIT_S": 0.5})
        started = time.monotonic()
        assert await supervisor.start() == "starting"
        assert time.monotonic() - started < 2
        stopping = time.monotonic()
        await supervisor.stop()
        assert time.monotonic() - stopping < 2
    finally:
        listener.close()


async def until(predicate, what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


# ------------------------------------------------------------------------------------------ through serve


@pytest.fixture(scope="module")
def llm():
    with ScriptedLLM() as fake:
        yield fake


def socket_serve(slack: FakeSlack, llm: ScriptedLLM, directory: Path, app_token: str, **env: str) -> Serve:
    return Serve(serve_env(llm, directory / "autocode.db", SLACK_BOT_TOKEN=BOT_TOKEN, SLACK_APP_TOKEN=app_token,
                           SLACK_API_URL=slack.api_url, **env), directory / "serve.log", directory)


def stops_promptly(serve: Serve, within: float = 8) -> None:
    started = time.monotonic()
    serve.proc.send_signal(signal.SIGTERM)
    serve.proc.wait(timeout=within + 5)
    assert time.monotonic() - started < within, f"SIGTERM took {time.monotonic() - started:.1f}s"


@pytest.mark.parametrize("case", ["rejected", "unreachable", "hanging"])
def test_serve_comes_up_and_stops_whatever_socket_mode_does(case, slack, llm, tmp_path):
    import socket as sockets

    listener = sockets.socket()  # accepts TCP, never answers: a handshake that hangs
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    slack.socket_url = (f"ws://127.0.0.1:{listener.getsockname()[1]}/link" if case == "hanging"
                        else f"ws://127.0.0.1:{free_port()}/link")
    serve = socket_serve(slack, llm, tmp_path, "xapp-1-wrong" if case == "rejected" else APP_TOKEN)
    try:
        started = time.monotonic()
        health = serve.wait_ready(timeout=30)
        assert health["status"] == "ok" and time.monotonic() - started < 20
        run_id = serve.submit_ok("job tag=UP")  # the API works meanwhile
        assert serve.wait_status(run_id)["status"] == "succeeded"
        if case == "unreachable":
            wait_for(lambda: slack.socket_opens >= 3, 20, what="retries in the background")
        wait_for(lambda: "autocode serve ready" in serve.log_tail(10**6), 10, what="the ready line")
        stops_promptly(serve)
    finally:
        serve.close()
        listener.close()
    log = serve.log_tail(10**6)
    ready = [line for line in log.splitlines() if "autocode serve ready" in line][0]
    assert "Traceback" not in log and "xapp-1-wrong" not in log and BOT_TOKEN not in log
    if case == "rejected":
        assert log.count("Slack rejected SLACK_APP_TOKEN (invalid_auth)") == 1
        assert "adapters: none; off: slack" in ready
        assert slack.socket_opens == 1
    elif case == "unreachable":
        assert log.count("Socket Mode cannot connect") == 1, log
        assert "slack (connecting in the background)" in ready
    else:
        assert "still connecting" in log and "slack (connecting in the background)" in ready


def test_serve_with_socket_mode_connected_names_slack_ready(slack, socket, llm, tmp_path):
    slack.socket_url = socket.url
    serve = socket_serve(slack, llm, tmp_path, APP_TOKEN)
    try:
        serve.wait_ready(timeout=30)
        socket.wait_connections(1)
        wait_for(lambda: "autocode serve ready" in serve.log_tail(10**6), 10, what="the ready line")
        socket.drop()
        socket.wait_connections(2)
        wait_for(lambda: "connected again" in serve.log_tail(10**6), 10, what="the reconnection line")
        stops_promptly(serve)
    finally:
        serve.close()
    log = serve.log_tail(10**6)
    assert "adapters: slack)" in log and log.count("Socket Mode connected") == 2 and "Traceback" not in log


def test_sigterm_during_start_up_with_a_hanging_websocket(slack, llm, tmp_path):
    """SIGTERM while serve's start-up waits on Slack (a websocket handshake nobody answers): serve ends promptly."""
    import socket as sockets

    listener = sockets.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    slack.socket_url = f"ws://127.0.0.1:{listener.getsockname()[1]}/link"
    serve = socket_serve(slack, llm, tmp_path, APP_TOKEN)
    try:
        wait_for(lambda: "Waiting for application startup" in serve.log_tail(10**6), 30, what="the start-up")
        wait_for(lambda: slack.socket_opens >= 1, 10, what="the first Socket Mode attempt")
        stops_promptly(serve, within=12)
    finally:
        serve.close()
        listener.close()
    assert "Traceback" not in serve.log_tail(10**6)
