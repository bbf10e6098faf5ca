"""A fake clock for cost tests: time passes only where a test says a call costs it, so every measured price (and
every choice `width="auto"` makes from prices) is the same on any machine."""

from __future__ import annotations


class FakeClock:
    def __init__(self, start: float = 100.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def charge_calls(obj, method: str, clock: FakeClock, seconds: float) -> None:
    """Every call of `obj.method` advances `clock` by `seconds` (an instance attribute over the bound method)."""
    real = getattr(obj, method)

    def timed(*args, **kwargs):
        clock.advance(seconds)
        return real(*args, **kwargs)

    setattr(obj, method, timed)


def fake_timed_generator(generator, target_step: float = 0.010, draft_step: float = 0.001) -> FakeClock:
    """Put `generator` on a fake clock: a target call costs `target_step`, a draft call `draft_step` (whatever their
    row counts), everything else nothing."""
    clock = FakeClock()
    generator.clock = clock
    charge_calls(generator.target, "step", clock, target_step)
    if generator.draft is not None:
        charge_calls(generator.draft, "step", clock, draft_step)
    return clock
