"""One LLM request read as a stream, so that a model that does not answer and one that is still writing are told
apart (issue 20).

Small local models on CPU write 5–40 tokens a second: a 700-token plan takes up to two minutes, and a model that
repeats itself writes until its reply cap. A request sent without streaming looks the same in both cases until the
timeout: silent. Streamed (`stream: true`, the same `response_format`), every token shows that the server is
answering, so:

- the server must start answering (its first chunk) within AUTOCODE_LLM_TIMEOUT, and must not pause longer than
  that between chunks: else the try ended without an answer (`NoFirstToken`, `WritingStalled`);
- once it writes, only the call's deadline bounds it: a reply still being written when the deadline comes ends as
  `StillWriting`, which says how far it got and how fast ("2,412 tokens at 13 tokens/s"), and is never restarted;
- every request carries a reply cap (max_tokens, by purpose: `Settings.reply_cap`), and a reply the cap cut
  reports `finish_reason == "length"`, which the client handles (agent_core/llm.py).

Tokens are the server's usage when the stream ends with it (`stream_options.include_usage`), else counted: one per
content chunk, and the prompt's estimated at four characters a token, so a cut or cancelled call is still recorded
and priced. `AUTOCODE_LLM_STREAM=off` sends plain requests (for a server that cannot stream), each bounded by
AUTOCODE_LLM_TIMEOUT as a whole.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
from openai import AsyncOpenAI

from agent_core.llm_wait import CallClock

CHARS_PER_TOKEN = 4  # the estimate of a prompt's tokens when the server does not say


@dataclass
class Reply:
    """What one request got back: the text (or the reasoning, when a reasoning model left the content empty), why
    the model stopped, and the tokens either way."""

    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    usage_reported: bool = False  # the server said the tokens (else they were counted)

    @property
    def cut(self) -> bool:
        """The reply cap (max_tokens) ended it: the text is incomplete."""
        return self.finish_reason == "length"


class NoFirstToken(TimeoutError):
    """The server did not start answering within AUTOCODE_LLM_TIMEOUT."""


class WritingStalled(Exception):
    """The server started writing, then sent nothing for AUTOCODE_LLM_TIMEOUT."""

    def __init__(self, tokens: int, pause_s: float):
        super().__init__(f"stalled after {tokens} tokens")
        self.tokens, self.pause_s = tokens, pause_s


class StillWriting(Exception):
    """The call's deadline came while the model was still writing its reply."""

    def __init__(self, tokens: int, writing_s: float):
        super().__init__(f"still writing after {tokens} tokens")
        self.tokens, self.writing_s = tokens, writing_s

    @property
    def rate(self) -> float:
        return self.tokens / self.writing_s if self.writing_s > 0 else 0.0


@dataclass
class Request:
    """One request of a call, tried by `agent_core.llm_wait.send_with_retries` (each try calls `send`). Its
    progress (chunks, tokens, usage) is kept across tries for the call's record and shown on the clock."""

    client: AsyncOpenAI
    kwargs: dict[str, Any]
    clock: CallClock
    stream: bool
    timeout_s: float  # first chunk, and the longest pause between chunks (AUTOCODE_LLM_TIMEOUT)
    reply: Reply = field(default_factory=Reply)
    answered: bool = False  # the server sent something (so it processed the prompt)
    request_chars: int = 0

    async def send(self, limit: float) -> Reply:
        """One try; `limit` is what this try may wait for its first chunk (AUTOCODE_LLM_TIMEOUT, or less when the
        deadline is nearer)."""
        self.reply = Reply()
        return await (self._streamed(limit) if self.stream else self._whole(limit))

    async def _whole(self, limit: float) -> Reply:
        async with asyncio.timeout(limit):  # the whole try, however slowly the server trickles
            completion = await self.client.chat.completions.create(**self.kwargs, timeout=limit)
        self.answered = True
        choice = completion.choices[0] if completion.choices else None
        message = choice.message if choice is not None else None
        content = (message.content or "") if message is not None else ""
        if not content.strip() and message is not None:  # a reasoning model may leave its reply in the reasoning
            content = next((r for r in (getattr(message, "reasoning_content", None),  # vLLM, DeepSeek
                                        getattr(message, "reasoning", None))  # Ollama, OpenRouter
                            if isinstance(r, str) and r.strip()), "")
        usage = completion.usage
        self.reply = Reply(content, choice.finish_reason if choice is not None else None,
                           usage.prompt_tokens if usage else 0, usage.completion_tokens if usage else 0, bool(usage))
        return self.reply

    async def _streamed(self, limit: float) -> Reply:
        clock, reply = self.clock, self.reply
        content: list[str] = []
        reasoning: list[str] = []
        loop = asyncio.get_running_loop()
        first_chunk = False
        try:
            async with asyncio.timeout(limit) as bound:
                stream = await self.client.chat.completions.create(
                    **self.kwargs, stream=True, stream_options={"include_usage": True},
                    timeout=httpx.Timeout(self.timeout_s, connect=min(self.timeout_s, 10.0)))
                try:
                    async for chunk in stream:
                        if not first_chunk:
                            first_chunk = self.answered = True
                            clock.writing(time.monotonic())
                            # From the first chunk on only the call's deadline bounds the reply (and the pause
                            # between chunks, httpx's read timeout).
                            bound.reschedule(loop.time() + max(clock.remaining(), 0.0))
                        if chunk.usage is not None:
                            reply.prompt_tokens = chunk.usage.prompt_tokens or 0
                            reply.completion_tokens = chunk.usage.completion_tokens or 0
                            reply.usage_reported = True
                        for choice in chunk.choices or ():
                            delta = choice.delta
                            if delta is not None:
                                if delta.content:
                                    content.append(delta.content)
                                    clock.tokens += 1
                                extra = getattr(delta, "reasoning_content", None) or getattr(delta, "reasoning", None)
                                if isinstance(extra, str) and extra:
                                    reasoning.append(extra)
                                    clock.tokens += 1
                            if choice.finish_reason:
                                reply.finish_reason = choice.finish_reason
                finally:
                    await stream.close()  # a server stops generating when the client goes away
        except TimeoutError:
            if not first_chunk:
                raise NoFirstToken() from None
            raise StillWriting(clock.tokens, clock.writing_for()) from None
        except httpx.TimeoutException:
            if not first_chunk:
                raise NoFirstToken() from None
            raise WritingStalled(clock.tokens, self.timeout_s) from None
        finally:
            if not reply.usage_reported:
                reply.completion_tokens = clock.tokens
        reply.text = "".join(content)
        if not reply.text.strip() and reasoning:
            reply.text = "".join(reasoning)
        return reply

    def tokens(self) -> tuple[int, int]:
        """(prompt, completion) tokens for the call's record: the server's usage, else counted (the prompt's only
        when the server answered at all, so it processed it)."""
        if self.reply.usage_reported:
            return self.reply.prompt_tokens, self.reply.completion_tokens
        prompt = self.request_chars // CHARS_PER_TOKEN if self.answered else 0
        return prompt, max(self.reply.completion_tokens, self.clock.tokens)


__all__ = ["CHARS_PER_TOKEN", "NoFirstToken", "Reply", "Request", "StillWriting", "WritingStalled"]
