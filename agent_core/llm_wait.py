"""How long one LLM call may wait, how its requests are retried, and what it says while it waits.

An LLM call (a plan, an evaluation, one `llm()` helper request) has one deadline for everything it sends: its
structured-output fallbacks, its re-asks and every transport retry (AUTOCODE_LLM_DEADLINE; an `llm()` call also
ends before the tool host's AUTOCODE_TOOL_TIMEOUT cuts it). Retries are AutoCode's, not the openai client's (that
one is built with max_retries=0, so each retry can be seen and bounded): a request is tried up to
1 + AUTOCODE_LLM_MAX_RETRIES times after a timeout, a connection error or HTTP 408/409/429/5xx (unless the server
says `x-should-retry: false`), waiting what the server's Retry-After asks or else an exponential backoff with
jitter (tenacity), and never past the deadline. Each try may take AUTOCODE_LLM_TIMEOUT or what is left of the
deadline, whichever is less.

A call that has waited NOTICE_AFTER_S says so (an `LLMWaiting` run event, then every NOTICE_EVERY_S), as does each
retry when it starts; `LLMWaitOver` ends what such a call said. Events go to the call's `notify` (the run's event
bus), so the console and the chat adapters can show a progress line.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import math
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable, TypeVar

import openai
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt
from tenacity.stop import stop_base
from tenacity.wait import wait_base, wait_exponential, wait_random

from agent_core.config import Settings
from agent_core.events import LLMWaitOver, LLMWaiting, RunEvent

log = logging.getLogger(__name__)

NOTICE_AFTER_S = 5.0  # a call waiting this long says so…
NOTICE_EVERY_S = 10.0  # …and again this often
WRITING_EVERY_S = 5.0  # …or this often while the model writes its reply (tokens, tokens/s)
MIN_TRY_S = 0.1  # a try with less time than this left is not started
HELPER_MARGIN_S = 0.5  # an llm() call ends this much before the tool host would cut it
# The openai client's own schedule: 0.5 s doubling up to 8 s, with some jitter.
BACKOFF = wait_exponential(multiplier=0.5, max=8) + wait_random(0, 0.25)

Notify = Callable[[RunEvent], Awaitable[None]]
T = TypeVar("T")


@dataclass(frozen=True)
class Deadline:
    """How long a call may take in all, and the setting that says so (named, with its value, in the error)."""

    seconds: float
    setting: str = "AUTOCODE_LLM_DEADLINE"
    setting_s: float | None = None  # the setting's value, when the call must end a little before it

    @classmethod
    def of(cls, settings: Settings) -> "Deadline":
        return cls(settings.llm_deadline)

    @classmethod
    def for_helper(cls, settings: Settings) -> "Deadline":
        """An `llm()` call's: the tool host cuts it at AUTOCODE_TOOL_TIMEOUT, so it ends just before, saying why."""
        cut = settings.tool_timeout
        if settings.llm_deadline <= cut:
            return cls.of(settings)
        return cls(cut - min(HELPER_MARGIN_S, cut / 10), "AUTOCODE_TOOL_TIMEOUT", cut)

    def describe(self) -> str:
        return f"{self.setting} is {self.seconds if self.setting_s is None else self.setting_s:g} s"


class PastDeadline(Exception):
    """No time was left to send a request of the call."""


