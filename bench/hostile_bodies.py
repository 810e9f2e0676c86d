"""Hostile request bodies against a real `autocode serve` with the Slack adapter on (issue 21 item 7): one unsigned
POST of SIZE MB to /slack/events, with its length declared and then chunked, and what serve's memory and the answer
time do. Run from a checkout: `python bench/hostile_bodies.py [--mb 600]`; set PYTHONPATH to compare checkouts."""

from __future__ import annotations

import argparse
import socket
import sys
import threading
import time
from pathlib import Path
from tempfile import TemporaryDirectory

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.fakes.slack_server import FakeSlack  # noqa: E402
from tests.server_helpers import ScriptedLLM, Serve, serve_env  # noqa: E402


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def post(port: int, size: int, chunked: bool) -> tuple[str, float]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=600)
    length = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {size}"
    sock.sendall(f"POST /slack/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{length}\r\n\r\n"
                 .encode())
    started = time.monotonic()
    chunk = b"x" * (1 << 20)

    def send() -> None:
        try:
            for _ in range(size // len(chunk)):
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
            if chunked:
                sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass

    threading.Thread(target=send, daemon=True).start()
    answer = b""
    while b"\r\n" not in answer:
        data = sock.recv(4096)
        if not data:
            break
        answer += data
    took = time.monotonic() - started
    sock.close()
    return answer.split(b"\r\n", 1)[0].decode(errors="replace"), took


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=600)
    args = parser.parse_args()
    with TemporaryDirectory() as directory, FakeSlack() as slack, ScriptedLLM() as llm:
        serve = Serve(serve_env(llm, Path(directory) / "autocode.db", SLACK_BOT_TOKEN="xoxb-bench",
                                SLACK_SIGNING_SECRET="bench-secret", SLACK_API_URL=slack.api_url),
                      Path(directory) / "serve.log", Path(directory))
        try:
            serve.wait_ready()
            serve.http.post("/slack/events", content=b"{}")
            print(f"serve RSS at rest: {rss_mb(serve.pid):.0f} MB")
            for chunked in (False, True):
                status, took = post(serve.port, args.mb << 20, chunked)
                time.sleep(0.5)
                print(f"{args.mb} MB unsigned, {'chunked' if chunked else 'length declared'}: {status!r} after "
                      f"{took:.2f} s; serve RSS {rss_mb(serve.pid):.0f} MB, peak {rss_mb(serve.pid, 'VmHWM'):.0f} MB")
            print("tracebacks in serve's log:", serve.log_tail(10**7).count("Traceback"))
        finally:
            serve.close()


if __name__ == "__main__":
    main()
