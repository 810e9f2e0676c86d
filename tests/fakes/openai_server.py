"""A scriptable, OpenAI-compatible HTTP server for tests (standard library only).

Tests queue replies (``reply``, ``reply_json``, ``error``) or set a ``responder``;
every request is recorded so tests can assert on what the client really sent.
Real HTTP is used so the real ``openai`` client (retries, timeouts, error classes)
is exercised end to end.

    with FakeOpenAI() as srv:
        srv.reply("hello")
        client = openai.OpenAI(base_url=srv.base_url, api_key="test")
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from tests.fakes.base import BodyHandler, FakeService, QuietServer

__all__ = ["FakeOpenAI", "RecordedRequest", "NO_REPLY_MESSAGE"]

NO_REPLY_MESSAGE = "fake openai server: no scripted reply left"
MODEL_ID = "fake-model"
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 429: "rate_limit_error"}

Spec = dict[str, Any]
Responder = Callable[[dict[str, Any]], "Spec | None"]


@dataclass
class RecordedRequest:
    """One HTTP request as received; the response fields are filled once it is answered.

    ``headers`` keys are lower-cased; ``body`` is the parsed JSON object, or None.
    """

    path: str
    headers: dict[str, str]
    body: dict[str, Any] | None
    raw: bytes
    response_status: int = 0
    response_body: bytes = b""
    streamed_tokens: int = 0  # a streamed answer: tokens sent before it ended or the client went away
    client_gone: bool = False  # the client closed the stream before its end


@dataclass
class _Reply:
    """A scripted answer: a chat completion (status 200) or an OpenAI-style error."""

    content: str = ""
    status: int = 200
    message: str = "fake openai server error"
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    message_fields: dict[str, Any] = field(default_factory=dict)  # more fields of the reply's message
    # How a real model writes (streamed or not): `delay` before the first token, then `token_delay` between
    # tokens; `repeat` makes a runaway reply: after `content`, `repeat` again and again until the reply cap
    # (max_tokens) cuts it, as small models do ("dolam_dolam_…").
    token_delay: float = 0.0
    repeat: str = ""
    finish_reason: str | None = None  # None: "stop", or "length" when the cap cut it

    @classmethod
    def from_spec(cls, spec: Spec) -> _Reply:
        """Build from a responder spec, e.g. {"content": "hi"}, {"json": {...}}, {"status": 500}."""
        spec = dict(spec)
        if "json" in spec:
            spec["content"] = json.dumps(spec.pop("json"))
        return cls(**spec)


CHARS_PER_TOKEN = 4  # the fake's tokenizer: four characters a token


def _tokens(reply: _Reply, cap: int | None) -> tuple[list[str], str]:
    """The tokens the fake writes for `reply` under the reply cap `cap`, and its finish_reason. A runaway reply
    without a cap is written for a long while (RUNAWAY_TOKENS), as a real one is."""
    tokens = [reply.content[i:i + CHARS_PER_TOKEN] for i in range(0, len(reply.content), CHARS_PER_TOKEN)]
    if reply.repeat:
        unit = [reply.repeat[i:i + CHARS_PER_TOKEN] for i in range(0, len(reply.repeat), CHARS_PER_TOKEN)]
        limit = cap if cap is not None else RUNAWAY_TOKENS
        while len(tokens) < limit + 1:
            tokens.extend(unit)
    if cap is not None and len(tokens) > cap:
        return tokens[:cap], "length"
    return tokens, reply.finish_reason or "stop"


RUNAWAY_TOKENS = 20_000


def _error_body(status: int, message: str) -> dict[str, Any]:
    """OpenAI's error envelope, so the client raises the matching exception class."""
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


def _text_len(content: Any) -> int:
    """Characters in a message content: a string or a list of text parts."""
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(len(p.get("text") or "") for p in content if isinstance(p, dict))
    return 0


