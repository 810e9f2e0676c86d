"""Riding out a Redis outage: serve and workers retry their Redis commands for up to AUTOCODE_REDIS_GRACE seconds.

A Redis restart of a few seconds must not fail the runs whose steps are out on workers (issue 21). Every Redis
command of a job (serve following it, the worker reporting on it) goes through an `Outage`, which retries a
command that could not reach Redis every half second until the grace has passed since the outage began, then
lets the error through (the step then fails with "lost the connection to the job queue"). It also keeps what the
outage cost, so serve moves the job's deadlines by that time and does not take a worker whose heartbeat has not yet
come back as lost (`since_recovery`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable, TypeVar

from kombu.exceptions import OperationalError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger(__name__)

T = TypeVar("T")
RETRY_EVERY_S = 0.5
# BusyLoadingError is a ConnectionError: a restarted Redis that still loads its data is waited for too.
# OperationalError: Celery could not send a job (kombu's own retries ran out).
UNREACHABLE = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError, OperationalError)


class RedisUnreachable(Exception):
    """Redis stayed unreachable past the grace (raised by `Outage` from the last error). A class of its own, so that
    a caller's `except` cannot take another OSError (a full disk in the sandbox, say) for an outage."""


class Outage:
    """Retries Redis commands through outages of up to `grace` seconds; `what` names the job in log lines."""

    def __init__(self, grace: float, what: str):
        self.grace = grace
        self.what = what
        self.down_since: float | None = None
        self.recovered_at = float("-inf")
        self.lost_s = 0.0  # time spent in outages so far

    def since_recovery(self) -> float:
        return time.monotonic() - self.recovered_at

    async def __call__(self, command: Callable[[], Awaitable[T]]) -> T:
        while True:
            try:
                value = await command()
            except UNREACHABLE as exc:
                now = time.monotonic()
                if self.down_since is None:
                    self.down_since = now
                    log.warning("%s: Redis is unreachable (%s); retrying for up to %g s (AUTOCODE_REDIS_GRACE)",
                                self.what, type(exc).__name__, self.grace)
                if now - self.down_since > self.grace:
                    raise RedisUnreachable(f"Redis unreachable for over {self.grace:g} s ({type(exc).__name__})") from exc
                await asyncio.sleep(RETRY_EVERY_S)
                continue
            if self.down_since is not None:
                now = time.monotonic()
                self.lost_s += now - self.down_since
                log.warning("%s: Redis is back after %.1f s", self.what, now - self.down_since)
                self.down_since, self.recovered_at = None, now
            return value


__all__ = ["Outage", "RedisUnreachable", "UNREACHABLE"]
