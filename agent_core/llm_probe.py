"""A real check of the configured LLM endpoint, for `autocode doctor` and `autocode serve`'s start-up log.

Three questions, each answered by the server itself rather than by the configuration:
- is it reachable, and how fast does it answer (GET /models);
- does it know `AUTOCODE_MODEL` (the ids /models lists; a server without /models cannot be asked, which is said);
- which structured-output mode it accepts: one tiny chat request per mode in `agent_core.llm.FORMATS` order
  (json_schema, then json_object, then plain text), each moving on only on HTTP 400, exactly as `LLMClient` does,
  so the mode reported is the one runs will use.

Every request is bounded (at most `PROBE_TIMEOUT_S`, or `AUTOCODE_LLM_TIMEOUT` when that is shorter) and never
retried, so a server that accepts connections and never answers costs one timeout, not minutes. The API key is
never part of the result: server messages are included only with the key cut out.
"""

from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Awaitable, Literal, TypeVar

import openai
from pydantic import BaseModel

from agent_core.config import Settings
from agent_core.llm import FORMATS, build_client, response_format_for
from agent_core.plan import ReplyError, parse_reply
from agent_core.terminal import safe_for_terminal

PROBE_TIMEOUT_S = 10.0
MODELS_SHOWN = 8  # model ids named when the configured one is missing

Verdict = Literal["ok", "not_configured", "unreachable", "timeout", "auth", "unknown_model", "not_found",
                  "no_structured_output", "error"]
T = TypeVar("T")

PROBE_REPLY_CAP = 200  # tokens: the probe's reply is one tiny object
_SCHEMA_NAME = "autocode_check"
_SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
           "additionalProperties": False}
_SHAPE_HINT = 'Reply with exactly this JSON object and nothing else: {"ok": true}'
_MESSAGES = [{"role": "system", "content": "You are a health check. Answer in JSON."},
             {"role": "user", "content": 'Reply with the JSON object {"ok": true}.'}]


class _Check(BaseModel):
    ok: bool


@dataclass(frozen=True)
class ProbeResult:
    """What the endpoint answered. `problem` says, in one sentence for the operator, why AutoCode would not work
    with it (None when it would); `notes` are facts worth knowing that do not stop it."""

    base_url: str
    model: str
    verdict: Verdict
    problem: str | None = None
    latency_ms: int | None = None  # the first answer of the server (GET /models), None when nothing answered
    model_listed: bool | None = None  # None: not checked (no /models, or it failed)
    models: tuple[str, ...] = ()  # the first MODELS_SHOWN ids the server lists
    model_count: int = 0
    structured_output: str | None = None  # the mode runs will use; None when no chat request was answered
    request_ms: int | None = None  # the chat request that was accepted
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return self.verdict == "ok"

    def summary(self) -> str:
        """One line: endpoint, model, latency and mode, or the problem."""
        where = f"{self.base_url}, model {self.model}"
        if not self.ok:
            return f"{where}: {self.problem}"
        listed = {True: "listed", False: "not listed", None: "not checked"}[self.model_listed]
        return (f"{where} ({listed}): answers in {self.latency_ms} ms, structured output {self.structured_output}"
                f" (a test request took {self.request_ms} ms)")

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(ok=self.ok, models=list(self.models), notes=list(self.notes))
        return data


def probe_timeout(settings: Settings) -> float:
    """Seconds one probe request may take: PROBE_TIMEOUT_S, or the configured LLM timeout when shorter."""
    return min(PROBE_TIMEOUT_S, settings.llm_timeout)


async def probe_llm(settings: Settings) -> ProbeResult:
    """Ask the configured endpoint the three questions (see the module docstring); never raises for what the
    server does, only reports it."""
    if not settings.llm_configured:
        return ProbeResult(base_url="OpenAI", model=settings.model, verdict="not_configured",
                           problem="no LLM is configured: set OPENAI_API_KEY, or OPENAI_BASE_URL for a local server")
    timeout = probe_timeout(settings)
    client = build_client(settings, timeout=timeout, max_retries=0)
    try:
        return await _Probe(settings, client, timeout).run()
    finally:
        await client.close()


