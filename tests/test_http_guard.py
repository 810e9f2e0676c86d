"""Hostile request bodies against a real `autocode serve` with the Slack adapter on (issue 21 item 7), over raw
sockets and httpx: a body over its cap is refused before it is read (413, serve's memory does not grow), a
malformed one gets 400/401 as JSON without a traceback, one that trickles in is cut off (408), and every API error
is a JSON sentence."""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from pathlib import Path

import pytest
from slack_sdk.signature import SignatureVerifier

from tests.fakes.slack_server import FakeSlack
from tests.server_helpers import ScriptedLLM, Serve, serve_env

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the server's sandbox needs Linux")

SECRET = "guard-signing-secret"
TOKEN = "xoxb-guard-token"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    directory = tmp_path_factory.mktemp("guard-serve")
    with FakeSlack() as slack, ScriptedLLM() as llm:
        serve = Serve(serve_env(llm, directory / "autocode.db", SLACK_BOT_TOKEN=TOKEN, SLACK_SIGNING_SECRET=SECRET,
                                SLACK_API_URL=slack.api_url, AUTOCODE_BODY_TIMEOUT="1"),
                      directory / "serve.log", directory)
        try:
            serve.wait_ready()
            yield serve
        finally:
            serve.close()


def vm_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(field)


def raw_post(server: Serve, path: str, headers: dict[str, str], body_chunks, timeout: float = 30,
             pause: float = 0.0) -> tuple[int, dict, float]:
    """POST over a raw socket, sending the body from a thread (it may be cut off by the server's answer); returns
    (status, JSON body, seconds until the answer)."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=timeout)
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    sock.sendall((head + "\r\n").encode())
    started = time.monotonic()

    def send_body() -> None:
        try:
            for chunk in body_chunks:
                sock.sendall(chunk)
                if pause:
                    time.sleep(pause)
        except OSError:
            pass  # the server answered and closed: the rest is not wanted

    sender = threading.Thread(target=send_body, daemon=True)
    sender.start()
    received = b""
    try:
        while b"\r\n\r\n" not in received or len(received.split(b"\r\n\r\n", 1)[1]) < _length(received):
            data = sock.recv(65536)
            if not data:
                break
            received += data
    finally:
        took = time.monotonic() - started
        sock.close()
    head_bytes, _, body = received.partition(b"\r\n\r\n")
    status = int(head_bytes.split(b" ", 2)[1])
    return status, json.loads(body), took


def _length(received: bytes) -> int:
    head = received.split(b"\r\n\r\n", 1)[0].decode("latin-1").lower()
    for line in head.split("\r\n"):
        if line.startswith("content-length:"):
            return int(line.split(":", 1)[1])
    return 1 << 30


def test_a_10_mb_unsigned_slack_post_is_refused_before_it_is_read(server):
    server.http.post("/slack/events", content=b"{}")  # warm-up: the route's imports are in the baseline
    before = vm_kb(server.pid, "VmHWM")
    ten_mb = 10 * 1024 * 1024
    chunks = (b"x" * 65536 for _ in range(ten_mb // 65536))

    status, body, took = raw_post(server, "/slack/events", {"Content-Type": "application/json",
                                                            "Content-Length": str(ten_mb)}, chunks)
    assert status == 413 and "too large" in body["error"], body
    assert took < 2, f"the refusal took {took:.1f}s"

    # Without a declared length (chunked), it is cut off at the cap as it arrives.
    chunk = b"x" * 65536
    framed = (b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(ten_mb // len(chunk)))
    status, body, took = raw_post(server, "/slack/events", {"Content-Type": "application/json",
                                                            "Transfer-Encoding": "chunked"}, framed)
    assert status == 413 and "over 1 MB" in body["error"], body
    grown = (vm_kb(server.pid, "VmHWM") - before) / 1024
    assert grown < 8, f"serve's peak RSS grew by {grown:.0f} MB for two 10 MB bodies"

    # Over the JSON API's cap too, and the Telegram webhook's (capped before routing: whatever serves it).
    big = server.http.post("/api/runs", json={"task": "x" * (2 << 20)})
    assert big.status_code == 413 and "too large" in big.json()["error"]
    status, body, took = raw_post(server, "/telegram/webhook", {"Content-Type": "application/json",
                                                                "Content-Length": str(ten_mb)}, iter(()))
    assert status == 413 and "over 1 MB" in body["error"], body


def test_malformed_bodies_get_400_or_401_as_json_without_a_traceback(server):
    unsigned = server.http.post("/slack/events", content=b"{not json", headers={"Content-Type": "application/json"})
    assert unsigned.status_code == 401, unsigned.text
    body = b"{not json"
    stamp = str(int(time.time()))
    signed = server.http.post("/slack/events", content=body, headers={
        "Content-Type": "application/json", "X-Slack-Request-Timestamp": stamp,
        "X-Slack-Signature": SignatureVerifier(SECRET).generate_signature(timestamp=stamp, body=body)})
    assert signed.status_code in (400, 401), signed.text

    for path in ("/api/runs", "/api/settings?scope=api", "/api/runs/nope/approvals/1"):
        answer = server.http.post(path, content=b"{not json", headers={"Content-Type": "application/json"})
        assert answer.status_code in (400, 404), (path, answer.text)
        assert isinstance(answer.json()["error"], str), (path, answer.text)
    for method, path in (("GET", "/api/nothing-here"), ("GET", "/api/runs"), ("DELETE", "/api/runs/x")):
        answer = server.http.request(method, path)
        assert answer.status_code in (404, 405) and answer.json()["error"], (method, path, answer.text)
    assert "Traceback" not in server.log_tail(10**6)


def test_a_body_that_trickles_in_is_cut_off(server):
    trickle = (b"x" for _ in range(100))  # one byte every 0.5 s: 50 s for the whole body
    status, body, took = raw_post(server, "/api/runs", {"Content-Type": "application/json",
                                                        "Content-Length": "100"}, trickle, pause=0.5)
    assert status == 408 and "too slowly" in body["error"], body
    assert took < 6, f"the slow body held the connection for {took:.1f}s"

    stalled = (b"{" for _ in range(1))  # one byte, then nothing (a held connection)
    status, body, took = raw_post(server, "/slack/events", {"Content-Type": "application/json",
                                                            "Content-Length": "1000"}, stalled)
    assert status == 408, body
    assert took < 4, took
    assert "Traceback" not in server.log_tail(10**6)