class _Handler(BodyHandler):
    server: QuietServer

    def _handle(self, raw: bytes) -> None:
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        rec = RecordedRequest(
            path=self.path.split("?", 1)[0],
            headers={k.lower(): v for k, v in self.headers.items()},
            body=body if isinstance(body, dict) else None,
            raw=raw,
        )
        fake = self.server.fake
        fake._record(rec)
        if fake._holds_requests():
            fake._stopping.wait()  # never_answer: the connection stays open, unanswered, until stop()
            self.close_connection = True
            return
        status, payload, headers, delay = fake._answer(self.command, rec)
        if delay > 0 and fake._stopping.wait(delay):
            self.close_connection = True
            return  # server is stopping: don't bother answering
        stream = payload.pop("_stream", None)
        if stream is not None:
            self._stream(rec, payload, stream)
            return
        data = json.dumps(payload).encode()
        rec.response_body, rec.response_status = data, status  # body first: status marks "answered"
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            self.close_connection = True  # client gave up (timeout); nothing to do


    def _stream(self, rec: RecordedRequest, payload: dict[str, Any], stream: dict[str, Any]) -> None:
        """Answer as server-sent events: a chunk a token, `token_delay` apart, the finish_reason, then the usage
        when the request asked for it (stream_options.include_usage), then [DONE]. A client that goes away stops
        the writing (as llama-server does); `rec.streamed_tokens` says how many tokens were sent."""
        fake = self.server.fake
        rec.response_status = 200
        base = {"id": payload["id"], "object": "chat.completion.chunk", "created": payload["created"],
                "model": payload["model"]}

        def chunk(delta: dict[str, Any], finish: str | None = None, **more: Any) -> bytes:
            body = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **more}
            return f"data: {json.dumps(body)}\n\n".encode()

        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            self.wfile.write(chunk({"role": "assistant", "content": "", **stream["fields"]}))
            self.wfile.flush()
            for n, token in enumerate(stream["tokens"]):
                if n and stream["token_delay"] > 0 and fake._stopping.wait(stream["token_delay"]):
                    return
                self.wfile.write(chunk({"content": token}))
                self.wfile.flush()
                rec.streamed_tokens += 1
            self.wfile.write(chunk({}, stream["finish_reason"]))
            if stream["usage"] is not None:
                self.wfile.write(f"data: {json.dumps({**base, 'choices': [], 'usage': stream['usage']})}\n\n".encode())
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
            rec.response_body = json.dumps(payload).encode()
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            rec.client_gone = True


