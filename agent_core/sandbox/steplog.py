"""A step's stdout and stderr: pipes the server drains while the step runs, kept as head + tail within a cap.

Nothing of a step's log touches the host's disk, and a step printing at full speed for its whole timeout costs the
server the cap, a read buffer and little CPU (see LOG_RATE_BYTES_S).
"""

from __future__ import annotations

import asyncio
import os

# A step's stdout and stderr are pipes the server drains: after `finish` killed the step's processes, their ends
# close at once; a writer that escaped the kill is cut off (EPIPE) after this long.
LOG_DRAIN_TIMEOUT_S = 2.0
# Draining costs the server CPU (a step printing at full speed: about a core): past a burst, each log is read at
# this rate at most, and a step writing faster waits in write(). Logs are capped far below either anyway.
LOG_BURST_BYTES = 16 << 20
LOG_RATE_BYTES_S = 8 << 20


class StepLog(asyncio.Protocol):
    """One of a step's output streams (stdout or stderr), read from a pipe while the step writes it.

    The first half of the cap and the last half are kept, what lies between is only counted: a step printing at
    full speed for its whole timeout costs the cap and a read buffer, and nothing of its log touches the host's disk
    (log files would grow to RLIMIT_FSIZE each, on top of the working directory's cap). Past LOG_BURST_BYTES the
    pipe is read at LOG_RATE_BYTES_S at most (a token bucket), until `unthrottle` once the step's processes are
    killed: what is left in the pipe then is read at once, so the tail is still the last the step wrote.
    """

    def __init__(self, cap_bytes: int):
        self.half = max(cap_bytes, 0) // 2
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0
        self.transport: asyncio.ReadTransport | None = None
        self._loop = asyncio.get_running_loop()
        self.ended: asyncio.Future[None] = self._loop.create_future()  # done at EOF or close
        self._credit, self._stamp = float(LOG_BURST_BYTES), self._loop.time()  # the token bucket
        self._resume: asyncio.TimerHandle | None = None
        self._throttled = True

    @classmethod
    async def open(cls, cap_bytes: int) -> tuple["StepLog", int]:
        """A log being drained, and the write end of its pipe (for the worker; the caller closes it once sent)."""
        read_fd, write_fd = os.pipe()
        stream = cls(cap_bytes)
        pipe = os.fdopen(read_fd, "rb", buffering=0)
        try:
            await asyncio.get_running_loop().connect_read_pipe(lambda: stream, pipe)
        except BaseException:
            pipe.close()
            os.close(write_fd)
            raise
        return stream, write_fd

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.total += len(data)
        if self._throttled:
            now = self._loop.time()
            self._credit = min(float(LOG_BURST_BYTES), self._credit + (now - self._stamp) * LOG_RATE_BYTES_S)
            self._stamp = now
            self._credit -= len(data)
            if self._credit < 0 and self._resume is None and self.transport is not None:
                self.transport.pause_reading()
                self._resume = self._loop.call_later(-self._credit / LOG_RATE_BYTES_S, self._resume_reading)
        room = self.half - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if not data or not self.half:
            return
        if len(data) >= self.half:
            self.tail[:] = data[-self.half:]
        else:
            self.tail += data
            if len(self.tail) > self.half:
                del self.tail[:len(self.tail) - self.half]  # cheap: a bytearray drops its front in place

    def _resume_reading(self) -> None:
        self._resume = None
        if self.transport is not None:
            self.transport.resume_reading()  # a no-op once closing

    def unthrottle(self) -> None:
        """Read what is left at full speed (the writers are gone: it is bounded by the pipe's size)."""
        self._throttled = False
        if self._resume is not None:
            self._resume.cancel()
            self._resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        if not self.ended.done():
            self.ended.set_result(None)

    def close(self) -> None:
        """Stop reading: a process still holding the pipe then gets EPIPE, and nothing more is kept."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def text(self) -> str:
        """The log as stored: whole within the cap, else head, "[... N bytes omitted ...]", tail."""
        omitted = self.total - len(self.head) - len(self.tail)
        if not omitted:
            return (self.head + self.tail).decode("utf-8", "replace")
        return (f"{self.head.decode('utf-8', 'replace')}\n[... {omitted} bytes omitted ...]\n"
                f"{self.tail.decode('utf-8', 'replace')}")


async def drain_logs(logs: list[StepLog], timeout: float) -> None:
    """Wait until every writer of the logs is gone (EOF), at most `timeout` seconds; then stop reading them."""
    for stream in logs:
        stream.unthrottle()
    pending = [stream.ended for stream in logs if not stream.ended.done()]
    if pending:
        await asyncio.wait(pending, timeout=timeout)
    for stream in logs:
        stream.close()


__all__ = ["LOG_DRAIN_TIMEOUT_S", "StepLog", "drain_logs"]
