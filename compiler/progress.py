"""Step-by-step progress for long build steps: what runs, how long it took, peak memory."""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from typing import Iterator, TextIO


def peak_rss_mb() -> float:
    """Peak resident memory of this process or of its largest finished child (e.g. a TensorRT build), in MiB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024.0  # Linux reports KiB


class Progress:
    """Prints `[step] name ...` then `done in 12.3 s (peak RSS 4.1 GiB)`; records step times."""

    def __init__(self, stream: TextIO | None = None, quiet: bool = False):
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.times: dict[str, float] = {}

    def say(self, message: str) -> None:
        if not self.quiet:
            print(message, file=self.stream, flush=True)

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        self.say(f"  ▸ {name} ...")
        start = time.perf_counter()
        try:
            yield
        except BaseException:
            self.say(f"  ✗ {name} failed after {time.perf_counter() - start:.1f} s")
            raise
        elapsed = time.perf_counter() - start
        self.times[name] = round(elapsed, 2)
        self.say(f"  ✓ {name} ({elapsed:.1f} s, peak RSS {peak_rss_mb() / 1024:.1f} GiB)")