class _Probe:
    def __init__(self, settings: Settings, client: openai.AsyncOpenAI, timeout: float):
        self.settings = settings
        self.client = client
        self.timeout = timeout
        self.base_url = str(client.base_url).rstrip("/")
        self.facts: dict[str, Any] = {"base_url": self.base_url, "model": settings.model}
        self.notes: list[str] = []

    def result(self, verdict: Verdict, problem: str | None = None) -> ProbeResult:
        return ProbeResult(**self.facts, verdict=verdict, problem=problem, notes=tuple(self.notes))

    async def run(self) -> ProbeResult:
        try:
            models, self.facts["latency_ms"] = await self._timed(self.client.models.list())
            self._check_model([m.id for m in models.data])
        except openai.APIStatusError as exc:
            if isinstance(exc, (openai.AuthenticationError, openai.PermissionDeniedError)):
                return self.result("auth", self._auth_problem(exc))
            self.facts["latency_ms"] = None  # it answered, but not with a list: the chat request times the server
            reason = "has no /models endpoint" if exc.status_code == 404 else f"answered HTTP {exc.status_code} to GET /models"
            self.notes.append(f"the server {reason}, so the model name could not be checked")
        except (openai.APIConnectionError, TimeoutError) as exc:
            return self._unreachable(exc, "GET /models")
        except (openai.APIError, TypeError, AttributeError, ValueError):  # 200, but not a model list
            self.facts["latency_ms"] = None
            self.notes.append("the server's GET /models answer is not a model list, so the model name could not be "
                              "checked")
        return await self._structured_output()

    def _check_model(self, ids: list[str]) -> None:
        wanted = self.settings.model
        listed = wanted in ids or (":" not in wanted and f"{wanted}:latest" in ids)  # Ollama's implicit tag
        shown = tuple(self._scrub(model_id, 100) for model_id in ids[:MODELS_SHOWN])  # names the server chose
        self.facts.update(model_listed=listed, models=shown, model_count=len(ids))

    async def _structured_output(self) -> ProbeResult:
        """Try FORMATS in order, moving on only on HTTP 400, as LLMClient._structured_call does."""
        rejected: list[str] = []
        for fmt in FORMATS:
            response_format = response_format_for(fmt, _SCHEMA_NAME, _SCHEMA)
            messages = _MESSAGES if fmt == "json_schema" else [*_MESSAGES[:1], {"role": "system", "content": _SHAPE_HINT},
                                                               *_MESSAGES[1:]]
            # Capped, as every request AutoCode sends (a tiny reply; newer OpenAI models want max_completion_tokens).
            kwargs: dict[str, Any] = {"model": self.settings.model, "messages": messages, "max_tokens": PROBE_REPLY_CAP}
            if response_format is not None:
                kwargs["response_format"] = response_format
            try:
                try:
                    completion, elapsed = await self._timed(self.client.chat.completions.create(**kwargs))
                except openai.BadRequestError as exc:
                    if "max_completion_tokens" not in str(exc.message):
                        raise
                    kwargs["max_completion_tokens"] = kwargs.pop("max_tokens")
                    completion, elapsed = await self._timed(self.client.chat.completions.create(**kwargs))
            except openai.BadRequestError as exc:
                rejected.append(f"{fmt} ({self._message(exc)})")
                continue
            except openai.APIStatusError as exc:
                return self._chat_failed(exc)
            except (openai.APIConnectionError, TimeoutError) as exc:
                return self._unreachable(exc, "a tiny chat request")
            except (openai.APIError, TypeError, AttributeError, ValueError) as exc:  # 200, but not a completion
                return self.result("error", f"the server's answer to a tiny chat request is not a chat completion "
                                            f"({type(exc).__name__})")
            return self._accepted(fmt, completion, elapsed, rejected)
        if self.facts.get("model_listed") is False:
            return self.result("unknown_model", self._unknown_model())
        return self.result("error", f"the server rejected every request format (HTTP 400): {'; '.join(rejected)}")

    def _accepted(self, fmt: str, completion: Any, elapsed: int, rejected: list[str]) -> ProbeResult:
        self.facts.update(structured_output=fmt, request_ms=elapsed)
        if self.facts.get("latency_ms") is None:  # no /models: the chat request is the first answer
            self.facts["latency_ms"] = elapsed
        if rejected:
            self.notes.append("rejected with HTTP 400: " + "; ".join(rejected))
        if self.facts.get("model_listed") is False:
            self.notes.append(f"the server does not list {self.settings.model} but answered a request for it "
                              "(llama.cpp, for one, serves its loaded model whatever the name)")
        content = (completion.choices[0].message.content or "") if completion.choices else ""
        try:
            parse_reply(content, _Check)
        except ReplyError:
            self.notes.append(f"the server accepted {fmt} but its reply was not the JSON asked for; AutoCode "
                              "re-asks when a reply does not parse, a stronger model may be needed")
        if fmt == "text":
            return self.result("no_structured_output", (
                "the server accepts neither json_schema nor json_object structured output (HTTP 400 to both); "
                "AutoCode will fall back to plain text with the JSON shape in the prompt, which small models often "
                "break: use a server or model with structured output"))
        return self.result("ok")

    def _chat_failed(self, exc: openai.APIStatusError) -> ProbeResult:
        if isinstance(exc, (openai.AuthenticationError, openai.PermissionDeniedError)):
            return self.result("auth", self._auth_problem(exc))
        if isinstance(exc, openai.NotFoundError):
            if self.facts.get("model_listed") is False:
                return self.result("unknown_model", self._unknown_model())
            return self.result("not_found", (
                f"the server answered HTTP 404 to a chat request for model {self.settings.model} "
                f"({self._message(exc)}): check AUTOCODE_MODEL, and that OPENAI_BASE_URL ends in /v1"))
        return self.result("error", f"the server answered HTTP {exc.status_code} to a tiny chat request: "
                                    f"{self._message(exc)}")

    def _unknown_model(self) -> str:
        shown = ", ".join(self.facts["models"]) or "none"
        more = self.facts["model_count"] - len(self.facts["models"])
        return (f"the server has no model {self.settings.model!r} (AUTOCODE_MODEL); it lists: {shown}"
                + (f" and {more} more" if more > 0 else ""))

    def _auth_problem(self, exc: openai.APIStatusError) -> str:
        what = "rejected the API key" if exc.status_code == 401 else "refused access with this API key"
        key = "OPENAI_API_KEY is set" if self.settings.openai_api_key else "OPENAI_API_KEY is not set"
        return f"the server at {self.base_url} {what} (HTTP {exc.status_code}; {key}): check OPENAI_API_KEY"

    def _unreachable(self, exc: BaseException, during: str) -> ProbeResult:
        if isinstance(exc, (openai.APITimeoutError, TimeoutError)):
            connect = any(type(e).__name__ == "ConnectTimeout" for e in _chain(exc))
            if connect:
                return self.result("unreachable", f"could not connect to {self.base_url} within {self.timeout:g}s "
                                                  "(a firewall dropping packets, or a wrong address)")
            return self.result("timeout", (
                f"the server at {self.base_url} accepted the connection but did not answer {during} within "
                f"{self.timeout:g}s (a model still loading, or an overloaded server)"))
        return self.result("unreachable", f"could not reach the LLM at {self.base_url}: {_connect_cause(exc)}")

    async def _timed(self, call: Awaitable[T]) -> tuple[T, int]:
        """Await one request within the timeout (the client's own, and a hard bound on a trickling answer)."""
        started = time.monotonic()
        async with asyncio.timeout(self.timeout + 1):
            value = await call
        return value, int((time.monotonic() - started) * 1000)

    def _message(self, exc: openai.APIStatusError) -> str:
        """The server's own error message (OpenAI's envelope), else what the client made of the answer."""
        body = exc.body
        text = body.get("message") if isinstance(body, dict) else None
        return self._scrub(text if isinstance(text, str) and text else exc.message)

    def _scrub(self, text: object, limit: int = 200) -> str:
        """A server's text, short, on one line, without terminal controls or the API key (some servers quote
        what they were sent): it reaches logs and terminals."""
        text = " ".join(safe_for_terminal(text, single_line=True).split())
        key = self.settings.openai_api_key
        if key:
            text = text.replace(key, "***")
            if len(key) >= 8:
                text = text.replace(key[-4:], "***")  # OpenAI quotes a key as "sk-ab***wxyz"
        return text if len(text) <= limit else text[: limit - 1] + "…"


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _connect_cause(exc: BaseException) -> str:
    """Why a connection failed, in words: refused, a name that does not resolve, or the OS's own message."""
    chain = _chain(exc)
    if any(isinstance(e, socket.gaierror) for e in chain):
        return "the host name does not resolve (DNS)"
    if any(isinstance(e, ConnectionRefusedError) for e in chain):
        return "connection refused (is the server running, on this port?)"
    oserrors = [e for e in chain if isinstance(e, OSError)]
    return str(oserrors[-1]) if oserrors else type(exc).__name__
