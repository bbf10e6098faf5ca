"""One Generator, one worker thread, a bounded queue: how `spectrt serve` runs requests.

The Generator runs one request at a time, so requests wait their turn in a queue of `max_queue`
places; beyond that, `submit` refuses at once (the server answers 429). Each request's stream is
read to the end on the worker thread (never on an event-loop thread), chunk by chunk, and handed to
the event loop; a cancelled request (client gone) closes its stream at the next chunk, which frees
the Generator for the next request.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterator

from spectrt.runtime.generator import Generator, StreamChunk


class QueueFull(Exception):
    """Every place in the queue is taken."""


@dataclass
class Job:
    """One request in flight: its chunks flow from the worker thread to the event loop through `chunks`."""

    stream: Iterator[StreamChunk]
    loop: asyncio.AbstractEventLoop
    chunks: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    finished: bool = False  # the stream ran to its final chunk


_END = object()


class Engine:
    """Runs the requests of one Generator on a single worker thread; at most `max_queue` wait."""

    def __init__(self, generator: Generator, *, max_queue: int = 16):
        self.generator = generator
        self.max_queue = max_queue
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spectrt-generate")
        self._lock = threading.Lock()
        self.in_flight = 0  # waiting + running

    @property
    def queue_depth(self) -> int:
        """Requests waiting for the Generator (the running one excluded)."""
        return max(self.in_flight - 1, 0)

    def submit(self, stream: Iterator[StreamChunk]) -> Job:
        """Queue a validated stream (from `Generator.stream`); raises QueueFull when no place is left."""
        with self._lock:
            if self.in_flight >= self.max_queue + 1:
                raise QueueFull(f"the server is busy: {self.queue_depth} requests are waiting (--max-queue "
                                f"{self.max_queue}); retry later.")
            self.in_flight += 1
        job = Job(stream, asyncio.get_running_loop())
        self._executor.submit(self._run, job)
        return job

    def _run(self, job: Job) -> None:
        def hand_over(item: Any) -> None:
            try:
                job.loop.call_soon_threadsafe(job.chunks.put_nowait, (time.monotonic(), item))
            except RuntimeError:  # the event loop is gone (server shutting down)
                job.cancelled.set()

        try:
            if job.cancelled.is_set():
                return
            for chunk in job.stream:
                hand_over(chunk)
                if chunk.token_id is None:
                    job.finished = True
                if job.cancelled.is_set():
                    break
        except BaseException as exc:  # reported to the request, never kills the worker
            hand_over(exc)
        finally:
            close = getattr(job.stream, "close", None)
            if close:
                close()  # a cancelled stream frees the Generator here
            with self._lock:
                self.in_flight -= 1
            hand_over(_END)

    async def chunks(self, job: Job) -> AsyncIterator[tuple[float, StreamChunk]]:
        """(arrival time on the monotonic clock, chunk) as they come; cancelling the consumer cancels the job."""
        try:
            while True:
                arrived, item = await job.chunks.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield arrived, item
        finally:
            job.cancelled.set()

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class Pacer:
    """Spreads a round's burst of tokens over time at the measured decode rate.

    A token is released `interval` seconds after the previous one (interval = the generator's median
    time per output token), but never more than `max_delay` seconds after it arrived, so pacing adds
    at most `max_delay` to any token's latency and never slows the stream below the decode rate."""

    def __init__(self, interval: float | None, max_delay: float):
        self.interval = interval
        self.max_delay = max_delay
        self._last_release: float | None = None

    async def wait(self, arrived: float) -> None:
        """Sleep until the token that arrived at `arrived` (time.monotonic) is due."""
        if self.interval is None:
            return
        release = arrived if self._last_release is None else max(arrived, self._last_release + self.interval)
        release = min(release, arrived + self.max_delay)
        delay = release - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        self._last_release = release
