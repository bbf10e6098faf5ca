"""One Generator, its worker threads, a bounded queue: how `spectrt serve` runs requests.

The Generator runs `max_batch` requests at a time (1 unless it was loaded with more: then their steps share
model calls, runtime/batching.py), one per worker thread; the others wait their turn in a queue of `max_queue`
places; beyond that, `submit` refuses at once (the server answers 429). A request's set-up
(`Generator.stream`: tokenizing, the chat template, compiling a constraint) runs on a set-up
thread, never on the event loop: llguidance compiles with the GIL released (measured: a thread
ticking every 5 ms keeps its pace during a 1 s schema compile), so open streams keep flowing.
Each request's stream is then read to the end on the worker thread, chunk by chunk, and handed to
the event loop; a cancelled request (client gone) closes its stream at the next chunk, which frees
the Generator for the next request.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterator

from spectrt.runtime.generator import Generator, StreamChunk


log = logging.getLogger("spectrt.serve")


class QueueFull(Exception):
    """Every place in the queue is taken."""


@dataclass
class Job:
    """One request in flight: its chunks flow from the worker thread to the event loop through `chunks`."""

    stream: Iterator[StreamChunk] | None  # None until its set-up (Generator.stream) has run
    loop: asyncio.AbstractEventLoop
    label: str = ""  # what the server's metrics call it (its drafter)
    chunks: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    finished: bool = False  # the stream ran to its final chunk
    generated: int = 0  # token chunks the worker has read (written by the worker only)


_END = object()


class Engine:
    """Runs the requests of one Generator on its worker threads (one per request it runs at once); at most
    `max_queue` wait.

    `on_cancelled(job)` runs on the worker when it stops a cancelled job early, before the Generator is
    freed: whatever it records is visible by the time any later request finishes."""

    def __init__(self, generator: Generator, *, max_queue: int = 16, setup_threads: int = 2,
                 on_cancelled: Callable[[Job], None] | None = None):
        self.generator = generator
        self.max_queue = max_queue
        self.on_cancelled = on_cancelled
        self.workers = max(1, int(getattr(generator, "max_batch", 1)))  # requests that run at once
        self._executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="spectrt-generate")
        self._setup = ThreadPoolExecutor(max_workers=setup_threads, thread_name_prefix="spectrt-setup")
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self.in_flight = 0  # places taken: setting up + waiting + running

    @property
    def queue_depth(self) -> int:
        """Requests waiting for the Generator (the running ones excluded)."""
        return max(self.in_flight - self.workers, 0)

    async def submit(self, setup: Callable[[], Iterator[StreamChunk]], label: str = "") -> Job:
        """Take a place in the queue (QueueFull when none is left), run `setup` (e.g. `Generator.stream(...)`,
        which validates: its errors propagate) on a set-up thread, and queue the stream it returns.

        The place is taken before the set-up, so a burst of requests cannot set up more than the queue holds;
        a failed set-up frees it. A caller cancelled during the set-up (client gone) leaves nothing behind: the
        stream is dropped unread and its place freed."""
        self._take_place()
        job = Job(None, asyncio.get_running_loop(), label)
        try:
            future = self._setup.submit(self._prepare, job, setup)
        except BaseException:  # shutting down
            self._free_place()
            raise
        future.add_done_callback(lambda done: self._free_place() if done.cancelled() else None)  # never ran
        try:
            await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            job.cancelled.set()  # a stream set up after this is dropped by the worker at once
            raise
        return job

    def _take_place(self) -> None:
        with self._lock:
            if self.in_flight >= self.max_queue + self.workers:
                raise QueueFull(f"the server is busy: {self.queue_depth} requests are waiting (--max-queue "
                                f"{self.max_queue}); retry later.")
            self.in_flight += 1

    def _free_place(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def _prepare(self, job: Job, setup: Callable[[], Iterator[StreamChunk]]) -> None:
        """On a set-up thread: build the job's stream and queue it for the worker (or free its place)."""
        try:
            job.stream = setup()
            self._executor.submit(self._run, job)
        except BaseException:
            close = getattr(job.stream, "close", None)
            if close:
                close()
            self._free_place()
            raise

    def _run(self, job: Job) -> None:
        def hand_over(item: Any) -> None:
            try:
                job.loop.call_soon_threadsafe(job.chunks.put_nowait, (time.monotonic(), item))
            except RuntimeError:  # the event loop is gone (server shutting down)
                job.cancelled.set()

        def stop_requested() -> bool:
            return job.cancelled.is_set() or self._stopping.is_set()

        stopped_early = stop_requested()
        try:
            if not stopped_early:
                for chunk in job.stream:
                    hand_over(chunk)
                    if chunk.token_id is None:
                        job.finished = True
                    else:
                        job.generated += 1
                    if stop_requested():
                        stopped_early = not job.finished
                        break
        except BaseException as exc:  # reported to the request, never kills the worker
            hand_over(exc)
        finally:
            if stopped_early and self.on_cancelled is not None:
                try:
                    self.on_cancelled(job)  # before the Generator is freed for the next request
                except Exception:
                    log.exception("spectrt serve: recording a cancelled request failed")
            close = getattr(job.stream, "close", None)
            if close:
                close()  # a cancelled stream frees the Generator here
            self._free_place()
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
        """Stop: set-ups finish, running and queued requests stop at their next chunk; returns when the worker
        has closed every stream (so the Generator is free)."""
        self._stopping.set()
        self._setup.shutdown(wait=True)
        self._executor.shutdown(wait=True)


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