@dataclass
class CallClock:
    """One LLM call while it runs: its deadline, the requests it sent, and what its current request waits on."""

    purpose: str
    deadline: Deadline
    attempts: int  # the most one request is tried
    run_id: str | None = None
    notify: Notify | None = None
    started: float = field(default_factory=time.monotonic)
    requests: int = 0  # HTTP requests sent so far, all tries of all requests
    attempt: int = 1  # of the current request
    reason: str = ""  # why its previous try failed
    past_deadline: bool = False  # the call ended because its deadline came
    noticed: bool = False  # an LLMWaiting was sent
    tokens: int = 0  # of the reply being written now (agent_core/llm_stream.py)
    writing_since: float | None = None  # when its first chunk came

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def remaining(self) -> float:
        return self.deadline.seconds - self.elapsed()

    def writing(self, at: float) -> None:
        """The server started answering the current request."""
        self.writing_since, self.tokens = at, 0

    def writing_for(self) -> float:
        return 0.0 if self.writing_since is None else time.monotonic() - self.writing_since

    def rate(self) -> float:
        """Tokens a second of the reply being written."""
        seconds = self.writing_for()
        return self.tokens / seconds if seconds > 0.5 else 0.0

    def attempts_that_fit(self) -> int:
        """The most tries the current request can still have: `attempts`, or fewer when the deadline leaves room for
        fewer, judged by how long the tries so far took (what a retry count shown to the user must say: "retry 1 of
        1", not "of 3", when one more is all that fits)."""
        per_try = self.elapsed() / max(1, self.requests) + 0.5  # a try as long as the ones so far, and a backoff
        more = max(0, int(self.remaining() // per_try))
        return max(self.attempt, min(self.attempts, self.attempt + more))

    async def notice(self) -> None:
        """Tell the run that this call is still waiting (and on which try), or how its reply is coming along."""
        writing = self.writing_since is not None
        await self._send(LLMWaiting(self.run_id or "", self.purpose, round(self.elapsed(), 1), self.attempt,
                                    self.attempts_that_fit(), self.reason, self.tokens if writing else 0,
                                    round(self.rate(), 1) if writing else 0.0))
        self.noticed = True

    async def over(self, ok: bool) -> None:
        if self.noticed:
            await self._send(LLMWaitOver(self.run_id or "", self.purpose, round(self.elapsed(), 1), self.requests, ok))

    async def _send(self, event: RunEvent) -> None:
        if self.notify is None or self.run_id is None:
            return
        try:
            await self.notify(event)
        except Exception:  # progress is a courtesy: it never breaks the call
            log.exception("LLM wait notice for run %s failed", self.run_id)


def retry_reason(exc: BaseException) -> str | None:
    """Why a failed try may be tried again ("timeout", "connection error", "HTTP 429"), or None if it may not."""
    if isinstance(exc, (openai.APITimeoutError, TimeoutError)):
        return "timeout"
    if isinstance(exc, openai.APIConnectionError):
        return "connection error"
    if isinstance(exc, openai.APIStatusError):
        should = exc.response.headers.get("x-should-retry")
        if should == "false":
            return None
        if should == "true" or exc.status_code in (408, 409, 429) or exc.status_code >= 500:
            return f"HTTP {exc.status_code}"
    return None


def retry_after(exc: BaseException | None) -> float | None:
    """The seconds an error answer asks to wait before trying again (retry-after-ms, or Retry-After in seconds or as
    an HTTP date), or None."""
    if not isinstance(exc, openai.APIStatusError):
        return None
    headers = exc.response.headers
    for name, unit in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = (headers.get(name) or "").strip()
        if not value:
            continue
        try:
            seconds = float(value) * unit
        except ValueError:
            parsed = email.utils.parsedate_tz(value) if name == "retry-after" else None
            if parsed is None:
                continue
            seconds = email.utils.mktime_tz(parsed) - time.time()
        if math.isfinite(seconds):
            return max(0.0, seconds)
    return None


class _AsTheServerAsks(wait_base):
    """Wait what the server's Retry-After asks, else the backoff."""

    def __call__(self, retry_state: RetryCallState) -> float:
        hint = retry_after(retry_state.outcome.exception() if retry_state.outcome else None)
        return hint if hint is not None else BACKOFF(retry_state)


class _PastTheDeadline(stop_base):
    """Stop when the next try would start with less than MIN_TRY_S of the call's deadline left."""

    def __init__(self, clock: CallClock):
        self.clock = clock

    def __call__(self, retry_state: RetryCallState) -> bool:
        if self.clock.remaining() - retry_state.upcoming_sleep < MIN_TRY_S:
            self.clock.past_deadline = True
            return True
        return False


def retryable(exc: BaseException) -> bool:
    """A try that may be sent again: a connection error or HTTP 408/409/429/5xx. Not a timeout: the server may be
    busy writing the reply, and a new request would start it over."""
    return retry_reason(exc) not in (None, "timeout")


async def send_with_retries(clock: CallClock, timeout_s: float, send: Callable[[float], Awaitable[T]]) -> T:
    """One request of the call: `send(limit)` tried until it answers, up to `clock.attempts` times within the
    deadline (retryable errors only), each try given `limit` = min(`timeout_s`, what is left) seconds, which `send`
    applies itself (agent_core/llm_stream.Request: to the whole try, or to a streamed reply's first chunk, the
    deadline after). Raises the last try's error (with `clock.past_deadline` set when the deadline ended it) or
    PastDeadline when no time was left to send it."""
    clock.attempt, clock.reason = 1, ""

    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        clock.attempt, clock.reason = state.attempt_number + 1, (retry_reason(exc) if exc else None) or ""
        log.info("LLM %s: try %d failed (%s); retrying in %.1f s", clock.purpose, state.attempt_number, clock.reason,
                 state.upcoming_sleep)

    retrying = AsyncRetrying(
        stop=_PastTheDeadline(clock) | stop_after_attempt(clock.attempts),
        wait=_AsTheServerAsks(),
        retry=retry_if_exception(retryable),
        before_sleep=before_sleep,
        reraise=True,
    )
    try:
        return await _tries(clock, retrying, timeout_s, send)
    except BaseException:
        if clock.remaining() < MIN_TRY_S:  # whatever ended the last try, the deadline had come
            clock.past_deadline = True
        raise


async def _tries(clock: CallClock, retrying: AsyncRetrying, timeout_s: float,
                 send: Callable[[float], Awaitable[T]]) -> T:
    async for attempt in retrying:
        with attempt:
            limit = min(timeout_s, clock.remaining())
            if limit < MIN_TRY_S:
                clock.past_deadline = True
                raise PastDeadline()
            if clock.attempt > 1:
                await clock.notice()  # the retry starts
            clock.requests += 1
            clock.writing_since, clock.tokens = None, 0
            return await send(limit)
    raise AssertionError("unreachable: tenacity returns or raises")


@asynccontextmanager
async def watching(clock: CallClock) -> AsyncIterator[CallClock]:
    """While the block runs, tell the run every so often that the call is waiting; afterwards, that it is over
    (only when it said anything, and not when the call was cancelled: the run or the step says why)."""
    heartbeat = asyncio.create_task(_heartbeat(clock)) if clock.notify is not None else None
    try:
        yield clock
    except Exception:
        await _stop(heartbeat)
        await clock.over(False)
        raise
    except BaseException:
        await _stop(heartbeat)
        raise
    await _stop(heartbeat)
    await clock.over(True)


async def _stop(task: asyncio.Task | None) -> None:
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _heartbeat(clock: CallClock) -> None:
    due = NOTICE_AFTER_S
    while True:
        await asyncio.sleep(max(0.0, due - clock.elapsed()))
        await clock.notice()
        due += WRITING_EVERY_S if clock.writing_since is not None else NOTICE_EVERY_S


__all__ = ["CallClock", "Deadline", "MIN_TRY_S", "NOTICE_AFTER_S", "NOTICE_EVERY_S", "Notify", "PastDeadline", "retry_after",
           "retry_reason", "retryable", "send_with_retries", "watching"]