class FakeOpenAI(FakeService):
    """In-process OpenAI-compatible server on 127.0.0.1 with FIFO scripted replies."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: deque[_Reply] = deque()
        self._requests: list[RecordedRequest] = []
        self._responder: Responder | None = None
        self._rejected_formats: set[str] = set()
        self._api_key: str | None = None  # require_api_key
        self._models: tuple[str, ...] | None = None  # serve_models (None: the default list, MODEL_ID)
        self._reject_unlisted = False
        self._no_models = False  # without_models_endpoint
        self._stopping = threading.Event()
        self._counter = 0
        self._silent = False  # never_answer
        self._busy: deque[tuple[int, dict[str, str]]] = deque()  # busy: error answers still to give
        self._no_streaming = False  # without_streaming
        self._usage_in_stream = True  # without_stream_usage
        self._require_cap = True  # every chat request must carry max_tokens (or max_completion_tokens)

    # -- lifecycle -------------------------------------------------------
    def start(self) -> FakeOpenAI:
        """Bind an ephemeral port and serve in a daemon thread."""
        self._stopping.clear()
        return super().start()

    def _release_waiters(self) -> None:
        self._stopping.set()  # delayed replies stop waiting

    @property
    def port(self) -> int:
        """The bound TCP port (server must be started)."""
        if self._server is None:
            raise RuntimeError("FakeOpenAI is not started")
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        """URL to pass as ``base_url`` to an OpenAI client."""
        return f"{self.origin}/v1"

    # -- scripting -------------------------------------------------------
    def reply(self, content: str, *, prompt_tokens: int | None = None,
              completion_tokens: int | None = None, delay: float = 0.0) -> FakeOpenAI:
        """Queue a normal chat completion whose message content is ``content``."""
        return self._push(_Reply(content=content, prompt_tokens=prompt_tokens,
                                 completion_tokens=completion_tokens, delay=delay))

    def reply_json(self, obj: Any, *, prompt_tokens: int | None = None,
                   completion_tokens: int | None = None, delay: float = 0.0) -> FakeOpenAI:
        """Queue a chat completion whose content is ``json.dumps(obj)``."""
        return self.reply(json.dumps(obj), prompt_tokens=prompt_tokens,
                          completion_tokens=completion_tokens, delay=delay)

    def reply_message(self, content: str | None, **fields: Any) -> FakeOpenAI:
        """Queue a chat completion whose message has ``content`` (None sends null) and more ``fields``, e.g. a
        reasoning model's ``reasoning_content`` (vLLM, DeepSeek) or ``reasoning`` (Ollama, OpenRouter)."""
        return self._push(_Reply(content=content or "", message_fields={**fields, "content": content}))

    def error(self, status: int, message: str = "fake openai server error", *,
              headers: dict[str, str] | None = None, delay: float = 0.0) -> FakeOpenAI:
        """Queue an OpenAI-style error answer with ``status`` and extra ``headers``."""
        return self._push(_Reply(status=status, message=message, headers=dict(headers or {}), delay=delay))

    def responder(self, fn: Responder | None) -> FakeOpenAI:
        """Answer dynamically when the queue is empty: ``fn(body)`` returns a spec dict or None.

        A spec takes the keys content / json / status / message / headers / delay / token_delay / repeat /
        prompt_tokens / completion_tokens. None falls through to the "no reply" 500.
        """
        with self._lock:
            self._responder = fn
        return self

    def reject_response_format(self, *types: str) -> FakeOpenAI:
        """Answer 400 (without consuming a reply) when ``response_format.type`` is in ``types``."""
        with self._lock:
            self._rejected_formats.update(types)
        return self

    def require_api_key(self, key: str) -> FakeOpenAI:
        """Answer 401 to every request whose bearer token is not ``key``, quoting the key sent (as OpenAI does,
        in part), so tests can check that nobody prints it."""
        with self._lock:
            self._api_key = key
        return self

    def serve_models(self, *ids: str, reject_others: bool = True) -> FakeOpenAI:
        """List ``ids`` at GET /v1/models; with ``reject_others`` a chat request for another model gets 404
        "model does not exist" (as OpenAI, Ollama and vLLM answer)."""
        with self._lock:
            self._models, self._reject_unlisted = tuple(ids), reject_others
        return self

    def without_models_endpoint(self) -> FakeOpenAI:
        """Answer 404 to GET /v1/models, as servers without the endpoint do."""
        with self._lock:
            self._no_models = True
        return self

    def never_answer(self, on: bool = True) -> FakeOpenAI:
        """Accept every request (any path) and never answer it: an endpoint that hangs. Held requests are released
        (unanswered) only by stop()."""
        with self._lock:
            self._silent = on
        return self

    def busy(self, times: int, status: int = 429, retry_after: float | None = 1.0) -> FakeOpenAI:
        """Answer the next ``times`` chat completion requests with ``status`` (429, 503…) and, unless None, a
        ``Retry-After`` header of ``retry_after`` seconds, before any scripted reply (none is consumed)."""
        headers = {} if retry_after is None else {"Retry-After": f"{retry_after:g}"}
        with self._lock:
            self._busy.extend([(status, headers)] * times)
        return self

    def writing(self, content: str = "", *, repeat: str = "", delay: float = 0.0, token_delay: float = 0.0,
                finish_reason: str | None = None) -> FakeOpenAI:
        """Queue a reply written as a real model writes it: `delay` before the first token, `token_delay` between
        tokens (four characters each); with `repeat`, a runaway that repeats it until the reply cap cuts it."""
        return self._push(_Reply(content=content, delay=delay, token_delay=token_delay, repeat=repeat,
                                 finish_reason=finish_reason))

    def without_streaming(self, on: bool = True) -> FakeOpenAI:
        """Answer 400 to streamed requests, as a server that cannot stream does."""
        with self._lock:
            self._no_streaming = on
        return self

    def without_stream_usage(self, on: bool = True) -> FakeOpenAI:
        """Send no usage chunk at the end of a stream, even when asked (the client must count)."""
        with self._lock:
            self._usage_in_stream = not on
        return self

    def allow_uncapped(self, on: bool = True) -> FakeOpenAI:
        """Answer requests without a reply cap too (by default they get 400: every request AutoCode sends must
        carry max_tokens)."""
        with self._lock:
            self._require_cap = not on
        return self

    # -- inspection ------------------------------------------------------
    @property
    def requests(self) -> list[RecordedRequest]:
        """Snapshot of every request received so far, in arrival order."""
        with self._lock:
            return list(self._requests)

    def chat_requests(self) -> list[dict[str, Any]]:
        """Bodies of all chat completion requests, rejected ones included."""
        return [r.body or {} for r in self.requests if r.path.endswith("/chat/completions")]

    def remaining(self) -> int:
        """Number of scripted replies not consumed yet."""
        with self._lock:
            return len(self._queue)

    # -- internals -------------------------------------------------------
    def _push(self, reply: _Reply) -> FakeOpenAI:
        with self._lock:
            self._queue.append(reply)
        return self

    def _record(self, rec: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(rec)

    def _refusal(self, method: str, rec: RecordedRequest) -> tuple[int, dict[str, Any], dict[str, str], float] | None:
        """The answer of require_api_key / serve_models / without_models_endpoint, when one applies."""
        with self._lock:
            key, models, reject_unlisted, no_models = self._api_key, self._models, self._reject_unlisted, self._no_models
        sent = rec.headers.get("authorization", "").removeprefix("Bearer ")
        if key is not None and sent != key:
            return 401, _error_body(401, f"Incorrect API key provided: {sent}."), {}, 0.0
        if method == "GET" and rec.path == "/v1/models" and no_models:
            return 404, _error_body(404, f"unknown endpoint {method} {rec.path}"), {}, 0.0
        if method == "GET" and rec.path == "/v1/models" and models is not None:
            data = [{"id": m, "object": "model", "created": 0, "owned_by": "fake"} for m in models]
            return 200, {"object": "list", "data": data}, {}, 0.0
        model = (rec.body or {}).get("model")
        if reject_unlisted and rec.path == "/v1/chat/completions" and model not in (models or ()):
            return 404, _error_body(404, f"The model `{model}` does not exist."), {}, 0.0
        return None

    def _holds_requests(self) -> bool:
        with self._lock:
            return self._silent

    def _busy_answer(self, method: str, rec: RecordedRequest) -> tuple[int, dict[str, Any], dict[str, str], float] | None:
        """The next error answer of busy(), for a chat completion request, while any is left."""
        if method != "POST" or rec.path != "/v1/chat/completions":
            return None
        with self._lock:
            if not self._busy:
                return None
            status, headers = self._busy.popleft()
        return status, _error_body(status, f"fake openai server: busy (HTTP {status})"), dict(headers), 0.0

    def _answer(self, method: str, rec: RecordedRequest) -> tuple[int, dict[str, Any], dict[str, str], float]:
        """Decide (status, json payload, extra headers, delay) for a request."""
        busy = self._busy_answer(method, rec)
        if busy is not None:
            return busy
        refusal = self._refusal(method, rec)
        if refusal is not None:
            return refusal
        if method == "GET" and rec.path == "/v1/models":
            model = {"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "fake"}
            return 200, {"object": "list", "data": [model]}, {}, 0.0
        if method != "POST" or rec.path != "/v1/chat/completions":
            return 404, _error_body(404, f"unknown endpoint {method} {rec.path}"), {}, 0.0
        body = rec.body
        if body is None:
            return 400, _error_body(400, "request body must be a JSON object"), {}, 0.0
        if self._no_streaming and body.get("stream"):
            return 400, _error_body(400, "fake openai server: streaming is not supported"), {}, 0.0
        cap = body.get("max_completion_tokens", body.get("max_tokens"))
        if self._require_cap and not (isinstance(cap, int) and cap > 0):
            return 400, _error_body(400, "fake openai server: the request has no reply cap (max_tokens)"), {}, 0.0
        fmt = body.get("response_format")
        fmt_type = fmt.get("type") if isinstance(fmt, dict) else None
        with self._lock:
            if fmt_type in self._rejected_formats:
                return 400, _error_body(400, f"response_format type {fmt_type} is not supported"), {}, 0.0
            reply = self._queue.popleft() if self._queue else None
            responder = self._responder
            self._counter += 1
            n = self._counter
        if reply is None and responder is not None:
            try:
                spec = responder(body)
                reply = _Reply.from_spec(spec) if spec is not None else None
            except Exception as exc:  # a broken responder must show up in the test, not hang it
                return 500, _error_body(500, f"fake openai server: responder failed: {exc!r}"), {}, 0.0
        if reply is None:
            return 500, _error_body(500, NO_REPLY_MESSAGE), {}, 0.0
        if reply.status != 200:
            return reply.status, _error_body(reply.status, reply.message), reply.headers, reply.delay
        messages = body.get("messages") or []
        prompt = reply.prompt_tokens
        if prompt is None:
            prompt = max(1, sum(_text_len(m.get("content")) for m in messages if isinstance(m, dict)) // 4)
        tokens, finish = _tokens(reply, cap if isinstance(cap, int) else None)
        content = "".join(tokens)
        completion = reply.completion_tokens
        if completion is None or finish == "length":
            completion = max(1, len(tokens))
        usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        payload: dict[str, Any] = {
            "id": f"chatcmpl-fake-{n}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model") or MODEL_ID,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content,
                                                    **reply.message_fields},
                         "finish_reason": finish}],
            "usage": usage,
        }
        if body.get("stream"):
            options = body.get("stream_options")
            wants_usage = isinstance(options, dict) and options.get("include_usage") and self._usage_in_stream
            fields = {k: v for k, v in reply.message_fields.items() if k != "content" and v is not None}
            payload["_stream"] = {"tokens": tokens if content or not fields else [], "token_delay": reply.token_delay,
                                  "finish_reason": finish, "usage": usage if wants_usage else None,
                                  "fields": fields}
        elif reply.token_delay > 0:  # not streamed: the whole reply is written before anything is sent
            return 200, payload, reply.headers, reply.delay + reply.token_delay * len(tokens)
        return 200, payload, reply.headers, reply.delay


FakeOpenAI.handler = _Handler
