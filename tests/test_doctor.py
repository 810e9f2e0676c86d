"""`autocode doctor` asks the LLM endpoint for real, and `autocode serve` logs the same check at start.

The real CLI runs as a subprocess against the fake OpenAI server over HTTP, in each of the server's modes that
matter to a new user: structured output accepted, json_schema rejected, no structured output, no /models, a rejected
key, an unknown model, and a server that accepts connections but never answers. Each case checks the verdict, the
exit code, what was really sent, and that the check ended within its bound.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from agent_core.config import Settings
from agent_core.llm_probe import PROBE_TIMEOUT_S, probe_timeout
from tests.fakes.openai_server import FakeOpenAI
from tests.server_helpers import Serve, free_port, serve_env, wait_for

KEY = "sk-doctor-secret-key-7f3a9c"
OK_REPLY = {"json": {"ok": True}}
# The doctor also starts one sandbox; the LLM part is bounded by its timeout on top of that.
SANDBOX_ALLOWANCE_S = 20


@pytest.fixture
def llm():
    with FakeOpenAI() as server:
        server.responder(lambda body: OK_REPLY)
        yield server


@pytest.fixture
def doctor(tmp_path, llm):
    """doctor(*flags, env=...) -> (CompletedProcess, seconds it took); --json output is parsed into .report."""

    def run(*flags: str, env: dict[str, str] | None = None):
        environ = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "AUTOCODE_"))}
        environ.update(AUTOCODE_DB=str(tmp_path / "doctor.db"), AUTOCODE_LLM_MAX_RETRIES="3",
                       OPENAI_BASE_URL=llm.base_url, OPENAI_API_KEY=KEY, AUTOCODE_MODEL="fake-model")
        environ.update(env or {})
        started = time.monotonic()
        proc = subprocess.run([sys.executable, "-P", "-m", "agent_core.cli", "doctor", *flags], cwd=tmp_path,
                              env=environ, capture_output=True, text=True, timeout=120)
        elapsed = time.monotonic() - started
        assert "Traceback" not in proc.stderr, proc.stderr
        assert KEY not in proc.stdout + proc.stderr and KEY[-4:] not in proc.stdout + proc.stderr
        proc.report = json.loads(proc.stdout)["llm"] if "--json" in flags else None
        return proc, elapsed

    return run


def both(doctor, env: dict[str, str] | None = None):
    """The text and the --json doctor, each checked to exit alike; returns (text proc, json llm report)."""
    text, _ = doctor(env=env)
    as_json, _ = doctor("--json", env=env)
    assert text.returncode == as_json.returncode, (text.stdout, as_json.stdout)
    return text, as_json.report


def chat_formats(llm: FakeOpenAI) -> list[tuple[str | None, int]]:
    """The response_format types of the chat requests, in order, and the statuses they were answered with."""
    chats = [r for r in llm.requests if r.path == "/v1/chat/completions"]
    return [((r.body or {}).get("response_format") or {}).get("type") for r in chats], [r.response_status for r in chats]


def test_json_schema_accepted(doctor, llm):
    text, report = both(doctor)

    assert text.returncode == 0, text.stdout + text.stderr
    assert "LLM check: ok" in text.stdout
    assert "+ model fake-model is listed by the server" in text.stdout
    assert "+ structured output: json_schema" in text.stdout
    assert "Sandbox check: ok" in text.stdout
    assert (report["verdict"], report["ok"], report["structured_output"], report["model_listed"]) == (
        "ok", True, "json_schema", True)
    assert report["base_url"] == llm.base_url and report["problem"] is None and report["notes"] == []
    assert isinstance(report["latency_ms"], int) and isinstance(report["request_ms"], int)
    # What really went out, twice (text, then --json): GET /models, then one strict json_schema request.
    assert [(r.path, r.response_status) for r in llm.requests] == [("/v1/models", 200), ("/v1/chat/completions", 200)] * 2
    first = llm.chat_requests()[0]
    assert first["model"] == "fake-model" and first["response_format"]["json_schema"]["strict"] is True
    assert llm.requests[0].headers["authorization"] == f"Bearer {KEY}"


def test_json_schema_rejected_with_400_falls_back_to_json_object(doctor, llm):
    llm.reject_response_format("json_schema")

    text, report = both(doctor)

    assert text.returncode == 0, text.stdout
    assert "+ structured output: json_object" in text.stdout and "LLM check: ok" in text.stdout
    assert report["verdict"] == "ok" and report["structured_output"] == "json_object"
    assert any("json_schema" in note and "400" in note for note in report["notes"]), report["notes"]
    assert chat_formats(llm) == (["json_schema", "json_object"] * 2, [400, 200] * 2)


def test_no_structured_output_says_autocode_falls_back_to_text(doctor, llm):
    llm.reject_response_format("json_schema", "json_object")

    text, report = both(doctor)

    assert text.returncode == 1
    assert "LLM check: FAILED" in text.stdout and "plain text" in text.stdout
    assert (report["verdict"], report["structured_output"]) == ("no_structured_output", "text")
    assert "fall back to plain text" in report["problem"]
    assert chat_formats(llm) == (["json_schema", "json_object", None] * 2, [400, 400, 200] * 2)


def test_a_server_without_models_is_not_fatal(doctor, llm):
    llm.without_models_endpoint()

    text, report = both(doctor)

    assert text.returncode == 0, text.stdout
    assert "model name could not be checked" in text.stdout and "LLM check: ok" in text.stdout
    assert (report["verdict"], report["model_listed"], report["structured_output"]) == ("ok", None, "json_schema")
    assert isinstance(report["latency_ms"], int)  # timed by the chat request then
    assert [r.response_status for r in llm.requests if r.path == "/v1/models"] == [404, 404]


def test_a_rejected_key_is_named_and_never_printed(doctor, llm):
    llm.require_api_key("sk-the-one-the-server-wants")  # its 401 quotes the key it was sent

    text, report = both(doctor)

    assert text.returncode == 1
    assert "rejected the API key (HTTP 401" in text.stdout and "OPENAI_API_KEY" in text.stdout
    assert report["verdict"] == "auth" and llm.base_url in report["problem"]
    assert [r.path for r in llm.requests] == ["/v1/models"] * 2  # stops at the first refusal
    assert KEY in json.loads(llm.requests[0].response_body)["error"]["message"]  # the fake did quote it
    # (the fixture checks that neither the key nor its last four characters reached stdout or stderr)


def test_a_key_without_access_to_the_model(doctor, llm):
    llm.error(403, f"Project does not have access to model fake-model (key {KEY[:6]}...{KEY[-4:]})")

    proc, _ = doctor("--json")

    assert proc.returncode == 1
    assert proc.report["verdict"] == "auth" and "HTTP 403" in proc.report["problem"]


def test_an_unknown_model_lists_what_the_server_has(doctor, llm):
    llm.serve_models("llama3.2:3b", "qwen2.5-coder:7b", *(f"extra-{i:02d}" for i in range(10)))

    text, report = both(doctor)

    assert text.returncode == 1
    assert "no model 'fake-model' (AUTOCODE_MODEL)" in text.stdout
    assert "llama3.2:3b, qwen2.5-coder:7b" in text.stdout and "and 4 more" in text.stdout
    assert (report["verdict"], report["model_listed"], report["model_count"]) == ("unknown_model", False, 12)
    assert report["models"][:2] == ["llama3.2:3b", "qwen2.5-coder:7b"] and len(report["models"]) == 8
    # The server was asked, and said no: a listing alone does not fail the check.
    assert [r.response_status for r in llm.requests if r.path == "/v1/chat/completions"] == [404, 404]


def test_a_model_the_server_answers_for_without_listing_it(doctor, llm):
    # llama.cpp's llama-server lists its model file and answers whatever model name a request carries.
    llm.serve_models("models/qwen2.5-0.5b-instruct-q4_k_m.gguf", reject_others=False)

    proc, _ = doctor("--json")

    assert proc.returncode == 0, proc.stdout
    assert (proc.report["verdict"], proc.report["model_listed"]) == ("ok", False)
    assert any("does not list fake-model" in note for note in proc.report["notes"])


def test_an_ollama_model_without_its_tag_is_listed(doctor, llm):
    llm.serve_models("qwen2.5-coder:latest", reject_others=False)

    proc, _ = doctor("--json", env={"AUTOCODE_MODEL": "qwen2.5-coder"})

    assert proc.returncode == 0 and proc.report["model_listed"] is True


def test_unreachable_endpoints_name_the_url_and_the_cause(doctor):
    closed = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    proc, _ = doctor("--json", env={"OPENAI_BASE_URL": closed})
    assert proc.returncode == 1
    assert proc.report["verdict"] == "unreachable"
    assert closed in proc.report["problem"] and "connection refused" in proc.report["problem"]

    nowhere = "http://autocode-doctor-test.invalid/v1"
    text, elapsed = doctor(env={"OPENAI_BASE_URL": nowhere})
    assert text.returncode == 1
    assert f"could not reach the LLM at {nowhere}" in text.stdout and "does not resolve" in text.stdout


def test_a_server_that_never_answers_ends_within_the_timeout(doctor):
    # Accepts connections (the kernel completes the handshake on a listening socket) and never replies.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/v1"

        proc, elapsed = doctor("--json", env={"OPENAI_BASE_URL": url, "AUTOCODE_LLM_TIMEOUT": "2"})

    assert proc.returncode == 1
    assert proc.report["verdict"] == "timeout"
    assert url in proc.report["problem"] and "did not answer GET /models within 2s" in proc.report["problem"]
    assert elapsed < 2 + SANDBOX_ALLOWANCE_S  # one request, no retries (AUTOCODE_LLM_MAX_RETRIES is 3 here)


def test_a_server_that_lists_models_but_never_answers_a_chat_request(doctor, llm):
    llm.responder(lambda body: {**OK_REPLY, "delay": 60})

    proc, elapsed = doctor("--json", env={"AUTOCODE_LLM_TIMEOUT": "2"})

    assert proc.returncode == 1
    assert proc.report["verdict"] == "timeout" and "a tiny chat request within 2s" in proc.report["problem"]
    assert proc.report["model_listed"] is True and proc.report["structured_output"] is None
    assert len(llm.chat_requests()) == 1  # not retried, and no other format tried: it was not a rejection
    assert elapsed < 2 + SANDBOX_ALLOWANCE_S


def test_the_probe_waits_at_most_ten_seconds_per_request():
    assert PROBE_TIMEOUT_S == 10
    assert probe_timeout(Settings(llm_timeout=120)) == 10 and probe_timeout(Settings(llm_timeout=3)) == 3


def test_no_llm_configured_is_a_failed_check(doctor):
    proc, _ = doctor("--json", env={"OPENAI_BASE_URL": "", "OPENAI_API_KEY": ""})
    assert proc.returncode == 1 and proc.report["verdict"] == "not_configured"


# ------------------------------------------------------------------------------------------ serve


def _serve(tmp_path, llm: FakeOpenAI, **env: str) -> Serve:
    environ = serve_env(llm, tmp_path / "autocode.db", AUTOCODE_LLM_STARTUP_CHECK="on", AUTOCODE_SANDBOX_WARM="0",
                        **env)
    return Serve(environ, tmp_path / "serve.log", tmp_path)


def test_serve_logs_the_llm_check_and_that_no_chat_adapter_is_on(tmp_path, llm):
    server = _serve(tmp_path, llm)
    try:
        server.wait_ready()
        line = wait_for(lambda: [l for l in server.log_tail(20000).splitlines() if "LLM check" in l], 20,
                        what="the LLM check in serve's log")[0]
        log = server.log_tail(20000)
    finally:
        server.close()
    assert line.startswith("INFO agent_core.server: LLM check ok: ")
    assert f"{llm.base_url}, model fake-model (listed): answers in " in line and "structured output json_schema" in line
    assert "WARNING bots: no SLACK_BOT_TOKEN or TELEGRAM_BOT_TOKEN: serve only answers the internal API" in log
    assert "autocode serve ready" in log
    assert KEY not in log and "sk-serve-test" not in log


def test_serve_is_ready_before_a_silent_llm_answers_and_then_warns(tmp_path, llm):
    llm.responder(lambda body: {**OK_REPLY, "delay": 60})  # /models answers, the chat request never does
    server = _serve(tmp_path, llm, AUTOCODE_LLM_TIMEOUT="12")  # readiness, even on a busy machine, comes sooner
    try:
        server.wait_ready()
        assert "LLM check" not in server.log_tail(20000)  # readiness did not wait for the check
        line = wait_for(lambda: [l for l in server.log_tail(20000).splitlines() if "LLM check" in l], 30,
                        what="the LLM check's warning")[0]
        health = server.http.get("/healthz")
    finally:
        server.close()
    assert line.startswith("WARNING agent_core.server: LLM check FAILED: ")
    assert "did not answer a tiny chat request within 10s" in line  # the probe waits 10 s at most
    assert health.status_code == 200  # still serving
