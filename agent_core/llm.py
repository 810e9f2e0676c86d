"""The LLM client: AsyncOpenAI against any OpenAI-compatible endpoint.

Structured calls ask for a strict JSON schema and fall back to json_object, then plain text, when a server
rejects the format; the working format is remembered. Every request carries a reply cap sized to its purpose
(`Settings.reply_cap`) and is streamed (agent_core/llm_stream.py), so a model that does not answer and one still
writing are told apart. Replies are parsed tolerantly and re-asked (quoting the error) at most twice; a reply the
cap cut is re-asked once, shorter, then ends the call with a sentence for the user. Transport retries (connection
errors, 408/429/5xx, with backoff honouring Retry-After; never a reply being written) are AutoCode's own, and one
deadline bounds a whole call: fallbacks, re-asks and retries (agent_core/llm_wait.py), which also tells the run
while a call waits or writes. Every HTTP call is recorded with its purpose, model, duration, token usage (counted
when the server does not say, so cut and cancelled calls are priced too) and error.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

import httpx
import openai
from openai import AsyncOpenAI
from pydantic import BaseModel

from agent_core import prompts
from agent_core.config import Settings
from agent_core.llm_stream import Reply, Request, StillWriting, WritingStalled
from agent_core.llm_wait import (
    MIN_TRY_S, CallClock, Deadline, Notify, PastDeadline, retry_after, retry_reason, send_with_retries, watching,
)
from agent_core.plan import ReplyError, parse_reply
from storage.db import Storage, now

log = logging.getLogger(__name__)

FORMATS = ("json_schema", "json_object", "text")
MAX_REASKS = 2
_BAD_REPLY_ECHO_CHARS = 4000

Model = TypeVar("Model", bound=BaseModel)


class LLMError(Exception):
    """The LLM could not give a usable answer; the message is safe to show to users. `unreachable`: the server did
    not answer, refused, or went away (the transport failed, not the reply: a run's history then says "the model
    could not be reached", agent_core/history.py)."""

    def __init__(self, message: str, *, unreachable: bool = False):
        super().__init__(message)
        self.unreachable = unreachable


@dataclass(frozen=True)
class CallContext:
    """Whom a call is for: its run and iteration, where it reports that it is waiting (the run's events), and the
    model it is sent to (the run's, agent_core/channel_settings.py; None: the client's AUTOCODE_MODEL)."""

    run_id: str | None = None
    iteration: int | None = None
    notify: Notify | None = field(default=None, compare=False, repr=False)
    model: str | None = None


def describe_api_error(exc: Exception, base_url: str, timeout: float) -> str:
    if isinstance(exc, openai.APITimeoutError):
        return f"The LLM at {base_url} did not answer within {timeout:g}s."
    if isinstance(exc, openai.APIConnectionError):
        return f"Could not reach the LLM at {base_url}."
    if isinstance(exc, openai.AuthenticationError):
        return "The LLM server rejected the API key (HTTP 401); check OPENAI_API_KEY."
    if isinstance(exc, openai.NotFoundError):
        return "The LLM server does not know the model or endpoint (HTTP 404); check AUTOCODE_MODEL and OPENAI_BASE_URL."
    if isinstance(exc, openai.RateLimitError):
        return "The LLM server kept answering 'rate limited' (HTTP 429) after retries."
    if isinstance(exc, openai.APIStatusError):
        return f"The LLM server answered HTTP {exc.status_code}: {_short(exc.message)}"
    return f"The LLM call failed: {type(exc).__name__}"


def build_client(settings: Settings, *, timeout: float | None = None, max_retries: int | None = None) -> AsyncOpenAI:
    """The AsyncOpenAI client of the configured endpoint; `timeout` and `max_retries` override the settings'
    (`agent_core.llm_probe` checks the endpoint with a short timeout and no retries)."""
    return AsyncOpenAI(
        api_key=settings.openai_api_key or "not-needed",  # local servers ignore it, the client requires one
        base_url=settings.openai_base_url,
        timeout=settings.llm_timeout if timeout is None else timeout,
        max_retries=settings.llm_max_retries if max_retries is None else max_retries,
    )


def response_format_for(fmt: str, schema_name: str, schema: dict[str, Any]) -> dict[str, Any] | None:
    """The `response_format` a request in `fmt` (one of FORMATS) carries; None for plain text. A server that
    answers HTTP 400 (openai.BadRequestError) to one is asked in the next of FORMATS."""
    if fmt == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": schema_name, "strict": True, "schema": schema}}
    return {"type": "json_object"} if fmt == "json_object" else None


def _noun(purpose: str) -> str:
    return {"plan": "plan", "evaluate": "evaluation"}.get(purpose, "reply")


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


class LLMClient:
    def __init__(self, settings: Settings, storage: Storage | None = None, client: AsyncOpenAI | None = None,
                 record: Callable[[dict[str, Any]], None] | None = None):
        """Every HTTP call is recorded in `storage`, or handed to `record` (a remote worker sends it home)."""
        settings.require_llm()
        self.settings = settings
        self.model = settings.model
        self.storage = storage
        self.record = record
        # Retries are ours (llm_wait.send_with_retries), so that each can be seen and none outlasts the deadline;
        # a `client` passed in should have max_retries=0 too.
        self.client = client or build_client(settings, max_retries=0)
        self._format_level = 0  # index into FORMATS of the best format this server accepted
        self._stream = settings.llm_stream  # off after a server refused a streamed request
        self._cap_param = "max_tokens"  # or max_completion_tokens, after a server asked for it

    @property
    def base_url(self) -> str:
        return str(self.client.base_url).rstrip("/")

    async def close(self) -> None:
        await self.client.close()

    async def structured(
        self,
        *,
        purpose: str,
        messages: list[dict[str, str]],
        schema_name: str,
        schema: dict[str, Any],
        shape_hint: str,
        model: type[Model],
        validate: Callable[[Model], None] | None = None,
        context: CallContext = CallContext(),
    ) -> Model:
        """Ask for one JSON object of `model`; re-ask up to twice with the error when it does not parse, and once
        when the reply cap cut it (a cut reply is never parsed: a repaired fragment would run half a plan). The whole
        call, fallbacks and re-asks included, ends within AUTOCODE_LLM_DEADLINE (LLMError saying how long it waited)."""
        async with watching(self._clock(purpose, context, None)) as clock:
            conversation = list(messages)
            was_cut = False
            error = ""
            for attempt in range(MAX_REASKS + 1):
                reply = await self._structured_call(purpose, conversation, schema_name, schema, shape_hint, context,
                                                    clock)
                if reply.cut:
                    log.warning("%s reply cut at %d tokens (attempt %d)", purpose, reply.completion_tokens, attempt + 1)
                    if was_cut:
                        raise LLMError(self._cut_off(purpose, reply))
                    was_cut = True
                    conversation += [{"role": "user", "content": prompts.render(
                        "reply_cut", tokens=f"{self.settings.reply_cap(purpose):,}")}]
                    continue
                try:
                    value = parse_reply(reply.text, model)
                    if validate:
                        validate(value)
                    return value
                except ReplyError as exc:
                    log.warning("%s reply unusable (attempt %d): %s", purpose, attempt + 1, exc)
                    error = str(exc)
                conversation += [
                    {"role": "assistant", "content": reply.text[:_BAD_REPLY_ECHO_CHARS]},
                    {"role": "user", "content": f"That reply could not be used: {error}. "
                     "Send the complete JSON object again, nothing else."},
                ]
            if not error:  # every try was cut
                raise LLMError(self._cut_off(purpose, reply))
            raise LLMError(f"The LLM's {purpose} reply was unusable after {MAX_REASKS + 1} attempts: {error}")

    def _cut_off(self, purpose: str, reply: Reply) -> str:
        """The user's sentence for a reply the cap cut again after the re-ask."""
        setting = "AUTOCODE_LLM_MAX_TOKENS_" + {"evaluate": "EVALUATE", "helper": "HELPER"}.get(purpose, "PLAN")
        return (f"The model's {_noun(purpose)} was cut off at {self.settings.reply_cap(purpose):,} tokens, twice: it kept "
                f"writing, likely repeating itself. Try a stronger model (AUTOCODE_MODEL), or raise {setting}.")

    async def text(self, *, purpose: str, messages: list[dict[str, str]], context: CallContext = CallContext(),
                   deadline: Deadline | None = None) -> str:
        """A plain-text reply, within `deadline` (default: AUTOCODE_LLM_DEADLINE) retries included. A reply the cap
        cut is returned as written (its record says so)."""
        async with watching(self._clock(purpose, context, deadline)) as clock:
            return (await self._call(purpose, messages, "text", None, context, clock)).text

    def _clock(self, purpose: str, context: CallContext, deadline: Deadline | None) -> CallClock:
        return CallClock(purpose, deadline or Deadline.of(self.settings), 1 + self.settings.llm_max_retries,
                         context.run_id, context.notify)

    async def _structured_call(
        self, purpose: str, messages: list[dict[str, str]], schema_name: str, schema: dict[str, Any],
        shape_hint: str, context: CallContext, clock: CallClock,
    ) -> Reply:
        while True:
            fmt = FORMATS[self._format_level]
            response_format = response_format_for(fmt, schema_name, schema)
            if fmt == "json_schema":
                sent = messages
            else:
                # Without a schema the shape travels in the prompt instead.
                sent = [*messages[:1], {"role": "system", "content": shape_hint}, *messages[1:]]
            try:
                return await self._call(purpose, sent, fmt, response_format, context, clock)
            except openai.BadRequestError:
                if fmt == "text":
                    raise LLMError(f"The LLM server rejected the {purpose} request (HTTP 400).", unreachable=True) from None
                self._format_level += 1
                log.warning("LLM server rejected response_format %s; falling back to %s", fmt, FORMATS[self._format_level])

    async def _call(
        self, purpose: str, messages: list[dict[str, str]], fmt: str, response_format: dict[str, Any] | None,
        context: CallContext, clock: CallClock,
    ) -> Reply:
        """One request (tried again on connection errors, 429 and 5xx within the call's deadline), recorded. A
        server that refuses `max_tokens` (newer OpenAI models want max_completion_tokens) or streaming is asked
        again without it, and remembered."""
        while True:
            try:
                return await self._send(purpose, messages, fmt, response_format, context, clock)
            except openai.BadRequestError as exc:
                said = str(exc.message).lower()
                if self._cap_param == "max_tokens" and "max_completion_tokens" in said:
                    self._cap_param = "max_completion_tokens"
                elif self._stream and "stream" in said:
                    self._stream = False
                    log.warning("LLM server refused a streamed request; sending plain requests from now on")
                else:
                    raise

    async def _send(
        self, purpose: str, messages: list[dict[str, str]], fmt: str, response_format: dict[str, Any] | None,
        context: CallContext, clock: CallClock,
    ) -> Reply:
        if clock.remaining() < MIN_TRY_S:  # a re-ask or fallback with no time left: nothing is sent
            clock.past_deadline = True
            raise LLMError(self._gave_up(None, clock), unreachable=True)
        model = context.model or self.model
        kwargs: dict[str, Any] = {"model": model, "messages": messages,
                                  self._cap_param: self.settings.reply_cap(purpose)}
        if response_format is not None:
            kwargs["response_format"] = response_format
        request_chars = sum(len(m["content"]) for m in messages) + (len(json.dumps(response_format)) if response_format else 0)
        record: dict[str, Any] = {
            "run_id": context.run_id, "iteration": context.iteration, "purpose": purpose, "model": model,
            "response_format": fmt, "started_at": now(), "request_chars": request_chars,
            "prompt_tokens": 0, "completion_tokens": 0, "retries": 0, "response_chars": 0,
        }
        request = Request(self.client, kwargs, clock, self._stream, self.settings.llm_timeout,
                          request_chars=request_chars)
        started = time.monotonic()
        try:
            reply = await send_with_retries(clock, self.settings.llm_timeout, request.send)
            record["retries"] = clock.attempt - 1
            record.update(response_chars=len(reply.text), finish_reason=reply.finish_reason)
            if reply.cut:
                record["error"] = f"cut off at the reply cap ({self.settings.reply_cap(purpose):,} tokens)"
            return reply
        except openai.BadRequestError as exc:
            record["error"] = describe_api_error(exc, self.base_url, self.settings.llm_timeout)
            raise
        except StillWriting as exc:
            record["error"] = self._still_writing(purpose, exc, clock)
            raise LLMError(record["error"]) from None
        except WritingStalled as exc:
            record["error"] = (f"The LLM at {self.base_url} stopped writing its {_noun(purpose)} after "
                               f"{exc.tokens:,} tokens: nothing came for {exc.pause_s:g} s (AUTOCODE_LLM_TIMEOUT).")
            raise LLMError(record["error"], unreachable=True) from None
        except (openai.OpenAIError, TimeoutError, PastDeadline, httpx.HTTPError) as exc:
            record["retries"] = clock.attempt - 1
            record["error"] = self._gave_up(exc, clock)
            raise LLMError(record["error"], unreachable=True) from None
        finally:
            # Tokens of a cut, failed or cancelled call are recorded too (and so priced): the server's usage,
            # else counted from the stream.
            record["prompt_tokens"], record["completion_tokens"] = request.tokens()
            record["duration_ms"] = int((time.monotonic() - started) * 1000)
            if self.storage is not None:
                self.storage.add_llm_call(record)
            if self.record is not None:
                self.record(record)

    def _still_writing(self, purpose: str, exc: StillWriting, clock: CallClock) -> str:
        """The deadline came while the model wrote: say how far it got, and what would help."""
        rate = f" at {exc.rate:.0f} tokens/s" if exc.rate else ""
        return (f"The model was still writing its {_noun(purpose)} after {clock.elapsed():.0f} s: {exc.tokens:,} "
                f"tokens{rate}; try a faster model or raise {clock.deadline.setting}.")

    def _gave_up(self, exc: BaseException | None, clock: CallClock) -> str:
        """Why the call ended without an answer: how long it waited in all, over how many attempts, and the limit."""
        tries = clock.requests
        elapsed = clock.elapsed()
        waited = f"waited {elapsed:.{0 if elapsed >= 10 else 1}f} s over {tries} attempt{'' if tries == 1 else 's'}"
        reason = retry_reason(exc) if exc is not None else None
        if clock.past_deadline:
            what = {None: "did not answer", "timeout": "did not answer",
                    "connection error": "could not be reached"}.get(reason, f"answered {reason}")
            limit = clock.deadline.describe()
            hint = retry_after(exc)
            if hint is not None and hint > clock.remaining():
                limit = f"it asked to wait {hint:.0f} s; {limit}"
            return f"The LLM at {self.base_url} {what}: {waited} ({limit})."
        if reason == "timeout":
            each = (f"(AUTOCODE_LLM_TIMEOUT is {self.settings.llm_timeout:g} s)" if tries == 1 else
                    f"of up to {self.settings.llm_timeout:g} s each (AUTOCODE_LLM_TIMEOUT, AUTOCODE_LLM_MAX_RETRIES)")
            return f"The LLM at {self.base_url} did not answer: {waited} {each}."
        message = describe_api_error(exc, self.base_url, self.settings.llm_timeout) if exc is not None else \
            f"The LLM at {self.base_url} did not answer."
        return message if tries <= 1 else f"{message.rstrip('.')} ({waited})."
